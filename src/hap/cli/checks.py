"""Every option of a run checked before any compute: a typo must cost a second, not a sensitivity pass.

The rules are the library's, stated once in the config dataclasses (:meth:`hap.config.Config.problems`:
:class:`hap.config.PlanConfig`, :class:`hap.config.SensitivityConfig`, :class:`hap.train.TrainConfig` with
its task's rules, :class:`hap.pipeline.RunConfig`), which :func:`hap.plan`, :func:`hap.sensitivity`,
:func:`hap.train.train` and :func:`hap.pipeline.run` raise before they compute. This module only says
them in the command line's words: the flag a field is set by, on one line, before the data is read.
"""

from __future__ import annotations

from typing import Any

from ..config import Config, Problem
from .common import UserError

__all__ = ["validate_run_config", "validate_config", "validate_train_config", "problem_line", "TRAIN_FLAGS"]

# fields set by flags that are not in hap.cli.prune.RUN_OPTIONS (those come with the table passed in)
_EXTRA_FLAGS = {"plan.implant": "--implant", "target": "--target", "sensitivity.method": "--method",
                "finetune.batch_size": "--finetune-batch-size", "dense.batch_size": "--batch-size",
                "units": "--units"}


# ``hap train`` / ``hap finetune``: their options set TrainConfig fields directly (``--lr`` is ``lr``; hap prune's
# ``--finetune-lr`` is ``finetune.lr``), so the fields are named by these flags rather than by the table
TRAIN_FLAGS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "memory_format": "--memory-format",
               "seed": "--seed"}


def _run_flags(options: Any) -> dict[str, str]:
    return {path: flags[0] for flags, path, _, _ in options} | _EXTRA_FLAGS


def problem_line(p: Problem, flags: dict[str, str]) -> str:
    """``--FLAG VALUE: RULE`` (a field no flag sets, e.g. from a ``--config`` file: its dotted name)."""
    shown = repr(p.value) if isinstance(p.value, str) or p.value is None else str(p.value)
    return f"{flags.get(p.field, p.field)} {shown}: {p.rule}"


def validate_config(cfg: Config, flags: dict[str, str]) -> None:
    """Raise one :class:`UserError` naming every problem of ``cfg`` by its flag (``flags``: field -> flag).

    Raises:
        UserError: An option is out of range or unknown.
    """
    _raise(cfg.problems(), flags)


def _raise(found: list[Problem], flags: dict[str, str]) -> None:
    if found:
        raise UserError("; ".join(problem_line(p, flags) for p in found))


def validate_train_config(cfg: Any, task: Any, flags: dict[str, str] = TRAIN_FLAGS) -> None:
    """Raise one :class:`UserError` naming every problem of the training options given, by their flags.

    ``cfg``: a :class:`hap.train.TrainConfig` as the command line set it (fields not given are ``None``, the
    task's defaults, and not checked); ``task``: the :class:`hap.train.Task` it trains, whose
    :meth:`~hap.train.Task.problems` adds its own rules (its schedules). Checked before the data is read, so
    ``--lr -1`` costs a second, not a data load and a failed optimiser.

    Raises:
        UserError: An option is out of range; the message names the flag (``--lr -1.0: must be > 0``).
    """
    _raise(task.problems(cfg), flags)


def validate_run_config(cfg: Any, options: Any) -> None:
    """Raise one :class:`UserError` listing what is wrong with ``cfg`` (a RunConfig); nothing is computed.

    ``options``: ``hap prune``'s option table (``RUN_OPTIONS``: flags, field, help, argparse keywords), passed
    in by the command so this module does not import it back.

    Raises:
        UserError: An option is out of range or unknown; the message names the flag.
    """
    validate_config(cfg, _run_flags(options))
