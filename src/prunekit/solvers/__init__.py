"""Weight reconstruction: methods that update the kept weights, not only choose a mask."""

from prunekit.calibration.statistics import accumulate_gram, complete_gram
from prunekit.reconstruction.least_squares import reconstruction_error, refit_kept_weights
from prunekit.solvers.sparsegpt import (
    InverseHessian,
    SparseGPTResult,
    inverse_hessian,
    inverse_hessian_factor,
    sparsegpt_prune,
)

__all__ = [
    "InverseHessian",
    "SparseGPTResult",
    "accumulate_gram",
    "complete_gram",
    "inverse_hessian",
    "inverse_hessian_factor",
    "reconstruction_error",
    "refit_kept_weights",
    "sparsegpt_prune",
]
