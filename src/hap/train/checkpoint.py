"""Weights and optimiser state on disk: safetensors (no pickle), written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = ["save_weights", "load_weights", "save_tensors", "optimizer_tensors", "load_optimizer_tensors"]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A dict of tensors to safetensors, atomically (temp name then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return path


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """``state_dict`` to safetensors, atomically."""
    return save_tensors(model.state_dict(), path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights (no pickle); shape or key mismatches are one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"'{path}' is not a readable safetensors file ({e})") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        if missing:
            detail = f"missing {missing[:3]}"
        elif unexpected:
            detail = f"unexpected {unexpected[:3]}"
        else:
            detail = f"shape of {wrong[:3]}"
        raise ValueError(f"'{path}' holds weights for another architecture ({detail}): check --model and --checkpoint")
    model.load_state_dict(state)
    return model


def optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """Every tensor of the optimiser's per-parameter state (momentum, Adam moments, step), by position."""
    out = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{i}.{k}"] = v
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter], path: Path) -> None:
    """Inverse of :func:`optimizer_tensors` (a missing file: fresh state)."""
    if not path.is_file():
        return
    for key, v in load_file(str(path)).items():
        i, _, k = key.partition(".")
        opt.state[params[int(i)]][k] = v
