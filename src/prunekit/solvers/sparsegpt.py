"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1): choose a mask *and* update the kept weights to reconstruct the layer's output.

The layer-wise problem is ``min_{W'} ||W X - W' X||_2^2`` with ``W'`` sparse. With the Hessian
``H = X X^T`` (accumulated over the calibration tokens, :func:`accumulate_gram`), pruning weight
``w_q`` of a row and updating the not-yet-processed weights of that row by the Optimal Brain Surgeon
step (Eq. 3 of the paper; Hassibi & Stork 1993)

    delta = -(w_q / [H^-1]_qq) * H^-1_{:,q}

costs ``w_q^2 / [H^-1]_qq`` in squared error. SparseGPT visits the columns left to right and works with
the upper Cholesky factor of ``H^-1`` (Section 3.3), whose row ``q`` is exactly the update for column
``q`` once columns ``< q`` are done. Updates are applied lazily: inside a block of ``block_size``
columns column by column, to the rest of the matrix once per block. The mask is chosen adaptively at
the start of each block from ``w^2 / [H^-1]_cc^2`` (Section 3.4; for N:M, at the start of every group
of ``M`` columns), so it sees the updates of earlier blocks.

Everything here is a pure function of tensors: the engine accumulates ``H``, calls
:func:`sparsegpt_prune` once, and frees ``H``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.errors import NumericalError
from prunekit.patterns import NM, Pattern, count_to_prune, drop_lowest_k

#: Extra attempts at a Cholesky factorisation, each with ten times the dampening of the previous one.
DAMPENING_RETRIES = 3


@dataclass(frozen=True)
class SparseGPTResult:
    """The reconstructed weight, its keep-mask (``True`` = kept) and the OBS loss
    ``sum w_q^2 / [H^-1]_qq / 2`` of the removed weights (in the units of the given ``H``)."""

    weight: torch.Tensor
    keep: torch.Tensor
    loss: float
    dampening: float


def accumulate_gram(gram: torch.Tensor | None, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``gram + X^T X`` for a ``(..., in)`` input batch, computed in ``dtype`` (float32 or float64).

    The factor 2 of ``H = 2 X X^T`` and any normalisation by the token count are left out: the solution
    and the relative dampening do not depend on the scale of ``H``.
    """
    flat = inputs.detach().reshape(-1, inputs.shape[-1]).to(dtype)
    if gram is None:
        return flat.t() @ flat
    return gram.addmm_(flat.t(), flat)


def inverse_hessian_factor(
    hessian: torch.Tensor, dampening: float, layer_name: str = "layer"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = (H + lambda I)^-1``), with
    ``lambda = dampening * mean(diag H)``. Does not modify ``hessian``.

    If ``H`` is not positive definite after dampening, the dampening is raised tenfold up to
    :data:`DAMPENING_RETRIES` times; then :class:`~prunekit.errors.NumericalError` names the layer.
    Returns the factor and the dampening fraction that worked.
    """
    mean_diag = float(torch.diagonal(hessian).mean())
    fractions = [dampening] + [max(dampening, 1e-4) * 10**t for t in range(1, DAMPENING_RETRIES + 1)]
    for fraction in fractions:
        damped = hessian.clone()
        torch.diagonal(damped).add_(fraction * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped  # peak memory: three (in, in) matrices, never more
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, fraction
    raise NumericalError(
        f"the Hessian of layer {layer_name!r} is not positive definite even with dampening "
        f"{fractions[-1]:g} x mean diagonal: use more (or more varied) calibration samples, "
        "a float64 Hessian (--hessian-dtype float64), or a larger --dampening"
    )


def _block_prune_counts(pattern_sparsity: float, cols: int, block_size: int, rows: int, per_row: bool) -> list[int]:
    """Weights to remove in each column block so that the layer total is exactly
    ``floor(sparsity * n)`` per row (``per_row``) or per matrix: cumulative targets, rounded down."""
    counts = []
    done = 0
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        if per_row:
            total = math.floor(pattern_sparsity * end + 1e-9) if end < cols else count_to_prune(pattern_sparsity, cols)
        else:
            n = rows * end
            total = (
                math.floor(pattern_sparsity * n + 1e-9) if end < cols else count_to_prune(pattern_sparsity, rows * cols)
            )
        counts.append(total - done)
        done = total
    return counts


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    layer_name: str = "layer",
) -> SparseGPTResult:
    """Prune a ``(out, in)`` weight with SparseGPT given the ``(in, in)`` Hessian ``X X^T``.

    Unstructured patterns remove exactly ``floor(sparsity * n)`` weights, ``n`` being each row
    (``scope="row"``) or the whole matrix (``scope="layer"``, the paper's choice: within each column
    block, the weights with the lowest ``w^2 / [H^-1]_cc^2`` over all rows). N:M patterns keep the ``N``
    weights of lowest error in every group of ``M`` columns of each row, chosen when the group is reached.
    Inputs that never fire (zero diagonal in ``H``) are "dead": their weights are set to zero, which
    changes no output on the calibration data.

    Computation runs in the Hessian's dtype; the returned weight has ``weight``'s dtype and device.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of {layer_name!r} has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if isinstance(pattern, NM) and block_size % pattern.m:
        raise ValueError(f"block_size {block_size} must be a multiple of M={pattern.m} for pattern {pattern}")
    work = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
    h = hessian.to(device=weight.device, dtype=work)
    w = weight.detach().to(work).clone()

    dead = torch.diagonal(h) == 0
    if dead.any():
        h = h.clone() if h is hessian else h
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    hinv, used = inverse_hessian_factor(h, dampening, layer_name)
    del h

    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    loss = torch.zeros((), dtype=work, device=weight.device)
    unstructured_counts = None
    if not isinstance(pattern, NM):
        per_row = pattern.scope == "row"
        unstructured_counts = _block_prune_counts(pattern.sparsity, cols, block_size, rows, per_row)

    for number, start in enumerate(range(0, cols, block_size)):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag_block = torch.diagonal(hinv_block)
        errors = torch.zeros_like(w_block)
        keep_block = torch.ones_like(w_block, dtype=torch.bool)
        if unstructured_counts is not None:
            scores = w_block.pow(2) / diag_block.pow(2).unsqueeze(0)
            k = unstructured_counts[number]
            if pattern.scope == "row":  # type: ignore[union-attr]
                keep_block = drop_lowest_k(scores, k)
            else:
                keep_block = drop_lowest_k(scores.reshape(1, -1), k).reshape(scores.shape)
        pruned = (~keep_block).to(work)
        for i in range(end - start):
            if isinstance(pattern, NM) and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = w_block[:, group].pow(2) / diag_block[group].pow(2).unsqueeze(0)
                keep_block[:, group] = drop_lowest_k(scores, pattern.m - pattern.n)
                pruned[:, group] = (~keep_block[:, group]).to(work)
            error = w_block[:, i] * pruned[:, i] / hinv_block[i, i]  # OBS step of Eq. 3, row by row
            w_block[:, i:].addr_(error, hinv_block[i, i:], alpha=-1)
            errors[:, i] = error
        w_block.masked_fill_(~keep_block, 0)  # removed weights exactly 0 (the update leaves rounding residue)
        loss += errors.pow(2).sum() / 2
        w[:, start:end] = w_block
        keep[:, start:end] = keep_block
        if end < cols:
            w[:, end:] -= errors @ hinv[start:end, end:]

    return SparseGPTResult(w.to(weight.dtype), keep, float(loss), used)
