"""One call from a model to its structurally pruned copy: graph, importance, plan, surgery, and what to do
when a module's own code disagrees with the plan.

Most modules compute their sizes from their weights or their inputs and need nothing. Some read a width from
their input and split it with an attribute (``head_dim = C // num_heads`` in Swin or MaxViT attention), which
only works when their inner width equals the stream's. When the pruned model departs from the plan in such a
module, :func:`prune_structurally` retries with the widths of every module of that class tied to their
inputs' (:func:`~prunekit.structured.graph.tie_widths`), and as a last resort keeps the module whole. Every such
adjustment is returned, and logged, so nothing is silently left unpruned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunekit.core.devices import device_of
from prunekit.core.errors import StructuralPruningError
from prunekit.structured.cost import model_size, original_size, planned_macs, planned_parameters
from prunekit.structured.depth import prune_depth
from prunekit.structured.graph import DependencyGraph, build_dependency_graph
from prunekit.structured.graph.surgery import apply_plan
from prunekit.structured.importance import Aggregation, Criterion, Normalization, unit_importance
from prunekit.structured.knapsack import plan_latency_aware
from prunekit.structured.latency import LatencyTable, planned_latency
from prunekit.structured.plan import DEFAULT_KINDS, Policy, StructuralPlan, fill_to_budget, plan_pruning

log = logging.getLogger(__name__)

#: Plans tried before giving up (each adjustment costs one more trace of the model).
MAX_ATTEMPTS = 12

BudgetTarget = Literal["channels", "params", "macs", "latency"]

#: Bisection steps when the target is a parameter or MAC reduction (the channel ratio is found to 1/2^14).
SEARCH_STEPS = 14
#: The largest channel ratio a bisection tries.
MAX_CHANNEL_RATIO = 0.99


@dataclass
class StructuralResult:
    """The pruned model (a new one), the plan it follows, and the adjustments that made it work."""

    model: nn.Module
    plan: StructuralPlan
    graph: DependencyGraph
    tied: list[str] = field(default_factory=list)
    kept_whole: list[str] = field(default_factory=list)
    #: blocks removed whole before the width was pruned (``blocks=``; the attention sublayers of an
    #: attention drop); the plan and graph are of the model without them
    removed_blocks: list[str] = field(default_factory=list)


def prune_structurally(
    model: nn.Module,
    example_inputs: Sequence[Any],
    ratio: float,
    *,
    example_kwargs: dict[str, Any] | None = None,
    criterion: Criterion = "l2",
    aggregation: Aggregation = "mean",
    normalization: Normalization = "mean",
    policy: Policy = "uniform",
    target: BudgetTarget = "channels",
    round_to: int = 1,
    kinds: Sequence[str] = DEFAULT_KINDS,
    ignored: Sequence[str] = (),
    min_keep_ratio: float = 0.1,
    keep_streams: bool = False,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    output_spread: Mapping[str, torch.Tensor] | None = None,
    blocks: int = 0,
    latency: LatencyTable | None = None,
) -> StructuralResult:
    """Remove ``ratio`` of the units of every prunable space of ``model`` (``policy="uniform"``; or of all of
    them together, ``"global"``), the least important by ``criterion`` first. ``model`` is not modified.

    With ``target="params"``, ``"macs"`` or ``"latency"``, ``ratio`` is the fraction of parameters,
    multiply-accumulates or planned latency to remove instead: the channel ratio that reaches it (or the least
    over it) is found by bisection on the planned cost (:mod:`~prunekit.structured.cost`,
    :mod:`~prunekit.structured.latency`), then units are given back where the cost allows
    (:func:`~prunekit.structured.plan.fill_to_budget`), so coarse units do not overshoot the target.

    ``policy="latency"`` allocates such a target with HALP's latency-saliency ratio instead
    (:func:`~prunekit.structured.knapsack.plan_latency_aware`): the units that save the most time on the
    device for the least importance go first. ``latency`` is the table of measured operation times it (and
    ``target="latency"``) reads; by default one is made for the model's device and the current thread count,
    for contiguous tensors with every operation costed (pass a :class:`~prunekit.structured.latency.LatencyTable`
    with ``memory_format=torch.channels_last`` and ``free_ops=BATCH_NORM_OPS`` to cost the model as deployed).

    ``keep_streams`` leaves the residual streams whole (the channels that residual additions join: a ResNet
    stage's output width, a transformer's hidden size) and prunes only the width inside the blocks. Where
    the stream is narrow and the blocks wide (MobileNetV2's inverted residuals expand 6x) this removes the
    MACs and the memory traffic of the wide tensors in step, so at large batches the time falls with the MACs
    (at batch 1 a fixed cost per layer remains; see BENCHMARKS.md).

    ``ignored`` lists modules (or parameter names) to keep whole. ``input_norms`` feeds the ``activation``
    criterion (:func:`~prunekit.structured.importance.collect_input_norms`), ``output_spread`` the
    ``beta_rank`` one (:func:`~prunekit.structured.importance.collect_output_spread`).

    ``blocks > 0`` first removes that many whole residual blocks, those of lowest Block Influence on the
    example inputs (:func:`~prunekit.structured.depth.prune_depth`), then prunes the width of what is left to
    the same target, counted against the original model. Raises
    :class:`~prunekit.core.errors.StructuralPruningError` if no plan gives a model that runs as planned.
    """
    if (policy == "latency" or target == "latency") and latency is None:
        latency = _default_table(model)
    removed_blocks: list[str] = []
    if blocks:
        depth = prune_depth(model, example_inputs, blocks, example_kwargs=example_kwargs)
        removed_blocks = depth.removed
        if target != "channels":
            before = _size(model, example_inputs, example_kwargs, target, latency)
            after = _size(depth.model, example_inputs, example_kwargs, target, latency)
            if after <= before * (1.0 - ratio):
                raise StructuralPruningError(
                    f"removing {blocks} blocks already takes away {100 * (1 - after / before):.1f}% of the {target}, "
                    f"more than the {100 * ratio:.1f}% asked: remove fewer blocks"
                )
            ratio = 1.0 - before * (1.0 - ratio) / after
        model = depth.model
    tied: list[str] = []
    kept_whole: list[str] = []
    for _ in range(MAX_ATTEMPTS):
        graph = build_dependency_graph(
            model, example_inputs, example_kwargs, ignored=[*ignored, *kept_whole], tied=tied
        )
        scores = unit_importance(
            graph,
            model,
            criterion,
            aggregation=aggregation,
            normalization=normalization,
            input_norms=input_norms,
            output_spread=output_spread,
        )
        options = {
            "policy": policy,
            "round_to": round_to,
            "kinds": kinds,
            "min_keep_ratio": min_keep_ratio,
            "keep_streams": keep_streams,
        }
        plan = plan_to_target(graph, scores, ratio, target, latency=latency, **options)
        try:
            pruned = apply_plan(model, plan, example_inputs, example_kwargs)
        except StructuralPruningError as error:
            module = error.module_name
            if module is None:
                raise
            if module not in tied and _has_linear_to_tie(model, module):
                same_code = _same_class(model, module)  # the problem is in the class's code: tie them all
                log.warning(
                    "structured: %s reads its width from its input; tying the widths of its %d %s modules",
                    module or "<root>",
                    len(same_code),
                    type(model.get_submodule(module)).__name__,
                )
                tied.extend(n for n in same_code if n not in tied)
                continue
            if module not in kept_whole:
                log.warning("structured: keeping %s whole (%s)", module or "<root>", error)
                kept_whole.append(module)
                continue
            raise
        return StructuralResult(pruned, plan, graph, tied, kept_whole, removed_blocks)
    raise StructuralPruningError(f"no workable plan after {MAX_ATTEMPTS} attempts (kept whole: {kept_whole})")


def plan_to_target(
    graph: DependencyGraph,
    scores: dict[int, float],
    ratio: float,
    target: BudgetTarget,
    *,
    make: Callable[[float], StructuralPlan] | None = None,
    latency: LatencyTable | None = None,
    **options: Any,
) -> StructuralPlan:
    """The plan removing ``ratio`` of the channels, or the plan of the smallest channel ratio that removes at
    least ``ratio`` of the parameters or MACs. ``make(channel_ratio)`` builds a plan (default:
    :func:`plan_pruning` with ``options``).

    With the default ``make``, the cost target is then approached from below: spaces whose units are too
    coarse for one shared ratio (a ViT's stream, made of whole heads) are kept one step wider while the
    others are pruned further, and units are given back where the cost allows
    (:func:`~prunekit.structured.plan.fill_to_budget`); of these plans, the one removing least wins.

    ``options["policy"] == "latency"`` hands the target to
    :func:`~prunekit.structured.knapsack.plan_latency_aware`; ``latency`` is the table it and
    ``target="latency"`` read."""
    if target not in ("channels", "params", "macs", "latency"):
        raise ValueError(f"unknown target {target!r}: use 'channels', 'params', 'macs' or 'latency'")
    if target == "latency" or options.get("policy") == "latency":
        if latency is None:
            raise ValueError("a latency target or policy needs a LatencyTable (latency=...)")
        table = latency
    if options.get("policy") == "latency":
        if target == "channels" or make is not None:
            raise ValueError("the latency policy allocates a 'macs', 'params' or 'latency' target, not channels")
        options = {k: v for k, v in options.items() if k != "policy"}
        return plan_latency_aware(graph, scores, ratio, table, budget=target, **options)
    build = make or (lambda r: plan_pruning(graph, scores, r, **options))
    if target == "channels":
        return build(ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"a {target} reduction must be in (0, 1), got {ratio}")
    cost: Callable[[StructuralPlan], float]
    if target == "latency":
        cost = lambda plan: planned_latency(plan, table)  # noqa: E731
        base = cost(StructuralPlan(graph, [], set()))
    else:
        cost = planned_parameters if target == "params" else planned_macs
        base = original_size(build(0.0))[0 if target == "params" else 1]
    goal = base * (1.0 - ratio)
    found, over, high = _bisect(build, cost, goal, 0.0, MAX_CHANNEL_RATIO)
    if found is None:
        log.warning(
            "structured: even a %.2f channel ratio keeps more than %.0f%% of the %s", high, 100 * (1 - ratio), target
        )
        return over
    best = found
    if make is None:  # a custom ``make`` may tie spaces together, which changing one space at a time breaks
        step = options.get("round_to", 1)
        candidates = [fill_to_budget(best, over, scores, cost, goal, round_to=step)]
        pinned = _coarse_spaces(over, best, cost)
        if pinned and options.get("policy", "uniform") == "uniform":
            within, wider = _bisect_with_pinned(graph, scores, pinned, cost, goal, high, options)
            if within is not None:
                candidates.append(fill_to_budget(within, wider, scores, cost, goal, round_to=step))
        best = max(candidates, key=cost)  # every candidate is within the goal: the closest to it wins
    log.info("structured: the plan removes %.1f%% of the %s", 100 * (1 - cost(best) / base), target)
    return best


def _coarse_spaces(
    over: StructuralPlan, within: StructuralPlan, cost: Callable[[StructuralPlan], float]
) -> dict[int, float]:
    """Spaces whose last step of the bisection alone accounts for more than half of the cost jump between
    ``over`` and ``within`` (few, big units: the heads that make up a ViT's stream), with the ratio that keeps
    them as ``over`` does."""
    base = cost(within)
    jump = cost(over) - base
    pinned: dict[int, float] = {}
    for wider, narrower in zip(over.spaces, within.spaces, strict=True):
        if len(wider.keep) <= len(narrower.keep):
            continue
        spaces = [wider if p is narrower else p for p in within.spaces]
        trial = StructuralPlan(within.graph, spaces, {u for p in spaces for u in p.removed})
        if cost(trial) - base > jump / 2:
            pinned[wider.space.index] = 1.0 - len(wider.keep) / wider.space.size
    return pinned


def _bisect_with_pinned(
    graph: DependencyGraph,
    scores: dict[int, float],
    pinned: dict[int, float],
    cost: Callable[[StructuralPlan], float],
    goal: float,
    start: float,
    options: dict[str, Any],
) -> tuple[StructuralPlan | None, StructuralPlan]:
    """With the ``pinned`` spaces kept at their wider size, the plan at the smallest ratio (from ``start`` up)
    of the other spaces that reaches ``goal`` (``None`` if none does), and the plan just over it."""

    def build(ratio: float) -> StructuralPlan:
        return plan_pruning(graph, scores, ratio, space_ratios=pinned, **options)

    within, wider, ratio = _bisect(build, cost, goal, start, MAX_CHANNEL_RATIO)
    if within is not None:
        log.info("structured: %d coarse spaces kept wider, the others at channel ratio %.4f", len(pinned), ratio)
    return within, wider


def _bisect(
    build: Callable[[float], StructuralPlan],
    cost: Callable[[StructuralPlan], float],
    goal: float,
    low: float,
    high: float,
) -> tuple[StructuralPlan | None, StructuralPlan, float]:
    """``(plan, plan just over the goal, ratio)``: the plan of the smallest ratio in ``[low, high]`` whose cost
    is within ``goal`` (to ``SEARCH_STEPS`` halvings), or ``(None, build(high), high)`` if even ``high`` is
    over it."""
    within = build(high)
    if cost(within) > goal:
        return None, within, high
    over = build(low)
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        plan = build(middle)
        if cost(plan) <= goal:
            high, within = middle, plan
        else:
            low, over = middle, plan
    return within, over, high


def _size(
    model: nn.Module,
    inputs: Sequence[Any],
    kwargs: dict[str, Any] | None,
    target: BudgetTarget,
    latency: LatencyTable | None = None,
) -> float:
    """Parameters, MACs or planned latency of ``model`` as planned costs count them."""
    if target == "latency":
        assert latency is not None
        return planned_latency(StructuralPlan(build_dependency_graph(model, inputs, kwargs), [], set()), latency)
    return model_size(model, inputs, kwargs)[0 if target == "params" else 1]


def _default_table(model: nn.Module) -> LatencyTable:
    """A latency table for ``model``'s device at the current thread count (contiguous tensors, nothing free)."""
    return LatencyTable(device=device_of(model), threads=torch.get_num_threads())


def _same_class(model: nn.Module, name: str) -> list[str]:
    cls = type(model.get_submodule(name) if name else model)
    return [n for n, m in model.named_modules() if type(m) is cls]


def _has_linear_to_tie(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name) if name else model
    children = [module] if isinstance(module, nn.Linear) else list(module.children())
    return any(isinstance(c, nn.Linear) and c.out_features % c.in_features == 0 for c in children)


def prune_iteratively(
    model: nn.Module,
    example_inputs: Sequence[Any],
    ratio: float,
    steps: int,
    *,
    between_steps: Callable[[nn.Module, int], None] | None = None,
    target: BudgetTarget = "channels",
    **options: Any,
) -> StructuralResult:
    """Reach ``ratio`` in ``steps`` equal steps (linear schedule: after step ``i`` a fraction ``ratio x i /
    steps`` of the original channels, parameters or MACs is gone), recomputing importance each time, with
    ``between_steps(model, i)`` (e.g. a few epochs of fine-tuning) after every step but the last. ``options``
    apply at every step (``blocks=k`` removes ``k`` more blocks each time). The returned result's ``model`` is
    the final one; ``model`` itself is not modified."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if (target == "latency" or options.get("policy") == "latency") and options.get("latency") is None:
        options["latency"] = _default_table(model)  # one table for every step: its entries carry over
    current = model
    base: float | None = None
    result: StructuralResult | None = None
    for step in range(1, steps + 1):
        goal = ratio * step / steps  # fraction of the original gone after this step
        if target == "channels":
            done = ratio * (step - 1) / steps
            step_ratio = 1.0 - (1.0 - goal) / (1.0 - done)
        else:
            size = _size(current, example_inputs, options.get("example_kwargs"), target, options.get("latency"))
            base = base or size
            step_ratio = 1.0 - base * (1.0 - goal) / size
        result = prune_structurally(current, example_inputs, step_ratio, target=target, **options)
        current = result.model
        log.info("structured: step %d/%d removed %.1f%% (%s)", step, steps, 100 * goal, target)
        if between_steps is not None and step < steps:
            between_steps(current, step)
    assert result is not None
    return result
