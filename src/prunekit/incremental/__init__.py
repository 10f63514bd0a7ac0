"""Adaptive incremental structural pruning with recovery between steps (Adapt-Pruner): :mod:`.schedule` (the
per-layer sparsities, pure functions) and :mod:`.prune` (the loop: measure, prune a few percent, distill)."""

from prunekit.incremental.prune import IncrementalConfig, IncrementalResult, IncrementalStep, prune_incrementally
from prunekit.incremental.schedule import adaptive_sparsities, widths_for_sparsities

__all__ = [
    "IncrementalConfig",
    "IncrementalResult",
    "IncrementalStep",
    "adaptive_sparsities",
    "prune_incrementally",
    "widths_for_sparsities",
]
