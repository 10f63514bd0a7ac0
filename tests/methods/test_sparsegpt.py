"""SparseGPT: the solver on hand-made and random problems, and through the engine on tiny models."""

import math

import pytest
import torch

import prunekit
from models import FAMILIES, tiny_model
from oracles import true_sequential_oracle
from prunekit.calibration import statistics
from prunekit.calibration.statistics import accumulate_gram, complete_gram
from prunekit.core.errors import ConfigError, NumericalError
from prunekit.core.patterns import NM, Unstructured, nm_mask, unstructured_mask
from prunekit.methods.sparsegpt.solver import inverse_hessian_factor, sparsegpt_prune
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.targets import find_targets, weight_matrix
from prunekit.reconstruction.least_squares import refit_kept_weights


def test_two_by_two_by_hand():
    """W = [1, 2], H = [[2, 1], [1, 2]], no dampening. H^-1 = [[2, -1], [-1, 2]] / 3; its upper Cholesky
    factor U has U00 = sqrt(2/3), U01 = -1 / (3 sqrt(2/3)), U11 = sqrt(1/2). Errors w^2 / U_cc^2 are 1.5 and
    8: column 0 goes, and column 1 absorbs it: 2 - (1 / U00) * U01 = 2.5, the exact minimiser of
    (W - W') H (W - W')^T with w0' = 0."""
    weight = torch.tensor([[1.0, 2.0]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    result = sparsegpt_prune(weight, hessian, Unstructured(0.5, "row"), dampening=0.0)
    assert torch.equal(result.keep, torch.tensor([[False, True]]))
    assert torch.allclose(result.weight, torch.tensor([[0.0, 2.5]]), atol=1e-6)
    assert result.loss == pytest.approx(1.5 / 2, rel=1e-5)  # w0^2 / U00^2 / 2


@pytest.mark.parametrize("pattern", [Unstructured(0.5, "row"), Unstructured(0.375, "layer"), NM(2, 4), NM(1, 4)])
def test_identity_hessian_is_magnitude_pruning_without_updates(pattern):
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    result = sparsegpt_prune(weight, torch.eye(32), pattern, block_size=32)
    if isinstance(pattern, NM):
        expected = nm_mask(weight.abs(), pattern.n, pattern.m)
    else:
        expected = unstructured_mask(weight.abs(), pattern.sparsity, pattern.scope)
    assert torch.equal(result.keep, expected)
    assert torch.equal(result.weight, weight * expected)  # kept weights are not changed at all


def _correlated_problem(rows=48, cols=128, tokens=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / math.sqrt(cols)
    x = torch.randn(tokens, cols, generator=generator) @ mixing + 0.1 * torch.randn(tokens, cols, generator=generator)
    x[:, :8] *= 5.0  # a few outlier features, as in LLM activations
    weight = torch.randn(rows, cols, generator=generator)
    return weight, x


def _error(weight, pruned, x):
    return float((x @ (weight - pruned).t()).pow(2).sum() / (x @ weight.t()).pow(2).sum())


@pytest.mark.parametrize("pattern", [Unstructured(0.5, "row"), Unstructured(0.5, "layer"), NM(2, 4)])
def test_reconstruction_error_is_below_magnitude_and_wanda(pattern):
    weight, x = _correlated_problem()
    result = sparsegpt_prune(weight, accumulate_gram(None, x, torch.float64), pattern, block_size=32)
    wanda_scores = weight.abs() * x.pow(2).sum(0).sqrt()
    if isinstance(pattern, NM):
        magnitude_keep, wanda_keep = nm_mask(weight.abs(), 2, 4), nm_mask(wanda_scores, 2, 4)
    else:
        magnitude_keep = unstructured_mask(weight.abs(), 0.5, pattern.scope)
        wanda_keep = unstructured_mask(wanda_scores, 0.5, pattern.scope)
    errors = {
        "sparsegpt": _error(weight, result.weight, x),
        "wanda": _error(weight, weight * wanda_keep, x),
        "magnitude": _error(weight, weight * magnitude_keep, x),
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(4, 8), NM(1, 4)])
def test_nm_structure_holds_exactly_after_the_updates(pattern):
    weight, x = _correlated_problem(cols=96)
    result = sparsegpt_prune(weight, accumulate_gram(None, x, torch.float32), pattern, block_size=32)
    groups = result.weight.reshape(weight.shape[0], -1, pattern.m)
    assert ((groups != 0).sum(-1) == pattern.n).all()
    assert torch.equal(result.weight != 0, result.keep)


@pytest.mark.parametrize(("scope", "block_size"), [("row", 32), ("row", 50), ("layer", 50), ("layer", 500)])
def test_unstructured_sparsity_is_exact_for_any_block_size(scope, block_size):
    weight, x = _correlated_problem(rows=10, cols=130)
    result = sparsegpt_prune(
        weight, accumulate_gram(None, x, torch.float32), Unstructured(0.3, scope), block_size=block_size
    )
    zeros = result.weight == 0
    if scope == "row":
        assert (zeros.sum(1) == math.floor(0.3 * 130)).all()
    else:
        assert int(zeros.sum()) == math.floor(0.3 * 1300)
    assert torch.equal(~zeros, result.keep)


def test_dead_inputs_give_no_nan_and_zero_weights():
    weight, x = _correlated_problem(rows=8, cols=64)
    x[:, [3, 40]] = 0.0  # two features that never fire
    result = sparsegpt_prune(weight, accumulate_gram(None, x, torch.float32), Unstructured(0.5, "row"))
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, [3, 40]] == 0).all()
    assert ((result.weight == 0).sum(1) == 32).all()


