"""Exact, hand-computed results for scores, patterns and masks."""

import pytest
import torch

from prunekit.calibration.statistics import input_sq_norms
from prunekit.core.errors import ConfigError
from prunekit.core.masks import Mask, load_masks, save_masks
from prunekit.core.patterns import NM, Unstructured, count_to_prune, nm_mask, parse_pattern, unstructured_mask
from prunekit.methods.magnitude.scores import magnitude_scores
from prunekit.methods.wanda.scores import wanda_scores


def test_wanda_on_hand_made_4x4_keeps_the_weights_computed_by_hand():
    w = torch.tensor(
        [
            [4.0, -1.0, 2.0, 1.0],
            [1.0, 1.0, -1.0, 1.0],
            [-3.0, 0.5, 0.5, 2.0],
            [0.1, 2.0, 0.0, -4.0],
        ]
    )
    # Three tokens; column norms ||X_j||_2 = sqrt(sum of squares) = [1, 4, 2, 0.5].
    x = torch.tensor([[1.0, 4.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.3], [0.0, 0.0, 0.0, 0.4]])
    sq = input_sq_norms(x)
    assert torch.allclose(sq, torch.tensor([1.0, 16.0, 4.0, 0.25]))
    scores = wanda_scores(w, sq)
    # |W| * [1, 4, 2, 0.5]:
    expected = torch.tensor(
        [
            [4.0, 4.0, 4.0, 0.5],
            [1.0, 4.0, 2.0, 0.5],
            [3.0, 2.0, 1.0, 1.0],
            [0.1, 8.0, 0.0, 2.0],
        ]
    )
    assert torch.allclose(scores, expected)
    keep = unstructured_mask(scores, 0.5, "row")
    # Row 0: ties 4,4,4 -> drop 0.5 and the last of the tied (stable: lower index kept) -> keep cols 0,1.
    # Row 1: keep 4 and 2 (cols 1, 2). Row 2: keep 3 and 2 (cols 0, 1). Row 3: keep 8 and 2 (cols 1, 3).
    assert keep.tolist() == [
        [True, True, False, False],
        [False, True, True, False],
        [True, True, False, False],
        [False, True, False, True],
    ]
    # Magnitude alone would have kept different weights in rows 1, 2 and 3 (column 3 of row 2 ties col 0).
    mag_keep = unstructured_mask(magnitude_scores(w), 0.5, "row")
    assert mag_keep.tolist()[3] == [False, True, False, True]
    assert mag_keep.tolist()[2] == [True, False, False, True]


def test_two_four_keeps_the_two_largest_of_each_group_of_four():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 9.0, 8.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0, -1.0, -2.0, -3.0, -4.0]])
    keep = nm_mask(scores, 2, 4)
    assert keep.int().tolist() == [[0, 1, 1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 1, 0, 0]]
    # Row 1, group 0: three tied zeros and a 1 -> keep the 1 and the first zero (lower index wins ties).


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (3, 4), (4, 8), (1, 2)])
def test_nm_structure_is_exact_on_random_scores(n, m):
    scores = torch.randn(16, 4 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    keep = nm_mask(scores, n, m).reshape(16, 4, m)
    assert (keep.sum(-1) == n).all()
    # Every kept score is >= every dropped score in its group.
    groups = scores.reshape(16, 4, m)
    kept_min = groups.masked_fill(~keep, float("inf")).min(-1).values
    dropped_max = groups.masked_fill(keep, float("-inf")).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_all_ties_are_broken_towards_the_lower_index():
    keep = nm_mask(torch.ones(2, 8), 2, 4)
    assert keep.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]] * 2
    keep = unstructured_mask(torch.ones(1, 6), 0.5, "row")
    assert keep.int().tolist() == [[1, 1, 1, 0, 0, 0]]


