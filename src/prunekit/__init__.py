"""prunekit: make trained PyTorch models smaller and faster by pruning, and prove it with measurements.

The public API::

    import prunekit
    loaded = prunekit.load_model()                       # bundled SmolLM2-135M-Instruct
    calib = prunekit.calibration_windows(loaded.tokenizer, "valid.txt", nsamples=32, seqlen=512)
    result = prunekit.prune(loaded.model, prunekit.PruneConfig(method="wanda", sparsity=0.5), calib)
    prunekit.perplexity(result.model, loaded.tokenizer, "test.txt")
"""

from prunekit.calibration.data import calibration_windows
from prunekit.core.errors import (
    CalibrationError,
    ConfigError,
    ModelLoadError,
    NonFiniteError,
    OutputError,
    PrunekitError,
    TargetError,
)
from prunekit.core.masks import Mask
from prunekit.core.patterns import NM, Unstructured, parse_pattern
from prunekit.eval.perplexity import PerplexityResult, perplexity
from prunekit.io.gguf.export import export_gguf
from prunekit.io.hub import push_to_hub
from prunekit.io.loading import LoadedModel, load_model
from prunekit.io.onnx import export_onnx
from prunekit.oneshot import LayerResult, PruneResult, prune
from prunekit.oneshot.config import CalibrationConfig, EvalConfig, ModelConfig, OutputConfig, PruneConfig, Recipe
from prunekit.oneshot.job import run_recipe
from prunekit.structured import StructuralResult, load_pruned, prune_structurally, save_pruned

__all__ = [
    "NM",
    "CalibrationConfig",
    "CalibrationError",
    "ConfigError",
    "EvalConfig",
    "LayerResult",
    "LoadedModel",
    "Mask",
    "ModelConfig",
    "ModelLoadError",
    "NonFiniteError",
    "OutputConfig",
    "OutputError",
    "PerplexityResult",
    "PruneConfig",
    "PruneResult",
    "PrunekitError",
    "Recipe",
    "StructuralResult",
    "TargetError",
    "Unstructured",
    "calibration_windows",
    "export_gguf",
    "export_onnx",
    "load_model",
    "load_pruned",
    "parse_pattern",
    "perplexity",
    "prune",
    "prune_structurally",
    "push_to_hub",
    "run_recipe",
    "save_pruned",
]
