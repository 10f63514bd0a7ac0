"""The one damping rule of the least-squares refits: the ridge pulls toward the dense weights (SparseGPT,
Frantar & Alistarh 2023, Sec. 3.3), so with uncorrelated inputs slicing is optimal and is returned exactly."""

from __future__ import annotations

import torch

from prunekit.reconstruction import least_squares_refit, refit_kept_weights, ridge


def test_uncorrelated_inputs_return_the_sliced_weights_exactly_whatever_the_damping():
    # A diagonal Gram: inputs never co-occur. A rarely active input (energy 0.01) used to shrink to 0.40x
    # under a ridge toward zero; toward the dense weights it keeps its weight.
    gram = torch.diag(torch.tensor([4.0, 0.01, 9.0, 1.0], dtype=torch.float64))
    w = torch.tensor([[1.0, 2.0, -3.0, 0.5], [0.25, -1.0, 2.0, 4.0]], dtype=torch.float64)
    keep = torch.tensor([True, True, True, False])
    for damping in (0.0, 0.01, 0.5):
        torch.testing.assert_close(least_squares_refit(w, gram, keep, damping), w[:, :3], atol=1e-12, rtol=0)


def test_exact_and_conjugate_gradient_refits_agree_on_the_same_damped_problem():
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    x[:, 5] = 0.7 * x[:, 0] - 0.2 * x[:, 3] + 0.1 * torch.randn(64, dtype=torch.float64)
    gram = x.T @ x
    w = torch.randn(3, 6, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, True, False])
    exact = least_squares_refit(w, gram, keep, damping=0.05)
    cg = refit_kept_weights(w, w * keep, keep.expand(3, 6), gram, steps=20, dampening=0.05)
    torch.testing.assert_close(cg[:, keep], exact, atol=1e-9, rtol=0)
    assert (cg[:, ~keep] == 0).all()


def test_ridge_is_the_fraction_of_the_mean_diagonal():
    gram = torch.diag(torch.tensor([2.0, 4.0, 6.0]))
    assert ridge(gram, 0.1) == 0.1 * 4.0
