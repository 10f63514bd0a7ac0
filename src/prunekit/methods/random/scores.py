"""Random scores: the control every pruning criterion must beat."""

from __future__ import annotations

import torch


def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores of ``weight``'s shape drawn from ``generator`` (on the CPU, for reproducibility)."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)
