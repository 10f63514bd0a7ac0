"""Depth pruning of causal LMs: whole decoder layers removed, those that change their input least by the
Block Influence of ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant
Than You Expect", Eq. 1): ``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]`` over calibration tokens
(:func:`~prunekit.structured.depth.block_influence`, per token)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from prunekit.calibration.hooks import first_input, first_output, observe, run_batches
from prunekit.models.blocks import find_decoder_blocks
from prunekit.structured.depth import block_influence, remove_blocks
from prunekit.structured.llm.windows import window_batches

log = logging.getLogger(__name__)


def layer_influence(model: nn.Module, calibration: torch.Tensor, batch_size: int = 1) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer (:func:`~prunekit.structured.depth.block_influence`
    per token: ``1 - mean cosine(input, output)`` over the hidden vectors of every calibration token)."""
    _, blocks = find_decoder_blocks(model)
    totals = [0.0] * len(blocks)
    count = 0

    def record(layer: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x_in, x_out = first_input(args, kwargs), first_output(output)
        tokens = x_in.numel() // x_in.shape[-1]
        totals[int(layer)] += block_influence(x_in, x_out, per="token") * tokens

    with observe({str(i): block for i, block in enumerate(blocks)}, on_output=record):
        for batch in window_batches(calibration, batch_size):
            run_batches(model, [batch])
            count += batch[0][0].numel()
    return [t / count for t in totals]


def prune_causal_lm_depth(
    model: nn.Module, calibration: torch.Tensor, ratio: float, *, batch_size: int = 1
) -> tuple[nn.Module, list[int]]:
    """Remove the fewest decoder layers of lowest Block Influence whose parameters add up to at least
    ``ratio`` of the model's parameters. Returns the new model and the removed layer indices."""
    name, blocks = find_decoder_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    scores = layer_influence(model, calibration, batch_size)
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
    return remove_blocks(model, [f"{name}.{i}" for i in removed], shorten_lists=True), sorted(removed)
