"""Block reconstruction after masking: the kept weights of a whole decoder block tuned by Adam so that the pruned
block's output matches the dense block's on the calibration inputs, the mask held exactly.

A layer-wise solve (SparseGPT, ALPS, the refit) reproduces each linear map alone; errors of the maps of a block
compound through its nonlinearities (attention's softmax, the gated MLP). Reconstructing the block's output
as a whole recovers part of that (block-wise reconstruction, as in EBFT, Guo et al. 2024, which reports its
largest gains on small models): ``min_W sum_b ||block_W(x_b) - y_b||^2`` over the
targets' kept weights, where ``x_b`` are the block's calibration inputs and ``y_b`` the dense block's outputs
on them. The objective is measured before and after on every batch; weights that end worse are put back, so
the block's calibration error never increases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: ``forward(b, x)``: the block on calibration batch ``b`` (its own attention mask, positions...) with input ``x``
BlockForward = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockReconstruction:
    """Mean squared error of the block's output against the dense block's, before and after, and the steps run."""

    error_before: float
    error_after: float
    steps: int
    kept: bool


def _error(forward: BlockForward, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        total = sum(float((forward(b, x).float() - targets[b].float()).pow(2).sum()) for b, x in enumerate(inputs))
        count = sum(t.numel() for t in targets)
    return total / max(count, 1)


def reconstruct_block(
    block: nn.Module,
    forward: BlockForward,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    masked: Sequence[tuple[nn.Parameter, torch.Tensor]],
    *,
    steps: int,
    lr: float,
) -> BlockReconstruction:
    """Tune the ``(weight, keep)`` pairs of ``masked`` (the block's pruned matrices and their keep-masks) by
    ``steps`` Adam steps, one calibration batch a step in turn, on the mean squared error between
    ``forward(b, inputs[b])`` and ``targets[b]``; every other parameter of ``block`` is left as it is. After each
    step the pruned weights are set to exactly zero again. Weights that end with a larger error over all
    batches than they began with are restored."""
    before = _error(forward, inputs, targets)
    if steps <= 0 or not masked or before == 0.0:
        return BlockReconstruction(before, before, 0, False)
    saved = [weight.detach().clone() for weight, _ in masked]
    grad_flags = {id(p): p.requires_grad for p in block.parameters()}
    tuned = {id(weight) for weight, _ in masked}
    for p in block.parameters():
        p.requires_grad_(id(p) in tuned)
    optimizer = torch.optim.Adam([weight for weight, _ in masked], lr=lr)
    try:
        with torch.enable_grad():
            for step in range(steps):
                b = step % len(inputs)
                optimizer.zero_grad(set_to_none=True)
                output = forward(b, inputs[b])
                loss = (output.float() - targets[b].float()).pow(2).mean()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for weight, keep in masked:
                        weight.mul_(keep)
    finally:
        for p in block.parameters():
            p.requires_grad_(grad_flags[id(p)])
    after = _error(forward, inputs, targets)
    if not after < before:
        with torch.no_grad():
            for (weight, _), original in zip(masked, saved, strict=True):
                weight.copy_(original)
        log.info("block reconstruction raised the error (%.4g -> %.4g): weights restored", before, after)
        return BlockReconstruction(before, before, steps, False)
    return BlockReconstruction(before, after, steps, True)
