"""PQ Index (PQI) and Sparsity-informed Adaptive Pruning (SAP), as pure tensor functions.

Diao, Wang, Zhang, Yang, Ding & Tarokh 2023, "Pruning Deep Neural Networks from a Sparsity Perspective"
(ICLR 2023).

**PQ Index** (the paper's definition of PQI). For ``0 < p < q`` and a vector ``w`` of ``d`` weights,

    I_{p,q}(w) = 1 - d^{1/q - 1/p} * ||w||_p / ||w||_q

which equals ``1 - M_p(w) / M_q(w)`` with the power means ``M_r(w) = (mean_i |w_i|^r)^{1/r}``; it is computed
that way here, in float64, so that long vectors cannot overflow. Larger means sparser. Its range is
``0 <= I <= 1 - d^{1/q - 1/p}``:

* ``I = 0`` exactly for a vector whose entries all have the same magnitude (``M_p = M_q``; e.g.
  ``[c, ..., c]``: ``1 - d^{1/q-1/p} * d^{1/p} c / (d^{1/q} c) = 0``): the *least* sparse vector;
* ``I = 1 - d^{1/q - 1/p}`` exactly for a vector with one non-zero entry (``||w||_p = ||w||_q``): the
  *sparsest* vector.

PQI is computed **on the kept weights**: ``d`` counts the entries a mask keeps, pruned entries are left out
(a kept weight that happens to be 0 still counts). The all-zero vector is, by convention here, a vector of
equal magnitudes: ``I = 0``.

**SAP** (the paper's Algorithm 1). After each round of training, with ``d`` kept weights and their PQI:

    r = d * (1 + eta_r)^{-q/(q-p)} * [1 - I(w)]^{q p/(q-p)}        (the PQI lower bound on weights to keep)
    c = floor(d * min(gamma * (1 - r/d), beta))                     (weights to remove this round)

and the ``c`` kept weights of smallest magnitude are removed. ``r`` is rounded up before ``c`` is computed (as
the authors' code does). A larger ``eta_r`` tolerates more error, lowering the bound (more pruning);
``gamma`` scales the pruning ratio and ``beta`` caps it. SAP runs per output row (``"row"``, the paper's
neuron-wise pruning), per layer (``"layer"``) or over all chosen weights at once (``"global"``).

Defaults follow the authors' main runs (their code's ``si-0.5-1-0-1``): ``p = 0.5, q = 1`` (so
``q/(q-p) = 2`` and ``qp/(q-p) = 1``), ``eta_r = 0``, ``gamma = 1``, and ``beta = 0.9`` (their configuration).
They also run ``p = 1, q = 2`` and sweep ``eta_r`` (0.001 to 1) and ``gamma`` (up to 9).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import ConfigDict, field_validator, model_validator

from prunekit.core.config import StrictConfig
from prunekit.core.errors import ConfigError
from prunekit.core.patterns import drop_lowest_k

SapScope = Literal["row", "layer", "global"]

__all__ = [
    "ModelPQI",
    "SAPConfig",
    "SAPResult",
    "SapScope",
    "model_pq_index",
    "pq_index",
    "pq_index_range",
    "pq_index_rows",
    "sap_keep_bound",
    "sap_prune_count",
    "sap_step",
]


def _check_pq(p: float, q: float) -> None:
    if not (0 < p < q) or math.isinf(q):
        raise ConfigError(f"PQ Index needs 0 < p < q (finite), got p={p!r}, q={q!r}: the paper uses p=0.5, q=1")


def _keep_of(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if mask.shape != weight.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match weight of shape {tuple(weight.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = kept), got {mask.dtype}")
    return mask.to(weight.device)


def _pqi_from_sums(sum_p: torch.Tensor, sum_q: torch.Tensor, d: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """``1 - M_p / M_q`` from the sums of ``|w|^p`` and ``|w|^q`` over ``d`` kept entries (float64)."""
    m_p = (sum_p / d).pow(1.0 / p)
    m_q = (sum_q / d).pow(1.0 / q)
    ratio = torch.where(m_q > 0, m_p / torch.where(m_q > 0, m_q, 1.0), 1.0)  # all-zero: equal magnitudes
    return 1.0 - ratio


def _row_sums(
    weight: torch.Tensor, keep: torch.Tensor, p: float, q: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of 2-D ``weight``: sums of ``|w|^p`` and ``|w|^q`` over kept entries, and their count (float64)."""
    a = weight.detach().abs().double().masked_fill(~keep, 0.0)  # (rows, n), removed entries -> 0
    return a.pow(p).sum(dim=1), a.pow(q).sum(dim=1), torch.count_nonzero(keep, dim=1).double()


