"""Folding batch norms for inference: same outputs, fewer modules, clear errors."""

from __future__ import annotations

import pytest
import torch
from test_structured import DenseBlock, MobileBlock, ResNetBlock
from torch import nn

from prunekit.core.errors import UntraceableModuleError
from prunekit.structured import prune_structurally
from prunekit.structured.graph.fold_bn import fold_batch_norms


def randomise_batch_norms(model: nn.Module) -> None:
    """Give every batch norm running statistics and an affine map far from the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def test_folding_a_conv_bn_by_hand():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
        bn.weight.fill_(3.0)
        bn.bias.fill_(0.5)
    folded = fold_batch_norms(nn.Sequential(conv, bn).eval())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) and len(convs) == 1
    # BN(2x) = 3 (2x - 1) / 2 + 0.5 = 3x - 1: weight 3, bias -1
    assert convs[0].weight.item() == pytest.approx(3.0) and convs[0].bias.item() == pytest.approx(-1.0)


@pytest.mark.parametrize(("make", "shape"), [(ResNetBlock, (2, 3, 8, 8)), (MobileBlock, (2, 3, 4, 4))])
def test_folded_pruned_model_gives_the_same_outputs(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    randomise_batch_norms(model)
    x = torch.randn(shape)
    pruned = prune_structurally(model, (x,), 0.5).model.eval()
    folded = fold_batch_norms(pruned)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())  # the input is left as it was
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pruned(x), atol=1e-5, rtol=1e-5)


def test_a_batch_norm_after_a_concat_stays_and_outputs_match():
    torch.manual_seed(0)
    model = DenseBlock().eval()
    randomise_batch_norms(model)
    x = torch.randn(1, 3, 6, 6)
    folded = fold_batch_norms(model)
    # bn1 follows the stem conv, but the stem's output also feeds the concat: neither can be folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_training_mode_and_untraceable_models_are_refused():
    with pytest.raises(ValueError, match=r"training mode.*model\.eval"):
        fold_batch_norms(ResNetBlock().train())

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(UntraceableModuleError, match=r"torch\.fx cannot trace DataDependent"):
        fold_batch_norms(DataDependent().eval())
