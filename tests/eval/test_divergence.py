"""The KL divergence from a reference model's next-token distribution, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.eval.divergence import ReferenceOutputs, token_kl


def test_token_kl_by_hand() -> None:
    p = torch.tensor([0.5, 0.25, 0.25])
    logits = torch.tensor([0.0, 0.0, math.log(2.0)])  # q = (0.25, 0.25, 0.5)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)
    assert float(token_kl(p.log(), logits)) == pytest.approx(expected, rel=1e-6)
    assert float(token_kl(p.log(), p.log() + 3.0)) == pytest.approx(0.0, abs=1e-7)  # shifted logits: same q
    with pytest.raises(ValueError, match="differ"):
        token_kl(p.log(), logits[:2])


class Unigram(nn.Module):
    """A 'language model' whose next-token logits are a fixed vector, whatever the input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> object:
        return type("Out", (), {"logits": self.table.expand(*input_ids.shape, -1)})()


def test_reference_outputs_average_the_kl_over_every_token() -> None:
    windows = torch.zeros(3, 5, dtype=torch.long)
    reference = ReferenceOutputs(Unigram([0.0, 0.0]), windows, batch_size=2)
    assert reference.kl(Unigram([0.0, 0.0])) == pytest.approx(0.0, abs=1e-9)
    q = torch.tensor([0.0, math.log(3.0)]).softmax(0)  # (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / float(q[0])) + 0.5 * math.log(0.5 / float(q[1]))
    assert reference.kl(Unigram([0.0, math.log(3.0)])) == pytest.approx(expected, rel=1e-6)
