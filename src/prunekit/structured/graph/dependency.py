"""The dependency graph of a model: which indices of which parameters must be removed together.

:func:`build_dependency_graph` traces the model (:mod:`~prunekit.structured.graph.trace`), runs the coupling
rule of every operation (:mod:`~prunekit.structured.graph.rules`) and returns, for every parameter and buffer,
the atoms of each of its dimensions. From them come the *units* (independent things that can be removed:
a channel of a residual stream, a head, a group of a depthwise conv) and the *spaces* (the units that play
the same role: the 64 channels of a ResNet stage are one space of 64 units). This is the idea of
DepGraph (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning"), computed at the level of single
indices, which is what handles reshapes, channel shuffles, concatenations and grouped-query attention
without per-model code.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from prunekit.structured.graph.atoms import FROZEN, AtomTable
from prunekit.structured.graph.rules import (
    RuleContext,
    build_rule_table,
    freeze_dims,
    frozen_dims,
    rule_for,
    rule_unknown,
    shape_of,
)
from prunekit.structured.graph.trace import TracedModel, state_of, trace_model

log = logging.getLogger(__name__)

#: Kinds of spaces. ``plain``: channels of ordinary layers; ``group``: whole groups of a grouped or depthwise
#: conv / group norm; ``group_position``: the same position in every group; ``factor_outer`` and
#: ``factor_inner``: the two sides of a reshape such as ``(H * D) -> (H, D)`` (heads and head width).
SPACE_KINDS = ("plain", "group", "group_position", "factor_outer", "factor_inner")


@dataclass
class Space:
    """Units that play the same role, and where they live."""

    index: int
    units: list[int]
    kind: str
    #: ``(state name, dim)`` pairs that contain these units.
    where: list[tuple[str, int]] = field(default_factory=list)
    #: Whether an addition of two tensors of different origin joins these units (a residual stream: the
    #: channels of a ResNet stage, the hidden size of a transformer), as opposed to the width inside a block.
    stream: bool = False

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class DependencyGraph:
    """Atoms per dimension of every parameter and buffer of a traced model, and the spaces of units."""

    table: AtomTable
    state_dims: dict[str, list[np.ndarray]]
    parameter_names: set[str]
    spaces: list[Space]
    #: Grouped convs / group norms: name of their weight -> atoms of their groups.
    groups: dict[str, np.ndarray]
    #: ATen operations without a coupling rule (they froze what they touch) -> count.
    unknown_ops: dict[str, int]
    traced: TracedModel
    #: Atoms of every traced node's result (by node name): what each intermediate tensor is made of.
    node_dims: dict[str, Any] = field(default_factory=dict)

    def space_of_unit(self) -> dict[int, int]:
        return {u: s.index for s in self.spaces for u in s.units}

    def removed_indices(self, name: str, pruned: set[int]) -> list[np.ndarray]:
        """Per dimension of ``name``: which indices go when ``pruned`` units are removed."""
        return [self.table.removed(atoms, pruned) for atoms in self.state_dims[name]]

    def describe(self) -> str:
        lines = [f"{len(self.spaces)} spaces of prunable units"]
        for s in self.spaces:
            names = ", ".join(f"{n}[{d}]" for n, d in s.where[:4]) + (" ..." if len(s.where) > 4 else "")
            role = " (residual stream)" if s.stream else ""
            lines.append(f"  space {s.index}: {s.size} {s.kind} units{role} in {names}")
        if self.unknown_ops:
            lines.append(
                "operations without a rule (their tensors are left unpruned): "
                + ", ".join(f"{k} x{v}" for k, v in sorted(self.unknown_ops.items()))
            )
        return "\n".join(lines)


def _convert(arg: Any, env: dict[torch.fx.Node, Any]) -> Any:
    if isinstance(arg, torch.fx.Node):
        return env.get(arg)
    if isinstance(arg, (list, tuple)):
        return [_convert(a, env) for a in arg]
    if isinstance(arg, dict):
        return {k: _convert(v, env) for k, v in arg.items()}
    return arg


def _freeze_tree(table: AtomTable, value: Any) -> None:
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        freeze_dims(table, value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _freeze_tree(table, v)


def _state_dims(table: AtomTable, tensor: torch.Tensor) -> list[np.ndarray]:
    """Fresh atoms for each dimension; a dimension of size 1 (a class token's batch axis) can never shrink."""
    return [table.new(int(s)) if s > 1 else AtomTable.frozen(int(s)) for s in tensor.shape]


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: dict[str, Any] | None = None,
    *,
    ignored: Sequence[str] = (),
    tied: Sequence[str] = (),
) -> DependencyGraph:
    """Trace ``model`` on the example inputs and compute its coupled units.

    ``ignored`` names modules (or parameters) whose parameters must keep their shape: their dimensions are
    frozen, and with them everything coupled to them. ``tied`` names modules whose inner width must stay
    equal to the width of the stream they read (attention that computes ``head_dim = C // num_heads`` from
    its input): see :func:`tie_widths`.
    """
    traced = trace_model(model, example_inputs, example_kwargs)
    table = AtomTable()
    env: dict[torch.fx.Node, Any] = {}
    state_dims: dict[str, list[np.ndarray]] = {}

    state = state_of(model)
    for node, name in zip(traced.placeholders, traced.state_names, strict=False):
        dims = _state_dims(table, state[name])
        state_dims[name] = dims
        env[node] = dims
        if not node.users:  # used only by code the trace cannot see (or not at all): keep its shape
            freeze_dims(table, dims)
    for node in traced.input_placeholders:
        shape = shape_of(node.meta.get("val"))
        env[node] = frozen_dims(shape) if shape is not None else None

    rules = build_rule_table()
    ctx = RuleContext(table=table, node=next(iter(traced.graph.nodes)))
    weight_of_group_node: dict[str, str] = {}
    placeholder_name = dict(zip(traced.placeholders, traced.state_names, strict=False))
    for node in traced.graph.nodes:
        if node.op in ("placeholder",):
            continue
        if node.op == "output":
            _freeze_tree(table, _convert(node.args[0], env))
            continue
        if node.op == "get_attr":
            shape = shape_of(node.meta.get("val"))
            env[node] = frozen_dims(shape) if shape is not None else None
            continue
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            container = env.get(node.args[0])
            env[node] = container[node.args[1]] if isinstance(container, list) else None
            continue
        if not hasattr(node.target, "overloadpacket"):
            # Python-level calls on sizes (operator.mul on SymInts...) carry no tensor
            env[node] = None
            continue
        args = _convert(list(node.args), env)
        kwargs = _convert(dict(node.kwargs), env)
        ctx.node = node
        rule = rule_for(node.target, rules)
        try:
            env[node] = rule(ctx, args, kwargs)
        except Exception as error:  # a rule that meets an unexpected layout freezes instead of guessing
            log.debug(
                "rule for %s (%s) failed (%s): freezing its tensors", node.name, node.target, error, exc_info=True
            )
            env[node] = rule_unknown(ctx, args, kwargs)
        if node.name in ctx.groups:
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight in placeholder_name:
                weight_of_group_node[node.name] = placeholder_name[weight]
            else:  # a group count we could not attach to a module: keep the groups
                table.freeze_array(ctx.groups.pop(node.name))

    _apply_module_constraints(model, table, state_dims)
    for name in tied:
        tie_widths(model.get_submodule(name), name, table, state_dims)
    for name in ignored:
        for state_name, dims in state_dims.items():
            if state_name == name or state_name.startswith(name + "."):
                freeze_dims(table, dims)

    groups = {weight_of_group_node[k]: v for k, v in ctx.groups.items() if k in weight_of_group_node}
    parameter_names = {n for n, _ in model.named_parameters()}
    summed = {leaf for atoms in ctx.summed for a in np.unique(atoms).tolist() for leaf in table.leaves(a)}
    spaces = _spaces(table, state_dims, parameter_names, groups, summed)
    node_dims = {node.name: value for node, value in env.items()}
    graph = DependencyGraph(table, state_dims, parameter_names, spaces, groups, dict(ctx.unknown), traced, node_dims)
    if table.conflicts:
        log.info("structural graph: %d layout conflicts were frozen", len(table.conflicts))
    return graph


