"""Allocation and ranking key, one-shot: where the cuts go, scored right after pruning (no fine-tune).

The vision study crosses criteria with two allocations after a fine-tune. This script isolates the
planner: the same cached sensitivities (``benchmarks/out/vision_study/sens``, made by the study), each
planned four ways — uniform per-layer ratio; global ranking by score (the paper's); global ranking by
score per removed parameter; global ranking of per-layer L2-normalised scores (Michel et al.'s
normalisation) — pruned, BatchNorm statistics re-estimated on 40 training batches, and top-1 measured on
the validation split (never test). No training, so the numbers are about the plan alone.

Run: ``python benchmarks/allocation_oneshot.py`` after the vision study has made its sensitivities
(about 20 s per row on one CPU thread); writes ``docs/allocation.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
from _common import OUT, dense_resnet, machine  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402
from hap.train import VisionTask, recalibrate_bn  # noqa: E402

evaluate_model = VisionTask().accuracy

DOC = Path(__file__).resolve().parents[1] / "docs" / "allocation.md"
SENS = OUT / "vision_study" / "sens"
WAYS = [("uniform", "score"), ("global", "score"), ("global", "score_per_param"), ("global", "layer_normalized")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criteria", nargs="+", default=["hap", "hap-fisher", "taylor", "obd", "l1"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--out", type=Path, default=DOC)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, data, _ = dense_resnet("resnet20", epochs=15, progress=False)
    model.eval()
    example = torch.zeros(1, data.in_channels, *data.image_size)
    dense_val = evaluate_model(model, data, "val")
    acc: dict[tuple[str, float, str], list[float]] = {}
    for crit in a.criteria:
        for seed in a.seeds:
            path = SENS / f"{crit}_s{seed}.json"
            if not path.is_file():
                print(f"skip {crit} seed {seed}: no {path} (run benchmarks/vision_study.py first)")
                continue
            sens = hap.Sensitivity.load(path)
            for t in a.targets:
                for alloc, key in WAYS:
                    plan = hap.plan(model, sens, hap.Target(params=t), implant=None, allocation=alloc, rank_by=key,
                                    example_inputs=example)
                    small = hap.prune(model, plan)
                    gen = torch.Generator().manual_seed(seed)
                    recalibrate_bn(small, data.loader("train", 128, shuffle=True, generator=gen), max_batches=40)
                    v = evaluate_model(small, data, "val")
                    acc.setdefault((crit, t, f"{alloc}/{key}"), []).append(v)
                    print(f"{crit} s{seed} params-{t:.0%} {alloc}/{key}: val top-1 {100 * v:.2f}%", flush=True)
    cols = [f"{al}/{k}" for al, k in WAYS]
    rows = ["| criterion | params removed | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for crit in a.criteria:
        for t in a.targets:
            cells = []
            for c in cols:
                xs = acc.get((crit, t, c), [])
                cells.append("-" if not xs else f"{100 * np.mean(xs):.1f}" + (
                    f" ± {100 * np.std(xs, ddof=1):.1f}" if len(xs) > 1 else ""))
            if any(x != "-" for x in cells):
                rows.append(f"| {crit} | {t:.0%} | " + " | ".join(cells) + " |")
    cmd = "python " + " ".join(shlex.quote(s) for s in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    doc = f"""# Allocation and ranking key, one-shot (ResNet-20, Fashion-MNIST)

Validation top-1 (%) right after pruning, BatchNorm statistics re-estimated, no fine-tune; mean ± std over
seeds {", ".join(map(str, a.seeds))} (the seed is the sensitivity's). Same sensitivities as the vision
study; only the planner changes: `uniform/score` is `hap.plan(allocation="uniform")` (the default),
`global/score` the paper's global ranking, `global/score_per_param` and `global/layer_normalized` the two
`rank_by` keys of a global ranking. Dense model: {100 * dense_val:.1f}% validation top-1.

{chr(10).join(rows)}

- Machine: {machine()}.
- Command: `{cmd}`
"""
    atomic_write_text(a.out, doc)
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
