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

from prunekit.core.errors import UntraceableModuleError
from prunekit.structured.graph.atoms import AtomTable
from prunekit.structured.graph.rules import shape_of
from prunekit.structured.graph.trace import trace_model
from prunekit.structured.plan import StructuralPlan

log = logging.getLogger(__name__)

#: Attribute repairs tried before giving up.
MAX_REPAIRS = 16


@dataclass(frozen=True)
class Problem:
    """The first place where the pruned model departs from the plan: a traced result of the wrong shape,
    or a forward pass that fails. ``position`` counts traced nodes (larger = later in the forward pass);
    ``changes`` maps sizes the plan changes in that module, old -> new."""

    position: int
    module: str
    message: str
    changes: dict[int, set[int]]


def expected_shape(table: AtomTable, dims: Any, removed: set[int]) -> tuple[int, ...] | None:
    if not (isinstance(dims, list) and all(isinstance(a, np.ndarray) for a in dims)):
        return None
    return tuple(int((~table.removed(atoms, removed)).sum()) for atoms in dims)


def _size_changes(plan: StructuralPlan, module: str) -> dict[int, set[int]]:
    """old size -> new sizes, over the traced results and parameters of ``module`` and its submodules."""
    graph = plan.graph
    changes: dict[int, set[int]] = {}

    def inside(name: str) -> bool:
        return not module or name == module or name.startswith(module + ".")

    def add(dims: Any) -> None:
        expected = expected_shape(graph.table, dims, plan.removed)
        if expected is None:
            return
        for atoms, new in zip(dims, expected, strict=True):
            if atoms.size != new:
                changes.setdefault(int(atoms.size), set()).add(new)

    for node in graph.traced.graph.nodes:
        if node.op == "call_function" and inside(node.meta.get("prunekit_module", "")):
            add(graph.node_dims.get(node.name))
    for name, dims in graph.state_dims.items():
        if inside(name.rpartition(".")[0]):
            add(dims)
    return changes


def first_problem(
    pruned: nn.Module, plan: StructuralPlan, inputs: Sequence[Any], kwargs: dict[str, Any] | None
) -> Problem | None:
    """Trace ``pruned`` and compare each result with the plan; ``None`` when all agree. Raises ``LookupError``
    when the pruned model's graph is not the original's op for op (then only outputs can be checked)."""
    graph = plan.graph
    try:
        new = trace_model(pruned, inputs, kwargs, tracing_mode=graph.traced.mode)
    except UntraceableModuleError as error:
        module = error.module_name or ""
        return Problem(error.progress, module, str(error), _size_changes(plan, module))
    old_nodes = [n for n in graph.traced.graph.nodes if n.op == "call_function"]
    new_nodes = [n for n in new.graph.nodes if n.op == "call_function"]
    if [n.target for n in old_nodes] != [n.target for n in new_nodes]:
        raise LookupError("the pruned model runs different operations than the original")
    for old, node in zip(old_nodes, new_nodes, strict=True):
        values = node.meta.get("val")
        if not isinstance(values, torch.Tensor):
            continue
        expected = expected_shape(graph.table, graph.node_dims.get(old.name), plan.removed)
        actual = shape_of(values)
        if expected is not None and actual != expected:
            module = old.meta.get("prunekit_module", "")
            where = f"module {module!r}" if module else "the top-level forward"
            original = shape_of(old.meta.get("val"))
            message = (
                f"{old.name} in {where} has shape {actual}, the plan expects {expected} (before pruning {original})"
            )
            changes = {
                o: {n}
                for o, n, a in zip(original, expected, actual, strict=False)  # type: ignore[arg-type]
                if o != n and a != n
            }
            return Problem(node.meta.get("prunekit_position", 0), module, message, changes)
    return None


def _candidates(model: nn.Module, problem: Problem) -> list[tuple[nn.Module, str, int]]:
    """``(module, attribute, new value)`` for int attributes holding an old size that the plan changes,
    innermost module first."""
    names = [problem.module]
    while names[-1]:
        names.append(names[-1].rpartition(".")[0])
    found = []
    for name in names:
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            continue
        for attr, value in vars(module).items():
            if type(value) is int and value in problem.changes and not attr.startswith("_"):
                found.extend((module, attr, new) for new in sorted(problem.changes[value]))
    return found


def repair_size_attributes(
    pruned: nn.Module, plan: StructuralPlan, inputs: Sequence[Any], kwargs: dict[str, Any] | None
) -> list[str]:
    """Update module attributes until the pruned model's every intermediate shape matches the plan. Returns
    the repairs made (``"module.attr: old -> new"``). Raises :class:`UnrepairedProblem` with the first problem
    that could not be repaired."""
    repairs: list[str] = []
    try:
        problem = first_problem(pruned, plan, inputs, kwargs)
    except LookupError as error:
        log.info("structure check skipped: %s", error)
        return repairs
    tried: set[tuple[int, str, int]] = set()
    while problem is not None and len(repairs) < MAX_REPAIRS:
        fixed = False
        for module, attr, value in _candidates(pruned, problem):
            if (id(module), attr, value) in tried:
                continue
            tried.add((id(module), attr, value))
            old = getattr(module, attr)
            setattr(module, attr, value)
            try:
                after = first_problem(pruned, plan, inputs, kwargs)
            except LookupError:
                after = None
            if after is None or after.position > problem.position:
                repairs.append(f"{_name_of(pruned, module)}.{attr}: {old} -> {value}")
                log.info("structured: set %s", repairs[-1])
                problem, fixed = after, True
                break
            setattr(module, attr, old)
        if not fixed:
            break
    if problem is not None:
        raise UnrepairedProblem(problem)
    return repairs


class UnrepairedProblem(ValueError):
    """The pruned model departs from the plan where no attribute repair helps."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or "<root>"
    return type(module).__name__
