"""Save and load pruned models as data: ``plan.json`` + ``model.safetensors``, no pickle.

A pruned architecture is not stored as a pickled module (which runs code on load and breaks with every
refactor of the class) but as the plan that produces it: :func:`load` replays the plan on a fresh base
model, then fills in the weights from a safetensors file, which holds nothing but named tensors. Both
files are written atomically (temp name in the same directory, then rename), so a crash or a refused
save never leaves a half-written or mixed pair.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ._utils import atomic_write_text, first_line, model_signature
from .planning.types import PruningPlan
from .surgery import prune

__all__ = ["save", "load", "PLAN_FILE", "WEIGHTS_FILE"]

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


def save(model: nn.Module, plan: PruningPlan, directory: str | os.PathLike[str]) -> Path:
    """Write ``plan.json`` and ``model.safetensors`` for a model pruned with ``plan`` (then maybe fine-tuned).

    Args:
        model: ``hap.prune(base, plan)``, possibly trained further (weights change, shapes do not).
        plan: The plan that produced it.
        directory: Created if missing; existing files of the same names are replaced only once both new
            files are complete.

    Returns:
        The directory.

    Raises:
        ValueError: ``model`` does not have the architecture ``plan`` produces; nothing is written.
    """
    sig = model_signature(model)
    if plan.pruned_signature is not None and sig != plan.pruned_signature:
        raise ValueError(
            f"this model is not the result of this plan (signature {sig}, plan gives {plan.pruned_signature}): "
            "save the model returned by hap.prune(base, plan)"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Copies, contiguous and unshared: safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_FILE}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "pruned_signature": sig, "plan_digest": plan.digest()})
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a saved model is as readable as any other output
        os.replace(tmp, d / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(d / PLAN_FILE, plan.to_json())
    return d


def load(directory: str | os.PathLike[str], base_model: nn.Module) -> nn.Module:
    """Rebuild a saved pruned model: replay ``plan.json`` on ``base_model``, then load the weights.

    Args:
        directory: Written by :func:`save`.
        base_model: A fresh instance of the unpruned architecture (its weights do not matter; it is
            not modified).

    Returns:
        The pruned model with the saved weights, in ``base_model``'s train/eval mode.

    Raises:
        FileNotFoundError: The directory, ``plan.json`` or ``model.safetensors`` is missing.
        ValueError: A file is corrupted or truncated, ``base_model`` is not the architecture the plan
            was made for, or the weights do not fit the replayed model.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no saved model at '{d}': write one with hap.save(model, plan, dir)")
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"'{d}' has no {WEIGHTS_FILE}: write it with hap.save(model, plan, dir)")
    plan = PruningPlan.load(d / PLAN_FILE)
    sig = model_signature(base_model)
    if sig != plan.model_signature:
        raise ValueError(
            f"base_model is not the architecture this plan was made for (signature {sig}, plan "
            f"{plan.model_signature}): pass a fresh instance of the original unpruned model"
        )
    try:
        tensors = load_file(weights)
        with safe_open(weights, framework="pt") as sf:
            meta = sf.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise ValueError(
            f"'{weights}' is not a readable safetensors file ({first_line(e)}): it is truncated or corrupted"
        ) from e
    model = prune(base_model, plan)
    want = meta.get("pruned_signature")
    got = model_signature(model)
    if want is not None and want != got:
        raise ValueError(
            f"'{weights}' holds weights of another architecture (signature {want}, the plan gives {got}): "
            "save the model and its plan together with hap.save"
        )
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    bad = sorted(k for k in set(state) & set(tensors) if tuple(state[k].shape) != tuple(tensors[k].shape))
    if missing or extra or bad:
        raise ValueError(
            f"'{weights}' does not fit the model the plan gives (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {bad[:3]}): save the model and its plan together with hap.save"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=True)
    return model
