"""The vision comparison study: every criterion through the same pipeline and the same budget.

One command, resumable: each finished run is one JSON file under ``benchmarks/out/vision_study/``; a
rerun skips what is done, so the study can be stopped at any time and continued in a later session.
Runs go in priority order (the 70% target and seed 0 first), and ``docs/results.md`` is rewritten
from whatever is finished after every run.

Rows:
- methods ``hap``, ``hap+pointwise``, ``hap+lowrank``, ``l1``, ``taylor``, ``obd``, ``random``, each with
  ``global`` and ``uniform`` allocation (the allocation is a factor of its own);
- Torch-Pruning's own ``BasePruner`` with ``MagnitudeImportance`` and ``TaylorImportance`` at the same
  parameter targets (its pruning ratio bisected until the parameter count matches), so our baselines
  are checked against the implementation users know;
- a control: the dense model fine-tuned with the same budget.

Run: ``python benchmarks/vision_study.py`` (``--help`` for the grid and budget options). The dense model
comes from ``benchmarks/_common.py`` (trained and cached on first use).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_pruning as tp  # noqa: E402

import hap  # noqa: E402
import hap.models  # noqa: E402
from _common import OUT, dense_resnet, machine, replace_marked_block  # noqa: E402
from hap.config import PlanConfig, SensitivityConfig  # noqa: E402
from hap.metrics import count_macs, count_params  # noqa: E402
from hap.pipeline import RunConfig, paired_latency, run  # noqa: E402
from hap.train import TrainConfig, VisionTask, recalibrate_bn, train  # noqa: E402

evaluate_model = VisionTask().accuracy

STUDY = OUT / "vision_study"
SENS = OUT / "vision_study" / "sens"  # shared by every budget: a sensitivity does not depend on the fine-tune
DOCS = Path(__file__).resolve().parent.parent / "docs" / "results.md"

# row name -> criterion (and implant); the "hap" rows are the paper's Hutchinson-Hessian HAP (criterion
# "hap-hessian"; "hap" itself now means curvature auto = Fisher), their sensitivities cached as hap_s*.json
OURS = {
    "hap": dict(method="hap-hessian"),
    "hap+pointwise": dict(method="hap-hessian", implant="pointwise"),
    "hap+lowrank": dict(method="hap-hessian", implant="lowrank"),
    "hap-fisher": dict(method="hap-fisher"),
    "l1": dict(method="l1"),
    "taylor": dict(method="taylor"),
    "obd": dict(method="obd"),
    "random": dict(method="random"),
}
TP_ROWS = ("tp-magnitude", "tp-taylor")
DEFAULTS = {"name": "vision_study", "dense_epochs": 15, "ft_epochs": 1, "ft_steps": 200, "ft_lr": 0.01,
            "max_samples": 256}


def run_grid(targets, seeds, methods, allocations):
    """Priority order: the first target with every seed first, so a short session yields a full slice with
    its spread; then the next target."""
    order = []
    for t in targets:
        for seed in seeds:
            order.append(("dense-control", None, None, seed))
            for m in methods:  # Torch-Pruning's rows have one allocation: its own global ranking
                for a in ("global",) if m in TP_ROWS else allocations:
                    order.append((m, t, a, seed))
    seen, out = set(), []
    for r in order:
        key = r if r[0] != "dense-control" else (r[0], None, None, r[3])
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def run_name(method, target, alloc, seed) -> str:
    if method == "dense-control":
        return f"dense-control_s{seed}"
    return f"{method}_{alloc}_p{int(round(target * 100))}_s{seed}"


def _budget(args, seed) -> TrainConfig:
    return TrainConfig(epochs=args.ft_epochs, lr=args.ft_lr, seed=seed, max_steps_per_epoch=args.ft_steps)


SENS_FILE = {"hap-hessian": "hap"}  # criterion -> cache file stem (the committed files' names)


def _sens_config(method, args):
    return SensitivityConfig(method=method, max_samples=args.max_samples, max_batches=8)


def _sens_cache(model, data, method, seed, args):
    """One sensitivity per (criterion, seed), shared by every target and allocation."""
    path = SENS / f"{SENS_FILE.get(method, method)}_s{seed}.json"
    if path.is_file():
        return hap.Sensitivity.load(path)
    loader = VisionTask().sensitivity_batches(data, 128, 8, seed)
    sens = hap.sensitivity(model, F.cross_entropy, loader, config=_sens_config(method, args).replace(seed=seed),
                           progress=not args.quiet)
    sens.save(path)
    return sens


def run_ours(model, data, name, target, alloc, seed, args):
    spec = OURS[name]
    sens = _sens_cache(model, data, spec["method"], seed, args)
    cfg = RunConfig(target={"params": target}, sensitivity=_sens_config(spec["method"], args),
                    plan=PlanConfig(implant=spec.get("implant"), implant_fraction=0.1, allocation=alloc),
                    finetune=_budget(args, seed), seed=seed, repair=None)  # the study predates repair
    _, plan, _, m = run(model, VisionTask(), data, cfg, sens=sens, dense_test_acc=getattr(args, "dense_test_acc", None),
                        progress=not args.quiet)
    m["sens_wall_s"] = sens.wall_time_s
    m["sens_samples"] = sens.samples
    m["sens_split_half"] = sens.split_half
    m["widths"] = {g.name: [len(g.kept), len(g.implanted), len(g.removed)] for g in plan.groups}
    return m


def _tp_prune(model, data, importance, target, seed):
    """Torch-Pruning's BasePruner (global ranking), its channel ratio bisected to the parameter target."""
    example = torch.zeros(1, data.in_channels, *data.image_size)
    base = count_params(model)
    fc = hap.models.get_classifier(model)

    def attempt(ratio):
        m = copy.deepcopy(model)
        imp = importance()
        pruner = tp.pruner.BasePruner(m, example, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                      ignored_layers=[hap.models.get_classifier(m)], max_pruning_ratio=0.95)
        if isinstance(imp, tp.importance.TaylorImportance):
            m.eval()
            gen = torch.Generator().manual_seed(seed)
            for i, (x, y) in enumerate(data.loader("train", 128, shuffle=True, generator=gen)):
                if i >= 8:
                    break
                F.cross_entropy(m(x), y).backward()
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m, 1 - count_params(m) / base

    del fc
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        m, removed = attempt(mid)
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (m, removed, mid)
        if abs(removed - target) <= 0.005:
            break
        lo, hi = (mid, hi) if removed < target else (lo, mid)
    return best


