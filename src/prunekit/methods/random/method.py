"""The random method object: one generator seeded with the recipe's ``seed`` scores the layers in order."""

from __future__ import annotations

import torch

from prunekit.methods.base import LayerStatistics, MethodConfig, ScoreMethod
from prunekit.methods.random.scores import random_scores
from prunekit.methods.registry import register_method


@register_method
class Random(ScoreMethod):
    name = "random"
    summary = "uniform random scores (control)"

    def __init__(self, config: MethodConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        return random_scores(weight, self.generator)
