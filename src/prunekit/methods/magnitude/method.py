"""The magnitude method object (the math is :func:`~prunekit.methods.magnitude.scores.magnitude_scores`)."""

from __future__ import annotations

import torch

from prunekit.methods.base import LayerStatistics, ScoreMethod
from prunekit.methods.magnitude.scores import magnitude_scores
from prunekit.methods.registry import register_method


@register_method
class Magnitude(ScoreMethod):
    name = "magnitude"
    summary = "|W| (Han et al. 2015)"

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        return magnitude_scores(weight)
