# ruff: noqa: I001  (registration order is the order names() lists and the CLI shows)
"""Criteria: every way of scoring units, registered once (:func:`register_criterion`).

Registered here: ``hap`` (and ``hap-fisher``, ``hap-hessian``), ``l1`` (alias ``magnitude``), ``l2``,
``taylor``, ``obd``, ``michel`` (heads), ``random``, and the compensation-aware ``obs`` and
``obs-greedy``. A comparison between them changes only the score:
units, plan, surgery and fine-tune are shared.
"""

from .base import REGISTRY, Criterion, CriterionResult, ScoreContext, get, names, register_criterion
from . import hap  # noqa: F401
from . import magnitude  # noqa: F401
from . import gradient  # noqa: F401
from . import michel  # noqa: F401
from . import obs  # noqa: F401

__all__ = ["REGISTRY", "Criterion", "CriterionResult", "ScoreContext", "get", "names", "register_criterion"]
