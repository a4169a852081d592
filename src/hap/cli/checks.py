"""Every option of a run checked before any compute: a typo must cost a second, not a sensitivity pass.

The library checks its options where it uses them (:func:`hap.plan` before planning, :func:`hap.sensitivity`
before scoring, :meth:`hap.train.Task.resolve` before training), which for a CLI run is minutes apart: a
bad ``--round-to`` used to surface only after the sensitivity had run, and ``--implant-fraction 2`` not at
all when ``--implant`` was not given (the pipeline then sets the fraction to 0). This module applies the
same rules to a whole :class:`hap.pipeline.RunConfig` at once, up front.
"""

from __future__ import annotations

from typing import Any

from ..config import ALLOCATIONS, IMPLANT_KINDS, RANKINGS, SIGNS
from .common import UserError

__all__ = ["validate_run_config"]


def _plan_problems(p: Any) -> list[str]:
    """The rules of :func:`hap.plan`, stated as the options the CLI spells."""
    out = []
    if p.implant is not None and p.implant not in IMPLANT_KINDS:
        out.append(f"--implant {p.implant!r}: choose {', '.join(IMPLANT_KINDS)} or none")
    if not 0.0 <= p.implant_fraction < 1.0:
        out.append(f"--implant-fraction {p.implant_fraction}: must be in [0, 1)")
    if not p.implant_cost > 0:
        out.append(f"implant_cost {p.implant_cost}: must be > 0")
    if not 0.0 < p.max_layer_ratio <= 1.0:
        out.append(f"--max-layer-ratio {p.max_layer_ratio}: must be in (0, 1]")
    if not isinstance(p.round_to, int) or p.round_to < 1:
        out.append(f"--round-to {p.round_to!r}: must be an integer >= 1")
    if p.allocation not in ALLOCATIONS:
        out.append(f"--allocation {p.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    if p.rank_by not in RANKINGS:
        out.append(f"--rank-by {p.rank_by!r}: choose one of {', '.join(RANKINGS)}")
    if p.sign not in SIGNS:
        out.append(f"--sign {p.sign!r}: choose one of {', '.join(SIGNS)}")
    if not 0.0 < p.tol < 0.5:
        out.append(f"plan tol {p.tol}: must be in (0, 0.5)")
    return out


def _sensitivity_problems(s: Any) -> list[str]:
    out = []
    if s.max_samples is not None and s.max_samples < 1:
        out.append(f"--max-samples {s.max_samples}: must be >= 1")
    if s.max_batches is not None and s.max_batches < 1:
        out.append(f"--sens-batches {s.max_batches}: must be >= 1")
    if s.scope not in ("all", "producer"):
        out.append(f"--scope {s.scope!r}: choose all or producer")
    return out


def validate_run_config(cfg: Any) -> None:
    """Raise one :class:`UserError` listing what is wrong with ``cfg`` (a RunConfig); nothing is computed.

    Raises:
        UserError: An option is out of range or unknown; the message names the flag.
    """
    from ..train import TextTask, VisionTask

    problems = _plan_problems(cfg.plan) + _sensitivity_problems(cfg.sensitivity)
    for name, value in (("--sens-batch-size", cfg.sens_batch_size), ("--repair-batches", cfg.repair_batches),
                        ("--max-length", cfg.max_length)):
        if value < 1:
            problems.append(f"{name} {value}: must be >= 1")
    if cfg.bn_batches < 0:
        problems.append(f"--bn-batches {cfg.bn_batches}: must be >= 0")
    task = VisionTask() if cfg.units == "channels" else TextTask(tokenizer=None)
    for label, tc in (("fine-tune", cfg.finetune), ("dense training", cfg.dense)):
        if tc is None:
            continue
        if tc.steps is not None and tc.steps < 0:
            problems.append(f"{label} steps {tc.steps}: must be >= 0")
        try:
            task.resolve(tc)
        except ValueError as e:
            problems.append(f"{label}: {e}")
    if problems:
        raise UserError("; ".join(problems))
