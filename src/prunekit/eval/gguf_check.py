"""Does llama.cpp compute what PyTorch computes? The logits of an exported GGUF file against the model's own."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.eval.speed.decode import random_prompt
from prunekit.eval.speed.llamacpp import llamacpp_logits


@dataclass(frozen=True)
class GgufCheck:
    """PyTorch's logits against llama.cpp's on the same token ids."""

    tokens: int
    max_abs_diff: float
    #: ``max_abs_diff`` over the largest absolute PyTorch logit
    relative: float
    #: share of positions where both pick the same next token
    argmax_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> GgufCheck:
    """Compare two ``(tokens, vocab)`` logit arrays."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of shape {reference.shape} and {candidate.shape} cannot be compared")
    diff = float(np.abs(reference - candidate).max())
    scale = float(np.abs(reference).max()) or 1.0
    agree = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    return GgufCheck(tokens=reference.shape[0], max_abs_diff=diff, relative=diff / scale, argmax_agreement=agree)


@torch.no_grad()
def compare_with_llamacpp(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    token_ids: list[int] | None = None,
    tokens: int = 64,
    seed: int = 0,
    threads: int | None = None,
) -> GgufCheck:
    """Run ``token_ids`` (by default ``tokens`` seeded random ids) through ``model`` and through llama.cpp on
    the GGUF file ``path`` and compare every position's logits."""
    ids = torch.tensor([token_ids]) if token_ids is not None else random_prompt(model, 1, tokens, seed).cpu()
    device = next(model.parameters()).device
    reference = model(input_ids=ids.to(device)).logits[0].float().cpu().numpy()
    return compare_logits(reference, llamacpp_logits(path, ids[0].tolist(), threads=threads))
