"""``hap`` command line: one subcommand per pipeline stage.

Every error a user can cause (bad name, missing file, wrong checkpoint, NaN loss) ends the program with
one line on stderr and exit code 2, never a traceback; files are written atomically, so an interrupted
run leaves the previous outputs intact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["main"]

EXAMPLES = {
    "sensitivity": """example:
  hap sensitivity --model resnet20 --checkpoint runs/dense/best.safetensors --data fashion-mnist \\
      --out runs/sens/sensitivity.json --max-samples 256
  hap sensitivity --model resnet20 --data fashion-mnist --method l1 --out l1.json""",
    "train": """example:
  hap train --model resnet20 --data fashion-mnist --epochs 15 --out runs/dense
  hap train --model resnet20 --data fashion-mnist --epochs 15 --out runs/dense --resume""",
    "prune": """example:
  hap prune --model resnet20 --checkpoint runs/dense/best.safetensors --data fashion-mnist \
      --method hap --target params=0.5 --implant pointwise --finetune-epochs 2 --out runs/hap-p50
  hap prune ... --method l1 --allocation uniform --target flops=0.5 --out runs/l1-f50""",
    "finetune": """example:
  hap finetune --run runs/hap-p50 --model resnet20 --data fashion-mnist --epochs 3""",
    "eval": """example:
  hap eval --model resnet20 --checkpoint runs/dense/best.safetensors
  hap eval --model resnet20 --run runs/hap-p50""",
    "report": """example:
  hap report runs/hap-p50                                  # report.md + PNGs inside the run
  hap report runs/hap-p50 runs/l1-p50 --out runs/compare   # table + accuracy-vs-params plot""",
    "demo": """example:
  hap demo                 # train briefly on packaged Fashion-MNIST, prune 50% of params with HAP + implant
  hap demo --out runs/demo --epochs 4 --subset 54000""",
}


class UserError(Exception):
    """An error caused by the command's input: printed as one line, exit code 2."""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist (packaged), cifar10 or a folder path")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files, if not the default")
    p.add_argument("--subset", type=int, default=None, help="use only N training images (quick runs)")
    p.add_argument("--seed", type=int, default=0)


def _add_model_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", default="resnet20", help="model zoo name (see `hap models`)")
    if checkpoint:
        p.add_argument("--checkpoint", default=None, help="safetensors weights of --model")


