"""What every ``hap`` command shares: the user error, options generated from config dataclasses, the one
target parser, the one run-directory guard, tables and JSON files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["UserError", "parse_target", "check_run_dir", "write_json", "print_table", "config_option",
           "get_path", "set_path", "offline"]

# what a run directory may hold from an earlier run: removed by --overwrite
RUN_FILES = ("last.json", "last.safetensors", "best.safetensors", "last_optim.safetensors",
             "last_momentum.safetensors", "metrics.json", "report.md", "finetune/last.json",
             "finetune/last.safetensors", "finetune/best.safetensors", "finetune/last_optim.safetensors")


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


def check_run_dir(out: Path, resume: bool = False, overwrite: bool = False, resume_file: str | None = None) -> None:
    """The one guard: a directory holding a run is refused unless ``--resume`` or ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise UserError(f"'{out}' already holds a run: pass --resume to continue it or --overwrite to start over")
    if resume and resume_file and not (out / resume_file).is_file():
        raise UserError(f"nothing to resume in '{out}' (no {resume_file}): drop --resume")


def clear_run_dir(out: Path) -> None:
    """Remove an earlier run's outputs (``--overwrite``): never leave old results beside new files."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_json(path: Path, obj: Any) -> None:
    from .._utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable))


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
