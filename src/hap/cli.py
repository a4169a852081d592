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
    "demo": """example:
  hap demo                 # train briefly on packaged Fashion-MNIST, then the sensitivity report
  hap demo --out runs/demo --epochs 2""",
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
    s.add_argument("--max-samples", type=int, default=256)
    s.add_argument("--min-samples", type=int, default=32)
    s.add_argument("--tol", type=float, default=0.05, help="stop at this median relative standard error")
    s.add_argument("--stability", type=float, default=0.95, help="stop at this split-half rank correlation")
    s.add_argument("--probe", default="global", choices=["global", "partitioned"])
    s.add_argument("--curvature", default="hessian", choices=["hessian", "fisher"])
    s.add_argument("--scope", default="all", choices=["all", "producer"])
    s.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a zoo model (resumable checkpoints every epoch)",
                       epilog=EXAMPLES["train"], formatter_class=fmt)
    _add_model_args(t, checkpoint=False)
    _add_data_args(t)
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="start over in a directory that holds a run")
    t.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="end-to-end run on the packaged Fashion-MNIST",
                       epilog=EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=1)
    d.add_argument("--subset", type=int, default=12000)
    d.add_argument("--no-progress", action="store_true")

    sub.add_parser("models", help="list the model zoo")
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

    out = Path(args.out)
    _check_run_dir(out, args.resume, args.overwrite)
    data = _load_data(args)
    torch.manual_seed(args.seed)
    model = _build_model(args.model, data, None)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"command": "train", **vars(args)}, indent=1))
    res = train(model, data, cfg, out_dir=out, resume=args.resume, progress=not args.no_progress)
    test = evaluate(model, data.loader("test", 512))
    metrics = {"best_val_acc": res.best_val_acc, "best_epoch": res.best_epoch, "test_acc": test["acc"],
               "params": sum(p.numel() for p in model.parameters()), "seconds": res.seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a ResNet-20 briefly on packaged Fashion-MNIST and score its channels with HAP."""
    import hap
    import hap.data
    from hap.finetune import TrainConfig, evaluate, train

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = hap.data.load("fashion-mnist", subset=args.subset, seed=0)
    torch.manual_seed(0)
    model = _build_model("resnet20", data, None)
    train(model, data, TrainConfig(epochs=args.epochs, lr=0.1), out_dir=out / "dense", resume=True,
          progress=not args.no_progress)
    acc = evaluate(model, data.loader("test", 512))["acc"]
    print(f"dense resnet20: test top-1 {acc:.4f} after {args.epochs} epoch(s) on {len(data.train)} images")
    loader = data.loader("train", 128, shuffle=True, generator=torch.Generator().manual_seed(0))
    sens = hap.sensitivity(model, F.cross_entropy, loader, max_samples=128, max_batches=4,
                           progress=not args.no_progress)
    sens.save(out / "sensitivity.json")
    _report_sensitivity(sens)
    print(f"written: {out / 'sensitivity.json'} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import hap.models

    print("\n".join(hap.models.list_models()))
    return 0


COMMANDS = {"sensitivity": cmd_sensitivity, "train": cmd_train, "demo": cmd_demo, "models": cmd_models}


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
