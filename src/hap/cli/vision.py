"""The stage-by-stage commands: sensitivity, train, finetune, eval, report, demo, models.

They build and read a zoo CNN's runs; ``finetune`` and ``eval --run`` given a text run (``hap prune --units
heads[,neurons]``: a classifier or a causal LM) hand it to :mod:`hap.cli.text_runs`, which rebuilds it from
its own files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import criteria
from ..config import FISHER_BACKENDS, SensitivityConfig
from ..train import MEMORY_FORMATS, TrainConfig, VisionTask
from .common import (
    ZOO_OPTIONS,
    UserError,
    check_run_dir,
    commit_run,
    committed_files,
    config_option,
    device_option,
    nonfinite_tensor,
    print_table,
    run_state,
    verify_run,
    write_json,
)
from .text_runs import eval_text_run, finetune_text_run, is_text_run

__all__ = ["add_parsers", "COMMANDS"]

EXAMPLES = {
    "sensitivity": """example:
  hap sensitivity --model resnet20 --checkpoint runs/dense/best.safetensors --data fashion-mnist \\
      --out runs/sens/sensitivity.json --max-samples 256
  hap sensitivity --model resnet20 --data fashion-mnist --method l1 --out l1.json""",
    "train": """example:
  hap train --model resnet20 --data fashion-mnist --epochs 15 --out runs/dense
  hap train --model resnet20 --data fashion-mnist --epochs 15 --out runs/dense --resume""",
    "finetune": """example:
  hap finetune --run runs/hap-p50 --model resnet20 --data fashion-mnist --epochs 3
  hap finetune --run runs/llm-20 --epochs 1 --lr 2e-5     # a causal-LM run: its own model, data and task""",
    "eval": """example:
  hap eval --model resnet20 --checkpoint runs/dense/best.safetensors
  hap eval --model resnet20 --run runs/hap-p50
  hap eval --run runs/llm-20                             # a causal-LM run: its test perplexity""",
    "report": """example:
  hap report runs/hap-p50                                  # report.md + PNGs inside the run
  hap report runs/hap-p50 runs/l1-p50 --out runs/compare   # table + accuracy-vs-params plot""",
    "demo": """example:
  hap demo                 # train briefly on packaged Fashion-MNIST, prune 70% of params, repair, fine-tune
  hap demo --out runs/demo --epochs 4 --subset 54000""",
}
_SENS = [SensitivityConfig(max_batches=8)]
_TRAIN = [TrainConfig(epochs=15, lr=0.1, batch_size=128)]
_FT = [TrainConfig(epochs=1, lr=0.01)]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=ZOO_OPTIONS["data"], help="fashion-mnist (packaged), cifar10 or a folder path")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files, if not the default")
    p.add_argument("--subset", type=int, default=None, help="use only N training images (quick runs)")
    p.add_argument("--seed", type=int, default=0)


def _add_model_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", default=ZOO_OPTIONS["model"], help="model zoo name (see `hap models`)")
    if checkpoint:
        p.add_argument("--checkpoint", default=None, help="safetensors weights of --model")


