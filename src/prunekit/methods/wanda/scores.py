"""Wanda score (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", Eq. 1).

``S_ij = |W_ij| * ||X_j||_2`` where ``X_j`` is the j-th input feature over all calibration tokens.
Compared within each output row (see :mod:`prunekit.core.patterns`).
"""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_norms)`` broadcast over rows; ``weight`` is ``(out, in)``, ``sq_norms`` is ``(in,)``."""
    if sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"input norms have shape {tuple(sq_norms.shape)}, expected ({weight.shape[1]},) for a weight "
            f"of shape {tuple(weight.shape)}"
        )
    scores = weight.detach().float().abs()  # a new tensor whatever the dtype: scaled in place below
    return scores.mul_(sq_norms.to(weight.device).float().sqrt().unsqueeze(0))
