"""Which plan gives ``hap demo`` a speed-up a person notices? Latency of its candidate plans, measured.

The demo prunes a ResNet-20 on Fashion-MNIST (1x28x28). Its accuracy side is settled by the post-training
study (docs/posttraining.md: greedy OBS + repair at 50% of params removed is within a few tenths of dense);
what is left to choose is the *width pattern*, and that only a stopwatch can decide: on this CPU, widths
that are multiples of 8 run much faster per MAC than odd widths (docs/speed.md, round_to). Each candidate is
planned from L1 scores on the random-initialised demo architecture (latency depends on the widths, not on the
weights) and timed against the dense model with :func:`hap.bench` (alternating rounds, one thread), at
batch 1 and at the demo's latency batch of 64. Writes ``docs/demo_choice.md``.

    OMP_NUM_THREADS=1 python benchmarks/demo_choice.py      # about two minutes on an idle core
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
import hap.models  # noqa: E402
from _common import machine  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "demo_choice.md"
NOTE = ("The demo's own plan is chosen by greedy OBS, not L1, and its widths differ: the demo itself, run both "
        "ways on an idle machine (README), measured 1.27x at batch 64 for 50% of params (odd widths) and 1.60x "
        "for 70% in multiples of 8, so the demo prunes 70% with `--round-to 8`.")
CANDIDATES = [("params=0.5", 1), ("params=0.5", 8), ("params=0.7", 1), ("params=0.7", 8)]


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = hap.models.create("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(8, 1, 28, 28)
    batches = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(2)]
    sens = hap.sensitivity(model, F.cross_entropy, batches, method="l1", progress=False)
    rows = []
    for target, round_to in CANDIDATES:
        kind, value = target.split("=")
        plan = hap.plan(model, sens, hap.Target(**{kind: float(value)}), implant=None, round_to=round_to, tol=0.04)
        small = hap.prune(model, plan).eval()
        res = hap.bench(small, x, baseline=model, batch_sizes=(1, 64), threads=1, repeats=7)
        mac = 1.0 / max(1e-9, 1.0 - plan.macs_removed)
        rows.append((target, round_to, plan.params_removed, plan.macs_removed, mac, res.speedup[1], res.speedup[64]))
        print(rows[-1], flush=True)
    lines = [
        "# Choosing the demo's plan by measurement",
        "",
        f"Written by `OMP_NUM_THREADS=1 python benchmarks/demo_choice.py` in {time.perf_counter() - t0:.0f} s on "
        f"{machine()}. ResNet-20 at 1x28x28 (the demo's), random initialisation, L1 scores, uniform allocation, "
        "tol 0.04 (multiples of 8 move in coarse steps); "
        "each speed-up is one `hap.bench` call, pruned and dense timed in alternating rounds (7), one thread.",
        "",
        "| target | round_to | params removed | MACs removed | MAC speed-up | latency speed-up b1 | b64 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {t} | {r} | {100 * p:.1f}% | {100 * m:.1f}% | {mac:.2f}x | {b1:.2f}x | {b64:.2f}x |"
              for t, r, p, m, mac, b1, b64 in rows]
    lines += ["", NOTE]
    atomic_write_text(DOC, "\n".join(lines) + "\n")
    print(f"written: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
