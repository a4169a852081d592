"""How repair maps a pruned model onto the original (kept rows per layer) and drives both models' forward
passes (lockstep worker threads or restarted forwards) so each layer's problem is collected in one pass."""

from __future__ import annotations

import queue
import resource
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._utils import call_model, eval_mode, first_line, model_device
from ..implant import ImplantedConv
from ..units import channel_groups, family_for_kind
from ..units._sliced import is_conv1d
from .lsq import _CONVS

# ----------------------------------------------------------------------------------------------------
# small helpers




def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for v in inputs.values() for t in _tensors(v)]
    if isinstance(inputs, tuple | list):
        return [t for v in inputs for t in _tensors(v)]
    return []






def _rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if r > 2**40 else r / 1024


def _current_rss_mb() -> float | None:
    """Resident memory now (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / 2**20


class _RssSampler:
    """The largest resident memory seen while the block runs, sampled every ``interval`` seconds.

    ``ru_maxrss`` is the peak of the process's whole life: a second repair in the same process usually
    stays under the first one's peak and would report no growth at all. Sampling the current resident
    size gives the growth of *this* call (a sampling lower bound, missing spikes shorter than the interval).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = _current_rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = _current_rss_mb()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __enter__(self) -> _RssSampler:
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        now = _current_rss_mb()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def growth_mb(self) -> float | None:
        return None if self.start is None or self.peak is None else max(0.0, self.peak - self.start)


# ----------------------------------------------------------------------------------------------------
# layers as matrix problems


# ----------------------------------------------------------------------------------------------------
# which layers, which original rows


@dataclass
class _Layer:
    name: str  # in the pruned model
    module: nn.Module
    source: str  # in the original
    rows: torch.Tensor | None  # original output channels reproduced (None: all, in order)


def _candidates(small: nn.Module) -> tuple[dict[str, tuple[nn.Module, str, str]], dict[str, str]]:
    """``{name: (module, source name, role)}`` of repairable layers, and ``{name: reason}`` of skipped ones.

    ``role`` is ``"plain"``, ``"kept"`` or ``"implant"`` (the two halves of an ImplantedConv).
    """


    out: dict[str, tuple[nn.Module, str, str]] = {}
    skipped: dict[str, str] = {}
    implanted: dict[str, ImplantedConv] = {n: m for n, m in small.named_modules() if isinstance(m, ImplantedConv)}
    for name, m in small.named_modules():
        if not (isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) or is_conv1d(m)):
            continue
        parent, _, leaf = name.rpartition(".")
        owner = next((p for p in implanted if name.startswith(p + ".implant.")), None)
        if owner is not None:
            skipped[name] = "part of a low-rank implant (a product of two convs is not one least-squares problem)"
            continue
        if isinstance(m, nn.Conv3d):
            skipped[name] = "3-d convolutions are not implemented"
            continue
        if m.weight.shape[0] == 0 or m.weight[0].numel() == 0:
            skipped[name] = "no outputs or no inputs (e.g. a layer that lost every head)"
            continue
        if parent in implanted and leaf in ("kept", "implant"):
            out[name] = (m, parent, leaf)
        else:
            out[name] = (m, name, "plain")
    return out, skipped


def _out_dim(m: nn.Module) -> int:
    """The weight dim that indexes a layer's outputs: 0, or 1 for GPT-2's Conv1D (weight ``(in, out)``)."""
    return 1 if is_conv1d(m) else 0


def _unit_rows(unit: Any, layers: Mapping[str, int] | set[str]) -> dict[str, set[int]]:
    """Original output rows of each conv/linear layer in ``layers`` (``{name: output dim}``) that ``unit`` owns."""
    rows: dict[str, set[int]] = {}
    for s in unit.slices:
        if s.role != "out" or not s.param.endswith(".weight"):
            continue
        layer = s.param[: -len(".weight")]
        out_dim = layers.get(layer, 0) if isinstance(layers, Mapping) else 0
        if layer in layers and s.dim == out_dim:
            rows.setdefault(layer, set()).update(int(i) for i in s.indices)
    return rows


