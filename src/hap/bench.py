"""``hap.bench``: the CPU speed a stopwatch sees, pruned against dense in one run.

MACs do not predict latency (the issue that asked for this measured about half the MAC gain), so the
speed-up a run reports must be measured, and measured fairly: both models are timed in the same process,
with the same thread count, in *alternating rounds* (dense, pruned, pruned, dense, ...), so that a drift of
the machine (another job, turbo, thermal state) lands on both instead of on whichever ran second. Each
round times ``number`` calls with :class:`torch.utils.benchmark.Timer`; the median over rounds is the
latency, the interquartile range its spread, and the speed-up is the ratio of the two medians.

Peak memory is the peak of the tensor bytes allocated *during* one forward (activations and workspaces,
not the weights, which exist before it), read from ``torch.profiler``'s memory events: ``tracemalloc``
does not see torch's allocator, and the resident-set size hardly moves once the allocator caches blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from ._utils import call_model, eval_mode
from ._utils import threads as threads_ctx

__all__ = ["bench", "BenchResult", "Timing", "peak_forward_bytes", "with_batch", "to_channels_last"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """One model at one batch size: per-call seconds of every round, summarised.

    Attributes:
        batch: Batch size.
        median_ms: Median per-call latency over the rounds.
        iqr_ms: Interquartile range of the rounds (the spread; compare it with differences you read).
        rounds_ms: Every round's per-call latency, in the order measured.
        number: Calls per round.
        items_per_s: ``batch / median`` (throughput).
    """

    batch: int
    median_ms: float
    iqr_ms: float
    rounds_ms: list[float]
    number: int
    items_per_s: float

    @classmethod
    def from_rounds(cls, batch: int, seconds: Sequence[float], number: int) -> Timing:
        ms = [s * 1e3 for s in seconds]
        med = statistics.median(ms)
        q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [med, med, med]
        return cls(batch, med, q[2] - q[0], ms, number, batch / (med / 1e3) if med > 0 else float("inf"))


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """What :func:`bench` measured: one :class:`Timing` per batch size, per model, and the speed-ups.

    Attributes:
        threads: Torch CPU threads used for every measurement.
        batch_sizes: The batch sizes timed (the first is the latency batch, the last the throughput one).
        pruned: ``{batch: Timing}`` of the model.
        baseline: ``{batch: Timing}`` of the baseline (``{}`` without one).
        speedup: ``{batch: baseline median / model median}`` (``{}`` without a baseline).
        peak_bytes: Peak tensor bytes allocated during one forward at the largest batch, per model
            (``"pruned"``, and ``"baseline"`` with one), from ``torch.profiler``.
        memory_method: How ``peak_bytes`` was measured.
        torch_version: ``torch.__version__``.
        repeats: Rounds per model and batch size.
        warmup: Untimed calls per model and batch size before the rounds.
        channels_last: Both models and 4-D inputs were timed in ``torch.channels_last`` (NHWC) layout.
        fold_bn: Both models were timed with their BatchNorms folded (:func:`hap.fold_batchnorm`).
    """

    threads: int
    batch_sizes: list[int]
    pruned: dict[int, Timing]
    baseline: dict[int, Timing]
    speedup: dict[int, float]
    peak_bytes: dict[str, int]
    memory_method: str
    torch_version: str
    repeats: int
    warmup: int
    channels_last: bool = False
    fold_bn: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (batch sizes become string keys, as JSON requires)."""
        d = dataclasses.asdict(self)
        for k in ("pruned", "baseline", "speedup"):
            d[k] = {str(b): v for b, v in d[k].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """Inverse of :meth:`to_dict` (extra keys such as ``run`` in a ``bench.json`` are ignored).

        Raises:
            ValueError: ``d`` is not a bench result (a key is missing or malformed).
        """
        try:
            def timings(x: dict[str, Any]) -> dict[int, Timing]:
                return {int(b): Timing(**{f.name: t[f.name] for f in dataclasses.fields(Timing)}) for b, t in x.items()}

            return cls(threads=int(d["threads"]), batch_sizes=[int(b) for b in d["batch_sizes"]],
                       pruned=timings(d["pruned"]), baseline=timings(d.get("baseline") or {}),
                       speedup={int(b): float(v) for b, v in (d.get("speedup") or {}).items()},
                       peak_bytes={str(k): int(v) for k, v in (d.get("peak_bytes") or {}).items()},
                       memory_method=str(d.get("memory_method", "not measured")),
                       torch_version=str(d["torch_version"]), repeats=int(d["repeats"]), warmup=int(d["warmup"]),
                       channels_last=bool(d.get("channels_last", False)), fold_bn=bool(d.get("fold_bn", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a hap bench result ({type(e).__name__}: {e}): rerun 'hap bench'") from e

    def markdown(self) -> str:
        """The "Speed" section of a run's report.md: a table per batch size, the conditions stated."""
        base = bool(self.baseline)
        head = "| batch | pruned ms (IQR) | items/s |" + (" dense ms (IQR) | speed-up |" if base else "")
        sep = "|---|---|---|" + ("---|---|" if base else "")
        rows = []
        for b in self.batch_sizes:
            p = self.pruned[b]
            row = f"| {b} | {p.median_ms:.2f} ({p.iqr_ms:.2f}) | {p.items_per_s:,.0f} |"
            if base:
                d = self.baseline[b]
                row += f" {d.median_ms:.2f} ({d.iqr_ms:.2f}) | {self.speedup[b]:.2f}x |"
            rows.append(row)
        mem = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.peak_bytes.items())
        how = "alternating rounds of both models, " if base else ""
        layout = "".join([", channels_last (NHWC) layout" if self.channels_last else "",
                          ", BatchNorm folded into the convolutions" if self.fold_bn else ""])
        return "\n".join([
            "## Speed", "",
            f"CPU, {self.threads} thread(s), torch {self.torch_version}{layout}; {how}{self.repeats} rounds per model "
            "and "
            "batch size (torch.utils.benchmark Timer, each round after 2 untimed calls); median per call and "
            "interquartile range over the rounds.", "",
            head, sep, *rows, "",
            f"Peak memory allocated during one forward at batch {self.batch_sizes[-1]} ({self.memory_method}): "
            f"{mem}.", "",
        ])


def with_batch(example_inputs: Any, n: int) -> Any:
    """``example_inputs`` with batch size ``n`` (rows cycled): timing inputs of any batch from one example."""
    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        return x[torch.arange(n) % x.shape[0]].contiguous()

    if isinstance(example_inputs, dict):
        return {k: one(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple | list):
        return type(example_inputs)(one(v) for v in example_inputs)
    return one(example_inputs)


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 inside: the profiler's C++ side prints start/stop lines there that no
    Python setting turns off, and a command's stderr is for errors."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_forward_bytes(model: nn.Module, inputs: Any) -> int:
    """Peak tensor bytes allocated during one forward (``torch.profiler`` memory events).

    The profiler attributes each allocation to the operator event that made it and records each free as
    a ``[memory]`` event; replaying both in time order gives the running total, whose maximum is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with eval_mode(model), torch.inference_mode(), _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call_model(model, inputs)
    changes = []
    for e in prof.events():
        if e.name == "[memory]":
            changes.append((e.time_range.start, 1, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage > 0:
            changes.append((e.time_range.start, 0, e.self_cpu_memory_usage))  # allocations first on a tie
    cur = peak = 0
    for _, _, delta in sorted(changes):
        cur += delta
        peak = max(peak, cur)
    return int(peak)


def _number(fn: Any, min_round_s: float) -> int:
    """Calls per round so that one round lasts about ``min_round_s`` (timer resolution and overhead)."""
    import time

    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, round(min_round_s / dt)))


def bench(
    model: nn.Module,
    example_inputs: Any,
    *,
    baseline: nn.Module | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int = 1,
    repeats: int = 7,
    warmup: int = 0,
    min_round_s: float = 0.02,
    memory: bool = True,
    channels_last: bool = False,
    fold_bn: bool = False,
) -> BenchResult:
    """Time ``model`` (and ``baseline``, alternating) on CPU at each batch size; peak forward memory.

    Args:
        model: The (pruned) model, timed in eval mode without autograd; its flags are restored.
        example_inputs: One batch (tensor, tuple, or mapping of keyword tensors); its rows are cycled to
            make each batch size.
        baseline: The dense model to compare against, timed in the same rounds.
        batch_sizes: Latency batch first, throughput batch last.
        threads: Torch CPU threads for the whole measurement (restored afterwards): fix it, since thread
            scheduling noise is larger than many differences being measured.
        repeats: Rounds per model and batch size (median and IQR are over these).
        warmup: Extra untimed calls per model and batch size before the rounds. Each round already
            starts with the two untimed calls of ``Timer.timeit``, so every model's caches are warm when
            its calls are timed, even right after the other model ran (what makes alternation fair).
        min_round_s: A round repeats the call until it lasts about this long.
        memory: Also measure peak forward memory (one profiled forward per model at the largest batch).
        channels_last: Time both models (copies) and their 4-D inputs in ``torch.channels_last`` layout,
            the NHWC layout whose CPU convolution kernels were faster for training (docs/memory_format.md).
        fold_bn: Time copies of both models with their BatchNorms folded into the preceding layers
            (:func:`hap.fold_batchnorm`), as an inference deployment would.

    Returns:
        A :class:`BenchResult`.

    Raises:
        ValueError: ``repeats < 1``, ``warmup < 0``, ``threads < 1`` or a batch size below 1.
    """
    from torch.utils.benchmark import Timer

    if repeats < 1 or warmup < 0 or threads < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, threads >= 1 and batch sizes >= 1; got repeats={repeats}, "
                         f"warmup={warmup}, threads={threads}, batch_sizes={list(batch_sizes)}")
    if fold_bn or channels_last:
        model = _deployed(model, example_inputs, fold_bn, channels_last)
        if baseline is not None:
            baseline = _deployed(baseline, example_inputs, fold_bn, channels_last)
    models = {"pruned": model} | ({"baseline": baseline} if baseline is not None else {})
    rounds: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batch_sizes} for k in models}
    numbers: dict[str, dict[int, int]] = {k: {} for k in models}
    peaks: dict[str, int] = {}
    other = baseline if baseline is not None else nn.Identity()
    with threads_ctx(threads), eval_mode(model), eval_mode(other), torch.inference_mode():
        for b in batch_sizes:
            x = with_batch(example_inputs, b)
            x = to_channels_last(x) if channels_last else x  # with_batch returns NCHW-contiguous rows
            timers = {}
            for k, m in models.items():
                def fn(m: nn.Module = m, x: Any = x) -> Any:
                    return call_model(m, x)

                for _ in range(warmup):
                    fn()
                numbers[k][b] = _number(fn, min_round_s)
                timers[k] = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            order = list(models)
            for r in range(repeats):  # alternate which model goes first: drift is shared, not one-sided
                for k in order if r % 2 == 0 else order[::-1]:
                    meas = timers[k].timeit(numbers[k][b])
                    rounds[k][b].append(meas.mean)
    if memory:
        xb = with_batch(example_inputs, max(batch_sizes))
        xb = to_channels_last(xb) if channels_last else xb
        with threads_ctx(threads):
            peaks = {k: peak_forward_bytes(m, xb) for k, m in models.items()}
    timing = {k: {b: Timing.from_rounds(b, rounds[k][b], numbers[k][b]) for b in batch_sizes} for k in models}
    speed = {b: timing["baseline"][b].median_ms / timing["pruned"][b].median_ms for b in batch_sizes} \
        if baseline is not None else {}
    return BenchResult(threads=threads, batch_sizes=list(batch_sizes), pruned=timing["pruned"],
                       baseline=timing.get("baseline", {}), speedup=speed, peak_bytes=peaks,
                       memory_method="torch.profiler memory events (tensor bytes allocated during the forward)"
                       if memory else "not measured", torch_version=torch.__version__, repeats=repeats,
                       warmup=warmup, channels_last=channels_last, fold_bn=fold_bn)


def _deployed(model: nn.Module, example_inputs: Any, fold_bn: bool, channels_last: bool) -> nn.Module:
    """A copy of ``model``, BN-folded and/or in channels_last layout."""
    import copy

    from .fold import fold_batchnorm

    model = fold_batchnorm(model, example_inputs) if fold_bn else copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_channels_last(inputs: Any) -> Any:
    """4-D tensors of ``inputs`` (a tensor, tuple or mapping) in ``torch.channels_last`` layout."""
    def one(x: Any) -> Any:
        return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4 else x

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)