def pq_index(weight: torch.Tensor, mask: torch.Tensor | None = None, *, p: float = 0.5, q: float = 1.0) -> float:
    """PQ Index ``1 - d^{1/q-1/p} ||w||_p / ||w||_q`` of the kept entries of ``weight`` (Diao et al. 2023).

    ``mask`` (bool, ``True`` = kept, same shape) selects the entries; ``None`` keeps all. The result lies in
    ``[0, 1 - d^{1/q-1/p}]`` (see :func:`pq_index_range`); larger is sparser.
    """
    _check_pq(p, q)
    sum_p, sum_q, d = _row_sums(weight.reshape(1, -1), _keep_of(weight, mask).reshape(1, -1), p, q)
    if int(d[0]) == 0:
        raise ValueError("PQ Index of an empty set of weights is undefined: the mask keeps nothing")
    return float(_pqi_from_sums(sum_p, sum_q, d, p, q)[0])


def pq_index_rows(
    weight: torch.Tensor, mask: torch.Tensor | None = None, *, p: float = 0.5, q: float = 1.0
) -> torch.Tensor:
    """PQ Index of each output row (``weight`` viewed as ``(shape[0], -1)``) over its kept entries.

    Returns a float64 tensor of shape ``(shape[0],)`` (Diao et al. 2023, PQI definition, neuron-wise). A row whose
    mask keeps nothing is an error.
    """
    _check_pq(p, q)
    rows = weight.shape[0]
    sum_p, sum_q, d = _row_sums(weight.reshape(rows, -1), _keep_of(weight, mask).reshape(rows, -1), p, q)
    if bool((d == 0).any()):
        raise ValueError("PQ Index of a row whose mask keeps nothing is undefined")
    return _pqi_from_sums(sum_p, sum_q, d, p, q)


def pq_index_range(d: int, *, p: float = 0.5, q: float = 1.0) -> tuple[float, float]:
    """The extremes of PQI over ``d`` weights: ``(0, 1 - d^{1/q - 1/p})`` (Diao et al. 2023, PQI definition).

    ``0`` for equal magnitudes (least sparse), the upper end for a single non-zero entry (sparsest).
    """
    _check_pq(p, q)
    if d < 1:
        raise ValueError(f"d must be at least 1, got {d}")
    return 0.0, 1.0 - d ** (1.0 / q - 1.0 / p)


@dataclass(frozen=True)
class ModelPQI:
    """PQ Index of each chosen weight (its kept entries) and of the model (all kept entries concatenated)."""

    layers: dict[str, float]
    model: float


def model_pq_index(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    p: float = 0.5,
    q: float = 1.0,
) -> ModelPQI:
    """Per-layer and whole-model PQ Index (Diao et al. 2023; the paper's layer-wise and global PQI).

    ``weights`` maps names to the chosen weight tensors (any shape); ``masks`` maps the same names to bool
    keep-masks (a missing name keeps everything). The model value is the PQI of every kept weight of every
    layer concatenated into one vector, not an average of the layers' values.
    """
    _check_pq(p, q)
    if not weights:
        raise ValueError("no weights given: pass a mapping of names to weight tensors")
    layers: dict[str, float] = {}
    totals = torch.zeros(3, dtype=torch.float64)  # sum |w|^p, sum |w|^q, d over all layers
    for name, w in weights.items():
        keep = _keep_of(w, None if masks is None else masks.get(name))
        sums = torch.cat(_row_sums(w.reshape(1, -1), keep.reshape(1, -1), p, q)).cpu()
        if sums[2] == 0:
            raise ValueError(f"PQ Index of {name!r} is undefined: its mask keeps nothing")
        layers[name] = float(_pqi_from_sums(sums[0], sums[1], sums[2], p, q))
        totals += sums
    model = float(_pqi_from_sums(totals[0], totals[1], totals[2], p, q))
    return ModelPQI(layers=layers, model=model)


