"""What a one-shot pruning method is: a registered object with its own configuration, which says which
calibration statistics it needs and turns one layer's weight and statistics into a mask (and, for methods
that reconstruct, new weights).

The pipeline (:mod:`prunekit.oneshot`) and the calibration engine know no method by name: they ask the
method what to gather (:attr:`OneShotMethod.needs_activations`, :attr:`OneShotMethod.needs_gram`,
:meth:`OneShotMethod.gram_dtype`) and call :meth:`OneShotMethod.finalize` once per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from prunekit.calibration.statistics import LayerStatistics
from prunekit.core.config import StrictConfig
from prunekit.core.masks import Mask
from prunekit.core.patterns import Pattern, Scope, select_keep_mask


class MethodConfig(StrictConfig):
    """A method's own options (none by default). Subclasses add typed, documented fields; in a recipe they
    sit beside the common keys of the ``prune`` section, and only the chosen method's are accepted."""


@dataclass
class LayerTask:
    """One layer to prune: its name, its ``(out, in)`` weight (not to be modified), its statistics (``None``
    without calibration) and the pattern; ``keep_gram`` says whether a later step (the refit) still needs
    ``stats.gram``, so a method may free it otherwise."""

    name: str
    weight: torch.Tensor
    stats: LayerStatistics | None
    pattern: Pattern
    keep_gram: bool = False


@dataclass
class Pruned:
    """A method's answer for one layer: the keep-mask, the new weight (the masked weight for score-only
    methods) and, for methods that damp a Hessian, the dampening fraction the refit should reuse."""

    mask: Mask
    weight: torch.Tensor
    dampening: float | None = None


class OneShotMethod(ABC):
    """A one-shot method. Subclass it, set the class attributes, implement :meth:`finalize` (or
    :meth:`ScoreMethod.scores`), and register the class with :func:`prunekit.methods.register_method`."""

    #: The name a recipe, the CLI (``--method``) and the API use.
    name: ClassVar[str]
    #: One line for ``--help`` and the report: the criterion and its paper.
    summary: ClassVar[str]
    #: The method's own options.
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: Whether it needs calibration activations (squared input norms) to decide anything.
    needs_activations: ClassVar[bool] = False
    #: Whether it needs the input Gram matrix ``X^T X`` (a Hessian).
    needs_gram: ClassVar[bool] = False
    #: The unstructured comparison group when the recipe names none.
    default_scope: ClassVar[Scope] = "row"
    #: Least-squares refit steps after the mask when the recipe names none.
    default_refit_steps: ClassVar[int] = 0

    def __init__(self, config: MethodConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    @classmethod
    def check(cls, config: MethodConfig, pattern: Pattern) -> None:
        """Refuse a configuration that cannot work with ``pattern`` (raise ``ValueError`` naming the fix);
        every configuration works by default."""
        return None

    def gram_dtype(self) -> torch.dtype:
        """The dtype in which the engine accumulates the Gram matrix, when one is gathered."""
        return torch.float32

    @abstractmethod
    def finalize(self, task: LayerTask) -> Pruned:
        """Choose the layer's mask (and new weights) from its weight and statistics."""


class ScoreMethod(OneShotMethod):
    """A method that only scores weights (higher = keep); the pattern then keeps the best-scored ones."""

    @abstractmethod
    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        """Float32 scores of ``weight``'s shape."""

    def finalize(self, task: LayerTask) -> Pruned:
        mask = Mask(select_keep_mask(self.scores(task.weight, task.stats), task.pattern))
        return Pruned(mask, mask.apply(task.weight))