def run_tp(model, data, name, target, seed, args):
    imp = {"tp-magnitude": lambda: tp.importance.MagnitudeImportance(p=1),
           "tp-taylor": lambda: tp.importance.TaylorImportance()}[name]
    t0 = time.perf_counter()
    small, removed, ratio = _tp_prune(model, data, imp, target, seed)
    recalibrate_bn(small, data.loader("train", 128, shuffle=True, generator=torch.Generator().manual_seed(seed)),
                   max_batches=40)
    m = {"config": {"method": name, "target": {"params": target}, "allocation": "global", "tp_ratio": ratio}}
    m["val_acc_oneshot"] = evaluate_model(small, data, "val")
    m["test_acc_oneshot"] = evaluate_model(small, data, "test")
    res = train(small, data, _budget(args, seed), progress=not args.quiet)
    m["finetune_history"] = res.history
    m["val_acc"] = evaluate_model(small, data, "val")
    m["test_acc"] = evaluate_model(small, data, "test")
    _costs(model, small, data, m)
    m["total_s"] = time.perf_counter() - t0
    return m


def _costs(model, small, data, m):
    example = torch.zeros(1, data.in_channels, *data.image_size)
    m["params_base"], m["params"] = count_params(model), count_params(small)
    m["macs_base"], m["macs"] = count_macs(model, example), count_macs(small, example)
    m["params_removed"] = 1 - m["params"] / m["params_base"]
    m["macs_removed"] = 1 - m["macs"] / m["macs_base"]
    m.update(paired_latency(model, small, torch.zeros(64, data.in_channels, *data.image_size)))


def run_control(model, data, seed, args):
    t0 = time.perf_counter()
    dense = copy.deepcopy(model)
    res = train(dense, data, _budget(args, seed), progress=not args.quiet)
    m = {"config": {"method": "dense-control", "target": None, "allocation": None}, "finetune_history": res.history}
    m["val_acc"] = evaluate_model(dense, data, "val")
    m["test_acc"] = evaluate_model(dense, data, "test")
    m["val_acc_oneshot"] = m["test_acc_oneshot"] = None
    _costs(model, dense, data, m)
    m["total_s"] = time.perf_counter() - t0
    return m


