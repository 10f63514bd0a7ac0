"""Which tensor indices each traced operation couples: one rule per ATen operation (or family of them).

A rule receives the atoms of its tensor arguments (one numpy array per dimension, see
:mod:`prunekit.structured.atoms`), unifies what the operation forces to shrink together, and returns the
atoms of its outputs. The rules are derived from the shape semantics of each operation:

- pointwise operations (every op tagged ``torch.Tag.pointwise``) unify their operands' dimensions after
  broadcasting; a size-1 dimension couples nothing;
- contractions (``mm``, ``bmm``, ``addmm``, ``linear``, convolutions) unify the contracted dimension of
  both operands, and the output channel dimension comes from the weight;
- ``view``/``reshape`` split and merge dimensions: merged indices become compound atoms, split ones
  aliases of their factors, so a head of ``D`` channels is removed as a whole;
- ``cat`` concatenates the atoms of its inputs (DenseNet), ``split``/``chunk`` into equal parts unifies
  the parts index by index (so they stay equal: ShuffleNet, fused q/k/v);
- normalisations unify their affine parameters and running statistics with the channel they scale;
- anything that indexes with literal positions (select, uneven slices, gather, roll on a channel
  dimension...) freezes the dimension, and an operation without a rule freezes every dimension it
  touches: unknown code is never broken, it is only left unpruned (and reported).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from prunekit.structured.atoms import FROZEN, AtomTable

aten = torch.ops.aten

Dims = list[np.ndarray]


@dataclass
class RuleContext:
    """What a rule can read and where it records what surgery needs beyond parameter shapes."""

    table: AtomTable
    node: torch.fx.Node
    #: ``id(group atoms array)`` per grouped convolution / group norm node: the atoms of their groups.
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    #: Operations that froze dimensions because no rule knows them (name -> count).
    unknown: dict[str, int] = field(default_factory=dict)
    #: Dimensions that an addition joined from two tensors of different origin (residual connections).
    summed: list[np.ndarray] = field(default_factory=list)


Rule = Callable[[RuleContext, list[Any], dict[str, Any]], Any]


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The concrete shape of a traced value (a tensor's ``meta['val']``), ``None`` for non-tensors."""
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


# -- helpers -----------------------------------------------------------------------------------------------


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


# -- rules -------------------------------------------------------------------------------------------------


def _tensor_args(args: Sequence[Any]) -> list[Dims]:
    return [a for a in args if isinstance(a, list) and all(isinstance(x, np.ndarray) for x in a) and a]


