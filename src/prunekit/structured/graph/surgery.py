"""Physically remove the units of a plan: slice every parameter and buffer, then make each module's
attributes (``in_features``, ``out_channels``, ``groups``, ``num_heads``...) agree with its new weights.

The input model is never modified: surgery works on a deep copy unless ``inplace=True``. With example
inputs, the pruned model is traced again and checked against the plan tensor by tensor, size attributes that
its Python code reads are repaired (:mod:`~prunekit.structured.graph.verify`), and it is run once; if it fails or
its outputs change shape, :class:`~prunekit.core.errors.StructuralPruningError` says so instead of handing back a
broken model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from prunekit.core.errors import StructuralPruningError
from prunekit.structured.graph.verify import UnrepairedProblem, repair_size_attributes
from prunekit.structured.plan import StructuralPlan

log = logging.getLogger(__name__)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """``id(tensor) -> [(module, attribute, is_parameter)]`` for every parameter and buffer, tied ones
    listed under every owner."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr, True))
        for attr, b in module._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((module, attr, False))
    return owners


def slice_tensor(tensor: torch.Tensor, keep: Sequence[np.ndarray]) -> torch.Tensor:
    """``tensor`` with only the kept indices of each dimension (``keep[d]`` a boolean mask)."""
    out = tensor
    for d, mask in enumerate(keep):
        if not mask.all():
            index = torch.from_numpy(np.flatnonzero(mask)).to(out.device)
            out = out.index_select(d, index)
    return out.contiguous()


def apply_plan(
    model: nn.Module,
    plan: StructuralPlan,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with the plan's units removed (a new model unless ``inplace``)."""
    reference = None
    if example_inputs is not None:
        reference = _output_shapes(model, example_inputs, example_kwargs)
    target = model if inplace else copy.deepcopy(model)
    state = dict(target.named_parameters())
    for name, buffer in target.named_buffers():
        state.setdefault(name, buffer)
    owners = _owners(target)
    graph = plan.graph
    for name in graph.state_dims:
        removed = graph.removed_indices(name, plan.removed)
        if not any(m.any() for m in removed):
            continue
        tensor = state[name]
        keep = [~m for m in removed]
        if any(not k.any() for k in keep):
            raise StructuralPruningError(f"the plan removes every index of a dimension of {name!r}")
        with torch.no_grad():
            new = slice_tensor(tensor, keep)
        replacement = nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
        for module, attr, is_param in owners.pop(id(tensor)):  # tied tensors stay one tensor
            (module._parameters if is_param else module._buffers)[attr] = replacement
    _update_attributes(target, plan)
    if example_inputs is not None:
        try:
            repair_size_attributes(target, plan, example_inputs, example_kwargs)
        except UnrepairedProblem as error:
            failure = StructuralPruningError(
                f"the pruned model does not follow the plan: {error}. That module computes a size the plan "
                "changes from something prunekit cannot update; keep it whole (ignored=[...]) or prune fewer "
                "kinds of units"
            )
            failure.module_name = error.problem.module
            raise failure from error
        _verify(target, example_inputs, example_kwargs, reference)  # type: ignore[arg-type]
    return target


def _kept_groups(plan: StructuralPlan, weight_name: str) -> int | None:
    atoms = plan.graph.groups.get(weight_name)
    if atoms is None:
        return None
    table = plan.graph.table
    return int(sum(1 for a in atoms.tolist() if not any(leaf in plan.removed for leaf in table.leaves(a))))


def _update_attributes(model: nn.Module, plan: StructuralPlan) -> None:
    """Make module attributes match the sliced weights (for the module types PyTorch ships)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd):
            groups = _kept_groups(plan, prefix + "weight")
            if groups is not None:
                module.groups = groups
            w = module.weight
            if module.transposed:
                module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
            else:
                module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            source = module.weight if module.weight is not None else module.running_mean
            if source is not None:
                module.num_features = source.shape[0]
        elif isinstance(module, nn.GroupNorm):
            groups = _kept_groups(plan, prefix + "weight")
            if groups is not None:
                module.num_groups = groups
            if module.weight is not None:
                module.num_channels = module.weight.shape[0]
        elif isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            if getattr(module, "weight", None) is not None:
                module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif isinstance(module, nn.PReLU):
            module.num_parameters = module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention):
            _update_mha(module, plan, prefix)


def _update_mha(module: nn.MultiheadAttention, plan: StructuralPlan, prefix: str) -> None:
    if not module._qkv_same_embed_dim:
        return
    old_e = plan.graph.state_dims[prefix + "in_proj_weight"][1].size
    new_e = module.in_proj_weight.shape[1]
    if new_e == old_e:
        return
    # heads left: distinct outer components among the kept query rows
    table = plan.graph.table
    rows = plan.graph.state_dims[prefix + "in_proj_weight"][0][:old_e].tolist()
    heads = set()
    for atom in rows:
        leaves = table.leaves(atom)
        if any(leaf in plan.removed for leaf in leaves):
            continue
        heads.add(leaves[0] if len(leaves) > 1 else None)
    num_heads = module.num_heads if None in heads or not heads else len(heads)
    module.embed_dim = module.kdim = module.vdim = new_e
    module.num_heads = num_heads
    module.head_dim = new_e // num_heads


def _output_shapes(model: nn.Module, inputs: Sequence[Any], kwargs: dict[str, Any] | None) -> list[Any]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*inputs, **(kwargs or {}))
    finally:
        model.train(was_training)
    return [
        tuple(x.shape) if isinstance(x, torch.Tensor) else x
        for x in pytree.tree_leaves(out)
        if isinstance(x, torch.Tensor)
    ]


def _verify(model: nn.Module, inputs: Sequence[Any], kwargs: dict[str, Any] | None, reference: list[Any]) -> None:
    try:
        shapes = _output_shapes(model, inputs, kwargs)
    except Exception as error:  # the pruned model's own code failed
        raise StructuralPruningError(
            f"the pruned model does not run: {type(error).__name__}: {error}. Some code in the model uses a "
            "size that the plan changed; add the module to ignored_modules or prune fewer kinds of units"
        ) from error
    if shapes != reference:
        raise StructuralPruningError(
            f"the pruned model's outputs have shapes {shapes}, the original's {reference}: a frozen dimension "
            "was pruned; please report this model"
        )
