"""The few collective operations hap needs on ``torch.distributed``, and a collective error protocol.

When a process group is initialised, every rank runs the same hap call on its own shard of the data and
the per-unit sums are added across ranks, so every rank ends with the same result. Without a process
group every helper here is the identity (sums of one rank), so library code calls them unconditionally.

The hazard of collectives is the hang: a rank that raises between two collectives leaves the others
blocked in the next one. Every sum here is therefore preceded by an exchange of one error flag per rank
(:func:`check_peers`), and :func:`collective_errors` wraps each public entry point so that a rank that
raises announces it in that exchange before re-raising: the others raise :class:`PeerError` naming the
failed rank and its message instead of waiting. A rank that dies outright (killed, segfault) is caught
only by the process group's timeout, which :func:`init_from_env` sets.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "PeerError",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "init_from_env",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
    "check_peers",
    "collective_errors",
    "collective",
    "on_main",
    "barrier",
    "DEFAULT_TIMEOUT_S",
    "shard_batch",
    "GlobalBatchShard",
    "loader_shard",
    "data_parallel",
    "any_rank",
    "broadcast_buffers",
    "shard_batches",
    "rank0_outputs",
]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class PeerError(RuntimeError):
    """Another rank raised: this one stops too instead of waiting for it."""


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints and writes files."""
    return rank() == 0