def rule_pointwise(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    operands = _tensor_args(list(args) + list(kwargs.values()))
    is_sum = getattr(ctx.node.target, "overloadpacket", None) in (aten.add, aten.sub)
    joined = _joined_positions(ctx.table, operands) if is_sum else []
    out = _map_outputs(ctx, lambda shape: broadcast(ctx.table, operands, shape))
    if joined and isinstance(out, list) and out and isinstance(out[0], np.ndarray):
        ctx.summed.extend(out[len(out) - offset] for offset in joined)
    return out


def _joined_positions(table: AtomTable, operands: Sequence[Dims]) -> list[int]:
    """Dimensions (counted from the right) that an addition fills from two operands of different origin:
    a residual connection joins two tensors, a rotary embedding ``q * cos + rotate(q) * sin`` only one."""
    joined = []
    for offset in range(1, max((len(d) for d in operands), default=0) + 1):
        full = [d[len(d) - offset] for d in operands if len(d) >= offset and d[len(d) - offset].size > 1]
        if len(full) < 2 or any(a.size != full[0].size for a in full):
            continue
        roots = [[table.find(int(x)) for x in a.tolist()] for a in full]
        if any(r != roots[0] for r in roots[1:]) and not all(x == FROZEN for x in roots[0]):
            joined.append(offset)
    return joined


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


def rule_restride(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``as_strided`` that only changes strides (memory format after a pooling): same dimensions."""
    if tuple(a.size for a in args[0]) == out_shape(ctx):
        return args[0]
    return rule_unknown(ctx, args, kwargs)


def rule_prelu(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``prelu(x, weight)``: one slope per channel (dim 1), or one for all."""
    x, weight = args[0], args[1]
    if weight[0].size > 1 and len(x) > 1:
        ctx.table.union_arrays(x[1], weight[0])
    return x


def rule_reshape(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return reshape_dims(ctx.table, args[0], out_shape(ctx))


def rule_permute(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = args[0]
    order = [normalize_dim(d, len(dims)) for d in args[1]]
    return [dims[d] for d in order]


def rule_transpose(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    if len(dims) < 2:
        return dims
    a, b = (normalize_dim(args[1], len(dims)), normalize_dim(args[2], len(dims))) if len(args) > 2 else (0, 1)
    dims[a], dims[b] = dims[b], dims[a]
    return dims


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


def rule_select(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    d = normalize_dim(args[1], len(dims))
    ctx.table.freeze_array(dims[d])  # a literal position
    return dims[:d] + dims[d + 1 :]


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


def rule_unbind(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = args[0]
    d = normalize_dim(args[1] if len(args) > 1 else 0, len(dims))
    ctx.table.freeze_array(dims[d])
    rest = dims[:d] + dims[d + 1 :]
    return [list(rest) for _ in range(dims[d].size)]


def rule_cat(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    tensors = [t for t in args[0] if t is not None and not (len(t) == 1 and t[0].size == 0)]
    d = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    shape = out_shape(ctx)
    d = normalize_dim(d, len(shape))
    others = [[x for k, x in enumerate(t) if k != d] for t in tensors]
    rest = broadcast(ctx.table, others, [s for k, s in enumerate(shape) if k != d])
    joined = np.concatenate([t[d] for t in tensors])
    return [*rest[:d], joined, *rest[d:]]


def rule_stack(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    tensors = args[0]
    shape = out_shape(ctx)
    d = normalize_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(shape))
    rest = broadcast(ctx.table, tensors, [s for k, s in enumerate(shape) if k != d])
    return [*rest[:d], AtomTable.frozen(shape[d]), *rest[d:]]


def _matmul(table: AtomTable, a: Dims, b: Dims, shape: Sequence[int]) -> Dims:
    """``a @ b`` with batch broadcasting (both at least 2-D)."""
    table.union_arrays(a[-1], b[-2])
    batch = broadcast(table, [a[:-2], b[:-2]], shape[:-2])
    return [*batch, a[-2], b[-1]]


def rule_mm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return _matmul(ctx.table, args[0], args[1], out_shape(ctx))


def rule_addmm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    product = _matmul(ctx.table, args[1], args[2], out_shape(ctx))
    return broadcast(ctx.table, [product, args[0]], out_shape(ctx))


def rule_matmul(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    a, b = args[0], args[1]
    shape = out_shape(ctx)
    if len(a) == 1 and len(b) == 1:
        ctx.table.union_arrays(a[0], b[0])
        return []
    if len(a) == 1:
        ctx.table.union_arrays(a[0], b[-2])
        return [*broadcast(ctx.table, [b[:-2]], shape[:-1]), b[-1]]
    if len(b) == 1:
        ctx.table.union_arrays(a[-1], b[0])
        return a[:-1]
    return _matmul(ctx.table, a, b, shape)


def rule_linear(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    ctx.table.union_arrays(x[-1], weight[1])
    if bias is not None:
        ctx.table.union_arrays(weight[0], bias[0])
    shape = out_shape(ctx)
    return [*broadcast(ctx.table, [x[:-1]], shape[:-1]), weight[0]]


def rule_convolution(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)``.

    With ``groups`` > 1 every channel is the pair (group, position in group): removing a group removes its
    input channels, its output channels and its weights (depthwise convs lose whole channels); removing a
    position removes it in every group, so all groups stay the same width."""
    table = ctx.table
    x, weight, bias = args[0], args[1], args[2]
    transposed = bool(args[6]) if len(args) > 6 else False
    groups = int(args[8]) if len(args) > 8 else 1
    for kernel in weight[2:]:
        table.freeze_array(kernel)
    if transposed:  # weight (in, out / groups, *k)
        in_w, out_w = weight[0], weight[1]
    else:  # weight (out, in / groups, *k)
        in_w, out_w = weight[1], weight[0]
    shape = out_shape(ctx)
    channels_in = x[1]
    if groups == 1:
        table.union_arrays(channels_in, in_w)
        out_channels = out_w
    else:
        group_atoms = table.new(groups)
        per_in = channels_in.size // groups
        if transposed:  # weight dim 0 is the full input width; dim 1 the per-group output width
            per_out = out_w.size
            for i, atom in enumerate(channels_in.tolist()):
                table.union(atom, int(in_w[i]))
            positions_in = table.new(per_in)
            for i, atom in enumerate(channels_in.tolist()):
                table.set_alias(atom, [int(group_atoms[i // per_in]), int(positions_in[i % per_in])])
            out_channels = table.new(shape[1])
            for j, atom in enumerate(out_channels.tolist()):
                table.set_alias(atom, [int(group_atoms[j // per_out]), int(out_w[j % per_out])])
        else:
            per_out = out_w.size // groups
            for i, atom in enumerate(channels_in.tolist()):
                table.set_alias(atom, [int(group_atoms[i // per_in]), int(in_w[i % per_in])])
            positions_out = table.new(per_out)
            for j, atom in enumerate(out_w.tolist()):
                table.set_alias(atom, [int(group_atoms[j // per_out]), int(positions_out[j % per_out])])
            out_channels = out_w
        ctx.groups[ctx.node.name] = group_atoms
    if bias is not None:
        table.union_arrays(out_channels, bias[0])
    batch = broadcast(table, [x[:1]], shape[:1])
    return [*batch, out_channels, *frozen_dims(shape[2:])]


def _unify_channel(table: AtomTable, channel: np.ndarray, params: Sequence[Any]) -> None:
    for p in params:
        if isinstance(p, list) and p and isinstance(p[0], np.ndarray):
            table.union_arrays(channel, p[0])


def rule_batch_norm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``batch_norm`` family: input, weight, bias, running_mean, running_var share the channel (dim 1)."""
    x = args[0]
    _unify_channel(ctx.table, x[1], args[1:5])

    def make(shape: tuple[int, ...]) -> Dims:
        if len(shape) == len(x):
            return x
        if len(shape) == 1 and shape[0] == x[1].size:
            return [x[1]]
        return frozen_dims(shape)

    return _map_outputs(ctx, make)


def rule_layer_norm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``native_layer_norm(input, normalized_shape, weight, bias, eps)`` and ``_fused_rms_norm(input,
    normalized_shape, weight, eps)``: the affine parameters share the normalised trailing dimensions."""
    x = args[0]
    k = len(args[1])
    for p in args[2:4]:
        if isinstance(p, list) and p and isinstance(p[0], np.ndarray):
            for a, b in zip(x[-k:], p, strict=False):
                ctx.table.union_arrays(a, b)

    def make(shape: tuple[int, ...]) -> Dims:
        if len(shape) == len(x) and all(a.size == s for a, s in zip(x, shape, strict=False)):
            return x
        return [*x[: len(x) - k], *frozen_dims(shape[len(x) - k :])] if len(shape) == len(x) else frozen_dims(shape)

    return _map_outputs(ctx, make)


def rule_group_norm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``native_group_norm(input, weight, bias, N, C, HxW, group, eps)``: channel = (group, position)."""
    table = ctx.table
    x = args[0]
    groups = int(args[6])
    channels = x[1]
    _unify_channel(table, channels, args[1:3])
    per_group = channels.size // groups
    group_atoms, positions = table.new(groups), table.new(per_group)
    for i, atom in enumerate(channels.tolist()):
        table.set_alias(atom, [int(group_atoms[i // per_group]), int(positions[i % per_group])])
    ctx.groups[ctx.node.name] = group_atoms
    return [x, frozen_dims(out_shape(ctx, 1)), frozen_dims(out_shape(ctx, 2))]


def rule_embedding(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    weight, indices = args[0], args[1]
    ctx.table.freeze_array(weight[0])  # rows are addressed by the indices
    freeze_dims(ctx.table, indices)
    shape = out_shape(ctx)
    return [*frozen_dims(shape[:-1]), weight[1]]


def rule_same(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Output has the dimensions of the first argument (softmax, cumsum...)."""
    return _map_outputs(ctx, lambda shape: args[0] if len(shape) == len(args[0]) else frozen_dims(shape))


def rule_freeze_dim_same(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Same dimensions, but the operation moves indices along ``dims`` (roll, flip, sort...): freeze those."""
    dims = args[0]
    targets = args[2] if ctx.node.target in (aten.roll.default,) and len(args) > 2 else args[1] if len(args) > 1 else []
    if isinstance(targets, int):
        targets = [targets]
    for d in targets or range(len(dims)):
        ctx.table.freeze_array(dims[normalize_dim(d, len(dims))])
    return _map_outputs(ctx, lambda shape: dims if len(shape) == len(dims) else frozen_dims(shape))


def rule_reduce(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``sum``/``mean``/``amax``/``var``/``norm`` over ``dim`` (keepdim or not)."""
    dims = args[0]
    reduce_arg = args[1] if len(args) > 1 else kwargs.get("dim")
    if ctx.node.target in (aten.linalg_vector_norm.default,):
        reduce_arg = args[2] if len(args) > 2 else kwargs.get("dim")
    if reduce_arg is None or (isinstance(reduce_arg, (list, tuple)) and len(reduce_arg) == 0):
        reduced = set(range(len(dims)))
    else:
        items = [reduce_arg] if isinstance(reduce_arg, int) else list(reduce_arg)
        reduced = {normalize_dim(d, len(dims)) for d in items}

    def make(shape: tuple[int, ...]) -> Dims:
        if len(shape) == len(dims):  # keepdim
            return [AtomTable.frozen(1) if k in reduced else a for k, a in enumerate(dims)]
        kept = [a for k, a in enumerate(dims) if k not in reduced]
        return kept if len(kept) == len(shape) else frozen_dims(shape)

    return _map_outputs(ctx, make)


def rule_spatial(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Pooling and resampling: batch and channel dimensions pass through, the spatial ones are new."""
    dims = args[0]

    def make(shape: tuple[int, ...]) -> Dims:
        spatial = _spatial_count(ctx)
        lead = len(shape) - spatial
        return [*dims[:lead], *frozen_dims(shape[lead:])]

    return _map_outputs(ctx, make)


def _spatial_count(ctx: RuleContext) -> int:
    name = str(ctx.node.target)
    for n in (1, 2, 3):
        if f"{n}d" in name:
            return n
    return 2


def rule_attention(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Scaled dot-product attention ``(..., heads, L, E)``: query and key share ``E``; heads are shared,
    and under grouped-query attention query head ``h`` belongs to key/value head ``h // (Hq / Hkv)``; a
    single key/value head (multi-query attention) ties no query head."""
    table = ctx.table
    q, k, v = args[0], args[1], args[2]
    table.union_arrays(q[-1], k[-1])
    table.union_arrays(k[-2], v[-2])
    heads_q, heads_kv = q[-3], k[-3]
    table.union_arrays(heads_kv, v[-3])
    if heads_q.size == heads_kv.size:
        table.union_arrays(heads_q, heads_kv)
    elif heads_kv.size == 1:
        pass  # multi-query attention (``enable_gqa``): one key/value head serves every query head
    elif heads_kv.size and heads_q.size % heads_kv.size == 0:
        rep = heads_q.size // heads_kv.size
        table.union_arrays(heads_q, np.repeat(heads_kv, rep))
    else:
        table.freeze_array(heads_q)
        table.freeze_array(heads_kv)
    for extra in list(args[3:]) + list(kwargs.values()):
        if isinstance(extra, list) and extra and isinstance(extra[0], np.ndarray):
            freeze_dims(table, extra)  # masks, biases over (L, S): nothing prunable
    main = broadcast(
        table, [q[:-3], k[:-3]], out_shape(ctx, 0 if isinstance(ctx.node.meta["val"], (tuple, list)) else None)[:-3]
    )
    result = [*main, heads_q, q[-2], v[-1]]
    value = ctx.node.meta["val"]
    if isinstance(value, (tuple, list)):
        return [result] + [frozen_dims(shape_of(x)) if isinstance(x, torch.Tensor) else None for x in value[1:]]  # type: ignore[arg-type]
    return result


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


def rule_index_select(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x, d, index = args[0], normalize_dim(args[1], len(args[0])), args[2]
    ctx.table.freeze_array(x[d])
    freeze_dims(ctx.table, index)
    return [*x[:d], AtomTable.frozen(out_shape(ctx)[d]), *x[d + 1 :]]


def rule_pad(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims = list(args[0])
    pad = list(args[1])
    for k in range(len(pad) // 2):
        d = len(dims) - 1 - k
        if pad[2 * k] or pad[2 * k + 1]:
            ctx.table.freeze_array(dims[d])
            dims[d] = AtomTable.frozen(out_shape(ctx)[d])
    return dims


def rule_repeat(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    dims, repeats = args[0], list(args[1])
    lead = len(repeats) - len(dims)
    out: Dims = [AtomTable.frozen(r) for r in repeats[:lead]]
    for atoms, r in zip(dims, repeats[lead:], strict=False):
        out.append(np.tile(atoms, r))
    return out


def rule_copy(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``copy(dst, src)`` (functionalised ``dst.copy_(src)``)."""
    return broadcast(ctx.table, [args[0], args[1]], out_shape(ctx))


def rule_factory(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Tensors made from literal sizes: nothing in them may shrink."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, list) and a and isinstance(a[0], np.ndarray):
            freeze_dims(ctx.table, a)
    return _map_outputs(ctx, frozen_dims)


def rule_like(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``zeros_like(x)`` and friends: the shape follows ``x``."""
    return _map_outputs(ctx, lambda shape: args[0])


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


#: ATen operation packets handled by each rule, space-separated (names this torch lacks are skipped).
RULE_NAMES: dict[str, str] = {
    "reshape": (
        "view _unsafe_view reshape _reshape_alias unsqueeze squeeze flatten unflatten view_copy alias "
        "lift_fresh_copy detach clone contiguous"
    ),
    "permute": "permute",
    "transpose": "transpose t numpy_T",
    "expand": "expand",
    "select": "select",
    "slice": "slice",
    "split": "split split_with_sizes",
    "unbind": "unbind",
    "cat": "cat concat concatenate",
    "stack": "stack",
    "mm": "mm bmm",
    "addmm": "addmm baddbmm",
    "matmul": "matmul",
    "linear": "linear",
    "convolution": "convolution _convolution",
    "batch_norm": (
        "_native_batch_norm_legit_no_training _native_batch_norm_legit native_batch_norm "
        "_native_batch_norm_legit_functional batch_norm"
    ),
    "layer_norm": "native_layer_norm _fused_rms_norm",
    "group_norm": "native_group_norm",
    "embedding": "embedding",
    "same": "_softmax softmax _log_softmax log_softmax cumsum native_dropout dropout _to_copy to type_as",
    "freeze_dim_same": "roll flip sort",
    "reduce": (
        "sum mean amax amin var std var_mean std_mean linalg_vector_norm max min logsumexp prod any all argmax argmin"
    ),
    "spatial": (
        "max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices max_pool1d max_pool2d max_pool3d "
        "avg_pool1d avg_pool2d avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_avg_pool1d "
        "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d upsample_nearest2d "
        "upsample_nearest3d upsample_bilinear2d upsample_bicubic2d upsample_linear1d upsample_trilinear3d "
        "_upsample_nearest_exact2d _upsample_bilinear2d_aa _upsample_bicubic2d_aa"
    ),
    "attention": (
        "scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_flash_attention "
        "_scaled_dot_product_efficient_attention _scaled_dot_product_attention_math _scaled_dot_product_cudnn_attention"
    ),
    "index": "index _unsafe_index",
    "index_select": "index_select",
    "pad": "constant_pad_nd",
    "repeat": "repeat",
    "copy": "copy",
    "factory": (
        "arange zeros ones full empty empty_strided scalar_tensor rand randn randint new_zeros new_ones new_empty "
        "new_full new_empty_strided eye tril triu randperm tensor"
    ),
    "like": "zeros_like ones_like empty_like full_like rand_like randn_like bernoulli",
    # activations without torch's ``pointwise`` tag
    "pointwise": "hardswish hardsigmoid hardtanh relu6 silu gelu mish elu selu celu leaky_relu softplus threshold",
    "prelu": "_prelu_kernel prelu",
    "restride": "as_strided as_strided_ as_strided_copy",
}


def build_rule_table() -> dict[Any, Rule]:
    """Rules keyed by ATen overload packet (``aten.view``): any overload of the packet uses the rule."""
    table: dict[Any, Rule] = {}
    for rule_name, op_names in RULE_NAMES.items():
        rule = globals()[f"rule_{rule_name}"]
        for name in op_names.split():
            packet = getattr(aten, name, None)
            if packet is not None:
                table[packet] = rule
    return table


def rule_for(target: Any, table: dict[Any, Rule]) -> Rule:
    """The rule for an ATen overload: by packet, then any pointwise op, else :func:`rule_unknown`."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in table:
        return table[packet]
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return rule_pointwise
    return rule_unknown


def product(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


__all__ = ["FROZEN", "Rule", "RuleContext", "build_rule_table", "reshape_dims", "rule_for"]