def _fmt(xs, scale=100.0):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0] * scale:.2f}"
    return f"{np.mean(xs) * scale:.2f} ± {np.std(xs, ddof=1) * scale:.2f}"


BUDGET_FLAGS = ("name", "dense_epochs", "ft_epochs", "ft_steps", "ft_lr", "max_samples")


def _command(args) -> str:
    """The command that reproduces the numbers: only the options that change them (not which part of the grid
    a process was given, nor --quiet)."""
    parts = ["python benchmarks/vision_study.py"]
    for k in BUDGET_FLAGS:
        v, d = getattr(args, k), DEFAULTS[k]
        if v != d and not (k == "ft_steps" and v is None and d == 0):
            parts.append(f"--{k.replace('_', '-')} {v if v is not None else 0}")
    return " ".join(parts)


def _widths_table(rows: dict) -> list[str]:
    """Where each allocation puts the cuts: channels kept per group at the 70% target (lowest seed)."""
    picks = [r for rs in rows.values() for r in rs if r.get("widths") and r["target"] == 0.7]
    if not picks:
        return []
    first = {}
    for r in sorted(picks, key=lambda r: r["seed"]):
        first.setdefault((r["method"], r["alloc"]), r)
    names = list(next(iter(first.values()))["widths"])
    short = ["stem/L1 stream" if n == "conv1" else
             n.replace("layer", "L").replace(".shortcut.0", " stream").replace(".conv1", "") for n in names]
    out = ["", "Channels kept (of the group's width) per group at the 70% target, lowest seed: a residual "
           "\"stream\" group is one channel index shared by every block of a stage, so removing one of its "
           "channels thins all of them.", "",
           "| method | alloc. | " + " | ".join(short) + " |", "|---|---|" + "---:|" * len(names)]
    for (m, a), r in sorted(first.items()):
        w = r["widths"]
        out.append(f"| {m} | {a} | " + " | ".join(f"{w[n][0]}/{sum(w[n])}" for n in names) + " |")
    return out


