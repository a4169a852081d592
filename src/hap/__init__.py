"""hap: Hessian-Aware Pruning with Neural Implant.

The public face is three calls::

    sens = hap.sensitivity(model, loss_fn, batches)      # per-unit second-order sensitivity
    plan = hap.plan(model, sens, hap.Target(params=0.5))  # which units go, which get an implant
    small = hap.prune(model, plan)                        # physically smaller model

Data flows one way: units (:mod:`hap.units`) -> curvature (:mod:`hap.estimate`) -> scores
(:mod:`hap.criteria`, :mod:`hap.sensitivity`) -> plan (:mod:`hap.planning`, :mod:`hap.planner`) ->
surgery (:mod:`hap.surgery`, :mod:`hap.implant`) -> save/load (:mod:`hap.io`).
"""

from . import criteria, units
from ._hf import eager_attention  # noqa: E402,I001  (kept after the units: re-exported for users)
from ._utils import model_signature
from .bench import BenchResult, bench
from .config import PlanConfig, SensitivityConfig
from .criteria import register_criterion
from .criteria.michel import michel_scores
from .estimate import TraceEstimate, estimate_traces
from .export import export
from .fold import fold_batchnorm
from .hf_export import save_pretrained
from .implant import ImplantedConv, calibrate
from .io import load, save
from .metrics import ModelCost, count_macs, count_params, latency, measure
from .planner import plan
from .planning import GroupPlan, PlanError, PruningPlan, Target
from .repair import RepairReport, repair
from .sensitivity import Sensitivity, UnitSensitivity, sensitivity
from .surgery import prune
from .units import (
    ChannelGroup,
    ParamSlice,
    Unit,
    UnitFamily,
    UnsupportedLayerError,
    attention_layouts,
    channel_groups,
    flatten_units,
    head_units,
    mask_heads,
    prune_heads,
    register_family,
)

__all__ = [
    "criteria",
    "units",
    "ChannelGroup",
    "ParamSlice",
    "Unit",
    "UnitFamily",
    "UnsupportedLayerError",
    "channel_groups",
    "flatten_units",
    "register_family",
    "register_criterion",
    "TraceEstimate",
    "estimate_traces",
    "Sensitivity",
    "SensitivityConfig",
    "PlanConfig",
    "UnitSensitivity",
    "model_signature",
    "sensitivity",
    "attention_layouts",
    "eager_attention",
    "head_units",
    "mask_heads",
    "michel_scores",
    "prune_heads",
    "ImplantedConv",
    "calibrate",
    "load",
    "save",
    "save_pretrained",
    "ModelCost",
    "count_macs",
    "count_params",
    "latency",
    "measure",
    "GroupPlan",
    "PlanError",
    "PruningPlan",
    "Target",
    "plan",
    "prune",
    "repair",
    "RepairReport",
    "bench",
    "BenchResult",
    "export",
    "fold_batchnorm",
]

__version__ = "0.1.0"
