"""Data pruning: score training examples, keep a subset, and train on it with a teacher's knowledge.

* **Random** subsets drawn from a seeded ``torch.Generator`` (the control every score must beat).
* **EL2N** (Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet", Sec. 2): the error L2 norm
  ``chi(x, y) = E_w || softmax(f_w(x)) - onehot(y) ||_2``, the expectation taken over several independently
  initialised models early in training (the paper averages 10 runs). High scores are hard examples; the paper
  keeps the highest.
* **Selection** of the hardest or the easiest fraction (Sorscher et al. 2022 find the easiest better when very
  little data is kept).
* **Distilling the Knowledge in Data Pruning** (Ben-Baruch, Botach, Kviatkovsky, Aggarwal & Medioni 2024,
  ICML 2025): train the student on the kept subset with the Hinton et al. 2015 distillation loss from a teacher
  trained on the *full* data (:func:`distilled_pruning_loss`). The paper finds that with KD even a random
  subset is competitive, and that the best KD weight grows as less data is kept.

All indices returned are sorted ascending (dataset order); ties are broken by index (lower index first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training.distill import kd_loss, teacher_logits

SelectMode = Literal["hardest", "easiest"]

__all__ = [
    "SelectMode",
    "distilled_pruning_loss",
    "el2n_from_logits",
    "el2n_scores",
    "keep_count",
    "model_el2n_scores",
    "random_subset",
    "select_by_score",
]


def keep_count(n: int, keep: float | int) -> int:
    """Number of examples kept out of ``n``: ``keep`` itself when an ``int``, else ``floor(keep * n)`` for a
    fraction ``0 < keep <= 1`` (robust to float error)."""
    if isinstance(keep, bool):
        raise ConfigError(f"keep must be a count or a fraction, got {keep!r}")
    if isinstance(keep, int):
        if not (0 <= keep <= n):
            raise ConfigError(f"cannot keep {keep} of {n} examples: pass a count in [0, {n}] or a fraction")
        return keep
    if not (0.0 < keep <= 1.0):
        raise ConfigError(f"keep fraction must be in (0, 1], got {keep!r}")
    return min(n, math.floor(keep * n + 1e-9))


def random_subset(n: int, keep: float | int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a uniformly random subset of ``keep_count(n, keep)`` of ``n`` examples, drawn from
    ``generator`` (on the CPU: the same seed gives the same subset everywhere). Sorted ascending."""
    k = keep_count(n, keep)
    return torch.randperm(n, generator=generator)[:k].sort().values


def el2n_scores(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N ``|| p - onehot(y) ||_2`` per example, averaged over models (Paul et al. 2021, Sec. 2).

    ``probs`` are predicted class probabilities, ``(N, C)`` for one model or ``(K, N, C)`` for ``K`` models or
    checkpoints; ``labels`` are class indices ``(N,)``. Returns float32 scores ``(N,)``.
    """
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3 or labels.dim() != 1 or probs.shape[1] != labels.shape[0]:
        raise ValueError(
            f"expected probs (N, C) or (K, N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    onehot = F.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
    return torch.linalg.vector_norm(probs - onehot, dim=-1).mean(dim=0).float()


def el2n_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N from logits ``(N, C)`` or ``(K, N, C)``: :func:`el2n_scores` of their softmax."""
    return el2n_scores(F.softmax(logits.float(), dim=-1), labels)


def model_el2n_scores(
    models: Sequence[nn.Module], inputs: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512
) -> torch.Tensor:
    """EL2N of every example of an in-memory dataset, averaged over ``models`` (Paul et al. 2021, Sec. 2).

    ``models`` are a few independently initialised networks (or early checkpoints); each runs in eval mode
    under ``torch.no_grad`` on ``inputs`` (already preprocessed, ``(N, ...)``) in batches; their train/eval
    flags are restored. Returns float32 scores ``(N,)`` on the CPU.
    """
    if not models:
        raise ValueError("EL2N needs at least one model")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    total = torch.zeros(inputs.shape[0], dtype=torch.float32)
    for model in models:
        device = next(model.parameters()).device
        chunks = []
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size].to(device)
            chunks.append(teacher_logits(model, x).float().cpu())
        total += el2n_from_logits(torch.cat(chunks), labels.cpu())
    return total / len(models)


def select_by_score(scores: torch.Tensor, keep: float | int, mode: SelectMode = "hardest") -> torch.Tensor:
    """Indices of the ``keep_count(N, keep)`` examples with the highest (``"hardest"``) or lowest
    (``"easiest"``) scores, sorted ascending. Among equal scores the lower index is kept."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per example), got shape {tuple(scores.shape)}")
    if mode not in ("hardest", "easiest"):
        raise ConfigError(f"mode must be 'hardest' or 'easiest', got {mode!r}")
    k = keep_count(scores.shape[0], keep)
    order = torch.sort(scores, descending=(mode == "hardest"), stable=True).indices
    return order[:k].sort().values


def distilled_pruning_loss(
    batch: tuple[torch.Tensor, torch.Tensor],
    student: nn.Module,
    teacher: nn.Module,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Loss of one batch of the pruned subset in Ben-Baruch et al. 2024: the Hinton et al. 2015 loss
    ``alpha T^2 KL(p_teacher^T || p_student^T) + (1 - alpha) CE(student, y)`` with the teacher (trained on the
    full data) run frozen under ``no_grad``. ``batch`` is ``(inputs, labels)``; gradients reach the student
    only."""
    inputs, labels = batch
    soft = teacher_logits(teacher, inputs)
    return kd_loss(student(inputs), soft, labels, alpha=alpha, temperature=temperature)
