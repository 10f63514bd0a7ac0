"""Rules of operations that move, select or build tensors without computing across channels: views,
reshapes, permutations, slicing, concatenation, indexing, padding, factories."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prunekit.structured.graph.atoms import AtomTable
from prunekit.structured.graph.rules.registry import Dims, RuleContext, rule
from prunekit.structured.graph.rules.shapes import (
    _map_outputs,
    broadcast,
    freeze_dims,
    frozen_dims,
    normalize_dim,
    out_shape,
    reshape_dims,
    rule_unknown,
    shape_of,
)

aten = torch.ops.aten


@rule("as_strided", "as_strided_", "as_strided_copy")
def rule_restride(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``as_strided`` that only changes strides (memory format after a pooling): same dimensions."""
    if tuple(a.size for a in args[0]) == out_shape(ctx):
        return args[0]
    return rule_unknown(ctx, args, kwargs)


@rule(
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "view_copy",
    "alias",
    "lift_fresh_copy",
    "detach",
    "clone",
    "contiguous",
)
def rule_reshape(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return reshape_dims(ctx.table, args[0], out_shape(ctx))


@rule("permute")
def rule_permute(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = args[0]
    order = [normalize_dim(d, len(dims)) for d in args[1]]
    return [dims[d] for d in order]


@rule("transpose", "t", "numpy_T")
def rule_transpose(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    if len(dims) < 2:
        return dims
    a, b = (normalize_dim(args[1], len(dims)), normalize_dim(args[2], len(dims))) if len(args) > 2 else (0, 1)
    dims[a], dims[b] = dims[b], dims[a]
    return dims


@rule("expand")
def rule_expand(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``expand``: a size-1 dimension grown to ``n`` becomes ``n`` broadcast copies (fresh atoms, see
    :meth:`AtomTable.copies`); new leading dimensions are frozen; the others pass through."""
    dims, shape = args[0], out_shape(ctx)
    out = broadcast(ctx.table, [dims], shape)
    lead = len(shape) - len(dims)
    for position in range(lead, len(shape)):
        if dims[position - lead].size == 1 and shape[position] > 1:
            out[position] = ctx.table.copies(shape[position])
    return out


@rule("select")
def rule_select(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    d = normalize_dim(args[1], len(dims))
    ctx.table.freeze_array(dims[d])  # a literal position
    return dims[:d] + dims[d + 1 :]


@rule("slice")
def rule_slice(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    d = normalize_dim(args[1] if len(args) > 1 else 0, len(dims))
    size = dims[d].size
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else size
    step = args[4] if len(args) > 4 else 1
    start, end = max(0, normalize_dim(start, size)), min(size, normalize_dim(end, size) if end < 0 else end)
    if (start, end, step) == (0, size, 1):
        return dims
    ctx.table.freeze_array(dims[d])  # literal bounds: positions must stay where they are
    dims[d] = dims[d][start:end:step]
    return dims


@rule("split", "split_with_sizes")
def rule_split(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = args[0]
    d = normalize_dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), len(dims))
    shapes = [shape_of(v) for v in ctx.node.meta["val"]]
    sizes = [s[d] for s in shapes]  # type: ignore[index]
    atoms = dims[d]
    parts = np.split(atoms, np.cumsum(sizes)[:-1])
    if len(set(sizes)) == 1:
        for part in parts[1:]:
            ctx.table.union_arrays(parts[0], part)  # equal parts stay equal
    else:
        ctx.table.freeze_array(atoms)  # uneven literal sizes
    return [[*dims[:d], part, *dims[d + 1 :]] for part in parts]


@rule("unbind")
def rule_unbind(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = args[0]
    d = normalize_dim(args[1] if len(args) > 1 else 0, len(dims))
    ctx.table.freeze_array(dims[d])
    rest = dims[:d] + dims[d + 1 :]
    return [list(rest) for _ in range(dims[d].size)]


@rule("cat", "concat", "concatenate")
def rule_cat(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    tensors = [t for t in args[0] if t is not None and not (len(t) == 1 and t[0].size == 0)]
    d = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    shape = out_shape(ctx)
    d = normalize_dim(d, len(shape))
    others = [[x for k, x in enumerate(t) if k != d] for t in tensors]
    rest = broadcast(ctx.table, others, [s for k, s in enumerate(shape) if k != d])
    joined = np.concatenate([t[d] for t in tensors])
    return [*rest[:d], joined, *rest[d:]]


@rule("stack")
def rule_stack(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    tensors = args[0]
    shape = out_shape(ctx)
    d = normalize_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(shape))
    rest = broadcast(ctx.table, tensors, [s for k, s in enumerate(shape) if k != d])
    return [*rest[:d], AtomTable.frozen(shape[d]), *rest[d:]]


@rule("index", "_unsafe_index")
def rule_index(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Advanced indexing ``x[i0, i1, ...]``: indexed dimensions are frozen; the others pass through."""
    x, indices = args[0], args[1]
    shape = out_shape(ctx)
    for d, index in enumerate(indices):
        if index is not None:
            ctx.table.freeze_array(x[d])
            freeze_dims(ctx.table, index)
    kept = [x[d] for d in range(len(x)) if d >= len(indices) or indices[d] is None]
    if len(kept) <= len(shape) and all(a.size == s for a, s in zip(kept[::-1], shape[::-1], strict=False)):
        return frozen_dims(shape[: len(shape) - len(kept)]) + kept
    freeze_dims(ctx.table, kept)
    return frozen_dims(shape)


@rule("index_select")
def rule_index_select(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x, d, index = args[0], normalize_dim(args[1], len(args[0])), args[2]
    ctx.table.freeze_array(x[d])
    freeze_dims(ctx.table, index)
    return [*x[:d], AtomTable.frozen(out_shape(ctx)[d]), *x[d + 1 :]]


@rule("constant_pad_nd")
def rule_pad(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    pad = list(args[1])
    for k in range(len(pad) // 2):
        d = len(dims) - 1 - k
        if pad[2 * k] or pad[2 * k + 1]:
            ctx.table.freeze_array(dims[d])
            dims[d] = AtomTable.frozen(out_shape(ctx)[d])
    return dims


@rule("repeat")
def rule_repeat(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims, repeats = args[0], list(args[1])
    lead = len(repeats) - len(dims)
    out: Dims = [AtomTable.frozen(r) for r in repeats[:lead]]
    for atoms, r in zip(dims, repeats[lead:], strict=False):
        out.append(np.tile(atoms, r))
    return out


@rule("copy")
def rule_copy(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``copy(dst, src)`` (functionalised ``dst.copy_(src)``)."""
    return broadcast(ctx.table, [args[0], args[1]], out_shape(ctx))


@rule(
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "empty_strided",
    "scalar_tensor",
    "rand",
    "randn",
    "randint",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "new_empty_strided",
    "eye",
    "tril",
    "triu",
    "randperm",
    "tensor",
)
def rule_factory(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Tensors made from literal sizes: nothing in them may shrink."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, list) and a and isinstance(a[0], np.ndarray):
            freeze_dims(ctx.table, a)
    return _map_outputs(ctx, frozen_dims)


@rule("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "bernoulli")
def rule_like(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``zeros_like(x)`` and friends: the shape follows ``x``."""
    return _map_outputs(ctx, lambda shape: args[0])


@rule(
    "_softmax",
    "softmax",
    "_log_softmax",
    "log_softmax",
    "cumsum",
    "native_dropout",
    "dropout",
    "_to_copy",
    "to",
    "type_as",
)
def rule_same(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Output has the dimensions of the first argument (softmax, cumsum...)."""
    return _map_outputs(ctx, lambda shape: args[0] if len(shape) == len(args[0]) else frozen_dims(shape))


@rule("roll", "flip", "sort")
def rule_freeze_dim_same(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Same dimensions, but the operation moves indices along ``dims`` (roll, flip, sort...): freeze those."""
    dims = args[0]
    targets = args[2] if ctx.node.target in (aten.roll.default,) and len(args) > 2 else args[1] if len(args) > 1 else []
    if isinstance(targets, int):
        targets = [targets]
    for d in targets or range(len(dims)):
        ctx.table.freeze_array(dims[normalize_dim(d, len(dims))])
    return _map_outputs(ctx, lambda shape: dims if len(shape) == len(dims) else frozen_dims(shape))
