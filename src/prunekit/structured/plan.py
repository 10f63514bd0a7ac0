"""Which units to remove: allocation of a target over the spaces of a dependency graph, as a plan the user
can read before anything is cut.

Two policies:

- ``uniform``: every prunable space keeps ``ceil_to(size x (1 - ratio), round_to)`` units, its most
  important ones (a 64-channel layer at ratio 0.5 keeps 32); ``round_to`` applies to channels and to the
  groups of grouped convs, not to heads (but ``nn.MultiheadAttention`` keeps an even head count, which its
  fused inference kernel needs);
- ``global``: one ranking of all units by normalised importance, removed from the bottom until the
  ratio of all prunable units is reached, each space keeping at least ``min_keep_ratio`` of its units
  (and a multiple of ``round_to``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from prunekit.structured.graph import DependencyGraph, Space

#: ``latency`` is HALP's latency-aware allocation (:mod:`~prunekit.structured.knapsack`), which needs a cost
#: budget and a latency table, so :func:`plan_pruning` does not take it.
Policy = Literal["uniform", "global", "latency"]

#: Spaces pruned unless asked otherwise: channels, whole conv groups, and heads (the outer side of a
#: ``(H * D) -> (H, D)`` reshape). Head width and positions inside groups are opt-in.
DEFAULT_KINDS = ("plain", "group", "factor_outer")


@dataclass
class SpacePlan:
    space: Space
    keep: list[int]
    removed: list[int]

    @property
    def kept_fraction(self) -> float:
        return len(self.keep) / self.space.size if self.space.size else 1.0


@dataclass
class StructuralPlan:
    """Units to remove per space, and the resulting shape of every parameter."""

    graph: DependencyGraph
    spaces: list[SpacePlan]
    removed: set[int] = field(default_factory=set)

    def new_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """``name -> (old shape, new shape)`` for every parameter or buffer that changes."""
        out = {}
        for name, dims in self.graph.state_dims.items():
            old = tuple(int(a.size) for a in dims)
            new = tuple(int((~m).sum()) for m in self.graph.removed_indices(name, self.removed))
            if new != old:
                out[name] = (old, new)
        return out

    def describe(self) -> str:
        lines = []
        for sp in self.spaces:
            if sp.removed:
                first = ", ".join(f"{n}[{d}]" for n, d in sp.space.where[:3])
                lines.append(
                    f"space {sp.space.index} ({sp.space.kind}, in {first}...): {sp.space.size} -> {len(sp.keep)}"
                )
        return "\n".join(lines) if lines else "nothing to remove"


def units_to_keep(size: int, ratio: float, round_to: int = 1) -> int:
    """Units a space of ``size`` keeps when pruned at ``ratio``: ``size x (1 - ratio)`` rounded *up* to a
    multiple of ``round_to`` (never below ``round_to`` or 1, never above ``size``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    keep = math.ceil(size * (1.0 - ratio) - 1e-9)
    keep = math.ceil(keep / round_to) * round_to
    return max(min(size, keep), min(size, max(1, round_to)))


def is_prunable(space: Space, kinds: Sequence[str], keep_streams: bool = False) -> bool:
    """Whether a plan may cut ``space``: its kind is among ``kinds``, it has more than one unit, and it is not
    a residual stream kept whole by ``keep_streams``."""
    return space.kind in kinds and space.size > 1 and not (keep_streams and space.stream)


def plan_pruning(
    graph: DependencyGraph,
    importance: Mapping[int, float],
    ratio: float,
    *,
    policy: Policy = "uniform",
    round_to: int = 1,
    kinds: Sequence[str] = DEFAULT_KINDS,
    min_keep_ratio: float = 0.1,
    space_ratios: Mapping[int, float] | None = None,
    keep_streams: bool = False,
) -> StructuralPlan:
    """Choose the units to remove so that each prunable space (``uniform``), or all of them together
    (``global``), loses ``ratio`` of its units; ``space_ratios`` overrides the ratio of given spaces.
    ``keep_streams`` keeps every residual stream whole (:attr:`Space.stream`) and prunes only the width
    inside the blocks."""
    ratios = dict(space_ratios or {})
    plans: list[SpacePlan] = []
    if policy == "uniform":
        for space in graph.spaces:
            r = ratios.get(space.index, ratio) if is_prunable(space, kinds, keep_streams) else 0.0
            rt = rounding_step(space, round_to)
            keep_n = units_to_keep(space.size, r, rt) if r > 0 else space.size
            plans.append(keep_best(space, importance, keep_n))
    elif policy == "global":
        prunable = [s for s in graph.spaces if is_prunable(s, kinds, keep_streams)]
        total = sum(s.size for s in prunable)
        to_remove = round(total * ratio)
        floors = {s.index: units_to_keep(s.size, 1.0 - min_keep_ratio, rounding_step(s, round_to)) for s in prunable}
        ranked = sorted(
            (importance[u] / (space_scale(s, importance) or 1.0), s.index, u) for s in prunable for u in s.units
        )
        removed_per_space: dict[int, int] = {s.index: 0 for s in prunable}
        sizes = {s.index: s.size for s in prunable}
        removed = 0
        for _, index, _ in ranked:
            if removed >= to_remove:
                break
            if sizes[index] - removed_per_space[index] - 1 >= floors[index]:
                removed_per_space[index] += 1
                removed += 1
        for space in graph.spaces:
            if space.index in removed_per_space:
                keep_n = space.size - removed_per_space[space.index]
                step = rounding_step(space, round_to)
                if step > 1:
                    keep_n = min(space.size, math.ceil(keep_n / step) * step)
                plans.append(keep_best(space, importance, keep_n))
            else:
                plans.append(keep_best(space, importance, space.size))
    elif policy == "latency":
        raise ValueError(
            "the latency policy allocates a MAC, parameter or latency budget: call "
            "prunekit.structured.knapsack.plan_latency_aware, or prune_structurally with a target other than 'channels'"
        )
    else:
        raise ValueError(f"unknown policy {policy!r}: use 'uniform', 'global' or 'latency'")
    removed_units = {u for p in plans for u in p.removed}
    return StructuralPlan(graph, plans, removed_units)


#: A parameter of ``nn.MultiheadAttention``: its head count is kept even, since PyTorch's fused inference
#: path for it (``torch._native_multi_head_attention``) refuses an odd number of heads and falls back to a
#: slower one.
FUSED_ATTENTION_PARAMETER = "in_proj_weight"


def rounding_step(space: Space, round_to: int) -> int:
    """``round_to`` applies to channel counts: plain channels and the groups of depthwise convs (one channel
    each); counts of heads or of positions inside groups are not rounded, except that the heads of an
    ``nn.MultiheadAttention`` stay even (see :data:`FUSED_ATTENTION_PARAMETER`)."""
    if space.kind in ("plain", "group"):
        return round_to
    fused = any(name.rpartition(".")[2] == FUSED_ATTENTION_PARAMETER for name, _ in space.where)
    return 2 if space.kind == "factor_outer" and fused and space.size % 2 == 0 else 1


def space_scale(space: Space, importance: Mapping[int, float]) -> float:
    """The mean importance of the space's units: what the global ranking divides by, so spaces compare."""
    return float(np.mean([importance[u] for u in space.units]))


def keep_best(space: Space, importance: Mapping[int, float], keep_n: int) -> SpacePlan:
    """Keep the ``keep_n`` most important units (ties: lower unit first), in their original order."""
    order = sorted(space.units, key=lambda u: (-importance.get(u, 0.0), u))
    keep = sorted(order[:keep_n])
    removed = sorted(order[keep_n:])
    return SpacePlan(space, keep, removed)


def plan_removing(graph: DependencyGraph, units: set[int] | list[int]) -> StructuralPlan:
    """A plan that removes exactly ``units`` (for users who choose units themselves, and for tests)."""
    chosen = {graph.table.find(u) for u in units}
    known = {u for s in graph.spaces for u in s.units}
    unknown = chosen - known
    if unknown:
        raise ValueError(f"{len(unknown)} units are not prunable units of this graph (first: {sorted(unknown)[:5]})")
    plans = [
        SpacePlan(s, [u for u in s.units if u not in chosen], [u for u in s.units if u in chosen]) for s in graph.spaces
    ]
    return StructuralPlan(graph, plans, chosen)


def fill_to_budget(
    within: StructuralPlan,
    over: StructuralPlan,
    importance: Mapping[int, float],
    cost: Callable[[StructuralPlan], float],
    budget: float,
    *,
    round_to: int = 1,
) -> StructuralPlan:
    """Give back units to ``within`` (a plan whose ``cost`` is at most ``budget``) while the cost stays within
    it: a unit may come back only if ``over`` (a plan that removes less, over the budget) keeps it.

    A bisection over one channel ratio moves every space at once, so where units are coarse (heads, channels
    rounded to ``round_to``) the plan it finds removes more than asked. This greedy step closes that gap:
    each space's next ``round_to`` units (its most important removed ones) are candidates, tried in order of
    importance normalised by the space's mean (as in the ``global`` policy), and kept when the cost allows.
    """
    ceilings = {p.space.index: len(p.keep) for p in over.spaces}
    plans = {p.space.index: p for p in within.spaces}
    order = [p.space.index for p in within.spaces]

    def current() -> StructuralPlan:
        spaces = [plans[i] for i in order]
        return StructuralPlan(within.graph, spaces, {u for p in spaces for u in p.removed})

    def candidate(index: int) -> tuple[float, SpacePlan] | None:
        plan = plans[index]
        room = ceilings.get(index, len(plan.keep)) - len(plan.keep)
        if room <= 0:
            return None
        grown = keep_best(plan.space, importance, len(plan.keep) + min(room, rounding_step(plan.space, round_to)))
        back = [u for u in grown.keep if u not in plan.keep]
        scale = space_scale(plan.space, importance) or 1.0
        return float(np.mean([importance.get(u, 0.0) for u in back])) / scale, grown

    best = within
    changed = True
    while changed:
        changed = False
        ranked = sorted(
            ((c[0], i, c[1]) for i in order if (c := candidate(i)) is not None), key=lambda t: (-t[0], t[1])
        )
        for _, index, grown in ranked:
            previous = plans[index]
            plans[index] = grown
            trial = current()
            if cost(trial) <= budget:
                best, changed = trial, True
                break
            plans[index] = previous
    return best
