"""SparseGPT (Frantar & Alistarh 2023): an OBS mask and an update of the kept weights from ``H = X X^T``."""

from prunekit.methods.sparsegpt.method import SparseGPT, SparseGPTConfig
from prunekit.methods.sparsegpt.solver import (
    InverseHessian,
    SparseGPTResult,
    inverse_hessian,
    inverse_hessian_factor,
    sparsegpt_prune,
)

__all__ = [
    "InverseHessian",
    "SparseGPT",
    "SparseGPTConfig",
    "SparseGPTResult",
    "inverse_hessian",
    "inverse_hessian_factor",
    "sparsegpt_prune",
]
