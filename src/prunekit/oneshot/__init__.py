"""One-shot pruning of causal LMs: a recipe (:mod:`~prunekit.oneshot.config`), the pruning pass over the
streamed calibration engine (:mod:`~prunekit.oneshot.prune`), the larger-than-memory variant
(:mod:`~prunekit.oneshot.lazy`), the whole job behind ``prunekit prune`` (:mod:`~prunekit.oneshot.job`) and
its report (:mod:`~prunekit.oneshot.report`). Methods live in :mod:`prunekit.methods`."""

from prunekit.oneshot.config import CalibrationConfig, EvalConfig, ModelConfig, OutputConfig, PruneConfig, Recipe
from prunekit.oneshot.job import RunResult, run_recipe
from prunekit.oneshot.lazy import prune_checkpoint
from prunekit.oneshot.prune import LayerResult, PruneResult, prune, relative_reconstruction_error
from prunekit.oneshot.report import OneShotReport

__all__ = [
    "CalibrationConfig",
    "EvalConfig",
    "LayerResult",
    "ModelConfig",
    "OneShotReport",
    "OutputConfig",
    "PruneConfig",
    "PruneResult",
    "Recipe",
    "RunResult",
    "prune",
    "prune_checkpoint",
    "relative_reconstruction_error",
    "run_recipe",
]
