"""Structural pruning of Hugging Face causal LMs: width (hidden size, MLP width, attention heads in whole
key/value groups) and depth (whole decoder layers), with a config that plain ``transformers`` loads.

Width goes through the generic machinery (:func:`~prunekit.structured.prune.prune_structurally`); the
calibration windows of the one-shot pipeline feed the ``activation`` criterion (``||W[:, j]|| x ||X_j||``).
Depth removes the decoder layers that change their input least, by the Block Influence of ShortGPT (Men et
al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", Eq. 1):
``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]`` over calibration tokens.

A pruned model keeps one size per field in its config, so widths must be the same in every layer (the
``uniform`` policy does that); :func:`update_config` refuses otherwise and
:func:`~prunekit.structured.saving.save_pruned` is then the way to save it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.structured.graph import DependencyGraph, build_dependency_graph
from prunekit.structured.importance import (
    Criterion,
    accumulate_linear_inputs,
    column_square_sums,
    unit_importance,
)
from prunekit.structured.plan import DEFAULT_KINDS, StructuralPlan, keep_best, plan_pruning
from prunekit.structured.prune import StructuralResult, Target, plan_to_target
from prunekit.structured.reconstruct import gram_of, linears_with_prunable_inputs, refit_pruned_linears
from prunekit.structured.surgery import apply_plan

log = logging.getLogger(__name__)


def _batches(windows: torch.Tensor, batch_size: int) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    return [((windows[i : i + batch_size],), {"use_cache": False}) for i in range(0, len(windows), batch_size)]


def _calibration_statistics(
    model: nn.Module,
    graph: DependencyGraph,
    batches: list[tuple[tuple[Any, ...], dict[str, Any]]],
    criterion: Criterion,
    reconstruct: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One pass over the calibration batches for what width pruning needs: the input Grams of the linear
    layers whose inputs may be cut (for the refit, with ``reconstruct``), and the input column norms of every
    linear layer (for the ``activation`` criterion; a Gram's diagonal where there is one)."""
    gram_names = linears_with_prunable_inputs(model, graph) if reconstruct else []
    norm_names = []
    if criterion == "activation":
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        norm_names = [name for name in linears if name not in gram_names]
    statistics = {**dict.fromkeys(gram_names, gram_of), **dict.fromkeys(norm_names, column_square_sums)}
    sums = accumulate_linear_inputs(model, batches, list(statistics), statistics) if statistics else {}
    grams = {name: sums[name] for name in gram_names if name in sums}
    if criterion != "activation":
        return grams, None
    norms = {f"{name}.weight": sums[name].diagonal().float() if name in grams else sums[name].float() for name in sums}
    return grams, norms


