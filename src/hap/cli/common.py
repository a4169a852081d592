"""What every ``hap`` command shares: the user error, options generated from config dataclasses, the one
target parser, the one run-directory guard and commit, OS errors as one line, tables and JSON files; and
what the stage commands share between a zoo CNN's run and a text run (:mod:`hap.cli.vision`,
:mod:`hap.cli.text_runs`): the zoo options, ``--device``, a finished run's files, a model's NaN/inf check.

A run directory is *committed* by ``manifest.json`` (every output's SHA-256), written last
(:func:`commit_run`). A directory holding a checkpoint but no manifest is an *unfinished* run
(``--resume`` continues it); one holding neither is the leftover of a failed run and blocks nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import sys
import tempfile
import time
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["UserError", "parse_target", "check_run_dir", "clear_run_dir", "commit_run", "run_state",
           "os_error_line", "write_json", "print_table", "config_option", "get_path", "set_path", "offline",
           "MANIFEST", "THREADS_HELP", "verify_run", "ZOO_OPTIONS", "committed_files", "device_option",
           "nonfinite_tensor"]

MANIFEST = "manifest.json"  # written last: a run directory holding it is a finished run
_PENDING = ".commit-pending"  # exists only while a commit is being written
# the outputs a committed run may hold (train: config, best, metrics; prune: the rest too)
OUTPUT_FILES = ("config.json", "best.safetensors", "metrics.json", "sensitivity.json", "plan.json",
                "model.safetensors", "report.md", "sensitivity.png", "widths.png", "heads.png",
                "bench.json", "model.onnx", "model.pt2")  # the last three: written later by hap bench / export
CHECKPOINT_POINTERS = ("last.json", "finetune/last.json")  # an unfinished run can be resumed from these
# what a run directory may hold besides its outputs: checkpoints, and the files of older hap versions
RUN_FILES = (*OUTPUT_FILES, MANIFEST, _PENDING, "last.json", "last.safetensors", "last_optim.safetensors",
             "last_momentum.safetensors", "finetune/last.json", "finetune/last.safetensors",
             "finetune/best.safetensors", "finetune/last_optim.safetensors")


THREADS_HELP = ("torch CPU threads for the command (default: the cores other processes leave free, at most "
                "torch's default; a resumed training: the count it started with)")


class UserError(Exception):
    """An error caused by the command's input: printed as one line, exit code 2."""


def parse_target(text: str, kinds: Sequence[str]) -> dict[str, float]:
    """``KIND=F`` -> ``{KIND: F}``, validated by :class:`hap.Target`; ``kinds``: those these units allow."""
    from ..planning import Target

    kind, _, value = text.partition("=")
    kind = kind.strip()
    if kind not in kinds or not value:
        raise UserError(f"--target {text!r} must look like {' or '.join(f'{k}=0.5' for k in kinds)} "
                        "(the fraction removed)")
    try:
        v = float(value)
    except ValueError as e:
        raise UserError(f"--target {text!r}: {value!r} is not a number") from e
    try:
        return Target(**{kind: v}).to_dict()
    except ValueError as e:
        raise UserError(f"--target {text!r}: the fraction removed must be strictly between 0 and 1") from e


def _known(out: Path, p: Path) -> bool:
    """Whether ``p`` is something hap writes into a run directory (so a failed run's leftover)."""
    if p.name.startswith("."):  # temp files of atomic writes
        return True
    rel = p.relative_to(out).as_posix()
    if p.is_dir():
        if rel in ("checkpoints", "finetune/checkpoints", "base", "hf"):
            return True
        return rel == "finetune" and all(_known(out, q) for q in p.iterdir())
    return rel in RUN_FILES


def run_state(out: Path) -> str:
    """``"empty"``, ``"committed"`` (a finished run), ``"unfinished"`` (a checkpoint, no manifest),
    ``"failed"`` (only leftovers of hap's own files) or ``"foreign"`` (other files)."""
    if not out.exists():
        return "empty"
    if not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a directory: choose another --out")
    entries = list(out.iterdir())
    if not entries:
        return "empty"
    pending = (out / _PENDING).exists()
    if (out / MANIFEST).is_file() or ((out / "metrics.json").is_file() and not pending):  # older runs: metrics
        return "committed"
    if any((out / p).is_file() for p in CHECKPOINT_POINTERS):
        return "unfinished"
    return "failed" if all(_known(out, p) for p in entries) else "foreign"


