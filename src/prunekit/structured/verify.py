"""Check a pruned model against the plan, node by node, and repair size attributes that Python code reads.

Slicing weights is not enough when a module's code carries sizes of its own: ``x.reshape(b, n, 3,
self.num_heads, -1)`` still splits into the old number of heads, and the model may even run, silently
wrong. So the pruned model is traced again and every intermediate tensor is compared with the shape the
plan predicts (the kept indices of the original tensor's atoms). At the first difference, the integer
attributes of the module that produced it (then of its parents) that hold the old size of a changed
dimension are set to the new size, one candidate at a time, keeping the change only if it moves the first
difference later in the graph. What cannot be repaired is reported with the node and module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.structured.atoms import AtomTable
from prunekit.structured.plan import StructuralPlan
from prunekit.structured.rules import shape_of
from prunekit.structured.trace import trace_model

log = logging.getLogger(__name__)

#: Attribute repairs tried before giving up.
MAX_REPAIRS = 16


@dataclass(frozen=True)
class Mismatch:
    """The first traced result whose shape differs from the plan's prediction."""

    position: int
    node: str
    module: str
    expected: tuple[int, ...]
    actual: tuple[int, ...]
    original: tuple[int, ...]

    def describe(self) -> str:
        where = f"module {self.module!r}" if self.module else "the top-level forward"
        return (
            f"{self.node} in {where} has shape {self.actual}, the plan expects {self.expected} "
            f"(before pruning {self.original})"
        )


def expected_shape(table: AtomTable, dims: Any, removed: set[int]) -> tuple[int, ...] | None:
    if not (isinstance(dims, list) and all(isinstance(a, np.ndarray) for a in dims)):
        return None
    return tuple(int((~table.removed(atoms, removed)).sum()) for atoms in dims)


def first_mismatch(
    pruned: nn.Module, plan: StructuralPlan, inputs: Sequence[Any], kwargs: dict[str, Any] | None
) -> Mismatch | None:
    """Trace ``pruned`` and compare each result with the plan; ``None`` when all agree. Raises ``LookupError``
    when the pruned model's graph is not the original's op for op (then only outputs can be checked)."""
    graph = plan.graph
    new = trace_model(pruned, inputs, kwargs, tracing_mode=graph.traced.mode)
    old_nodes = [n for n in graph.traced.graph.nodes if n.op == "call_function"]
    new_nodes = [n for n in new.graph.nodes if n.op == "call_function"]
    if [n.target for n in old_nodes] != [n.target for n in new_nodes]:
        raise LookupError("the pruned model runs different operations than the original")
    for position, (old, node) in enumerate(zip(old_nodes, new_nodes, strict=True)):
        values = node.meta.get("val")
        if not isinstance(values, torch.Tensor):
            continue
        expected = expected_shape(graph.table, graph.node_dims.get(old.name), plan.removed)
        actual = shape_of(values)
        if expected is not None and actual != expected:
            return Mismatch(
                position,
                old.name,
                old.meta.get("prunekit_module", ""),
                expected,
                actual,  # type: ignore[arg-type]
                shape_of(old.meta.get("val")),  # type: ignore[arg-type]
            )
    return None


def _candidates(model: nn.Module, module_name: str, mismatch: Mismatch) -> list[tuple[nn.Module, str, int]]:
    """``(module, attribute, new value)`` for int attributes holding an old size that the plan changes,
    innermost module first."""
    changes = {
        old: new
        for old, new, actual in zip(mismatch.original, mismatch.expected, mismatch.actual, strict=False)
        if old != new and actual != new
    }
    names = [module_name]
    while names[-1]:
        names.append(names[-1].rpartition(".")[0])
    found = []
    for name in names:
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            continue
        for attr, value in vars(module).items():
            if type(value) is int and value in changes and not attr.startswith("_"):
                found.append((module, attr, changes[value]))
    return found


def repair_size_attributes(
    pruned: nn.Module, plan: StructuralPlan, inputs: Sequence[Any], kwargs: dict[str, Any] | None
) -> list[str]:
    """Update module attributes until the pruned model's every intermediate shape matches the plan. Returns
    the repairs made (``"module.attr: old -> new"``). Raises ``ValueError`` describing the first shape that
    could not be made to match."""
    repairs: list[str] = []
    try:
        mismatch = first_mismatch(pruned, plan, inputs, kwargs)
    except LookupError as error:
        log.info("structure check skipped: %s", error)
        return repairs
    tried: set[tuple[int, str]] = set()
    while mismatch is not None and len(repairs) < MAX_REPAIRS:
        fixed = False
        for module, attr, value in _candidates(pruned, mismatch.module, mismatch):
            if (id(module), attr) in tried:
                continue
            tried.add((id(module), attr))
            old = getattr(module, attr)
            setattr(module, attr, value)
            try:
                after = first_mismatch(pruned, plan, inputs, kwargs)
            except Exception:  # the change broke the forward pass: undo
                after = mismatch
            if after is None or after.position > mismatch.position:
                repairs.append(f"{_name_of(pruned, module)}.{attr}: {old} -> {value}")
                log.info("structured: set %s", repairs[-1])
                mismatch, fixed = after, True
                break
            setattr(module, attr, old)
        if not fixed:
            break
    if mismatch is not None:
        raise ValueError(mismatch.describe())
    return repairs


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or "<root>"
    return type(module).__name__
