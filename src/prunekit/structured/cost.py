"""What a plan will cost before any weight is cut: parameters and multiply-accumulates of the pruned model.

Parameters come from the planned shapes. MACs come from the traced graph: every matrix product, convolution
and attention node is re-costed at its planned shapes with the formulas of
:mod:`torch.utils.flop_counter` (the same ones ``FlopCounterMode`` uses; MACs = FLOPs / 2), so the
prediction equals a measurement of the pruned model with that counter, except that attention's two products
(scores and weighted values) are counted on a CPU too, where the counter misses the fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import flop_registry

from prunekit.structured.graph import DependencyGraph, build_dependency_graph
from prunekit.structured.graph.verify import expected_shape
from prunekit.structured.plan import StructuralPlan


def parameter_count(graph: DependencyGraph, names: Iterable[str], removed: set[int]) -> int:
    """Number of parameters among the state ``names`` once ``removed`` units are gone (buffers count 0)."""
    return sum(
        math.prod(int((~m).sum()) for m in graph.removed_indices(name, removed))
        for name in set(names) & graph.parameter_names & set(graph.state_dims)
    )


def planned_parameters(plan: StructuralPlan) -> int:
    """Number of parameters after the plan (tied parameters once)."""
    return parameter_count(plan.graph, plan.graph.parameter_names, plan.removed)


def _meta(shape: tuple[int, ...] | None, like: Any) -> Any:
    if shape is None:
        return like
    dtype = like.dtype if isinstance(like, torch.Tensor) else torch.float32
    return torch.empty(shape, dtype=dtype, device="meta")


def planned_call(graph: DependencyGraph, node: torch.fx.Node, removed: set[int]) -> tuple[list, dict, Any]:
    """``(args, kwargs, result)`` of one traced ATen call, with every tensor replaced by a meta tensor of the
    shape it has once the units in ``removed`` are gone: what a cost formula (or a timing) needs."""
    table = graph.table

    def planned(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            value = arg.meta.get("val")
            if isinstance(value, torch.Tensor):
                return _meta(expected_shape(table, graph.node_dims.get(arg.name), removed), value)
            return value
        if isinstance(arg, (list, tuple)):
            return type(arg)(planned(a) for a in arg)
        return arg

    args = [planned(a) for a in node.args]
    kwargs = {k: planned(v) for k, v in node.kwargs.items()}
    value = node.meta.get("val")
    dims = graph.node_dims.get(node.name)
    if isinstance(value, torch.Tensor):
        out = _meta(expected_shape(table, dims, removed), value)
    elif isinstance(value, (tuple, list)):
        out = type(value)(
            _meta(expected_shape(table, d, removed), v) if isinstance(v, torch.Tensor) else v
            for v, d in zip(value, dims if isinstance(dims, list) else [None] * len(value), strict=False)
        )
    else:
        out = value
    return args, kwargs, out


def aten_calls(graph: DependencyGraph) -> list[torch.fx.Node]:
    """The traced nodes that call an ATen operation (not Python arithmetic on sizes, not ``getitem``)."""
    return [n for n in graph.traced.graph.nodes if n.op == "call_function" and hasattr(n.target, "overloadpacket")]


def _formula(packet: Any) -> Any:
    """The FLOP formula of an ATen operation: :data:`~torch.utils.flop_counter.flop_registry`'s, and for the
    CPU's fused attention kernel, which that registry leaves out (so ``FlopCounterMode`` counts 0 for the
    attention products of every model run on a CPU), the formula of the same products on other devices."""
    if packet is getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None):
        packet = torch.ops.aten._scaled_dot_product_flash_attention
    return flop_registry.get(packet)


def node_flops(graph: DependencyGraph, node: torch.fx.Node, removed: set[int]) -> int:
    """Floating-point operations of one traced call at its planned shapes (0 for operations without a
    formula: see :func:`_formula`); MACs are half of them."""
    formula = _formula(getattr(node.target, "overloadpacket", None))
    if formula is None:
        return 0
    args, kwargs, out = planned_call(graph, node, removed)
    return int(formula(*args, out_val=out, **kwargs))


def planned_macs(plan: StructuralPlan) -> int:
    """Multiply-accumulates of one forward pass on the example inputs, after the plan."""
    return sum(node_flops(plan.graph, node, plan.removed) for node in aten_calls(plan.graph)) // 2


def original_size(plan: StructuralPlan) -> tuple[int, int]:
    """``(parameters, MACs)`` of the model before the plan."""
    empty = StructuralPlan(plan.graph, [], set())
    return planned_parameters(empty), planned_macs(empty)


def model_size(
    model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict[str, Any] | None = None
) -> tuple[int, int]:
    """``(parameters, MACs)`` of ``model`` on the example inputs, counted as plans count them."""
    return original_size(StructuralPlan(build_dependency_graph(model, example_inputs, example_kwargs), [], set()))
