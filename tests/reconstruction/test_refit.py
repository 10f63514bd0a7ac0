"""Refitting the kept weights (prunekit.reconstruction.least_squares): by hand, against a direct solve, through the engine."""

import math

import pytest
import torch

import prunekit
from models import tiny_model
from prunekit.calibration.statistics import accumulate_gram
from prunekit.core.errors import ConfigError
from prunekit.core.patterns import NM, Unstructured, nm_mask, unstructured_mask
from prunekit.methods.sparsegpt.solver import sparsegpt_prune
from prunekit.reconstruction import least_squares as refit_module
from prunekit.reconstruction.least_squares import damped, reconstruction_error, refit_kept_weights


def test_one_free_weight_by_hand():
    """W = [1, 2], H = [[2, 1], [1, 2]], keep only column 1, no dampening. The minimiser of
    (W - W') H (W - W')^T with w0' = 0 solves H11 w1' = H10 w0 + H11 w1: w1' = 2 + 1/2 = 2.5. One free
    weight: one CG step from W masked reaches it exactly (residual [.,1], direction 1/2, curvature 1/2)."""
    dense = torch.tensor([[1.0, 2.0]])
    keep = torch.tensor([[False, True]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    refit = refit_kept_weights(dense, dense * keep, keep, hessian, 1, dampening=0.0)
    assert torch.equal(refit, torch.tensor([[0.0, 2.5]]))


def _problem(rows=12, cols=40, tokens=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator, dtype=torch.float64) / math.sqrt(cols)
    x = torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ mixing
    x[:, :4] *= 5.0  # outlier features
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return weight, x, accumulate_gram(None, x, torch.float64)


def test_enough_steps_reach_the_direct_least_squares_solution():
    """CG converges in at most |S_i| steps per row in exact arithmetic; in float64, 3x that is plenty."""
    weight, _, hessian = _problem()
    keep = unstructured_mask(torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)), 0.5, "row")
    refit = refit_kept_weights(weight, weight * keep, keep, hessian, 60, dampening=0.01)
    h = damped(hessian, 0.01)
    for row in range(weight.shape[0]):
        kept = keep[row]
        direct = torch.linalg.solve(h[kept][:, kept], (weight[row] @ h)[kept])
        assert torch.allclose(refit[row, kept], direct, atol=1e-9), row
        assert torch.equal(refit[row, ~kept], torch.zeros(int((~kept).sum()), dtype=torch.float64))


