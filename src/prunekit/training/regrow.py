"""Zero-cost neuroregeneration of GraNet (Liu et al. 2021, "Sparse Training via Boosting Pruning Plasticity with
Neuroregeneration", sec. 4, Algorithm 1), as pure functions over one layer's keep-mask.

At an update step GraNet first prunes to the scheduled sparsity (Zhu & Gupta's cubic schedule, global
magnitude), then, per layer, removes a further fraction ``r_t`` of the remaining weights with the smallest
magnitude (:func:`magnitude_death`) and regrows exactly as many connections where the dense gradient
``|∂L/∂W|`` is largest among the zero positions (:func:`gradient_regrowth`, as in RigL, Evci et al. 2020, eq. 2).
Regrown weights start at zero, so regrowth costs no extra forward pass and leaves the loss unchanged; the
density of every layer stays the same. ``r_t`` decays with cosine annealing (:func:`cosine_regrow_fraction`,
RigL eq. 1, ``f_decay(t) = α/2 (1 + cos(tπ / T_end))``).

Ties keep the lower flattened index (see :mod:`prunekit.core.patterns`).
"""

from __future__ import annotations

import math

import torch

from prunekit.core.errors import ConfigError
from prunekit.core.patterns import drop_lowest_k


def cosine_regrow_fraction(step: int, initial_fraction: float, end_step: int, min_fraction: float = 0.0) -> float:
    """Death/regrowth fraction at ``step``: ``min + (α - min)/2 · (1 + cos(π step / T_end))`` for
    ``step <= T_end`` and 0 after (RigL eq. 1 with GraNet's cosine-annealed prune rate; ``α = initial_fraction``,
    ``T_end = end_step``)."""
    if not 0.0 <= min_fraction <= initial_fraction <= 1.0:
        raise ConfigError(
            f"need 0 <= min_fraction <= initial_fraction <= 1, got {min_fraction!r} and {initial_fraction!r}"
        )
    if end_step <= 0:
        raise ConfigError(f"end_step (T_end) must be >= 1, got {end_step!r}")
    if step < 0 or step > end_step:
        return 0.0
    return min_fraction + 0.5 * (initial_fraction - min_fraction) * (1.0 + math.cos(math.pi * step / end_step))


def death_count(keep: torch.Tensor, fraction: float) -> int:
    """Weights GraNet removes from a layer: ``ceil(fraction · nnz)`` (its reference code rounds up)."""
    return min(int(keep.sum()), math.ceil(fraction * int(keep.sum()) - 1e-9))


def magnitude_death(keep: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """Remove the ``count`` kept weights of smallest ``|W|`` (Algorithm 1, "prune"); returns a new mask."""
    kept_index = keep.reshape(-1).nonzero().squeeze(1)
    values = weight.detach().reshape(-1)[kept_index].abs().float()
    stays = drop_lowest_k(values.unsqueeze(0), count).squeeze(0)
    out = torch.zeros_like(keep.reshape(-1))
    out[kept_index[stays]] = True
    return out.reshape(keep.shape)


def gradient_regrowth(keep: torch.Tensor, grad: torch.Tensor, count: int) -> torch.Tensor:
    """Regrow ``count`` connections at the zero positions of ``keep`` with the largest ``|grad|`` (RigL eq. 2;
    GraNet "regenerate"); returns a new mask with ``count`` more kept entries."""
    free_index = (~keep).reshape(-1).nonzero().squeeze(1)
    if count > free_index.numel():
        raise ConfigError(f"cannot regrow {count} connections: only {free_index.numel()} positions are free")
    values = grad.detach().reshape(-1)[free_index].abs().float()
    grows = drop_lowest_k(values.unsqueeze(0), free_index.numel() - count).squeeze(0)
    out = keep.reshape(-1).clone()
    out[free_index[grows]] = True
    return out.reshape(keep.shape)


def prune_and_regrow(
    keep: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, int]:
    """One GraNet neuroregeneration step on one layer: :func:`magnitude_death` of ``ceil(fraction · nnz)`` weights,
    then :func:`gradient_regrowth` of as many. Returns the new mask (same kept count) and the number regrown.

    A weight dropped and regrown in the same step keeps its value (it never left, as in RigL); weights regrown at
    positions that were already zero start at zero.
    """
    count = death_count(keep, fraction)
    if count == 0:
        return keep.clone(), 0
    return gradient_regrowth(magnitude_death(keep, weight, count), grad, count), count
