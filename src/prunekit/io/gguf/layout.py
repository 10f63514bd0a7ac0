"""What a causal LM looks like to llama.cpp: its architecture name, hyperparameters and per-layer widths.

llama.cpp's ``llama`` graph takes one width for every layer. Its ``deci`` graph (written for DeciLM and
Llama-3.1-Nemotron-51B) reads the feed-forward width and the head counts per layer
(``deci.feed_forward_length``, ``deci.attention.head_count``, ``deci.attention.head_count_kv`` as arrays) and
skips the attention of a layer whose head count is 0. So a uniformly pruned model is exported as ``llama``,
and one with per-layer widths or dropped attention as ``deci``, which computes the same function.

Three conventions of that graph (read in llama.cpp's ``src/models/deci.cpp`` and ``llama-model.cpp``) decide
what can be expressed exactly:

- an attention-free layer adds nothing, while prunekit's dropped attention adds a constant (its mean output,
  :class:`~prunekit.models.dropped_attention.DroppedAttention`). The constant is added to the residual stream
  that nothing reads before the layer's MLP, so it moves exactly into the previous layer's ``ffn_down`` bias;
- a layer whose MLP width is 0 has its attention output discarded too (the graph ``continue``\\ s before the
  residual add), so an MLP with no channel is written as one channel of zeros, which adds exactly nothing;
- the head size is derived from layer 0's head count, so layer 0 must keep its attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import ATTENTION_NAME, DroppedAttention

#: transformers model types exported, and how: all three are pre-norm SwiGLU decoders with rotate-half RoPE,
#: which llama.cpp's ``llama`` / ``deci`` graphs compute once q/k rows are interleaved (:func:`rope_rows`).
FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class GgufLayer:
    """One decoder layer as written: query heads (0: attention dropped), key/value heads, MLP channels."""

    heads: int
    kv_heads: int
    channels: int
    #: the MLP had no channel; one channel of zeros is written (see the module docstring)
    zero_channel: bool = False


@dataclass(frozen=True)
class GgufLayout:
    """Architecture and hyperparameters of the GGUF file for one model."""

    arch: str
    family: str
    hidden: int
    head_dim: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool
    layers: tuple[GgufLayer, ...]
    #: decoder layer -> the constant of its dropped attention, folded into the previous layer's ffn_down bias
    folded: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return len({(layer.heads, layer.kv_heads, layer.channels) for layer in self.layers}) == 1


def _rope_theta(config: object) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(
            f"RoPE scaling {rope_type!r} is not exported to GGUF yet (llama.cpp needs its frequency factors "
            "written as a tensor): export a model with default RoPE, or convert with llama.cpp's own script"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConfigError("the model config names no rope_theta: it cannot be exported to GGUF")
    return float(theta)


def _layer(block: nn.Module, head_dim: int, index: int) -> GgufLayer:
    attention = getattr(block, ATTENTION_NAME, None)
    mlp = getattr(block, "mlp", None)
    if attention is None or mlp is None or not hasattr(mlp, "gate_proj"):
        raise ConfigError(
            f"decoder layer {index} ({type(block).__name__}) is not a Llama-style layer (self_attn and a gated "
            "mlp): it cannot be exported to GGUF"
        )
    channels = mlp.gate_proj.out_features
    if isinstance(attention, DroppedAttention):
        return GgufLayer(0, 0, max(channels, 1), channels == 0)
    heads, rest = divmod(attention.q_proj.out_features, head_dim)
    kv_heads, kv_rest = divmod(attention.k_proj.out_features, head_dim)
    if rest or kv_rest or heads == 0 or kv_heads == 0 or heads % kv_heads:
        raise ConfigError(
            f"decoder layer {index} has {attention.q_proj.out_features} query and {attention.k_proj.out_features} "
            f"key features, not whole heads of {head_dim} in groups: llama.cpp cannot run it"
        )
    return GgufLayer(heads, kv_heads, max(channels, 1), channels == 0)


def gguf_layout(model: nn.Module) -> GgufLayout:
    """The GGUF architecture and per-layer widths of ``model``, or a :class:`ConfigError` naming what llama.cpp
    could not run. Nothing is written and the model is not changed."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(
            f"GGUF export knows the families {', '.join(FAMILIES)}, not {family!r} "
            f"({type(model).__name__}): export one of those, or convert with llama.cpp's own script"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config.hidden_act!r}: llama.cpp's llama graph computes SiLU only")
    if family == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ConfigError("this Qwen2 model uses sliding-window attention, which llama.cpp's llama graph lacks")
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    if head_dim % 2:
        raise ConfigError(f"head size {head_dim} is odd: rotary embeddings need an even head size")
    _, blocks = find_decoder_blocks(model)
    layers = tuple(_layer(block, head_dim, i) for i, block in enumerate(blocks))
    if layers[0].heads == 0:
        raise ConfigError(
            "layer 0's attention is dropped: llama.cpp derives the head size from layer 0's head count, so it "
            "cannot load this model. Prune it again keeping layer 0's attention"
        )
    folded: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        attention = getattr(block, ATTENTION_NAME)
        if isinstance(attention, DroppedAttention) and bool(attention.bias.ne(0).any()):
            folded[i] = attention.bias.detach().float().cpu()
    vocab = model.get_input_embeddings().weight.shape[0]
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    shapes = {(layer.heads, layer.kv_heads, layer.channels) for layer in layers}
    arch = "llama" if len(shapes) == 1 and not any(layer.zero_channel for layer in layers) else "deci"
    return GgufLayout(
        arch=arch,
        family=family,
        hidden=hidden,
        head_dim=head_dim,
        vocab=vocab,
        context=int(getattr(config, "max_position_embeddings", 2048)),
        rope_theta=_rope_theta(config),
        rms_eps=float(config.rms_norm_eps),
        tied=tied,
        layers=layers,
        folded=folded,
    )


def rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (or its bias) from transformers' rotate-half RoPE, which
    pairs feature ``i`` of a head with ``i + d/2``, to llama.cpp's "normal" RoPE, which pairs ``2i`` with
    ``2i + 1``: within each head, row ``i`` of the first half goes to ``2i`` and of the second half to ``2i + 1``."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
