"""Shape bookkeeping shared by the dependency rules: the atoms of broadcasting, reshaping and frozen
dimensions, and the fallback rule that freezes whatever an unknown operation touches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from prunekit.structured.graph.atoms import AtomTable
from prunekit.structured.graph.rules.registry import Dims, RuleContext


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The concrete shape of a traced value (a tensor's ``meta['val']``), ``None`` for non-tensors."""
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def frozen_dims(shape: Sequence[int]) -> Dims:
    return [AtomTable.frozen(int(s)) for s in shape]


def freeze_dims(table: AtomTable, dims: Dims | None) -> None:
    if dims is None:
        return
    for atoms in dims:
        table.freeze_array(atoms)


def broadcast(table: AtomTable, operands: Sequence[Dims], out_shape: Sequence[int]) -> Dims:
    """Unify the dimensions of ``operands`` that broadcasting aligns (same size, not 1) and return the
    atoms of a result of ``out_shape``."""
    out: Dims = []
    ndim = len(out_shape)
    for position in range(ndim):
        size = out_shape[position]
        offset = ndim - position  # aligned from the right
        chosen: np.ndarray | None = None
        for dims in operands:
            if len(dims) < offset:
                continue
            atoms = dims[len(dims) - offset]
            if atoms.size != size:
                table.freeze_array(atoms)  # broadcast from size 1: that dimension cannot shrink
                continue
            if chosen is None:
                chosen = atoms
            else:
                table.union_arrays(chosen, atoms)
        out.append(chosen if chosen is not None else AtomTable.frozen(size))
    return out


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def reshape_dims(table: AtomTable, dims: Dims, out_shape: Sequence[int]) -> Dims:
    """Atoms of ``view(out_shape)``: dimensions are matched in minimal blocks of equal product; within a
    block, input indices are merged into compound atoms and split into aliases of per-dimension factors."""
    in_shape = [a.size for a in dims]
    in_keep = [i for i, s in enumerate(in_shape) if s != 1]
    out_keep = [j for j, s in enumerate(out_shape) if s != 1]
    result: list[np.ndarray | None] = [None] * len(out_shape)
    for j, s in enumerate(out_shape):
        if s == 1:
            result[j] = AtomTable.frozen(1)
    for i in range(len(in_shape)):
        if in_shape[i] == 1:
            table.freeze_array(dims[i])
    i = j = 0
    while i < len(in_keep) or j < len(out_keep):
        block_in, block_out = [in_keep[i]], [out_keep[j]]
        p_in, p_out = in_shape[in_keep[i]], out_shape[out_keep[j]]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                block_in.append(in_keep[i])
                p_in *= in_shape[in_keep[i]]
                i += 1
            else:
                block_out.append(out_keep[j])
                p_out *= out_shape[out_keep[j]]
                j += 1
        for position, atoms in zip(
            block_out,
            _reshape_block(table, [dims[k] for k in block_in], [out_shape[k] for k in block_out]),
            strict=False,
        ):
            result[position] = atoms
    return [r for r in result if r is not None]


def _reshape_block(table: AtomTable, inputs: Dims, out_sizes: Sequence[int]) -> Dims:
    if len(inputs) == 1 and len(out_sizes) == 1:
        return [inputs[0]]
    # flat atoms of the block, row-major
    if len(inputs) == 1:
        flat = inputs[0]
    else:
        grids = np.meshgrid(*inputs, indexing="ij")
        stacked = np.stack([g.reshape(-1) for g in grids], axis=1)
        flat = np.fromiter((table.compound(row) for row in stacked.tolist()), dtype=np.int64, count=stacked.shape[0])
    if len(out_sizes) == 1:
        return [flat]
    if all(table.is_frozen(a) for a in np.unique(flat).tolist()):
        return [AtomTable.frozen(s) for s in out_sizes]
    factors = [table.new(s) for s in out_sizes]
    index = np.indices(out_sizes).reshape(len(out_sizes), -1).T
    for f, multi in zip(flat.tolist(), index.tolist(), strict=False):
        table.set_alias(f, [int(factors[d][m]) for d, m in enumerate(multi)])
    return factors


def _tensor_args(args: Sequence[Any]) -> list[Dims]:
    return [a for a in args if isinstance(a, list) and all(isinstance(x, np.ndarray) for x in a) and a]


def _map_outputs(ctx: RuleContext, make: Callable[[tuple[int, ...]], Dims]) -> Any:
    value = ctx.node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return make(shape_of(value))  # type: ignore[arg-type]
    if isinstance(value, (tuple, list)):
        return [make(shape_of(v)) if isinstance(v, torch.Tensor) else None for v in value]  # type: ignore[arg-type]
    return None


def out_shape(ctx: RuleContext, index: int | None = None) -> tuple[int, ...]:
    value = ctx.node.meta["val"]
    if index is not None:
        value = value[index]
    return shape_of(value)  # type: ignore[return-value]


def product(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


def rule_unknown(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """No rule: freeze everything the operation touches, and record it."""
    name = str(ctx.node.target)
    ctx.unknown[name] = ctx.unknown.get(name, 0) + 1
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, list) and a:
            if isinstance(a[0], np.ndarray):
                freeze_dims(ctx.table, a)
            else:
                for item in a:
                    if isinstance(item, list) and item and isinstance(item[0], np.ndarray):
                        freeze_dims(ctx.table, item)
    return _map_outputs(ctx, frozen_dims)
