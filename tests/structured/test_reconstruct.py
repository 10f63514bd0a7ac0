"""Least-squares refit of the layers whose inputs were pruned (structured/reconstruct.py)."""

from __future__ import annotations

import torch

from prunekit.reconstruction.least_squares import least_squares_refit
from prunekit.structured.reconstruct import input_grams, linears_with_pruned_inputs


def test_a_removed_input_that_is_a_combination_of_kept_ones_is_reconstructed_exactly():
    torch.manual_seed(0)
    kept = torch.randn(200, 2, dtype=torch.float64)
    x = torch.cat([kept, (2 * kept[:, 0] - kept[:, 1]).unsqueeze(1)], dim=1)  # x3 = 2 x1 - x2
    w = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=torch.float64)
    refit = least_squares_refit(w, x.T @ x, torch.tensor([True, True, False]), damping=0.0)
    # W x = W[:, :2] x[:2] + W[:, 2] (2 x1 - x2)  =>  W' = [w1 + 2 w3, w2 - w3]
    expected = torch.tensor([[1.0 + 6.0, 2.0 - 3.0], [-1.0 + 8.0, 0.5 - 4.0]], dtype=torch.float64)
    torch.testing.assert_close(refit, expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(x[:, :2] @ refit.T, x @ w.T, atol=1e-8, rtol=0)


def test_refit_error_is_never_above_slicing_and_keeps_dtype():
    torch.manual_seed(1)
    x = torch.randn(500, 12) @ torch.randn(12, 12)  # correlated inputs
    w = torch.randn(5, 12)
    keep = torch.tensor([True, False] * 6)
    refit = least_squares_refit(w, x.T @ x, keep, damping=1e-4)
    assert refit.dtype == torch.float32 and refit.shape == (5, 6)
    target = x @ w.T
    refit_error = (x[:, keep] @ refit.T - target).square().sum()
    slice_error = (x[:, keep] @ w[:, keep].T - target).square().sum()
    assert refit_error < 0.8 * slice_error  # 0.50 x here; slicing is a feasible point, so never above 1x


def test_an_input_that_never_fires_gives_no_nan_and_keeps_its_weight():
    x = torch.randn(50, 3, dtype=torch.float64)
    x[:, 1] = 0.0
    w = torch.randn(2, 4, dtype=torch.float64)
    x4 = torch.cat([x, torch.randn(50, 1, dtype=torch.float64)], dim=1)
    refit = least_squares_refit(w, x4.T @ x4, torch.tensor([True, True, True, False]), damping=0.0)
    assert torch.isfinite(refit).all()
    assert torch.equal(refit[:, 1], w[:, 1])


def test_llm_width_pruning_refits_down_and_o_proj_and_reduces_their_error():
    from test_structured import tiny_llama

    from prunekit.structured.llm import prune_causal_lm_width

    model = tiny_llama()
    calibration = torch.randint(0, 64, (4, 16))
    sliced = prune_causal_lm_width(model, calibration, 0.5, target="channels", prune_hidden=False, reconstruct=False)
    refit = prune_causal_lm_width(model, calibration, 0.5, target="channels", prune_hidden=False)
    names = linears_with_pruned_inputs(model, refit.model)
    assert sorted(names) == [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("mlp.down_proj", "self_attn.o_proj")]
    # each refitted layer, fed the kept part of the dense model's own input, matches the dense output better
    grams = input_grams(model, [((calibration,), {"use_cache": False})], names)
    for name in names:
        dense = model.get_submodule(name).weight.double()
        keep = torch.from_numpy(~refit.graph.removed_indices(f"{name}.weight", refit.plan.removed)[1])
        errors = []
        for result in (refit, sliced):
            full = torch.zeros_like(dense)
            full[:, keep] = result.model.get_submodule(name).weight.double()
            diff = dense - full
            errors.append(float(torch.trace(diff @ grams[name].double() @ diff.T)))  # sum_t ||W x_t - W' x_t[S]||^2
        assert errors[0] < errors[1], name
    # the rest of the model is what slicing gives
    for name, value in sliced.model.state_dict().items():
        if not any(name.startswith(n) for n in names):
            assert torch.equal(value, refit.model.state_dict()[name]), name


def test_one_calibration_pass_gives_the_norms_and_grams_of_separate_passes():
    from test_structured import tiny_llama

    from prunekit.structured.graph import build_dependency_graph
    from prunekit.structured.importance import collect_input_norms
    from prunekit.structured.llm.width import _calibration_statistics
    from prunekit.structured.reconstruct import linears_with_prunable_inputs

    model = tiny_llama()
    batches = [((torch.randint(0, 64, (2, 16)),), {"use_cache": False}) for _ in range(2)]
    graph = build_dependency_graph(model, (batches[0][0][0][:1],), {"use_cache": False}, ignored=["model.embed_tokens"])
    names = linears_with_prunable_inputs(model, graph)
    # the hidden size is kept: only the layers that read heads or the MLP width
    assert sorted(names) == [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("mlp.down_proj", "self_attn.o_proj")]
    grams, norms = _calibration_statistics(model, graph, batches, "activation", reconstruct=True)
    expected_grams = input_grams(model, batches, names)
    assert grams.keys() == expected_grams.keys()
    for name in names:
        torch.testing.assert_close(grams[name], expected_grams[name], rtol=1e-6, atol=1e-5)
    expected_norms = collect_input_norms(model, batches)
    assert norms.keys() == expected_norms.keys()
    for name, value in expected_norms.items():
        torch.testing.assert_close(norms[name], value, rtol=1e-5, atol=1e-5)
    assert _calibration_statistics(model, graph, batches, "l2", reconstruct=False) == ({}, None)


def test_refit_of_any_structurally_pruned_model_from_calibration_batches():
    from torch import nn

    from prunekit import prune_structurally
    from prunekit.structured.reconstruct import refit_pruned_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(256, 6)
    result = prune_structurally(model, (x[:1],), 0.5)
    sliced = result.model(x).detach()
    names = refit_pruned_linears(model, result.model, result.graph, result.plan, [((x,), {})])
    assert names == ["2"]  # the layer that lost inputs; the first lost outputs only
    with torch.no_grad():
        dense = model(x)
        assert (result.model(x) - dense).square().sum() < (sliced - dense).square().sum()


def test_width_pruning_prunes_its_own_attention_dropped_copy_in_place_with_the_same_result():
    from test_attention_drop import tiny_llama

    from prunekit.structured.llm import prune_causal_lm_width
    from prunekit.structured.llm.attention_drop import prune_causal_lm_attention

    model = tiny_llama(layers=6)
    calibration = torch.randint(0, 64, (4, 16))
    # in place, refitted from the weights held before the surgery ...
    together = prune_causal_lm_width(model, calibration, 0.3, drop_attention=2).model
    # ... against the same two steps with a copy at each (the dense weights read from the dropped model)
    dropped, _ = prune_causal_lm_attention(model, calibration, 2)
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    left = 1.0 - 0.7 * size(model) / size(dropped)
    apart = prune_causal_lm_width(dropped, calibration, left).model
    assert together.config.intermediate_size == apart.config.intermediate_size
    for (name, a), (_, b) in zip(together.state_dict().items(), apart.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