def _add_memory_format(p: argparse.ArgumentParser) -> None:
    from hap.finetune import MEMORY_FORMATS

    p.add_argument("--memory-format", default="auto", choices=list(MEMORY_FORMATS),
                   help="conv tensor layout for training (auto: time both on one batch, keep the faster)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hap", description="Hessian-Aware Pruning with Neural Implant")
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser("sensitivity", help="score every channel; write sensitivity.json and a per-layer table",
                       epilog=EXAMPLES["sensitivity"], formatter_class=fmt)
    _add_model_args(s)
    _add_data_args(s)
    s.add_argument("--method", default="hap", help="hap, l1, l2, taylor, obd or random")
    s.add_argument("--out", default="sensitivity.json", help="output JSON path")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--batches", type=int, default=8, help="distinct training batches to average over")
    s.add_argument("--max-samples", type=int, default=None, help="default 512 probes (hessian), 8192 examples (fisher)")
    s.add_argument("--min-samples", type=int, default=None)
    s.add_argument("--tol", type=float, default=0.05, help="stop at this median relative standard error")
    s.add_argument("--stability", type=float, default=0.95, help="stop at this split-half rank correlation")
    s.add_argument("--probe", default="global", choices=["global", "partitioned"])
    s.add_argument("--curvature", default="auto", choices=["auto", "hessian", "fisher"],
                   help="auto: Monte-Carlo Fisher for channels (most stable per second, docs/engine.md)")
    s.add_argument("--scope", default="all", choices=["all", "producer"])
    s.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a zoo model (resumable checkpoints every epoch)",
                       epilog=EXAMPLES["train"], formatter_class=fmt)
    _add_model_args(t, checkpoint=False)
    _add_data_args(t)
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=128)
    _add_memory_format(t)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="start over in a directory that holds a run")
    t.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("prune", help="sensitivity -> plan (+implant) -> surgery -> fine-tune -> report, one run dir",
                       epilog=EXAMPLES["prune"], formatter_class=fmt)
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--method", default="hap", help="hap, l1, l2, taylor, obd or random")
    p.add_argument("--target", default="params=0.5", help="params=F, flops=F or channels=F (fraction removed)")
    p.add_argument("--allocation", default="uniform", choices=["global", "uniform"],
                   help="uniform: the same ratio in every layer (won after fine-tuning in the vision study)")
    p.add_argument("--implant", default=None, choices=["pointwise", "lowrank"])
    p.add_argument("--implant-fraction", type=float, default=0.1)
    p.add_argument("--max-layer-ratio", type=float, default=0.95)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--sign", default="signed", choices=["signed", "clamp", "abs"])
    from hap.config import RANKINGS

    p.add_argument("--rank-by", default="score", choices=list(RANKINGS),
                   help="global ranking key (see hap.plan)")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--curvature", default="auto", choices=["auto", "hessian", "fisher"])
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    _add_memory_format(p)
    p.add_argument("--kd", type=float, default=0.0, help="distillation weight from the unpruned model (0: off)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    f = sub.add_parser("finetune", help="fine-tune a saved pruned model further", epilog=EXAMPLES["finetune"],
                       formatter_class=fmt)
    f.add_argument("--run", required=True, help="a directory written by 'hap prune'")
    _add_model_args(f, checkpoint=False)
    _add_data_args(f)
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--lr", type=float, default=0.01)
    _add_memory_format(f)
    f.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="accuracy, params, MACs and CPU latency of a model", epilog=EXAMPLES["eval"],
                       formatter_class=fmt)
    _add_model_args(e)
    _add_data_args(e)
    e.add_argument("--run", default=None, help="a pruned run directory instead of --checkpoint")
    e.add_argument("--split", default="test", choices=["val", "test"])

    r = sub.add_parser("report", help="report.md and PNG plots from run directories", epilog=EXAMPLES["report"],
                       formatter_class=fmt)
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", default=None, help="comparison directory (several runs)")

    d = sub.add_parser("demo", help="end-to-end run on the packaged Fashion-MNIST",
                       epilog=EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=3, help="dense training epochs on the subset")
    d.add_argument("--subset", type=int, default=12000, help="training images used (of 54,000)")
    d.add_argument("--no-progress", action="store_true")

    sub.add_parser("models", help="list the model zoo")
    from hap.text.cli_heads import add_parser as add_heads_parser

    add_heads_parser(sub)
    return ap


def _load_data(args: argparse.Namespace):
    import hap.data

    try:
        return hap.data.load(args.data, root=args.data_root, seed=args.seed, subset=args.subset)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e


def _build_model(name: str, data: Any, checkpoint: str | None):
    import hap.models
    from hap.finetune import load_weights

    try:
        model = hap.models.create(name, num_classes=data.num_classes, in_channels=data.in_channels)
    except ValueError as e:
        raise UserError(str(e)) from e
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def _print_table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c == cols[0] else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    # a pipe or CI log has no width: use a wide one rather than truncating the layer names
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    import hap

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"'{out}' exists: pass --overwrite to replace it or choose another --out")
    data = _load_data(args)
    model = _build_model(args.model, data, args.checkpoint)
    if args.checkpoint is None:
        print("note: no --checkpoint given, scoring an untrained model")
    gen = torch.Generator().manual_seed(args.seed)
    loader = data.loader("train", args.batch_size, shuffle=True, generator=gen)
    sens = hap.sensitivity(
        model, F.cross_entropy, loader, method=args.method, max_samples=args.max_samples,
        min_samples=args.min_samples, tol=args.tol, stability=args.stability, max_batches=args.batches,
        probe=args.probe, curvature=args.curvature, scope=args.scope, seed=args.seed,
        progress=not args.no_progress,
    )
    sens.settings.update(model=args.model, checkpoint=args.checkpoint, data=args.data, batch_size=args.batch_size)
    sens.save(out)
    _report_sensitivity(sens)
    print(f"written: {out}")
    return 0


def _report_sensitivity(sens: Any) -> None:
    rows = sens.layer_summary()
    cols = ["group", "units", "weights_per_unit", "score_mean", "score_min", "score_max"]
    if sens.method == "hap":
        cols += ["trace_mean", "negative", "rel_se_median"]
    _print_table(f"sensitivity ({sens.method}) per channel group", rows, cols)
    line = f"{len(sens.units)} units, {sens.wall_time_s:.1f} s"
    if sens.method == "hap":
        line += (f", {sens.samples} samples over {sens.batches} batches, split-half rank stability "
                 f"{sens.split_half:.3f}, median relative SE {sens.median_rel_se:.3f}; "
                 f"{'converged' if sens.converged else 'NOT converged'}: {sens.stop_reason}")
    print(line)


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise UserError(f"'{out}' already holds a run: pass --resume to continue it or --overwrite to start over")
    if resume and not (out / "last.json").is_file():
        raise UserError(f"nothing to resume in '{out}' (no last.json): drop --resume")
    if overwrite and out.exists():
        for name in ("last.json", "last.safetensors", "best.safetensors", "last_momentum.safetensors"):
            (out / name).unlink(missing_ok=True)


