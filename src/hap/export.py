"""``hap.export``: a pruned model as a file that runs without ``hap`` (ONNX or a ``torch.export`` program).

Pruning only pays off where the model is deployed, and deployment rarely has Python with ``hap`` in it.
Both formats trace the model into plain ATen/ONNX operators, so an implanted layer
(:class:`hap.ImplantedConv`) or a head-pruned encoder becomes ordinary convolutions, concatenations and
matrix products. The batch dimension is exported dynamic, and the written file is checked against
PyTorch at export time on *other* batch sizes than the one traced (1 and 3): a trace that silently
specialised on the example batch is caught here, not in production.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, default
since torch 2.9; it needs ``onnxscript``) and is checked with ``onnxruntime``. The legacy TorchScript
exporter also ran our models, but it is deprecated and warns that the BERT trace may not generalise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ._utils import call_model, eval_mode, first_line

__all__ = ["export", "FORMATS", "check_batches"]

FORMATS = ("onnx", "torch.export")
_SUFFIX = {"onnx": ".onnx", "torch.export": ".pt2"}
CHECK_BATCHES = (1, 3)


def _as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` the way :func:`hap._utils.call_model` calls the model (a mapping = keywords)."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _resize(x: Any, n: int, seed: int) -> Any:
    """``x`` with batch size ``n``: rows of the example cycled, floats perturbed so that rows differ.

    Distinct rows make a graph that mixes samples across the batch (a wrongly traced reshape) show up as
    a mismatch; integer inputs (token ids, masks) keep their values, which stay valid for the model.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    idx = torch.arange(n) % x.shape[0]
    y = x[idx].clone()
    if y.is_floating_point():
        g = torch.Generator().manual_seed(seed)
        y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    return y


def check_batches(example_inputs: Any, n: int, seed: int = 0) -> Any:
    """The example inputs at batch size ``n`` (every tensor leaf resized along dim 0)."""
    if isinstance(example_inputs, Mapping):
        return {k: _resize(v, n, seed) for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple | list):
        return type(example_inputs)(_resize(v, n, seed) for v in example_inputs)
    return _resize(example_inputs, n, seed)


def _dynamic_shapes(example_inputs: Any, batch: Any) -> Any:
    """The ``dynamic_shapes`` spec of ``torch.export``: dim 0 of every batched tensor input is ``batch``."""
    def one(v: Any) -> Any:
        return {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None

    if isinstance(example_inputs, Mapping):
        return {k: one(v) for k, v in example_inputs.items()}
    args, _ = _as_args(example_inputs)
    return tuple(one(v) for v in args)


def _flat(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, a tuple, a Hugging Face ``ModelOutput``) in order."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(want: list[torch.Tensor], got: list[Any], rtol: float, atol: float, n: int, fmt: str) -> None:
    if len(want) != len(got):
        raise ValueError(f"export check failed ({fmt}, batch {n}): {len(got)} outputs, PyTorch gives {len(want)}")
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"export check failed ({fmt}, batch {n}): output {i} has shape {tuple(g.shape)}, "
                             f"PyTorch gives {tuple(w.shape)}")
        if not torch.allclose(g.to(w.dtype), w, rtol=rtol, atol=atol):
            diff = (g.to(w.dtype) - w).abs().max().item()
            raise ValueError(f"export check failed ({fmt}, batch {n}): output {i} differs from PyTorch by up to "
                             f"{diff:.3g} (rtol={rtol:g}, atol={atol:g})")


def _write_onnx(model: nn.Module, example_inputs: Any, tmp: Path, dynamic_batch: bool) -> None:
    args, kwargs = _as_args(example_inputs)
    dyn = _dynamic_shapes(example_inputs, torch.export.Dim("batch", min=1)) if dynamic_batch else None
    # the exporter prints progress lines, warns about things checked below, and logs that torchvision's
    # operators are not registered (we use none of them)
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, args, str(tmp), kwargs=kwargs or None, dynamo=True, dynamic_shapes=dyn,
                              external_data=False, verbose=False)
        finally:
            log.setLevel(level)


