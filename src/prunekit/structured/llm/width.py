"""Width pruning of Hugging Face causal LMs: hidden size, MLP width, attention heads in whole key/value
groups, with a config that plain ``transformers`` loads (:mod:`~prunekit.structured.llm.hf_config`).

Width goes through the generic machinery (:func:`~prunekit.structured.prune.plan_to_target`); the
calibration windows of the one-shot pipeline feed the ``activation`` criterion (``||W[:, j]|| x ||X_j||``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.calibration.statistics import column_square_sums, gram_of
from prunekit.core.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import ATTENTION_NAME, dropped_attention_layers
from prunekit.structured.cost import model_size
from prunekit.structured.graph import DependencyGraph, build_dependency_graph
from prunekit.structured.graph.surgery import apply_plan
from prunekit.structured.importance import Criterion, accumulate_linear_inputs, taylor_importance, unit_importance
from prunekit.structured.llm.attention_drop import prune_causal_lm_attention
from prunekit.structured.llm.hf_config import (
    ATTENTION_NAMES,
    ATTENTION_SIZED_BY_HIDDEN,
    EMBEDDINGS_SCALED_BY_HIDDEN,
    QUERY_NAMES,
    check_config_reload,
    find_submodule,
    update_config,
)
from prunekit.structured.llm.windows import window_batches
from prunekit.structured.plan import DEFAULT_KINDS, StructuralPlan, keep_best, plan_pruning
from prunekit.structured.prune import BudgetTarget, StructuralResult, plan_to_target
from prunekit.structured.reconstruct import linears_with_prunable_inputs, refit_linears

log = logging.getLogger(__name__)


def _held_attention_spaces(graph: DependencyGraph, attention_prefixes: tuple[str, ...], model_type: str) -> list[int]:
    """Spaces inside attention modules that a config cannot express: the width of a head where it shows up
    as plain channels (a layout whose head axis could not be factored, so that ``head_dim`` would change),
    and every head of :data:`ATTENTION_SIZED_BY_HIDDEN` families."""
    held = []
    for space in graph.spaces:
        if not all(name.startswith(attention_prefixes) for name, _ in space.where):
            continue
        if space.kind == "plain" or model_type in ATTENTION_SIZED_BY_HIDDEN:
            held.append(space.index)
    return held


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
    gram_names = linears_with_prunable_inputs(model, graph) if reconstruct or criterion == "obs" else []
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
    target: BudgetTarget = "params",
    criterion: Criterion = "obs",
    kinds: Sequence[str] = DEFAULT_KINDS,
    round_to: int = 1,
    prune_hidden: bool = False,
    batch_size: int = 1,
    reconstruct: bool = True,
    drop_attention: int = 0,
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
    config is updated (:func:`update_config`); ``model`` is not modified.

    With ``drop_attention=k``, the attention sublayers of the ``k`` layers of lowest attention influence are
    dropped first (:mod:`~prunekit.structured.llm.attention_drop`, He et al. 2024), and the width pruning then
    takes what is left of the ``params`` or ``macs`` target (both counted against the model as given). Such
    a model is saved with :func:`~prunekit.io.pruned.save_pruned` (a transformers config cannot say
    that a layer has no attention)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if prune_hidden and model_type in ATTENTION_SIZED_BY_HIDDEN | EMBEDDINGS_SCALED_BY_HIDDEN:
        why = (
            "transformers sizes its attention by hidden_size, so a smaller hidden size needs smaller attention "
            "projections than the heads kept"
            if model_type in ATTENTION_SIZED_BY_HIDDEN
            else "it scales its embeddings by sqrt(hidden_size), a constant a smaller hidden size would change"
        )
        raise StructuralPruningError(
            f"prune_hidden is not available for {model_type}: {why}. Prune with prune_hidden=False (the MLP "
            "width and, where the config can say so, attention heads), or remove whole layers with "
            "prune_causal_lm_depth"
        )
    example = calibration[:1, : min(16, calibration.shape[1])]
    kwargs = {"use_cache": False}
    if drop_attention:
        model, ratio = _drop_attention_first(model, calibration, example, ratio, target, drop_attention, batch_size)
    embeddings = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embeddings)
    graph = build_dependency_graph(model, (example,), kwargs, ignored=[] if prune_hidden else [embedding_name])
    if criterion == "obs" and not linears_with_prunable_inputs(model, graph):
        log.info("structured: no nn.Linear reads the prunable units (GPT-2's Conv1D...): scoring by activation")
        criterion = "activation"
    grams, norms = _calibration_statistics(
        model, graph, window_batches(calibration, batch_size), criterion, reconstruct
    )
    if criterion == "taylor":
        losses = [
            lambda ids=ids, kw=batch_kwargs: model(ids, labels=ids, **kw).loss
            for (ids,), batch_kwargs in window_batches(calibration, batch_size)
        ]
        scores = taylor_importance(graph, model, losses)
    else:
        scores = unit_importance(graph, model, criterion, input_norms=norms, grams=grams)
    hidden = next((s for s in graph.spaces if (f"{embedding_name}.weight", 1) in s.where), None)
    block_name, blocks = find_decoder_blocks(model)
    attention = find_submodule(blocks[0], ATTENTION_NAMES)
    if attention is None:
        raise StructuralPruningError(
            f"{type(blocks[0]).__name__} has no attention module named {' or '.join(ATTENTION_NAMES)}: width "
            "pruning of this family needs an adapter; prune_causal_lm_depth removes whole layers of any family"
        )
    attention_name, attention_module = attention
    prefixes = tuple(f"{block_name}.{i}.{attention_name}." for i in range(len(blocks)))
    held = dict.fromkeys(_held_attention_spaces(graph, prefixes, model_type), 0.0)
    query = find_submodule(attention_module, QUERY_NAMES)
    q_weight = f"{block_name}.0.{attention_name}.{query[0]}.weight" if query else ""
    head_dim = getattr(attention_module, "head_dim", None)

    def make(channel_ratio: float) -> StructuralPlan:
        plan = plan_pruning(graph, scores, channel_ratio, kinds=kinds, round_to=round_to, space_ratios=held)
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
    # the refit reads the weights as they were before the surgery, which puts new tensors in their place; an
    # attention-dropped model is already this function's own copy, so it is pruned in place (one copy fewer)
    dense = {name: model.get_submodule(name).weight.detach() for name in grams}
    pruned = apply_plan(model, plan, (example,), kwargs, inplace=bool(drop_attention))
    if reconstruct:
        refit_linears(pruned, graph, plan, dense, grams)
    elif criterion == "obs":
        log.info("structured: the obs criterion scores units by the error left after the refit, which is off")
    del dense
    update_config(pruned)
    check_config_reload(pruned, example)
    dropped_layers = dropped_attention_layers(pruned)
    if dropped_layers:
        log.info(
            "structured: layers %s have no attention, which a transformers config cannot say: save this model "
            "with prunekit.save_pruned and load it with prunekit.load_model (its save_pretrained raises)",
            dropped_layers,
        )
    dropped = [f"{block_name}.{i}.{ATTENTION_NAME}" for i in dropped_layers]
    return StructuralResult(pruned, plan, graph, removed_blocks=dropped)


def _drop_attention_first(
    model: nn.Module,
    calibration: torch.Tensor,
    example: torch.Tensor,
    ratio: float,
    target: BudgetTarget,
    count: int,
    batch_size: int,
) -> tuple[nn.Module, float]:
    """The model with ``count`` attention sublayers dropped, and the share of its own ``target`` that width
    pruning must still remove for the whole to lose ``ratio`` of the original's."""
    if target not in ("params", "macs"):
        raise StructuralPruningError(
            f"drop_attention needs a 'params' or 'macs' target (one the dropped attention counts towards), not "
            f"{target!r}"
        )

    def size(m: nn.Module) -> int:
        if target == "params":
            return sum(p.numel() for p in m.parameters())  # a tied parameter is yielded once
        return model_size(m, (example,), {"use_cache": False})[1]

    before = size(model)
    dropped, layers = prune_causal_lm_attention(model, calibration, count, batch_size=batch_size)
    after = size(dropped)
    left = 1.0 - (1.0 - ratio) * before / after
    if left <= 0.0:
        raise StructuralPruningError(
            f"dropping the attention of {count} layers ({layers}) already removes {1 - after / before:.1%} of the "
            f"{target}, at least the {ratio:.1%} asked for: drop fewer (drop_attention) or use "
            "prune_causal_lm_attention alone"
        )
    return dropped, left
