"""Least-squares reconstruction of the layers whose inputs lost channels: after structural pruning, each such
``nn.Linear`` is refitted so that its output on the kept inputs is as close as possible to the dense layer's
output on all of them, over calibration data.

The solve itself, ``W' (G_SS + lambda I) = W G[:, S] + lambda W[:, S]`` (Kwon et al. 2022, Sec. 4.3, layer-wise
reconstruction; OBS / SparseGPT's update for a whole removed column set), is
:func:`prunekit.reconstruction.least_squares_refit`, shared with one-shot pruning's refit; this module finds the
layers whose inputs a structural plan cut and refits them from the weights they held before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.calibration.statistics import gram_of
from prunekit.reconstruction.least_squares import least_squares_refit
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.importance import accumulate_linear_inputs
from prunekit.structured.plan import StructuralPlan

log = logging.getLogger(__name__)


def input_grams(
    model: nn.Module, batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``sum_t x_t x_t^T`` (float32) of the input of each ``nn.Linear`` named in ``names``, over every token of
    ``batches`` (``(args, kwargs)`` pairs the model is called with). Memory: ``in_features^2`` floats each."""
    return accumulate_linear_inputs(model, batches, names, gram_of)


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def linears_with_pruned_inputs(original: nn.Module, pruned: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``pruned`` that lost input features, except tied ones (a weight
    shared with an embedding, such as a tied ``lm_head``, must stay what the embedding is)."""
    shared = _shared_parameters(pruned)
    names = []
    for name, module in pruned.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in shared:
            continue
        before = original.get_submodule(name)
        if isinstance(before, nn.Linear) and module.in_features < before.in_features:
            names.append(name)
    return names


def linears_with_prunable_inputs(model: nn.Module, graph: DependencyGraph) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` whose input features ``graph`` lets a plan cut (a superset
    of what :func:`linears_with_pruned_inputs` finds after any plan), tied ones excepted: the layers whose
    Grams a refit may need, known before the plan."""
    shared = _shared_parameters(model)
    names = []
    for name, module in model.named_modules():
        dims = graph.state_dims.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or id(module.weight) in shared or dims is None:
            continue
        if any(graph.table.leaves(atom) for atom in np.unique(dims[1]).tolist()):
            names.append(name)
    return names


def refit_pruned_linears(
    original: nn.Module,
    pruned: nn.Module,
    graph: DependencyGraph,
    plan: StructuralPlan,
    batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = (),
    *,
    grams: Mapping[str, torch.Tensor] | None = None,
    damping: float = 0.01,
) -> list[str]:
    """Refit (:func:`least_squares_refit`) every ``nn.Linear`` of ``pruned`` whose inputs were cut by ``plan``,
    with input Grams measured on ``original`` (the dense model) over ``batches``, or taken from ``grams`` (by
    module name; measured beforehand, e.g. for :func:`linears_with_prunable_inputs`). ``pruned`` is changed in
    place; the refitted layer names are returned."""
    names = [n for n in linears_with_pruned_inputs(original, pruned) if f"{n}.weight" in graph.state_dims]
    if not names:
        return []
    if grams is None:
        if not batches:
            raise ValueError("refit_pruned_linears needs calibration batches, or the input grams measured beforehand")
        grams = input_grams(original, batches, names)
    missing = [n for n in names if n not in grams]
    if missing:
        raise ValueError(f"no input Gram for {missing[:3]}: measure them for linears_with_prunable_inputs(...)")
    dense = {name: original.get_submodule(name).weight for name in names}
    return refit_linears(pruned, graph, plan, dense, grams, damping=damping)


def refit_linears(
    pruned: nn.Module,
    graph: DependencyGraph,
    plan: StructuralPlan,
    dense: Mapping[str, torch.Tensor],
    grams: Mapping[str, torch.Tensor],
    *,
    damping: float = 0.01,
) -> list[str]:
    """Refit the layers named in ``dense`` (their weights before ``plan`` was applied) that lost inputs in
    ``pruned``, from their input ``grams``. Needs no dense model: a model pruned in place can be refitted
    from the weights it held before (a reference kept to the old tensors costs no copy, since the surgery
    puts new tensors in their place). ``pruned`` is changed in place; the refitted names are returned."""
    names = [name for name, weight in dense.items() if pruned.get_submodule(name).in_features < weight.shape[1]]
    for name in names:
        weight = dense[name]
        removed_rows, removed_cols = graph.removed_indices(f"{name}.weight", plan.removed)
        rows = torch.from_numpy(~removed_rows).to(weight.device)
        keep = torch.from_numpy(~removed_cols).to(weight.device)
        layer = pruned.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(least_squares_refit(weight[rows], grams[name], keep, damping).to(layer.weight))
    log.info("structured: refitted %d layers whose inputs were pruned (least squares on calibration data)", len(names))
    return names
