"""The Taylor criterion over several batches: the mean of per-batch squares (Molchanov et al. 2019, Eq. 4 per
minibatch, averaged over minibatches), not the square of the summed gradient."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prunekit.structured import build_dependency_graph
from prunekit.structured.importance import taylor_importance, unit_importance


def _two_layer() -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
        model[1].weight.copy_(torch.tensor([[3.0, -1.0]]))
    return model


def test_taylor_of_two_batches_with_cancelling_gradients_is_the_mean_of_their_squares():
    # y = w1 . (W0 x) with x = 1: d(y)/dW0[c] = w1[c], d(y)/dw1[c] = W0[c]. The second batch's loss is -y, so
    # its gradients are exactly the negation of the first's: summed, they cancel to 0.
    model = _two_layer()
    x = torch.ones(1, 1)
    graph = build_dependency_graph(model, (x,))
    (space,) = graph.spaces
    losses = [lambda: model(x).sum(), lambda: -model(x).sum()]
    got = taylor_importance(graph, model, losses, normalization="none", aggregation="sum")
    # unit c owns W0[c, 0] (g = w1[c]) and w1[0, c] (g = W0[c]); both places give (g w)^2 = (W0[c] w1[c])^2
    # in either batch, so the mean over the two batches is that, and the two places sum to twice it.
    w0, w1 = [1.0, 2.0], [3.0, -1.0]
    expected = [2 * (w0[c] * w1[c]) ** 2 for c in range(2)]  # [18, 8]
    np.testing.assert_allclose([got[u] for u in space.units], expected, rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_of_one_batch_matches_unit_importance_on_its_gradients():
    model = _two_layer()
    x = torch.randn(5, 1)
    graph = build_dependency_graph(model, (x,))
    batched = taylor_importance(graph, model, [lambda: model(x).square().sum()])
    model(x).square().sum().backward()
    single = unit_importance(graph, model, "taylor")
    assert batched.keys() == single.keys()
    np.testing.assert_allclose([batched[u] for u in single], list(single.values()), rtol=1e-6)
