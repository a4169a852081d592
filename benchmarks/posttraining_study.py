"""Post-training pruning study: does layer-wise least-squares repair make pruning work without retraining?

ResNet-20 on Fashion-MNIST (the cached 15-epoch dense model of the vision study), targets of 50/70/85% of
parameters removed, criteria {hap-hessian, hap-fisher, obs, obs-greedy, l1, taylor, random} x {uniform,
global}, 2 seeds, plus a hybrid row (per-group budgets of HAP's global plan, the channels inside each group
chosen by greedy OBS) and pointwise implants. Every row is measured right after pruning in three ways:

* ``bn``: BatchNorm statistics re-estimated (40 training batches), no weight changed;
* ``repair``: :func:`hap.repair` on 1,024 training images (the seed's first 8 batches of 128), BatchNorm
  statistics kept as they were (targets are taken before BN);
* ``repair+bn``: the same, then BatchNorm re-estimated.

Then the ``finetune`` stage (at 70% by default, ``--ft-targets``): the best repaired row and the best BN-only
row, chosen on the *validation* split (mean over seeds, uniform allocation: the default), get the vision
study's 200-step fine-tune, and the repaired one also its 3-epoch fine-tune (the BN-only 3-epoch rows are the
vision study's own, ``benchmarks/out/vision_study_ft3``); the dense control of those budgets is the vision
study's own (same dense model, same budgets). Test top-1 is reported, never used to choose. Every row is one
JSON file under ``benchmarks/out/posttraining_study/``: rerunning skips what is done (resumable), and
``--report`` rewrites ``docs/posttraining.md``.

    python benchmarks/posttraining_study.py                 # everything (about 1.5 h on 2 CPU cores)
    python benchmarks/posttraining_study.py --stage oneshot --allocations uniform --seeds 0
    python benchmarks/posttraining_study.py --report        # tables from whatever is finished
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
from _common import OUT, dense_resnet, machine, replace_marked_block  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402
from hap.config import SensitivityConfig  # noqa: E402
from hap.planning import GroupPlan, PruningPlan  # noqa: E402
from hap.train import TrainConfig, VisionTask, recalibrate_bn, train  # noqa: E402

STUDY = OUT / "posttraining_study"
VISION_SENS = OUT / "vision_study" / "sens"  # the vision study's cached sensitivities (same model, same batches)
SENS_FILE = {"hap-hessian": "hap"}  # criterion -> cache file stem of the vision study's committed files
CRITERIA = ["hap-hessian", "hap-fisher", "obs", "obs-greedy", "l1", "taylor", "random"]
HYBRID = "hap-fisher>obs-greedy"  # global HAP budgets per group, greedy OBS choice inside each group
IMPLANT = "obs-greedy+pointwise"
DOC = Path(__file__).resolve().parents[1] / "docs" / "posttraining.md"
CONTROLS = {"200 steps": OUT / "vision_study", "3 epochs": OUT / "vision_study_ft3"}
MARKER = "<!-- posttraining-vision -->"  # benchmarks/posttraining_heads.py writes its own block of the same file
GOALS = {0.5: 0.5, 0.7: 1.5, 0.85: 4.0}  # one-shot: within this many points of dense (test top-1)


def sens_for(model, data, method: str, seed: int, quiet: bool) -> hap.Sensitivity:
    own = STUDY / "sens" / f"{method}_s{seed}.json"
    for path in (VISION_SENS / f"{SENS_FILE.get(method, method)}_s{seed}.json", own):
        if path.is_file():
            return hap.Sensitivity.load(path)
    cfg = SensitivityConfig(method=method, max_samples=256, max_batches=8, seed=seed)
    sens = hap.sensitivity(model, F.cross_entropy, batches(data, 8, seed), config=cfg, progress=not quiet)
    sens.save(STUDY / "sens" / f"{method}_s{seed}.json")
    return sens


def batches(data, n: int, seed: int) -> list:
    """The first ``n`` batches of 128 of the seed's shuffled training order (what ``hap.sensitivity`` saw)."""
    return list(islice(VisionTask().sensitivity_batches(data, 128, n, seed), n))


def acc(model, data, split: str) -> float:
    return float(hap.metrics.accuracy(model, data.loader(split, 512)))


