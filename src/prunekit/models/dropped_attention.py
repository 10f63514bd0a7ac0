"""The module that stands in for a removed attention sublayer, and the guard that keeps a model holding one
from being saved in a form plain transformers would load wrongly (He et al. 2024, attention drop:
:mod:`prunekit.structured.llm.attention_drop`)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from prunekit.core.errors import StructuralPruningError
from prunekit.models.blocks import find_decoder_blocks


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sublayer: it returns ``bias`` for every token and no attention
    weights, so the decoder layer's residual add passes its input through, shifted by ``bias``: zeros, or the
    attention's mean output on calibration data (:func:`prune_causal_lm_attention` with ``compensate``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.register_buffer("bias", torch.zeros(hidden_size))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states), None


#: Why ``save_pretrained`` is refused for a model with dropped attention.
NO_ATTENTION = "this model has layers without attention, which a transformers config cannot describe"
#: The attribute a guarded instance carries (recorded by :func:`~prunekit.io.pruned.save_pruned`).
REFUSAL_ATTRIBUTE = "prunekit_save_pretrained_refused"


def _refuse_save_pretrained(why: str, *args: Any, **kwargs: Any) -> None:
    raise StructuralPruningError(
        f"{why}: save_pretrained would write a checkpoint that plain transformers loads wrongly (fresh random "
        "weights where the config and the tensors disagree) or not at all. Save it with "
        "prunekit.save_pruned(model, directory) and load it with prunekit.load_model(directory)"
    )


def refuse_save_pretrained(model: nn.Module, why: str = NO_ATTENTION) -> None:
    """Make ``model.save_pretrained`` (and ``push_to_hub``, which calls it) raise on this instance, naming
    ``why``, since its output would silently load wrong; the class and other instances are untouched."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = functools.partial(_refuse_save_pretrained, why)
        model.__dict__[REFUSAL_ATTRIBUTE] = why


def save_pretrained_refusal(model: nn.Module) -> str | None:
    """Why ``model.save_pretrained`` is refused (:func:`refuse_save_pretrained`), or ``None``."""
    return model.__dict__.get(REFUSAL_ATTRIBUTE)


def dropped_attention_layers(model: nn.Module) -> list[int]:
    """The decoder layers of ``model`` whose attention is a :class:`DroppedAttention`."""
    _, blocks = find_decoder_blocks(model)
    return [i for i, block in enumerate(blocks) if isinstance(getattr(block, ATTENTION_NAME, None), DroppedAttention)]


#: The names of the sublayers an attention drop needs in a decoder layer: ``x + attn(ln(x))`` then
#: ``x + mlp(ln2(x))`` (Llama, Mistral, Qwen2/3, Gemma, Phi-3...).
ATTENTION_NAME = "self_attn"