def _train_options(p: argparse.ArgumentParser, defaults: list[TrainConfig], epochs_flag: str = "--epochs") -> None:
    from ..pipeline import RunConfig

    config_option(p, [epochs_flag], "epochs", defaults, "training epochs")
    # the one notion of a device: hap prune's (RunConfig.device), its default and its rules
    config_option(p, ["--device"], "device", [RunConfig()], "where training and evaluation run: auto (CUDA when "
                  "available), cpu, cuda or cuda:N; weights are saved from the CPU")
    config_option(p, ["--lr"], "lr", defaults, "peak learning rate (SGD)")
    config_option(p, ["--memory-format"], "memory_format", defaults,
                  "conv tensor layout for training (auto: time both on one batch, keep the faster)",
                  choices=list(MEMORY_FORMATS))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("sensitivity", help="score every channel; write sensitivity.json and a per-layer table",
                       epilog=EXAMPLES["sensitivity"], formatter_class=fmt)
    _add_model_args(s)
    _add_data_args(s)
    help_m = "; ".join(f"{n}: {criteria.get(n).description}" for n in criteria.names("channel"))
    config_option(s, ["--method"], "method", _SENS, f"criterion ({help_m})")
    s.add_argument("--out", default="sensitivity.json", help="output JSON path")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.add_argument("--batch-size", type=int, default=128)
    config_option(s, ["--batches"], "max_batches", _SENS, "distinct training batches to average over")
    config_option(s, ["--max-samples"], "max_samples", _SENS, "None: 512 probes (hessian), 8192 examples (fisher)")
    config_option(s, ["--min-samples"], "min_samples", _SENS, "")
    config_option(s, ["--tol"], "tol", _SENS, "stop at this median relative standard error")
    config_option(s, ["--stability"], "stability", _SENS, "stop at this split-half rank correlation")
    config_option(s, ["--probe"], "probe", _SENS, "", choices=["global", "partitioned"])
    config_option(s, ["--curvature"], "curvature", _SENS, "auto: Monte-Carlo Fisher (most stable per second)",
                  choices=["auto", "hessian", "fisher"])
    config_option(s, ["--scope"], "scope", _SENS, "", choices=["all", "producer"])
    config_option(s, ["--fisher-backend"], "fisher_backend", _SENS, "per-example squared gradients of the Fisher: "
                  "vmap (exact reference), hooks (memory-lean), auto (hooks where they serve every unit)",
                  choices=list(FISHER_BACKENDS))
    s.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a zoo model (resumable checkpoints every epoch)",
                       epilog=EXAMPLES["train"], formatter_class=fmt)
    _add_model_args(t, checkpoint=False)
    _add_data_args(t)
    _train_options(t, _TRAIN)
    config_option(t, ["--batch-size"], "batch_size", _TRAIN, "")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="start over in a directory that holds a run")
    t.add_argument("--no-progress", action="store_true")

    f = sub.add_parser("finetune", help="fine-tune a saved pruned model further", epilog=EXAMPLES["finetune"],
                       formatter_class=fmt)
    f.add_argument("--run", required=True, help="a directory written by 'hap prune' (a text run, causal LMs "
                   "included: its own model and data, and its fine-tune settings unless --epochs / --lr are given)")
    _add_model_args(f, checkpoint=False)
    _add_data_args(f)
    _train_options(f, _FT)
    f.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="accuracy, params, MACs and CPU latency of a model", epilog=EXAMPLES["eval"],
                       formatter_class=fmt)
    _add_model_args(e)
    _add_data_args(e)
    e.add_argument("--run", default=None, help="a pruned run directory instead of --checkpoint (a text run of 'hap "
                   "prune --units heads[,neurons]': its own model and data; a causal LM's metric is the perplexity)")
    e.add_argument("--split", default="test", choices=["val", "test"])

    r = sub.add_parser("report", help="report.md and PNG plots from run directories", epilog=EXAMPLES["report"],
                       formatter_class=fmt)
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", default=None, help="comparison directory (several runs)")

    d = sub.add_parser("demo", help="end-to-end run on the packaged Fashion-MNIST", epilog=EXAMPLES["demo"],
                       formatter_class=fmt)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=3, help="dense training epochs on the subset")
    d.add_argument("--subset", type=int, default=12000, help="training images used (of 54,000)")
    d.add_argument("--no-progress", action="store_true")

    sub.add_parser("models", help="list the model zoo")


