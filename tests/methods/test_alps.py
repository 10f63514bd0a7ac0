"""ALPS: the ADMM solve finds a support that reproduces the layer exactly when one exists, keeps the pattern
exactly, and never ends above SparseGPT's layer error on the same inputs."""

from __future__ import annotations

import pytest
import torch

import prunekit
from models import VOCAB, tiny_model
from prunekit.core.patterns import NM, Unstructured
from prunekit.methods.alps.solver import alps_prune, scaled_problem
from prunekit.methods.sparsegpt.solver import inverse_hessian, sparsegpt_prune
from prunekit.reconstruction.least_squares import refit_kept_weights


def _error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` from ``H = X^T X``."""
    delta = (weight - pruned).double()
    return float(
        torch.trace(delta @ hessian.double() @ delta.T)
        / torch.trace(weight.double() @ hessian.double() @ weight.double().T)
    )


def test_a_support_that_reproduces_the_layer_exactly_is_found() -> None:
    # the dense layer is a 50%-sparse one plus a tiny perturbation at its zeros: that support reproduces it
    # to the perturbation, and ALPS must keep exactly it (and refit the rest to the optimum)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=generator) @ (torch.eye(16) + torch.randn(16, 16, generator=generator) / 4)
    hessian = x.T @ x
    sparse = torch.randn(8, 16, generator=generator)
    support = (torch.randperm(128, generator=generator) < 64).reshape(8, 16)
    sparse = sparse * support
    weight = sparse + 1e-4 * torch.randn(8, 16, generator=generator) * ~support
    solved = alps_prune(weight, scaled_problem(hessian), Unstructured(0.5, "layer"))
    assert torch.equal(solved.keep, support)
    refit = refit_kept_weights(weight, solved.weight, solved.keep, hessian, 10)
    assert torch.allclose(refit, sparse, atol=1e-3) and torch.equal(refit != 0, support)


def test_alps_moves_weight_onto_the_kept_copy_of_duplicated_inputs_better_than_sparsegpt() -> None:
    # in every group of four inputs the third repeats the first and the fourth the second: at 2:4 the best
    # mask keeps one of each copy and gives it the pair's weight; ALPS's joint solve gets far closer than
    # SparseGPT's greedy column-by-column one
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(512, 8, generator=generator)
    x = torch.stack([base[:, 2 * g + (i % 2)] for g in range(4) for i in range(4)], dim=1)
    hessian = x.T @ x
    weight = torch.randn(6, 16, generator=generator)
    alps = alps_prune(weight, scaled_problem(hessian), NM(2, 4))
    alps_error = _error(weight, refit_kept_weights(weight, alps.weight, alps.keep, hessian, 10), hessian)
    sparsegpt = sparsegpt_prune(weight, inverse_hessian(hessian, 0.01), NM(2, 4), block_size=16)
    assert alps_error < 0.2 * _error(weight, sparsegpt.weight, hessian)


@pytest.mark.parametrize("pattern", [Unstructured(0.5, "layer"), Unstructured(0.7, "layer"), NM(2, 4)])
def test_alps_never_ends_above_sparsegpt_and_keeps_the_pattern(pattern) -> None:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(32, 32, generator=generator) / 4 + torch.eye(32)
    x = torch.randn(1024, 32, generator=generator) @ mixing  # correlated inputs
    x[:, 3] *= 8  # and an outlier feature
    hessian = x.T @ x
    weight = torch.randn(24, 32, generator=generator)
    sparsegpt = sparsegpt_prune(weight, inverse_hessian(hessian, 0.01), pattern, block_size=32)
    sparsegpt_weight = refit_kept_weights(weight, sparsegpt.weight, sparsegpt.keep, hessian, 4)
    alps = alps_prune(weight, scaled_problem(hessian), pattern)
    alps_weight = refit_kept_weights(weight, alps.weight, alps.keep, hessian, 10)
    assert _error(weight, alps_weight, hessian) <= _error(weight, sparsegpt_weight, hessian)
    if isinstance(pattern, NM):
        assert torch.equal(alps.keep.reshape(24, 8, 4).sum(-1), torch.full((24, 8), 2))
    else:
        assert int((~alps.keep).sum()) == int(pattern.sparsity * weight.numel())
    assert torch.equal(alps_weight * ~alps.keep, torch.zeros_like(weight))


def test_alps_prunes_a_model_through_the_pipeline() -> None:
    model = tiny_model("llama")
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    result = prunekit.prune(
        model, prunekit.PruneConfig(method="alps", pattern="2:4", max_iterations=30), calib, progress=False
    )
    assert {r.method for r in result.layers} == {"alps"} and {r.sparsity for r in result.layers} == {0.5}
    assert all(r.relative_error is not None and r.relative_error < 1.0 for r in result.layers)
