"""Latency-aware structural pruning: the latency table, planned latency, and HALP's latency-saliency
allocation (``policy="latency"``). The allocation is checked with a table whose times are a known function
of the shapes, so which units it removes can be worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.structured import build_dependency_graph, prune_structurally, unit_importance
from prunekit.structured.cost import planned_macs
from prunekit.structured.knapsack import plan_latency_aware
from prunekit.structured.latency import LatencyTable, planned_latency
from prunekit.structured.plan import StructuralPlan, plan_pruning

NS = 1e-9


class ElementTable(LatencyTable):
    """Every operation takes 1 ns per element it reads or writes: a model of memory-bound kernels."""

    def _measure(self, op, args, kwargs) -> float:
        def count(value) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel()
            if isinstance(value, (list, tuple)):
                return sum(count(v) for v in value)
            return 0

        return NS * (count(args) + count(list(kwargs.values())) + count(self._last_out))

    def seconds(self, node, args, kwargs, out):
        self._last_out = out
        return super().seconds(node, args, kwargs, out)


class TwoResolutions(nn.Module):
    """Two bottlenecks of 8 channels, one at 8 x 8 pixels and one at 4 x 4: a channel of the first moves four
    times the elements of a channel of the second, for four times the MACs. The 4 channels between them are
    joined to the input by a residual, so the bottlenecks are the only prunable spaces."""

    def __init__(self) -> None:
        super().__init__()
        self.a_in = nn.Conv2d(4, 8, 1, bias=False)
        self.a_out = nn.Conv2d(8, 4, 1, bias=False)
        self.b_in = nn.Conv2d(4, 8, 1, bias=False)
        self.b_out = nn.Conv2d(8, 4, 1, bias=False)
        with torch.no_grad():  # every channel of a bottleneck equally important
            for conv in (self.a_in, self.a_out, self.b_in, self.b_out):
                conv.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x + self.a_out(self.a_in(x)), 2)
        return self.b_out(self.b_in(x))


def bottleneck_spaces(graph):
    a = next(s for s in graph.spaces if ("a_in.weight", 0) in s.where)
    b = next(s for s in graph.spaces if ("b_in.weight", 0) in s.where)
    return a, b


def test_planned_latency_of_one_convolution_by_hand():
    conv = nn.Conv2d(3, 5, 1, bias=False)
    x = torch.randn(1, 3, 4, 4)
    graph = build_dependency_graph(conv, (x,))
    table = ElementTable()
    # input 3*16, weight 5*3, output 5*16 elements
    assert planned_latency(StructuralPlan(graph, [], set()), table) == pytest.approx(NS * (48 + 15 + 80))


def test_latency_aware_allocation_removes_the_channels_that_save_most_time_first():
    model = TwoResolutions().eval()
    x = torch.randn(1, 4, 8, 8)
    graph = build_dependency_graph(model, (x,))
    scores = unit_importance(graph, model, "l2")
    a, b = bottleneck_spaces(graph)
    assert [s.index for s in graph.spaces] == [a.index, b.index]
    # MACs: a 2 * 4*8*64, b 2 * 4*8*16: 4096 + 1024 = 5120. Removing 25% (1280 MACs) takes 3 channels of a
    # (512 MACs each) if a goes first (a channel saves 136 ns, one of b 40), 6 of b at its floor if b did.
    plan = plan_latency_aware(graph, scores, 0.25, ElementTable(), budget="macs", min_keep_ratio=0.25)
    removed = {sp.space.index: len(sp.removed) for sp in plan.spaces}
    assert removed[a.index] == 3 and removed[b.index] == 0
    assert planned_macs(plan) == 5120 - 3 * 512
    # past a's floor (2 of 8 kept), b's channels go
    plan = plan_latency_aware(graph, scores, 0.7, ElementTable(), budget="macs", min_keep_ratio=0.25)
    removed = {sp.space.index: len(sp.removed) for sp in plan.spaces}
    assert removed[a.index] == 6 and removed[b.index] == math.ceil((0.7 * 5120 - 6 * 512) / 128) == 4


def test_latency_aware_allocation_weighs_importance_against_time():
    model = TwoResolutions().eval()
    with torch.no_grad():  # channels 0..5 of a and 0..3 of b carry 100x the weight of the others
        model.a_in.weight[:6].mul_(100.0)
        model.a_out.weight[:, :6].mul_(100.0)
        model.b_in.weight[:4].mul_(100.0)
        model.b_out.weight[:, :4].mul_(100.0)
    x = torch.randn(1, 4, 8, 8)
    graph = build_dependency_graph(model, (x,))
    scores = unit_importance(graph, model, "l2")
    a, b = bottleneck_spaces(graph)
    # a channel of a saves 136 ns (64 + 64 activation elements, 4 + 4 weights), one of b 40 ns. Normalised by
    # its space's mean, a light channel of a weighs 1/75, a heavy one 4/3, a light one of b 1/50.5: per ns
    # saved, a's light channels go first, then b's light ones (although a's heavy ones save 3.4x more time),
    # then a's heavy ones. 29% of 5120 MACs = 1485: a's two light channels (1024) and four of b (512).
    plan = plan_latency_aware(graph, scores, 0.29, ElementTable(), budget="macs", min_keep_ratio=0.25)
    removed = {sp.space.index: sp.removed for sp in plan.spaces}
    assert removed[a.index] == [a.units[6], a.units[7]]
    assert removed[b.index] == b.units[4:]


def test_a_latency_budget_is_met_by_the_plan():
    model = TwoResolutions().eval()
    x = torch.randn(1, 4, 8, 8)
    graph = build_dependency_graph(model, (x,))
    scores = unit_importance(graph, model, "l2")
    table = ElementTable()
    full = planned_latency(StructuralPlan(graph, [], set()), table)
    plan = plan_latency_aware(graph, scores, 0.3, table, budget="latency")
    assert planned_latency(plan, table) <= 0.7 * full + 1e-15
    # the uniform policy with a latency target, by bisection
    result = prune_structurally(model, (x,), 0.3, target="latency", latency=table)
    assert planned_latency(result.plan, table) <= 0.7 * full + 1e-15


def measured_macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


class FlattensWithView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        return self.head(y.view(y.shape[0], -1))


def test_a_measured_table_costs_every_call_once_and_runs_views_at_their_planned_shapes():
    torch.manual_seed(0)
    model = FlattensWithView().eval()
    x = torch.randn(1, 3, 4, 4)
    graph = build_dependency_graph(model, (x,))
    table = LatencyTable(min_block_s=1e-4, blocks=3)
    full = planned_latency(StructuralPlan(graph, [], set()), table)
    entries = len(table.entries)
    dense_calls = set(table.entries)
    assert full > 0 and entries > 0
    assert planned_latency(StructuralPlan(graph, [], set()), table) == full  # read from the table
    assert len(table.entries) == entries
    plan = plan_pruning(graph, unit_importance(graph, model), 0.5)
    assert planned_latency(plan, table) > 0
    assert table.failed == {}  # the view ran with the pruned width, not the traced literal size
    free = LatencyTable(min_block_s=1e-4, blocks=3, free_ops=("aten.convolution", "aten.addmm"))
    planned_latency(StructuralPlan(graph, [], set()), free)
    # free ops are not timed (a comparison of measured times would fail on a busy machine): what the free
    # table measured is what the full one did, less the convolutions and matrix products
    timed = {key for key in dense_calls if not str(key[0]).startswith(("aten.convolution", "aten.addmm"))}
    assert set(free.entries) == timed and timed < dense_calls


def test_prune_structurally_with_the_latency_policy_meets_a_mac_target():
    torch.manual_seed(0)
    model = TwoResolutions().eval()
    x = torch.randn(1, 4, 8, 8)
    result = prune_structurally(model, (x,), 0.5, target="macs", policy="latency", latency=ElementTable())
    assert measured_macs(result.model, x) <= 0.5 * measured_macs(model, x)
    assert result.model(x).shape == model(x).shape
    assert model.a_in.out_channels == 8  # the input model is untouched


def test_the_latency_policy_needs_a_cost_budget():
    model = TwoResolutions().eval()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="latency policy allocates"):
        prune_structurally(model, (x,), 0.5, policy="latency", latency=ElementTable())
    graph = build_dependency_graph(model, (x,))
    with pytest.raises(ValueError, match="plan_latency_aware"):
        plan_pruning(graph, unit_importance(graph, model), 0.5, policy="latency")