def sap_keep_bound(pqi: float, d: int, *, p: float = 0.5, q: float = 1.0, eta_r: float = 0.0) -> float:
    """SAP's lower bound on the number of weights to keep (Diao et al. 2023, Alg. 1, from the paper's bound on
    the weights a PQI-sparse vector needs):

    ``r = d (1 + eta_r)^{-q/(q-p)} [1 - I(w)]^{qp/(q-p)}`` (a real number; :func:`sap_prune_count` rounds it
    up).
    """
    _check_pq(p, q)
    if eta_r <= -1:
        raise ConfigError(f"eta_r must be > -1, got {eta_r!r}")
    if not (-1e-9 <= pqi <= 1.0 + 1e-9):
        raise ValueError(f"a PQ Index lies in [0, 1], got {pqi!r}")
    pqi = min(max(pqi, 0.0), 1.0)  # float error around the extremes
    return d * (1.0 + eta_r) ** (-q / (q - p)) * (1.0 - pqi) ** (q * p / (q - p))


def sap_prune_count(
    pqi: float,
    d: int,
    *,
    p: float = 0.5,
    q: float = 1.0,
    eta_r: float = 0.0,
    gamma: float = 1.0,
    beta: float = 0.9,
) -> int:
    """How many of ``d`` kept weights SAP removes this round (Diao et al. 2023, Alg. 1):

    ``c = floor(d * min(gamma * (1 - ceil(r)/d), beta))`` with ``r`` from :func:`sap_keep_bound`, never
    negative and never all ``d`` (one weight always stays; with the paper's ``beta < 1`` this never binds
    for ``d >= 2``). The rounding tolerates float error (``ceil(3.0000000001)`` counts as 3).
    """
    if gamma < 0 or not (0.0 <= beta <= 1.0):
        raise ConfigError(f"SAP needs gamma >= 0 and 0 <= beta <= 1, got gamma={gamma!r}, beta={beta!r}")
    if d <= 0:
        return 0
    r = min(d, math.ceil(sap_keep_bound(pqi, d, p=p, q=q, eta_r=eta_r) - 1e-9))
    ratio = min(gamma * (1.0 - r / d), beta)
    return max(0, min(d - 1, math.floor(d * ratio + 1e-9)))


