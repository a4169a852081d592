"""Planning: plans as data (:mod:`.types`), allocation of units to candidate sets (:mod:`.allocation`) and
the search for the candidate count that meets a target (:mod:`.search`). Nothing here imports model,
surgery or estimator code; :func:`hap.plan` (in :mod:`hap.planner`) ties it to a model.
"""

from .allocation import ALLOCATIONS, RANKINGS, GroupInfo, layer_normalized
from .types import TARGET_KINDS, GroupPlan, PlanError, PruningPlan, Target, input_spec, make_inputs, pruned_share

__all__ = ["ALLOCATIONS", "RANKINGS", "GroupInfo", "layer_normalized", "TARGET_KINDS", "GroupPlan", "PlanError",
           "PruningPlan", "Target", "input_spec", "make_inputs", "pruned_share"]