def clear_run_dir(out: Path) -> None:
    """Remove an earlier run's outputs and checkpoints (never files hap did not write)."""
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "finetune/checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def check_run_dir(out: Path, resume: bool = False, overwrite: bool = False) -> str:
    """The one guard, before any compute: refuse to mix two runs, let a failed run be retried, and make
    sure ``out`` is writable (an OS error here costs nothing; after an hour of training it costs the hour).

    Returns:
        The state :func:`run_state` found.
    """
    state = run_state(out)
    if state == "committed" and not (resume or overwrite):
        raise UserError(f"'{out}' already holds a finished run: pass --overwrite to replace it or choose "
                        "another --out")
    if state == "unfinished" and not (resume or overwrite):
        raise UserError(f"'{out}' holds an unfinished run (a checkpoint, no {MANIFEST}): pass --resume to "
                        "continue it or --overwrite to start over")
    if state == "foreign" and not overwrite:
        raise UserError(f"'{out}' is not empty and holds no hap run: choose a new or empty --out")
    if state == "failed":
        _note(f"'{out}' holds only the leftovers of a failed run (no checkpoint, no {MANIFEST}): removing them")
        clear_run_dir(out)
    if resume and state in ("empty", "failed"):
        _note(f"nothing to resume in '{out}': starting from the beginning")
    out.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)
    os.close(fd)
    os.unlink(probe)
    return state


@contextmanager
def commit_run(out: Path, files: Sequence[str]) -> Iterator[None]:
    """Write a run's outputs inside the block, then ``manifest.json`` (their SHA-256) last.

    The old manifest goes first (a crash mid-commit leaves an uncommitted directory, which a retry
    may reuse), then outputs of an earlier run that this one does not write; ``files``: the outputs
    (names relative to ``out``) the block writes.
    """
    from ..train.checkpoint import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    (out / _PENDING).touch()
    (out / MANIFEST).unlink(missing_ok=True)
    for name in OUTPUT_FILES:
        if name not in files:
            (out / name).unlink(missing_ok=True)
    yield
    from .. import __version__

    sums = {f: sha256_file(out / f) for f in files if (out / f).is_file()}
    write_json(out / MANIFEST, {"files": sums, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "hap": __version__})
    (out / _PENDING).unlink(missing_ok=True)



def verify_run(run: Path, names: Sequence[str] | None = None) -> None:
    """Refuse a finished run whose files no longer match the checksums its manifest recorded.

    A plan edited by hand (kept and removed units traded at the same counts), weights copied over from
    another run or a file truncated after the run finished all still parse; only the manifest can tell.
    ``names``: the files about to be read (default: every file the manifest lists). A run without a
    manifest (unfinished, or written by an older hap) is not checked here.
    """
    from ..train.checkpoint import sha256_file

    path = run / MANIFEST
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text()).get("files", {})
    except (ValueError, AttributeError):
        raise UserError(f"'{path}' is not a valid manifest (corrupted): rerun the command that wrote '{run}'") from None
    for name in names if names is not None else list(files):
        digest = files.get(name)
        if digest is not None and (run / name).is_file() and sha256_file(run / name) != digest:
            raise UserError(f"'{run / name}' does not match its checksum in '{path}' (changed, truncated or "
                            f"corrupted after the run finished): restore it or rerun the command that wrote '{run}'")


def committed_files(run: Path) -> list[str]:
    """The files a finished run's manifest lists (a run of an older hap: the outputs it holds).

    Raises:
        UserError: ``run`` holds no finished run.
    """
    state = run_state(run)
    if state != "committed":
        raise UserError(f"'{run}' holds no finished run ({state}): give a directory written by 'hap prune'")
    if (run / MANIFEST).is_file():
        return list(json.loads((run / MANIFEST).read_text()).get("files", {}))
    return [f for f in OUTPUT_FILES if (run / f).is_file()]


