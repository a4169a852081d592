"""``hap eval --run`` and ``hap finetune`` on a text run: a run directory of ``hap prune --units heads[,neurons]``
(a Hugging Face sequence classifier or causal LM), measured by its task's metric (accuracy; a causal LM's:
perplexity).

The stage commands (:mod:`hap.cli.vision`) hand such a run here (:func:`is_text_run`); their flags stay theirs.
Unlike a zoo CNN's run, a text run rebuilds itself from its own files (``base/``: the unpruned architecture's
config and tokenizer, :func:`hap.text.run.load_run`) and reads the data it was measured on again from its
``config.json`` (:func:`hap.text.run.load_run_data`), so the zoo model and image-data options are refused
rather than silently ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    ZOO_OPTIONS,
    UserError,
    commit_run,
    committed_files,
    device_option,
    nonfinite_tensor,
    verify_run,
    write_json,
)

__all__ = ["is_text_run", "eval_text_run", "finetune_text_run"]


def is_text_run(run: Path) -> bool:
    """A run of ``hap prune --units heads[,neurons]`` (a Hugging Face encoder or causal LM): it holds ``base/``,
    the unpruned architecture's config and tokenizer, from which :func:`hap.text.load_run` rebuilds it."""
    return (run / "plan.json").is_file() and (run / "base" / "config.json").is_file()


def _load_text_run(run: Path, args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """``(model, tokenizer, task, data)`` of a text run: its saved model and the data it was measured on.

    The zoo model and image-data options name what a CNN run is rebuilt from; a text run rebuilds itself
    from its own files, so such an option given with it is refused rather than silently ignored.
    """
    from ..text.run import load_run, load_run_data

    ignored = [f"--{k.replace('_', '-')}" for k, default in ZOO_OPTIONS.items()
               if getattr(args, k, default) != default]
    if ignored:
        raise UserError(f"'{run}' is a text run, which reads its own model and data: drop {', '.join(ignored)}")
    verify_run(run, ["plan.json", "model.safetensors", "config.json"])
    try:
        model, tokenizer, names = load_run(run)
        task, data = load_run_data(run, tokenizer, names)
    except FileNotFoundError as e:
        raise UserError(f"{e} (the run reads its data from where 'hap prune' read it)") from e
    return model, tokenizer, task, data


def eval_text_run(args: argparse.Namespace) -> int:
    """``hap eval --run`` of a text run: the task's metric (a causal LM: perplexity) on ``--split``, and size."""
    from hap.metrics import count_params

    model, _, task, data = _load_text_run(Path(args.run), args)
    bad = nonfinite_tensor(model)
    if bad is not None:
        print(f"warning: the model's '{bad}' holds NaN/inf values: its outputs, and the {task.metric} below, mean "
              "nothing (was the training diverging?)", file=sys.stderr)
    if not task.has_split(data, args.split) or not data.sizes().get(args.split):
        raise UserError(f"the run's {args.split} split is empty: evaluate another --split")
    res = {task.metric: task.metric_value(model, data, args.split), "split": args.split,
           "n": int(data.sizes()[args.split]), "params": count_params(model)}
    if task.metric == "ppl":  # what the perplexity averages over: predicted tokens, not rows
        res["tokens"] = int(task.split_labels(data, args.split).numel())
    print(json.dumps(res))
    return 0


def finetune_text_run(args: argparse.Namespace, run: Path) -> int:
    """``hap finetune`` of a text run (a classifier or a causal LM): its model on its own data, trained by
    :func:`hap.train.train` with its task (:class:`hap.train.CausalLMTask`: the next-token loss), from the
    run's fine-tune settings (``--epochs`` / ``--lr`` override them); its model, ``hf/`` (when it has one),
    metrics, report and manifest are replaced together."""
    from ..distributed import on_main
    from ..io import save
    from ..pipeline import RunConfig, on_device
    from ..planning import PruningPlan
    from ..report import write_heads_report, write_lm_report
    from ..train import TextTask, train
    from .checks import validate_train_config
    from .prune import RECORD_KEYS, _write_hf

    files = committed_files(run)
    record = json.loads((run / "config.json").read_text())
    base = RunConfig.from_dict({k: v for k, v in record.items() if k not in RECORD_KEYS}).finetune
    given = {k: getattr(args, k) for k in ("epochs", "lr") if getattr(args, k) is not None}
    if "epochs" in given:
        given["steps"] = None  # --epochs is the budget, not the run's step count
    cfg = base.replace(seed=args.seed, **given)
    dev = device_option(args)
    if cfg.steps == 0 or (cfg.steps is None and not cfg.epochs):
        raise UserError("this fine-tune has no step to take (--epochs 0, or the run's own budget of 0 steps): give "
                        "--epochs 1 or more")
    validate_train_config(cfg, TextTask(tokenizer=None))  # a causal LM's rules are the text task's: before the load
    model, tokenizer, task, data = _load_text_run(run, args)
    cfg = task.resolve(cfg)
    plan = PruningPlan.load(run / "plan.json")
    on = on_device(task, dev)
    model.to(dev)
    res = train(model, data, cfg, task=on, progress=not args.no_progress)
    key = task.metric
    value = on.metric_value(model, data, "test")
    val = on.metric_value(model, data, "val") if data.sizes().get("val") else None
    model.cpu()  # saved from the CPU
    m = json.loads((run / "metrics.json").read_text())
    m.setdefault("extra_finetune", []).append({"steps": res.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                               f"test_{key}": value, f"val_{key}": val})
    m[f"test_{key}"] = value
    if val is not None:
        m[f"val_{key}"] = val
    m["finetune_steps"] = int(m.get("finetune_steps", 0)) + res.steps  # what the report's row counts
    m.update(task.split_record(data))
    files = sorted(set(files) | {"metrics.json", "model.safetensors", "plan.json", "report.md"})
    def write() -> None:
        with commit_run(run, files):
            save(model, plan, run)
            if m.get("hf_dir"):  # the plain transformers copy must hold these weights too, never the old ones
                m.update(_write_hf(run, model, plan, tokenizer, files))
            write_json(run / "metrics.json", m)
            (write_lm_report if key == "ppl" else write_heads_report)(run)

    on_main(write)  # under torchrun every rank holds the same model: rank 0 alone replaces the run's files
    print(json.dumps({"steps": res.steps, f"test_{key}": value, f"val_{key}": val}))
    return 0
