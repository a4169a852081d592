"""``hap heads``: prune attention heads of a local Hugging Face encoder on labelled text, into a run directory.

One command does what the vision ``hap prune`` does, for heads: load the model offline (``minilm`` or a
directory) and the data (``tweets`` or a CSV), train the classification head first if it is new, score
the heads on the ``score`` split, plan ``--target heads=F``, remove the heads physically, fine-tune
briefly, and write::

    OUT/config.json        resolved arguments, data splits and label names (rerun = same command)
    OUT/sensitivity.json   per-head scores
    OUT/plan.json          heads kept/removed per layer, params and MACs before/after
    OUT/model.safetensors  the pruned (and fine-tuned) weights; hap.text.load_run(OUT) rebuilds the model
    OUT/base/              the unpruned architecture's Hugging Face config and the tokenizer
    OUT/metrics.json       accuracies, heads/params/MACs, CPU latency
    OUT/report.md          the same as a table, with a heads-per-layer plot

Errors a user can cause (a model id that is not a local directory, a CSV without the needed columns,
labels that do not match a trained classifier) are one-line ``ValueError``/``FileNotFoundError``
messages; ``hap.cli.main`` turns them into exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_parser", "run", "load_run", "parse_target"]

EXAMPLE = """example:
  hap heads --model minilm --data tweets --target heads=0.6 --out runs/heads-hap-60
  hap heads --model minilm --data tweets --method michel --target heads=0.4 --out runs/heads-michel-40
  hap heads --model path/to/hf_model_dir --data reviews.csv --text-column body --label-column stars \\
      --target heads=0.5 --finetune-steps 200 --out runs/reviews-h50
  hap heads --model runs/dense-classifier --data tweets --classes negative,neutral,positive --new-head ..."""

METHODS = ("hap", "hap-fisher", "michel", "l1", "magnitude", "l2", "taylor", "random")  # obd: vmap fails in HF masking


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``hap heads`` and its options."""
    from hap.config import RANKINGS

    p = sub.add_parser(
        "heads",
        help="prune attention heads of a local Hugging Face encoder (tweets or a CSV); one run directory",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="'minilm' (packaged all-MiniLM-L6-v2) or a local model directory")
    p.add_argument("--data", default="tweets", help="'tweets' (packaged) or a CSV file with text and label columns")
    p.add_argument("--text-column", default=None, help="CSV header of the texts (default: text, sentence, ...)")
    p.add_argument("--label-column", default=None, help="CSV header of the labels (default: label, sentiment, ...)")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels to keep, in id order (tweets default: negative,positive)")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="down-sample classes to the smallest (default: on for tweets, off for a CSV)")
    p.add_argument("--train-size", type=int, default=4000, help="at most this many training texts")
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--score-size", type=int, default=512, help="at most this many texts to score heads on")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--target", default="heads=0.5", help="heads=F: fraction of attention heads removed")
    p.add_argument("--method", default="hap-fisher", choices=METHODS,
                   help="hap-fisher (default): HAP score, Fisher traces; hap: Hutchinson Hessian traces (the paper's)")
    p.add_argument("--allocation", default="global", choices=["global", "uniform"])
    p.add_argument("--sign", default="signed", choices=["signed", "clamp", "abs"])
    p.add_argument("--rank-by", default="layer_normalized", choices=list(RANKINGS),
                   help="layer_normalized: L2-normalise each layer's head scores before ranking (Michel et al.)")
    p.add_argument("--max-samples", type=int, default=128, help="Hutchinson vectors (method hap)")
    p.add_argument("--max-length", type=int, default=64, help="longest token sequence")
    p.add_argument("--new-head", action="store_true",
                   help="replace a trained classification head by a new one for these labels")
    p.add_argument("--train-epochs", type=float, default=None,
                   help="dense fine-tune before pruning (default: 1 if the classification head is new, else 0)")
    p.add_argument("--train-lr", type=float, default=1e-4)
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tune steps after pruning (0: none)")
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32, help="training batch (the post-pruning one is half)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="run directory (default runs/heads-METHOD-TARGET)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true")


def parse_target(text: str) -> float:
    """The fraction of ``heads=F``.

    Raises:
        ValueError: Another kind of target or a fraction outside (0, 1).
    """
    kind, _, value = text.partition("=")
    if kind.strip() != "heads" or not value:
        raise ValueError(f"--target {text!r} must look like heads=0.5 (the fraction of attention heads removed)")
    try:
        v = float(value)
    except ValueError as e:
        raise ValueError(f"--target {text!r}: {value!r} is not a number") from e
    if not 0.0 < v < 1.0:
        raise ValueError(f"--target {text!r}: the fraction removed must be strictly between 0 and 1")
    return v