def test_per_row_and_per_layer_sparsity_are_exact():
    scores = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    per_row = unstructured_mask(scores, 0.3, "row")
    assert per_row.sum(1).tolist() == [7, 7, 7, 7]  # floor(0.3 * 10) = 3 removed in each row
    assert per_row[:, :3].sum() == 0
    per_layer = unstructured_mask(scores, 0.3, "layer")
    assert int((~per_layer).sum()) == 12  # floor(0.3 * 40)
    assert per_layer.flatten()[:12].sum() == 0 and per_layer.flatten()[12:].all()
    # Per layer, the 12 smallest are the first row and two of the second: rows lose 10, 2, 0, 0.
    assert (~per_layer).sum(1).tolist() == [10, 2, 0, 0]


@pytest.mark.parametrize(("sparsity", "n", "expected"), [(0.5, 576, 288), (0.29, 100, 29), (0.7, 10, 7), (0.0, 9, 0)])
def test_count_to_prune_is_robust_to_float_error(sparsity, n, expected):
    assert count_to_prune(sparsity, n) == expected


def test_parse_pattern():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern(" 4 : 8 ", sparsity=0.5) == NM(4, 8)
    assert parse_pattern("unstructured", 0.7, "layer") == Unstructured(0.7, "layer")
    with pytest.raises(ConfigError, match=r"implies sparsity 0\.5"):
        parse_pattern("2:4", sparsity=0.6)
    with pytest.raises(ConfigError, match="unknown pattern"):
        parse_pattern("blocky")


def test_mask_value_object(tmp_path):
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    a = Mask(torch.tensor([[True, False], [True, True]]))
    b = Mask(torch.tensor([[True, True], [False, True]]))
    assert a.density == 0.75 and a.sparsity == 0.25
    both = a.compose(b)
    assert both.keep.tolist() == [[True, False], [False, True]]
    assert both.apply(w).tolist() == [[1.0, 0.0], [0.0, 0.5]]
    assert w.tolist() == [[1.0, -2.0], [3.0, 0.5]]  # apply returns a new tensor
    view = w.t()  # in-place masking through a transposed view changes the storage
    Mask(both.keep.t().contiguous()).apply_(view)
    assert w.tolist() == [[1.0, 0.0], [0.0, 0.5]]
    save_masks({"layer": both}, tmp_path / "m.safetensors")
    assert torch.equal(load_masks(tmp_path / "m.safetensors")["layer"].keep, both.keep)
    with pytest.raises(ValueError, match="cannot apply"):
        a.apply(torch.zeros(3, 3))


@pytest.mark.parametrize("width", [4, 8, 16, 17, 64, 577])
@pytest.mark.parametrize("k_fraction", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_fast_selection_equals_a_stable_sort_even_with_many_ties(width, k_fraction):
    from oracles import keep_mask_by_sort
    from prunekit.core.patterns import drop_lowest_k

    generator = torch.Generator().manual_seed(width)
    scores = torch.randint(0, 5, (33, width), generator=generator).float()  # heavy ties
    k = int(k_fraction * width)
    assert torch.equal(drop_lowest_k(scores, k), keep_mask_by_sort(scores, k))
    scores = torch.randn(7, 3, width, generator=generator)
    assert torch.equal(drop_lowest_k(scores, k), keep_mask_by_sort(scores, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kth_smallest_equals_torch_kthvalue_in_every_dtype_and_layout(dtype):
    from prunekit.core.patterns import kth_smallest

    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 4, 37, generator=generator).to(dtype)
    for k in (1, 2, 18, 37):
        expected = torch.kthvalue(scores.float(), k, dim=-1, keepdim=True).values.to(dtype)
        got = kth_smallest(scores, k)
        assert got.dtype == dtype and got.shape == (5, 4, 1)
        assert torch.equal(got, expected)
    transposed = scores[0].t()  # not contiguous
    assert torch.equal(
        kth_smallest(transposed, 3), torch.kthvalue(transposed.float(), 3, dim=-1, keepdim=True).values.to(dtype)
    )