def _run_onnx(path: Path, inputs: Any) -> list[Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args, kwargs = _as_args(inputs)
    tensors = [v for v in args if isinstance(v, torch.Tensor)] + [v for v in kwargs.values()
                                                                  if isinstance(v, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if kwargs and set(names) <= set(kwargs):
        feed = {k: kwargs[k].detach().cpu().numpy() for k in names}
    else:
        feed = {k: t.detach().cpu().numpy() for k, t in zip(names, tensors, strict=False)}
    return sess.run(None, feed)


def _write_program(model: nn.Module, example_inputs: Any, tmp: Path, dynamic_batch: bool) -> None:
    args, kwargs = _as_args(example_inputs)
    dyn = _dynamic_shapes(example_inputs, torch.export.Dim("batch", min=1)) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dyn)
    torch.export.save(ep, str(tmp))


def _run_program(path: Path, inputs: Any) -> list[torch.Tensor]:
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return _flat(call_model(module, inputs))


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Write ``model`` (in eval mode) as an ONNX file or a ``torch.export`` program, checked against PyTorch.

    Args:
        model: Any model :func:`hap.prune` returns (implants and pruned encoders included); its train/eval
            flags are restored afterwards. It runs on CPU for the check.
        example_inputs: One batch, as :func:`hap.sensitivity` takes it: a tensor (positional), a tuple, or
            a mapping of tensors (keyword arguments, e.g. ``input_ids`` / ``attention_mask``). A batch of 1
            is widened to 2 for tracing, so the batch dimension is not specialised away.
        path: The file to write (``.onnx`` / ``.pt2`` by convention); its folder is created.
        format: ``"onnx"`` or ``"torch.export"``.
        dynamic_batch: Export dim 0 of every input as a symbolic batch size (checked at batch 1 and 3).
            Without it only the example's batch size is valid, and only that one is checked.
        check: Run the written file (onnxruntime, or ``torch.export.load``) and compare with PyTorch.
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check.

    Returns:
        ``path``, written atomically: a temp name beside it is renamed only after the check passed, so a
        failed export never leaves a file that looks usable.

    Raises:
        ValueError: An unknown format, an export the tracer refuses, or outputs that differ from PyTorch's
            (one line, suggesting the other format where that may help).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    other = "torch.export" if format == "onnx" else "onnx"
    example = example_inputs
    if dynamic_batch:
        first = next((t for t in tree_leaves(_as_args(example_inputs)) if isinstance(t, torch.Tensor)), None)
        if first is not None and first.dim() > 0 and first.shape[0] == 1:
            example = check_batches(example_inputs, 2, seed=1)  # a batch of 1 would be specialised to 1
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=_SUFFIX[format], dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with eval_mode(model):
            try:
                (_write_onnx if format == "onnx" else _write_program)(model, example, tmp, dynamic_batch)
            except ImportError as e:
                raise ValueError(f"export failed: {first_line(e)} (pip install onnx onnxscript onnxruntime); "
                                 f"try --format {other}") from e
            except Exception as e:
                raise ValueError(f"export failed: {type(e).__name__}: {first_line(e)}; try --format {other}") from e
            if check:
                sizes = CHECK_BATCHES if dynamic_batch else (None,)
                for n in sizes:
                    inputs = example if n is None else check_batches(example_inputs, n, seed=n)
                    with torch.no_grad():
                        want = [t.detach().cpu() for t in _flat(call_model(model, inputs))]
                    try:
                        got = (_run_onnx if format == "onnx" else _run_program)(tmp, inputs)
                    except ImportError as e:
                        raise ValueError(f"export check failed: {first_line(e)} (pip install onnxruntime, or "
                                         "pass check=False)") from e
                    except Exception as e:
                        raise ValueError(f"export check failed: the written {format} file does not run at batch "
                                         f"{n}: {first_line(e)}; try --format {other}") from e
                    _compare(want, got, rtol, atol, n if n is not None else -1, format)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
