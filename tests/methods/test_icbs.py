"""iCBS: with no budget it is the start mask; it never raises a row's error; it keeps the pattern exactly; it
stops only where no exchange inside the block helps; and it beats Wanda's mask on correlated inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

import prunekit
from models import VOCAB, tiny_model
from prunekit.core.patterns import NM, Unstructured, select_keep_mask
from prunekit.methods.icbs.solver import icbs_refine, row_errors
from prunekit.methods.wanda.scores import wanda_scores


def problem(rows: int = 6, cols: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Gram matrix of strongly correlated inputs (where Wanda's per-entry score errs)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) + 0.5 * torch.eye(cols)
    x = torch.randn(256, cols, generator=generator) @ mixing
    return torch.randn(rows, cols, generator=generator), x.T @ x


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, pattern) -> torch.Tensor:
    return select_keep_mask(wanda_scores(weight, hessian.diagonal()), pattern)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7, "layer"), NM(2, 4)])
def test_no_budget_is_the_start_mask(pattern) -> None:
    weight, hessian = problem()
    start = wanda_mask(weight, hessian, pattern)
    refined = icbs_refine(weight, start, hessian, pattern, steps=0)
    assert torch.equal(refined.keep, start) and refined.swaps == 0
    assert torch.equal(refined.error_after, refined.error_before)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7, "layer"), NM(2, 4)])
def test_errors_never_rise_and_the_pattern_is_kept(pattern) -> None:
    weight, hessian = problem(seed=1)
    start = wanda_mask(weight, hessian, pattern)
    for steps in (1, 3, 50):
        refined = icbs_refine(weight, start, hessian, pattern, steps=steps)
        assert torch.all(refined.error_after <= refined.error_before * (1 + 1e-6))
        assert torch.equal(refined.keep.sum(dim=1), start.sum(dim=1))  # every row keeps its count
        if isinstance(pattern, NM):
            assert torch.all(refined.keep.view(6, -1, 4).sum(dim=2) == 2)  # every group of 4 keeps 2
        # the reported errors are the errors of the masks returned
        assert torch.allclose(refined.error_after, row_errors(weight, refined.keep, hessian), rtol=1e-4)
    assert refined.error_after.sum() < 0.9 * refined.error_before.sum()  # and on these inputs, much lower


def exchange_changes(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, row: int) -> list[float]:
    """The change of the row's error for every exchange of a kept and a pruned entry, by brute force."""
    base = float(row_errors(weight[row : row + 1], keep[row : row + 1], hessian))
    changes = []
    kept, pruned = keep[row].nonzero().flatten().tolist(), (~keep[row]).nonzero().flatten().tolist()
    for i, j in itertools.product(kept, pruned):
        trial = keep[row : row + 1].clone()
        trial[0, i], trial[0, j] = False, True
        changes.append(float(row_errors(weight[row : row + 1], trial, hessian)) - base)
    return changes


def test_with_the_whole_row_as_block_it_ends_where_no_exchange_helps() -> None:
    weight, hessian = problem(rows=4, cols=10, seed=2)
    pattern = Unstructured(0.5)
    refined = icbs_refine(weight, wanda_mask(weight, hessian, pattern), hessian, pattern, steps=200, block=10)
    scale = float(row_errors(weight, torch.zeros_like(refined.keep), hessian).max())
    for row in range(4):  # a local optimum of the exchange neighbourhood, checked by brute force
        assert min(exchange_changes(weight, refined.keep, hessian, row)) > -1e-5 * scale


def test_the_exchange_formula_matches_brute_force() -> None:
    # one step with the whole row as the block takes the best exchange of each row: the brute-force best
    weight, hessian = problem(rows=3, cols=8, seed=3)
    pattern = Unstructured(0.5)
    start = wanda_mask(weight, hessian, pattern)
    one = icbs_refine(weight, start, hessian, pattern, steps=1, block=8)
    for row in range(3):
        best = min(exchange_changes(weight, start, hessian, row))
        got = float(one.error_after[row] - one.error_before[row])
        assert got == pytest.approx(min(best, 0.0), rel=1e-4, abs=1e-3)


def test_icbs_runs_in_the_pipeline_and_beats_wanda_on_a_tiny_model() -> None:
    # the same start (Wanda's mask) and no refit: the layers' errors fall overall
    model = tiny_model("llama")
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    errors = {}
    for method in ("wanda", "icbs"):
        config = prunekit.PruneConfig(method=method, sparsity=0.5, refit_steps=0)
        result = prunekit.prune(model, config, calib, progress=False)
        assert {r.method for r in result.layers} == {method} and {r.sparsity for r in result.layers} == {0.5}
        errors[method] = [r.relative_error for r in result.layers]
    assert sum(errors["icbs"]) < sum(errors["wanda"])


def test_rows_with_nothing_to_exchange_are_left_alone() -> None:
    # under a per-layer budget a row may be wholly kept or wholly pruned: it has no exchange to make
    weight, hessian = problem(rows=3, cols=8, seed=4)
    start = torch.zeros(3, 8, dtype=torch.bool)
    start[1] = True
    start[2, :4] = True
    refined = icbs_refine(weight, start, hessian, Unstructured(0.5, "layer"), steps=20, block=4)
    assert torch.equal(refined.keep[:2], start[:2]) and int(refined.keep[2].sum()) == 4
    assert refined.error_after[2] <= refined.error_before[2]
