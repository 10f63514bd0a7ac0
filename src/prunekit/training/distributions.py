"""From a global sparsity target to per-layer budgets and keep-masks (pure functions).

* **uniform**: every layer gets the global sparsity (Zhu & Gupta 2017 prune each layer alike).
* **global magnitude** (Global MP; e.g. Frankle & Carbin 2019 for deep nets, Blalock et al. 2020 "What is the
  state of neural network pruning?"): one magnitude threshold over all chosen weights, with a per-layer floor
  ``min_density`` so that no layer is wiped out; the rest of the budget goes to the largest weights anywhere,
  and the total kept count is exact.
* **ERK** (Evci et al. 2020, "Rigging the Lottery", Erdős–Rényi-Kernel, sec. 3 and appendix): layer ``l`` gets
  density ``ε · (Σ dims) / (Π dims)``, i.e. ``ε (n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w)`` for a conv,
  ``ε (n_in + n_out) / (n_in n_out)`` for a linear map, with ``ε`` chosen so that the total density is the
  target; a layer whose density would exceed 1 is made dense and ``ε`` is solved again for the rest.

Masks here are ``True`` = kept. Scores are any tensors where higher is more important; ``-inf`` marks an
entry that must go first (a weight that is already pruned). Ties keep the lower (flattened) index, as in
:mod:`prunekit.core.patterns`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from prunekit.core.errors import ConfigError
from prunekit.core.patterns import NM, count_to_prune, drop_lowest_k, nm_mask

if TYPE_CHECKING:
    from prunekit.training.sparse_config import SparsifierConfig


def _check_fraction(name: str, value: float, *, upper_open: bool) -> None:
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{name} must be in {bound}, got {value!r}")


def kept_count(sparsity: float, numel: int) -> int:
    """Weights kept in a group of ``numel`` at ``sparsity`` (``numel - floor(sparsity * numel)``)."""
    return numel - count_to_prune(sparsity, numel)


def uniform_sparsities(names: Sequence[str], sparsity: float) -> dict[str, float]:
    """Every layer at the global ``sparsity`` (uniform allocation, Zhu & Gupta 2017)."""
    _check_fraction("sparsity", sparsity, upper_open=True)
    return dict.fromkeys(names, float(sparsity))


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Per-layer densities of Erdős–Rényi-Kernel (Evci et al. 2020, RigL, sec. 3 "Sparsity distribution").

    ``d_l = ε · ((Σ_j shape_j) / (Π_j shape_j)) ** power_scale``, with ``ε`` such that
    ``Σ_l d_l n_l = density · Σ_l n_l``. Whenever the largest ``d_l`` would exceed 1, the layers with the largest
    raw ratio are made dense (``d_l = 1``) and ``ε`` is solved again over the others (the iterative procedure of
    the reference implementation). ``power_scale = 0`` gives uniform densities.
    """
    _check_fraction("density", density, upper_open=False)
    if not shapes:
        return {}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / math.prod(shape)) ** power_scale for name, shape in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        sparse_names = [name for name in shapes if name not in dense]
        if not sparse_names:
            return dict.fromkeys(shapes, 1.0)
        budget = density * total - sum(numel[name] for name in dense)  # weights left for the sparse layers
        epsilon = budget / sum(raw[name] * numel[name] for name in sparse_names)
        largest = max(raw[name] for name in sparse_names)
        if epsilon * largest <= 1.0:
            break
        dense.update(name for name in sparse_names if raw[name] == largest)
    return {name: 1.0 if name in dense else epsilon * raw[name] for name in shapes}


