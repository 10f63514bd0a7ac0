"""Block reconstruction after masking: the block's calibration error never rises, every pruned weight stays
exactly zero, and the pipeline runs it block by block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from models import VOCAB, tiny_model
from prunekit.core.errors import ConfigError
from prunekit.reconstruction.block import reconstruct_block


def _block_and_data(seed: int = 0):
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    inputs = [torch.randn(32, 8) for _ in range(3)]
    with torch.no_grad():
        targets = [block(x) for x in inputs]
        masks = []
        for linear in (block[0], block[2]):
            keep = torch.rand(linear.weight.shape) > 0.5
            linear.weight.mul_(keep)
            masks.append((linear.weight, keep))
    return block, inputs, targets, masks


def test_reconstruction_lowers_the_block_error_and_keeps_the_mask() -> None:
    block, inputs, targets, masks = _block_and_data()
    bias = block[0].bias.detach().clone()
    done = reconstruct_block(block, lambda b, x: block(x), inputs, targets, masks, steps=200, lr=1e-2)
    assert done.kept and done.error_after < 0.7 * done.error_before
    for weight, keep in masks:
        assert torch.equal(weight.detach() * ~keep, torch.zeros_like(weight))
    assert torch.equal(block[0].bias, bias)  # only the masked weights are tuned
    assert all(p.requires_grad for p in block.parameters())  # flags restored


def test_a_step_that_raises_the_error_is_undone() -> None:
    block, inputs, targets, masks = _block_and_data(1)
    before = [weight.detach().clone() for weight, _ in masks]
    done = reconstruct_block(block, lambda b, x: block(x), inputs, targets, masks, steps=5, lr=10.0)
    assert not done.kept and done.error_after == done.error_before
    assert all(torch.equal(weight, original) for (weight, _), original in zip(masks, before, strict=True))
    none = reconstruct_block(block, lambda b, x: block(x), inputs, targets, masks, steps=0, lr=1e-2)
    assert none.steps == 0 and none.error_after == none.error_before


def test_the_pipeline_reconstructs_every_block_with_the_masks_exact() -> None:
    model = tiny_model("llama")
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    config = prunekit.PruneConfig(
        method="wanda", sparsity=0.5, reconstruct="block", reconstruct_steps=20, reconstruct_lr=1e-3
    )
    result = prunekit.prune(model, config, calib, progress=False)
    plain = prunekit.prune(model, prunekit.PruneConfig(method="wanda", sparsity=0.5), calib, progress=False)
    assert sorted(result.block_reconstruction) == [0, 1]
    for done in result.block_reconstruction.values():
        assert done.error_after <= done.error_before
    assert {r.sparsity for r in result.layers} == {0.5}
    for (name, weight), (_, reference) in zip(
        result.model.named_parameters(), plain.model.named_parameters(), strict=True
    ):
        if "layers" in name and weight.dim() == 2:
            assert torch.equal(weight == 0, reference == 0), name  # the same masks, held exactly
    with pytest.raises(ConfigError, match="calibration"):
        prunekit.prune(model, prunekit.PruneConfig(method="magnitude", reconstruct="block"), None, progress=False)
