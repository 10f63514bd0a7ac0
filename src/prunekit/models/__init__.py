"""Model loading, decoder-block discovery and prunable-target adapters."""

from prunekit.io.loading import LoadedModel, load_model
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import Target, find_targets, weight_matrix

__all__ = ["LoadedModel", "Target", "find_decoder_blocks", "find_targets", "load_model", "weight_matrix"]