@pytest.mark.parametrize("pattern", [Unstructured(0.5, "layer"), NM(2, 4)])
def test_every_step_lowers_every_row_error_and_keeps_the_mask(pattern):
    weight, _, hessian = _problem()
    result = sparsegpt_prune(weight, hessian, pattern, block_size=8)
    h = damped(hessian, result.dampening)
    previous = reconstruction_error(weight, result.weight, h)
    for steps in range(1, 7):
        refit = refit_kept_weights(weight, result.weight, result.keep, hessian, steps, dampening=result.dampening)
        errors = reconstruction_error(weight, refit, h)
        assert (errors <= previous * (1 + 1e-12)).all(), steps
        assert torch.equal(refit != 0, result.keep)
        previous = errors
    assert previous.sum() < 0.95 * reconstruction_error(weight, result.weight, h).sum()
    if isinstance(pattern, NM):
        assert ((refit.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()


def test_refit_lowers_the_error_of_wanda_and_sparsegpt_masks():
    """On correlated inputs, Wanda's 2:4 mask with refitted weights reconstructs better than plain Wanda,
    and SparseGPT plus 4 refit steps better than SparseGPT alone."""
    weight, x, hessian = _problem(rows=24, cols=64, tokens=800)
    wanda_keep = nm_mask(weight.abs() * x.pow(2).sum(0).sqrt(), 2, 4)
    wanda = weight * wanda_keep
    wanda_refit = refit_kept_weights(weight, wanda, wanda_keep, hessian, 40, dampening=0.0)
    solved = sparsegpt_prune(weight, hessian, NM(2, 4), block_size=16, dampening=0.0)
    sparsegpt_refit = refit_kept_weights(weight, solved.weight, solved.keep, hessian, 4, dampening=0.0)
    error = {name: float(reconstruction_error(weight, w, hessian).sum()) for name, w in
             [("wanda", wanda), ("wanda_refit", wanda_refit), ("sparsegpt", solved.weight),
              ("sparsegpt_refit", sparsegpt_refit)]}  # fmt: skip
    assert error["wanda_refit"] < error["wanda"]
    assert error["sparsegpt_refit"] < 0.6 * error["sparsegpt"]


def test_row_chunks_give_the_same_result(monkeypatch):
    weight, _, hessian = _problem(rows=30)
    keep = unstructured_mask(weight.abs(), 0.5, "row")
    whole = refit_kept_weights(weight, weight * keep, keep, hessian, 5)
    monkeypatch.setattr(refit_module, "REFIT_CHUNK_ELEMENTS", 7 * weight.shape[1])  # chunks of 7 rows, and 2
    assert torch.allclose(refit_kept_weights(weight, weight * keep, keep, hessian, 5), whole, rtol=0, atol=1e-12)


def test_dead_inputs_stay_as_given_and_give_no_nan():
    weight, x, _ = _problem()
    x[:, 5] = 0.0
    hessian = accumulate_gram(None, x, torch.float64)
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[:, ::2] = False
    pruned = weight * keep
    for dampening in (0.0, 0.01):
        refit = refit_kept_weights(weight, pruned, keep, hessian, 5, dampening=dampening)
        assert torch.isfinite(refit).all()
        assert torch.equal(refit[:, 5], pruned[:, 5])  # no data constrains a dead input


def test_zero_steps_masks_and_inputs_are_untouched():
    weight, _, hessian = _problem()
    keep = weight > 0
    pruned = weight.clone()  # not yet masked
    copies = [t.clone() for t in (weight, pruned, keep, hessian)]
    assert torch.equal(refit_kept_weights(weight, pruned, keep, hessian, 0), weight * keep)
    refit_kept_weights(weight, pruned, keep, hessian, 3)
    for tensor, copy in zip((weight, pruned, keep, hessian), copies, strict=True):
        assert torch.equal(tensor, copy)
    assert refit_kept_weights(weight.float(), pruned.float(), keep, hessian.float(), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="steps must be >= 0"):
        refit_kept_weights(weight, pruned, keep, hessian, -1)
    with pytest.raises(ValueError, match="Hessian has shape"):
        refit_kept_weights(weight, pruned, keep, hessian[:3, :3], 1)


def test_config_defaults_and_calibration_requirement(calibration):
    assert prunekit.PruneConfig(method="sparsegpt").resolved_refit_steps() == 4
    assert prunekit.PruneConfig(method="wanda").resolved_refit_steps() == 0
    assert not prunekit.PruneConfig(method="wanda").needs_hessian()
    wanda_refit = prunekit.PruneConfig(method="wanda", refit_steps=2)
    assert wanda_refit.needs_hessian() and wanda_refit.resolved_propagation() == "sequential"
    assert prunekit.PruneConfig(method="sparsegpt", refit_steps=0).resolved_refit_steps() == 0
    with pytest.raises(ConfigError, match="refit_steps"):
        prunekit.PruneConfig(method="sparsegpt", refit_steps=-1)
    with pytest.raises(ConfigError, match="refitting the kept weights needs calibration data"):
        prunekit.prune(tiny_model("llama"), prunekit.PruneConfig(method="magnitude", refit_steps=2), progress=False)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_engine_refit_lowers_layer_errors_and_keeps_exact_sparsity(method, calibration):
    errors = {}
    for steps in (0, 8):
        config = prunekit.PruneConfig(method=method, pattern="2:4", refit_steps=steps, propagation="sequential")
        result = prunekit.prune(tiny_model("llama"), config, calibration, progress=False)
        assert result.overall_sparsity == 0.5
        first = result.layers[0]
        errors[steps] = (first.relative_error, sum(layer.relative_error for layer in result.layers))
    assert errors[8][0] < errors[0][0]  # the first layer sees the same inputs in both runs
    assert errors[8][1] < errors[0][1]
