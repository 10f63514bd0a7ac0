"""Second-order structured removal: which groups of input columns of a layer to remove (attention heads: the
``head_dim`` columns of ``o_proj`` a head feeds; MLP channels: single columns of ``down_proj``) and how to
update the remaining weights so that the layer's output changes least.

The layer-wise problem is Optimal Brain Surgeon's (Hassibi & Stork 1993) restricted to whole column groups,
as ZipLM (Kurtić et al. 2023, Eq. 2-3) and SlimGPT (Ling et al. 2024) solve it: with ``H = X^T X`` the Gram
of the layer's inputs (damped: :func:`prunekit.reconstruction.least_squares.damped`) and ``H^-1`` its inverse,
removing the columns ``S`` costs

    cost(S) = trace( W[:, S] ([H^-1]_SS)^-1 W[:, S]^T )          (the increase of ||W X - W' X||^2)

and the optimal update of all other columns is

    W' = W - W[:, S] ([H^-1]_SS)^-1 [H^-1]_S,:                    (W'[:, S] = 0)

after which ``H^-1`` of the remaining problem is ``H^-1 - [H^-1]_:,S ([H^-1]_SS)^-1 [H^-1]_S,:``. Groups are
removed greedily one at a time (each choice sees the updates of the earlier ones), which is exact for a
single group and ZipLM's procedure for several. Pure functions of tensors; inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunekit.reconstruction.least_squares import damped


@dataclass
class StructuredRemoval:
    """The groups removed (in the order chosen), their costs when chosen, and the updated weight (the removed
    columns exactly zero)."""

    removed: list[int]
    costs: list[float]
    weight: torch.Tensor


def group_costs(weight: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``cost(S)`` of every group (rows of ``groups``: ``(G, k)`` column indices of equal size ``k``), for the
    weight ``(out, in)`` and inverse Gram ``hinv`` ``(in, in)``, in float64."""
    w = weight.double()
    blocks = hinv.double()[groups[:, :, None], groups[:, None, :]]  # (G, k, k): [H^-1]_SS of each group
    ws = w[:, groups].permute(1, 0, 2)  # (G, out, k)
    solved = torch.linalg.solve(blocks, ws.transpose(1, 2))  # (G, k, out): A^-1 W_S^T
    return (ws.transpose(1, 2) * solved).sum(dim=(1, 2))


def remove_groups(
    weight: torch.Tensor,
    gram: torch.Tensor,
    groups: Sequence[Sequence[int]],
    count: int,
    *,
    dampening: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> StructuredRemoval:
    """Remove ``count`` of the column ``groups`` of ``weight`` ``(out, in)`` greedily by second-order cost,
    updating the remaining columns (see the module docstring); ``gram`` is ``X^T X`` of the layer's inputs,
    damped by ``dampening`` x its mean diagonal before inverting. Groups must have equal sizes."""
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"column groups must have one size, got sizes {sorted(sizes)}")
    if not 0 <= count <= len(groups):
        raise ValueError(f"cannot remove {count} of {len(groups)} groups")
    index = torch.tensor([list(g) for g in groups], dtype=torch.long, device=weight.device)
    w = weight.to(dtype).clone()
    hinv = torch.linalg.inv(damped(gram.to(dtype), dampening))
    alive = torch.ones(len(groups), dtype=torch.bool, device=weight.device)
    removed: list[int] = []
    costs: list[float] = []
    for _ in range(count):
        candidates = alive.nonzero().flatten()
        cost = group_costs(w, hinv, index[candidates])
        best = int(torch.argmin(cost))
        g = int(candidates[best])
        cols = index[g]
        block_inv = torch.linalg.inv(hinv[cols][:, cols])  # ([H^-1]_SS)^-1
        w -= w[:, cols] @ block_inv @ hinv[cols, :]
        w[:, cols] = 0.0
        hinv = hinv - hinv[:, cols] @ block_inv @ hinv[cols, :]
        hinv[cols, :] = 0.0
        hinv[:, cols] = 0.0
        hinv[cols, cols] = 1.0  # a removed column no longer couples: keep the matrix invertible on its blocks
        alive[g] = False
        removed.append(g)
        costs.append(float(cost[best]))
    return StructuredRemoval(removed, costs, w.to(weight.dtype))