def test_hessian_in_float64_whatever_the_weight_dtype():
    weight, x = _correlated_problem(rows=8, cols=64)
    gram = accumulate_gram(None, x.bfloat16(), torch.float64)
    assert gram.dtype == torch.float64
    result = sparsegpt_prune(weight.bfloat16(), gram, NM(2, 4))
    assert result.weight.dtype == torch.bfloat16
    assert ((result.weight.reshape(8, -1, 4) != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("band", [3, 5, 16, 256])
def test_accumulated_gram_equals_one_big_product(band, monkeypatch):

    monkeypatch.setattr(statistics, "GRAM_BAND", band)
    _, x = _correlated_problem(cols=16, tokens=60)
    gram = None
    for chunk in x.split(7):
        gram = accumulate_gram(gram, chunk.reshape(1, -1, 16), torch.float64)
    assert torch.allclose(complete_gram(gram), x.double().t() @ x.double())


def test_dampening_is_raised_then_a_clear_error_names_the_layer():
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0  # rank 1: needs dampening, which the default gives
    _, used = inverse_hessian_factor(singular, 0.01)
    assert used == 0.01
    _, used = inverse_hessian_factor(singular, 0.0)  # no dampening: the first retry succeeds
    assert used == pytest.approx(1e-3)
    with pytest.raises(NumericalError, match=r"model\.layers\.3\.mlp\.down_proj.*not positive definite.*--dampening"):
        sparsegpt_prune(torch.ones(2, 4), -torch.eye(4), NM(2, 4), layer_name="model.layers.3.mlp.down_proj")


def test_config_rejects_a_block_size_that_does_not_tile_nm_groups():
    with pytest.raises(ConfigError, match="block_size 6 must be a multiple of M=4"):
        prunekit.PruneConfig(method="sparsegpt", pattern="2:4", block_size=6)
    with pytest.raises(ConfigError, match="dampening"):
        prunekit.PruneConfig(method="sparsegpt", dampening=-1)
    assert prunekit.PruneConfig(method="sparsegpt").parsed_pattern() == Unstructured(0.5, "layer")
    assert prunekit.PruneConfig(method="wanda").parsed_pattern() == Unstructured(0.5, "row")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_engine_reaches_exact_sparsity_in_every_family(family, pattern, calibration):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = prunekit.PruneConfig(method="sparsegpt", pattern=pattern, block_size=16)
    result = prunekit.prune(model, config, calibration, progress=False)
    blocks_name, _ = find_decoder_blocks(result.model)
    targets = find_targets(result.model, blocks_name)
    assert len(result.layers) == len(targets) > 0
    for target in targets:
        w = weight_matrix(target.module)
        if pattern == "2:4":
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), target.name
        else:
            assert int((w == 0).sum()) == w.numel() // 2, target.name
        assert torch.isfinite(w).all()
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(k == t.name + ".weight" for t in targets) for k in changed)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the input model is untouched


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_equals_the_many_pass_oracle(family, calibration):
    config = prunekit.PruneConfig(method="sparsegpt", sparsity=0.5, block_size=16, hessian_dtype="float64")
    ours = prunekit.prune(tiny_model(family), config, calibration, progress=False)

    def solve(w, x_all):  # SparseGPT, then the default refit of the kept weights (4 steps)
        hessian = x_all.double().t() @ x_all.double()
        solved = sparsegpt_prune(w, hessian, Unstructured(0.5, "layer"), block_size=16)
        return refit_kept_weights(w, solved.weight, solved.keep, hessian, 4, dampening=solved.dampening)

    oracle = true_sequential_oracle(tiny_model(family), calibration, solve)
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), oracle.state_dict().items(), strict=True):
        assert torch.equal(a == 0, b == 0), f"masks differ at {name}"
        assert torch.allclose(a, b, atol=1e-5), name


def test_sparsegpt_beats_wanda_on_layer_error(calibration):
    model = tiny_model("llama")
    errors = {}
    for method in ("sparsegpt", "wanda"):
        result = prunekit.prune(model, prunekit.PruneConfig(method=method, pattern="2:4"), calibration, progress=False)
        errors[method] = sum(layer.relative_error for layer in result.layers)
    assert errors["sparsegpt"] < errors["wanda"]


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    _, x = _correlated_problem(cols=24, tokens=200)
    hessian = x.double().t() @ x.double()
    before = hessian.clone()
    upper, used = inverse_hessian_factor(hessian, 0.01)
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    assert used == 0.01
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())  # so the factor is unique
    assert torch.allclose(upper.t() @ upper, torch.linalg.inv(damped), rtol=1e-8, atol=1e-12)
    assert torch.allclose(upper, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-8, atol=1e-12)
    assert torch.equal(hessian, before)  # the input is not modified


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9])
def test_reverse_in_place_is_a_flip_of_both_dimensions(n):
    from prunekit.methods.sparsegpt.solver import reverse_in_place

    matrix = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    expected = matrix.flip(0, 1)
    result = reverse_in_place(matrix, chunk=2)  # chunks that do and do not divide n // 2
    assert result is matrix and torch.equal(result, expected)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 23])
def test_triangular_inverse_in_place_matches_a_solve(n):
    from prunekit.methods.sparsegpt.solver import invert_lower_triangular_in_place

    generator = torch.Generator().manual_seed(n)
    lower = torch.randn(n, n, generator=generator, dtype=torch.float64).tril()
    lower.diagonal().copy_(lower.diagonal().abs() + 1)
    expected = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=torch.float64), upper=False)
    result = invert_lower_triangular_in_place(lower.clone(), base=2, chunk=3)  # deep recursion, ragged chunks
    assert torch.allclose(result, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(result.triu(1), torch.zeros(n, n, dtype=torch.float64))
