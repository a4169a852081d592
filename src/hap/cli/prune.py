"""``hap prune`` (``--units channels|heads|heads,neurons|query_slots|query_slots,neurons``) and its alias
``hap heads``: one run directory per run.

    OUT/config.json        the resolved RunConfig (``hap prune --config OUT/config.json --out NEW`` reruns
                           it), plus what was found while loading (label names, data splits, ...)
    OUT/sensitivity.json   per-unit scores
    OUT/plan.json          units kept/implanted/removed per group, params and MACs before/after
    OUT/model.safetensors  the pruned (and fine-tuned) weights (``hap.load``; heads: ``hap.text.load_run``)
    OUT/base/              heads: the unpruned architecture's Hugging Face config and the tokenizer
    OUT/hf/                a causal LM whose plan left the same widths in every layer (--allocation even): the
                           pruned model as a plain transformers directory (AutoModelForCausalLM.from_pretrained)
    OUT/metrics.json       accuracies (a causal LM: perplexities, lower is better), params/MACs (heads), CPU latency
    OUT/report.md          the same as a table, with plots
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .. import criteria
from ..config import ALLOCATIONS, FISHER_BACKENDS, IMPLANT_KINDS, RANKINGS, SIGNS
from ..pipeline import RunConfig
from ..train import MEMORY_FORMATS, TrainConfig
from .common import THREADS_HELP, UserError, check_run_dir, commit_run, config_option, print_table, set_path, write_json
from .sources import CAUSAL_LM, TARGETS, TASKS, TEXT_UNITS, DataOptions, load_source, run_defaults, save_text_base

__all__ = ["add_prune_parser", "add_heads_parser", "cmd_prune", "cmd_heads", "load_run_config", "RECORD_KEYS"]

# keys of config.json besides the RunConfig's: a record of the run, ignored by --config
def _round_to(text: str) -> int | str:
    """``--round-to``: a positive multiple or ``auto`` (argparse names this function in its error)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number or 'auto'") from None


OUTPUTS = ("config.json", "sensitivity.json", "plan.json", "model.safetensors", "metrics.json", "report.md",
           "sensitivity.png", "widths.png")
OUTPUTS_HEADS = (*OUTPUTS[:6], "heads.png")
RECORD_KEYS = ("command", "rerun", "out", "model_dir", "label_names", "new_head", "train_epochs_used",
               "max_length_used", "data_info")