def prune_causal_lm_width(
    model: nn.Module,
    calibration: torch.Tensor,
    ratio: float,
    *,
    target: Target = "params",
    criterion: Criterion = "activation",
    kinds: Sequence[str] = DEFAULT_KINDS,
    round_to: int = 1,
    prune_hidden: bool = False,
    batch_size: int = 1,
    reconstruct: bool = True,
) -> StructuralResult:
    """Remove ``ratio`` of the parameters (``target="params"``), MACs or channels of a causal LM's width:
    MLP width, attention heads (query heads with their key/value head) and, with ``prune_hidden``, the
    hidden size (embeddings and head included; off by default: on SmolLM2 at 25% of the parameters it costs
    far more perplexity than taking the same parameters from the MLP and heads), the least important first by
    ``criterion`` measured on the ``(n, seqlen)`` ``calibration`` windows. The hidden size is kept a multiple
    of the number of heads (transformers requires it). With ``reconstruct``, every linear layer that lost
    inputs is then refitted by least squares on the calibration windows
    (:mod:`~prunekit.structured.reconstruct`). The windows go through the model once: the criterion's norms
    and the refit's Grams are gathered in the same pass. The returned model's
    config is updated (:func:`update_config`); ``model`` is not modified."""
    embeddings = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embeddings)
    example = calibration[:1, : min(16, calibration.shape[1])]
    kwargs = {"use_cache": False}
    graph = build_dependency_graph(model, (example,), kwargs, ignored=[] if prune_hidden else [embedding_name])
    grams, norms = _calibration_statistics(model, graph, _batches(calibration, batch_size), criterion, reconstruct)
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for (ids,), batch_kwargs in _batches(calibration, batch_size):
                model(ids, labels=ids, **batch_kwargs).loss.backward()
    scores = unit_importance(graph, model, criterion, input_norms=norms)
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
    hidden = next((s for s in graph.spaces if (f"{embedding_name}.weight", 1) in s.where), None)
    _, blocks = find_decoder_blocks(model)
    block_name = next(name for name, module in model.named_modules() if module is blocks)
    q_weight = f"{block_name}.0.self_attn.q_proj.weight"
    head_dim = getattr(blocks[0].self_attn, "head_dim", None)

    def make(channel_ratio: float) -> StructuralPlan:
        plan = plan_pruning(graph, scores, channel_ratio, kinds=kinds, round_to=round_to)
        if hidden is None or head_dim is None or q_weight not in graph.state_dims:
            return plan
        heads = int((~graph.removed_indices(q_weight, plan.removed)[0]).sum()) // head_dim
        spaces = []
        for space_plan in plan.spaces:
            if space_plan.space is hidden and len(space_plan.keep) % heads:
                keep_n = min(hidden.size, -(-len(space_plan.keep) // heads) * heads)
                space_plan = keep_best(hidden, scores, keep_n)
            spaces.append(space_plan)
        return StructuralPlan(graph, spaces, {u for p in spaces for u in p.removed})

    plan = plan_to_target(graph, scores, ratio, target, make=make)
    pruned = apply_plan(model, plan, (example,), kwargs)
    if reconstruct:
        refit_pruned_linears(model, pruned, graph, plan, grams=grams)
    update_config(pruned)
    return StructuralResult(pruned, plan, graph)


def update_config(model: nn.Module) -> None:
    """Write the pruned sizes into ``model.config`` (hidden size, intermediate size, heads, key/value
    heads, head width, layers) so that ``save_pretrained`` output loads with plain ``transformers``."""
    config = model.config
    _, blocks = find_decoder_blocks(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    sizes: dict[str, set[int]] = {
        "intermediate_size": set(),
        "num_attention_heads": set(),
        "num_key_value_heads": set(),
    }
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for block in blocks:
        attn = getattr(block, "self_attn", None)
        mlp = getattr(block, "mlp", None)
        if attn is None or mlp is None:
            raise StructuralPruningError(
                f"{type(block).__name__} has no self_attn / mlp: its config cannot be updated; save it with "
                "prunekit.save_pruned instead"
            )
        head_dim = getattr(attn, "head_dim", head_dim)
        sizes["num_attention_heads"].add(attn.q_proj.out_features // head_dim)
        sizes["num_key_value_heads"].add(attn.k_proj.out_features // head_dim)
        up = getattr(mlp, "up_proj", None) or getattr(mlp, "fc1", None)
        sizes["intermediate_size"].add(up.out_features)
    uneven = {k: sorted(v) for k, v in sizes.items() if len(v) > 1}
    if uneven:
        raise StructuralPruningError(
            f"layers differ in {uneven}: a transformers config holds one size per field. Prune with the "
            "uniform policy, or save with prunekit.save_pruned and rebuild with prunekit.load_pruned"
        )
    config.hidden_size = hidden
    config.head_dim = head_dim
    for key, values in sizes.items():
        setattr(config, key, values.pop())
    config.num_hidden_layers = len(blocks)


def block_influence(model: nn.Module, calibration: torch.Tensor, batch_size: int = 1) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer: ``1 - mean cosine(input, output)`` over tokens."""
    _, blocks = find_decoder_blocks(model)
    totals = [0.0] * len(blocks)
    count = 0
    handles = []

    def hook(index: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            x_out = (output[0] if isinstance(output, (tuple, list)) else output).detach().float()
            cos = torch.nn.functional.cosine_similarity(
                x_in.reshape(-1, x_in.shape[-1]), x_out.reshape(-1, x_out.shape[-1]), dim=-1
            )
            totals[index] += float((1.0 - cos).sum())

        return record

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for (ids,), kwargs in _batches(calibration, batch_size):
                model(ids, **kwargs)
                count += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [t / count for t in totals]


def remove_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """A copy of ``model`` without the decoder layers ``indices``; layer numbers (for the KV cache) and the
    config (``num_hidden_layers``, ``layer_types``) follow."""
    pruned = copy.deepcopy(model)
    name, blocks = find_decoder_blocks(pruned)
    drop = set(indices)
    if not drop <= set(range(len(blocks))):
        raise StructuralPruningError(f"layer indices {sorted(drop)} out of range for {len(blocks)} layers")
    if len(drop) >= len(blocks):
        raise StructuralPruningError("cannot remove every decoder layer")
    kept = [block for i, block in enumerate(blocks) if i not in drop]
    parent_name, _, attr = name.rpartition(".")
    parent = pruned.get_submodule(parent_name) if parent_name else pruned
    setattr(parent, attr, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = pruned.config
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [t for i, t in enumerate(types) if i not in drop]
    config.num_hidden_layers = len(kept)
    return pruned


def prune_causal_lm_depth(
    model: nn.Module, calibration: torch.Tensor, ratio: float, *, batch_size: int = 1
) -> tuple[nn.Module, list[int]]:
    """Remove the fewest decoder layers of lowest Block Influence whose parameters add up to at least
    ``ratio`` of the model's parameters. Returns the new model and the removed layer indices."""
    _, blocks = find_decoder_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    scores = block_influence(model, calibration, batch_size)
    order = sorted(range(len(blocks)), key=lambda i: scores[i])
    removed: list[int] = []
    gone = 0
    for i in order:
        if gone >= ratio * total or len(removed) == len(blocks) - 1:
            break
        removed.append(i)
        gone += sum(p.numel() for p in blocks[i].parameters())
    log.info(
        "structured: removing layers %s (block influence %s)",
        sorted(removed),
        [round(scores[i], 4) for i in sorted(removed)],
    )
    return remove_layers(model, removed), sorted(removed)