def _write_json(path: Path, obj: Any) -> None:
    from .._utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def rerun_command(args: argparse.Namespace, out: Path, classes: list[str], balance: bool, train_epochs: float) -> str:
    """The full ``hap heads`` command line that repeats this run (every option spelled out)."""
    import shlex

    parts = ["hap", "heads", "--model", str(args.model), "--data", str(args.data), "--classes", ",".join(classes)]
    for flag, value in (("--text-column", args.text_column), ("--label-column", args.label_column)):
        if value:
            parts += [flag, value]
    parts += ["--balance" if balance else "--no-balance"]
    for flag in ("train_size", "val_size", "score_size", "test_size", "target", "method", "allocation", "sign",
                 "rank_by", "max_samples", "max_length"):
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.new_head:
        parts.append("--new-head")
    parts += ["--train-epochs", f"{train_epochs:g}", "--train-lr", f"{args.train_lr:g}",
              "--finetune-steps", str(args.finetune_steps), "--finetune-lr", f"{args.finetune_lr:g}",
              "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--out", str(out)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Execute ``hap heads`` (see the module docstring); returns the exit code."""
    import hap

    from .data import TWEETS, load_text_data
    from .finetune import TextTrainConfig, evaluate_text, train_text
    from .models import load_text_model
    from .pipeline import HeadsConfig, prune_heads_and_finetune

    heads = parse_target(args.target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process never downloads
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/heads-{args.method}-{args.target.replace('=', '')}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out '{out}' is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"'{out}' already holds a run: pass --overwrite to replace it or choose another --out")
    progress = not args.no_progress
    t0 = time.perf_counter()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    balance = (args.data == TWEETS) if args.balance is None else args.balance
    sizes = {"train": args.train_size, "val": args.val_size, "score": args.score_size, "test": args.test_size}
    data = load_text_data(args.data, classes=classes, sizes=sizes, balance=balance, seed=args.seed,
                          text_column=args.text_column, label_column=args.label_column)
    torch.manual_seed(args.seed)  # a new classification head is initialised from torch's global generator
    tm = load_text_model(args.model, data.label_names, new_head=args.new_head)
    if tm.label_names != data.label_names:
        data = data.with_label_order(tm.label_names)
    max_length = min(args.max_length, tm.max_length)
    model, tok = tm.model, tm.tokenizer
    if progress:
        print(f"model {tm.path} ({hap.count_params(model):,} params, "
              f"{'new' if tm.new_head else 'trained'} {data.num_labels}-label head); data {args.data}: "
              + ", ".join(f"{k} {v}" for k, v in data.sizes().items()), flush=True)
    train_epochs = args.train_epochs if args.train_epochs is not None else (1.0 if tm.new_head else 0.0)
    if tm.new_head and train_epochs == 0:
        print("note: the classification head is new and --train-epochs 0: pruning an untrained classifier",
              file=sys.stderr)
    config = {"command": "heads", **{k: v for k, v in vars(args).items() if k != "func"},
              "out": str(out), "model_dir": str(tm.path), "label_names": data.label_names, "new_head": tm.new_head,
              "train_epochs_used": train_epochs, "max_length_used": max_length, "data_info": data.describe(),
              "rerun": rerun_command(args, out, data.label_names, balance, train_epochs)}
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "report.md"):  # never leave a previous run's results beside new files
        (out / stale).unlink(missing_ok=True)
    _write_json(out / "config.json", config)
    dense: dict[str, Any] = {}
    if train_epochs > 0:
        if progress:
            print(f"training the dense classifier: {train_epochs:g} epoch(s) on {data.sizes()['train']} texts",
                  flush=True)
        res = train_text(model, tok, data, TextTrainConfig(epochs=train_epochs, lr=args.train_lr,
                                                           batch_size=args.batch_size, max_length=max_length,
                                                           seed=args.seed), progress=progress)
        dense.update(dense_train_steps=res.steps, dense_train_s=res.seconds)
    if data.sizes().get("val"):
        dense["dense_val_acc"] = evaluate_text(model, tok, data, "val", max_length=max_length)
    dense_test = evaluate_text(model, tok, data, "test", max_length=max_length)
    if progress:
        print(f"dense test accuracy {dense_test:.4f}", flush=True)
    cfg = HeadsConfig(
        method=args.method, heads=heads, allocation=args.allocation, sign=args.sign, rank_by=args.rank_by,
        max_samples=args.max_samples,
        max_length=max_length, seed=args.seed,
        finetune=TextTrainConfig(steps=args.finetune_steps, lr=args.finetune_lr,
                                 batch_size=max(1, args.batch_size // 2), warmup=0.0),
    )
    small, plan, sens, metrics = prune_heads_and_finetune(model, tok, data, cfg, dense_test_acc=dense_test,
                                                          progress=progress)
    metrics.update(dense)
    metrics["total_s"] = time.perf_counter() - t0
    sens.settings.update(model=args.model, data=args.data)
    sens.save(out / "sensitivity.json")
    hap.save(small, plan, out)
    base = out / "base"
    model.config.save_pretrained(base)
    tok.save_pretrained(base)
    _write_json(out / "metrics.json", metrics)
    write_heads_report(out)
    print(f"heads {metrics['heads_base']} -> {metrics['heads']} ({100 * metrics['heads_removed']:.1f}% removed), "
          f"params -{100 * metrics['params_removed']:.1f}%; test accuracy dense {dense_test:.4f}, after pruning "
          f"{metrics['test_acc_oneshot']:.4f}, after {metrics['finetune_steps']} fine-tune steps "
          f"{metrics['test_acc']:.4f}; CPU speed-up {metrics['speedup']:.2f}x")
    print(f"written: {out}/{{config.json,sensitivity.json,plan.json,model.safetensors,metrics.json,report.md}}")
    return 0


def load_run(directory: str | os.PathLike[str]) -> tuple[torch.nn.Module, Any, list[str]]:
    """Rebuild the pruned classifier of a ``hap heads`` run directory, offline.

    The unpruned architecture comes from ``DIR/base`` (its Hugging Face config: no weights needed, the
    saved ones replace them all), the plan is replayed on it and the saved weights loaded.

    Returns:
        ``(model in eval mode, tokenizer, label names)``.

    Raises:
        FileNotFoundError: Not a run directory.
        ValueError: Corrupted files (see :func:`hap.load`).
    """
    import hap

    from .models import _quiet_transformers, load_tokenizer

    d = Path(directory)
    base = d / "base"
    if not (base / "config.json").is_file() or not (d / "plan.json").is_file():
        raise FileNotFoundError(f"'{d}' is not a 'hap heads' run directory (no plan.json and base/config.json)")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(str(base), local_files_only=True)
    with _quiet_transformers():
        skeleton = AutoModelForSequenceClassification.from_config(cfg)
    model = hap.load(d, skeleton.eval()).eval()
    names = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
    return model, load_tokenizer(base), names


def write_heads_report(directory: str | os.PathLike[str]) -> Path:
    """``report.md`` of a ``hap heads`` run from its saved files (and ``heads.png``)."""
    from .._utils import atomic_write_text
    from ..report import plot_widths

    d = Path(directory)
    m = json.loads((d / "metrics.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    plan = json.loads((d / "plan.json").read_text())
    sens = json.loads((d / "sensitivity.json").read_text())
    c = m["config"]
    lines = [
        f"# Head pruning: {cfg['model']} on {cfg['data']}",
        "",
        f"Method **{c['method']}**, target heads={c['heads']:g}, {c['allocation']} allocation; "
        f"labels {', '.join(cfg['label_names'])}; splits " + ", ".join(
            f"{k} {v}" for k, v in cfg["data_info"]["sizes"].items()) + ".",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        f"| attention heads | {m['heads_base']} | {m['heads']} ({100 * m['heads_removed']:.1f}% removed) |",
        f"| parameters | {m['params_base']:,} | {m['params']:,} ({100 * m['params_removed']:.1f}% removed) |",
        f"| MACs per example ({m.get('macs_seq_len')} tokens) | {m['macs_base']:,} | {m['macs']:,} "
        f"({100 * m['macs_removed']:.1f}% removed) |",
        f"| test accuracy, after pruning | {100 * m['dense_test_acc']:.2f}% | {100 * m['test_acc_oneshot']:.2f}% |",
        f"| test accuracy, after {m['finetune_steps']} fine-tune steps | | {100 * m['test_acc']:.2f}% |",
        f"| CPU latency, 1 thread, batch {m['latency_batch'][0]}x{m['latency_batch'][1]} tokens | "
        f"{m['latency_ms_base']:.1f} ms | {m['latency_ms']:.1f} ms ({m['speedup']:.2f}x) |",
        "",
        "Heads kept per layer: " + ", ".join(
            f"{g['name'].split('.layer.')[-1].split('.')[0] if '.layer.' in g['name'] else g['name']}: "
            f"{len(g['kept'])}/{g['size']}" for g in plan["groups"]) + ".",
        "",
        f"Sensitivity: {sens['method']}, {sens.get('samples', 0)} samples over {sens.get('batches', 0)} batch(es) "
        f"of the score split, {sens['wall_time_s']:.1f} s"
        + (f", split-half rank stability {sens['split_half']:.3f}" if sens.get("split_half") is not None else "")
        + ".",
        "",
        "![heads per layer](heads.png)",
        "",
        f"Rerun: `{cfg['rerun']}`",
        "",
    ]
    plot_widths(plan, d / "heads.png")
    return atomic_write_text(d / "report.md", "\n".join(lines))