# flags -> RunConfig field (dotted), help; defaults, types come from the dataclasses
RUN_OPTIONS: list[tuple[tuple[str, ...], str, str, dict[str, Any]]] = [
    (("--max-samples",), "sensitivity.max_samples", "curvature samples: probe vectors (hessian) or examples "
     "(fisher); None: 512 / 8192", {}),
    (("--curvature",), "sensitivity.curvature", "auto: Monte-Carlo Fisher", {"choices": ["auto", "hessian", "fisher"]}),
    (("--scope",), "sensitivity.scope", "slices in a unit's score", {"choices": ["all", "producer"]}),
    (("--fisher-backend",), "sensitivity.fisher_backend", "per-example squared gradients of the Fisher: vmap "
     "(exact reference), hooks (from layer inputs and output gradients, memory-lean), auto (hooks where they "
     "serve every unit)", {"choices": list(FISHER_BACKENDS)}),
    (("--sens-batches",), "sensitivity.max_batches", "distinct batches scored", {}),
    (("--sens-batch-size",), "sens_batch_size", "examples per sensitivity batch", {}),
    (("--allocation",), "plan.allocation", "uniform: the same ratio in every group", {"choices": list(ALLOCATIONS)}),
    (("--implant-fraction",), "plan.implant_fraction", "share of the pruned units implanted", {}),
    (("--max-layer-ratio",), "plan.max_layer_ratio", "", {}),
    (("--round-to",), "plan.round_to", "remaining widths multiples of this ('auto': the multiple at which "
     "this CPU's measured layer latency steps down)", {"type": _round_to}),
    (("--sign",), "plan.sign", "how negative estimates rank", {"choices": list(SIGNS)}),
    (("--tol",), "plan.tol", "largest accepted |achieved - target| (coarse units on a small model need more)", {}),
    (("--latency-iters",), "plan.latency_iters", "latency target: planned models timed against the dense one, "
     "re-planning until the measured latency meets the target (0: trust the latency table's prediction)", {}),
    (("--latency-tol",), "plan.latency_tol", "latency target: accepted relative distance of the measured kept "
     "latency from the asked one", {}),
    (("--rank-by",), "plan.rank_by", "layer_normalized: L2-normalise each layer's scores before ranking",
     {"choices": list(RANKINGS)}),
    (("--bn-batches",), "bn_batches", "vision: batches re-estimating BatchNorm statistics after surgery", {}),
    (("--repair",), "repair", "post-surgery layer-wise least-squares repair before fine-tuning",
     {"choices": ["lsq"]}),
    (("--repair-batches",), "repair_batches", "calibration batches (of --sens-batch-size) for --repair", {}),
    (("--finetune-epochs",), "finetune.epochs", "fine-tune epochs after pruning", {}),
    (("--finetune-steps",), "finetune.steps", "fine-tune steps after pruning (0: none; overrides epochs)", {}),
    (("--finetune-lr", "--lr"), "finetune.lr", "fine-tune learning rate", {}),
    (("--finetune-batch-size",), "finetune.batch_size", "fine-tune batch", {}),
    (("--memory-format",), "finetune.memory_format", "conv layout for training (auto: time both, keep the faster)",
     {"choices": list(MEMORY_FORMATS)}),
    (("--kd",), "finetune.kd_alpha", "distillation weight from the unpruned model (0: off)", {}),
    (("--train-epochs",), "dense.epochs", "dense training before pruning (heads: None = 1 if the classification "
     "head is new, else 0)", {}),
    (("--train-lr",), "dense.lr", "dense training learning rate", {}),
    (("--max-length",), "max_length", "text: longest token sequence", {}),
    (("--seed",), "seed", "", {}),
    (("--device",), "device", "where sensitivity, repair, fine-tune and evaluation run: auto (CUDA when "
     "available), cpu, cuda or cuda:N; latency is always measured on the CPU, weights are saved from it", {}),
]
DATA_OPTIONS: list[tuple[tuple[str, ...], str, str, dict[str, Any]]] = [
    (("--data-root",), "data_root", "images: folder holding the dataset files", {}),
    (("--subset",), "subset", "images: use only N training images", {}),
    (("--text-column",), "text_column", "CSV header of the texts (None: text, sentence, ...)", {}),
    (("--label-column",), "label_column", "CSV header of the labels (None: label, sentiment, ...)", {}),
    (("--balance",), "balance", "down-sample classes to the smallest (None: on for tweets, off for a CSV)", {}),
    (("--train-size",), "train_size", "text: at most this many training texts", {}),
    (("--val-size",), "val_size", "", {}),
    (("--score-size",), "score_size", "text: at most this many texts to score heads on", {}),
    (("--test-size",), "test_size", "", {}),
    (("--task",), "task", "text: what a Hugging Face model directory is pruned as (auto: read from its config.json; "
     "causal-lm: a decoder LLM on its next-token loss, measured by perplexity, the texts packed into "
     "--max-length-token sequences, labels ignored)", {"choices": list(TASKS)}),
]

PRUNE_EXAMPLE = """example:
  hap prune --model resnet20 --checkpoint runs/dense/best.safetensors --data fashion-mnist \\
      --method hap --target params=0.5 --implant pointwise --finetune-epochs 2 --out runs/hap-p50
  hap prune ... --method l1 --allocation uniform --target flops=0.5 --out runs/l1-f50
  hap prune --units heads --model minilm --data tweets --target heads=0.5 --out runs/heads-50
  hap prune --units heads,neurons --model minilm --data tweets --target flops=0.4 --out runs/width-f40
  hap prune --units heads,neurons --model path/to/llama_dir --data tweets --target params=0.2 \\
      --allocation even --out runs/llm-20     # a causal LM (detected, or --task causal-lm): perplexity; hf/
  hap prune --units query_slots,neurons --model path/to/llama_dir --data tweets --target params=0.2 \
      --allocation even --out runs/llm-slots-20   # GQA: query heads of every KV group, K/V (and KV cache) kept
  hap prune --config runs/hap-p50/config.json --out runs/hap-p50-again"""
HEADS_EXAMPLE = """example:
  hap heads --model minilm --data tweets --target heads=0.6 --out runs/heads-hap-60
  hap heads --model minilm --data tweets --method michel --target heads=0.4 --out runs/heads-michel-40
  hap heads --model path/to/hf_model_dir --data reviews.csv --text-column body --label-column stars \\
      --target heads=0.5 --finetune-steps 200 --out runs/reviews-h50
  hap heads --model runs/dense-classifier --data tweets --classes negative,neutral,positive --new-head ..."""