def _check_writable(path: Path) -> None:
    """Create ``path``'s folder and a temp file in it now: an OS error before the compute costs nothing."""
    import os
    import tempfile

    if path.is_dir():
        raise UserError(f"--out '{path}' is a directory: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path.parent)
    os.close(fd)
    os.unlink(probe)


def _given(args: argparse.Namespace, base: Any, names: dict[str, str]) -> Any:
    """``base`` with the options actually given (``names``: config field -> args attribute)."""
    return base.replace(**{k: getattr(args, a) for k, a in names.items() if getattr(args, a, None) is not None})


def _train_config(args: argparse.Namespace, base: TrainConfig, task: Any, fields: tuple[str, ...]) -> TrainConfig:
    """``base`` with the training options given (and ``--seed``), checked by ``task``'s rules with each
    problem named by its flag (:func:`hap.cli.checks.validate_train_config`), then the task's defaults filled in.

    Raises:
        UserError: An option is out of range (``--lr -1.0: must be > 0``).
    """
    from .checks import validate_train_config

    cfg = _given(args, base, {f: f for f in fields}).replace(seed=args.seed)
    validate_train_config(cfg, task)
    return task.resolve(cfg)


def _load_data(args: argparse.Namespace):
    import hap.data

    try:
        return hap.data.load(args.data, root=args.data_root, seed=args.seed, subset=args.subset)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e


def _build_model(name: str, data: Any, checkpoint: str | None):
    import hap.models
    from hap.train import load_weights

    try:
        model = hap.models.create(name, num_classes=data.num_classes, in_channels=data.in_channels)
    except ValueError as e:
        raise UserError(str(e)) from e
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from ..distributed import is_distributed, shard_batches
    from ..metrics import classification_loss
    from ..sensitivity import sensitivity

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"'{out}' exists: pass --overwrite to replace it or choose another --out")
    cfg = _given(args, _SENS[0], {f: f for f in ("method", "max_samples", "min_samples", "tol", "stability", "probe",
                                                 "curvature", "scope", "fisher_backend")}
                 | {"max_batches": "max_batches"})
    cfg = cfg.replace(seed=args.seed)
    if cfg.method not in criteria.names(with_aliases=True):
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(criteria.names())}")
    from .checks import validate_config

    validate_config(cfg, {"max_batches": "--batches"} | {f: "--" + f.replace("_", "-") for f in  # the library's rules
                                                          ("max_samples", "min_samples", "tol", "scope",
                                                           "fisher_backend")})
    _check_writable(out)
    data = _load_data(args)
    model = _build_model(args.model, data, args.checkpoint)
    if args.checkpoint is None:
        print("note: no --checkpoint given, scoring an untrained model")
    loader = VisionTask().sensitivity_batches(data, args.batch_size, cfg.max_batches, args.seed)
    if is_distributed():  # under torchrun: each rank scores its share of the batches one process would
        loader = shard_batches(loader, cfg.max_batches)
    sens = sensitivity(model, classification_loss, loader, config=cfg, progress=not args.no_progress)
    sens.settings.update(model=args.model, checkpoint=args.checkpoint, data=args.data, batch_size=args.batch_size)
    sens.save(out)
    rows = sens.layer_summary()
    cols = ["group", "units", "weights_per_unit", "score_mean", "score_min", "score_max"]
    estimated = sens.method.startswith("hap")
    if estimated:
        cols += ["trace_mean", "negative", "rel_se_median"]
    print_table(f"sensitivity ({sens.method}) per channel group", rows, cols)
    line = f"{len(sens.units)} units, {sens.wall_time_s:.1f} s"
    if estimated:
        line += (f", {sens.samples} samples over {sens.batches} batches, split-half rank stability "
                 f"{sens.split_half:.3f}, median relative SE {sens.median_rel_se:.3f}; "
                 f"{'converged' if sens.converged else 'NOT converged'}: {sens.stop_reason}")
    print(line)
    print(f"written: {out}")
    return 0


