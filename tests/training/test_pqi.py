"""PQ Index and SAP (Diao et al. 2023) on vectors small enough to work out by hand."""

import itertools
import math

import pytest
import torch

from prunekit.core.errors import ConfigError
from prunekit.training.pqi import (
    SAPConfig,
    model_pq_index,
    pq_index,
    pq_index_range,
    pq_index_rows,
    sap_keep_bound,
    sap_prune_count,
    sap_step,
)


def test_pqi_of_3_4_equals_the_hand_computed_value():
    w = torch.tensor([3.0, 4.0])
    # p=1, q=2: ||w||_1 = 7, ||w||_2 = 5, d = 2  ->  I = 1 - 2^(1/2 - 1) * 7 / 5.
    assert pq_index(w, p=1, q=2) == pytest.approx(1 - 2 ** (-0.5) * 7 / 5, abs=1e-12)
    # Defaults p=0.5, q=1: ||w||_0.5 = (sqrt 3 + 2)^2 = 7 + 4 sqrt 3, ||w||_1 = 7, d^(1 - 2) = 1/2
    #   ->  I = 1 - (7 + 4 sqrt 3) / 14 = (7 - 4 sqrt 3) / 14.
    assert pq_index(w) == pytest.approx((7 - 4 * math.sqrt(3)) / 14, abs=1e-12)


@pytest.mark.parametrize(("p", "q"), [(1.0, 2.0), (0.5, 1.0), (0.5, 2.0)])
def test_pqi_extremes_are_zero_for_equal_magnitudes_and_one_minus_d_power_for_one_hot(p, q):
    d = 4
    lo, hi = pq_index_range(d, p=p, q=q)
    assert lo == 0.0
    assert hi == pytest.approx(1 - d ** (1 / q - 1 / p))
    # Constant vector: 1 - d^(1/q-1/p) * d^(1/p) c / (d^(1/q) c) = 0 (least sparse); signs do not matter.
    assert pq_index(torch.tensor([2.5, -2.5, 2.5, 2.5]), p=p, q=q) == pytest.approx(0.0, abs=1e-12)
    # One non-zero entry: ||w||_p = ||w||_q, I = 1 - d^(1/q-1/p) (sparsest).
    assert pq_index(torch.tensor([0.0, -7.0, 0.0, 0.0]), p=p, q=q) == pytest.approx(hi, abs=1e-12)
    # Every other vector lies between.
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        value = pq_index(torch.randn(d, generator=g), p=p, q=q)
        assert lo <= value <= hi


