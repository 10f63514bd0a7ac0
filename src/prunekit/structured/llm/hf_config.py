"""A pruned causal LM's Hugging Face config brought in line with its weights, and checked.

A config holds one size per field. Where the layers differ (the width search,
:mod:`~prunekit.structured.llm.search`), :func:`update_config` writes transformers' ``per_layer_config`` if the
family's modeling code builds its layers from it, and otherwise makes the model's ``save_pretrained`` raise:
:func:`~prunekit.io.pruned.save_pruned` is then the way to save it. Every width-pruned model is then
checked against its own config (:func:`check_config_reload`): one decoder layer rebuilt by ``transformers``
from the updated config, with the pruned weights, must give the pruned model's logits.

What a config can express differs by family. Llama, Mistral, Qwen2, Gemma and Phi read ``head_dim``: heads
(in whole key/value groups; under multi-query attention, as in Gemma 2B, the query heads one by one beside
the single key/value head) and the MLP are pruned, and the hidden size on request (not for Gemma, which
scales its embeddings by ``sqrt(hidden_size)``: refused up front, and :func:`check_config_reload` would catch
it). GPT-2 and OPT size their attention projections by ``hidden_size`` (:data:`ATTENTION_SIZED_BY_HIDDEN`):
their heads are kept and the MLP is pruned. In every family, the width of a head (``head_dim``) is kept:
attention code reshapes queries, keys and values with one shared ``head_dim``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from prunekit.core.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import (
    ATTENTION_NAME,
    NO_ATTENTION,
    DroppedAttention,
    refuse_save_pretrained,
    save_pretrained_refusal,
)

log = logging.getLogger(__name__)

#: transformers model types whose attention projections are sized by ``hidden_size`` (they read no
#: ``head_dim``): a config of theirs cannot say that heads were removed, so their heads are kept.
ATTENTION_SIZED_BY_HIDDEN = frozenset({"gpt2", "opt"})


#: transformers model types that multiply their embeddings by ``sqrt(config.hidden_size)``.
EMBEDDINGS_SCALED_BY_HIDDEN = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


#: The config field of the MLP width, by model type (``intermediate_size`` for the others).
MLP_WIDTH_FIELD = {"gpt2": "n_inner", "opt": "ffn_dim"}

ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
QUERY_NAMES = ("q_proj", "query", "c_attn")  # GPT-2's c_attn holds queries, keys and values side by side
KEY_NAMES = ("k_proj", "key")
MLP_UP_NAMES = ("mlp.up_proj", "mlp.fc1", "mlp.c_fc", "mlp.dense_h_to_4h", "fc1")


def find_submodule(parent: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    """The first of ``names`` (dotted paths) that ``parent`` has, with the module."""
    for name in names:
        try:
            return name, parent.get_submodule(name)
        except AttributeError:
            continue
    return None


def out_width(module: nn.Module) -> int:
    """Output features of a Linear, or of a transformers ``Conv1D`` (weight stored ``(in, out)``)."""
    return module.out_features if isinstance(module, nn.Linear) else int(module.weight.shape[-1])


def _block_sizes(block: nn.Module, head_dim: int, model_type: str) -> dict[str, int]:
    """The config sizes one decoder layer has: heads, key/value heads and MLP width (those it can tell)."""
    attention = find_submodule(block, ATTENTION_NAMES)
    up = find_submodule(block, MLP_UP_NAMES)
    query = find_submodule(attention[1], QUERY_NAMES) if attention else None
    if query is None or up is None:
        raise StructuralPruningError(
            f"{type(block).__name__} has no attention query projection ({', '.join(QUERY_NAMES)}) or MLP input "
            f"({', '.join(MLP_UP_NAMES)}): its config cannot be updated; save it with prunekit.save_pruned instead"
        )
    fused = query[0] == "c_attn"
    heads = out_width(query[1]) // (3 * head_dim if fused else head_dim)
    key = None if fused else find_submodule(attention[1], KEY_NAMES)
    sizes = {"num_attention_heads": heads, MLP_WIDTH_FIELD.get(model_type, "intermediate_size"): out_width(up[1])}
    if key is not None:
        sizes["num_key_value_heads"] = out_width(key[1]) // head_dim
    return sizes


def _sync_query_groups(block: nn.Module, sizes: dict[str, int]) -> None:
    """Set the attention's ``num_key_value_groups`` (query heads per key/value head, which transformers
    computes once from the config and reads in ``repeat_kv`` and in one-token decoding) to the pruned
    counts: under multi-query attention, removing query heads changes it."""
    attention = find_submodule(block, ATTENTION_NAMES)
    kv_heads = sizes.get("num_key_value_heads")
    if attention is not None and kv_heads and hasattr(attention[1], "num_key_value_groups"):
        attention[1].num_key_value_groups = sizes["num_attention_heads"] // kv_heads


def update_config(model: nn.Module) -> None:
    """Write the pruned sizes into ``model.config`` (hidden size, MLP width, heads, key/value heads, head
    width, layers), and each attention's ``num_key_value_groups`` into the module, so that
    ``save_pretrained`` output loads with plain ``transformers``; the field names of GPT-2 and OPT are in
    :data:`MLP_WIDTH_FIELD` (the others map through the config's ``attribute_map``). Layers of different
    sizes go into ``per_layer_config`` where the family builds from it (:func:`_write_per_layer_config`);
    otherwise the per-layer fields keep their values and the model's ``save_pretrained`` raises, naming
    :func:`~prunekit.io.pruned.save_pruned`."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    _, blocks = find_decoder_blocks(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = find_submodule(blocks[0], ATTENTION_NAMES)
    head_dim = getattr(attention[1], "head_dim", head_dim) if attention else head_dim
    per_layer: dict[int, dict[str, int]] = {}
    for index, block in enumerate(blocks):
        if isinstance(getattr(block, ATTENTION_NAME, None), DroppedAttention):
            continue  # no attention sizes to write; save_pruned records the dropped attention
        per_layer[index] = _block_sizes(block, head_dim, model_type)
        _sync_query_groups(block, per_layer[index])
    config.hidden_size = hidden
    if model_type not in ATTENTION_SIZED_BY_HIDDEN:
        config.head_dim = head_dim
    config.num_hidden_layers = len(blocks)
    values: dict[str, set[int]] = {}
    for block_sizes in per_layer.values():
        for key, value in block_sizes.items():
            values.setdefault(key, set()).add(value)
    uneven = sorted(key for key, seen in values.items() if len(seen) > 1)
    dropped = len(per_layer) < len(blocks)
    if dropped and save_pretrained_refusal(model) is None:
        refuse_save_pretrained(model)  # a config cannot say that a layer has no attention
    if not uneven:
        for key, seen in values.items():
            setattr(config, key, seen.pop())
        return
    if not dropped and _write_per_layer_config(model, per_layer):
        log.info("structured: the layers differ in %s, written as the config's per_layer_config", uneven)
        return
    reason = (
        f"its decoder layers differ in {', '.join(uneven)}, which a {model_type or type(model).__name__} config "
        "cannot describe (its transformers modeling code builds every layer from the global sizes, not from "
        "per_layer_config)"
    )
    if dropped:
        reason = f"{NO_ATTENTION}, and {reason}"
    refuse_save_pretrained(model, reason)
    log.info(
        "structured: the layers differ in %s, which this family's config cannot describe: save the model with "
        "prunekit.save_pruned and load it with prunekit.load_model (its save_pretrained raises)",
        uneven,
    )


def _write_per_layer_config(model: nn.Module, per_layer: dict[int, dict[str, int]]) -> bool:
    """Describe layers of different sizes with transformers' ``per_layer_config`` (every layer's sizes as its
    overrides) where the family's modeling code builds its layers from it: a model of the same class built from
    the new config on the meta device must have exactly the pruned model's tensor shapes. In transformers 5.25
    dots3 and Step 3.7 build whole decoder layers from it and Gemma 4 only its attention sizes (its MLP reads
    the global ``intermediate_size`` and refuses a per-layer one); Llama, Mistral, Qwen, Phi and the rest build
    every layer from the global sizes. Where the probe fails ``model.config`` is left as it is."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(model.config)
    try:
        config.per_layer_config = {index: dict(sizes) for index, sizes in per_layer.items()}
        with init_empty_weights(include_buffers=False):
            fresh = type(model)(config)
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as exc:
        log.debug("structured: %s does not build from a per_layer_config: %s", type(model).__name__, exc)
        return False
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if expected != {name: tuple(t.shape) for name, t in fresh.state_dict().items()}:
        return False
    model.config = config
    return True


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
