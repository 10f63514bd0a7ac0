"""Data pruning: EL2N (Paul et al. 2021), selection, random subsets, and KD on the subset (Ben-Baruch et al.)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training.data_pruning import (
    distilled_pruning_loss,
    el2n_from_logits,
    el2n_scores,
    keep_count,
    model_el2n_scores,
    random_subset,
    select_by_score,
)
from prunekit.training.distill import kd_loss


def test_el2n_on_hand_made_probabilities():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0])
    # ||p - onehot(0)||_2: sqrt(0.25 + 0.25), 0, sqrt(1 + 1).
    assert el2n_scores(probs, labels).tolist() == pytest.approx([math.sqrt(0.5), 0.0, math.sqrt(2)])
    # Averaged over two models: the second one is confident and right on the first example.
    second = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    both = el2n_scores(torch.stack([probs, second]), labels)
    assert both.tolist() == pytest.approx([math.sqrt(0.5) / 2, 0.0, math.sqrt(2)])
    # Three classes: p = [0.7, 0.2, 0.1], y = 0: sqrt(0.3^2 + 0.2^2 + 0.1^2) = sqrt(0.14).
    assert float(el2n_scores(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([0]))[0]) == pytest.approx(math.sqrt(0.14))


def test_el2n_from_logits_is_el2n_of_the_softmax():
    logits = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(el2n_from_logits(logits, labels), el2n_scores(F.softmax(logits, -1), labels))


def test_model_el2n_runs_each_model_and_averages():
    def constant_model(bias):
        m = nn.Linear(2, 2)
        with torch.no_grad():
            m.weight.zero_()
            m.bias.copy_(torch.tensor(bias))
        return m

    confident = constant_model([math.log(3.0), 0.0])  # predicts [3/4, 1/4] for every input
    unsure = constant_model([0.0, 0.0])  # predicts [1/2, 1/2]
    x, y = torch.randn(2, 2), torch.tensor([0, 1])
    one = model_el2n_scores([confident], x, y, batch_size=1)
    # y=0: ||[-1/4, 1/4]|| = sqrt(2)/4; y=1: ||[3/4, -3/4]|| = 3 sqrt(2)/4.
    assert one.tolist() == pytest.approx([math.sqrt(2) / 4, 3 * math.sqrt(2) / 4])
    two = model_el2n_scores([confident, unsure], x, y)
    assert two.tolist() == pytest.approx(
        [(math.sqrt(2) / 4 + math.sqrt(0.5)) / 2, (3 * math.sqrt(2) / 4 + math.sqrt(0.5)) / 2]
    )


def test_selection_keeps_exactly_the_requested_examples():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.8, 0.5])
    assert select_by_score(scores, 2, "hardest").tolist() == [1, 3]
    assert select_by_score(scores, 3, "hardest").tolist() == [1, 3, 4]
    assert select_by_score(scores, 2, "easiest").tolist() == [0, 2]
    assert select_by_score(scores, 0.4).tolist() == [1, 3]  # floor(0.4 * 5) = 2
    assert select_by_score(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    # Ties: the lower index is kept.
    assert select_by_score(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2, "hardest").tolist() == [0, 1]
    assert select_by_score(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, "easiest").tolist() == [1, 2]


def test_keep_count():
    assert keep_count(10, 3) == 3
    assert keep_count(10, 0.35) == 3
    assert keep_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    with pytest.raises(ConfigError):
        keep_count(10, 11)
    with pytest.raises(ConfigError):
        keep_count(10, 0.0)
    with pytest.raises(ConfigError):
        keep_count(10, True)


def test_random_subset_is_seeded_and_exact():
    a = random_subset(100, 0.3, torch.Generator().manual_seed(7))
    b = random_subset(100, 0.3, torch.Generator().manual_seed(7))
    c = random_subset(100, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.numel() == 30 and a.unique().numel() == 30
    assert torch.equal(a, a.sort().values) and int(a.min()) >= 0 and int(a.max()) < 100
    assert torch.equal(a, torch.randperm(100, generator=torch.Generator().manual_seed(7))[:30].sort().values)


def test_distilled_pruning_loss_uses_a_frozen_teacher():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    teacher.train()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss = distilled_pruning_loss((x, y), student, teacher, alpha=0.6, temperature=3.0)
    with torch.no_grad():
        expected = kd_loss(student(x), teacher(x), y, alpha=0.6, temperature=3.0)
    assert float(loss.detach()) == pytest.approx(float(expected))
    loss.backward()
    assert student.weight.grad is not None
    assert teacher.weight.grad is None
    assert teacher.training
