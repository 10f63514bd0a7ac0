"""Second-order structured removal against hand computations: a redundant input is removed first and for
free, the update is the exact least-squares refit on what is kept, and group costs are the true output errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunekit.reconstruction.least_squares import damped, least_squares_refit
from prunekit.reconstruction.structured_obs import column_removal_order, group_costs, remove_groups


def inputs(rows: int = 64, cols: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_column_whose_input_the_others_make_is_removed_first_and_the_outputs_do_not_change() -> None:
    x = inputs()
    x[:, 3] = 0.5 * x[:, 1] + 2.0 * x[:, 2]  # input 3 is an exact linear combination of inputs 1 and 2
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = x.T @ x
    # any one of inputs 1, 2, 3 is made by the other two: each costs nothing, the others do
    costs = group_costs(weight, torch.linalg.inv(damped(gram, 1e-12)), torch.arange(6)[:, None])
    assert all(float(costs[j]) < 1e-6 for j in (1, 2, 3)) and all(float(costs[j]) > 1.0 for j in (0, 4, 5))
    result = remove_groups(weight, gram, [[j] for j in range(6)], 1, dampening=1e-12)
    (removed,) = result.removed
    assert removed in (1, 2, 3) and result.costs[0] == pytest.approx(0.0, abs=1e-6)
    assert torch.all(result.weight[:, removed] == 0)
    assert torch.allclose(x @ result.weight.T, x @ weight.T, atol=1e-6)  # folded into the other two


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_update_is_the_exact_least_squares_refit_on_the_kept_columns(count: int) -> None:
    x = inputs(seed=2)
    gram = x.T @ x
    weight = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = remove_groups(weight, gram, [[j] for j in range(6)], count, dampening=0.01)
    keep = torch.tensor([j for j in range(6) if j not in result.removed])
    assert torch.allclose(result.weight[:, keep], least_squares_refit(weight, gram, keep, 0.01), atol=1e-9)
    # each single removal picks the column of least ||w_j||^2 / [H^-1]_jj among those left
    hinv = torch.linalg.inv(damped(gram, 0.01))
    first = min(range(6), key=lambda j: float(weight[:, j].pow(2).sum() / hinv[j, j]))
    assert result.removed[0] == first


def test_group_costs_are_the_output_errors_of_removing_each_group() -> None:
    x = inputs(cols=8, seed=4)
    gram = x.T @ x
    h = damped(gram, 0.01)
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]  # four "heads" of two columns
    costs = group_costs(weight, torch.linalg.inv(h), torch.tensor(groups))
    for g, cols in enumerate(groups):
        keep = torch.tensor([j for j in range(8) if j not in cols])
        refit = torch.zeros_like(weight)
        refit[:, keep] = least_squares_refit(weight, gram, keep, 0.01)
        diff = refit - weight
        assert float(costs[g]) == pytest.approx(float(((diff @ h) * diff).sum()), rel=1e-9)
    result = remove_groups(weight, gram, groups, 1)
    assert result.removed == [int(costs.argmin())]


def test_greedy_choices_are_deterministic_and_the_inputs_untouched() -> None:
    x = inputs(cols=6, seed=6)
    gram = x.T @ x
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    before = (weight.clone(), gram.clone())
    a = remove_groups(weight, gram, [[j] for j in range(6)], 3)
    b = remove_groups(weight, gram, [[j] for j in range(6)], 3)
    assert a.removed == b.removed and torch.equal(a.weight, b.weight)
    assert torch.equal(weight, before[0]) and torch.equal(gram, before[1])
    assert len(set(a.removed)) == 3 and all(torch.all(a.weight[:, j] == 0) for j in a.removed)


def test_bad_groups() -> None:
    weight, gram = torch.zeros(2, 4), torch.eye(4)
    with pytest.raises(ValueError, match="one size"):
        remove_groups(weight, gram, [[0], [1, 2]], 1)
    with pytest.raises(ValueError, match="cannot remove 3 of 2"):
        remove_groups(weight, gram, [[0, 1], [2, 3]], 3)


def test_the_greedy_pair_is_never_worse_than_the_best_single_pair_by_much() -> None:
    """Sanity: greedily removing two of six columns lands within the exhaustive optimum's error times 1.5."""
    x = inputs(seed=8)
    gram = x.T @ x
    h = damped(gram, 0.01)
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def error(kept: list[int]) -> float:
        refit = torch.zeros_like(weight)
        refit[:, kept] = least_squares_refit(weight, gram, torch.tensor(kept), 0.01)
        diff = refit - weight
        return float(((diff @ h) * diff).sum())

    best = min(error([j for j in range(6) if j not in pair]) for pair in itertools.combinations(range(6), 2))
    greedy = remove_groups(weight, gram, [[j] for j in range(6)], 2)
    assert error([j for j in range(6) if j not in greedy.removed]) <= 1.5 * best + 1e-12


@pytest.mark.parametrize("count", [0, 5, 23, 40])
def test_the_compacted_column_order_is_the_greedy_order(count: int) -> None:
    x = inputs(rows=200, cols=40, seed=6)
    x[:, 7] = x[:, 3] - x[:, 30]  # a free column among the others
    weight = torch.randn(9, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = remove_groups(weight, x.T @ x, [[j] for j in range(40)], count, dampening=0.01).removed
    assert column_removal_order(weight, x.T @ x, count, dampening=0.01) == expected
    with pytest.raises(ValueError, match="cannot remove 41 of 40"):
        column_removal_order(weight, x.T @ x, 41)
