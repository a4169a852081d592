"""Implant layout benchmark: CPU latency of a pruned + implanted ResNet, concat layout vs scatter layout.

Same model, same plan, same weights, three ways to run it, plus the dense model and the plan without
implants for reference:

- ``dense``: the unpruned network;
- ``pruned, no implant``: the same target met by removal only;
- ``implant, concat``: hap's layout: kept channels first, consumers' input channels permuted once at
  surgery, each implanted layer is two convolutions and one ``torch.cat``;
- ``implant, scatter``: the naive layout: consumers untouched, the two outputs written into a freshly
  allocated zero tensor at the channels' original positions (``index_copy_``).

Latency is the median over rounds of the median of ``--repeats`` timed forward passes (eval mode, no
autograd, ``torch.set_num_threads`` fixed); rounds interleave the models so slow phases of a shared
machine hit all of them alike. Weights do not affect speed, so the model is freshly initialised and
scored by L1 magnitude: nothing to train or download.

Run: ``python benchmarks/implant_speed.py`` (writes the table to ``docs/implant_speed.md``).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
import hap.models  # noqa: E402
from _common import machine  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "implant_speed.md"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--params", type=float, default=0.5, help="fraction of parameters removed")
    ap.add_argument("--implant", default="pointwise", choices=["pointwise", "lowrank"])
    ap.add_argument("--implant-fraction", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="input side (CIFAR: 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=DOC)
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dense = hap.models.create(a.model, num_classes=10, in_channels=3).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.zeros(a.batch, dtype=torch.long)
    sens = hap.sensitivity(dense, F.cross_entropy, [(x[:2], y[:2])], method="l1", progress=False)
    target = hap.Target(params=a.params)
    plan = hap.plan(dense, sens, target, implant=a.implant, implant_fraction=a.implant_fraction, example_inputs=x[:1])
    plain = hap.plan(dense, sens, target, implant=None, example_inputs=x[:1])
    models = {
        "dense": dense,
        "pruned, no implant": hap.prune(dense, plain),
        "implant, concat (hap)": hap.prune(dense, plan),
        "implant, scatter (naive)": hap.prune(dense, plan, layout="scatter"),
    }
    with torch.no_grad():  # both layouts compute the same function
        torch.testing.assert_close(models["implant, concat (hap)"](x), models["implant, scatter (naive)"](x))
    per_round: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.rounds):
        for name, m in models.items():
            per_round[name].append(hap.latency(m, x, repeats=a.repeats, warmup=3, threads=a.threads).median_ms)
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    params = {k: hap.count_params(m) for k, m in models.items()}
    macs = {k: hap.count_macs(m, x[:1]) for k, m in models.items()}

    n_impl = sum(len(g.implanted) for g in plan.groups)
    n_layers = sum(1 for g in plan.groups if g.implanted)
    head = (
        f"{a.model}, input {a.batch}x3x{a.size}x{a.size}, target {target}, implant={a.implant} "
        f"(fraction {a.implant_fraction}: {n_impl} channels in {n_layers} layers), {a.threads} thread(s), "
        f"median of {a.rounds} rounds x {a.repeats} runs"
    )
    rows = [
        "| model | params | MACs/example | latency (ms) | vs dense | vs implant, concat |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ref = ms["implant, concat (hap)"]
    for k in models:
        rows.append(
            f"| {k} | {params[k]:,} | {macs[k]:,} | {ms[k]:.2f} | {ms[k] / ms['dense']:.2f}x | {ms[k] / ref:.2f}x |"
        )
    table = "\n".join(rows)
    print(head)
    print(table)
    cmd = "python " + " ".join(shlex.quote(s) for s in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    scat, conc, plain = "implant, scatter (naive)", "implant, concat (hap)", "pruned, no implant"
    doc = f"""# Neural Implant layout: CPU latency

Does the implant's run-time layout matter? hap lays kept channels first and implanted ones last, permuting
the consumers' input channels once at surgery, so an implanted layer runs as two convolutions and one
concatenation. The naive alternative writes both outputs into a zero tensor at the channels' original
positions (a scatter) and leaves the consumers alone. Same plan, same weights, same function (checked).

{head}.

{table}

Ratios above 1.00x are slower. "vs dense" shows what pruning buys; "vs implant, concat" what the scatter
layout costs on top of the same pruned network: {ms[scat] / ref:.2f}x here. At the same parameter count the
implanted network runs at {ref / ms[plain]:.2f}x the removal-only one: it keeps
{macs[conc] / macs[plain]:.2f}x its MACs (implanted channels still feed the next layer) and adds one small
convolution per implanted layer.

- Machine: {machine()} (a shared 2-core CPU box; other jobs were running, so expect a few percent noise).
- Command: `{cmd}`
"""
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(doc)
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
