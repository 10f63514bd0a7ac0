"""iCBS: the mask of a layer refined by block coordinate descent on its reconstruction error (Rosenberg,
Brubaker, Schuetz, Zhu, Kadıoğlu, Borujeni and Katzgraber 2024, "Scalable iterative pruning of large language
and vision models using block coordinate descent", arXiv:2411.17796, Alg. 1).

With the weights held (no update, as in the paper), pruning the entries of a row ``w`` that a keep-mask ``m``
drops leaves the residual ``r = w * (1 - m)``, and the row's error on the calibration inputs is the quadratic
form (the paper's Eq. 3 with the layer's Hessian ``H = X^T X``)::

    f(m) = r^T H r = || r X^T ||^2

The paper starts from a cheap mask (Wanda's), then repeatedly picks a small block of the mask's entries, the
ones closest to changing sides, and solves the block's binary problem with the rest of the mask fixed and the
block's number of kept entries unchanged, so the pattern is kept exactly. Here the block of each row is the
``block`` kept entries whose pruning costs least and the ``block`` pruned entries whose return gains most,
both from the exact single-flip changes (with ``g = H r``)::

    pruning kept i:     c_i = 2 w_i g_i + w_i^2 H_ii
    restoring pruned j: b_j = 2 w_j g_j - w_j^2 H_jj       (the decrease of f)

and a step of the block problem is the best exchange inside it, prune ``i`` and restore ``j`` (which keeps the
count; under N:M exchanges stay within a group of ``M``, every group's best is taken in the same step where
together, cross terms counted, they lower ``f``, and the row's single best otherwise)::

    f(m') - f(m) = c_i - b_j - 2 w_i w_j H_ij

applied where it lowers ``f``. This exchange search stands in for the paper's simulated annealing on the
block: it never raises ``f``, needs no temperature schedule, and runs on every row of the layer at once.
``steps`` (exchanges per row at most) is the quality/time knob; with ``steps=0`` the mask is the one given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.core.patterns import NM, Pattern

#: ``g = H r`` is recomputed from scratch this often (in steps), so that float32 drift never accumulates.
REFRESH_EVERY = 32


@dataclass(frozen=True)
class IcbsResult:
    """The refined keep-mask, each row's error before and after, and the exchanges made in all."""

    keep: torch.Tensor
    error_before: torch.Tensor
    error_after: torch.Tensor
    swaps: int


