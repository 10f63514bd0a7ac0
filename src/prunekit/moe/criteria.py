"""Which experts of a layer to keep: registered criteria, each a pure function of the layer's calibration
statistics (:class:`~prunekit.moe.statistics.LayerRouting`) and, for the search criterion, of a function
that measures the layer's output error with a candidate kept set.

* ``frequency``: keep the most routed-to experts (the usual baseline; e.g. NAEE's and REAP's).
* ``reap``: keep the experts of largest REAP saliency, the mean over routed tokens of routing weight x
  expert output norm (Lasby et al. 2025, "REAP the Experts", Eq. 9).
* ``stun``: STUN's behavioural clustering (Lee et al. 2024, §3.2): experts whose router rows point the same
  way and that fire together behave alike; agglomerate them (average linkage on ``1 - cos(router_i,
  router_j) - lambda * coact_ij``, co-activation normalised by the tokens) into as many clusters as experts
  are kept, and keep each cluster's most routed-to member.
* ``reconstruct``: NAEE's expert-subset search (Lu et al. 2024, "Not All Experts are Equal", §3.1): the
  kept set that minimises ``||F(x) - F_S(x)||_F`` on calibration tokens, where ``F_S`` is the layer with only
  the experts ``S`` (routing among them), by exhaustive search when there are few subsets and greedily
  (drop the expert whose removal hurts least, one at a time) otherwise.

With grouped routing (DeepSeek-V3), every criterion keeps the same number of experts in every group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from prunekit.moe.statistics import LayerRouting

#: ``loss(keep) -> float``: the layer's output error with only the experts ``keep``.
SubsetLoss = Callable[[list[int]], float]


@dataclass
class Selection:
    """A criterion's answer for one layer: the experts kept (ascending), each expert's score (higher =
    more worth keeping; ``None`` where the criterion does not score experts) and the search's loss."""

    keep: list[int]
    scores: list[float] | None = None
    loss: float | None = None


@dataclass
class SelectionContext:
    """What a criterion may use beyond the statistics: the experts to remove, the routing groups, the
    router's weight rows, a loss of candidate kept sets, and the criterion options."""

    remove: int
    groups: int
    router_weight: torch.Tensor
    loss: SubsetLoss
    coactivation_weight: float = 1.0
    exhaustive_limit: int = 5000


class ExpertCriterion(Protocol):
    def __call__(self, routing: LayerRouting, context: SelectionContext) -> Selection: ...


def _registry() -> dict[str, ExpertCriterion]:
    return {"frequency": frequency, "reap": reap, "stun": stun, "reconstruct": reconstruct}


def criterion_names() -> list[str]:
    """The registered expert criteria."""
    return sorted(_registry())


def expert_criterion(name: str) -> ExpertCriterion:
    """The criterion called ``name`` (a clear error for an unknown one)."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown expert criterion {name!r}: choose one of {', '.join(sorted(registry))}")
    return registry[name]


def keep_best(scores: torch.Tensor, remove: int, groups: int = 1) -> list[int]:
    """The experts left after removing the ``remove`` lowest-scored ones (ties: the higher index goes), the
    same number from every one of ``groups`` contiguous groups."""
    experts = scores.shape[0]
    if remove % groups:
        raise ValueError(f"remove {remove} experts is not a multiple of the {groups} routing groups")
    size, per_group = experts // groups, remove // groups
    keep: list[int] = []
    for g in range(groups):
        members = list(range(g * size, (g + 1) * size))
        ranked = sorted(members, key=lambda e: (float(scores[e]), -e))  # lowest first; later index first on ties
        keep += sorted(ranked[per_group:])
    return sorted(keep)


def frequency(routing: LayerRouting, context: SelectionContext) -> Selection:
    scores = routing.frequency
    return Selection(keep_best(scores, context.remove, context.groups), scores.tolist())


def reap(routing: LayerRouting, context: SelectionContext) -> Selection:
    scores = routing.reap
    return Selection(keep_best(scores, context.remove, context.groups), scores.tolist())


def behaviour_distance(routing: LayerRouting, router_weight: torch.Tensor, coactivation_weight: float) -> torch.Tensor:
    """STUN's pairwise distance between experts: ``1 - cos(router_i, router_j) - lambda * coact_ij / tokens``."""
    rows = torch.nn.functional.normalize(router_weight.double(), dim=1)
    distance = 1.0 - rows @ rows.t()
    if routing.tokens:
        distance = distance - coactivation_weight * routing.coactivation / routing.tokens
    return distance


def cluster(distance: torch.Tensor, clusters: int, members: list[int]) -> list[list[int]]:
    """Average-linkage agglomerative clustering of ``members`` into ``clusters`` groups (ties: the first pair
    in index order merges)."""
    groups = [[m] for m in members]
    while len(groups) > clusters:
        best: tuple[float, int, int] | None = None
        for a, b in itertools.combinations(range(len(groups)), 2):
            d = float(distance[groups[a]][:, groups[b]].mean())
            if best is None or d < best[0] - 1e-15:
                best = (d, a, b)
        assert best is not None
        _, a, b = best
        groups[a] = sorted(groups[a] + groups.pop(b))
    return groups


def stun(routing: LayerRouting, context: SelectionContext) -> Selection:
    distance = behaviour_distance(routing, context.router_weight, context.coactivation_weight)
    experts = routing.counts.shape[0]
    size = experts // context.groups
    keep: list[int] = []
    for g in range(context.groups):
        members = list(range(g * size, (g + 1) * size))
        for members_of_cluster in cluster(distance, size - context.remove // context.groups, members):
            keep.append(max(members_of_cluster, key=lambda e: (float(routing.counts[e]), -e)))
    return Selection(sorted(keep), routing.frequency.tolist())


def reconstruct(routing: LayerRouting, context: SelectionContext) -> Selection:
    experts = routing.counts.shape[0]
    size, per_group = experts // context.groups, context.remove // context.groups
    group_choices = [
        [list(c) for c in itertools.combinations(range(g * size, (g + 1) * size), size - per_group)]
        for g in range(context.groups)
    ]
    subsets = math.prod(len(choices) for choices in group_choices)
    if subsets <= context.exhaustive_limit:
        best: tuple[float, list[int]] | None = None
        for parts in itertools.product(*group_choices):
            keep = sorted(e for part in parts for e in part)
            loss = context.loss(keep)
            if best is None or loss < best[0]:
                best = (loss, keep)
        assert best is not None
        return Selection(best[1], None, best[0])
    keep = list(range(experts))
    loss = 0.0
    for _ in range(context.remove):  # greedy: drop the expert whose removal raises the error least
        removable = [e for e in keep if sum(1 for k in keep if k // size == e // size) > size - per_group]
        losses = {e: context.loss([k for k in keep if k != e]) for e in removable}
        drop = min(losses, key=lambda e: (losses[e], -e))
        loss = losses[drop]
        keep.remove(drop)
    return Selection(keep, None, loss)