def _apply_module_constraints(model: nn.Module, table: AtomTable, state_dims: dict[str, list[np.ndarray]]) -> None:
    """Couplings that live in a module's Python code rather than in its traced operations.

    ``nn.MultiheadAttention`` reshapes with ``embed_dim`` read from its input, so the query, key and value
    widths must equal the width of the stream it reads: channel ``i`` of each is unified with channel ``i``
    of the input (a head is then removed from the stream as well, which keeps ``embed_dim = heads x
    head_dim`` true for the module).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            prefix = f"{name}." if name else ""
            in_proj = state_dims.get(prefix + "in_proj_weight")
            if in_proj is None:
                continue
            e = module.embed_dim
            for part in range(3):
                table.union_arrays(in_proj[0][part * e : (part + 1) * e], in_proj[1])
        elif isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            for key in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                dims = state_dims.get(prefix + key)
                if dims is not None:
                    freeze_dims(table, dims)


def tie_widths(module: nn.Module, name: str, table: AtomTable, state_dims: dict[str, list[np.ndarray]]) -> None:
    """Channel ``i`` of every ``k``-th slice of the output of each Linear directly inside ``module`` whose
    width is a multiple ``k`` of its input's, is unified with its input channel ``i`` (q, k and v with the
    stream, the output projection with the attention width): the coupling of ``nn.MultiheadAttention``,
    for modules whose code reshapes with a width read from their input."""
    prefix = f"{name}." if name else ""
    children = [("", module)] if isinstance(module, nn.Linear) else list(module.named_children())
    for child_name, child in children:
        if not isinstance(child, nn.Linear) or child.out_features % child.in_features:
            continue
        key = f"{prefix}{child_name}.weight" if child_name else f"{name}.weight"
        dims = state_dims.get(key)
        if dims is None:
            continue
        width = child.in_features
        for part in range(child.out_features // width):
            table.union_arrays(dims[0][part * width : (part + 1) * width], dims[1])


def _spaces(
    table: AtomTable,
    state_dims: dict[str, list[np.ndarray]],
    parameter_names: set[str],
    groups: dict[str, np.ndarray],
    summed: set[int],
) -> list[Space]:
    """Group the units found in parameters into spaces: units that occur in exactly the same places
    (parameter, dimension, position inside a compound index) play the same role. Two layers concatenated
    into a third stay two spaces: their units share the consumer but not the producer. A space with a
    unit in ``summed`` (joined by a residual addition) is a stream."""
    group_units = {leaf for atoms in groups.values() for a in atoms.tolist() for leaf in table.leaves(a)}
    places: dict[int, set[tuple[str, int, int, int]]] = {}
    group_positions: set[int] = set()
    for name, dims in state_dims.items():
        if name not in parameter_names:
            continue
        for d, atoms in enumerate(dims):
            for atom in np.unique(atoms).tolist():
                leaves = table.leaves(atom)
                grouped = bool(leaves) and leaves[0] in group_units
                for k, leaf in enumerate(leaves):
                    if grouped and k > 0:
                        group_positions.add(leaf)
                    places.setdefault(leaf, set()).add((name, d, k, len(leaves)))
    members: dict[frozenset[tuple[str, int, int, int]], list[int]] = {}
    for unit, where in places.items():
        members.setdefault(frozenset(where), []).append(unit)
    spaces = []
    for where, units in sorted(members.items(), key=lambda item: min(item[1])):
        units.sort()
        first = units[0]
        if first in group_units:
            kind = "group"
        elif first in group_positions:
            kind = "group_position"
        elif all(n == 1 for _, _, _, n in where):
            kind = "plain"
        elif any(k == 0 and n > 1 for _, _, k, n in where):
            kind = "factor_outer"
        else:
            kind = "factor_inner"
        located = sorted({(name, d) for name, d, _, _ in where})
        spaces.append(Space(len(spaces), units, kind, located, stream=any(u in summed for u in units)))
    return spaces


__all__ = ["FROZEN", "SPACE_KINDS", "DependencyGraph", "Space", "build_dependency_graph"]