def test_named_extremes_for_p1_q2_and_the_paper_defaults():
    assert pq_index(torch.tensor([1.0, 0.0, 0.0, 0.0]), p=1, q=2) == pytest.approx(1 - 4**-0.5)  # 0.5
    assert pq_index(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(1 - 4**-1)  # 0.75 at p=0.5, q=1


def test_pqi_grows_as_a_vector_gets_sparser():
    values = [pq_index(torch.tensor([1.0, t, t, t]), p=1, q=2) for t in (1.0, 0.5, 0.25, 0.1, 0.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert values[-1] == pytest.approx(0.5)
    assert all(a < b for a, b in itertools.pairwise(values))


def test_pqi_is_scale_invariant():
    w = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7])
    assert pq_index(w * 1024) == pytest.approx(pq_index(w), abs=1e-12)  # a power of 2: exact in float32


def test_pqi_counts_only_the_kept_weights():
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert pq_index(w, p=1, q=2) == pytest.approx(0.5)  # d = 4 (kept zeros count)
    assert pq_index(w, torch.tensor([True, False, False, False]), p=1, q=2) == pytest.approx(0.0)  # d = 1
    assert pq_index(w, torch.tensor([True, True, False, False]), p=1, q=2) == pytest.approx(1 - 2**-0.5)  # d = 2
    # The values of removed weights are ignored.
    assert pq_index(torch.tensor([3.0, 4.0, 100.0]), torch.tensor([True, True, False]), p=1, q=2) == pytest.approx(
        pq_index(torch.tensor([3.0, 4.0]), p=1, q=2)
    )
    with pytest.raises(ValueError, match="keeps nothing"):
        pq_index(w, torch.zeros(4, dtype=torch.bool))


def test_pqi_rows_and_model():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    rows = pq_index_rows(w, p=1, q=2)
    assert rows.tolist() == pytest.approx([1 - 7 / (5 * math.sqrt(2)), 1 - 1 / math.sqrt(2)])

    layers = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    result = model_pq_index(layers, p=1, q=2)
    assert result.layers["a"] == pytest.approx(1 - 7 / (5 * math.sqrt(2)))
    assert result.layers["b"] == pytest.approx(0.5)
    # Model: [3, 4, 1, 0, 0, 0], d = 6: 6^(-1/2) * 8 / sqrt(26) = 4 / sqrt(39).
    assert result.model == pytest.approx(1 - 4 / math.sqrt(39), abs=1e-12)
    # With a mask on "b" keeping only its 1: [3, 4, 1], d = 3: 3^(-1/2) * 8 / sqrt(26).
    masked = model_pq_index(layers, {"b": torch.tensor([[True, False], [False, False]])}, p=1, q=2)
    assert masked.layers["b"] == pytest.approx(0.0)
    assert masked.model == pytest.approx(1 - 8 / math.sqrt(3 * 26), abs=1e-12)


def test_sap_keep_bound_and_count_on_a_hand_worked_example():
    w = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # p=1, q=2: 1 - I = M_1 / M_2 = (6/8) / sqrt(10/8), so (1 - I)^2 = 0.5625 / 1.25 = 0.45.
    pqi = pq_index(w, p=1, q=2)
    assert (1 - pqi) ** 2 == pytest.approx(0.45)
    # r = d (1 + eta)^(-q/(q-p)) (1 - I)^(qp/(q-p)) = 8 * 1.1^-2 * 0.45 = 3.6 / 1.21 = 2.975...
    assert sap_keep_bound(pqi, 8, p=1, q=2, eta_r=0.1) == pytest.approx(3.6 / 1.21)
    # ceil(r) = 3 -> c = floor(8 * min(1.2 * (1 - 3/8), 0.9)) = floor(8 * 0.75) = 6.
    assert sap_prune_count(pqi, 8, p=1, q=2, eta_r=0.1, gamma=1.2, beta=0.9) == 6
    # eta = 0: r = 3.6 -> 4 -> c = floor(8 * min(1.2 * 0.5, 0.9)) = floor(4.8) = 4.
    assert sap_prune_count(pqi, 8, p=1, q=2, eta_r=0.0, gamma=1.2, beta=0.9) == 4
    # gamma = 3: 3 * 0.625 = 1.875 is capped at beta = 0.9 -> floor(7.2) = 7.
    assert sap_prune_count(pqi, 8, p=1, q=2, eta_r=0.1, gamma=3.0, beta=0.9) == 7

    result = sap_step({"w": w}, config=SAPConfig(p=1, q=2, eta_r=0.1, gamma=1.2, beta=0.9))
    assert result.removed == {"w": 6}
    assert result.masks["w"].tolist() == [True, True] + [False] * 6  # the two 2s stay
    capped = sap_step({"w": w}, config=SAPConfig(p=1, q=2, eta_r=0.1, gamma=3.0, beta=0.9))
    assert capped.masks["w"].tolist() == [True] + [False] * 7  # tie 2 = 2: the lower index stays


def test_sap_with_the_paper_defaults_on_a_one_hot_vector():
    # p=0.5, q=1, eta_r=0, gamma=1, beta=0.9: q/(q-p) = 2, qp/(q-p) = 1; 1 - I = 4^(-1) = 1/4;
    # r = 4 * 1 * 1/4 = 1; c = floor(4 * min(1 * 3/4, 0.9)) = 3.
    w = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert sap_keep_bound(pq_index(w), 4) == pytest.approx(1.0)
    assert sap_keep_bound(pq_index(w), 4, eta_r=0.001) == pytest.approx(1.001**-2)  # 0.998 -> still 1
    result = sap_step({"w": w})
    assert result.removed == {"w": 3}
    assert result.masks["w"].tolist() == [False, False, True, False]


def test_sap_keeps_removed_weights_removed_and_measures_the_kept_ones():
    w = torch.tensor([9.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([False] + [True] * 8)  # the 9 was removed earlier (its value is ignored)
    result = sap_step({"w": w}, {"w": mask}, SAPConfig(p=1, q=2, eta_r=0.1, gamma=1.2, beta=0.9))
    assert result.pqi["w"] == pytest.approx(1 - math.sqrt(0.45))  # the example above
    assert result.removed == {"w": 6}
    assert result.masks["w"].tolist() == [False, True, True] + [False] * 6


def test_sap_per_row_and_global():
    row = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    w = torch.stack([row, row.flip(0)])
    cfg = dict(p=1, q=2, eta_r=0.1, gamma=1.2, beta=0.9)
    per_row = sap_step({"w": w}, config=SAPConfig(scope="row", **cfg))
    assert per_row.removed == {"w": 12}  # six per row, as in the single-vector example
    assert per_row.masks["w"].int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]]

    # Global over w (16 weights) and b = [1, 1, 1]: kept magnitudes 2 x4, 1 x7, 0 x8, d = 19.
    # 1 - I = 19^(-1/2) * 15 / sqrt(23) = 15 / sqrt(437); r = 19 * (225/437) / 1.21 = 8.08 -> 9;
    # c = floor(19 * min(1.2 * 10/19, 0.9)) = 12: keep the four 2s and the first three 1s (lower index first).
    both = sap_step({"w": w, "b": torch.ones(3)}, config=SAPConfig(scope="global", **cfg))
    assert both.pqi["global"] == pytest.approx(1 - 15 / math.sqrt(437))
    assert both.total_removed == 12
    assert both.masks["w"].int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 1, 1]]
    assert both.masks["b"].tolist() == [False, False, False]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError):
        pq_index(torch.ones(3), p=2, q=1)
    with pytest.raises(ConfigError):
        SAPConfig(scope="neuron")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SAPConfig(beta=1.5)


def test_sap_leaves_fully_removed_rows_and_layers_alone():
    w = torch.tensor([[2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True] * 8, [False] * 8])
    cfg = dict(p=1, q=2, eta_r=0.1, gamma=1.2, beta=0.9)
    per_row = sap_step({"w": w}, {"w": mask}, SAPConfig(scope="row", **cfg))
    assert per_row.masks["w"].int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8]
    assert per_row.removed == {"w": 6}
    per_layer = sap_step({"w": w, "gone": torch.ones(3)}, {"w": mask, "gone": torch.zeros(3, dtype=torch.bool)})
    assert per_layer.removed["gone"] == 0 and "gone" not in per_layer.pqi
    assert per_layer.masks["gone"].tolist() == [False, False, False]
