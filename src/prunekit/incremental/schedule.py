"""Per-layer structural sparsity from per-layer importance (Adapt-Pruner: Pan et al. 2025, "Adapt-Pruner:
Adaptive Structural Pruning for Efficient Small Language Model Training", Sec. 3.1-3.2).

A layer that changes its input more (lower cosine similarity between its input and output hidden states:
ShortGPT's Block Influence) is more important and is pruned less: with importances ``I_l`` centred and scaled
to ``z_l`` in ``[-1, 1]`` (the most important layer at ``+1`` or the least at ``-1``),

    s_l = s - A z_l

around the step's mean sparsity ``s`` with amplitude ``A``. The sparsities become widths (attention units and
MLP channels of each layer, :func:`widths_for_sparsities`), brought to the exact parameter budget of the step.
Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from prunekit.core.errors import StructuralPruningError
from prunekit.structured.llm.layer_widths import Genome, Ladder, LayerLayout
from prunekit.structured.llm.search_space import SearchSpace


def adaptive_sparsities(importance: Sequence[float], mean: float, amplitude: float) -> list[float]:
    """``s_l = mean - amplitude x z_l`` with ``z_l`` the importances centred on their mean and divided by the
    largest deviation (all ``mean`` where the importances are equal), clipped to ``[0, 1)``."""
    if not importance:
        return []
    centre = sum(importance) / len(importance)
    spread = max(abs(i - centre) for i in importance)
    z = [(i - centre) / spread if spread > 0 else 0.0 for i in importance]
    return [min(max(mean - amplitude * zl, 0.0), 0.999) for zl in z]


def widths_for_sparsities(
    layouts: Sequence[LayerLayout],
    current: Genome,
    sparsities: Sequence[float],
    fixed_params: int,
    kept_target: int,
) -> Genome:
    """The widths that take ``sparsities[l]`` of each layer's parameters as it is now (``current``): attention
    units in proportion (at least one kept), the MLP channels for the rest; then MLP channels settled one at a
    time until the model keeps ``kept_target`` parameters (to one channel). No layer grows."""
    proposal = []
    for layout, (units, channels), sparsity in zip(layouts, current, sparsities, strict=True):
        keep_params = (1.0 - sparsity) * layout.params((units, channels))
        kept_units = min(units, max(1, round(units * (1.0 - sparsity)))) if units else 0
        without_channels = layout.params((kept_units, 0)) if kept_units else layout.mlp_fixed
        mlp = round((keep_params - without_channels) / layout.channel_params)
        proposal.append((kept_units, min(channels, max(1, mlp))))
    ladders = tuple(Ladder((u,), tuple(range(1, c + 1))) for u, c in current)
    space = SearchSpace(tuple(layouts), ladders, (1,) * len(layouts), fixed_params, kept_target)
    settled = space.settle(tuple(proposal))
    if settled is None:
        raise StructuralPruningError(
            f"the widths cannot keep {kept_target} parameters within the current ones: the step removes more than "
            "the MLPs hold"
        )
    return settled
