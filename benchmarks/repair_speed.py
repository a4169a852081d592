"""How long :func:`hap.repair` takes on its own, one thread, on the post-training studies' models.

The studies (``posttraining_study.py``, ``posttraining_heads.py``) record the repair time of every row, but
they ran with several CPU-bound jobs sharing the two cores, so their times say as much about the load as
about the repair. This script times the repair alone: the same pruned models and calibration data as the
studies' rows (ResNet-20 pruned by ``obs-greedy`` with uniform allocation at 50/70/85% of params, 1,024
training images; MiniLM with 60% of its heads removed by HAP (Fisher, layer-normalised) and by Michel et al.,
512 score tweets), each repaired ``--repeats`` times from the same pruned weights; the median and the range
are reported with the load average seen before each measurement, so a reader can tell an idle run from a
busy one.

    OMP_NUM_THREADS=1 python benchmarks/repair_speed.py        # about 10 minutes on an idle core

It reuses the studies' cached dense models and sensitivities (run those first) and writes its own block
between ``<!-- repair-speed -->`` markers in ``docs/posttraining.md``; ``--smoke`` times one repeat of the
ResNet-20 50% row and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
from _common import OUT, dense_resnet, machine, replace_marked_block  # noqa: E402
from hap.config import PlanConfig  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "posttraining.md"
MARKER = "<!-- repair-speed -->"
GOALS_S = {"resnet20": 15.0, "minilm": 60.0}  # issue 10: one thread, 1,024 images / 512 tweets


def _time_repair(small: torch.nn.Module, dense: torch.nn.Module, calib: list[Any], plan: Any,
                 repeats: int) -> dict[str, Any]:
    secs, loads, peak = [], [], []
    for _ in range(repeats):
        model = copy.deepcopy(small)
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        rep = hap.repair(model, dense, calib, plan=plan, progress=False)
        secs.append(time.perf_counter() - t0)
        peak.append(rep.peak_memory_mb)
    return {"median_s": float(np.median(secs)), "min_s": min(secs), "max_s": max(secs),
            "load": float(np.median(loads)), "peak_mb": float(np.median(peak)), "layers": len(rep.layers),
            "examples": rep.examples}


def vision_rows(targets: list[float], repeats: int) -> list[dict[str, Any]]:
    import posttraining_study as ps

    model, data, _ = dense_resnet("resnet20", epochs=15, seed=0, progress=False)
    model.eval()
    rows = []
    for t in targets:
        plan = ps.make_plan(model, data, "obs-greedy", "uniform", t, 0, True)
        small = hap.prune(model, plan)
        r = _time_repair(small, model, ps.batches(data, 8, 0), plan, repeats)
        rows.append({"model": "resnet20", "what": f"obs-greedy uniform, {round(100 * t)}% params", **r})
        print(rows[-1], flush=True)
    return rows


def minilm_rows(repeats: int) -> list[dict[str, Any]]:
    import posttraining_heads as ph
    from hap.text import load_text_data
    from hap.train import TextTask
    from heads_study import dense_model

    out = OUT / "posttraining_heads"
    args = argparse.Namespace(quiet=True, max_length=64, dense_epochs=1.0, dense_lr=1e-4)
    preset = ph.FULL
    data = load_text_data("tweets", sizes=preset["sizes"], fractions=preset["fractions"], balance=True, seed=0)
    model, tok, _ = dense_model(args, out, data)
    task = TextTask(tok, max_length=64)
    calib = list(islice(task.sensitivity_batches(data, ph.SENS_BATCH, 16, 1), 16))  # the rows' seed 0 + 1
    rows = []
    for method, rank_by in (("hap-fisher", "layer_normalized"), ("michel", "score")):
        sens = hap.Sensitivity.load(out / "sens" / f"{method}_s0.json")
        plan = hap.plan(model, sens, hap.Target(heads=0.6),
                        config=PlanConfig(implant=None, allocation="global", rank_by=rank_by))
        small = hap.prune(model, plan)
        r = _time_repair(small, model, calib, plan, repeats)
        rows.append({"model": "minilm", "what": f"{method}, 60% heads", **r})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict[str, Any]], repeats: int) -> str:
    lines = [
        "## Repair time alone (one thread)",
        "",
        f"Produced by `OMP_NUM_THREADS=1 python benchmarks/repair_speed.py` on {machine()}; each row repaired "
        f"{repeats} times from the same pruned weights (median, range); 'load' is the 1-minute load average "
        "before the repair (near 1.0 = this process alone on a core).",
        "",
        "| model | pruned | calibration examples | layers refit | median s | range s | load | peak MB | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        goal = GOALS_S[r["model"]]
        met = "met" if r["median_s"] < goal else "not met"
        lines.append(f"| {r['model']} | {r['what']} | {r['examples']} | {r['layers']} | {r['median_s']:.1f} | "
                     f"{r['min_s']:.1f}-{r['max_s']:.1f} | {r['load']:.1f} | {r['peak_mb']:.0f} | "
                     f"< {goal:g} s: **{met}** |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        vision_rows([0.5], 1)
        return 0
    rows = vision_rows([0.5, 0.7, 0.85], args.repeats)
    if not args.skip_minilm:
        rows += minilm_rows(args.repeats)
    replace_marked_block(DOC, table(rows, args.repeats), MARKER)
    print(f"written: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
