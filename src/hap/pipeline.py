"""The only orchestration: sensitivity -> plan -> surgery -> (repair) -> one-shot metrics -> fine-tune -> metrics.

``hap prune`` (``--units channels`` or ``heads``), ``hap heads``, ``benchmarks/vision_study.py`` and
``benchmarks/heads_study.py`` all call :func:`run`, so a row of a study is exactly what a user gets from
the command, and criteria differ only in their scores. A model family differs only by its task
(:class:`hap.train.VisionTask`, :class:`hap.train.TextTask`: batches, optimiser, what a pruned model needs
before it is measured) and its data.

Accuracy is measured right after surgery (vision: with BatchNorm statistics re-estimated, without which
every criterion collapses and the comparison says nothing), then after fine-tuning on the validation
split (which selects the weights) and on the test split (reported only).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ._utils import model_device, uses_threads
from .config import Config, PlanConfig, Problem, SensitivityConfig, in_range
from .distributed import is_distributed, shard_batches
from .metrics import count_macs, count_params, latency
from .planner import plan as make_plan
from .planning import PruningPlan, Target
from .repair import repair
from .sensitivity import Sensitivity, sensitivity
from .surgery import prune
from .train import Task, TextTask, TrainConfig, VisionTask, train

__all__ = ["RunConfig", "run", "score_units", "paired_latency", "UNIT_DEFAULTS", "REPAIRS", "resolve_device",
           "device_problem", "on_device"]


@dataclass
class RunConfig(Config):
    """Everything that defines one pruning run; a run directory's ``config.json`` is its ``to_dict()``.

    Attributes:
        units: The unit family pruned (a key of :data:`UNIT_DEFAULTS`): ``"channels"`` (CNNs), ``"heads"``
            (attention heads; whole KV groups under GQA) or ``"query_slots"`` (GQA query slots), the last two
            optionally with ``",neurons"``.
        target: One of ``{"params"|"flops"|"channels"|"heads"|"latency": fraction removed}`` (:class:`hap.Target`;
            ``latency`` is predicted from a per-layer latency table measured once on this machine).
        sensitivity: How units are scored (criterion = ``sensitivity.method``); its ``units`` and ``seed``
            are set from this config's. Channels default to ``obs-greedy``: with repair it was the best
            criterion at 50/70/85% in the post-training study (docs/posttraining.md).
        sens_batch_size: Examples per sensitivity batch (``sensitivity.max_batches`` batches are drawn).
        plan: How scores become a plan (``implant=None``: no implants).
        bn_batches: Vision: training batches of 128 used to re-estimate BatchNorm statistics after surgery.
        repair: Post-surgery compensation between surgery and fine-tune: ``"lsq"`` (:func:`hap.repair`,
            layer-wise least squares; the channels default: one-shot top-1 at 70% 38-62% -> 90-92%, and
            still ahead after a 200-step fine-tune) or ``None`` (off; the heads default: after the heads'
            fine-tune the repaired and unrepaired models tie, docs/posttraining.md).
        repair_batches: Calibration batches (of ``sens_batch_size``, drawn like the sensitivity's with the
            next seed) given to the repair.
        finetune: Training budget after pruning (its ``seed`` is set from this config's).
        dense: Training before pruning (the CLI's; e.g. a new classification head); ``None``: the
            command's default (text: one epoch when the head is new, else none).
        max_length: Text: longest token sequence (scoring, training, evaluation, latency).
        latency_batch: Examples per batch of the CPU latency comparison.
        latency_rounds, latency_repeats: Alternating rounds and timed runs per round of that comparison.
        seed: Seeds the sensitivity, the fine-tune and every data order.
        device: Where the sensitivity, repair, fine-tune and evaluation run: ``"auto"`` (CUDA when torch
            finds a GPU, else the CPU), ``"cpu"``, ``"cuda"`` (the current GPU: under ``torchrun``, this rank's)
            or ``"cuda:N"``. Planning, MACs and the latency comparison stay on the CPU, and the pruned model
            is handed back there (so its weights are saved from the CPU).
        model, checkpoint, data, data_options: Where the CLI takes the model and the data from
            (``run`` itself is given the objects); ``hap prune --config`` reads them back.
    """

    units: str = "channels"
    target: dict[str, float] = field(default_factory=lambda: {"params": 0.5})
    sensitivity: SensitivityConfig = field(default_factory=lambda: SensitivityConfig(method="obs-greedy",
                                                                                    max_batches=8))
    sens_batch_size: int = 128
    plan: PlanConfig = field(default_factory=lambda: PlanConfig(implant=None))
    bn_batches: int = 40
    repair: str | None = "lsq"
    repair_batches: int = 8
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01))
    dense: TrainConfig | None = None
    max_length: int = 64
    latency_batch: int = 64
    latency_rounds: int = 7
    latency_repeats: int = 5
    seed: int = 0
    device: str = "auto"
    model: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_units(cls, units: str, **changes: Any) -> RunConfig:
        """The defaults of a unit family (:data:`UNIT_DEFAULTS`) with ``changes`` applied."""
        if units not in UNIT_DEFAULTS:
            raise ValueError(f"unknown units {units!r}; choose one of {', '.join(UNIT_DEFAULTS)}")
        return UNIT_DEFAULTS[units]().replace(**changes)

    @property
    def method(self) -> str:
        return self.sensitivity.method

    def problems(self) -> list[Problem]:
        """The nested configs' rules (the training ones as this unit family's task states them) and the
        run's own: what :func:`run` and the CLI check before any compute."""
        out = [p.under(name) for name in ("sensitivity", "plan") for p in getattr(self, name).problems()]
        task = VisionTask() if self.units == "channels" else TextTask(tokenizer=None)
        out += [p.under(name) for name in ("finetune", "dense") if getattr(self, name) is not None
                for p in task.problems(getattr(self, name))]
        if self.units not in UNIT_DEFAULTS:
            out.append(Problem("units", self.units, f"must be one of {', '.join(UNIT_DEFAULTS)}"))
        try:
            Target.from_dict(self.target)
        except (ValueError, TypeError, AttributeError) as e:
            out.append(Problem("target", self.target, f"must be one kind=fraction ({e})"))
        if self.repair is not None and self.repair not in REPAIRS:
            out.append(Problem("repair", self.repair, f"must be one of {', '.join(REPAIRS)} or None"))
        for name, low in (("sens_batch_size", 1), ("repair_batches", 1), ("max_length", 1), ("bn_batches", 0),
                          ("latency_batch", 1), ("latency_rounds", 1), ("latency_repeats", 1)):
            if not in_range(getattr(self, name), low, integer=True):
                out.append(Problem(name, getattr(self, name), f"must be an integer >= {low}"))
        rule = device_problem(self.device)
        if rule:
            out.append(Problem("device", self.device, rule))
        return out


def _heads_defaults() -> RunConfig:
    """Heads: the best HAP row of the heads study (docs/results.md): Fisher traces ranked layer-normalised."""
    return RunConfig(
        units="heads", target={"heads": 0.5}, repair=None,
        sensitivity=SensitivityConfig(units="heads", method="hap-fisher", max_samples=128, max_batches=16),
        sens_batch_size=32,
        plan=PlanConfig(implant=None, allocation="global", rank_by="layer_normalized"),
        finetune=TrainConfig(steps=100, lr=5e-5, batch_size=16, warmup=0.0),
        dense=TrainConfig(lr=1e-4, batch_size=32),  # epochs None: one if the classification head is new, else none
        latency_batch=8, latency_rounds=5, latency_repeats=3, model="minilm", data="tweets",
    )


def _width_defaults() -> RunConfig:
    """Heads and FFN neurons scored together under a FLOPs target, ranked by importance per weight saved.

    ``layer_normalized`` divides each group by its L2 norm, which makes a unit of a 1,536-neuron group
    ~11x cheaper to drop than a head of a 12-head group whatever its score (it empties the FFNs first);
    importance per weight saved is the greedy form of Kwon et al.'s knapsack over heads and neurons.
    """
    base = _heads_defaults()
    return base.replace(units="heads,neurons", target={"flops": 0.4},
                        sensitivity=base.sensitivity.replace(units="heads,neurons"),
                        plan=base.plan.replace(rank_by="score_per_param"))


def _slots_defaults() -> RunConfig:
    """Query slots (grouped-query attention, K/V kept): the heads defaults, ``heads=0.5`` counting query heads
    (every slot holds one query head of each KV group, so the share of slots is the share of query heads)."""
    return _heads_defaults().replace(units="query_slots",
                                     sensitivity=_heads_defaults().sensitivity.replace(units="query_slots"))


def _slots_width_defaults() -> RunConfig:
    """Query slots and FFN neurons together: the ``heads,neurons`` defaults (see :func:`_width_defaults`)."""
    base = _width_defaults()
    return base.replace(units="query_slots,neurons", sensitivity=base.sensitivity.replace(units="query_slots,neurons"))


UNIT_DEFAULTS = {
    "channels": lambda: RunConfig(model="resnet20", data="fashion-mnist"),
    "heads": _heads_defaults,
    "heads,neurons": _width_defaults,
    "query_slots": _slots_defaults,
    "query_slots,neurons": _slots_width_defaults,
}


def paired_latency(base: nn.Module, small: nn.Module, batch: Any, rounds: int = 7,
                   repeats: int = 5) -> dict[str, float]:
    """CPU latency of two models measured in alternation, one thread, and the median of per-round ratios.

    On a shared machine load comes and goes; timing one model after the other lets a burst land on one
    side only. Alternating short rounds exposes both to the same conditions.
    """
    ratios, tb, ts = [], [], []
    for _ in range(rounds):
        b = latency(base, batch, repeats=repeats, warmup=1, threads=1).median_ms
        s = latency(small, batch, repeats=repeats, warmup=1, threads=1).median_ms
        tb.append(b)
        ts.append(s)
        ratios.append(b / s)
    return {"latency_ms_base": float(np.median(tb)), "latency_ms": float(np.median(ts)),
            "speedup": float(np.median(ratios))}


def score_units(model: nn.Module, task: Task, data: Any, cfg: RunConfig, progress: bool = True) -> Sensitivity:
    """The sensitivity stage alone: ``cfg.sensitivity`` on the task's scoring batches."""
    scfg = cfg.sensitivity.replace(units=cfg.units, seed=cfg.seed)
    batches = task.sensitivity_batches(data, cfg.sens_batch_size, scfg.max_batches, cfg.seed)
    # under torch.distributed every rank keeps its share of the batches one process would score on
    shard = shard_batches(batches, scfg.max_batches) if is_distributed() else batches
    sens = sensitivity(model, task.loss, shard, config=scfg, progress=progress)  # the task's loss (LM: next token)
    sens.settings.update(split=task.sensitivity_split)
    if hasattr(batches, "texts"):
        sens.settings.update(examples=len(batches.texts), max_length=getattr(task, "max_length", None))
    return sens


def _query_heads(model: nn.Module, slots: list[Any]) -> dict[str, Any]:
    """Query heads before and after a query-slot plan: per layer, its KV heads times the slots kept.

    A slot group's ``size`` counts slots (query heads per KV head), which says nothing of the layer's
    width on its own; the query heads are what a user compares with the model's config.
    """
    from .units import attention_layouts

    kv = {lay.name: lay.num_heads for lay in attention_layouts(model)}
    per_layer = {g.name: kv[g.name] * len(g.kept) for g in slots}
    base = sum(kv[g.name] * g.size for g in slots)
    kept = sum(per_layer.values())
    return {"query_heads_base": base, "query_heads": kept, "query_heads_removed": 1 - kept / max(1, base),
            "query_heads_per_layer": per_layer, "kv_heads": sum(kv[g.name] for g in slots)}


REPAIRS = ("lsq",)


# ------------------------------------------------------------------------------------------------ devices


def device_problem(spec: Any) -> str | None:
    """What is wrong with a :attr:`RunConfig.device` on this machine (``None``: nothing), as a rule that
    names the fix: asking for a GPU torch cannot see must fail before any compute, not at the first batch."""
    if not isinstance(spec, str) or not (spec in ("auto", "cpu", "cuda") or spec.startswith("cuda:")):
        return "must be auto, cpu, cuda or cuda:N"
    if spec in ("auto", "cpu"):
        return None
    index = spec.partition(":")[2]
    if spec != "cuda" and not index.isdigit():
        return "must be auto, cpu, cuda or cuda:N (N a GPU index)"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and torch finds none here: use cpu (or auto)"
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"names a GPU this machine lacks (it has {count}, numbered from 0): give cuda:0..cuda:{count - 1}"
    return None


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device of a :attr:`RunConfig.device` (``"cuda"``/``"auto"``: the current GPU, with its index,
    which is this rank's under ``torchrun`` and what :class:`~torch.nn.parallel.DistributedDataParallel` needs).

    Raises:
        ValueError: ``spec`` is not a device this machine has (the message names the fix).
    """
    rule = device_problem(spec)
    if rule:
        raise ValueError(f"device {rule}, got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device(spec) if ":" in spec else torch.device("cuda", torch.cuda.current_device())


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _OnDevice:
    """Batches (or a loader's, or a dataset's ``loader(...)``) moved to ``device`` as they are drawn; every
    other attribute (``len``, ``texts``, ``num_classes``, ...) is the wrapped object's."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self._inner, self._device = inner, device

    def __iter__(self) -> Any:
        return (_to_device(b, self._device) for b in self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def loader(self, *args: Any, **kw: Any) -> _OnDevice:
        return _OnDevice(self._inner.loader(*args, **kw), self._device)

    def __getattr__(self, name: str) -> Any:
        if "_inner" not in self.__dict__:  # copy/pickle probing a half-built object
            raise AttributeError(name)
        return getattr(self.__dict__["_inner"], name)


def on_device(task: Task, device: torch.device) -> Task:
    """A copy of ``task`` whose batches arrive on ``device`` (the task itself is not changed).

    Tasks and data loaders produce CPU tensors, and every stage (scoring, BatchNorm re-estimation,
    repair, training, evaluation) draws them through the task; so a subclass of the task's own class
    that moves each batch on the way serves them all, any task, without a device argument in each.
    """
    if device.type == "cpu":
        return task
    base = type(task)

    class OnDevice(base):  # type: ignore[misc,valid-type]
        def train_batches(self, data: Any, cfg: TrainConfig, epoch: int) -> Any:
            return _OnDevice(base.train_batches(self, data, cfg, epoch), device)

        def eval_batches(self, data: Any, split: str, *args: Any, **kw: Any) -> Any:
            return _OnDevice(base.eval_batches(self, data, split, *args, **kw), device)

        def sensitivity_batches(self, data: Any, *args: Any, **kw: Any) -> Any:
            return _OnDevice(base.sensitivity_batches(self, data, *args, **kw), device)

        def prepare(self, model: nn.Module, data: Any, cfg: TrainConfig, resumed: str | None) -> str:
            return base.prepare(self, model, _OnDevice(data, device), cfg, resumed)  # it may time a batch

        def after_surgery(self, model: nn.Module, data: Any, *args: Any, **kw: Any) -> None:
            base.after_surgery(self, model, _OnDevice(data, device), *args, **kw)  # BatchNorm re-estimation

    OnDevice.__name__ = OnDevice.__qualname__ = f"{base.__name__}OnDevice"
    out = copy.copy(task)
    out.__class__ = OnDevice
    return out


def _repair(small: nn.Module, model: nn.Module, task: Task, data: Any, cfg: RunConfig, p: PruningPlan,
            progress: bool) -> dict[str, Any]:
    """The repair stage (off unless ``cfg.repair``): hap.repair refits the kept weights after surgery
    (``cfg.repair`` and ``cfg.repair_batches`` were checked by :meth:`RunConfig.problems`)."""
    batches = list(islice(task.sensitivity_batches(data, cfg.sens_batch_size, cfg.repair_batches, cfg.seed + 1),
                          cfg.repair_batches))
    rep = repair(small, model, shard_batches(batches), plan=p, progress=progress)  # distributed: this rank's share
    errs = [(b, a) for b, a in rep.errors.values()]
    return {"repair": cfg.repair, "repair_s": rep.seconds, "repair_peak_mb": rep.peak_memory_mb,
            "repair_examples": rep.examples, "repair_layers": len(rep.layers), "repair_skipped": len(rep.skipped),
            "repair_rel_err_before": float(np.median([b for b, _ in errs])) if errs else None,
            "repair_rel_err_after": float(np.median([a for _, a in errs])) if errs else None}


@uses_threads
def run(
    model: nn.Module,
    task: Task | None,
    data: Any,
    cfg: RunConfig | None = None,
    *,
    sens: Sensitivity | None = None,
    dense_test_acc: float | None = None,
    out_dir: Any = None,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> tuple[nn.Module, PruningPlan, Sensitivity, dict[str, Any]]:
    """Prune a copy of ``model`` as ``cfg`` says, measure it, fine-tune it, measure again.

    Args:
        model: The trained model (not modified).
        task: :class:`hap.train.VisionTask` (default), :class:`hap.train.TextTask` or
            :class:`hap.train.CausalLMTask` (a decoder LLM: scored, repaired and fine-tuned on its
            next-token loss, and measured by perplexity, so every ``*_acc*`` metric below is ``*_ppl*``).
        data: The task's data (splits train/val/test; text also score).
        cfg: The run (default: :meth:`RunConfig.for_units` of ``"channels"``).
        sens: A sensitivity already computed for this model (reused across targets/allocations).
        dense_test_acc: The unpruned model's test accuracy (the task's metric), if known (else measured).
        out_dir: Where the fine-tune writes its resumable checkpoints (None: in memory).
        resume: Continue the fine-tune checkpointed in ``out_dir``.
        progress: Show progress.
        threads: Torch CPU threads for the whole run (restored after; recorded as ``threads`` in the
            metrics); ``None``: :func:`hap._utils.default_threads` (a resumed fine-tune: the count it started with).

    Returns:
        ``(pruned model (on the CPU), plan, sensitivity, metrics)``; metrics hold params/MACs (and heads, or for
        query slots the query heads: ``query_heads*``) before and after, accuracy after surgery (``*_oneshot``),
        after the fine-tune (``val_acc``, ``test_acc``),
        CPU latency (``latency_ms``, ``latency_ms_base``, ``speedup``) and timings.
    """
    t0 = time.perf_counter()
    task = task or VisionTask()
    cfg = (cfg or RunConfig()).validate()  # every option, before any compute
    target = Target.from_dict(cfg.target)
    dev = resolve_device(cfg.device)
    # the stages that compute run on a copy of the model on ``dev`` (the caller's model stays as it is), fed
    # by a copy of the task that moves each batch there; plan, MACs and CPU latency use ``model`` itself
    work = model if model_device(model) == dev else copy.deepcopy(model).to(dev)
    task = on_device(task, dev)
    m: dict[str, Any] = {"config": cfg.to_dict(), "threads": torch.get_num_threads(), "device": str(dev)}
    k = task.metric  # "acc" (classifiers: the names below are *_acc*) or "ppl" (a causal LM: *_ppl*)
    if dense_test_acc is None:
        dense_test_acc = task.metric_value(work, data, "test")
    m[f"dense_test_{k}"] = dense_test_acc
    if sens is None:
        sens = score_units(work, task, data, cfg, progress)
    m.update(sensitivity_s=sens.wall_time_s, sens_samples=sens.samples, sens_split_half=sens.split_half,
             sens_converged=sens.converged)
    t1 = time.perf_counter()
    pcfg = cfg.plan if cfg.plan.implant else cfg.plan.replace(implant_fraction=0.0)
    example = task.example_inputs(data)
    p = make_plan(model, sens, target, config=pcfg, example_inputs=example)
    m["plan_s"] = time.perf_counter() - t1
    small = prune(model, p).to(dev)
    task.after_surgery(small, data, cfg.bn_batches, cfg.seed)
    has_val = task.has_split(data, "val")
    if cfg.repair:  # post-surgery repair: accuracy measured before and after it
        if has_val:
            m[f"val_{k}_surgery"] = task.metric_value(small, data, "val")
        m[f"test_{k}_surgery"] = task.metric_value(small, data, "test")
        m.update(_repair(small, work, task, data, cfg, p, progress))
    if has_val:
        m[f"val_{k}_oneshot"] = task.metric_value(small, data, "val")
    m[f"test_{k}_oneshot"] = task.metric_value(small, data, "test")
    if progress:
        name = "accuracy" if k == "acc" else k
        print(f"  {sens.method}: test {name} {m[f'test_{k}_oneshot']:.4f} right after pruning", flush=True)
    ft = cfg.finetune.replace(seed=cfg.seed)
    budget = task.total_steps(data, task.resolve(ft))
    if budget > 0:
        teacher = copy.deepcopy(work).eval() if ft.kd_alpha > 0 else None
        res = train(small, data, ft, task=task, out_dir=out_dir, resume=resume, teacher=teacher, progress=progress,
                    threads=threads)
        m.update(finetune_history=res.history, finetune_s=res.seconds, finetune_steps=res.steps)
        if has_val:
            m[f"val_{k}"] = task.metric_value(small, data, "val")
        m[f"test_{k}"] = task.metric_value(small, data, "test")
    else:
        m["finetune_steps"] = 0
        if has_val:
            m[f"val_{k}"] = m[f"val_{k}_oneshot"]
        m[f"test_{k}"] = m[f"test_{k}_oneshot"]
    small = small.cpu()  # handed back (and saved) from the CPU, where the counts and latency below are taken
    del work
    heads = [g for g in p.groups if g.kind == "head"]
    if heads:
        m["heads_base"] = sum(g.size for g in heads)
        m["heads"] = m["heads_base"] - sum(len(g.removed) for g in heads)
        m["heads_removed"] = p.heads_removed
        m["heads_per_layer"] = {g.name: len(g.kept) for g in heads}
    slots = [g for g in p.groups if g.kind == "query_slot"]
    if slots:  # a slot is one query head of every KV group: count the query heads (K/V heads all stay)
        m.update(_query_heads(model, slots))
    m["params_base"], m["params"] = count_params(model), count_params(small)
    m["params_removed"] = 1 - m["params"] / m["params_base"]
    if example is None:
        example = p.example_inputs()
    m["macs_base"], m["macs"] = count_macs(model, example), count_macs(small, example)
    m["macs_removed"] = 1 - m["macs"] / max(1, m["macs_base"])
    if isinstance(example, dict):
        m["macs_seq_len"] = int(next(iter(example.values())).shape[-1])
    batch = task.latency_inputs(data, cfg.latency_batch)
    m.update(paired_latency(model, small, batch, rounds=cfg.latency_rounds, repeats=cfg.latency_repeats))
    m["latency_batch"] = [cfg.latency_batch, *([getattr(task, "max_length", cfg.max_length)] if isinstance(batch, dict)
                                               else [])]
    m["total_s"] = time.perf_counter() - t0
    return small, p, sens, m
