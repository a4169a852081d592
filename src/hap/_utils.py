"""Small helpers every stage shares: calling a model on its batch, eval mode, batches, loss checks,
thread counts, architecture signatures and atomic writes."""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` the way its batches say: a mapping is keyword arguments (Hugging Face style)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class eval_mode:
    """Context manager: BatchNorm and dropout in eval mode, every module's own flag restored after.

    The Hessian of a network in train mode mixes in batch statistics and dropout noise, neither of which
    exists at inference; eval mode makes the loss a deterministic function of the weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path`` (readers never see half).

    The file is made 0644: ``mkstemp`` creates 0600, and results nobody else on the machine can read are
    not what anyone expects of a report or a config.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def materialize_batches(batches: Iterable[Any], max_batches: int | None) -> list[tuple[Any, Any]]:
    """Take up to ``max_batches`` ``(inputs, targets)`` pairs, so the engine can revisit them.

    Raises:
        ValueError: The iterable is empty or yields something other than pairs.
    """
    out = []
    for i, b in enumerate(islice(iter(batches), max_batches)):
        if not isinstance(b, tuple | list) or len(b) != 2:
            raise ValueError(
                f"batch {i} is a {type(b).__name__}; batches must yield (inputs, targets) pairs"
            )
        out.append((b[0], b[1]))
    if not out:
        raise ValueError("batches is empty: give at least one (inputs, targets) batch")
    return out


def check_loss(loss: torch.Tensor, batch_index: int) -> None:
    if loss.dim() != 0:
        raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a scalar")
    if not torch.isfinite(loss).item():
        raise RuntimeError(
            f"the loss is {loss.item()} on batch {batch_index}: check the inputs for NaN/inf and that the "
            "model's weights are finite"
        )


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: error messages here stay one line long."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_signature(model: nn.Module) -> str:
    """Hash of parameter names and shapes: identifies an architecture (and width), not its weights."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# thread counts
#
# torch sizes its pool to the machine's cores. On a shared machine that oversubscribes: when another
# process keeps one of two cores busy, every parallel region waits for the thread that is not scheduled,
# and sensitivity or a fine-tune epoch ran 15-25x slower than with one thread (issue 15). hap's default is
# the cores this process may use minus those other processes keep busy right now, measured briefly.

_STAT = Path("/proc/stat")
_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 quota: "max 100000" or "200000 100000"
_CACHE_S = 5.0  # a measurement is reused this long: loops of small library calls must not pay for it each time
_cache: tuple[float, int, int] | None = None  # (time.monotonic(), cores, result)
_depth = 0  # hap ``threads`` contexts active: a nested call without its own count keeps the outer one


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = _CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _core_times() -> dict[int, tuple[int, int]]:
    """``{core: (busy ticks, total ticks)}`` from ``/proc/stat`` (idle and iowait are not busy)."""
    out = {}
    for line in _STAT.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def busy_cores(sample_s: float = 0.1) -> float:
    """How many of this process's cores *other* processes keep busy, in cores (0.0 .. available_cores()).

    ``/proc/stat`` is sampled over ``sample_s`` and this process's own CPU time over the same interval is
    subtracted (torch's pool may still be spinning from the last parallel region). Where ``/proc/stat``
    is missing, the one-minute load average stands in (it counts this process too).
    """
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mine = None
    try:
        a, s0 = _core_times(), _self_cpu_s()
        time.sleep(sample_s)
        b, s1 = _core_times(), _self_cpu_s()
    except (OSError, ValueError):
        try:
            return min(float(available_cores()), max(0.0, os.getloadavg()[0]))
        except (AttributeError, OSError):
            return 0.0
    busy = 0.0
    for core, (busy1, total1) in b.items():
        if (mine is None or core in mine) and core in a and total1 > a[core][1]:
            busy += (busy1 - a[core][0]) / (total1 - a[core][1])
    # the interval in core-seconds is what the ticks measured: subtract ours, in cores
    busy -= (s1 - s0) / max(sample_s, 1e-3)
    return min(float(available_cores()), max(0.0, busy))


def default_threads(limit: int | None = None) -> int:
    """hap's thread count when none is given: the cores available, minus those other processes keep busy.

    A core counts as busy from half a core of load up; at least 1, at most ``limit`` (default: torch's
    current setting, so ``OMP_NUM_THREADS`` or a caller's ``torch.set_num_threads`` is an upper bound and
    one thread stays one thread without measuring). The measurement is reused for a few seconds.
    """
    global _cache
    limit = torch.get_num_threads() if limit is None else limit
    if limit <= 1:
        return 1
    cores = available_cores()
    now = time.monotonic()
    if _cache is not None and now - _cache[0] < _CACHE_S and _cache[1] == cores:
        free = _cache[2]
    else:
        free = max(1, cores - math.floor(busy_cores() + 0.5))
        _cache = (now, cores, free)
    return max(1, min(limit, free))


class threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous value restored after.

    ``n=None`` is hap's default (:func:`default_threads`), except inside another ``threads`` context,
    whose count it keeps (the command or entry point that started the work chose it once). A library
    call that changes torch's thread pool must give it back: the caller's setting is process global state.
    """

    def __init__(self, n: int | None = None) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"threads={n!r}: give a positive integer, or None for hap's default")
        self.n = n
        self.old = 0

    def __enter__(self) -> int:
        global _depth
        self.old = torch.get_num_threads()
        n = self.n if self.n is not None else (self.old if _depth else default_threads(self.old))
        if n != self.old:
            torch.set_num_threads(n)
        _depth += 1
        return n

    def __exit__(self, *exc: object) -> None:
        global _depth
        _depth -= 1
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


F = TypeVar("F", bound=Callable[..., Any])


def uses_threads(fn: F) -> F:
    """Decorator of the library's heavy entry points: run ``fn`` under ``threads(threads=...)``.

    The function declares a keyword ``threads: int | None = None`` (so it shows in its signature and
    docs); the decorator applies it, so every entry point gets the same default and the same restore.
    """
    if "threads" not in inspect.signature(fn).parameters:
        raise TypeError(f"{fn.__qualname__} must declare a 'threads' keyword to use @uses_threads")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threads(kwargs.get("threads")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
