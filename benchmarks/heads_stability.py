"""Ranking stability of head scores on the MiniLM: Fisher vs Hutchinson vs Michel et al., per second.

Uses the heads study's dense MiniLM classifier (``benchmarks/out/heads_study/``; trained there if missing)
and its ``score`` split (512 tweets, apart from train and test). Prints, and writes to
``docs/engine_heads.md``: wall time, split-half rank stability of the 72 head scores, and the rank
agreement between criteria.

Run: ``python benchmarks/heads_stability.py`` (a few minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
import heads_study  # noqa: E402
from _common import OUT, machine  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402
from hap.estimate.stats import spearman  # noqa: E402
from hap.metrics import classification_loss as classifier_loss  # noqa: E402
from hap.text.data import TextLoader, load_text_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hutchinson", type=int, default=128, help="Hutchinson vectors")
    ap.add_argument("--examples", type=int, default=512, help="score examples (Fisher samples)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = load_text_data("tweets", sizes=heads_study.FULL["sizes"], balance=True, seed=0)
    args = argparse.Namespace(dense_epochs=heads_study.FULL["dense_epochs"], dense_lr=1e-4, max_length=64, quiet=True)
    model, tok, dense = heads_study.dense_model(args, OUT / "heads_study", data)
    texts, labels = data.split("score")
    loader = TextLoader(texts, labels, tok, 32, max_length=64, limit=a.examples)
    common = dict(units="heads", max_batches=16, progress=False, stability=None, tol=0.0)
    runs = {}
    t = time.perf_counter()
    runs["HAP, Fisher"] = hap.sensitivity(model, classifier_loss, loader, curvature="fisher", max_samples=a.examples,
                                          min_samples=a.examples, **common)
    runs["HAP, Fisher"].wall_time_s = time.perf_counter() - t
    runs["HAP, Hutchinson"] = hap.sensitivity(model, classifier_loss, loader, curvature="hessian",
                                              max_samples=a.hutchinson, min_samples=a.hutchinson, **common)
    runs["Michel et al."] = hap.sensitivity(model, classifier_loss, loader, method="michel", **common)
    names = list(runs)
    lines = ["# Head-score stability on MiniLM (72 heads)", "",
             f"Command: `python benchmarks/heads_stability.py {' '.join(sys.argv[1:])}`. Machine: {machine()}.",
             f"Dense MiniLM classifier of the heads study (test accuracy {100 * dense['test_acc']:.1f}%), "
             f"{a.examples} score tweets (apart from train and test), batches of 32.", "",
             "| criterion | samples | seconds | split-half rank stability | " + " | ".join(f"ρ vs {n}" for n in names)
             + " |", "|---|---:|---:|---:|" + "---:|" * len(names)]
    for n, s in runs.items():
        sh = "-" if s.split_half != s.split_half else f"{s.split_half:.3f}"
        lines.append(f"| {n} | {s.samples} | {s.wall_time_s:.0f} | {sh} | "
                     + " | ".join(f"{spearman(s.scores, runs[m].scores):.3f}" for m in names) + " |")
    lines += ["", "Split-half: Spearman correlation of the head scores from the even vs the odd samples (NaN for "
              "Michel, which averages one gradient per batch). ρ: Spearman correlation between criteria.", ""]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(Path(__file__).resolve().parent.parent / "docs" / "engine_heads.md", text)


if __name__ == "__main__":
    main()
