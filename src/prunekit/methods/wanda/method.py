"""The Wanda method object (the math is :func:`~prunekit.methods.wanda.scores.wanda_scores`)."""

from __future__ import annotations

import torch

from prunekit.methods.base import LayerStatistics, ScoreMethod
from prunekit.methods.registry import register_method
from prunekit.methods.wanda.scores import wanda_scores


@register_method
class Wanda(ScoreMethod):
    name = "wanda"
    summary = "|W| * ||X||_2 (Sun et al. 2023, Eq. 1)"
    needs_activations = True

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        if stats is None or stats.sq_norms is None:
            raise ValueError("wanda needs the layer's input norms: pass calibration data")
        return wanda_scores(weight, stats.sq_norms)
