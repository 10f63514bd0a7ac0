"""Latency-aware allocation: remove, step by step, the units that give up the least importance for the time
they save on the target device, until a budget of MACs, parameters or latency is met.

HALP (Shen et al. 2022, "Structural Pruning via Latency-Saliency Knapsack", NeurIPS) chooses the neurons
to keep by maximising the summed importance under a latency budget (their Eq. 3: ``max sum_l sum_j I_l^j``
subject to ``sum_l T_l(p_{l-1}, p_l) <= C``), where the cost of a neuron is the latency it adds to its layer
given the neighbouring layers' widths (Eq. 4), read from a table measured on the device. Their solver is a
knapsack over the sorted neurons of every layer; here a greedy removal does the same job, as in the
latency-saliency ratio that orders their knapsack items: at every step each prunable space offers its next
``round_to`` least important units, costed by

    saliency / saved = (sum of their normalised importances) / (planned time before - after the step),

and the offer with the smallest ratio is taken. The time saved is re-measured whenever a neighbouring space
changes (the ``p_{l-1}`` of Eq. 4), from a :class:`~prunekit.structured.latency.LatencyTable`. Importance is
normalised by each space's mean, as in the ``global`` policy, so that spaces are comparable.

Where the time of a layer falls slower than its MACs (narrow 1x1 and depthwise convolutions on CPUs, a fixed
cost per call), a MAC budget reached this way leaves a faster model than one reached with uniform ratios.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch.fx

from prunekit.structured.cost import aten_calls, node_flops, parameter_count
from prunekit.structured.graph import DependencyGraph, Space
from prunekit.structured.latency import LatencyTable, node_seconds
from prunekit.structured.plan import (
    DEFAULT_KINDS,
    SpacePlan,
    StructuralPlan,
    is_prunable,
    keep_best,
    rounding_step,
    space_scale,
    units_to_keep,
)

log = logging.getLogger(__name__)

Budget = Literal["macs", "params", "latency"]

#: Time saved below which a step counts as saving nothing (seconds): such steps are taken last.
NOTHING_SAVED_S = 1e-8


@dataclass
class _Offer:
    """A space's next step: the units it would remove, their normalised importance, and what they save."""

    units: list[int]
    saliency: float
    saved_s: float
    saved_cost: float

    @property
    def ratio(self) -> tuple[bool, float]:
        """Sort key: steps that save time first, then by saliency per second saved."""
        if self.saved_s <= NOTHING_SAVED_S:
            return (True, self.saliency)
        return (False, self.saliency / self.saved_s)


def _touching(graph: DependencyGraph, nodes: Sequence[torch.fx.Node], spaces: Sequence[Space]) -> dict[int, list]:
    """For each space, the traced calls whose arguments or result carry one of its units."""
    space_of = {u: s.index for s in spaces for u in s.units}
    by_space: dict[int, list] = {s.index: [] for s in spaces}

    def atoms_of(value: object, into: set[int]) -> None:
        if isinstance(value, np.ndarray):
            into.update(np.unique(value).tolist())
        elif isinstance(value, (list, tuple)):
            for v in value:
                atoms_of(v, into)

    for node in nodes:
        atoms: set[int] = set()
        atoms_of(graph.node_dims.get(node.name), atoms)
        for arg in node.all_input_nodes:
            atoms_of(graph.node_dims.get(arg.name), atoms)
        touched = {space_of[leaf] for a in atoms for leaf in graph.table.leaves(a) if leaf in space_of}
        for index in touched:
            by_space[index].append(node)
    return by_space


