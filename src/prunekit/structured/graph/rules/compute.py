"""Rules of operations that compute: pointwise, contractions, convolutions, normalisations, reductions,
pooling, attention.

A rule receives the atoms of its tensor arguments (one numpy array per dimension, see
:mod:`prunekit.structured.graph.atoms`), unifies what the operation forces to shrink together, and returns the
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

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prunekit.structured.graph.atoms import FROZEN, AtomTable
from prunekit.structured.graph.rules.registry import Dims, RuleContext, rule
from prunekit.structured.graph.rules.shapes import (
    _map_outputs,
    _tensor_args,
    broadcast,
    freeze_dims,
    frozen_dims,
    normalize_dim,
    out_shape,
    shape_of,
)

aten = torch.ops.aten


@rule(
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "relu6",
    "silu",
    "gelu",
    "mish",
    "elu",
    "selu",
    "celu",
    "leaky_relu",
    "softplus",
    "threshold",
)
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


@rule("_prelu_kernel", "prelu")
def rule_prelu(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``prelu(x, weight)``: one slope per channel (dim 1), or one for all."""
    x, weight = args[0], args[1]
    if weight[0].size > 1 and len(x) > 1:
        ctx.table.union_arrays(x[1], weight[0])
    return x


def _matmul(table: AtomTable, a: Dims, b: Dims, shape: Sequence[int]) -> Dims:
    """``a @ b`` with batch broadcasting (both at least 2-D)."""
    table.union_arrays(a[-1], b[-2])
    batch = broadcast(table, [a[:-2], b[:-2]], shape[:-2])
    return [*batch, a[-2], b[-1]]


@rule("mm", "bmm")
def rule_mm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return _matmul(ctx.table, args[0], args[1], out_shape(ctx))


@rule("addmm", "baddbmm")
def rule_addmm(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    product = _matmul(ctx.table, args[1], args[2], out_shape(ctx))
    return broadcast(ctx.table, [product, args[0]], out_shape(ctx))


@rule("matmul")
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


@rule("linear")
def rule_linear(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    ctx.table.union_arrays(x[-1], weight[1])
    if bias is not None:
        ctx.table.union_arrays(weight[0], bias[0])
    shape = out_shape(ctx)
    return [*broadcast(ctx.table, [x[:-1]], shape[:-1]), weight[0]]


@rule("convolution", "_convolution")
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


@rule(
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_batch_norm",
    "_native_batch_norm_legit_functional",
    "batch_norm",
)
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


@rule("native_layer_norm", "_fused_rms_norm")
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


@rule("native_group_norm")
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


@rule("embedding")
def rule_embedding(ctx: RuleContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
    weight, indices = args[0], args[1]
    ctx.table.freeze_array(weight[0])  # rows are addressed by the indices
    freeze_dims(ctx.table, indices)
    shape = out_shape(ctx)
    return [*frozen_dims(shape[:-1]), weight[1]]


@rule(
    "sum",
    "mean",
    "amax",
    "amin",
    "var",
    "std",
    "var_mean",
    "std_mean",
    "linalg_vector_norm",
    "max",
    "min",
    "logsumexp",
    "prod",
    "any",
    "all",
    "argmax",
    "argmin",
)
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


@rule(
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "upsample_linear1d",
    "upsample_trilinear3d",
    "_upsample_nearest_exact2d",
    "_upsample_bilinear2d_aa",
    "_upsample_bicubic2d_aa",
)
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


@rule(
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_cudnn_attention",
)
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