def _device() -> torch.device:
    """Where collective tensors live: NCCL needs them on this rank's GPU, gloo on the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout_s: float | None = None) -> bool:
    """Initialise the process group from ``torchrun``'s environment when ``WORLD_SIZE > 1``.

    NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), gloo otherwise. The timeout
    (``HAP_DIST_TIMEOUT`` seconds, default 1800) bounds how long a rank waits for a dead peer.

    Returns:
        Whether this process is now part of a multi-rank group (False for a single process).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return is_distributed()
    timeout = float(os.environ.get("HAP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def check_peers(error: BaseException | None = None) -> None:
    """Exchange one error flag per rank; raise :class:`PeerError` if another rank failed.

    Every rank must call this at the same points (each sum below does); a failing rank calls it with its
    exception (through :func:`collective_errors`) and then re-raises its own error.
    """
    if not is_distributed():
        return
    flags = torch.zeros(world_size(), dtype=torch.float64, device=_device())
    if error is not None:
        flags[rank()] = 1.0
    dist.all_reduce(flags)
    failed = [int(r) for r in torch.nonzero(flags.cpu()).flatten()]
    if not failed:
        return
    message = None if error is None else f"{type(error).__name__}: {_first_line(error)}"
    messages: list[Any] = [None] * world_size()
    dist.all_gather_object(messages, message)
    if error is None:
        first = failed[0]
        raise PeerError(f"rank {first} of {world_size()} failed ({messages[first]}); rank {rank()} stops too")


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Around a collective computation: a raise on any rank becomes an error on every rank, not a hang.

    On success, one last flag exchange catches a rank that failed after the last sum. Nested uses
    announce an error once.
    """
    try:
        yield
        check_peers()
    except PeerError:
        raise
    except BaseException as e:
        if is_distributed() and not getattr(e, "_hap_announced", False):
            with contextlib.suppress(Exception):
                e._hap_announced = True  # type: ignore[attr-defined]
            check_peers(e)
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def collective(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run ``fn`` under :func:`collective_errors`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with collective_errors():
            return fn(*args, **kwargs)

    return wrapper


def _reduce(x: Any, op: Any) -> Any:
    if not is_distributed():
        return x
    check_peers()
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_device(), copy=True)
        dist.all_reduce(t, op=op)
        return t.to(x.device)
    if isinstance(x, np.ndarray | float | int | np.generic):
        arr = np.asarray(x, dtype=np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(_device())
        dist.all_reduce(t, op=op)
        out = t.cpu().numpy()
        if isinstance(x, np.ndarray):
            return out
        return type(x)(out.item()) if isinstance(x, float | int) else out.item()
    raise TypeError(f"cannot all-reduce a {type(x).__name__}: pass a tensor, an array or a number")


def all_reduce_sum(x: T) -> T:
    """Sum of ``x`` over ranks (a tensor, a numpy array in float64, or a number); ``x`` itself unchanged."""
    return _reduce(x, dist.ReduceOp.SUM if dist.is_available() else None)


def all_reduce_max(x: T) -> T:
    """Maximum of ``x`` over ranks (e.g. a stop flag: stop when any rank says so)."""
    return _reduce(x, dist.ReduceOp.MAX if dist.is_available() else None)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled)."""
    if not is_distributed():
        return obj
    check_peers()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (with the error exchange, so a failed rank releases the others)."""
    check_peers()


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` (e.g. a file write) on rank 0 only; the other ranks wait for it and learn if it failed.

    Returns:
        ``fn()`` on rank 0, ``None`` elsewhere.
    """
    out = None
    if not is_distributed():
        return fn()
    with collective_errors():
        if is_main():
            out = fn()
    return out


@dataclass(frozen=True)
class GlobalBatchShard:
    """Which rows of every global batch one rank loads, and the factor its mean loss is scaled by.

    Every rank draws the *same* global batches (same seed, same order and the same augmentation draws as
    one process) and keeps rows ``[n r / W, n (r + 1) / W)`` of each: the union of the ranks' rows is the
    batch one process would train on, so a step of ``W`` ranks is that process's step.

    A loader that knows its shard (``hap.data``'s :class:`~hap.data.BatchLoader`, :class:`hap.text.TextLoader`
    and the causal-LM loader) applies it to the *indices* of each global batch before loading anything, so
    a rank indexes, augments and tokenizes only its own ``n / W`` rows: data loading costs ``1 / W`` of one
    process's, as the forward and backward passes do. (Loading the whole global batch on every rank and
    slicing it, :func:`shard_batch`, is the fallback for loaders that do not shard themselves; it keeps the
    same semantics at ``W`` times the loading cost, which becomes the bottleneck for tokenization and
    augmentation once ``W`` GPUs share the compute.) Such a loader exposes the shard as its ``shard``
    attribute and the size of global batch ``b`` as ``global_batch_rows(b)`` (:func:`loader_shard`).

    ``DistributedDataParallel`` averages gradients over ranks, so rank ``r``'s mean loss is scaled by
    :meth:`weight` ``= W n_r / n``: the average of the scaled gradients is the gradient of the global mean
    even when ``n`` is not a multiple of ``W``. That holds for a loss that is a mean over rows; a task whose
    loss averages something else replaces the factor (:meth:`hap.train.Task.loss_weight`: a causal LM's
    mean over predicted tokens takes ``W t_r / T``, its tokens' share, since padded rows differ in length).

    Attributes:
        rank: This rank (0 for one process).
        world: Number of ranks (1 for one process).
    """

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world - 1}: give 0 <= rank < world")

    @classmethod
    def current(cls) -> GlobalBatchShard:
        """This process's shard: its rank of the initialised process group (rank 0 of 1 without one)."""
        if _FAKE_SHARD is not None:
            return _FAKE_SHARD
        return cls(rank(), world_size())

    @property
    def whole(self) -> bool:
        """Whether this shard is every row (one process): loaders then load exactly as without sharding."""
        return self.world == 1

    def bounds(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of a global batch of ``n`` rows that this rank keeps (contiguous, sizes within 1)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def load_bounds(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` this rank loads: :meth:`bounds`, except that a rank whose share is empty (a
        short last batch of fewer than ``W`` rows) loads the batch's last row as a stand-in of
        :meth:`weight` 0. Under ``DistributedDataParallel`` every rank must run a forward and a backward
        each step (the gradient all-reduce waits for all), and an empty batch has no mean loss."""
        lo, hi = self.bounds(n)
        return (lo, hi) if hi > lo or n == 0 else (n - 1, n)

    def rows(self, index: T) -> T:
        """This rank's part of a global batch's row indices (a tensor, list or range; sliced, not copied),
        as :meth:`load_bounds` says."""
        lo, hi = self.load_bounds(len(index))  # type: ignore[arg-type]
        return index[lo:hi]  # type: ignore[index]

    def weight(self, n: int) -> float:
        """The factor this rank's mean loss is scaled by for a global batch of ``n`` rows: ``W n_r / n``
        (0 for a stand-in row, :meth:`load_bounds`)."""
        lo, hi = self.bounds(n)
        return self.world * (hi - lo) / max(n, 1)


_FAKE_SHARD: GlobalBatchShard | None = None  # tests only (_as_shard): a rank's loaders without processes


@contextlib.contextmanager
def _as_shard(rank_: int, world: int) -> Iterator[GlobalBatchShard]:
    """Private test hook: loaders built inside the block shard as rank ``rank_`` of ``world`` would, with
    no process group (the collectives are untouched: only :meth:`GlobalBatchShard.current` changes)."""
    global _FAKE_SHARD
    saved, _FAKE_SHARD = _FAKE_SHARD, GlobalBatchShard(rank_, world)
    try:
        yield _FAKE_SHARD
    finally:
        _FAKE_SHARD = saved


def loader_shard(batches: Any) -> GlobalBatchShard | None:
    """The shard a loader already applies to its batches (its ``shard`` attribute), or ``None``: a loader
    that yields whole global batches (then :func:`shard_batch` cuts each one) or one without a process group."""
    shard = getattr(batches, "shard", None)
    return shard if isinstance(shard, GlobalBatchShard) and not shard.whole else None


def shard_batch(inputs: Any, targets: torch.Tensor) -> tuple[Any, torch.Tensor, float]:
    """This rank's contiguous share of one global batch, and the factor its mean loss is scaled by.

    The fallback for loaders that do not shard themselves (a user's :class:`hap.train.Task` subclass):
    every rank loads the same whole global batch and keeps rows ``[n r / W, n (r + 1) / W)`` of it, with
    loss weight ``W n_r / n`` (see :class:`GlobalBatchShard`, which hap's own loaders apply before loading,
    so that loading is split across ranks as the compute is).

    Returns:
        ``(inputs, targets, weight)``; the batch itself and weight 1 without a process group. A rank whose
        share is empty gets the batch's last row with weight 0 (:meth:`GlobalBatchShard.load_bounds`).
    """
    shard = GlobalBatchShard.current()
    if shard.whole:
        return inputs, targets, 1.0
    n = len(targets)
    lo, hi = shard.load_bounds(n)

    def cut(v: Any) -> Any:
        return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    if isinstance(inputs, dict):
        inputs = {k: cut(v) for k, v in inputs.items()}
    elif isinstance(inputs, tuple | list):
        inputs = type(inputs)(cut(v) for v in inputs)
    else:
        inputs = cut(inputs)
    return inputs, targets[lo:hi], shard.weight(n)


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` under a process group (itself otherwise).

    The wrapper broadcasts rank 0's weights and buffers, so every rank starts from the same model, and
    averages gradients in backward. BatchNorm layers keep per-rank batch statistics (as plain DDP does):
    equal to one process only for models without BatchNorm in train mode.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a decision every rank takes together)."""
    return bool(all_reduce_max(float(flag))) if is_distributed() else flag


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, in place."""
    if not is_distributed():
        return
    check_peers()
    for b in model.buffers():
        t = b.detach().to(_device())
        dist.broadcast(t, src=src)
        if t.data_ptr() != b.data_ptr():
            b.copy_(t)


def shard_batches(batches: Iterable[T], limit: int | None = None) -> list[T]:
    """This rank's batches of a stream every rank iterates the same way: batches ``r, r + W, ...`` of the
    first ``limit`` (all ranks together use the batches one process would). The stream itself without a
    process group (up to ``limit``)."""
    it = batches if limit is None else itertools.islice(batches, limit)
    if not is_distributed():
        return list(it)
    w, r = world_size(), rank()
    return [b for i, b in enumerate(it) if i % w == r]


@contextlib.contextmanager
def rank0_outputs(out: str | None) -> Iterator[str | None]:
    """For a command line run under ``torchrun``: rank 0 keeps ``out`` and the terminal; every other rank
    runs the same command with its standard output discarded and its outputs going to a private scratch
    path (removed afterwards), so only rank 0 prints tables and writes the run directory, and the command
    itself needs no rank checks. Yields the path the command should write to.

    A resumed run reads the run directory on rank 0 only, which hands the others what it found (the
    checkpoint through :func:`hap.train.train`, ``sensitivity.json`` through ``hap prune``): a scratch path
    holds nothing to resume, and the other ranks must take the same branch (skip or compute the scoring
    and its collectives) as rank 0. Nothing a non-main rank writes reaches ``out``."""
    if not is_distributed() or is_main():
        yield out
        return
    import shutil
    import sys
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"hap-rank{rank()}-")
    saved = sys.stdout
    try:
        with open(os.devnull, "w") as devnull:
            sys.stdout = devnull
            yield None if out is None else os.path.join(scratch, os.path.basename(os.path.normpath(out)) or "out")
    finally:
        sys.stdout = saved
        shutil.rmtree(scratch, ignore_errors=True)