def plan_latency_aware(
    graph: DependencyGraph,
    importance: Mapping[int, float],
    ratio: float,
    table: LatencyTable,
    *,
    budget: Budget = "macs",
    round_to: int = 1,
    kinds: Sequence[str] = DEFAULT_KINDS,
    min_keep_ratio: float = 0.1,
    keep_streams: bool = False,
) -> StructuralPlan:
    """Remove units, those of least importance per second saved first (HALP's latency-saliency ratio), until
    ``ratio`` of the model's ``budget`` (MACs, parameters or planned latency) is gone. Every space keeps at
    least ``min_keep_ratio`` of its units and a multiple of ``round_to`` channels; ``keep_streams`` leaves
    residual streams whole. Logs a warning when the floors stop it short of the budget."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"a {budget} reduction must be in (0, 1), got {ratio}")
    if budget not in ("macs", "params", "latency"):
        raise ValueError(f"unknown budget {budget!r}: use 'macs', 'params' or 'latency'")
    prunable = [s for s in graph.spaces if is_prunable(s, kinds, keep_streams)]
    nodes = aten_calls(graph)
    touching = _touching(graph, nodes, prunable)
    removed: set[int] = set()
    kept = {s.index: s.size for s in prunable}
    floors = {s.index: units_to_keep(s.size, 1.0 - min_keep_ratio, rounding_step(s, round_to)) for s in prunable}
    scales = {s.index: space_scale(s, importance) or 1.0 for s in prunable}
    seconds = {n.name: node_seconds(graph, n, removed, table) for n in nodes}
    dense_seconds = sum(seconds.values())

    def cost_of(space: Space, gone: set[int]) -> float:
        """The budget's quantity (seconds, FLOPs = 2 x MACs, parameters) over what ``space`` touches, once
        ``gone`` units are removed."""
        if budget == "latency":
            return sum(node_seconds(graph, n, gone, table) for n in touching[space.index])
        if budget == "macs":
            return float(sum(node_flops(graph, n, gone) for n in touching[space.index]))
        return float(parameter_count(graph, (name for name, _ in space.where), gone))

    if budget == "latency":
        total = dense_seconds
    elif budget == "macs":
        total = float(sum(node_flops(graph, n, removed) for n in nodes))
    else:
        total = float(parameter_count(graph, graph.state_dims, removed))
    goal = total * (1.0 - ratio)
    current = total

    def offer(space: Space) -> _Offer | None:
        step = rounding_step(space, round_to)
        kept_n = kept[space.index]
        target_n = ((kept_n - 1) // step) * step if step > 1 else kept_n - 1
        if target_n < floors[space.index]:
            return None
        alive = sorted((u for u in space.units if u not in removed), key=lambda u: (importance[u], -u))
        units = sorted(alive[: kept_n - target_n])
        after = removed | set(units)
        saved_s = sum(seconds[n.name] - node_seconds(graph, n, after, table) for n in touching[space.index])
        saved_cost = cost_of(space, removed) - cost_of(space, after)
        saliency = float(sum(importance[u] for u in units)) / scales[space.index]
        return _Offer(units, saliency, saved_s, saved_cost)

    offers: dict[int, _Offer | None] = {}
    steps = 0
    while current > goal:
        for space in prunable:
            if space.index not in offers:
                offers[space.index] = offer(space)
        live = [(o.ratio, index) for index, o in offers.items() if o is not None]
        if not live:
            log.warning(
                "structured: every space is at its floor (min_keep_ratio=%.2f) with %.1f%% of the %s removed, "
                "short of %.1f%%",
                min_keep_ratio,
                100 * (1 - current / total),
                budget,
                100 * ratio,
            )
            break
        _, chosen = min(live)
        taken = offers[chosen]
        assert taken is not None
        removed |= set(taken.units)
        kept[chosen] -= len(taken.units)
        current -= taken.saved_s if budget == "latency" else taken.saved_cost
        steps += 1
        changed = {n.name for n in touching[chosen]}
        for n in touching[chosen]:
            seconds[n.name] = node_seconds(graph, n, removed, table)
        for index in list(offers):  # offers whose calls just changed are costed again
            if index == chosen or any(n.name in changed for n in touching[index]):
                del offers[index]
    log.info(
        "structured: latency-aware allocation took %d steps, %d table entries; planned %.3f ms -> %.3f ms",
        steps,
        len(table.entries),
        1e3 * dense_seconds,
        1e3 * sum(seconds.values()),
    )
    plans: list[SpacePlan] = []
    for space in graph.spaces:
        if space.index in kept:
            plans.append(
                SpacePlan(space, [u for u in space.units if u not in removed], [u for u in space.units if u in removed])
            )
        else:
            plans.append(keep_best(space, importance, space.size))
    return StructuralPlan(graph, plans, removed)


__all__ = ["Budget", "plan_latency_aware"]
