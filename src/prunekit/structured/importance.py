"""How much each structural unit matters: pure functions from weights (and gradients) to one score per unit.

A unit (a channel, a head, a conv group) owns slices of several parameters: the output row of the conv
that makes the channel, the BatchNorm scale and shift of that channel, the input column of every layer
that reads it. Each criterion scores the unit's slices in every parameter it owns (a *place*), optionally
normalises the scores within each place, and aggregates the places into one score per unit (the group
importance of Fang et al. 2023, "DepGraph", Sec. 3.3).

Criteria (registered by name: :func:`slice_criterion` for those that score each slice, :data:`UNIT_CRITERIA` for
those that score whole units; :func:`criterion_names` lists them):

- ``l1`` / ``l2``: the norm of the unit's weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets",
  Sec. 3.1 for L1);
- ``bn_scale``: ``|gamma|`` of the BatchNorm (or other norm) scales the unit owns (Liu et al. 2017, "Network
  Slimming", Sec. 3); units without a norm scale get 0 from this criterion;
- ``taylor``: first-order Taylor expansion of the loss change, ``(sum_s g_s w_s)^2`` over the unit's weights
  in one batch, averaged over batches: ``(1/B) sum_b (sum_s g_{b,s} w_s)^2`` (Molchanov et al. 2019,
  "Importance Estimation for Neural Network Pruning", Eq. 4 in its group form, computed per minibatch and
  averaged over the minibatches of a pruning step as the paper's pruning algorithm does; the square of the *summed* gradient, ``(sum_b g_b . w)^2``, would let batches
  whose gradients disagree cancel out). :func:`taylor_importance` runs the batches one backward pass at a
  time; :func:`unit_importance` with ``"taylor"`` reads ``.grad`` as set by one backward pass (one batch);
- ``activation``: like ``l2``, but a Linear's input columns are weighted by how strongly calibration data
  drives them, ``||W[:, j]||_2 x ||X_j||_2`` (the Wanda score of Sun et al. 2023, Eq. 1, summed over a
  column as in its structured variant; :func:`collect_input_norms` gathers ``||X_j||^2``);
- ``beta_rank``: Beta-Rank (Homayounfar et al. 2023, "Beta-Rank: A Robust Convolutional Filter Pruning
  Method for Imbalanced Medical Image Analysis"), as its reference code's ``std_filters`` ranks a filter:
  its L1 norm times how much it spreads the data, ``sum_p std_batch(out[:, c, p]) / std(in)`` over the
  output positions ``p`` (here one input std per layer, where the reference takes the std of each input
  window), min-max normalised per layer; :func:`collect_output_spread` gathers the spread. Units without a
  filter of their own (a depthwise group's position...) fall back to min-max normalised L1;
- ``obs``: the second-order (Optimal Brain Surgeon) cost of removing the unit's input columns from the
  layers that read it, with the optimal update of the rest, relative to each layer's output energy (ZipLM,
  Kurtić et al. 2023; SlimGPT, Ling et al. 2024): :mod:`prunekit.structured.second_order`; needs the Grams of
  those layers' inputs;
- ``random``: a control.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from prunekit.calibration.hooks import first_input, observe, run_batches
from prunekit.calibration.statistics import column_square_sums
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.second_order import second_order_unit_costs

#: The name of a registered importance criterion (:func:`criterion_names`).
Criterion = str
Aggregation = Literal["mean", "sum", "max"]
Normalization = Literal["none", "mean", "max"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class SliceCriterion:
    """A criterion that scores each slice of a parameter (one per index of a dimension): ``score(tensor, dim,
    grad, input_norms)`` gives one number per index; the numbers a unit gets in one place are summed, then
    ``finish`` maps the sum to the unit's score there (a square root for squared norms, a square for Taylor).
    ``norm_scales_only``: only the scales of norm layers count (``bn_scale``); ``needs_grad``: ``.grad`` is read."""

    name: str
    score: Callable[[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
    finish: Callable[[float], float]
    norm_scales_only: bool = False
    needs_grad: bool = False


#: The registry of slice criteria, filled by :func:`slice_criterion` (the criteria that score whole units,
#: ``beta_rank`` and ``random``, are in :data:`UNIT_CRITERIA`).
SLICE_CRITERIA: dict[str, SliceCriterion] = {}
#: The criteria that score whole units at once, not slice by slice: ``name -> scorer(graph, model, units, *,
#: seed, output_spread, aggregation)`` (``random`` and ``beta_rank``, registered below their definitions).
UNIT_CRITERIA: dict[str, Callable[..., dict[int, float]]] = {}


def _identity(value: float) -> float:
    return float(value)


def _square_root(value: float) -> float:
    return float(np.sqrt(value))


def _square(value: float) -> float:
    return float(value * value)


def slice_criterion(
    name: str, *, finish: Callable[[float], float] = _identity, norm_scales_only: bool = False, needs_grad: bool = False
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register the decorated ``score(tensor, dim, grad, input_norms)`` as criterion ``name``."""

    def register(score: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in SLICE_CRITERIA or name in UNIT_CRITERIA:
            raise ValueError(f"an importance criterion named {name!r} is already registered")
        SLICE_CRITERIA[name] = SliceCriterion(name, score, finish, norm_scales_only, needs_grad)
        return score

    return register


def _slices(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` as ``(size of dim, everything else)``, float32, detached."""
    return tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1)


@slice_criterion("l1")
def _l1(tensor: torch.Tensor, dim: int, grad: torch.Tensor | None, input_norms: torch.Tensor | None) -> torch.Tensor:
    return _slices(tensor, dim).abs().sum(1)


@slice_criterion("l2", finish=_square_root)
def _l2(tensor: torch.Tensor, dim: int, grad: torch.Tensor | None, input_norms: torch.Tensor | None) -> torch.Tensor:
    return _slices(tensor, dim).square().sum(1)  # squared: summed over the slices of a unit, square-rooted at the end


@slice_criterion("bn_scale", finish=_square_root, norm_scales_only=True)
def _bn_scale(
    tensor: torch.Tensor, dim: int, grad: torch.Tensor | None, input_norms: torch.Tensor | None
) -> torch.Tensor:
    return _slices(tensor, dim).square().sum(1)


@slice_criterion("activation", finish=_square_root)
def _activation(
    tensor: torch.Tensor, dim: int, grad: torch.Tensor | None, input_norms: torch.Tensor | None
) -> torch.Tensor:
    if input_norms is None or tensor.dim() != 2:
        return _slices(tensor, dim).square().sum(1)
    weighted = tensor.detach().float().square() * input_norms.to(tensor.device, torch.float32).unsqueeze(0)
    return weighted.movedim(dim, 0).reshape(tensor.shape[dim], -1).sum(1)


@slice_criterion("taylor", finish=_square, needs_grad=True)
def _taylor(
    tensor: torch.Tensor, dim: int, grad: torch.Tensor | None, input_norms: torch.Tensor | None
) -> torch.Tensor:
    if grad is None:
        raise ValueError("the taylor criterion needs gradients: run loss.backward() on the model first")
    return (_slices(tensor, dim) * _slices(grad, dim)).sum(1)  # summed per unit, squared at the end (Eq. 4)


def criterion_names() -> list[str]:
    """Every registered importance criterion."""
    return sorted([*SLICE_CRITERIA, *UNIT_CRITERIA])


def slice_scores(
    tensor: torch.Tensor,
    dim: int,
    criterion: Criterion,
    grad: torch.Tensor | None = None,
    input_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One score per index of ``dim`` of ``tensor``: the criterion applied to each slice. ``input_norms``
    (``||X_j||^2`` per input column of a 2-D weight) weights the squared entries for ``activation``."""
    if criterion not in SLICE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: choose one of {', '.join(criterion_names())}")
    return SLICE_CRITERIA[criterion].score(tensor, dim, grad, input_norms)


def _norm_scale_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) and getattr(module, "weight", None) is not None:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _places(
    graph: DependencyGraph, parameters: Mapping[str, torch.Tensor], only: set[str] | None = None
) -> Iterator[tuple[str, int, list[list[int]]]]:
    """Every place of ``graph`` whose parameter ``model`` has (only those named in ``only``, when given):
    ``(parameter name, dimension, the leaf units of each index of that dimension)``."""
    for name, dims in graph.state_dims.items():
        if name not in parameters or (only is not None and name not in only):
            continue
        for d, atoms in enumerate(dims):
            leaves_per_index = [graph.table.leaves(a) for a in atoms.tolist()]
            if any(leaves_per_index):
                yield name, d, leaves_per_index


def _unit_totals(leaves_per_index: list[list[int]], scores: Sequence[float], wanted: set[int]) -> dict[int, float]:
    """The scores of the indices of one place summed per unit."""
    totals: dict[int, float] = {}
    for leaves, score in zip(leaves_per_index, scores, strict=False):
        for leaf in leaves:
            if leaf in wanted:
                totals[leaf] = totals.get(leaf, 0.0) + score
    return totals


def _aggregate(
    per_place: Iterable[dict[int, float]], units: list[int], aggregation: Aggregation, normalization: Normalization
) -> dict[int, float]:
    """Normalise each place's unit scores by their mean or max, then combine the places of every unit."""
    collected: dict[int, list[float]] = {u: [] for u in units}
    for values in per_place:
        if normalization != "none" and values:
            scale = (np.mean if normalization == "mean" else np.max)(list(values.values()))
            if scale > 0:
                values = {u: v / scale for u, v in values.items()}
        for u, v in values.items():
            collected[u].append(v)
    reduce = {"mean": np.mean, "sum": np.sum, "max": np.max}[aggregation]
    return {u: float(reduce(v)) if v else 0.0 for u, v in collected.items()}


def unit_importance(
    graph: DependencyGraph,
    model: nn.Module,
    criterion: Criterion = "l2",
    *,
    aggregation: Aggregation = "mean",
    normalization: Normalization = "mean",
    seed: int = 0,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    output_spread: Mapping[str, torch.Tensor] | None = None,
    grams: Mapping[str, torch.Tensor] | None = None,
) -> dict[int, float]:
    """Score every unit of ``graph`` (a model traced by :func:`build_dependency_graph`) with ``criterion``.

    Per place (parameter dimension) a unit's score is the criterion over all its slices there (L2 is
    the norm of all of them together); ``normalization`` divides each place's scores by their mean or
    max so that large and small layers weigh alike; ``aggregation`` combines the places of a unit.
    ``"taylor"`` reads the ``.grad`` of one backward pass, as one batch; :func:`taylor_importance` averages
    the per-batch squares over several.
    """
    units = [u for s in graph.spaces for u in s.units]
    if criterion in UNIT_CRITERIA:
        return UNIT_CRITERIA[criterion](
            graph, model, units, seed=seed, output_spread=output_spread, aggregation=aggregation, grams=grams
        )
    if criterion not in SLICE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: choose one of {', '.join(criterion_names())}")
    chosen = SLICE_CRITERIA[criterion]
    parameters = dict(model.named_parameters())
    scales = _norm_scale_names(model) if chosen.norm_scales_only else None
    wanted = set(units)

    def places() -> Iterator[dict[int, float]]:
        for name, d, leaves_per_index in _places(graph, parameters, scales):
            tensor = parameters[name]
            grad = tensor.grad if chosen.needs_grad else None
            norms = input_norms.get(name) if input_norms is not None else None
            scores = chosen.score(tensor, d, grad, norms).tolist()
            totals = _unit_totals(leaves_per_index, scores, wanted)
            yield {u: chosen.finish(v) for u, v in totals.items()}

    return _aggregate(places(), units, aggregation, normalization)


def taylor_importance(
    graph: DependencyGraph,
    model: nn.Module,
    losses: Iterable[Callable[[], torch.Tensor]],
    *,
    aggregation: Aggregation = "mean",
    normalization: Normalization = "mean",
) -> dict[int, float]:
    """The ``taylor`` criterion over several batches: ``losses`` gives, per batch, a function returning that
    batch's loss; each is backpropagated alone, and every place scores a unit with the mean over batches of
    the squared first-order term of that batch, ``(1/B) sum_b (sum_s g_{b,s} w_s)^2`` (Molchanov et al.
    2019, Eq. 4 per minibatch, averaged over minibatches). Batches whose gradients disagree add up instead
    of cancelling: two batches of gradients ``g`` and ``-g`` score ``(g . w)^2``, not 0. The model's
    ``.grad`` are cleared before and after."""
    units = [u for s in graph.spaces for u in s.units]
    wanted = set(units)
    parameters = dict(model.named_parameters())
    sums: dict[tuple[str, int], dict[int, float]] = {}
    batches = 0
    model.zero_grad(set_to_none=True)
    try:
        for loss in losses:
            with torch.enable_grad():
                loss().backward()
            for name, d, leaves_per_index in _places(graph, parameters):
                tensor = parameters[name]
                terms = slice_scores(tensor, d, "taylor", tensor.grad).tolist()
                place = sums.setdefault((name, d), {})
                for u, v in _unit_totals(leaves_per_index, terms, wanted).items():
                    place[u] = place.get(u, 0.0) + v * v
            batches += 1
            model.zero_grad(set_to_none=True)
    finally:
        model.zero_grad(set_to_none=True)
    if not batches:
        raise ValueError("taylor_importance needs at least one batch")
    per_place = ({u: v / batches for u, v in place.items()} for place in sums.values())
    return _aggregate(per_place, units, aggregation, normalization)


def _random_units(
    graph: DependencyGraph, model: nn.Module, units: list[int], *, seed: int = 0, **_: Any
) -> dict[int, float]:
    """``random``: uniform scores from ``seed`` (the control)."""
    rng = np.random.default_rng(seed)
    return dict(zip(units, rng.random(len(units)).tolist(), strict=False))


def _beta_rank_units(
    graph: DependencyGraph,
    model: nn.Module,
    units: list[int],
    *,
    output_spread: Mapping[str, torch.Tensor] | None = None,
    aggregation: Aggregation = "mean",
    **_: Any,
) -> dict[int, float]:
    """``beta_rank`` (see the module docstring)."""
    if output_spread is None:
        raise ValueError("beta_rank needs output_spread: run collect_output_spread on calibration data first")
    return _beta_rank(graph, model, units, output_spread, aggregation)


def _obs_units(
    graph: DependencyGraph,
    model: nn.Module,
    units: list[int],
    *,
    grams: Mapping[str, torch.Tensor] | None = None,
    **_: Any,
) -> dict[int, float]:
    """``obs`` (see :mod:`prunekit.structured.second_order`)."""
    if not grams:
        raise ValueError("the obs criterion needs the input Grams of the layers that read the units (calibration)")
    return second_order_unit_costs(graph, dict(model.named_parameters()), units, grams)


UNIT_CRITERIA.update(random=_random_units, beta_rank=_beta_rank_units, obs=_obs_units)


def _min_max(values: dict[int, float]) -> dict[int, float]:
    low, high = min(values.values()), max(values.values())
    return {u: (v - low) / (high - low) if high > low else 1.0 for u, v in values.items()}


def _beta_rank(
    graph: DependencyGraph,
    model: nn.Module,
    units: list[int],
    output_spread: Mapping[str, torch.Tensor],
    aggregation: Aggregation,
) -> dict[int, float]:
    """Filter places (dim 0 of a weight with a recorded spread) score ``L1 x spread``; units met at none of
    them are scored by min-max normalised L1 over all their places."""
    parameters = dict(model.named_parameters())
    wanted = set(units)
    ranked: dict[int, list[float]] = {u: [] for u in units}
    fallback: dict[int, list[float]] = {u: [] for u in units}
    for name, dims in graph.state_dims.items():
        if name not in parameters:
            continue
        tensor = parameters[name]
        for d, atoms in enumerate(dims):
            leaves_per_index = [graph.table.leaves(a) for a in atoms.tolist()]
            if not any(leaves_per_index):
                continue
            l1 = slice_scores(tensor, d, "l1")
            spread = output_spread.get(name) if d == 0 else None
            scores = (l1 * spread.to(l1.dtype) if spread is not None else l1).tolist()
            totals: dict[int, float] = {}
            for leaves, score in zip(leaves_per_index, scores, strict=True):
                for leaf in leaves:
                    if leaf in wanted:
                        totals[leaf] = totals.get(leaf, 0.0) + score
            if not totals:
                continue
            target = ranked if spread is not None else fallback
            for u, v in _min_max(totals).items():
                target[u].append(v)
    reduce = {"mean": np.mean, "sum": np.sum, "max": np.max}[aggregation]
    return {u: float(reduce(ranked[u] or fallback[u])) if (ranked[u] or fallback[u]) else 0.0 for u in units}


def collect_output_spread(
    model: nn.Module, batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Beta-Rank's spread of every conv filter and Linear row, keyed by weight name: ``sum_p
    std_batch(out[:, c, p]) / std(in)`` (conv: ``p`` the output pixels, the batch the samples; Linear:
    every leading index a sample, one position), averaged over ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    convs: set[str] = set()

    def record(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
        x, y = args[0].detach().double(), output.detach().double()
        if name in convs:  # (B, C, *pixels) -> std over the batch per (channel, pixel), summed over pixels
            spread = y.flatten(2).std(dim=0, unbiased=False).sum(-1)
        else:  # (..., C) -> std over all leading indices per channel
            spread = y.reshape(-1, y.shape[-1]).std(dim=0, unbiased=False)
        scale = float(x.std(unbiased=False))
        value = spread / scale if scale > 0 else torch.zeros_like(spread)
        sums[name] = sums[name] + value if name in sums else value
        counts[name] = counts.get(name, 0) + 1

    modules = {}
    for module_name, module in model.named_modules():
        conv = isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
        if conv or isinstance(module, nn.Linear):
            name = f"{module_name}.weight" if module_name else "weight"
            modules[name] = module
            if conv:
                convs.add(name)
    with observe(modules, on_output=record):
        run_batches(model, batches)
    return {name: (total / counts[name]).float() for name, total in sums.items()}


def accumulate_linear_inputs(
    model: nn.Module,
    batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    names: Sequence[str],
    statistic: Callable[[torch.Tensor], torch.Tensor] | Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``batches`` (``(args, kwargs)`` pairs) and sum ``statistic(x)`` over them, where ``x`` is
    the ``(tokens, in_features)`` input of each module named in ``names``; keyed by module name. ``statistic``
    may be a mapping from module name to the statistic of that module (several statistics in one pass)."""
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        measure = statistic[name] if isinstance(statistic, Mapping) else statistic
        x = first_input(args, kwargs).detach()
        value = measure(x.reshape(-1, x.shape[-1]))
        sums[name] = sums[name] + value if name in sums else value

    with observe({name: model.get_submodule(name) for name in names}, on_input=record):
        run_batches(model, batches)
    return sums


def collect_input_norms(
    model: nn.Module, batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """``||X_j||^2`` per input column of every ``nn.Linear``, summed over all tokens of ``batches``
    (``(args, kwargs)`` pairs the model is called with), keyed by the weight's parameter name."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    sums = accumulate_linear_inputs(model, batches, names, column_square_sums)
    return {f"{name}.weight" if name else "weight": total.float() for name, total in sums.items()}
