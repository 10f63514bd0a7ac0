"""Per-block sparsity budgets: OWL's outlier shares and sparsities by hand, and a pruned model whose blocks
keep what their budgets say, the mean exactly at the target."""

from __future__ import annotations

import pytest
import torch

from models import VOCAB, tiny_model
from prunekit.core.errors import ConfigError
from prunekit.oneshot import prune
from prunekit.oneshot.budgets import outlier_share, owl_sparsities
from prunekit.oneshot.config import PruneConfig


def test_outlier_share_counts_scores_above_m_times_the_block_mean() -> None:
    # mean of all eight scores is 2.0: with M = 2, only the 7 and the 5 are above 4
    scores = [torch.tensor([[1.0, 1.0], [7.0, 1.0]]), torch.tensor([1.0, 0.0, 5.0, 0.0])]
    assert outlier_share(scores, 2.0) == 2 / 8
    assert outlier_share(scores, 100.0) == 0.0


def test_owl_sparsities_by_hand() -> None:
    # shares 0.1, 0.3, 0.2 scale to 0, 0.2, 0.1 (lambda 0.1); centred on their mean 0.1: -0.1, 0.1, 0
    sparsities = owl_sparsities({0: 0.1, 1: 0.3, 2: 0.2}, {0: 5, 1: 5, 2: 5}, 0.7, 0.1)
    assert sparsities == pytest.approx({0: 0.8, 1: 0.6, 2: 0.7})
    # unequal blocks: centred on the parameter-weighted mean, so the weighted mean sparsity is exactly 0.7
    sizes = {0: 3, 1: 1, 2: 4}
    uneven = owl_sparsities({0: 0.1, 1: 0.3, 2: 0.2}, sizes, 0.7, 0.1)
    assert sum(uneven[b] * sizes[b] for b in sizes) / sum(sizes.values()) == pytest.approx(0.7, abs=1e-12)
    assert uneven[1] < uneven[2] < uneven[0]  # more outliers, more kept
    assert owl_sparsities({0: 0.2, 1: 0.2}, {0: 1, 1: 1}, 0.5, 0.1) == {0: 0.5, 1: 0.5}
    with pytest.raises(ConfigError, match="lower owl_max_deviation"):
        owl_sparsities({0: 0.0, 1: 1.0}, {0: 1, 1: 1}, 0.9, 0.2)


def test_owl_budgets_prune_each_block_to_its_sparsity_with_the_mean_at_the_target() -> None:
    model = tiny_model("llama")
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(
        method="wanda", sparsity=0.5, layer_budget="owl", owl_outlier_multiple=3, owl_max_deviation=0.1
    )
    result = prune(model, config, calib, progress=False)
    assert len(set(result.block_sparsity.values())) == len(result.block_sparsity) == 2
    sizes = {b: sum(r.shape[0] * r.shape[1] for r in result.layers if r.block == b) for b in result.block_sparsity}
    mean = sum(result.block_sparsity[b] * sizes[b] for b in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-12)
    for layer in result.layers:  # row scope: each row keeps round((1 - s) * columns)
        assert layer.sparsity == pytest.approx(result.block_sparsity[layer.block], abs=1 / layer.shape[1])
    uniform = prune(model, PruneConfig(method="wanda", sparsity=0.5), calib, progress=False)
    assert uniform.block_sparsity == {} and {r.sparsity for r in uniform.layers} == {0.5}


def test_owl_budgets_refuse_n_m_patterns_and_need_calibration() -> None:
    with pytest.raises(ConfigError, match="N:M pattern"):
        PruneConfig(method="wanda", pattern="2:4", layer_budget="owl")
    with pytest.raises(ConfigError, match="calibration"):
        prune(tiny_model("llama"), PruneConfig(method="magnitude", layer_budget="owl"), None, progress=False)
