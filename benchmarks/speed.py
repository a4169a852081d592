"""Speed a stopwatch sees: MACs against measured CPU latency of pruned ResNets (docs/speed.md).

For ResNet-20, ResNet-56 and WRN-16-4 (CIFAR shape, 3 x 32 x 32, 10 classes; the wide ResNet has 4x the
channels, so more of its time is arithmetic) the script plans, prunes and times:

- 50 / 70 / 85% of the parameters removed, ``uniform`` and ``global`` allocation: MAC speed-up (dense MACs
  / pruned MACs) against the measured latency speed-up at batch 1 and 64 (goal: at batch 64 the latency
  speed-up is at least 0.8x the MAC speed-up);
- latency targets ``Target(latency=0.5)`` and ``Target(latency=0.33)`` (fraction of the dense latency
  removed, as every Target field is a fraction removed: 0.5 asks for 2x, 0.33 for 1.5x), and
  ``latency=0.67`` (3x), each planned twice: *open loop* on the per-layer latency table's prediction alone
  (:mod:`hap.latency_table`, measured once at batch 64, 1 thread, and cached; ``latency_iters=0``) and
  *closed loop* (the default: the planner times each planned model against the dense one and re-plans for a
  corrected table target, ``latency_iters`` timed plans at most); goal: the latency measured afterwards by
  :func:`hap.bench` at batch 64 within 10% of what was asked;
- ``round_to`` 1 vs 8 vs ``"auto"`` (chosen from the table) at 70% of the parameters;
- inference layouts of the dense and the 70%-pruned model: BatchNorm folded (:func:`hap.fold_batchnorm`),
  ``channels_last`` (the input converted inside the timed call, as an NCHW caller would pay), both;
- the MAC goal again with ``round_to=8`` plans, dense and pruned both in each inference layout;
- why latency lags MACs: one conv3x3 + BN + ReLU at C channels against the same layer at 1/2 and 1/4 of the
  width (MACs fall with the square of the width, memory traffic linearly);
- export: ONNX Runtime (the file :func:`hap.export` writes, 1 intra-op thread) against PyTorch eager.

Weights do not change the speed of dense float32 kernels, so the models are randomly initialised and
scored by L1 magnitude (no data, no training); implants are off (their layout costs are in
docs/implant_speed.md). Every comparison is one :func:`hap.bench` call: the two models timed in
alternating rounds in one process, 1 thread, median of the rounds.

Resumable: each row is cached as JSON under ``benchmarks/out/speed/rows/`` (delete a file to redo it), the
latency tables under ``benchmarks/out/speed/cache/``; the document is written atomically at the end.

Run: ``python benchmarks/speed.py`` (about 20-30 min on an idle 2-core box); ``--smoke`` runs a tiny
version in about a minute and writes ``benchmarks/out/speed/smoke/speed.md`` instead of the document
(``--work DIR`` puts the rows and caches elsewhere, ``--out FILE`` the document).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
import hap.metrics  # noqa: E402
import hap.models  # noqa: E402
from _common import OUT, machine  # noqa: E402
from hap._utils import atomic_write_text, first_line  # noqa: E402
from hap.bench import to_channels_last  # noqa: E402
from hap.config import PlanConfig  # noqa: E402
from hap.latency_table import measure_table, predict_ms  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "speed.md"
ROOT = OUT / "speed"


class NHWC(nn.Module):
    """A channels_last copy of a model that takes NCHW inputs (the conversion is part of its time)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(to_channels_last(x))


