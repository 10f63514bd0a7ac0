"""Which experts of a layer to keep: registered criteria, each a pure function of the layer's calibration
statistics (:class:`~prunekit.moe.statistics.LayerRouting`) and, for the search criterion, of a function
that measures the layer's output error with a candidate kept set.

* ``frequency``: keep the most routed-to experts (the usual baseline; e.g. NAEE's and REAP's).
* ``reap``: keep the experts of largest REAP saliency, the mean over routed tokens of routing weight x
  expert output norm (Lasby et al. 2025, "REAP the Experts", Eq. 9).
* ``stun``: STUN's behavioural clustering (Lee et al. 2024, §3; as its reference code ``merge_weight.py``):
  experts whose router rows are close behave alike. The distance is ``||r_i - r_j||_2 / ||R||_F`` between
  router rows (minus ``lambda * coact_ij / tokens`` when a co-activation weight is given; 0 by default, as
  the reference); the closest pair of experts in different clusters is merged, greedily, until as many
  clusters remain as experts are kept; each cluster keeps the member whose weights are closest to the
  cluster's mean weights.
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
#: ``tensors(expert) -> [tensor, ...]``: one expert's weights (views of the fused parameters).
ExpertTensors = Callable[[int], list[torch.Tensor]]


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
    router's weight rows, a loss of candidate kept sets, each expert's weights, and the criterion options."""

    remove: int
    groups: int
    router_weight: torch.Tensor
    loss: SubsetLoss
    expert_tensors: ExpertTensors
    coactivation_weight: float = 0.0
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
    """STUN's pairwise distance between experts: ``||r_i - r_j||_2 / ||R||_F`` of the router rows ``R``, less
    ``coactivation_weight * coact_ij / tokens``."""
    rows = router_weight.double()
    distance = torch.cdist(rows, rows) / rows.norm().clamp_min(1e-12)
    if routing.tokens and coactivation_weight:
        distance = distance - coactivation_weight * routing.coactivation / routing.tokens
    return distance


def cluster(distance: torch.Tensor, clusters: int, members: list[int]) -> list[list[int]]:
    """Greedy single-linkage clustering of ``members``: merge the clusters of the closest pair of experts
    not yet together (ties: the first pair in index order) until ``clusters`` remain."""
    of = {m: frozenset([m]) for m in members}
    pairs = sorted(itertools.combinations(members, 2), key=lambda p: (float(distance[p[0], p[1]]), p))
    for a, b in pairs:
        if len(set(of.values())) <= clusters:
            break
        if of[a] is of[b]:
            continue
        merged = of[a] | of[b]
        for m in merged:
            of[m] = merged
    return sorted(sorted(group) for group in set(of.values()))


def closest_to_mean(group: list[int], tensors: ExpertTensors) -> int:
    """The member of ``group`` whose weights (all its tensors) are closest to the group's mean weights (ties:
    the first)."""
    if len(group) == 1:
        return group[0]
    distances = [0.0] * len(group)
    for part in range(len(tensors(group[0]))):
        stacked = torch.stack([tensors(e)[part].double() for e in group])
        mean = stacked.mean(0)
        for i in range(len(group)):
            distances[i] += float((stacked[i] - mean).pow(2).sum())
    return group[min(range(len(group)), key=lambda i: (distances[i], i))]


def stun(routing: LayerRouting, context: SelectionContext) -> Selection:
    distance = behaviour_distance(routing, context.router_weight, context.coactivation_weight)
    experts = routing.counts.shape[0]
    size = experts // context.groups
    keep: list[int] = []
    for g in range(context.groups):
        members = list(range(g * size, (g + 1) * size))
        for group in cluster(distance, size - context.remove // context.groups, members):
            keep.append(closest_to_mean(group, context.expert_tensors))
    return Selection(sorted(keep), None)


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
