"""Getting a pruned (or dense) model ready for inference: batch norms folded into the layer before them.

In evaluation mode a batch norm is an affine map per channel, so ``BN(conv(x))`` equals one convolution
with rescaled weights and a new bias (Ioffe & Szegedy 2015, Algorithm 2, step 11, applied to the weights). Folding
removes a pass over every activation tensor: those passes cost time in proportion to the channel count, not
to the MACs, one reason why pruned CNNs fall short of their MAC reduction on CPUs. This is what every
deployment path (ONNX Runtime, TensorRT, TFLite) does; here it is done in PyTorch with
:func:`torch.fx.experimental.optimization.fuse`.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.fx.experimental.optimization import fuse

from prunekit.core.errors import UntraceableModuleError

log = logging.getLogger(__name__)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in evaluation mode) whose batch norms that directly follow a convolution or a
    linear layer are folded into it; the copy computes the same outputs (to float rounding) and is a
    :class:`torch.fx.GraphModule`. ``model`` is not modified.

    Raises ``ValueError`` for a model in training mode (its batch norms use batch statistics, which cannot be
    folded) and :class:`~prunekit.core.errors.UntraceableModuleError` when ``torch.fx`` cannot trace the model."""
    training = [
        name or "<root>"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if training:
        raise ValueError(
            f"{training[0]} (and {len(training) - 1} more batch norms) is in training mode: call model.eval() "
            "before folding batch norms"
        )
    try:
        folded = fuse(model)
    except Exception as error:  # torch.fx raises many kinds of errors on untraceable code
        raise UntraceableModuleError(
            f"torch.fx cannot trace {type(model).__name__} to fold its batch norms ({type(error).__name__}: "
            f"{error}); run the model unfolded, or export it to ONNX, whose runtime folds them"
        ) from error
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    log.info("deploy: folded %d of %d batch norms", before - after, before)
    return folded
