"""Structural pruning of Hugging Face causal LMs: width (hidden size, MLP width, attention heads in whole
key/value groups) and depth (whole decoder layers), with a config that plain ``transformers`` loads.

Width goes through the generic machinery (:func:`~prunekit.structured.prune.prune_structurally`); the
calibration windows of the one-shot pipeline feed the ``activation`` criterion (``||W[:, j]|| x ||X_j||``).
Depth removes the decoder layers that change their input least, by the Block Influence of ShortGPT (Men et
al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", Eq. 1):
``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]`` over calibration tokens.

A pruned model keeps one size per field in its config, so widths must be the same in every layer (the
``uniform`` policy does that); :func:`update_config` refuses otherwise and
:func:`~prunekit.io.pruned.save_pruned` is then the way to save it. Every width-pruned model is then
checked against its own config (:func:`check_config_reload`): one decoder layer rebuilt by ``transformers``
from the updated config, with the pruned weights, must give the pruned model's logits.

What a config can express differs by family. Llama, Mistral, Qwen2, Gemma and Phi read ``head_dim``: heads
(in whole key/value groups; under multi-query attention, as in Gemma 2B, the query heads one by one beside
the single key/value head) and the MLP are pruned, and the hidden size on request (not for Gemma, which
scales its embeddings by ``sqrt(hidden_size)``: refused up front, and :func:`check_config_reload` would catch
it). GPT-2 and OPT size
their attention projections by ``hidden_size`` (:data:`ATTENTION_SIZED_BY_HIDDEN`): their heads are kept and
the MLP is pruned. In every family, the width of a head (``head_dim``) is kept: attention code reshapes
queries, keys and values with one shared ``head_dim``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.calibration.statistics import column_square_sums, gram_of
from prunekit.core.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import ATTENTION_NAME, DroppedAttention, dropped_attention_layers
from prunekit.structured.attention_drop import prune_causal_lm_attention
from prunekit.structured.cost import model_size
from prunekit.structured.graph import DependencyGraph, build_dependency_graph
from prunekit.structured.importance import Criterion, accumulate_linear_inputs, unit_importance
from prunekit.structured.plan import DEFAULT_KINDS, StructuralPlan, keep_best, plan_pruning
from prunekit.structured.prune import StructuralResult, Target, plan_to_target
from prunekit.structured.reconstruct import linears_with_prunable_inputs, refit_linears
from prunekit.structured.surgery import apply_plan

log = logging.getLogger(__name__)

#: transformers model types whose attention projections are sized by ``hidden_size`` (they read no
#: ``head_dim``): a config of theirs cannot say that heads were removed, so their heads are kept.
ATTENTION_SIZED_BY_HIDDEN = frozenset({"gpt2", "opt"})

#: transformers model types that multiply their embeddings by ``sqrt(config.hidden_size)``.
EMBEDDINGS_SCALED_BY_HIDDEN = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})

#: The config field of the MLP width, by model type (``intermediate_size`` for the others).
MLP_WIDTH_FIELD = {"gpt2": "n_inner", "opt": "ffn_dim"}

_ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
_QUERY_NAMES = ("q_proj", "query", "c_attn")  # GPT-2's c_attn holds queries, keys and values side by side
_KEY_NAMES = ("k_proj", "key")
_MLP_UP_NAMES = ("mlp.up_proj", "mlp.fc1", "mlp.c_fc", "mlp.dense_h_to_4h", "fc1")


def _submodule(parent: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    """The first of ``names`` (dotted paths) that ``parent`` has, with the module."""
    for name in names:
        try:
            return name, parent.get_submodule(name)
        except AttributeError:
            continue
    return None


def _out_width(module: nn.Module) -> int:
    """Output features of a Linear, or of a transformers ``Conv1D`` (weight stored ``(in, out)``)."""
    return module.out_features if isinstance(module, nn.Linear) else int(module.weight.shape[-1])


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
    dropped first (:mod:`~prunekit.structured.attention_drop`, He et al. 2024), and the width pruning then
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
    block_name, blocks = find_decoder_blocks(model)
    attention = _submodule(blocks[0], _ATTENTION_NAMES)
    if attention is None:
        raise StructuralPruningError(
            f"{type(blocks[0]).__name__} has no attention module named {' or '.join(_ATTENTION_NAMES)}: width "
            "pruning of this family needs an adapter; prune_causal_lm_depth removes whole layers of any family"
        )
    attention_name, attention_module = attention
    prefixes = tuple(f"{block_name}.{i}.{attention_name}." for i in range(len(blocks)))
    held = dict.fromkeys(_held_attention_spaces(graph, prefixes, model_type), 0.0)
    query = _submodule(attention_module, _QUERY_NAMES)
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
    target: Target,
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


def _block_sizes(block: nn.Module, head_dim: int, model_type: str) -> dict[str, int]:
    """The config sizes one decoder layer has: heads, key/value heads and MLP width (those it can tell)."""
    attention = _submodule(block, _ATTENTION_NAMES)
    up = _submodule(block, _MLP_UP_NAMES)
    query = _submodule(attention[1], _QUERY_NAMES) if attention else None
    if query is None or up is None:
        raise StructuralPruningError(
            f"{type(block).__name__} has no attention query projection ({', '.join(_QUERY_NAMES)}) or MLP input "
            f"({', '.join(_MLP_UP_NAMES)}): its config cannot be updated; save it with prunekit.save_pruned instead"
        )
    fused = query[0] == "c_attn"
    heads = _out_width(query[1]) // (3 * head_dim if fused else head_dim)
    key = None if fused else _submodule(attention[1], _KEY_NAMES)
    sizes = {"num_attention_heads": heads, MLP_WIDTH_FIELD.get(model_type, "intermediate_size"): _out_width(up[1])}
    if key is not None:
        sizes["num_key_value_heads"] = _out_width(key[1]) // head_dim
    return sizes


def _sync_query_groups(block: nn.Module, sizes: dict[str, int]) -> None:
    """Set the attention's ``num_key_value_groups`` (query heads per key/value head, which transformers
    computes once from the config and reads in ``repeat_kv`` and in one-token decoding) to the pruned
    counts: under multi-query attention, removing query heads changes it."""
    attention = _submodule(block, _ATTENTION_NAMES)
    kv_heads = sizes.get("num_key_value_heads")
    if attention is not None and kv_heads and hasattr(attention[1], "num_key_value_groups"):
        attention[1].num_key_value_groups = sizes["num_attention_heads"] // kv_heads


def update_config(model: nn.Module) -> None:
    """Write the pruned sizes into ``model.config`` (hidden size, MLP width, heads, key/value heads, head
    width, layers), and each attention's ``num_key_value_groups`` into the module, so that
    ``save_pretrained`` output loads with plain ``transformers``; the field names of GPT-2 and OPT are in
    :data:`MLP_WIDTH_FIELD` (the others map through the config's ``attribute_map``)."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    _, blocks = find_decoder_blocks(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = _submodule(blocks[0], _ATTENTION_NAMES)
    head_dim = getattr(attention[1], "head_dim", head_dim) if attention else head_dim
    sizes: dict[str, set[int]] = {}
    for block in blocks:
        if isinstance(getattr(block, ATTENTION_NAME, None), DroppedAttention):
            continue  # no attention sizes to write; save_pruned records the dropped attention
        block_sizes = _block_sizes(block, head_dim, model_type)
        for key, value in block_sizes.items():
            sizes.setdefault(key, set()).add(value)
        _sync_query_groups(block, block_sizes)
    uneven = {k: sorted(v) for k, v in sizes.items() if len(v) > 1}
    if uneven:
        raise StructuralPruningError(
            f"layers differ in {uneven}: a transformers config holds one size per field. Prune with the "
            "uniform policy, or save with prunekit.save_pruned and rebuild with prunekit.load_pruned"
        )
    config.hidden_size = hidden
    if model_type not in ATTENTION_SIZED_BY_HIDDEN:
        config.head_dim = head_dim
    for key, values in sizes.items():
        setattr(config, key, values.pop())
    config.num_hidden_layers = len(blocks)


def check_config_reload(model: nn.Module, example: torch.Tensor, *, atol: float = 1e-4) -> None:
    """Check that ``model.config`` describes the pruned model: build a one-layer model of the same class
    from the config (a copy with ``num_hidden_layers=1``), load the pruned weights of the first decoder layer,
    the embeddings, the final norm and the head, and compare its logits on ``example`` with those of the
    pruned model cut to its first layer. Fails with :class:`StructuralPruningError` where the shapes or the
    outputs differ (a size the config cannot hold, or a constant that a model computes from the config,
    like Gemma's ``sqrt(hidden_size)`` embedding scale). The rebuilt model's parameters are created on the
    meta device and then take the pruned model's tensors (no copy, no random initialisation, which for a
    large vocabulary would cost gigabytes); its buffers are built from the config, as transformers builds
    them, so a constant the config gets wrong shows in the logits. Costs one decoder layer's forward pass."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:1]
    block_name, blocks = find_decoder_blocks(model)
    reference = next(model.parameters())
    with init_empty_weights(include_buffers=False):
        fresh = type(model)(config).eval()
    prefix = f"{block_name}."
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix) or k.startswith(prefix + "0.")}
    problem = f"the updated config of this {getattr(config, 'model_type', type(model).__name__)} model does not "
    fix = "; save the pruned model with prunekit.save_pruned and rebuild it with prunekit.load_pruned instead"
    try:
        fresh.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise StructuralPruningError(
            f"{problem}give the pruned shapes ({str(exc).splitlines()[-1].strip()}){fix}"
        ) from exc
    fresh.to(device=reference.device, dtype=reference.dtype)  # the buffers; the parameters are already there
    parent_name, _, attr = block_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(list(blocks)[:1]))
    try:
        with torch.no_grad():
            ids = example.to(reference.device)
            expected = model(ids, use_cache=False).logits
            got = fresh(ids, use_cache=False).logits
    finally:
        setattr(parent, attr, blocks)
    difference = float((expected - got).abs().max())
    if not difference <= atol * max(1.0, float(expected.abs().max())):
        raise StructuralPruningError(
            f"{problem}reproduce its outputs when transformers rebuilds it (largest logit difference "
            f"{difference:.3g}): the model computes a constant from a size the pruning changed (as Gemma's "
            f"sqrt(hidden_size) embedding scale would){fix}"
        )


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
