"""ALPS: the layer's mask and weights chosen together by ADMM (Meng, Behdin, Wang and Mazumder, NeurIPS 2024,
"ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language Models", Alg. 1).

The problem is ``min_W ||W X - W_0 X||^2`` over the weights ``W`` that fit the pattern. With ``H = X^T X``
(damped) and the columns scaled to a unit diagonal (``D_j = sqrt(H_jj)``, ``W~ = W D``, ``H~ = D^-1 H D^-1``),
ADMM splits it into a smooth part in ``W`` and a sparse copy ``Z``, with the scaled dual ``V`` (Sec. 3.1,
Eq. 5-7, for a row-major ``(out, in)`` weight)::

    W <- (W~_0 H~ - V + rho Z) (H~ + rho I)^-1          (one eigendecomposition of H~ serves every rho)
    Z <- the pattern's projection of W + V / rho         (the largest entries kept: top-k or N:M)
    V <- V + rho (W - Z)

``rho`` grows as the support settles (Sec. 3.2): every ``update_every`` iterations the number of entries
whose membership in the support changed decides it (x1.3 while over 10% of the kept count move, x1.2 over
0.5%, x1.1 while any move, and the loop stops once none does); a ``rho`` so large that nothing moves before
any growth was too large, and is divided by 5. The last projection of ``W`` is the mask; the kept weights are
then refitted on the fixed support (the pipeline's conjugate-gradient refit, ALPS's PCG step, Sec. 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.core.patterns import Pattern, select_keep_mask


@dataclass(frozen=True)
class AlpsResult:
    """The keep-mask, the pruned weight (before the final refit), the ADMM iterations run and the last rho."""

    keep: torch.Tensor
    weight: torch.Tensor
    iterations: int
    rho: float


@dataclass(frozen=True)
class ScaledProblem:
    """``H~ = D^-1 H D^-1`` (damped) as its eigendecomposition, and the column scales ``D``: computed once per
    layer input (q, k and v share it)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    scale: torch.Tensor

    def gram(self) -> torch.Tensor:
        """``H~`` itself."""
        q = self.eigenvectors
        return (q * self.eigenvalues) @ q.T

    def solve(self, rhs: torch.Tensor, rho: float) -> torch.Tensor:
        """``rhs (H~ + rho I)^-1`` for a row-major right-hand side."""
        q = self.eigenvectors
        return ((rhs @ q) / (self.eigenvalues + rho)) @ q.T


def scaled_problem(hessian: torch.Tensor, dampening: float = 0.01) -> ScaledProblem:
    """Damp ``H`` by ``dampening * mean(diag H)``, scale it to a unit diagonal and eigendecompose it (in float64;
    kept in float32, the precision the ADMM iterations run in)."""
    h = hessian.double().clone()
    diagonal = torch.arange(h.shape[0], device=h.device)
    h[diagonal, diagonal] += dampening * float(h.diagonal().mean()) + 1e-12
    scale = h.diagonal().sqrt()
    h = h / scale / scale.unsqueeze(1)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    return ScaledProblem(eigenvalues.clamp_min(0.0).float(), eigenvectors.float(), scale.float())


def _project(values: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The pattern's keep-mask of the entries of largest magnitude."""
    return select_keep_mask(values.abs().float(), pattern)


def alps_prune(
    weight: torch.Tensor,
    problem: ScaledProblem,
    pattern: Pattern,
    *,
    rho: float = 0.1,
    max_iterations: int = 300,
    update_every: int = 3,
    min_iterations: int = 30,
) -> AlpsResult:
    """ALPS's ADMM (module docstring) on one ``(out, in)`` layer; ``weight`` is not modified. The result's
    weight is exactly zero off ``keep`` and fits ``pattern`` exactly."""
    w0 = weight.float() * problem.scale  # W~_0
    target = w0 @ problem.gram()  # W~_0 H~: the right-hand side's data term
    keep = _project(w0, pattern)
    z = w0 * keep
    v = torch.zeros_like(w0)
    w = w0
    kept = max(int(keep.sum()), 1)
    grown = False
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        w = problem.solve(target - v + rho * z, rho)
        candidate = w + v / rho
        new_keep = _project(candidate, pattern)
        z = candidate * new_keep
        v = v + rho * (w - z)
        if iterations % update_every:
            continue
        moved = int((new_keep != keep).sum())
        keep = new_keep
        if moved > 0.1 * kept:
            rho, grown = rho * 1.3, True
        elif moved > 0.005 * kept:
            rho, grown = rho * 1.2, True
        elif moved > 0:
            if grown:
                rho *= 1.1
            else:  # rho started too large to let the support move at all: restart smaller
                rho /= 5
                z, v = w0 * _project(w0, pattern), torch.zeros_like(w0)
        elif grown:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        if iterations >= min_iterations and moved < 3e-4 * kept:
            break
    keep = _project(w, pattern)
    pruned = (w * keep) / problem.scale
    return AlpsResult(keep, pruned.to(weight.dtype), iterations, rho)
