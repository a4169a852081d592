"""Training-step speed on CPU: NCHW (contiguous) vs NHWC (channels_last), and what ``memory_format="auto"`` picks.

``hap.TrainConfig(memory_format="auto")`` times a few steps in each layout on the real batch and keeps
the faster, because which one wins depends on the widths and the image size (and a pruned network is
thinner than its parent). This script checks that choice against a longer measurement: for each
(model, input) it times full SGD steps (forward, backward, update) in both layouts, alternating the two
in rounds so a slow phase of a shared machine hits both alike, and reports the ratio next to what
``pick_memory_format`` chose.

Weights do not affect speed, so models are freshly initialised; the pruned rows remove 70% of the
parameters with a uniform per-layer ratio (L1 scores), as in the vision study.

Run: ``python benchmarks/memory_format.py`` (about two minutes; writes ``docs/memory_format.md``).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
import hap.models  # noqa: E402
from _common import machine  # noqa: E402
from hap.train import pick_memory_format  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "memory_format.md"

CASES = [  # (model, channels, side, batch, pruned)
    ("resnet20", 1, 28, 128, False),
    ("resnet20", 1, 28, 128, True),
    ("resnet56", 3, 32, 128, False),
    ("wrn16_4", 3, 32, 64, False),
    ("wrn16_4", 3, 32, 64, True),
    ("vgg16_bn", 3, 32, 64, False),
    ("resnet20", 3, 96, 32, False),
]


def _steps(model, x, y, fmt, n):
    m = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    t0 = time.perf_counter()
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def measure(name, ch, side, batch, pruned, rounds, steps):
    torch.manual_seed(0)
    model = hap.models.create(name, num_classes=10, in_channels=ch).train()
    x = torch.randn(batch, ch, side, side)
    y = torch.randint(0, 10, (batch,))
    if pruned:
        sens = hap.sensitivity(model, F.cross_entropy, [(x[:4], y[:4])], method="l1", progress=False)
        plan = hap.plan(model, sens, hap.Target(params=0.7), allocation="uniform", example_inputs=x[:1])
        model = hap.prune(model, plan).train()
    choice = pick_memory_format(model, x, y)
    models = {"contiguous": copy.deepcopy(model), "channels_last": copy.deepcopy(model)}
    fmts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for k in models:  # warm-up
        _steps(models[k], x, y, fmts[k], 2)
    per = {k: [] for k in models}
    for _ in range(rounds):
        for k in models:
            per[k].append(_steps(models[k], x, y, fmts[k], steps))
    ms = {k: 1000 * statistics.median(v) for k, v in per.items()}
    return ms, choice, hap.count_params(model)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DOC)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = ["| model | input (batch x C x H x W) | params | NCHW ms/step | NHWC ms/step | NCHW / NHWC | auto picks | "
            "auto right? |", "|---|---|---:|---:|---:|---:|---|---|"]
    right = 0
    for name, ch, side, batch, pruned in CASES:
        ms, choice, n = measure(name, ch, side, batch, pruned, a.rounds, a.steps)
        ratio = ms["contiguous"] / ms["channels_last"]
        faster = "channels_last" if ratio > 1 else "contiguous"
        # within 5% both are acceptable: auto keeps NCHW unless NHWC is clearly faster
        ok = choice == faster or abs(ratio - 1) < 0.05
        right += ok
        label = f"{name}{' (70% pruned)' if pruned else ''}"
        row = (f"| {label} | {batch}x{ch}x{side}x{side} | {n:,} | {ms['contiguous']:.1f} | {ms['channels_last']:.1f} | "
               f"{ratio:.2f}x | {choice} | {'yes' if ok else 'no'} |")
        rows.append(row)
        print(row, flush=True)
    table = "\n".join(rows)
    cmd = "python " + " ".join(shlex.quote(s) for s in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    doc = f"""# Training memory layout on CPU: NCHW vs NHWC (channels_last)

One SGD step (forward, backward, update) timed in each layout, median of {a.rounds} alternating rounds of
{a.steps} steps; "NCHW / NHWC" above 1.00x means channels_last is faster. "auto picks" is what
`hap.train.pick_memory_format` (the `memory_format="auto"` default of `TrainConfig` and of the CLI's
`--memory-format`) chose from its own short probe on the same batch; "auto right?" is yes when it chose
the faster layout or the two are within 5%. It was right in {right} of {len(CASES)} cases.

{table}

- Machine: {machine()} (a shared 2-core CPU box; other jobs may have been running, so expect a few
  percent noise).
- Command: `{cmd}`
"""
    hap._utils.atomic_write_text(a.out, doc)
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
