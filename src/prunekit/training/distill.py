"""Knowledge distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

The student matches the teacher's temperature-softened class distribution and the ground-truth labels:

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

``T^2`` keeps the soft term's gradient scale independent of ``T`` (Hinton et al. 2015, Sec. 2: the gradients
of the soft targets scale as ``1/T^2``). The KL divergence is summed over classes and averaged over the batch
(the mean of per-example divergences, as the cross-entropy is). Pure functions; running the teacher is the
one helper with a module in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError

__all__ = ["freeze_teacher", "kd_loss", "soft_target_kl", "teacher_logits"]


def _check(alpha: float, temperature: float) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise ConfigError(f"distillation weight alpha must be in [0, 1], got {alpha!r}")
    if not temperature > 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature!r}")


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-example ``KL(softmax(z_t/T) || softmax(z_s/T))``, summed over the class (last) dimension.

    Shapes ``(..., C)`` -> ``(...)``; the teacher side carries no gradient (Hinton et al. 2015, Eq. 1 for the
    softened probabilities).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    _check(0.0, temperature)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Hinton et al. 2015 distillation loss ``alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(z_s, y)``.

    ``student_logits`` and ``teacher_logits`` are ``(N, C)``; ``targets`` are class indices ``(N,)`` (may be
    ``None`` only when ``alpha == 1``). Both terms are batch means. ``alpha = 0`` is plain cross-entropy;
    a student equal to its teacher contributes no KL term. Hinton et al. tune ``T`` and the weighting per
    task; there is no universal default, so both are required.
    """
    _check(alpha, temperature)
    loss = student_logits.new_zeros(())
    if alpha > 0:
        kl = soft_target_kl(student_logits, teacher_logits, temperature).mean()
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        if targets is None:
            raise ValueError("targets are needed when alpha < 1 (the cross-entropy term)")
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode and stop gradients to its parameters (in place; returns it)."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_logits(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for ``inputs``, computed in eval mode under ``torch.no_grad`` (Hinton et al. 2015's
    soft targets come from a fixed, trained teacher). The teacher's train/eval flag is restored afterwards."""
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(inputs)
    finally:
        teacher.train(was_training)
    return out.detach()
