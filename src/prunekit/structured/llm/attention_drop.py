"""Attention drop: remove the whole attention sublayer of the decoder layers that change their input least.

He, Sun, Shen and Li (2024), "What Matters in Transformers? Not All Attention is Needed" (arXiv 2406.15786),
Sec. 3: the importance of a pre-norm attention sublayer with input ``X`` and output
``Y = X + Attention(LN(X))`` is ``S = 1 - E_t[cos(X_t, Y_t)]`` over calibration tokens (their similarity-based
score: the Block Influence of ShortGPT applied to the sublayer); the sublayers of lowest ``S`` are dropped in
one shot. A dropped layer keeps its MLP; its attention and the norm that fed only the attention are gone, and
with them the layer's key/value cache, rotary embedding and attention call: the fixed per-layer costs that
width pruning cannot remove, which is why dropping attention speeds up batch-1 decoding more per parameter
than narrowing it.

Layer 0 always keeps its attention: transformers reads the length of the KV cache from layer 0
(``Cache.get_seq_length(layer_idx=0)``), and a layer 0 without a cache would restart every step's positions
at 0. A transformers config cannot say that a layer has no attention, so an attention-dropped model is saved
with :func:`~prunekit.io.pruned.save_pruned` and loaded with :func:`prunekit.load_model` (or
:func:`~prunekit.io.pruned.load_pruned`), which rebuild the :class:`DroppedAttention` modules.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prunekit.calibration.hooks import first_input, first_output, observe, run_batches
from prunekit.core.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.dropped_attention import (
    ATTENTION_NAME,
    DroppedAttention,
    dropped_attention_layers,
    refuse_save_pretrained,
)
from prunekit.structured.depth import block_influence
from prunekit.structured.llm.windows import window_batches

log = logging.getLogger(__name__)

INPUT_NORM_NAME = "input_layernorm"
POST_ATTENTION_NORM_NAME = "post_attention_layernorm"
#: Layers with these modules apply more than ``x + attn(ln(x))`` around their attention (a norm on the
#: attention's output, as Gemma 2 and 3 do; attention and MLP side by side, as Phi-1/2 do): not supported.
_UNSUPPORTED_MARKERS = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "resid_dropout")


def check_layer(
    block: nn.Module, index: int, *, method: str = "attention drop", instead: str = "prune_causal_lm_depth"
) -> None:
    """Refuse decoder layer ``index`` unless it is pre-norm ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` with
    the transformers names of Llama (what attention drop and the width search rebuild); the error names the
    ``method`` and what to use ``instead``."""
    names = {name for name, _ in block.named_children()}
    problem = None
    needed = {ATTENTION_NAME, INPUT_NORM_NAME, POST_ATTENTION_NORM_NAME, "mlp"}
    if not needed <= names:
        problem = f"lacks {sorted(needed - names)}"
    elif names & set(_UNSUPPORTED_MARKERS):
        problem = f"has {sorted(names & set(_UNSUPPORTED_MARKERS))}, so its attention is not x + attn(ln(x))"
    if problem:
        raise StructuralPruningError(
            f"decoder layer {index} ({type(block).__name__}) {problem}: {method} supports pre-norm layers "
            f"(Llama, Mistral, Qwen2/3, Phi-3 and alike). Use {instead} instead"
        )


def attention_statistics(
    model: nn.Module, calibration: torch.Tensor, batch_size: int = 1
) -> tuple[list[float], list[torch.Tensor | None]]:
    """For every decoder layer, over the tokens of the ``(n, seqlen)`` calibration windows: the influence
    ``S_i = 1 - E_t[cos(X_t, X_t + Attention_i(LN(X_t)))]`` of its attention (He et al. 2024, Sec. 3) and the
    attention's mean output ``E_t[Attention_i(LN(X_t))]`` (float32). A layer whose attention is already
    dropped scores 0, with no mean."""
    _, blocks = find_decoder_blocks(model)
    for index, block in enumerate(blocks):
        check_layer(block, index)
    totals = [0.0] * len(blocks)
    sums: list[torch.Tensor | None] = [None] * len(blocks)
    inputs: dict[int, torch.Tensor] = {}
    count = 0

    def keep_input(layer: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs[int(layer)] = first_input(args, kwargs).detach()

    def score(layer: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        index = int(layer)
        x = inputs.pop(index).float()
        flat = x.reshape(-1, x.shape[-1])
        attended = first_output(output).detach().float().reshape(flat.shape)
        # the attention sublayer's Block Influence: what the residual stream is before and after it
        totals[index] += block_influence(flat, flat + attended, per="token") * flat.shape[0]
        total = attended.sum(dim=0)
        sums[index] = total if sums[index] is None else sums[index] + total

    live = {
        str(index): block
        for index, block in enumerate(blocks)
        if not isinstance(getattr(block, ATTENTION_NAME), DroppedAttention)
    }
    attentions = {index: getattr(block, ATTENTION_NAME) for index, block in live.items()}
    with observe(live, on_input=keep_input), observe(attentions, on_output=score):
        for batch in window_batches(calibration, batch_size):
            run_batches(model, [batch])
            count += batch[0][0].numel()
    return [t / count for t in totals], [None if t is None else t / count for t in sums]


def drop_attention(
    model: nn.Module, layers: Sequence[int], *, biases: Sequence[torch.Tensor | None] | None = None
) -> nn.Module:
    """A copy of ``model`` whose decoder layers ``layers`` have no attention: the attention becomes a
    :class:`DroppedAttention` (returning ``biases[i]`` where given, else zeros) and the norm before it an
    ``nn.Identity`` (its only reader was the attention). ``model`` is not modified. The copy's
    ``save_pretrained`` raises (:func:`refuse_save_pretrained`): save it with
    :func:`~prunekit.io.pruned.save_pruned`."""
    _, blocks = find_decoder_blocks(model)
    drop = sorted(set(layers))
    if any(not 0 <= i < len(blocks) for i in drop):
        raise StructuralPruningError(f"layer indices {drop} out of range for {len(blocks)} layers")
    if 0 in drop:
        raise StructuralPruningError(
            "layer 0 keeps its attention: transformers reads the KV cache's length from layer 0. Drop the "
            "attention of other layers"
        )
    for i in drop:
        check_layer(blocks[i], i)
    pruned = copy.deepcopy(model)
    _, pruned_blocks = find_decoder_blocks(pruned)
    hidden = model.get_input_embeddings().weight.shape[1]
    for i in drop:
        norm = getattr(pruned_blocks[i], INPUT_NORM_NAME)
        reference = next(iter(norm.parameters()), None)
        dropped = DroppedAttention(hidden)
        if reference is not None:
            dropped.to(device=reference.device, dtype=reference.dtype)
        bias = biases[i] if biases is not None else None
        if bias is not None:
            dropped.bias.copy_(bias)
        setattr(pruned_blocks[i], ATTENTION_NAME, dropped)
        setattr(pruned_blocks[i], INPUT_NORM_NAME, nn.Identity())
    if drop:
        refuse_save_pretrained(pruned)
    return pruned


def least_influential_attention(scores: Sequence[float], count: int, *, keep: Sequence[int] = (0,)) -> list[int]:
    """The ``count`` layers of lowest attention influence ``scores``, never those in ``keep``; sorted."""
    kept = set(keep)
    candidates = [i for i in range(len(scores)) if i not in kept]
    if not 0 <= count <= len(candidates):
        raise StructuralPruningError(
            f"cannot drop the attention of {count} layers: {len(candidates)} of the {len(scores)} may drop it "
            f"(layers {sorted(keep)} keep theirs)"
        )
    return sorted(sorted(candidates, key=lambda i: scores[i])[:count])


def prune_causal_lm_attention(
    model: nn.Module, calibration: torch.Tensor, count: int, *, compensate: bool = True, batch_size: int = 1
) -> tuple[nn.Module, list[int]]:
    """Drop the attention of the ``count`` decoder layers of lowest attention influence (one shot, as He et
    al. 2024 do; :func:`attention_statistics`). With ``compensate``, each dropped attention is replaced by
    its mean output on the calibration tokens instead of zeros, which keeps the residual stream's mean where
    the attention put it (the baseline bias compensation that FLAP applies to pruned channels: An et al.
    2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models"). Returns the new model
    and the layers whose attention was dropped; ``model`` is not modified."""
    scores, means = attention_statistics(model, calibration, batch_size)
    layers = least_influential_attention(scores, count, keep=[0, *dropped_attention_layers(model)])
    log.info(
        "structured: dropping the attention of layers %s (influence %s)",
        layers,
        [round(scores[i], 4) for i in layers],
    )
    return drop_attention(model, layers, biases=means if compensate else None), layers