def make_plan(model, data, row: str, alloc: str, target: float, seed: int, quiet: bool) -> PruningPlan:
    t = hap.Target(params=target)
    if row == HYBRID:
        base = hap.plan(model, sens_for(model, data, "hap-fisher", seed, quiet), t, implant=None, allocation="global")
        choice = sens_for(model, data, "obs-greedy", seed, quiet).by_group()
        groups = []
        for g in base.groups:  # same per-group counts (so the same architecture), other channels
            order = sorted(range(g.size), key=lambda i: (choice[g.name][i].score, i))
            n = len(g.removed)
            groups.append(GroupPlan(g.name, g.size, sorted(order[n:]), [], sorted(order[:n]), None, None,
                                    "OBS choice inside HAP's budget", g.kind))
        base.groups, base.method = groups, HYBRID
        return base
    if row == IMPLANT:
        return hap.plan(model, sens_for(model, data, "obs-greedy", seed, quiet), t, implant="pointwise",
                        implant_fraction=0.1, allocation=alloc)
    return hap.plan(model, sens_for(model, data, row, seed, quiet), t, implant=None, allocation=alloc)


def oneshot(model, data, dense_acc, row: str, alloc: str, target: float, seed: int, quiet: bool) -> dict:
    t0 = time.perf_counter()
    plan = make_plan(model, data, row, alloc, target, seed, quiet)
    small = hap.prune(model, plan)
    m = {"row": row, "alloc": alloc, "target": target, "seed": seed, "params_removed": plan.params_removed,
         "macs_removed": plan.macs_removed, "dense_val": dense_acc["val"], "dense_test": dense_acc["test"]}
    bn_batches = batches(data, 40, 1000 + seed)
    calib = batches(data, 8, seed)
    bn = recalibrate_bn(copy.deepcopy(small), bn_batches, max_batches=40)
    m["bn_val"], m["bn_test"] = acc(bn, data, "val"), acc(bn, data, "test")
    rep = copy.deepcopy(small)
    report = hap.repair(rep, model, calib, plan=plan, progress=False)
    m["repair_s"], m["repair_peak_mb"] = report.seconds, report.peak_memory_mb
    m["repair_examples"] = report.examples
    m["repair_val"], m["repair_test"] = acc(rep, data, "val"), acc(rep, data, "test")
    rep_bn = recalibrate_bn(copy.deepcopy(rep), bn_batches, max_batches=40)
    m["repair_bn_val"], m["repair_bn_test"] = acc(rep_bn, data, "val"), acc(rep_bn, data, "test")
    m["seconds"] = time.perf_counter() - t0
    return m


def finetuned(model, data, row: str, alloc: str, target: float, seed: int, mode: str, budget: str, quiet: bool):
    t0 = time.perf_counter()
    plan = make_plan(model, data, row, alloc, target, seed, quiet)
    small = hap.prune(model, plan)
    if mode == "repair":
        hap.repair(small, model, batches(data, 8, seed), plan=plan, progress=False)
    else:
        recalibrate_bn(small, batches(data, 40, 1000 + seed), max_batches=40)
    cfg = (TrainConfig(epochs=1, lr=0.01, seed=seed, max_steps_per_epoch=200) if budget == "200 steps"
           else TrainConfig(epochs=3, lr=0.01, seed=seed))
    res = train(small, data, cfg, progress=not quiet)
    return {"row": row, "alloc": alloc, "target": target, "seed": seed, "mode": mode, "budget": budget,
            "val": acc(small, data, "val"), "test": acc(small, data, "test"), "best_val": res.best_val_acc,
            "params_removed": plan.params_removed, "seconds": time.perf_counter() - t0}


def _save(path: Path, m: dict) -> None:
    atomic_write_text(path, json.dumps(m, indent=1, default=float))


def _load(pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(STUDY.glob(pattern))]


def oneshot_rows(args) -> list[tuple[str, str, float, int]]:
    rows = [(c, a, t, s) for s in args.seeds for t in args.targets for a in args.allocations for c in args.criteria]
    if "global" in args.allocations:
        rows += [(HYBRID, "global", t, s) for s in args.seeds for t in args.targets]
    rows += [(IMPLANT, "uniform", 0.7, s) for s in args.seeds]
    return rows