class SAPConfig(StrictConfig):
    """Hyper-parameters of SAP (Diao et al. 2023, Alg. 1): norms ``p < q``, bound scaling ``eta_r``,
    pruning-ratio scaling ``gamma``, largest pruning ratio per round ``beta``, and the scope. A strict, frozen
    pydantic configuration (``from_yaml``/``to_yaml``)."""

    model_config = ConfigDict(frozen=True)

    p: float = 0.5
    q: float = 1.0
    eta_r: float = 0.0
    gamma: float = 1.0
    beta: float = 0.9
    scope: SapScope = "layer"

    @field_validator("scope", mode="before")
    @classmethod
    def _scope(cls, value: object) -> object:
        if value not in ("row", "layer", "global"):
            raise ConfigError(f"SAP scope must be 'row', 'layer' or 'global', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> SAPConfig:
        _check_pq(self.p, self.q)
        if self.gamma < 0 or not (0.0 <= self.beta <= 1.0) or self.eta_r <= -1:
            raise ConfigError(
                f"SAP needs gamma >= 0, 0 <= beta <= 1 and eta_r > -1, got gamma={self.gamma!r}, "
                f"beta={self.beta!r}, eta_r={self.eta_r!r}"
            )
        return self


@dataclass(frozen=True)
class SAPResult:
    """One SAP round: new keep-masks, the number removed from each weight (rows summed for ``"row"``), and
    the PQI each decision used: per layer name (the mean over its rows under ``"row"``), or under the key
    ``"global"``. A layer whose weights were all removed before is not measured (and absent from ``pqi``)."""

    masks: dict[str, torch.Tensor]
    removed: dict[str, int]
    pqi: dict[str, float] = field(default_factory=dict)

    @property
    def total_removed(self) -> int:
        return sum(self.removed.values())


def _drop_lowest_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep-mask ``False`` at the ``k[i]`` lowest scores of row ``i`` (among ties the lower index is kept)."""
    n = scores.shape[1]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand_as(order))
    return rank < (n - k).unsqueeze(1)


def sap_step(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    config: SAPConfig | None = None,
) -> SAPResult:
    """One pruning round of SAP (Diao et al. 2023, Alg. 1): PQI of the kept weights -> keep bound ``r`` ->
    count ``c`` -> remove the ``c`` kept weights of smallest magnitude.

    ``weights`` maps names to tensors (any shape; ``"row"`` views them as ``(shape[0], -1)``), ``masks`` the
    current bool keep-masks (missing: all kept). Returns new masks (already-removed weights stay removed; a
    row or layer with nothing kept is left alone); applying them to the model is the caller's step. Among
    equal magnitudes the lower index is kept.
    """
    cfg = config or SAPConfig()
    if not weights:
        raise ValueError("no weights given: pass a mapping of names to weight tensors")
    kw = {"p": cfg.p, "q": cfg.q, "eta_r": cfg.eta_r, "gamma": cfg.gamma, "beta": cfg.beta}
    keeps = {name: _keep_of(w, None if masks is None else masks.get(name)) for name, w in weights.items()}
    scores = {name: w.detach().abs().float().masked_fill(~keeps[name], -math.inf) for name, w in weights.items()}
    new_masks: dict[str, torch.Tensor] = {}
    pqi: dict[str, float] = {}

    if cfg.scope == "global":
        totals = torch.zeros(3, dtype=torch.float64)  # sum |w|^p, sum |w|^q, d over all layers
        for name, w in weights.items():
            totals += torch.cat(_row_sums(w.reshape(1, -1), keeps[name].reshape(1, -1), cfg.p, cfg.q)).cpu()
        d = int(totals[2])
        if d > 0:
            pqi["global"] = float(_pqi_from_sums(totals[0], totals[1], totals[2], cfg.p, cfg.q))
        c = sap_prune_count(pqi["global"], d, **kw) if d > 0 else 0
        flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
        keep_flat = drop_lowest_k(flat.unsqueeze(0), flat.numel() - d + c).squeeze(0)
        offset = 0
        for name, w in weights.items():
            new_masks[name] = keep_flat[offset : offset + w.numel()].reshape(w.shape).to(w.device)
            offset += w.numel()
    else:
        for name, w in weights.items():
            rows = 1 if cfg.scope == "layer" else w.shape[0]  # "layer": the whole tensor is one row
            keep = keeps[name].reshape(rows, -1)
            sum_p, sum_q, d = _row_sums(w.reshape(rows, -1), keep, cfg.p, cfg.q)
            live = d > 0  # a row (or layer) whose weights are all removed stays so, and is not measured
            values = _pqi_from_sums(sum_p, sum_q, d.clamp(min=1), cfg.p, cfg.q)
            counts = [
                sap_prune_count(float(v), int(n), **kw) if ok else 0
                for v, n, ok in zip(values.tolist(), d.tolist(), live.tolist(), strict=True)
            ]
            k = (keep.shape[1] - d.long()) + torch.tensor(counts, dtype=torch.long, device=d.device)
            flat = scores[name].reshape(rows, -1)
            new = drop_lowest_k(flat, int(k[0])) if rows == 1 else _drop_lowest_per_row(flat, k)  # k-th value: faster
            new_masks[name] = new.reshape(w.shape) & keeps[name]
            if bool(live.any()):
                pqi[name] = float(values[live].mean())
    removed = {n: int(torch.count_nonzero(keeps[n])) - int(torch.count_nonzero(new_masks[n])) for n in weights}
    return SAPResult(new_masks, removed, pqi)
