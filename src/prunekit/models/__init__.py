"""Finding what to prune in a model: the decoder block stack, the target weight matrices, and the module that
stands in for a dropped attention. (Loading models from disk is :mod:`prunekit.io.loading`.)"""

from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import Target, find_targets, weight_matrix

__all__ = ["Target", "find_decoder_blocks", "find_targets", "weight_matrix"]
