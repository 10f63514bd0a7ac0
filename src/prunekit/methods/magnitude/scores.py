"""Magnitude score |W_ij| (Han et al. 2015, "Learning both Weights and Connections")."""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Score each weight by its absolute value, in float32."""
    return weight.detach().abs().float()