def _add_run_options(p: argparse.ArgumentParser, units: list[str]) -> None:
    defaults = [run_defaults(u) for u in units]
    kind = "head" if units == ["heads"] else None
    methods = criteria.names(kind, with_aliases=True)
    help_m = "; ".join(f"{n}: {criteria.get(n).description}" for n in criteria.names(kind))
    config_option(p, ["--method"], "sensitivity.method", defaults, f"criterion ({help_m})",
                  **({"choices": methods} if kind else {}))
    p.add_argument("--target", default=None, help="fraction removed: " + ", ".join(
        f"{k}=F" for u in units for k in TARGETS[u]) + " (default: " + " / ".join(
        ",".join(f"{k}={v:g}" for k, v in d.target.items()) for d in defaults) + ")")
    p.add_argument("--implant", default=None, choices=[*IMPLANT_KINDS, "none"], help="implant kind (default: none)")
    for flags, path, help_, kw in RUN_OPTIONS:
        config_option(p, flags, path, defaults, help_, **kw)
    p.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="calibration examples for --repair (sets --repair-batches to N / --sens-batch-size, "
                   "rounded up)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="dense training batch; the fine-tune's is half of it unless --finetune-batch-size")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels to keep, in id order (tweets default: negative,positive)")
    p.add_argument("--new-head", action="store_true", default=None,
                   help="replace a trained classification head by a new one for these labels")
    dd = [DataOptions()]
    for flags, path, help_, kw in DATA_OPTIONS:
        config_option(p, flags, f"data_options.{path}", [_DataHolder(d) for d in dd], help_, **kw)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune checkpointed in --out")
    p.add_argument("--no-progress", action="store_true")


class _DataHolder:
    """Lets :func:`config_option` address ``data_options.FIELD`` through a :class:`DataOptions`."""

    def __init__(self, d: DataOptions) -> None:
        self.data_options = d


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="sensitivity -> plan (+implant) -> surgery -> fine-tune -> report, one run dir "
                       "(--units channels: a zoo CNN; --units heads or heads,neurons: a local Hugging Face "
                       "encoder or causal LM)",
                       epilog=PRUNE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", default=None, choices=list(TARGETS),
                   help="what is pruned (heads,neurons: attention heads and feed-forward neurons ranked "
                   "together; query_slots: under grouped-query attention, query head j of every KV group at "
                   "once, K/V kept; default: heads for 'minilm' or a model directory, else channels)")
    p.add_argument("--config", default=None, help="a run's config.json: rerun it (options given here override it)")
    p.add_argument("--model", default=None, help="zoo name (`hap models`; default resnet20), 'minilm' or a local "
                   "Hugging Face model directory (a classifier or encoder, or a causal LM: see --task)")
    p.add_argument("--checkpoint", default=None, help="safetensors weights of a zoo --model")
    p.add_argument("--data", default=None, help="fashion-mnist (default), cifar10 or an image folder; heads: "
                   "'tweets' (default) or a CSV; a causal LM also a .txt file (one text per line)")
    p.add_argument("--out", required=True, help="run directory")
    _add_run_options(p, list(TARGETS))


def add_heads_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="prune attention heads of a local Hugging Face encoder (= hap prune --units "
                       "heads); one run directory", epilog=HEADS_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'minilm' (packaged all-MiniLM-L6-v2, default) or a local model "
                   "directory")
    p.add_argument("--data", default=None,
                   help="'tweets' (packaged, default) or a CSV file with text and label columns")
    p.add_argument("--config", default=None, help="a run's config.json: rerun it (options given here override it)")
    p.add_argument("--out", default=None, help="run directory (default runs/heads-METHOD-TARGET)")
    _add_run_options(p, ["heads"])
    p.set_defaults(units="heads", checkpoint=None)


