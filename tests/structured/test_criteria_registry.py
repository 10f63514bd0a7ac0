"""Structural importance criteria are registered objects: one registered in a test is found by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.structured import build_dependency_graph
from prunekit.structured.config import StructuredConfig
from prunekit.structured.importance import SLICE_CRITERIA, criterion_names, slice_criterion, unit_importance


def test_a_registered_slice_criterion_scores_units():
    @slice_criterion("max-abs-test")
    def _max_abs(tensor, dim, grad, input_norms):
        return tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1).abs().amax(1)

    try:
        model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[1.0], [-5.0]]))
            model[1].weight.copy_(torch.tensor([[3.0, 2.0]]))
        graph = build_dependency_graph(model, (torch.ones(1, 1),))
        (space,) = graph.spaces
        scores = unit_importance(graph, model, "max-abs-test", aggregation="sum", normalization="none")
        # unit 0 owns W0[0] (1) and W1[:, 0] (3); unit 1 owns W0[1] (-5) and W1[:, 1] (2)
        assert [scores[u] for u in space.units] == [4.0, 7.0]
        assert "max-abs-test" in criterion_names()
        assert StructuredConfig(criterion="max-abs-test").criterion == "max-abs-test"
        with pytest.raises(ValueError, match="already registered"):
            slice_criterion("l2")(_max_abs)
    finally:
        SLICE_CRITERIA.pop("max-abs-test")
    with pytest.raises(ConfigError, match="unknown criterion 'max-abs-test'"):
        StructuredConfig(criterion="max-abs-test")