def apportion(ideal: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    """Whole counts ``c_l <= caps[l]`` summing exactly to ``total``, closest to the real ``ideal`` counts.

    Largest-remainder rounding (Hamilton's method): floors first, then one more to the largest fractional parts
    (earlier names first among equals); if the floors overshoot, one less from the smallest fractional parts.
    """
    if not 0 <= total <= sum(caps.values()):
        raise ConfigError(f"cannot keep {total} weights out of {sum(caps.values())}")
    counts = {name: min(caps[name], max(0, math.floor(value))) for name, value in ideal.items()}
    remainder = {name: ideal[name] - counts[name] for name in ideal}
    deficit = total - sum(counts.values())
    order = sorted(ideal, key=lambda name: -remainder[name])  # stable: earlier names first among equals
    while deficit > 0:
        for name in order:
            if deficit and counts[name] < caps[name]:
                counts[name] += 1
                deficit -= 1
    while deficit < 0:
        for name in reversed(order):
            if deficit and counts[name] > 0:
                counts[name] -= 1
                deficit += 1
    return counts


def layer_keep_counts(
    shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str, power_scale: float = 1.0
) -> dict[str, int]:
    """Kept weights per layer for a global ``sparsity``: ``"uniform"`` (each layer ``floor``-pruned alike) or
    ``"erk"`` (:func:`erk_densities`, apportioned so that the total is ``N - floor(sparsity N)`` exactly)."""
    _check_fraction("sparsity", sparsity, upper_open=True)
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    if distribution == "uniform":
        return {name: kept_count(sparsity, n) for name, n in numel.items()}
    if distribution == "erk":
        densities = erk_densities(shapes, 1.0 - sparsity, power_scale)
        total = kept_count(sparsity, sum(numel.values()))
        return apportion({name: densities[name] * numel[name] for name in shapes}, numel, total)
    raise ConfigError(f"unknown distribution {distribution!r}: use 'uniform' or 'erk' (or 'global' for Global MP)")


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` highest scores of the whole tensor (lower flattened index wins ties)."""
    flat = scores.reshape(1, -1)
    return drop_lowest_k(flat, flat.shape[1] - k).reshape(scores.shape)


def magnitude_masks(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per-layer magnitude pruning (Han et al. 2015; Zhu & Gupta 2017): keep each layer's ``counts[l]`` best."""
    return {name: top_k_mask(s, counts[name]) for name, s in scores.items()}


def global_magnitude_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, min_density: float = 0.0
) -> dict[str, torch.Tensor]:
    """Global MP: one threshold over all layers, each layer keeping at least ``ceil(min_density n_l)`` weights.

    Keeps exactly ``N - floor(sparsity N)`` weights in total (``N`` = all chosen weights): first each layer's
    floor (its own best ``ceil(min_density n_l)``), then the rest of the budget to the highest scores anywhere.
    """
    _check_fraction("sparsity", sparsity, upper_open=True)
    _check_fraction("min_density", min_density, upper_open=False)
    names = list(scores)
    if not names:
        return {}
    numel = [scores[name].numel() for name in names]
    total_keep = kept_count(sparsity, sum(numel))
    floors = [min(n, math.ceil(min_density * n - 1e-9)) for n in numel]
    if sum(floors) > total_keep:
        raise ConfigError(
            f"min_density {min_density:g} keeps {sum(floors)} weights but sparsity {sparsity:g} keeps only "
            f"{total_keep}: lower min_density below {1 - sparsity:g} or lower the sparsity"
        )
    lifted = []
    for name, floor in zip(names, floors, strict=True):
        flat = scores[name].detach().reshape(-1).float()
        floor_keep = top_k_mask(flat, floor)
        lifted.append(flat.masked_fill(floor_keep, math.inf))  # the floor is always inside the global top
    keep = top_k_mask(torch.cat([t.to(common_device(lifted)) for t in lifted]), total_keep)
    return {
        name: part.reshape(scores[name].shape).to(scores[name].device)
        for name, part in zip(names, keep.split(numel), strict=True)
    }


def common_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The device of ``tensors`` if they share one, else the CPU (where a global ranking is then done)."""
    devices = {t.device for t in tensors}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def random_masks(
    shapes: Mapping[str, Sequence[int]], counts: Mapping[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random sparse initialisation (SET, Mocanu et al. 2018; RigL): ``counts[l]`` kept positions per layer,
    drawn uniformly without replacement from ``generator`` (CPU)."""
    masks = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=generator)[: counts[name]]] = True
        masks[name] = keep.reshape(tuple(shape))
    return masks


def nm_n_at(sparsity: float, n: int, m: int) -> int:
    """The ``N'`` of a gradual N:M schedule: the fewest kept per group of ``m`` whose sparsity ``1 - N'/m`` does not
    exceed the scheduled ``sparsity``, never below the final ``n`` (so ``m:m`` -> ... -> ``n:m``)."""
    return max(n, min(m, math.ceil(m * (1.0 - sparsity) - 1e-9)))


def channel_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of whole output rows (filters) of an ``(out, in)`` score matrix by L2 norm (Li et al. 2017,
    "Pruning Filters for Efficient ConvNets", which ranks filters by a norm of their weights).

    Drops ``floor(sparsity * out)`` rows with the smallest norm of their finite scores; rows whose scores are all
    ``-inf`` (already pruned) go first.
    """
    finite = torch.isfinite(scores)
    norms = scores.clamp_min(0).masked_fill(~finite, 0).float().pow(2).sum(1).sqrt()
    norms = norms.masked_fill(~finite.any(1), -math.inf)
    rows = drop_lowest_k(norms.unsqueeze(0), count_to_prune(sparsity, scores.shape[0])).squeeze(0)
    return rows.unsqueeze(1).expand_as(scores).clone()


def decide_masks(
    scores: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    config: SparsifierConfig,
) -> dict[str, torch.Tensor]:
    """Keep-masks for a global target ``sparsity`` from ``(out, in·k·k)`` score matrices (``-inf`` = already pruned).

    Unstructured: per-layer counts by ``uniform``/``erk`` (:func:`~prunekit.training.distributions.layer_keep_counts`)
    then each layer's largest scores, or Global MP with the ``min_density`` floor. N:M: ``nm_mask`` with the gradual
    ``N' = nm_n_at(sparsity)``. Channel: rows by L2 norm, per-layer sparsity from ``uniform``/``erk``.
    ``shapes`` are the parameters' own shapes (ERK counts kernel dimensions).
    """
    granularity = config.granularity
    if isinstance(granularity, NM):
        n = nm_n_at(sparsity, granularity.n, granularity.m)
        return {name: nm_mask(s, n, granularity.m) for name, s in scores.items()}
    if granularity == "channel":
        if config.distribution == "erk":
            densities = erk_densities(shapes, 1.0 - sparsity, config.erk_power_scale)
            layer_sparsity = {name: 1.0 - densities[name] for name in scores}
        else:
            layer_sparsity = dict.fromkeys(scores, sparsity)
        return {name: channel_mask(s, layer_sparsity[name]) for name, s in scores.items()}
    if config.distribution == "global":
        return global_magnitude_masks(scores, sparsity, config.min_density)
    counts = layer_keep_counts(shapes, sparsity, config.distribution, config.erk_power_scale)
    return magnitude_masks(scores, counts)
