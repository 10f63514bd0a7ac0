"""Weight reconstruction: methods that update the kept weights, not only choose a mask."""

from prunekit.solvers.sparsegpt import SparseGPTResult, accumulate_gram, inverse_hessian_factor, sparsegpt_prune

__all__ = ["SparseGPTResult", "accumulate_gram", "inverse_hessian_factor", "sparsegpt_prune"]