def _plan_rows(original: nn.Module, plan: Any) -> tuple[dict[str, set[int]], dict[str, tuple[list[int], list[int]]]]:
    """From a plan: original rows each layer lost, and (kept rows, implanted rows) of implanted roots."""


    layers = {n: _out_dim(m) for n, m in original.named_modules()
              if isinstance(m, (nn.Linear, *_CONVS)) or is_conv1d(m)}
    removed: dict[str, set[int]] = {}
    implants: dict[str, tuple[list[int], list[int]]] = {}
    channel = [g for g in plan.groups if getattr(g, "kind", "channel") == "channel" and (g.removed or g.implanted)]
    # heads, neurons, ...: families whose units list their own rows (no traced graph needed)
    others = [g for g in plan.groups if getattr(g, "kind", "channel") != "channel" and g.removed]
    if channel:
        p = next(original.parameters(), None)
        with eval_mode(original):
            groups = {g.name: g for g in channel_groups(original, plan.example_inputs(None if p is None else p.device))}
        for g in channel:
            cg = groups.get(g.name)
            if cg is None or cg.size != g.size:
                raise ValueError(
                    f"the plan's group '{g.name}' is not a channel group of {g.size} channels of the original: "
                    "pass the original the plan was made on"
                )
            for i in g.removed:
                for layer, r in _unit_rows(cg.units[i], layers).items():
                    removed.setdefault(layer, set()).update(r)
            if g.implanted:
                kept = sorted(r for i in g.kept for r in _unit_rows(cg.units[i], layers).get(g.name, ()))
                imp = sorted(r for i in g.implanted for r in _unit_rows(cg.units[i], layers).get(g.name, ()))
                implants[g.name] = (kept, imp)
    if others:
        p = next(original.parameters(), None)
        example = plan.example_inputs(None if p is None else p.device)
        units = {(u.group, u.index): u
                 for kind in dict.fromkeys(g.kind for g in others)
                 for u in family_for_kind(kind).discover(original, example)}
        for g in others:
            for i in g.removed:
                u = units.get((g.name, i))
                if u is None:
                    raise ValueError(
                        f"the plan removes {g.kind} {i} of '{g.name}' that the original does not have: "
                        "pass the original the plan was made on"
                    )
                for layer, r in _unit_rows(u, layers).items():
                    removed.setdefault(layer, set()).update(r)
    return removed, implants


def _resolve(small: nn.Module, original: nn.Module, plan: Any) -> tuple[dict[str, _Layer], dict[str, str]]:
    cands, skipped = _candidates(small)
    named_o = dict(original.named_modules())
    for name, (m, source, role) in cands.items():  # names first: the clearest message for a wrong original
        om = named_o.get(source)
        if om is None:
            raise ValueError(
                f"layer '{name}' of the pruned model has no layer '{source}' in the original: pass as original "
                "the model it was pruned from (small = hap.prune(original, plan)), whose module names it keeps"
            )
        if not (isinstance(om, (nn.Linear, *_CONVS)) or is_conv1d(om)) or (type(om) is not type(m) and role == "plain"):
            raise ValueError(
                f"layer '{name}' of the pruned model is a {type(m).__name__} but '{source}' of the original is a "
                f"{type(om).__name__}: pass as original the model it was pruned from"
            )
    removed, implants = _plan_rows(original, plan) if plan is not None else ({}, {})
    layers: dict[str, _Layer] = {}
    for name, (m, source, role) in cands.items():
        om = named_o[source]
        n_out = om.weight.shape[_out_dim(om)]
        if role == "plain":
            lost = removed.get(source, set())
            keep = [r for r in range(n_out) if r not in lost]
        elif source in implants:
            keep = implants[source][0 if role == "kept" else 1]
        else:
            keep = []
        if len(keep) != m.weight.shape[_out_dim(m)]:
            if plan is None:
                why = "pass plan= (the plan hap.prune used) so repair knows which of its outputs survived"
            else:
                why = "pass the plan hap.prune made this model with"
            raise ValueError(
                f"layer '{name}' has {m.weight.shape[_out_dim(m)]} output channels but {len(keep)} of the original's "
                f"'{source}' ({n_out}) are accounted for: {why}"
            )
        rows = None if keep == list(range(n_out)) else torch.tensor(keep, dtype=torch.long)
        layers[name] = _Layer(name, m, source, rows)
    return layers, skipped


