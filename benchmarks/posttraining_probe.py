"""Post-training probe: BatchNorm re-estimation alone vs least-squares repair, right after pruning.

On the dense 15-epoch ResNet-20 (Fashion-MNIST, ``benchmarks/out/resnet20-fmnist-e15-s0``): a uniform
L1 plan (no implants) at each parameter target, pruned, then

* ``bn``: BatchNorm statistics re-estimated on the calibration images, nothing else;
* ``repair``: :func:`hap.repair.repair` on the same images, BatchNorm statistics kept as they were;
* ``repair+bn``: repair, then BatchNorm statistics re-estimated.

Top-1 on the validation split (never test). Calibration: 1,024 shuffled training images (seeded).

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/posttraining_probe.py`` (about 2 minutes on one
thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import hap
import hap.data
import hap.models
from hap.repair import repair

RUN = Path(__file__).resolve().parent / "out" / "resnet20-fmnist-e15-s0" / "best.safetensors"


def reestimate_bn(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Cumulative-average BatchNorm statistics over ``batches`` (train-mode forwards, no gradients)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m, mom in saved:
        m.momentum = mom
    return model.eval()


def top1(model: nn.Module, data, split: str = "val", batch: int = 500) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in data.loader(split, batch):
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (batches of 128)")
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    data = hap.data.load("fashion-mnist", seed=0)
    model = hap.models.create("resnet20", num_classes=data.num_classes, in_channels=data.in_channels)
    model.load_state_dict(load_file(str(RUN)))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    calib = []
    for x, y in data.loader("train", 128, shuffle=True, generator=gen):
        if len(calib) * 128 >= a.calib:
            break
        calib.append((x, y))
    dense = top1(model, data)
    print(f"dense val top-1 {dense:.4f}; calibration {sum(len(y) for _, y in calib)} training images")
    sens = hap.sensitivity(model, F.cross_entropy, calib[:1], method="l1", progress=False)

    rows = []
    for t in a.targets:
        plan = hap.plan(model, sens, hap.Target(params=t), implant=None, allocation="uniform")
        small = hap.prune(model, plan)
        bn_only = top1(reestimate_bn(copy.deepcopy(small), calib), data)
        fixed = copy.deepcopy(small)
        rep = repair(fixed, model, calib, plan=plan, damping=a.damping, progress=False)
        kept_stats = top1(fixed, data)
        then_bn = top1(reestimate_bn(fixed, calib), data)
        row = {"target": t, "params_removed": round(plan.params_removed, 4), "bn": bn_only, "repair": kept_stats,
               "repair+bn": then_bn, "repair_seconds": round(rep.seconds, 2),
               "repair_peak_memory_mb": round(rep.peak_memory_mb, 1), "examples": rep.examples,
               "mean_rel_error_before": sum(r.before for r in rep.layers.values()) / len(rep.layers),
               "mean_rel_error_after": sum(r.after for r in rep.layers.values()) / len(rep.layers)}
        rows.append(row)
        print(json.dumps(row))

    print()
    print(f"{'target':>6} {'removed':>8} {'bn only':>8} {'repair':>8} {'rep+bn':>8} {'repair s':>9}")
    for r in rows:
        print(f"{r['target']:>6.2f} {r['params_removed']:>8.4f} {r['bn']:>8.4f} {r['repair']:>8.4f} "
              f"{r['repair+bn']:>8.4f} {r['repair_seconds']:>9.2f}")
    print(f"dense {dense:.4f}; uniform L1 plan, no implants, {calib and len(calib) * 128} calibration images, "
          f"damping {a.damping}, {time.strftime('%Y-%m-%d')}")
    if a.json is not None:
        a.json.write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