def row_errors(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``f(m) = r^T H r`` of every row, ``r = w * (1 - m)``: the squared error that pruning leaves on the
    calibration inputs whose Gram matrix is ``hessian`` (weights not updated)."""
    residual = weight.to(hessian.dtype) * (~keep)
    return ((residual @ hessian) * residual).sum(dim=1)


def _pair_changes(
    w: torch.Tensor, g: torch.Tensor, diag: torch.Tensor, hessian: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """``f(m') - f(m)`` for pruning kept ``i`` and restoring pruned ``j``, for index tensors ``i`` ``(rows, a,
    1)`` and ``j`` ``(rows, 1, b)`` (or any broadcastable pair) of each row."""
    wi, wj = w.gather(1, i.flatten(1)).view_as(i), w.gather(1, j.flatten(1)).view_as(j)
    gi, gj = g.gather(1, i.flatten(1)).view_as(i), g.gather(1, j.flatten(1)).view_as(j)
    cost = 2 * wi * gi + wi * wi * diag[i]
    gain = 2 * wj * gj - wj * wj * diag[j]
    return cost - gain - 2 * wi * wj * hessian[i, j]


def _candidates_unstructured(
    w: torch.Tensor, g: torch.Tensor, diag: torch.Tensor, keep: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``block`` kept entries cheapest to prune and ``block`` pruned entries best to restore (a row
    with fewer of either fills its list with entries of the other side, whose exchanges cost ``+inf``)."""
    cost = torch.where(keep, 2 * w * g + w * w * diag, torch.inf)
    gain = torch.where(keep, -torch.inf, 2 * w * g - w * w * diag)
    size = min(block, w.shape[1])
    return cost.topk(size, dim=1, largest=False).indices, gain.topk(size, dim=1).indices


def _candidates_nm(keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's ``n`` kept and ``m - n`` pruned positions, as ``(rows, groups, n)`` and ``(rows, groups,
    m - n)`` indices into the row (the exchange stays inside its group)."""
    rows, cols = keep.shape
    groups = keep.view(rows, cols // m, m)
    order = groups.to(torch.int8).argsort(dim=2, descending=True, stable=True)
    base = torch.arange(0, cols, m, device=keep.device).view(1, -1, 1)
    return order[..., :n] + base, order[..., n:] + base


def _nm_step(
    w: torch.Tensor,
    g: torch.Tensor,
    diag: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    nm: NM,
    tolerance: torch.Tensor,
) -> int:
    """One step under ``N:M``: each group's best exchange; a row takes all of its groups' improving exchanges
    at once where together (their cross terms counted) they lower its error, else only its single best one.
    Updates ``keep`` in place; returns the number of exchanges made."""
    kept_at, pruned_at = _candidates_nm(keep, nm.n, nm.m)
    change = _pair_changes(w, g, diag, hessian, kept_at[..., :, None], pruned_at[..., None, :])
    best, flat = change.flatten(2).min(dim=2)  # (rows, groups)
    i = kept_at.gather(2, (flat // (nm.m - nm.n))[..., None]).squeeze(2)
    j = pruned_at.gather(2, (flat % (nm.m - nm.n))[..., None]).squeeze(2)
    chosen = best < -tolerance[:, None]
    if not bool(chosen.any()):
        return 0
    # the residual's change if every chosen exchange is made: r' = r + w_i e_i - w_j e_j for each
    delta = torch.zeros_like(w)
    delta.scatter_(1, i, torch.where(chosen, w.gather(1, i), 0.0))
    delta.scatter_(1, j, torch.where(chosen, -w.gather(1, j), 0.0))
    together = 2 * (g * delta).sum(dim=1) + ((delta @ hessian) * delta).sum(dim=1)
    single = torch.zeros_like(chosen)
    single[torch.arange(w.shape[0], device=w.device), best.argmin(dim=1)] = True
    apply = torch.where((together < -tolerance)[:, None], chosen, single & chosen)
    r, group = apply.nonzero(as_tuple=True)
    keep[r, i[r, group]] = False
    keep[r, j[r, group]] = True
    return int(apply.sum())


def icbs_refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    steps: int = 100,
    block: int = 16,
) -> IcbsResult:
    """Refine the keep-mask ``keep`` of the ``(out, in)`` ``weight`` by at most ``steps`` exchanges per row,
    each the best of its block that lowers the row's error ``f`` (module docstring); ``hessian`` is ``X^T X``
    ``(in, in)``. Every row keeps its count of kept entries (and, under ``N:M``, every group its ``N``), so
    any pattern ``keep`` fits, it still fits. The weights themselves are not changed: a refit on the final
    support is the caller's (the pipeline's ``refit_steps``)."""
    if keep.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} differs from the weight's {tuple(weight.shape)}")
    if steps < 0 or block < 1:
        raise ValueError(f"steps must be >= 0 and block >= 1, got steps={steps}, block={block}")
    hessian = hessian.float()
    w = weight.detach().to(hessian)
    keep = keep.clone()
    before = row_errors(w, keep, hessian)
    diag = hessian.diagonal()
    rows = torch.arange(w.shape[0], device=w.device)
    nm = pattern if isinstance(pattern, NM) else None
    # an exchange must lower f by more than rounding could fake (relative to the row's error and scale)
    tolerance = 1e-6 * (before + (w * w * diag).sum(dim=1))
    swaps = 0
    g = (w * ~keep) @ hessian
    for step in range(steps):
        if nm is not None:
            moved = _nm_step(w, g, diag, hessian, keep, nm, tolerance)
            if not moved:
                break
            g = (w * ~keep) @ hessian
            swaps += moved
            continue
        if step and step % REFRESH_EVERY == 0:
            g = (w * ~keep) @ hessian
        kept_at, pruned_at = _candidates_unstructured(w, g, diag, keep, block)
        change = _pair_changes(w, g, diag, hessian, kept_at[:, :, None], pruned_at[:, None, :])
        # an entry on the wrong side of its list (a row short of kept or of pruned entries) never moves
        wrong = ~keep.gather(1, kept_at)[:, :, None] | keep.gather(1, pruned_at)[:, None, :]
        best, flat = change.masked_fill(wrong, torch.inf).flatten(1).min(dim=1)
        i = kept_at.gather(1, (flat // pruned_at.shape[1])[:, None]).squeeze(1)
        j = pruned_at.gather(1, (flat % pruned_at.shape[1])[:, None]).squeeze(1)
        take = best < -tolerance
        if not bool(take.any()):
            break
        r, ti, tj = rows[take], i[take], j[take]
        keep[r, ti] = False
        keep[r, tj] = True
        g[take] += w[r, ti, None] * hessian[ti] - w[r, tj, None] * hessian[tj]
        swaps += int(take.sum())
    return IcbsResult(keep, before, row_errors(w, keep, hessian), swaps)
