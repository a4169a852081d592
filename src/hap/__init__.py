"""hap: Hessian-Aware Pruning with Neural Implant.

The public face is three calls::

    sens = hap.sensitivity(model, loss_fn, batches)      # per-unit second-order sensitivity
    plan = hap.plan(model, sens, hap.Target(params=0.5))  # which units go, which get an implant
    small = hap.prune(model, plan)                        # physically smaller model
"""

from .groups import ChannelGroup, ParamSlice, Unit, UnsupportedLayerError, channel_groups, flatten_units
from .heads import attention_layouts, eager_attention, head_units, mask_heads, michel_scores, prune_heads
from .hessian import TraceEstimate, estimate_traces
from .implant import ImplantedConv, calibrate
from .io import load, save
from .metrics import ModelCost, count_macs, count_params, latency, measure
from .plan import GroupPlan, PlanError, PruningPlan, Target, plan
from .sensitivity import METHODS, Sensitivity, UnitSensitivity, model_signature, sensitivity
from .surgery import prune

__all__ = [
    "ChannelGroup",
    "ParamSlice",
    "Unit",
    "UnsupportedLayerError",
    "channel_groups",
    "flatten_units",
    "TraceEstimate",
    "estimate_traces",
    "METHODS",
    "Sensitivity",
    "UnitSensitivity",
    "model_signature",
    "sensitivity",
    "attention_layouts",
    "eager_attention",
    "head_units",
    "mask_heads",
    "michel_scores",
    "prune_heads",
    "implant",
    "ImplantedConv",
    "calibrate",
    "load",
    "save",
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
]

__version__ = "0.1.0"