def cmd_train(args: argparse.Namespace) -> int:
    from hap.finetune import TrainConfig, evaluate, train
    from hap.metrics import count_params

    out = Path(args.out)
    _check_run_dir(out, args.resume, args.overwrite)
    data = _load_data(args)
    torch.manual_seed(args.seed)
    model = _build_model(args.model, data, None)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      memory_format=args.memory_format)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"command": "train", **vars(args)}, indent=1))
    res = train(model, data, cfg, out_dir=out, resume=args.resume, progress=not args.no_progress)
    test = evaluate(model, data.loader("test", 512))
    metrics = {"best_val_acc": res.best_val_acc, "best_epoch": res.best_epoch, "test_acc": test["acc"],
               "params": count_params(model), "seconds": res.seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on packaged data: train briefly, then the whole HAP pipeline with an implant."""
    # Both steps go through the real parser, so the demo always runs with every option's current default.
    quiet = ["--no-progress"] if args.no_progress else []
    a = _parser().parse_args(["train", "--model", "resnet20", "--data", "fashion-mnist", "--subset", str(args.subset),
                              "--epochs", str(args.epochs), "--out", str(Path(args.out) / "dense"), *quiet])
    t0 = time.perf_counter()
    dense = Path(a.out)
    if (dense / "metrics.json").is_file():
        print(f"using the dense model already trained in {dense}")
    else:
        a.resume = (dense / "last.json").is_file()
        a.overwrite = not a.resume
        cmd_train(a)
    p = _parser().parse_args([
        "prune", "--model", "resnet20", "--data", "fashion-mnist", "--subset", str(args.subset),
        "--checkpoint", str(dense / "best.safetensors"), "--method", "hap", "--target", "params=0.5",
        "--implant", "pointwise", "--finetune-epochs", "1", "--out", str(Path(args.out) / "hap-params50-pointwise"),
        "--overwrite", *quiet])
    cmd_prune(p)
    print(f"demo done in {time.perf_counter() - t0:.0f} s; report: {p.out}/report.md")
    return 0


def _parse_target(text: str) -> dict[str, float]:
    kind, _, value = text.partition("=")
    if kind not in ("params", "flops", "channels") or not value:
        raise UserError(f"--target {text!r} must look like params=0.5, flops=0.5 or channels=0.5")
    try:
        v = float(value)
    except ValueError as e:
        raise UserError(f"--target {text!r}: {value!r} is not a number") from e
    if not 0.0 < v < 1.0:
        raise UserError(f"--target {text!r}: the fraction removed must be strictly between 0 and 1")
    return {kind: v}


def cmd_prune(args: argparse.Namespace) -> int:
    import hap
    from hap.finetune import TrainConfig
    from hap.pipeline import PruneConfig, evaluate_model, prune_and_finetune
    from hap.report import write_run_report

    out = Path(args.out)
    target = _parse_target(args.target)
    if args.method not in hap.criteria.names(with_aliases=True):
        raise UserError(f"unknown method {args.method!r}; choose one of {', '.join(hap.criteria.names())}")
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise UserError(f"'{out}' already holds a run: pass --resume to continue it or --overwrite to start over")
    data = _load_data(args)
    model = _build_model(args.model, data, args.checkpoint)
    if args.checkpoint is None:
        print("note: no --checkpoint given, pruning an untrained model")
    cfg = PruneConfig(method=args.method, target=target, allocation=args.allocation, implant=args.implant,
                      implant_fraction=args.implant_fraction, max_layer_ratio=args.max_layer_ratio,
                      round_to=args.round_to, sign=args.sign, rank_by=args.rank_by, max_samples=args.max_samples,
                      seed=args.seed, curvature=args.curvature,
                      finetune=TrainConfig(epochs=args.finetune_epochs, lr=args.lr, kd_alpha=args.kd, seed=args.seed,
                                           memory_format=args.memory_format))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", {"command": "prune", **vars(args)})
    sens = None
    if args.resume and (out / "sensitivity.json").is_file():
        sens = hap.Sensitivity.load(out / "sensitivity.json")
    dense_acc = evaluate_model(model, data, "test")
    small, plan, sens, metrics = prune_and_finetune(model, data, cfg, sens=sens, out_dir=out / "finetune",
                                                    resume=args.resume, progress=not args.no_progress)
    metrics["dense_test_acc"] = dense_acc
    sens.save(out / "sensitivity.json")
    hap.save(small, plan, out)
    _write_json(out / "metrics.json", metrics)
    write_run_report(out)
    _print_table("before / after", [
        {"": "params", "dense": f"{metrics['params_base']:,}", "pruned": f"{metrics['params']:,}"},
        {"": "MACs/image", "dense": f"{metrics['macs_base']:,}", "pruned": f"{metrics['macs']:,}"},
        {"": "top-1 test", "dense": f"{dense_acc:.4f}", "pruned": f"{metrics['test_acc']:.4f}"},
        {"": "top-1 after surgery (BN re-est.)", "dense": "", "pruned": f"{metrics['test_acc_oneshot']:.4f}"},
        {"": "CPU latency b64 (ms)", "dense": f"{metrics['latency_ms_base']:.1f}",
         "pruned": f"{metrics['latency_ms']:.1f} ({metrics['speedup']:.2f}x)"},
    ], ["", "dense", "pruned"])
    print(f"written: {out}/{{plan.json,model.safetensors,sensitivity.json,metrics.json,report.md}}")
    return 0


def _write_json(path: Path, obj: Any) -> None:
    from hap._utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _load_run(run: str, base: Any):
    import hap

    d = Path(run)
    if not (d / "plan.json").is_file():
        raise UserError(f"'{d}' holds no plan.json: give a directory written by 'hap prune'")
    return hap.load(d, base)


def cmd_finetune(args: argparse.Namespace) -> int:
    import hap
    from hap.finetune import TrainConfig, train
    from hap.pipeline import evaluate_model

    data = _load_data(args)
    model = _load_run(args.run, _build_model(args.model, data, None))
    plan = hap.PruningPlan.load(Path(args.run) / "plan.json")
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, memory_format=args.memory_format)
    res = train(model, data, cfg, progress=not args.no_progress)
    hap.save(model, plan, args.run)
    acc = evaluate_model(model, data, "test")
    metrics_path = Path(args.run) / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        m.setdefault("extra_finetune", []).append({"epochs": args.epochs, "lr": args.lr, "test_acc": acc,
                                                    "best_val_acc": res.best_val_acc})
        m["test_acc"], m["val_acc"] = acc, res.best_val_acc
        _write_json(metrics_path, m)
    print(json.dumps({"best_val_acc": res.best_val_acc, "test_acc": acc}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hap.metrics import count_macs, count_params, latency
    from hap.pipeline import evaluate_model

    data = _load_data(args)
    if args.run:
        model = _load_run(args.run, _build_model(args.model, data, None))
    else:
        model = _build_model(args.model, data, args.checkpoint)
    x = torch.zeros(1, data.in_channels, *data.image_size)
    res = {"acc": evaluate_model(model, data, args.split), "split": args.split, "params": count_params(model),
           "macs": count_macs(model, x),
           "latency_ms_b64": latency(model, torch.zeros(64, *x.shape[1:]), repeats=15, threads=1).median_ms}
    print(json.dumps(res))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hap.report import write_comparison, write_run_report

    for r in args.runs:
        if not (Path(r) / "metrics.json").is_file():
            raise UserError(f"no metrics.json in '{r}': is it a 'hap prune' run directory?")
    if len(args.runs) == 1 and args.out is None:
        print(f"written: {write_run_report(args.runs[0])}")
    else:
        print(f"written: {write_comparison(args.runs, args.out or 'comparison')}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import hap.models

    print("\n".join(hap.models.list_models()))
    return 0


COMMANDS = {
    "sensitivity": cmd_sensitivity,
    "train": cmd_train,
    "prune": cmd_prune,
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "report": cmd_report,
    "demo": cmd_demo,
    "models": cmd_models,
}


def cmd_heads(args: argparse.Namespace) -> int:
    from hap.text.cli_heads import run

    return run(args)


COMMANDS["heads"] = cmd_heads


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hap {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hap {args.command}: interrupted; completed epochs are checkpointed (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