def best_rows(target: float, key: str, alloc: str | None = None) -> tuple[str, str] | None:
    """The (row, allocation) with the best mean validation top-1 under ``key`` at ``target``."""
    by: dict[tuple[str, str], list[float]] = {}
    for m in _load("oneshot/*.json"):
        if abs(m["target"] - target) < 1e-9 and m["row"] != IMPLANT and alloc in (None, m["alloc"]):
            by.setdefault((m["row"], m["alloc"]), []).append(m[key])
    return max(by, key=lambda k: np.mean(by[k])) if by else None


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * np.mean(xs):.2f} ± {100 * np.std(xs, ddof=1) / np.sqrt(len(xs)):.2f}"


def report(args) -> str:
    rows = _load("oneshot/*.json")
    if not rows:
        return "no results yet"
    dense_test = rows[0]["dense_test"]
    lines = [
        "## ResNet-20 / Fashion-MNIST",
        "",
        f"Produced by `python benchmarks/posttraining_study.py` on {machine()} (one thread per process). "
        "ResNet-20 on Fashion-MNIST, the vision study's 15-epoch dense model "
        f"(test top-1 {100 * dense_test:.2f}%, validation {100 * rows[0]['dense_val']:.2f}%). Mean ± standard "
        "error over seeds (seeds change the sensitivity/calibration batches and the fine-tune order). "
        "*bn*: BatchNorm statistics re-estimated only; *repair*: `hap.repair` on 1,024 training images, "
        "BN statistics kept; *repair+bn*: then BN re-estimated. Choices are made on validation; test is "
        "reported.",
        "",
    ]
    targets = sorted({m["target"] for m in rows})
    for alloc in ("uniform", "global"):
        sub = [m for m in rows if m["alloc"] == alloc]
        if not sub:
            continue
        lines += [f"### One-shot test top-1 (%), {alloc} allocation", "",
                  "| criterion | " + " | ".join(f"{int(100 * t)}% bn | {int(100 * t)}% repair | "
                                               f"{int(100 * t)}% repair+bn" for t in targets) + " |",
                  "|---|" + "---:|" * (3 * len(targets))]
        for row in dict.fromkeys(m["row"] for m in sub):
            cells = []
            for t in targets:
                ms = [m for m in sub if m["row"] == row and abs(m["target"] - t) < 1e-9]
                cells += [_ms([m["bn_test"] for m in ms]), _ms([m["repair_test"] for m in ms]),
                          _ms([m["repair_bn_test"] for m in ms])]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    for alloc in ("uniform", "global"):
        sub = [m for m in rows if m["alloc"] == alloc]
        if not sub:
            continue
        secs = [m["repair_s"] for m in sub]
        mbs = [m["repair_peak_mb"] for m in sub if m["repair_peak_mb"] > 0]
        mem = (f"; resident memory added median {np.median(mbs):.0f} MB (max {max(mbs):.0f} MB)" if mbs else "")
        lines.append(f"Repair time, {alloc} rows: median {np.median(secs):.1f} s (max {max(secs):.1f} s) per "
                     f"model{mem}.")
    lines += ["(Rows were run with 2-4 CPU-bound jobs sharing the 2 cores, so times vary with the load; the first "
              "rows measured memory as growth of the process's lifetime peak, which reads 0 after the first call "
              "and is left out; later rows sample resident memory during the call.)", ""]
    lines += ["### Goals (one-shot, the row chosen on validation, test top-1 vs dense)", ""]
    for t in targets:
        best = best_rows(t, "repair_val")
        if best is None:
            continue
        ms = [m for m in rows if (m["row"], m["alloc"]) == best and abs(m["target"] - t) < 1e-9]
        gap = 100 * (dense_test - np.mean([m["repair_test"] for m in ms]))
        goal = GOALS.get(round(t, 2))
        verdict = "" if goal is None else (" — **met**" if gap <= goal else " — **not met**") + f" (goal {goal})"
        lines.append(f"- {int(100 * t)}%: best by validation {best[0]} ({best[1]}), test "
                     f"{_ms([m['repair_test'] for m in ms])}, {gap:.2f} points under dense{verdict}.")
    for t in (0.7, 0.85):
        cells = {}
        for m in rows:
            if abs(m["target"] - t) < 1e-9 and m["alloc"] == "uniform" and m["row"] in CRITERIA:
                cells.setdefault(m["row"], []).append(m["repair_val"])
        if cells:
            top = max(cells, key=lambda k: np.mean(cells[k]))
            comp = max(np.mean(cells.get("obs", [0])), np.mean(cells.get("obs-greedy", [0])))
            verdict = "met" if comp >= max(np.mean(v) for v in cells.values()) - 1e-12 else "not met"
            lines.append(f"- compensation-aware criterion ≥ every other after repair at {int(100 * t)}% (uniform, "
                         f"validation): **{verdict}** (best: {top}, {_ms(cells[top])}).")
    lines.append("")
    ft = _load("finetune/*.json")
    if ft:
        lines += ["### After fine-tuning (test top-1 %)", "",
                  "| target | budget | row | start | test | dense control (same budget) |",
                  "|---:|---|---|---|---:|---:|"]
        for m_key in sorted({(m["target"], m["budget"], m["row"], m["alloc"], m["mode"]) for m in ft}):
            t, budget, row, alloc, mode = m_key
            ms = [m for m in ft if (m["target"], m["budget"], m["row"], m["alloc"], m["mode"]) == m_key]
            ctrl = [json.loads(p.read_text())["test_acc"]
                    for p in sorted(CONTROLS[budget].glob("dense-control_s*.json"))]
            lines.append(f"| {int(100 * t)}% | {budget} | {row} ({alloc}) | {mode} | {_ms([m['test'] for m in ms])} | "
                         f"{_ms(ctrl)} |")
        ref = {}
        for q in sorted(CONTROLS["3 epochs"].glob("*_p70_s*.json")):
            if not q.name.startswith("dense-control"):
                ref.setdefault(q.name.rsplit("_s", 1)[0], []).append(json.loads(q.read_text())["test_acc"])
        if ref:
            lines += ["", "BN-only rows with the same 3-epoch fine-tune at 70%, from the vision study "
                      "(`benchmarks/out/vision_study_ft3`, same dense model): " + "; ".join(
                          f"{k.replace('_p70', '')} {_ms(v)}" for k, v in ref.items()) + "."]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["oneshot", "finetune", "all"], default="all")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    ap.add_argument("--budgets", nargs="+", default=["200 steps", "3 epochs"])
    ap.add_argument("--ft-targets", type=float, nargs="+", default=[0.7], help="targets of the fine-tune stage")
    ap.add_argument("--ft-allocations", nargs="+", default=["uniform"],
                    help="allocations whose best rows the fine-tune stage trains (uniform: the default)")
    ap.add_argument("--rows", nargs="+", default=None, help="one-shot stage: only these row names (e.g. the hybrid)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only rewrite docs/posttraining.md")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        model, data, _ = dense_resnet("resnet20", epochs=15, seed=0, progress=not args.quiet)
        model.eval()
        dense_acc = {"val": acc(model, data, "val"), "test": acc(model, data, "test")}
        if args.stage in ("oneshot", "all"):
            for row, alloc, t, s in oneshot_rows(args):
                if args.rows and row not in args.rows:
                    continue
                path = STUDY / "oneshot" / f"{row}_{alloc}_p{int(round(100 * t))}_s{s}.json"
                if path.is_file():
                    continue
                m = oneshot(model, data, dense_acc, row, alloc, t, s, args.quiet)
                _save(path, m)
                print(f"{path.stem}: bn {m['bn_val']:.4f} repair {m['repair_val']:.4f} repair+bn "
                      f"{m['repair_bn_val']:.4f} (val) in {m['seconds']:.0f} s", flush=True)
        if args.stage in ("finetune", "all"):
            for t, ft_alloc in [(t, a) for t in args.ft_targets for a in args.ft_allocations]:
                for budget in args.budgets:
                    for mode, key in (("repair", "repair_val"), ("bn", "bn_val")):
                        if budget == "3 epochs" and mode == "bn":
                            continue  # the BN-only 3-epoch rows are the vision study's (docs/results.md)
                        best = best_rows(t, key, alloc=ft_alloc)
                        if best is None:
                            continue
                        for s in args.seeds:
                            tag = budget.replace(" ", "")
                            stem = f"{best[0]}_{best[1]}_p{int(round(100 * t))}_{mode}_{tag}_s{s}"
                            path = STUDY / "finetune" / f"{stem}.json"
                            if path.is_file():
                                continue
                            m = finetuned(model, data, best[0], best[1], t, s, mode, budget, args.quiet)
                            _save(path, m)
                            print(f"{path.stem}: test {m['test']:.4f} in {m['seconds']:.0f} s", flush=True)
    replace_marked_block(DOC, report(args), MARKER)
    print(f"written: {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
