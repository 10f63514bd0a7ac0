"""Importance scores for weights (pure functions) and the table of one-shot methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.calibration.statistics import input_sq_norms
from prunekit.core.errors import ConfigError
from prunekit.core.patterns import Scope
from prunekit.scoring.magnitude import magnitude_scores
from prunekit.scoring.random import random_scores
from prunekit.scoring.wanda import wanda_scores

__all__ = [
    "METHODS",
    "LayerStats",
    "input_sq_norms",
    "magnitude_scores",
    "random_scores",
    "score_weights",
    "wanda_scores",
]


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input: per-feature sum of squares and the token count."""

    sq_norms: torch.Tensor
    n_tokens: int


@dataclass(frozen=True)
class MethodInfo:
    """What a one-shot method needs from calibration, and its default unstructured comparison group."""

    name: str
    needs_activations: bool
    summary: str
    needs_hessian: bool = False
    default_scope: Scope = "row"


METHODS: dict[str, MethodInfo] = {
    "magnitude": MethodInfo("magnitude", False, "|W| (Han et al. 2015)"),
    "wanda": MethodInfo("wanda", True, "|W| * ||X||_2 (Sun et al. 2023, Eq. 1)"),
    "sparsegpt": MethodInfo(
        "sparsegpt",
        True,
        "OBS mask + weight update from H = X X^T (Frantar & Alistarh 2023, Alg. 1)",
        needs_hessian=True,
        default_scope="layer",
    ),
    "random": MethodInfo("random", False, "uniform random scores (control)"),
}


def method_info(name: str) -> MethodInfo:
    """Look a method up, with an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None


def score_weights(
    method: str, weight: torch.Tensor, stats: LayerStats | None, generator: torch.Generator
) -> torch.Tensor:
    """Scores for a ``(out, in)`` weight under ``method`` (higher = keep); score-only methods."""
    info = method_info(method)
    if info.needs_hessian:
        raise ValueError(f"method {method!r} updates weights: it is a solver (prunekit.solvers), not a score")
    if info.needs_activations and stats is None:
        raise ConfigError(f"method {method!r} needs calibration data: pass a calibration text file")
    if method == "wanda":
        assert stats is not None
        return wanda_scores(weight, stats.sq_norms)
    if method == "random":
        return random_scores(weight, generator)
    return magnitude_scores(weight)