def load_run_config(path: str | Path) -> RunConfig:
    """The RunConfig of a run's ``config.json`` (its record keys set aside)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no config file at '{p}'")
    d = json.loads(p.read_text())
    return RunConfig.from_dict({k: v for k, v in d.items() if k not in RECORD_KEYS})


def _infer_units(model: str | None) -> str:
    import hap.models

    if model is None or model in hap.models.list_models():
        return "channels"
    return "heads"


def resolve(args: argparse.Namespace) -> RunConfig:
    """The run the command line describes: --config or the unit family's defaults, then the options given."""
    if args.config:
        cfg = load_run_config(args.config)
        if args.units and args.units != cfg.units:
            raise UserError(f"--units {args.units} contradicts the config's units {cfg.units}")
    else:
        cfg = run_defaults(args.units or _infer_units(args.model))
    paths = {path for _, path, _, _ in RUN_OPTIONS} | {"sensitivity.method"}
    given = {k: v for k, v in vars(args).items() if v is not None and (k in paths or k.startswith("data_options."))}
    for path, v in given.items():
        if path.startswith("dense.") and cfg.dense is None:
            cfg = cfg.replace(dense=TrainConfig())
        if path.startswith("data_options."):
            opts = DataOptions.from_dict(cfg.data_options)
            cfg = cfg.replace(data_options=opts.replace(**{path.split(".", 1)[1]: v}).to_dict())
            continue
        cfg = set_path(cfg, path, v)
    for name in ("model", "checkpoint", "data"):
        if getattr(args, name, None) is not None:
            cfg = cfg.replace(**{name: getattr(args, name)})
    opts = DataOptions.from_dict(cfg.data_options)
    if args.classes is not None:
        opts = opts.replace(classes=[c.strip() for c in args.classes.split(",") if c.strip()])
    if args.new_head is not None:
        opts = opts.replace(new_head=args.new_head)
    cfg = cfg.replace(data_options=opts.to_dict())
    if args.batch_size is not None:
        cfg = cfg.replace(dense=(cfg.dense or TrainConfig()).replace(batch_size=args.batch_size))
        if getattr(args, "finetune.batch_size") is None:
            cfg = set_path(cfg, "finetune.batch_size", max(1, args.batch_size // 2))
    if args.implant is not None:
        cfg = set_path(cfg, "plan.implant", None if args.implant == "none" else args.implant)
    if getattr(args, "calibration", None) is not None:
        if args.calibration < 1:
            raise UserError(f"--calibration {args.calibration}: give at least one calibration example")
        cfg = cfg.replace(repair_batches=-(-args.calibration // cfg.sens_batch_size))
    if args.target is not None:
        cfg = cfg.replace(target=parse_target_for(args.target, cfg.units))
    else:
        parse_target_for(",".join(f"{k}={v}" for k, v in cfg.target.items()), cfg.units)
    if cfg.sensitivity.method not in criteria.names(with_aliases=True):
        raise UserError(f"unknown method {cfg.sensitivity.method!r}; choose one of {', '.join(criteria.names())}")
    from .checks import validate_run_config

    validate_run_config(cfg, RUN_OPTIONS)  # every option checked before any compute
    return cfg


def parse_target_for(text: str, units: str) -> dict[str, float]:
    from .common import parse_target

    return parse_target(text, TARGETS[units])


def rerun_command(cfg: RunConfig, out: Path) -> str:
    """The ``hap heads`` (or ``hap prune --units heads,neurons``) command line that repeats a text run.

    The data, target, criterion, planning and training options are always spelled out (the command
    holds even if a default changes later); every other option of ``hap prune`` (``--device``,
    ``--fisher-backend``, ``--repair``, ...) is added when the run's value differs from the unit
    family's default, so nothing that shaped the run is left out. A causal LM's command says
    ``--task causal-lm`` and none of the classifier's label options.
    """
    from .common import get_path

    opts = DataOptions.from_dict(cfg.data_options)
    lm = opts.task == CAUSAL_LM
    cmd = ["hap", "heads"] if cfg.units == "heads" else ["hap", "prune", "--units", cfg.units]
    parts = [*cmd, "--model", str(cfg.model), "--data", str(cfg.data)]
    if lm:
        parts += ["--task", CAUSAL_LM]
    elif opts.classes:
        parts += ["--classes", ",".join(opts.classes)]
    for flag, value in (("--text-column", opts.text_column), ("--label-column", None if lm else opts.label_column)):
        if value:
            parts += [flag, value]
    if not lm:
        parts += ["--balance" if opts.balance else "--no-balance"]
    parts += ["--train-size", str(opts.train_size), "--val-size", str(opts.val_size), "--score-size",
              str(opts.score_size), "--test-size", str(opts.test_size)]
    target = ",".join(f"{k}={v:g}" for k, v in cfg.target.items())
    s, pl, ft, dense = cfg.sensitivity, cfg.plan, cfg.finetune, cfg.dense or TrainConfig()
    parts += ["--target", target, "--method", s.method, "--allocation", pl.allocation, "--sign", pl.sign,
              "--rank-by", pl.rank_by]
    if s.max_samples is not None:
        parts += ["--max-samples", str(s.max_samples)]
    parts += ["--max-length", str(cfg.max_length)]
    if opts.new_head and not lm:
        parts.append("--new-head")
    budget = ["--finetune-steps", str(ft.steps)] if ft.steps is not None else ["--finetune-epochs", f"{ft.epochs:g}"]
    parts += ["--train-epochs", f"{dense.epochs or 0:g}", "--train-lr", f"{dense.lr:g}", *budget,
              "--finetune-lr", f"{ft.lr:g}",
              "--batch-size", str(dense.batch_size), "--finetune-batch-size", str(ft.batch_size),
              "--seed", str(cfg.seed)]
    if cfg.plan.implant:
        parts += ["--implant", cfg.plan.implant]
    default = run_defaults(cfg.units)
    spelled = set(parts)
    for flags, path, _, _ in RUN_OPTIONS:  # the rest: where the run is not the family's default
        value = get_path(cfg, path)
        if flags[0] in spelled or value is None or value == get_path(default, path):
            continue
        if isinstance(value, bool):
            parts.append(flags[0] if value else "--no-" + flags[0][2:])
        else:
            parts += [flags[0], str(value)]  # a float's repr: exactly the run's value
    parts += ["--out", str(out)]
    return shlex.join(parts)


def cmd_prune(args: argparse.Namespace) -> int:
    """Execute ``hap prune`` / ``hap heads`` (see the module docstring); returns the exit code."""
    from ..distributed import broadcast_object
    from ..io import save
    from ..pipeline import run
    from ..report import latency_batch_label, write_heads_report, write_lm_report, write_run_report
    from ..sensitivity import Sensitivity

    cfg = resolve(args)
    heads = cfg.units in TEXT_UNITS  # a Hugging Face encoder on text
    out = Path(args.out or f"runs/heads-{cfg.method}-" + "".join(f"{k}{v:g}" for k, v in cfg.target.items()))
    check_run_dir(out, args.resume, args.overwrite)
    progress = not args.no_progress
    loaded = load_source(cfg, progress)
    cfg = loaded.cfg
    lm = loaded.task.name == CAUSAL_LM  # a decoder LLM: perplexity, and hf/ when the widths are uniform
    record: dict[str, Any] = {"command": args.command, **loaded.record}
    if heads:
        record["rerun"] = rerun_command(cfg, out)
    sens = None
    if args.resume and (out / "sensitivity.json").is_file():
        sens = Sensitivity.load(out / "sensitivity.json")
    # under torchrun rank 0 alone resumes (its --out is the run directory, the others' a scratch one): every
    # rank takes its scores, so that all skip (or all compute) the scoring and its collectives together
    sens = broadcast_object(sens)
    small, plan, sens, metrics = run(loaded.model, loaded.task, loaded.data, cfg, sens=sens,
                                     dense_test_acc=loaded.dense_test_acc, out_dir=None if heads else out / "finetune",
                                     resume=args.resume, progress=progress, threads=args.threads)
    metrics.update(loaded.metrics)
    neurons = [g for g in plan.groups if g.kind == "neuron"]
    if neurons:  # the pipeline reports heads; the feed-forward widths are added here
        metrics.update(neurons_base=sum(g.size for g in neurons), neurons=sum(len(g.kept) for g in neurons),
                       neurons_removed=plan.neurons_removed, neurons_per_layer={g.name: len(g.kept) for g in neurons})
    metrics.update(loaded.task.split_record(loaded.data))
    sens.settings.update(model=cfg.model, data=cfg.data)
    outputs = list(OUTPUTS_HEADS if heads else OUTPUTS)
    with commit_run(out, outputs):  # config.json too: written only with the results
        write_json(out / "config.json", {**cfg.to_dict(), **record})
        sens.save(out / "sensitivity.json")
        save(small, plan, out)
        if heads:
            save_text_base(out, loaded)
        if lm:
            metrics.update(_write_hf(out, small, plan, loaded.tokenizer, outputs))
        write_json(out / "metrics.json", metrics)
        (write_lm_report if lm else write_heads_report if heads else write_run_report)(out)
    m = metrics
    if lm:
        print(_attention_line(m)
              + (f", feed-forward neurons {m['neurons_base']} -> {m['neurons']}" if "neurons" in m else "")
              + f", params -{100 * m['params_removed']:.1f}%; test perplexity (lower is better) dense "
              f"{m['dense_test_ppl']:.3f}, after pruning {m['test_ppl_oneshot']:.3f}, after {m['finetune_steps']} "
              f"fine-tune steps {m['test_ppl']:.3f}; CPU speed-up {m['speedup']:.2f}x")
        if m.get("hf_skipped"):
            print(f"note: hf/ not written: {m['hf_skipped']}", file=sys.stderr)
    elif heads:
        print(f"{_attention_line(m)}, "
              f"params -{100 * m['params_removed']:.1f}%; test accuracy dense {m['dense_test_acc']:.4f}, after "
              f"pruning {m['test_acc_oneshot']:.4f}, after {m['finetune_steps']} fine-tune steps "
              f"{m['test_acc']:.4f}; CPU speed-up {m['speedup']:.2f}x")
        if "neurons" in m:
            print(f"feed-forward neurons {m['neurons_base']} -> {m['neurons']}; MACs -{100 * m['macs_removed']:.1f}% "
                  f"({m.get('macs_seq_len')} tokens)")
    else:
        print_table("before / after", [
            {"": "params", "dense": f"{m['params_base']:,}", "pruned": f"{m['params']:,}"},
            {"": "MACs/image", "dense": f"{m['macs_base']:,}", "pruned": f"{m['macs']:,}"},
            {"": "top-1 test", "dense": f"{m['dense_test_acc']:.4f}", "pruned": f"{m['test_acc']:.4f}"},
            *([{"": "top-1 after surgery (BN re-est.)", "dense": "", "pruned": f"{m['test_acc_surgery']:.4f}"},
               {"": f"top-1 after repair ({m['repair_s']:.1f} s)", "dense": "",
                "pruned": f"{m['test_acc_oneshot']:.4f}"}] if m.get("repair") else
              [{"": "top-1 after surgery (BN re-est.)", "dense": "", "pruned": f"{m['test_acc_oneshot']:.4f}"}]),
            {"": f"CPU latency b{latency_batch_label(m) or '?'} (ms)", "dense": f"{m['latency_ms_base']:.1f}",
             "pruned": f"{m['latency_ms']:.1f} ({m['speedup']:.2f}x)"},
            {"": "val / test images", "dense": "", "pruned": f"{m['val_size']:,} / {m['test_size']:,}"},
        ], ["", "dense", "pruned"])
    print(f"written: {out}/{{config.json,sensitivity.json,plan.json,model.safetensors,metrics.json,report.md"
          + (",hf/" if lm and m.get("hf_dir") else "") + "}")
    return 0


def _attention_line(m: dict[str, Any]) -> str:
    """What the run kept of attention: heads (KV groups under GQA), or the query heads of a query-slot run."""
    if "query_heads_base" in m:
        return (f"query heads {m['query_heads_base']} -> {m['query_heads']} "
                f"({100 * m['query_heads_removed']:.1f}% removed; {m['kv_heads']} K/V heads kept)")
    return f"heads {m['heads_base']} -> {m['heads']} ({100 * m['heads_removed']:.1f}% removed)"


def _write_hf(out: Path, small: Any, plan: Any, tokenizer: Any, outputs: list[str]) -> dict[str, Any]:
    """``OUT/hf``: the pruned causal LM as a directory plain ``transformers`` loads (:func:`hap.save_pretrained`),
    when its plan left the same widths in every layer; otherwise the reason it was skipped, for the metrics.

    The files written are appended to ``outputs`` (the list :func:`commit_run` hashes into the manifest
    after its block), so the manifest covers them too. An earlier run's ``hf/`` is removed when this one
    writes none: it must not pass for this run's model.
    """
    import shutil

    from .._utils import first_line
    from ..hf_export import save_pretrained

    hf = out / "hf"
    try:
        save_pretrained(small, plan, hf, tokenizer=tokenizer)
    except ValueError as e:  # widths that differ per layer, or sizes the architecture's config cannot carry
        shutil.rmtree(hf, ignore_errors=True)
        return {"hf_dir": None, "hf_skipped": first_line(e)}
    outputs += sorted(f.relative_to(out).as_posix() for f in hf.rglob("*") if f.is_file())
    return {"hf_dir": "hf"}


cmd_heads = cmd_prune