class OrtModel(nn.Module):
    """An ONNX Runtime session behind a module's call, so that :func:`hap.bench` times it like the others."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.name = self.sess.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {self.name: x.numpy()})[0])


def cached(path: Path, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The row stored at ``path``, or ``fn()`` computed now and stored (atomically)."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    row = fn()
    row["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(row, indent=1))
    print(f"  {path.stem}: {row.get('error') or ', '.join(f'{k} {v}' for k, v in row.items() if k == 'speedup')}",
          flush=True)
    return row


def speed(res: hap.BenchResult) -> dict[str, Any]:
    return {"speedup": {str(b): res.speedup[b] for b in res.batch_sizes},
            "pruned_ms": {str(b): res.pruned[b].median_ms for b in res.batch_sizes},
            "dense_ms": {str(b): res.baseline[b].median_ms for b in res.batch_sizes},
            "iqr_ms": {str(b): [res.pruned[b].iqr_ms, res.baseline[b].iqr_ms] for b in res.batch_sizes}}


def run_model(name: str, a: argparse.Namespace, rows: Path) -> dict[str, Any]:
    """Every row of one model (computed or read from the cache)."""
    torch.manual_seed(0)
    dense = hap.models.create(name, num_classes=10, in_channels=3).eval()
    x = torch.randn(1, 3, a.size, a.size)
    xs = torch.randn(4, 3, a.size, a.size)
    sens = hap.sensitivity(dense, F.cross_entropy, [(xs, torch.arange(4) % 10)], method="l1", progress=False)
    big = a.batch_sizes[-1]
    t0 = time.perf_counter()
    table = measure_table(dense, x, batch_size=big, threads=a.threads, repeats=a.table_repeats,
                          shares=a.shares)
    table_s = time.perf_counter() - t0
    dense_pred = table.predict(table.dense_uses())
    pruned_cache: dict[str, nn.Module] = {}

    def bench(model: nn.Module, baseline: nn.Module) -> hap.BenchResult:
        return hap.bench(model, x, baseline=baseline, batch_sizes=a.batch_sizes, threads=a.threads,
                         repeats=a.repeats, memory=False)

    def plan_row(label: str, target: hap.Target, **kw: Any) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            try:
                plan = hap.plan(dense, sens, target, implant=None, example_inputs=x, latency_table=table, **kw)
            except hap.PlanError as e:
                return {"label": label, "error": first_line(e)}
            small = hap.prune(dense, plan)
            return {"label": label, "target": str(target), "params_removed": plan.params_removed,
                    "macs_removed": plan.macs_removed, "mac_speedup": plan.base["macs"] / plan.achieved["macs"],
                    "round_to": plan.settings.get("round_to"), "round_to_auto": plan.settings.get("round_to_auto"),
                    "predicted_kept": predict_ms(table, dense, small, x) / dense_pred,
                    "plan": plan.to_dict(), **speed(bench(small, dense))}

        row = cached(rows / f"{name}-{label}.json", make)
        return row

    def pruned(label: str) -> nn.Module:
        if label not in pruned_cache:
            row = json.loads((rows / f"{name}-{label}.json").read_text())
            pruned_cache[label] = hap.prune(dense, hap.PruningPlan.from_dict(row["plan"]))
        return pruned_cache[label]

    out: dict[str, Any] = {"model": name, "params": hap.count_params(dense), "table_s": table_s,
                           "table_layers": len(table.layers), "table_dense_ms": table.dense_ms,
                           "table_rest_ms": table.rest_ms, "table_meta": table.meta, "plans": [], "latency": [],
                           "round_to": [], "layout": [], "export": [], "deploy": []}
    for p in a.params:
        for alloc in ("uniform", "global"):
            out["plans"].append(plan_row(f"params{p:g}-{alloc}", hap.Target(params=p), allocation=alloc))
    for t in a.latency:  # the same target planned on the table alone, then with the measured loop closed
        for loop, iters in (("open", 0), ("closed", a.latency_iters)):
            out["latency"].append(plan_row(f"latency{t:g}-{loop}", hap.Target(latency=t), tol=a.latency_tol,
                                           latency_iters=iters) | {"asked": t, "loop": loop})
    ref = f"params{a.params[len(a.params) // 2]:g}-uniform"
    for r in a.round_to:
        label = ref if r == "1" else f"{ref}-round{r}"
        kw = {} if r == "1" else {"round_to": r if r == "auto" else int(r), "tol": 0.05}
        out["round_to"].append(plan_row(label, hap.Target(params=a.params[len(a.params) // 2]),
                                        allocation="uniform", **kw) | {"asked_round_to": r})
    deploy = {"NCHW + BN": lambda m: m, "BN folded + channels_last": lambda m: NHWC(hap.fold_batchnorm(m))}
    for p in a.params:  # uniform plans in multiples of 8, dense and pruned both in each inference layout
        label = f"params{p:g}-uniform-round8"
        row = plan_row(label, hap.Target(params=p), allocation="uniform", round_to=8, tol=0.05)
        if "error" in row:
            continue
        for v, make_v in deploy.items():
            key = v.replace(" ", "").replace("+", "-")
            out["deploy"].append(cached(rows / f"{name}-deploy-{label}-{key}.json",
                                        lambda label=label, make_v=make_v, v=v, row=row:
                                        {"label": label, "variant": v, "mac_speedup": row["mac_speedup"],
                                         "params_removed": row["params_removed"],
                                         **speed(bench(make_v(pruned(label)), make_v(dense)))}))
    for which in ("dense", ref):
        if which != "dense" and not (rows / f"{name}-{which}.json").is_file():
            continue
        base = dense if which == "dense" else pruned(which)
        variants = {"BN folded": lambda m: hap.fold_batchnorm(m), "channels_last": NHWC,
                    "BN folded + channels_last": lambda m: NHWC(hap.fold_batchnorm(m))}
        for v, make_v in variants.items():
            key = v.replace(" ", "").replace("+", "-")
            out["layout"].append(cached(rows / f"{name}-layout-{which}-{key}.json",
                                        lambda base=base, make_v=make_v, v=v, which=which:
                                        {"model": which, "variant": v, **speed(bench(make_v(base), base))}))

        def ort_row(base: nn.Module = base, which: str = which) -> dict[str, Any]:
            path = rows.parent / "onnx" / f"{name}-{which}.onnx"
            try:
                hap.export(base, x, path, format="onnx")
            except (ValueError, ImportError) as e:
                return {"model": which, "error": first_line(e)}
            return {"model": which, **speed(bench(OrtModel(path, a.threads), base))}

        out["export"].append(cached(rows / f"{name}-export-{which}.json", ort_row))
    return out


LAYER_SHAPES = ((16, 32), (64, 8), (64, 32), (256, 8))  # (channels, side): ResNet-20 stages 1 and 3, WRN-16-4's


def layer_sweep(a: argparse.Namespace, rows: Path) -> list[dict[str, Any]]:
    """One conv3x3 + BN + ReLU with ``C`` in and out channels against the same layer at a fraction of the
    width (both sides pruned, as in a uniform plan): MACs fall with the square of the width, memory traffic
    (activations in and out) only linearly, so a memory-bound layer's time follows the width."""
    def block(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()).eval()

    out = []
    for c, side in LAYER_SHAPES:
        for f in (0.5, 0.25):
            def make(c: int = c, side: int = side, f: float = f) -> dict[str, Any]:
                torch.manual_seed(0)
                n = max(1, round(c * f))
                big, small = block(c), block(n)
                res: dict[str, Any] = {"channels": c, "side": side, "fraction": f, "small_channels": n,
                                       "mac_speedup": c * c / (n * n), "speedup": {}}
                for b in a.batch_sizes:  # alternating rounds, each model on its own input; median of the ratios
                    xb, xs = torch.randn(b, c, side, side), torch.randn(b, n, side, side)
                    ratios = [hap.metrics.latency(big, xb, repeats=10, threads=a.threads).median_ms
                              / hap.metrics.latency(small, xs, repeats=10, threads=a.threads).median_ms
                              for _ in range(a.repeats)]
                    res["speedup"][str(b)] = float(sorted(ratios)[len(ratios) // 2])
                return res
            out.append(cached(rows / f"layer-c{c}-s{side}-f{f:g}.json", make))
    return out


def _x(v: float) -> str:
    return f"{v:.2f}x"


def render(results: list[dict[str, Any]], a: argparse.Namespace, wall_s: float, command: str, rows: Path,
           layers: list[dict[str, Any]] | None = None) -> str:
    b1, bb = (str(b) for b in (a.batch_sizes[0], a.batch_sizes[-1]))
    sections = ("plans", "latency", "round_to", "layout", "export", "deploy")
    measured = sum(p.get("seconds", 0.0) for r in results for k in sections for p in r.get(k, [])) + sum(
        p.get("seconds", 0.0) for p in layers or [])
    lines = ["# Speed: MACs against the stopwatch", "",
             f"Written by `{command}` in {wall_s / 60:.1f} min; its rows took {measured / 60:.1f} min to measure (when "
             "they were measured: a row read from the cache is not measured again). Machine: "
             f"{machine()}; every timing and the latency tables with {a.threads} thread(s). Models: zoo ResNets at "
             f"{a.size}x{a.size}x3, 10 classes, **random "
             "initialisation** (weights do not change dense float32 kernel speed), channels scored by L1 "
             "magnitude (`method=\"l1\"`: latency depends on the widths a plan keeps, not much on which "
             "criterion chose them), no implants. Each speed-up is one `hap.bench` call: the two models timed "
             f"in alternating rounds in one process, {a.repeats} rounds, median per call (torch.utils.benchmark).",
             ""]
    for r in results:
        lines.append(f"- {r['model']}: {r['params']:,} parameters; latency table: {r['table_layers']} layer shapes "
                     f"measured at batch {r['table_meta']['batch']}, {r['table_meta']['threads']} thread(s) in "
                     f"{r['table_s']:.0f} s (0 s when read from the cache); dense forward {r['table_dense_ms']:.1f} "
                     f"ms, of which {r['table_rest_ms']:.1f} ms outside the Conv/Linear layers.")
    lines += ["", f"## MAC speed-up against latency speed-up (batch {b1} and {bb})", "",
              f"Goal: at batch {bb} the latency speed-up is at least 0.8x the MAC speed-up.", "",
              f"| model | plan | params removed | MACs removed | MAC speed-up | latency speed-up b{b1} | "
              f"b{bb} | b{bb} / MAC | >= 0.8? | predicted speed-up b{bb} |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    met = total = 0
    for r in results:
        for p in r["plans"] + r["latency"]:
            if "error" in p:
                lines.append(f"| {r['model']} | {p['label']} | {p['error']} | | | | | | | |")
                continue
            ratio = p["speedup"][bb] / p["mac_speedup"]
            total += 1
            met += ratio >= 0.8
            lines.append(f"| {r['model']} | {p['label']} | {100 * p['params_removed']:.1f}% | "
                         f"{100 * p['macs_removed']:.1f}% | {_x(p['mac_speedup'])} | {_x(p['speedup'][b1])} | "
                         f"{_x(p['speedup'][bb])} | {ratio:.2f} | {'yes' if ratio >= 0.8 else 'no'} | "
                         f"{_x(1 / p['predicted_kept'])} |")
    lines += ["", f"The goal holds for {met} of {total} plans."]
    if layers:
        lines += ["", "### Why latency lags MACs: one layer at a fraction of its width", "",
                  "A conv3x3 + BatchNorm + ReLU with C channels in and out against the same layer with both sides cut "
                  "to a fraction of C (as a uniform plan cuts them), each on its own input, timed in alternating "
                  "rounds (median of the per-round ratios). MACs fall with the square of the width, the activations "
                  "read and written only linearly: where a layer is bound by memory traffic, not arithmetic, its "
                  "time follows the width.", "",
                  f"| C | side | width kept | MAC speed-up | width speed-up | latency speed-up b{b1} | b{bb} | "
                  f"b{bb} / MAC |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in layers:
            lines.append(f"| {r['channels']} | {r['side']} | {r['small_channels']} / {r['channels']} | "
                         f"{_x(r['mac_speedup'])} | {_x(r['channels'] / r['small_channels'])} | "
                         f"{_x(r['speedup'][b1])} | {_x(r['speedup'][bb])} | "
                         f"{r['speedup'][bb] / r['mac_speedup']:.2f} |")
        half = {(r["channels"], r["side"]): r["speedup"][bb] / r["mac_speedup"] for r in layers if r["fraction"] == 0.5}
        per_model = {r["model"]: [p["speedup"][bb] / p["mac_speedup"] for p in r["plans"] if "error" not in p
                                  and "uniform" in p["label"] and p["label"].startswith(f"params{a.params[0]:g}")]
                     for r in results}
        lines += ["", f"Reading: at half width a layer keeps b{bb} / MAC at "
                  + ", ".join(f"{v:.2f} ({c} channels at {sd}x{sd})" for (c, sd), v in half.items())
                  + ". Narrow layers are bound by the activations they read and write, which shrink with the width, "
                  "not its square, so their latency speed-up tends to the width speed-up (the square root of the "
                  "MAC speed-up) and the 0.8 goal is out of their reach; wide layers are bound by arithmetic and "
                  f"come close to it. Whole networks follow their layers: the {a.params[0]:.0%} uniform plan reaches "
                  + ", ".join(f"{v[0]:.2f} on {m}" for m, v in per_model.items() if v)
                  + "; deeper pruning makes every layer narrow, and global allocation empties the narrowest first."]
    lines += ["", "## Latency targets", "",
              f"`Target(latency=t)` asks to keep 1 - t of the dense latency at batch {bb}. *Open loop*: the plan whose "
              f"latency the per-layer table *predicts* to be 1 - t (`latency_iters=0`). *Closed loop* (the default, "
              f"`latency_iters={a.latency_iters}`): the planner times each planned model against the dense one "
              "(`hap.bench`, alternating rounds, at the table's batch and threads) and re-plans for a corrected table "
              f"target until the measured kept latency is within {PlanConfig().latency_tol:.0%} of 1 - t; "
              "*loop's kept* is its own last measurement of the chosen plan. Goal: the latency measured afterwards "
              f"here (pruned / dense at batch {bb}, a separate `hap.bench` call) within 10% of 1 - t.", "",
              f"| model | target | asked kept | open loop: predicted kept | measured kept b{bb} | within 10%? | "
              f"closed loop: timed plans | table target | loop's kept | measured kept b{bb} | measured / asked | "
              f"within 10%? | measured kept b{b1} |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    counts = {"open": [0, 0], "closed": [0, 0]}  # met, total
    for r in results:
        by_target: dict[float, dict[str, dict[str, Any]]] = {}
        for p in r["latency"]:
            by_target.setdefault(p["asked"], {})[p.get("loop", "open")] = p
        for t, pair in by_target.items():
            asked = 1 - t
            cells = [r["model"], f"latency={t:g}", f"{asked:.3f}"]
            for loop in ("open", "closed"):
                p = pair.get(loop)
                width = 3 if loop == "open" else 7
                if p is None or "error" in p:
                    cells += [p["error"] if p else "not run", *[""] * (width - 1)]
                    continue
                kept = 1 / p["speedup"][bb]
                ok = abs(kept / asked - 1) <= 0.10
                counts[loop][0] += ok
                counts[loop][1] += 1
                if loop == "open":
                    cells += [f"{p['predicted_kept']:.3f}", f"{kept:.3f}", "yes" if ok else "no"]
                else:
                    lat = p["plan"]["settings"].get("latency", {})
                    its = lat.get("iterations", [])
                    table_target = f"{its[-1]['internal_target']:.3f}" if its else ""
                    loop_kept = f"{lat['measured_kept']:.3f}" if "measured_kept" in lat else ""
                    cells += [str(len(its)), table_target, loop_kept, f"{kept:.3f}", f"{kept / asked:.2f}",
                              "yes" if ok else "no", f"{1 / p['speedup'][b1]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    (om, ot), (cm, ct) = counts["open"], counts["closed"]
    lines += ["", f"Met within 10%: open loop {om} of {ot} targets, closed loop {cm} of {ct}.", "",
              "## round_to", "",
              "The same parameter target with widths rounded to multiples of 1, 8 and the multiple `round_to=\"auto\"` "
              "chose from the table's width sweep (the largest multiple that costs at most 3% more to round up to).",
              "", f"| model | round_to | chosen | params removed | MAC speed-up | latency speed-up b{b1} | b{bb} |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for p in r["round_to"]:
            if "error" in p:
                lines.append(f"| {r['model']} | {p['asked_round_to']} | {p['error']} | | | | |")
                continue
            lines.append(f"| {r['model']} | {p['asked_round_to']} | {p['round_to']} | {100 * p['params_removed']:.1f}% "
                         f"| {_x(p['mac_speedup'])} | {_x(p['speedup'][b1])} | {_x(p['speedup'][bb])} |")
    lines += ["", "## Inference layout: BatchNorm folding and channels_last", "",
              "Each variant timed against the same model in eager NCHW with its BatchNorms (speed-up above 1: the "
              "variant is faster); the channels_last variants convert the NCHW input inside the timed call.", "",
              f"| model | weights | variant | speed-up b{b1} | b{bb} | eager ms b{bb} |",
              "|---|---|---|---:|---:|---:|"]
    for r in results:
        for p in r["layout"]:
            lines.append(f"| {r['model']} | {p['model']} | {p['variant']} | {_x(p['speedup'][b1])} | "
                         f"{_x(p['speedup'][bb])} | {p['dense_ms'][bb]:.1f} |")
    lines += ["", "## The same goal in an inference layout", "",
              f"Uniform plans with widths in multiples of 8 (`round_to=8`), the dense and the pruned model timed in "
              "the *same* layout: eager NCHW with BatchNorm, or BatchNorm folded and channels_last (the NCHW input "
              f"converted inside the timed call). Goal as above: latency speed-up b{bb} >= 0.8x the MAC speed-up.", "",
              f"| model | plan | layout | params removed | MAC speed-up | latency speed-up b{b1} | b{bb} | "
              f"b{bb} / MAC | >= 0.8? |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    dmet = dtotal = 0
    for r in results:
        for p in r.get("deploy", []):
            ratio = p["speedup"][bb] / p["mac_speedup"]
            dmet, dtotal = dmet + (ratio >= 0.8), dtotal + 1
            lines.append(f"| {r['model']} | {p['label']} | {p['variant']} | {100 * p['params_removed']:.1f}% | "
                         f"{_x(p['mac_speedup'])} | {_x(p['speedup'][b1])} | {_x(p['speedup'][bb])} | {ratio:.2f} | "
                         f"{'yes' if ratio >= 0.8 else 'no'} |")
    lines += ["", f"The goal holds for {dmet} of {dtotal} layout rows."]
    lines += ["", "## Export: ONNX Runtime against PyTorch eager", "",
              f"The file `hap.export(model, x, path, format=\"onnx\")` writes (checked against PyTorch at export), "
              f"run by onnxruntime's CPU provider with {a.threads} intra-op thread(s), sequential execution, default "
              "graph optimisations (which fold BatchNorm themselves); speed-up above 1: ONNX Runtime is faster.", "",
              f"| model | weights | ORT ms b{b1} | eager ms b{b1} | speed-up b{b1} | ORT ms b{bb} | eager ms b{bb} | "
              f"speed-up b{bb} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for p in r["export"]:
            if "error" in p:
                lines.append(f"| {r['model']} | {p['model']} | {p['error']} | | | | | |")
                continue
            lines.append(f"| {r['model']} | {p['model']} | {p['pruned_ms'][b1]:.2f} | {p['dense_ms'][b1]:.2f} | "
                         f"{_x(p['speedup'][b1])} | {p['pruned_ms'][bb]:.1f} | {p['dense_ms'][bb]:.1f} | "
                         f"{_x(p['speedup'][bb])} |")
    shown = rows.relative_to(ROOT.parents[2]) if rows.is_relative_to(ROOT.parents[2]) else rows
    lines += ["", f"Rows are cached under `{shown}/`; delete them to measure again.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "wrn16_4"])
    ap.add_argument("--params", type=float, nargs="+", default=[0.5, 0.7, 0.85], help="fractions of params removed")
    ap.add_argument("--latency", type=float, nargs="+", default=[0.5, 0.33, 0.67],
                    help="latency targets (fraction of dense latency removed)")
    ap.add_argument("--round-to", nargs="+", default=["1", "8", "auto"])
    ap.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 64])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--table-repeats", type=int, default=3)
    ap.add_argument("--latency-tol", type=float, default=0.02, help="planner tol for latency targets")
    ap.add_argument("--latency-iters", type=int, default=PlanConfig().latency_iters,
                    help="closed-loop latency targets: timed plans at most (the open-loop rows use 0)")
    ap.add_argument("--smoke", action="store_true", help="tiny run (ResNet-20, 16x16, batch 8) to check the script")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None,
                    help=f"rows and latency tables go here (default {ROOT}; --smoke: its smoke/ folder)")
    a = ap.parse_args(argv)
    a.shares = None
    work = a.work or ROOT
    rows = work / "rows"
    if a.smoke:
        a.models, a.params, a.latency, a.round_to = ["resnet20"], [0.5], [0.5], ["1", "auto"]
        a.batch_sizes, a.size, a.repeats, a.table_repeats, a.latency_tol = [1, 8], 16, 1, 1, 0.05
        a.shares = (0.5, 1.0)
        work = a.work or ROOT / "smoke"
        rows = work / "rows"
    out = a.out or (work / "speed.md" if a.smoke else DOC)
    os.environ.setdefault("HAP_CACHE", str(work / "cache"))
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    results = []
    for name in a.models:
        print(f"{name}:", flush=True)
        results.append(run_model(name, a, rows))
    command = "python benchmarks/speed.py" + ("" if argv is None and len(sys.argv) == 1 else
                                              " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    layers = layer_sweep(a, rows) if not a.smoke else None
    atomic_write_text(out, render(results, a, time.perf_counter() - t0, command, rows, layers))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
