"""What a plan will cost in time on the device that will run it: a latency lookup table, filled by timing each
traced operation alone at the shapes it will have, and the planned latency of a model as the sum over its
operations.

This is the latency model of HALP (Shen et al. 2022, "Structural Pruning via Latency-Saliency Knapsack",
NeurIPS; Sec. 3.2): the latency of a layer is read from a table indexed by its input and output widths,
measured on the target hardware, and the model's latency is the sum over layers (their Eq. 2,
``T(p) = sum_l T_l(p_{l-1}, p_l)``). Here the table is indexed by the whole signature of every ATen call of
the traced graph (operation, shapes, dtypes, other arguments), so convolutions, matrix products, norms,
activations and additions are all costed, in any architecture, and only the entries a search visits are
measured. MACs say how much arithmetic a layer does; the table also sees what MACs miss: memory traffic
(the depthwise convolutions and narrow 1x1 ones of MobileNets), the fixed cost of every call, and the
kernels' preference for some widths.

Times are measured with the model's device, dtype, thread count and memory format; each entry is the median
of a few timed blocks after a warm-up. Summing operations timed alone ignores the caches they share in a
real forward pass, so the model is a guide for where to cut, not a substitute for measuring the result
(:func:`~prunekit.structured.report.compare_latency`).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from prunekit.eval.speed import seconds_per_call
from prunekit.structured.cost import aten_calls, planned_call
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.plan import StructuralPlan

log = logging.getLogger(__name__)

#: Batch norms in evaluation mode, which deployment folds into the convolution before them
#: (:func:`~prunekit.structured.graph.fold_bn.fold_batch_norms`): pass as ``free_ops`` to cost them nothing.
BATCH_NORM_OPS = ("aten.native_batch_norm", "aten._native_batch_norm_legit_no_training", "aten.batch_norm")

#: Operations whose size argument is the shape of their result: at planned shapes it is replaced by the
#: planned result's shape.
_SIZED_BY_RESULT = ("aten.view", "aten._unsafe_view", "aten.reshape", "aten.expand", "aten.new_zeros")


def _signature(value: Any) -> Any:
    """A hashable description of an argument: shape and dtype for tensors, the value otherwise."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format)):
        return value
    return repr(value)


@dataclass
class LatencyTable:
    """Seconds per call of ATen operations on one device, measured on demand and remembered by signature.

    ``free_ops`` names operations (their overload packet, e.g. ``"aten.native_batch_norm"``) that cost nothing
    in the deployed model (:data:`BATCH_NORM_OPS` once batch norms are folded). ``memory_format`` is the
    layout four-dimensional tensors will have (``torch.channels_last`` for CNNs on CPUs). ``min_block_s`` is
    the length of one timed block; each entry is the median of ``blocks`` of them.
    """

    device: torch.device | str = "cpu"
    threads: int | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    free_ops: Collection[str] = ()
    min_block_s: float = 0.002
    blocks: int = 5
    entries: dict[Any, float] = field(default_factory=dict)
    #: Calls that could not be run at their planned shapes; their time at the original shapes stands in.
    failed: dict[str, str] = field(default_factory=dict)
    #: Signatures that raised when measured: asked again, they raise again without running.
    unrunnable: dict[Any, str] = field(default_factory=dict)

    def seconds(self, node: torch.fx.Node, args: list, kwargs: dict, out: Any) -> float:
        """Time of one call of ``node``'s operation on arguments shaped like ``args``/``kwargs`` (meta tensors
        or values), measured the first time this signature is asked for."""
        name = str(node.target.overloadpacket)
        if name in self.free_ops:
            return 0.0
        if name in _SIZED_BY_RESULT and isinstance(out, torch.Tensor) and len(args) > 1:
            args = [args[0], list(out.shape), *args[2:]]
        key = (str(node.target), _signature(args), _signature(kwargs))
        cached = self.entries.get(key)
        if cached is None:
            if key in self.unrunnable:
                raise RuntimeError(self.unrunnable[key])
            try:
                cached = self.entries[key] = self._measure(node.target, args, kwargs)
            except Exception as error:  # remembered, so that a search does not run it again and again
                self.unrunnable[key] = f"{type(error).__name__}: {error}"
                raise
        return cached

    def _measure(self, op: Callable[..., Any], args: list, kwargs: dict) -> float:
        device = torch.device(self.device)
        real_args = [_materialise(a, device, self.memory_format) for a in args]
        real_kwargs = {k: _materialise(v, device, self.memory_format) for k, v in kwargs.items()}
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                return _median_seconds(lambda: op(*real_args, **real_kwargs), device, self.min_block_s, self.blocks)
        finally:
            torch.set_num_threads(previous)


def _materialise(value: Any, device: torch.device, memory_format: torch.memory_format) -> Any:
    """A real tensor for a meta one: positive values (safe under ``sqrt`` and ``log``, valid as variances),
    zeros for integer and boolean tensors (valid as indices)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v, device, memory_format) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype.is_floating_point or value.dtype.is_complex:
        tensor = torch.rand(value.shape, dtype=value.dtype, device=device) + 0.5
    else:
        tensor = torch.zeros(value.shape, dtype=value.dtype, device=device)
    if tensor.dim() == 4 and memory_format is not torch.contiguous_format:
        tensor = tensor.contiguous(memory_format=memory_format)
    return tensor


def _median_seconds(call: Callable[[], Any], device: torch.device, min_block_s: float, blocks: int) -> float:
    """Median seconds per call over ``blocks`` timed blocks, each of enough calls to last ``min_block_s``,
    after two warm-up calls (which also choose the block length)."""
    call()
    once = max(seconds_per_call(call, device), 1e-7)
    calls = max(1, int(min_block_s / once))
    return statistics.median(seconds_per_call(call, device, calls) for _ in range(blocks))


def node_seconds(graph: DependencyGraph, node: torch.fx.Node, removed: set[int], table: LatencyTable) -> float:
    """Planned time of one traced call once ``removed`` units are gone; a call that cannot be run at its
    planned shapes (an argument the plan makes stale) is costed at its original shapes, and noted in
    ``table.failed``."""
    args, kwargs, out = planned_call(graph, node, removed)
    try:
        return table.seconds(node, args, kwargs, out)
    except Exception as error:  # any operator can reject a shape combination the trace never saw
        if not removed:
            raise
        table.failed.setdefault(str(node.target), f"{type(error).__name__}: {error}")
        log.debug("latency: %s cannot run at its planned shapes (%s); costed as unpruned", node.name, error)
        return node_seconds(graph, node, set(), table)


def planned_latency(plan: StructuralPlan, table: LatencyTable) -> float:
    """Seconds of one forward pass on the example inputs after ``plan``, as the sum of its operations' times in
    ``table`` (HALP, Eq. 2)."""
    return sum(node_seconds(plan.graph, node, plan.removed, table) for node in aten_calls(plan.graph))


__all__ = ["BATCH_NORM_OPS", "LatencyTable", "node_seconds", "planned_latency"]
