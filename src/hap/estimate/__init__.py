"""Curvature estimators: Hutchinson traces of Hessian blocks, the Monte-Carlo Fisher, and their statistics.

Written by hand because no library does it: PyHessian and friends estimate one trace per layer or per
model and re-run the product per block; none reduces one product into thousands of structured units,
reports the estimator's own uncertainty, or stops when the ranking has settled. Estimators see only
:class:`hap.units.Unit` slices, never a model family.
"""

from .fisher import FisherSampler, per_example_grads
from .hutchinson import TraceEstimate, estimate_traces
from .reduce import UnitReducer
from .stats import spearman

__all__ = ["TraceEstimate", "estimate_traces", "per_example_grads", "FisherSampler", "UnitReducer", "spearman"]
