"""The obs criterion: a unit's cost is the output error its removal leaves after the optimal update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import sample_text, tiny_model, tiny_tokenizer
from prunekit.calibration.data import tokenize_text
from prunekit.reconstruction.least_squares import damped, least_squares_refit
from prunekit.structured import build_dependency_graph
from prunekit.structured.importance import criterion_names, unit_importance
from prunekit.structured.llm.width import prune_causal_lm_width


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()


def test_a_hidden_unit_the_others_make_costs_nothing_and_costs_are_the_refit_errors() -> None:
    model = two_layers()
    with torch.no_grad():  # hidden unit 3 = hidden 0 + hidden 1 for every input
        model[0].weight[3] = model[0].weight[0] + model[0].weight[1]
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hidden = model[0](x).detach()
    gram = hidden.T @ hidden
    graph = build_dependency_graph(model, (x[:1],))
    (space,) = graph.spaces
    scores = unit_importance(graph, model, "obs", grams={"1": gram})
    costs = [scores[u] for u in space.units]
    # any one of 0, 1, 3 is made by the other two: removing it costs only the ridge's pull (7x less here)
    assert max(costs[0], costs[1], costs[3]) < costs[2] / 5
    # each cost is the refit's output error on the damped problem, over the layer's output energy
    w = model[1].weight.detach()
    h = damped(gram, 0.01)
    for unit, cost in zip(space.units, costs, strict=True):
        keep = torch.tensor([j for j in range(4) if j != space.units.index(unit)])
        refit = torch.zeros_like(w)
        refit[:, keep] = least_squares_refit(w, gram, keep, 0.01)
        diff = refit - w
        assert cost == pytest.approx(float(((diff @ h) * diff).sum() / ((w @ h) * w).sum()), rel=1e-6, abs=1e-12)


def test_obs_is_a_registered_criterion_that_needs_grams() -> None:
    assert "obs" in criterion_names()
    model = two_layers()
    graph = build_dependency_graph(model, (torch.ones(1, 3, dtype=torch.float64),))
    with pytest.raises(ValueError, match="needs the input Grams"):
        unit_importance(graph, model, "obs")


def test_width_pruning_of_a_causal_lm_with_the_obs_criterion() -> None:
    ids = tokenize_text(tiny_tokenizer(), sample_text(20_000))[: 8 * 32].reshape(8, 32)
    model = tiny_model("llama")
    result = prune_causal_lm_width(model, ids, 0.25, criterion="obs")
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    assert after <= 0.76 * before
    with torch.no_grad():
        assert torch.isfinite(result.model(ids).logits).all()