# ----------------------------------------------------------------------------------------------------
# running the models


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (restart strategy, or aborting a worker)."""


_local = threading.local()


class _Worker:
    """One forward pass of ``model`` on ``inputs`` in a thread that pauses at chosen layers' hooks.

    Strict hand-over with the main thread: :meth:`step` lets the worker run until it posts (a pause, the
    end, an error) and blocks meanwhile, so exactly one of the two threads computes at a time.
    """

    def __init__(self, model: nn.Module, inputs: Any, pause_at: set[str]) -> None:
        self.model = model
        self.inputs = inputs
        self.pause_at = pause_at
        self.seen: set[str] = set()
        self.go = threading.Semaphore(0)
        self.box: queue.SimpleQueue[tuple[str, str | None, Any]] = queue.SimpleQueue()
        self.abort = False
        self.finished = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="hap-repair")
        self.thread.start()

    def _run(self) -> None:
        self.go.acquire()
        _local.worker = self
        try:
            if self.abort:
                raise _Stop
            with torch.no_grad():
                call_model(self.model, self.inputs)
            self.box.put(("done", None, None))
        except _Stop:
            self.box.put(("stopped", None, None))
        except BaseException as e:  # handed to the main thread, which re-raises
            self.box.put(("error", None, e))

    def pause(self, name: str, tensor: torch.Tensor) -> None:
        """Called from a hook in this worker's thread."""
        if name not in self.pause_at or name in self.seen:
            return
        self.seen.add(name)
        self.box.put(("at", name, tensor))
        self.go.acquire()
        if self.abort:
            raise _Stop

    def step(self) -> tuple[str, str | None, Any]:
        """Run until the next pause; returns ``("at", layer, tensor)``, ``("done"|"stopped"|"error", ...)``."""
        self.go.release()
        msg = self.box.get()
        if msg[0] != "at":
            self.finished = True
        return msg

    def close(self) -> None:
        if not self.finished:
            self.abort = True
            self.go.release()
            self.box.get()
            self.finished = True
        self.thread.join(timeout=10)


def _pre_hook(name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        w = getattr(_local, "worker", None)
        if w is not None:
            w.pause(name, args[0])

    return hook


def _post_hook(name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        w = getattr(_local, "worker", None)
        if w is not None:
            w.pause(name, output)

    return hook


def _capture(model: nn.Module, inputs: Any, module: nn.Module, output: bool) -> torch.Tensor:
    """The input (``output=False``) or output of ``module``'s first call, the forward stopped right there."""
    got: list[torch.Tensor] = []

    def pre(_: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0])
        raise _Stop

    def post(_: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        got.append(out)
        raise _Stop

    h = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise ValueError("the forward pass did not reach the layer being repaired on every batch")
    return got[0]


def _order(small: nn.Module, layers: Mapping[str, _Layer], original: nn.Module, first: Any) -> list[str]:
    """Names of ``layers`` in the order the pruned model's forward reaches them (first calls)."""
    seen: list[str] = []
    hooks = []
    for name, lay in layers.items():
        def note(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in seen:
                seen.append(name)

        hooks.append(lay.module.register_forward_pre_hook(note))
    try:
        for model, what in ((small, "pruned"), (original, "original")):
            try:
                with torch.no_grad():
                    call_model(model, _to(first, model_device(model)))
            except Exception as e:
                raise ValueError(
                    f"the calibration batches do not fit the {what} model ({type(e).__name__}: {first_line(e)}): "
                    "pass what its forward takes, e.g. (inputs, labels) pairs of training data"
                ) from e
    finally:
        for h in hooks:
            h.remove()
    return seen


def _batch_inputs(batches: Iterable[Any], max_batches: int | None) -> list[Any]:
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    out = []
    for b in batches:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(b[0] if isinstance(b, tuple | list) and len(b) == 2 else b)
    if not out:
        raise ValueError("batches is empty: repair needs calibration batches, e.g. a few hundred training examples")
    for i, x in enumerate(out):
        ts = _tensors(x)
        if not ts:
            raise ValueError(f"calibration batch {i} holds no tensor: pass (inputs, labels) pairs or input tensors")
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in ts):
            raise ValueError(f"calibration batch {i} contains NaN or inf: clean the calibration data")
    return out


def _mask(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, Mapping):
        m = inputs.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m
    return None


def _examples(inputs: Any) -> int:
    ts = _tensors(inputs)
    return int(ts[0].shape[0]) if ts and ts[0].dim() > 0 else 1


# ----------------------------------------------------------------------------------------------------
# the entry point