TRAIN_OUTPUTS = ("config.json", "best.safetensors", "metrics.json")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a zoo model; the run directory is committed (manifest.json) only when everything is written."""
    from hap.metrics import count_params
    from hap.pipeline import on_device
    from hap.train import train
    from hap.train.checkpoint import read_checkpoint, resume_differences

    out = Path(args.out)
    task = VisionTask()
    # every option is validated, by its flag, before the data is read or the directory touched
    cfg = _train_config(args, _TRAIN[0], task, ("epochs", "lr", "batch_size", "memory_format"))
    if cfg.epochs == 0:
        raise UserError("--epochs 0 trains nothing, so there is no run to write: give --epochs 1 or more "
                        "(an untrained model needs no run: omit --checkpoint in the other commands)")
    if args.subset is not None and args.subset < 1:
        raise UserError(f"--subset {args.subset}: give a positive number of training images")
    tag = {"model": args.model, "data": args.data, "data_root": args.data_root, "subset": args.subset}
    dev = device_option(args)  # a resumed run may continue on another device: not part of the tag
    state = check_run_dir(out, args.resume, args.overwrite)
    resume = args.resume and state in ("unfinished", "committed")
    if resume:
        ck = read_checkpoint(out)
        changed = resume_differences(ck.meta, cfg.to_dict(), tag) if ck is not None else []
        if changed:
            raise UserError(f"cannot resume '{out}' with other options ({'; '.join(changed)}): give the options "
                            "it was started with, or --overwrite to start over")
    data = _load_data(args)
    torch.manual_seed(args.seed)
    model = _build_model(args.model, data, None).to(dev)
    on = on_device(task, dev)  # batches follow the model (train() writes its weights from the CPU)
    res = train(model, data, cfg, task=on, out_dir=out, resume=resume, progress=not args.no_progress, tag=tag,
                threads=args.threads)  # given: it wins over the count a resumed run started with
    metrics = {"best_val_acc": res.best_val_acc, "best_epoch": res.best_epoch,
               "test_acc": on.accuracy(model, data, "test"), "params": count_params(model), "seconds": res.seconds,
               "train_size": len(data.train), "device": str(dev), **task.split_record(data)}
    with commit_run(out, TRAIN_OUTPUTS):
        write_json(out / "config.json", {"command": "train", **tag, "train": cfg.to_dict()})
        write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on packaged data: train briefly, then prune 70% of the parameters with the defaults of
    ``hap prune`` (chosen by the post-training study, docs/posttraining.md: greedy structured-OBS choice of
    channels, least-squares repair), widths in multiples of 8, fine-tune one epoch.

    Target and widths were chosen by measurement (the demo run both ways on an idle machine, and
    ``benchmarks/demo_choice.py``, docs/demo_choice.md): at 50% of params (odd widths) the pruned model ran
    1.27x faster at batch 64, at 70% in multiples of 8 1.60x, for 0.8 point more accuracy lost: a speed-up
    a person notices, with its cost beside it in the table.
    """
    from .prune import add_prune_parser, cmd_prune

    def build_parser() -> argparse.ArgumentParser:  # the real parsers of both steps
        ap = argparse.ArgumentParser(prog="hap")
        sub = ap.add_subparsers(dest="command", required=True)
        add_parsers(sub)
        add_prune_parser(sub)
        return ap

    # Both steps go through the real parsers, so the demo always runs with every option's current default.
    quiet = ["--no-progress"] if args.no_progress else []
    a = build_parser().parse_args(["train", "--model", "resnet20", "--data", "fashion-mnist", "--subset",
                                   str(args.subset), "--epochs", str(args.epochs), "--out",
                                   str(Path(args.out) / "dense"), *quiet])
    a.threads = args.threads  # the demo's own --threads (the top-level parser adds it) governs both steps
    t0 = time.perf_counter()
    dense = Path(a.out)
    if run_state(dense) == "committed":
        print(f"using the dense model already trained in {dense}")
    else:
        a.resume = run_state(dense) == "unfinished"
        a.overwrite = not a.resume
        cmd_train(a)
    p = build_parser().parse_args([
        "prune", "--model", "resnet20", "--data", "fashion-mnist", "--subset", str(args.subset),
        "--checkpoint", str(dense / "best.safetensors"), "--target", "params=0.7", "--round-to", "8",
        "--tol", "0.02", "--finetune-epochs", "1", "--out", str(Path(args.out) / "params70"), "--overwrite", *quiet])
    p.threads = args.threads
    cmd_prune(p)
    print(f"demo done in {time.perf_counter() - t0:.0f} s; report: {p.out}/report.md")
    return 0


