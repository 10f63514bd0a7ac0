"""The ``obs`` importance criterion: a unit's second-order removal cost in the layers that read it.

A unit (an MLP channel, an attention head's key/value group with its query heads) is read by the input
columns of one or more linear layers (``down_proj``, ``o_proj``). Removing the unit removes those columns;
with the optimal update of the layer's other columns (:mod:`prunekit.reconstruction.structured_obs`, the
structured Optimal Brain Surgeon of ZipLM and SlimGPT) the layer's output error grows by

    cost(S) = trace( W[:, S] ([H^-1]_SS)^-1 W[:, S]^T ),        H = X^T X of the layer's inputs (damped)

for the columns ``S`` of the unit. Divided by the layer's output energy ``trace(W H W^T)``, costs of
different layers compare, and a unit read by several layers sums them. The refit that width pruning runs
afterwards (:mod:`prunekit.structured.reconstruct`) is that very update, so the score is the error the unit's
removal leaves. Units no calibrated layer reads have no cost here and are kept (scored above all others).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from prunekit.reconstruction.least_squares import damped
from prunekit.reconstruction.structured_obs import group_costs
from prunekit.structured.graph import DependencyGraph

log = logging.getLogger(__name__)


def second_order_unit_costs(
    graph: DependencyGraph,
    parameters: Mapping[str, torch.Tensor],
    units: list[int],
    grams: Mapping[str, torch.Tensor],
    dampening: float = 0.01,
) -> dict[int, float]:
    """Relative second-order removal cost of every unit (see the module docstring). ``grams`` maps a linear
    layer's module name to the Gram ``X^T X`` of its inputs."""
    wanted = set(units)
    costs: dict[int, float] = {}
    for name, dims in graph.state_dims.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in grams or name not in parameters or len(dims) < 2:
            continue
        columns: dict[int, list[int]] = {}
        for index, atom in enumerate(dims[1].tolist()):
            for leaf in graph.table.leaves(atom):
                if leaf in wanted:
                    columns.setdefault(leaf, []).append(index)
        if not columns:
            continue
        weight = parameters[name].detach().double()
        h = damped(grams[module].double().to(weight.device), dampening)
        energy = float(((weight @ h) * weight).sum()) or 1.0
        hinv = torch.linalg.inv(h)
        by_size: dict[int, list[int]] = {}
        for unit, cols in columns.items():
            by_size.setdefault(len(cols), []).append(unit)
        for group in by_size.values():
            index = torch.tensor([columns[u] for u in group], device=weight.device)
            for unit, cost in zip(group, group_costs(weight, hinv, index).tolist(), strict=True):
                costs[unit] = costs.get(unit, 0.0) + cost / energy
    missing = [u for u in units if u not in costs]
    if missing:
        log.info("obs: %d units are read by no calibrated linear layer; they are kept", len(missing))
    top = max(costs.values(), default=0.0) + 1.0
    return {u: costs.get(u, top) for u in units}
