"""One-shot pruning methods: one folder per method (its math in pure functions beside its method object
and options), found through a registry (:func:`register_method`). Importing this package registers the
built-in methods: magnitude, random, wanda, sparsegpt, alps, icbs."""

from prunekit.methods import alps, icbs, magnitude, random, sparsegpt, wanda
from prunekit.methods.base import LayerStatistics, LayerTask, MethodConfig, OneShotMethod, Pruned, ScoreMethod
from prunekit.methods.registry import (
    method_class,
    method_classes,
    method_names,
    register_method,
    registered,
    unregister_method,
)

__all__ = [
    "LayerStatistics",
    "LayerTask",
    "MethodConfig",
    "OneShotMethod",
    "Pruned",
    "ScoreMethod",
    "alps",
    "icbs",
    "magnitude",
    "method_class",
    "method_classes",
    "method_names",
    "random",
    "register_method",
    "registered",
    "sparsegpt",
    "unregister_method",
    "wanda",
]