# the options of a zoo model on image data, with their defaults (what a text run must not be given)
ZOO_OPTIONS = {"model": "resnet20", "checkpoint": None, "data": "fashion-mnist", "data_root": None, "subset": None}


def device_option(args: argparse.Namespace) -> torch.device:
    """``--device`` (``None``: :attr:`hap.pipeline.RunConfig.device`'s default), checked by its rule.

    Raises:
        UserError: A device spec the rule refuses.
    """
    from ..pipeline import RunConfig, device_problem, resolve_device

    spec = args.device if args.device is not None else RunConfig().device
    rule = device_problem(spec)
    if rule:
        raise UserError(f"--device {spec!r}: {rule}")
    return resolve_device(spec)


def nonfinite_tensor(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point tensor of ``model``'s state holding NaN/inf (``None``: none)."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose an --out on another disk",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EACCES: "permission denied: choose a directory you can write to",
    errno.EPERM: "permission denied: choose a directory you can write to",
    errno.ENOTDIR: "a parent of this path is a regular file, not a directory: choose another path",
    errno.EEXIST: "a file of that name is in the way: remove it or choose another path",
    errno.EISDIR: "a directory of that name is in the way: remove it or choose another path",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --out",
}


def os_error_line(e: OSError) -> str:
    """One line for an OS error: the path, what went wrong, and what to do about it."""
    where = f"'{e.filename}'" if e.filename else "a file"
    what = e.strerror or str(e)
    return f"cannot write {where}: {what}; {_OS_HINTS.get(e.errno or 0, 'check the path and try again')}"


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON, atomically: a NaN/inf (e.g. the split-half stability of a criterion that has
    none) is written as ``null``, because ``NaN`` is not JSON and other tools refuse the whole file."""
    from .._utils import atomic_write_text

    plain = _finite_or_null(json.loads(json.dumps(obj, default=_jsonable)))
    atomic_write_text(path, json.dumps(plain, indent=1, allow_nan=False))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def print_table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c == cols[0] else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    # a pipe or CI log has no width: use a wide one rather than truncating the layer names
    Console(width=None if sys.stdout.isatty() else 160).print(table)


# ------------------------------------------------------------------------------------------------
# options from config dataclasses


def _field_type(cls: type, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def get_path(cfg: Any, path: str) -> Any:
    """The (dotted) field ``path`` of ``cfg``; ``None`` below an unset nested config."""
    for part in path.split("."):
        if cfg is None:
            return None
        cfg = getattr(cfg, part)
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> Any:
    """``cfg`` with the (dotted) field ``path`` replaced; nested configs are replaced too."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: set_path(getattr(cfg, head), rest, value)})


def _owner(cfg: Any, path: str) -> tuple[type, str]:
    *parents, name = path.split(".")
    cls = type(cfg)
    for p in parents:
        cls = type(getattr(cfg, p)) if not dataclasses.is_dataclass(cls) else _field_type(cls, p)
    return cls, name


def config_option(p: argparse.ArgumentParser, flags: Sequence[str], path: str, defaults: Sequence[Any],
                  help: str, **kw: Any) -> None:
    """An option for the config field ``path`` (dotted, e.g. ``plan.allocation``) of the configs ``defaults``.

    Its type comes from the field's annotation, the default shown in ``--help`` from the config objects
    (one per unit family, e.g. channels and heads); the parsed default is ``None`` = "not given", so the
    config decides, and a ``--config`` file is overridden only by options actually given.
    """
    cls, name = _owner(defaults[0], path)
    typ = _field_type(cls, name)
    shown = list(dict.fromkeys(repr(get_path(d, path)) for d in defaults))
    text = f"{help} (default: {' / '.join(shown)})" if help else f"default: {' / '.join(shown)}"
    if typ is bool:
        p.add_argument(*flags, dest=path, action=argparse.BooleanOptionalAction, default=None, help=text, **kw)
    else:
        kw.setdefault("metavar", None if "choices" in kw else path.rsplit(".", 1)[-1].upper())
        p.add_argument(*flags, dest=path, type=kw.pop("type", typ), default=None, help=text, **kw)


@contextmanager
def offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` inside a command (hap never downloads), the caller's value restored after."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
