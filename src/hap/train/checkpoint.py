"""Weights and optimiser state on disk: safetensors (no pickle), written atomically.

A training checkpoint is several files (weights, optimiser state, the best weights so far) plus its
metadata, and a reader must never see a mix of two epochs: the files of one epoch are written into a
temporary directory beside the others, flushed to disk (fsync), and that directory is renamed into
place in one step; only then is the pointer ``last.json`` (epoch, history, config and each file's
SHA-256) replaced, itself by one rename. A kill at any moment leaves the pointer naming a complete set:
the old one or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = ["save_weights", "load_weights", "save_tensors", "optimizer_tensors", "load_optimizer_tensors",
           "Checkpoint", "write_checkpoint", "read_checkpoint", "resume_differences", "sha256_file",
           "POINTER", "CHECKPOINTS"]

POINTER = "last.json"  # names the current checkpoint set; replaced last, by one rename
CHECKPOINTS = "checkpoints"  # the sets: CHECKPOINTS/epoch-00003/{last,last_optim,best}.safetensors


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A dict of tensors to safetensors, atomically (temp name then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no half-written temp file behind
        raise
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


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file: what a manifest records so a truncated or swapped file is noticed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _write_pointer(path: Path, meta: Mapping[str, Any]) -> None:
    text = json.dumps(meta, indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


@dataclass
class Checkpoint:
    """One complete checkpoint set of a run directory (what ``last.json`` points to).

    Attributes:
        meta: ``last.json``: epoch, step, history, best validation accuracy, config, tag, file hashes.
        directory: The folder holding the set's files (the run directory itself for the old layout).
    """

    meta: dict[str, Any]
    directory: Path

    @property
    def weights(self) -> Path:
        return self.directory / "last.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.directory / "last_optim.safetensors"

    @property
    def best(self) -> Path:
        return self.directory / "best.safetensors"


def write_checkpoint(out: str | Path, tensors: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any]
                     ) -> Checkpoint:
    """Write one checkpoint set atomically: ``{file name: tensors}`` plus ``meta`` as the new ``last.json``.

    The files go into a temporary directory inside ``out/checkpoints`` and are fsynced; the directory is
    renamed into place, then the pointer is replaced, then older sets are deleted. A kill before the
    pointer's rename leaves the previous set current (an orphan directory is removed by the next write).
    """
    out = Path(out)
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{int(meta['epoch']):05d}-step-{int(meta['step']):09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    files: dict[str, str] = {}
    try:
        for fname, tens in tensors.items():
            path = tmp / fname
            save_file({k: v.detach().contiguous().cpu() for k, v in tens.items()}, str(path))
            _fsync(path)
            files[fname] = sha256_file(path)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are as readable as any other file
        _fsync(tmp)
        final = root / name
        if final.exists():  # an orphan from a kill between the rename and the pointer: never current
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    full = {**meta, "dir": f"{CHECKPOINTS}/{name}", "files": files}
    _write_pointer(out / POINTER, full)
    for d in root.iterdir():
        if d.name != name:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    return Checkpoint(full, final)


def read_checkpoint(out: str | Path, verify: bool = True) -> Checkpoint | None:
    """The current checkpoint of ``out`` (``None``: there is none), its files' checksums verified.

    Raises:
        ValueError: ``last.json`` is unreadable, or a file of the set is missing or does not match
            its recorded SHA-256 (truncated, corrupted or replaced).
    """
    out = Path(out)
    pointer = out / POINTER
    if not pointer.is_file():
        return None
    try:
        meta = json.loads(pointer.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{pointer}' is not valid JSON ({e}): the checkpoint is corrupted; start over "
                         "with --overwrite") from e
    if not isinstance(meta, dict) or "epoch" not in meta:
        raise ValueError(f"'{pointer}' is not a checkpoint record: start over with --overwrite")
    if "dir" not in meta:  # the layout before checkpoint sets: files beside last.json
        return Checkpoint(meta, out)
    ck = Checkpoint(meta, out / meta["dir"])
    for fname, digest in (meta.get("files") or {}).items():
        path = ck.directory / fname
        if not path.is_file():
            raise ValueError(f"checkpoint file '{path}' is missing: start over with --overwrite")
        if verify and sha256_file(path) != digest:
            raise ValueError(f"checkpoint file '{path}' does not match its checksum in '{pointer}' (truncated or "
                             "corrupted): start over with --overwrite")
    return ck


def resume_differences(meta: Mapping[str, Any], config: Mapping[str, Any],
                       tag: Mapping[str, Any] | None = None) -> list[str]:
    """``"name: before -> now"`` for every option that differs between a checkpoint and this call.

    A resumed run must follow the trajectory it started on; a changed option (learning rate, batch size,
    epochs, model, data) would silently mix two runs, or fail much later blaming the wrong file.
    """
    out = []
    old = dict(meta.get("config") or {})
    for k in sorted(set(old) | set(config)):
        if k != "version" and old.get(k) != config.get(k):
            out.append(f"{k}: {old.get(k)!r} -> {config.get(k)!r}")
    if "tag" not in meta:  # a checkpoint written without a tag (library use): nothing else to compare
        return out
    old_tag = dict(meta.get("tag") or {})
    for k in sorted(set(old_tag) | set(tag or {})):
        if old_tag.get(k) != (tag or {}).get(k):
            out.append(f"{k}: {old_tag.get(k)!r} -> {(tag or {}).get(k)!r}")
    return out
