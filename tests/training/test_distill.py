"""Hinton et al. 2015 distillation loss on logits small enough to work out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training.distill import freeze_teacher, kd_loss, soft_target_kl, teacher_logits


def test_kd_loss_equals_the_hand_computed_value_on_two_classes():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    y = torch.tensor([0])
    # T = 2: teacher softmax([ln 3, 0]) = [3/4, 1/4]; student softmax([0, 0]) = [1/2, 1/2].
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(soft_target_kl(student, teacher, 2.0)[0]) == pytest.approx(kl)
    # CE(student, y=0) = -ln(1/2) = ln 2; alpha = 0.5: 0.5 * T^2 * KL + 0.5 * ln 2.
    loss = kd_loss(student, teacher, y, alpha=0.5, temperature=2.0)
    assert float(loss) == pytest.approx(0.5 * 4 * kl + 0.5 * math.log(2))
    # Batch mean: two copies give the same value.
    loss2 = kd_loss(student.repeat(2, 1), teacher.repeat(2, 1), y.repeat(2), alpha=0.5, temperature=2.0)
    assert float(loss2) == pytest.approx(float(loss))
    # alpha = 1: T^2 * KL only.
    assert float(kd_loss(student, teacher, None, alpha=1.0, temperature=2.0)) == pytest.approx(4 * kl)


def test_kd_loss_is_cross_entropy_at_alpha_zero():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    assert torch.allclose(kd_loss(s, t, y, alpha=0.0, temperature=3.0), F.cross_entropy(s, y))
    assert float(kd_loss(torch.zeros(1, 2), t[:1, :2], torch.tensor([1]), alpha=0.0, temperature=1.0)) == (
        pytest.approx(math.log(2))
    )


def test_kl_term_is_zero_when_student_equals_teacher():
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(soft_target_kl(z, z.clone(), 4.0), torch.zeros(4), atol=1e-6)
    assert float(kd_loss(z, z.clone(), None, alpha=1.0, temperature=4.0)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_student_only():
    s = torch.tensor([[0.5, -0.5]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0]], requires_grad=True)
    kd_loss(s, t, torch.tensor([0]), alpha=0.7, temperature=2.0).backward()
    assert s.grad is not None and t.grad is None


def test_teacher_runs_without_grad_and_keeps_its_mode():
    teacher = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    teacher.train()
    x = torch.randn(6, 3)
    out = teacher_logits(teacher, x)
    assert not out.requires_grad
    assert teacher.training  # restored
    assert torch.equal(out, teacher_logits(teacher, x))  # eval mode: dropout off, deterministic
    frozen = freeze_teacher(teacher)
    assert frozen is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_bad_settings_are_refused():
    z = torch.zeros(1, 2)
    with pytest.raises(ConfigError):
        kd_loss(z, z, torch.tensor([0]), alpha=1.5, temperature=1.0)
    with pytest.raises(ConfigError):
        kd_loss(z, z, torch.tensor([0]), alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        kd_loss(z, z, None, alpha=0.5, temperature=1.0)