def _load_run(run: str, base: Any):
    from ..io import load

    d = Path(run)
    if not (d / "plan.json").is_file():
        raise UserError(f"'{d}' holds no plan.json: give a directory written by 'hap prune'")
    verify_run(d, ["plan.json", "model.safetensors", "config.json"])
    return load(d, base)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pruned run further; its model, metrics, report and manifest are replaced together."""
    from ..distributed import on_main
    from ..io import save
    from ..pipeline import on_device
    from ..planning import PruningPlan
    from ..report import write_run_report
    from ..train import train

    run = Path(args.run)
    if is_text_run(run):
        return finetune_text_run(args, run)
    task = VisionTask()
    cfg = _train_config(args, _FT[0], task, ("epochs", "lr", "memory_format"))
    if cfg.epochs == 0:
        raise UserError("--epochs 0 fine-tunes nothing: give --epochs 1 or more")
    dev = device_option(args)
    files = committed_files(run)
    data = _load_data(args)
    model = _load_run(args.run, _build_model(args.model, data, None))
    plan = PruningPlan.load(run / "plan.json")
    model.to(dev)
    on = on_device(task, dev)  # the model and its batches on --device
    res = train(model, data, cfg, task=on, progress=not args.no_progress)
    acc = on.accuracy(model, data, "test")
    model.cpu()  # saved from the CPU
    metrics_path = run / "metrics.json"
    m = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    m.setdefault("extra_finetune", []).append({"epochs": cfg.epochs, "lr": cfg.lr, "test_acc": acc,
                                                "best_val_acc": res.best_val_acc})
    m["test_acc"], m["val_acc"] = acc, res.best_val_acc
    m.update(task.split_record(data))
    files = sorted(set(files) | {"metrics.json", "model.safetensors", "plan.json", "report.md", "sensitivity.png",
                                 "widths.png"})
    def write() -> None:
        with commit_run(run, files):
            save(model, plan, run)
            write_json(metrics_path, m)
            if "params_base" in m:
                write_run_report(run)  # the report shows the new accuracy, never the one before

    on_main(write)  # under torchrun every rank holds the same model: rank 0 alone replaces the run's files
    print(json.dumps({"best_val_acc": res.best_val_acc, "test_acc": acc}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import sys

    from hap.metrics import count_macs, count_params, latency

    if args.run and is_text_run(Path(args.run)):
        return eval_text_run(args)
    data = _load_data(args)
    if args.run:
        model = _load_run(args.run, _build_model(args.model, data, None))
    else:
        model = _build_model(args.model, data, args.checkpoint)
    bad = nonfinite_tensor(model)
    if bad is not None:
        print(f"warning: the model's '{bad}' holds NaN/inf values: its outputs, and the accuracy below, mean "
              "nothing (was the training diverging?)", file=sys.stderr)
    task = VisionTask()
    x = task.example_inputs(data)
    res = {"acc": task.accuracy(model, data, args.split), "split": args.split, "n": len(data.split(args.split)),
           "params": count_params(model), "macs": count_macs(model, x),
           "latency_ms_b64": latency(model, task.latency_inputs(data, 64), repeats=15, threads=1).median_ms}
    print(json.dumps(res))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hap.report import write_comparison, write_run_report

    for r in args.runs:
        d = Path(r)
        if not (d / "metrics.json").is_file():
            raise UserError(f"no metrics.json in '{r}': is it a 'hap prune' run directory?")
        m = json.loads((d / "metrics.json").read_text())
        if "params_base" not in m:
            kind = "a training run ('hap train')" if "best_epoch" in m else "not a pruning run"
            raise UserError(f"'{r}' is {kind}: hap report reads the run directories 'hap prune' writes")
    if len(args.runs) == 1 and args.out is None:
        print(f"written: {write_run_report(args.runs[0])}")
    else:
        print(f"written: {write_comparison(args.runs, args.out or 'comparison')}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import hap.models

    print("\n".join(hap.models.list_models()))
    return 0


COMMANDS = {"sensitivity": cmd_sensitivity, "train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval,
            "report": cmd_report, "demo": cmd_demo, "models": cmd_models}