def write_results(args, dense_summary, dense_test) -> None:
    rows = {}
    for p in sorted(STUDY.glob("*.json")):
        r = json.loads(p.read_text())
        rows.setdefault(r["key"], []).append(r)
    control = [r["test_acc"] for k, rs in rows.items() if k.startswith("dense-control") for r in rs]
    ctrl = float(np.mean(control)) if control else None
    n_test = len(dense_summary.get("test", [])) if isinstance(dense_summary.get("test"), list) else 10000
    lines = [
        "## Results: vision study (ResNet-20, Fashion-MNIST)" + (
            "" if args.name == DEFAULTS["name"] else f", another fine-tune budget (`{args.name}`)"),
        "",
        f"Produced by `{_command(args)}` on {machine()} (resumable; runs of one study may come from several "
        "sessions and from parallel processes, each given a part of the grid with --seeds/--targets/--methods).",
        f"Dense ResNet-20: {dense_summary['epochs']} epochs (cosine, SGD 0.1), best val top-1 "
        f"{100 * dense_summary['best_val_acc']:.2f}%, test top-1 {100 * dense_test:.2f}%.",
        f"Fine-tune budget for every row (the control included): {args.ft_epochs} epoch(s) × at most "
        f"{args.ft_steps or 'all'} steps of batch 128, SGD lr {args.ft_lr} cosine, BN statistics re-estimated "
        "after surgery. Model selection on the validation split (5,400 images held out of train); test "
        f"(10,000 images, standard error of one accuracy ≈ {100 * np.sqrt(0.93 * 0.07 / n_test):.2f} points) "
        "reported only.",
        f"HAP: Hutchinson Hessian traces (hap-fisher: Monte-Carlo Fisher), up to {args.max_samples} samples over 8 "
        "batches of 128 training images; one sensitivity per (criterion, seed) shared by all targets.",
        "",
        "| method | alloc. | params removed % | MACs removed % | top-1 after pruning % | top-1 after fine-tune % "
        "| Δ vs dense control | CPU speed-up | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(rows, key=lambda k: (rows[k][0]["target"] or 0, rows[k][0]["method"], rows[k][0]["alloc"] or "")):
        rs = rows[key]
        r0 = rs[0]
        acc = [r["test_acc"] for r in rs]
        delta = "-" if ctrl is None else f"{100 * (np.mean(acc) - ctrl):+.2f}"
        lines.append(
            f"| {r0['method']} | {r0['alloc'] or '-'} | {_fmt([r['params_removed'] for r in rs])} | "
            f"{_fmt([r['macs_removed'] for r in rs])} | {_fmt([r['test_acc_oneshot'] for r in rs])} | {_fmt(acc)} | "
            f"{delta} | {np.mean([r['speedup'] for r in rs]):.2f}x | {len(rs)} |")
    lines += _widths_table(rows)
    total = sum(r["total_s"] for rs in rows.values() for r in rs)
    lines += ["", f"Wall time of the finished runs: {total / 60:.0f} min. Runs still missing from the grid are "
              "simply not listed; rerun the command to continue.", ""]
    # several processes (and the heads study) write their own blocks of the same file: a locked read-replace
    replace_marked_block(DOCS, "\n".join(lines), f"<!-- {args.name.replace('_', '-')} -->")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-epochs", type=int, default=DEFAULTS["dense_epochs"])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.85])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(OURS) + list(TP_ROWS))
    ap.add_argument("--allocations", nargs="+", default=["global", "uniform"])
    ap.add_argument("--ft-epochs", type=int, default=DEFAULTS["ft_epochs"])
    ap.add_argument("--ft-steps", type=int, default=DEFAULTS["ft_steps"],
                    help="max fine-tune steps per epoch (0: whole epoch)")
    ap.add_argument("--ft-lr", type=float, default=DEFAULTS["ft_lr"])
    ap.add_argument("--max-samples", type=int, default=DEFAULTS["max_samples"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--name", default=DEFAULTS["name"],
                    help="study directory under benchmarks/out and its block in docs/results.md: give a study "
                         "with another budget its own name (sensitivities are shared)")
    args = ap.parse_args()
    global STUDY
    STUDY = OUT / args.name
    args.ft_steps = args.ft_steps or None
    torch.set_num_threads(args.threads)
    STUDY.mkdir(parents=True, exist_ok=True)
    model, data, summary = dense_resnet("resnet20", epochs=args.dense_epochs, progress=not args.quiet)
    model.eval()
    dense_test = evaluate_model(model, data, "test")
    args.dense_test_acc = dense_test
    ours = [m for m in args.methods if m in OURS]
    theirs = [m for m in args.methods if m in TP_ROWS]
    grid = run_grid(args.targets, args.seeds, ours + theirs, args.allocations)
    done_new = 0
    for method, target, alloc, seed in grid:
        name = run_name(method, target, alloc, seed)
        path = STUDY / f"{name}.json"
        if path.is_file():
            continue
        if args.max_runs is not None and done_new >= args.max_runs:
            break
        print(f"[{time.strftime('%H:%M:%S')}] run {name}", flush=True)
        torch.manual_seed(seed)
        try:
            if method == "dense-control":
                m = run_control(model, data, seed, args)
            elif method in TP_ROWS:
                m = run_tp(model, data, method, target, seed, args)
            else:
                m = run_ours(model, data, method, target, alloc, seed, args)
        except Exception:  # record and go on: one broken row must not stop a study across sessions
            traceback.print_exc()
            continue
        key = name.rsplit("_s", 1)[0]
        m.update(key=key, method=method, target=target, alloc=alloc, seed=seed, dense_test_acc=dense_test)
        hap._utils.atomic_write_text(path, json.dumps(m, indent=1, default=float))
        done_new += 1
        print(f"    params -{100 * m['params_removed']:.1f}%  one-shot {m['test_acc_oneshot']}  "
              f"fine-tuned {100 * m['test_acc']:.2f}%  ({m['total_s']:.0f} s)", flush=True)
        write_results(args, summary, dense_test)
    write_results(args, summary, dense_test)
    print(f"written: {DOCS}")


if __name__ == "__main__":
    main()
