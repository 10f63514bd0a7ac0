"""Searched per-layer widths: Týr-the-Pruner's evolutionary search of the sparsity distribution.

Li et al. (2025), "Týr-the-Pruner: Structural Pruning LLMs via Global Sparsity Distribution Optimization"
(NeurIPS 2025), Sec. 3.3-3.4. Every decoder layer has a choice ``(attention units kept, MLP channels kept)``
(:mod:`~prunekit.structured.llm.supernet`: attention units are key/value groups with their query heads; no
attention is the attention drop; no attention and no MLP is the layer removed). A genome holds one choice per
layer; the search finds the genome that keeps at most ``(1 - ratio)`` of the model's parameters (and less than
one MLP channel's parameters under it: the target is met exactly at the granularity of a channel) and whose
output distribution is closest to the dense model's: the mean per-token ``KL(p_dense || p_pruned)`` on
calibration windows held apart from those the local prunings are fitted on.

- **Evolution** (a (mu + lambda) scheme): a population of ``population`` genomes, each generation
  ``offspring`` children made by uniform crossover of two tournament winners (or a copy of one) and one to
  ``max_moves`` mutation moves (an MLP one ladder step narrower or wider, an attention unit more or less, a
  layer removed or restored), each followed by the budget repair (MLP channels taken from or given back to
  random layers until the target is met); the best ``population`` of parents and children survive.
- **Coarse to fine**: the first iteration's ladder steps the MLP by ``first_step`` of its width (12.5%, as in
  the paper) and offers every attention width; each further iteration halves the step, rebuilds the supernet
  on a ladder of ``neighbourhood`` steps either side of the best genome so far (so that its expected-error
  propagation is closer to the model chosen) and searches again from that genome.
- **Final refit**: the chosen widths are pruned once more layer by layer on the outputs of the already-pruned
  layers (:func:`~prunekit.structured.llm.supernet.prune_to_widths`: the error of the chosen model propagated,
  not the ladder's expectation); that model is kept where its KL is lower.
- **Deterministic**: one ``random.Random(seed)`` drives every choice; the supernet is a deterministic function
  of the model and calibration windows; a genome's fitness is computed once and cached.

The result: the pruned model (:meth:`~prunekit.structured.llm.supernet.Supernet.materialise`), its widths per
layer and the search history (best KL against time), for the report and its plots.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.config import StrictConfig
from prunekit.core.errors import StructuralPruningError
from prunekit.eval.divergence import ReferenceOutputs
from prunekit.models.blocks import find_decoder_blocks
from prunekit.structured.llm.decode_latency import DecodeLatencyModel, fit_decode_latency
from prunekit.structured.llm.layer_widths import Genome, Ladder, LayerChoice, LayerLayout, layer_layout
from prunekit.structured.llm.search_space import SearchSpace
from prunekit.structured.llm.supernet import Supernet, build_supernet, prune_to_widths

log = logging.getLogger(__name__)


class WidthSearchSettings(StrictConfig):
    """How the width search runs (the ``search:`` section of a ``prunekit structured`` recipe)."""

    iterations: int = Field(3, ge=1, description="coarse-to-fine iterations (the MLP step halves each time)")
    first_step: float = Field(0.125, gt=0.0, le=0.5, description="first MLP ladder step, fraction of its width")
    neighbourhood: int = Field(2, ge=1, description="fine iterations: ladder steps either side of the best")
    population: int = Field(16, ge=2, description="genomes kept each generation")
    offspring: int = Field(16, ge=1, description="children made each generation")
    generations: int = Field(12, ge=0, description="generations per iteration")
    max_moves: int = Field(3, ge=1, description="mutation moves per child, at most")
    crossover: float = Field(0.5, ge=0.0, le=1.0, description="share of children made by crossover")
    attention_drop: bool = Field(True, description="a layer's attention may go whole")
    layer_removal: bool = Field(True, description="a layer may go whole")
    min_mlp: float = Field(0.125, gt=0.0, le=1.0, description="narrowest MLP of a kept MLP, fraction of its width")
    channel_multiple: int = Field(
        1,
        ge=1,
        description="MLP widths in multiples of this (32 or 64 suit the matrix kernels of llama.cpp and GPUs); "
        "the parameter budget is then met to within one multiple of channels",
    )
    search_windows: int = Field(4, ge=1, description="calibration windows held apart to score genomes on")
    search_seqlen: int | None = Field(256, gt=0, description="their length (None: the calibration length)")
    batch_size: int = Field(1, ge=1)
    dampening: float = Field(0.01, ge=0.0)
    cache_bytes: int = Field(1 << 30, gt=0, description="memory for the pruned sublayers the search visits")
    decode_speedup: float | None = Field(
        None, gt=1.0, description="also decode at batch 1 at least this much faster (measured latency model)"
    )
    decode_latency: tuple[float, float, float, float, float] | None = Field(
        None,
        description="the latency model's coefficients from an earlier run's report (same machine); none: measure",
    )

    @model_validator(mode="after")
    def _steps(self) -> WidthSearchSettings:
        if self.min_mlp > 1.0 - self.first_step + 1e-9:
            raise ValueError(f"min_mlp {self.min_mlp} leaves no MLP ladder below the dense width")
        return self


class WidthSearchConfig(WidthSearchSettings):
    """One width search (:func:`search_widths`): the settings, the share of parameters to remove, the seed."""

    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of the model's parameters to remove")
    seed: int = 0


class _Scorer:
    """A genome's KL from the dense model on the held-apart windows, on one iteration's supernet, each genome
    computed once; ``total`` counts the evaluations of the whole search."""

    def __init__(self, supernet: Supernet, reference: ReferenceOutputs, before: int) -> None:
        self.supernet: Supernet | None = supernet
        self.reference = reference
        self.fitness: dict[Genome, float] = {}
        self.total = before

    def __call__(self, genome: Genome) -> float:
        if genome not in self.fitness:
            assert self.supernet is not None
            with self.supernet.applied(genome) as running:
                self.fitness[genome] = self.reference.kl(running)
            self.total += 1
        return self.fitness[genome]


@dataclass
class SearchStep:
    """The best genome's KL after one generation of one iteration, and the time and evaluations so far."""

    iteration: int
    generation: int
    best_kl: float
    seconds: float
    evaluations: int


@dataclass
class SearchResult:
    """The pruned model, the genome it was made from (per layer: attention units and MLP channels kept), its
    KL on the held-apart windows, the uniform baseline's KL, and the history of the search."""

    model: nn.Module
    genome: Genome
    kl: float
    uniform_kl: float | None
    #: the KL of the chosen widths refitted on their own propagated errors (kept when it is lower)
    refit_kl: float | None
    params: int
    dense_params: int
    layouts: list[LayerLayout]
    history: list[SearchStep] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0
    #: with a decode-speed constraint: the speed-up the latency model predicts, the model's fit error (``None`` for
    #: coefficients given, not measured) and its coefficients (``decode_latency`` reproduces the search)
    decode_speedup: float | None = None
    latency_fit_error: float | None = None
    decode_latency: tuple[float, ...] | None = None

    def widths(self) -> list[dict[str, float]]:
        """Per layer: the attention heads and MLP channels kept, and their shares of the dense layer's."""
        rows = []
        for (units, channels), layout in zip(self.genome, self.layouts, strict=True):
            rows.append(
                {
                    "heads": units * layout.unit_heads,
                    "heads_share": units / layout.units,
                    "mlp_channels": channels,
                    "mlp_share": channels / layout.channels,
                }
            )
        return rows


def _ladder(
    layout: LayerLayout, index: int, config: WidthSearchConfig, step: int, center: LayerChoice | None
) -> Ladder:
    """Iteration ladders: all attention widths and MLP multiples of ``step`` from ``min_mlp`` up (the first),
    or ``neighbourhood`` steps either side of ``center`` (the next); every MLP width but the dense one a
    multiple of ``channel_multiple`` (``step`` already is one)."""
    m = config.channel_multiple
    low = max(m, math.ceil(config.min_mlp * layout.channels / m) * m)
    attention = list(range(layout.units + 1))
    if not config.attention_drop or index == 0:
        attention = [a for a in attention if a]
    if center is None:
        mlp = {layout.channels - k * step for k in range(layout.channels // step + 1)}
        mlp = sorted({c - c % m for c in mlp} | {layout.channels})
        mlp = [c for c in mlp if c >= low]
        removable = config.layer_removal and 0 in attention
    else:
        units, channels = center
        attention = [a for a in attention if abs(a - units) <= 1]
        base = channels or low
        widths = {
            min(layout.channels, max(low, base + k * step))
            for k in range(-config.neighbourhood, config.neighbourhood + 1)
        }
        mlp = sorted({c if c == layout.channels else max(low, c - c % m) for c in widths})
        removable = config.layer_removal and 0 in attention and (channels == 0 or base == low)
    return Ladder(tuple(attention), tuple(([0] if removable else []) + mlp))


def search_widths(
    model: nn.Module,
    calibration: torch.Tensor,
    config: WidthSearchConfig,
    *,
    held_out: torch.Tensor | None = None,
    progress: bool = True,
    on_step: Callable[[SearchStep], None] | None = None,
    latency: DecodeLatencyModel | None = None,
) -> SearchResult:
    """Týr-the-Pruner's search (see the module docstring) on a causal LM: the local prunings are fitted on the
    ``(n, seqlen)`` ``calibration`` windows and genomes are scored on ``held_out`` windows (by default the last
    ``search_windows`` calibration windows, cut to ``search_seqlen``, are held apart). With ``decode_speedup``
    the decode time is constrained by ``latency`` (by default measured on this machine:
    :func:`~prunekit.structured.llm.decode_latency.fit_decode_latency`). ``model`` is not modified; the returned
    model is a new one."""
    if held_out is None:
        if calibration.shape[0] <= config.search_windows:
            raise StructuralPruningError(
                f"the width search holds {config.search_windows} of the calibration windows apart to score genomes "
                f"on, and needs some left to fit on: give more than {calibration.shape[0]} windows (--nsamples) or "
                "fewer search windows"
            )
        held_out = calibration[-config.search_windows :]
        calibration = calibration[: -config.search_windows]
    if config.search_seqlen is not None:
        held_out = held_out[:, : config.search_seqlen]
    started = time.perf_counter()
    rng = random.Random(config.seed)
    _, blocks = find_decoder_blocks(model)
    training = {module: module.training for module in model.modules()}
    dense_params = sum(p.numel() for p in model.parameters())
    kept_target = dense_params - round(config.ratio * dense_params)
    history: list[SearchStep] = []
    evaluations = 0
    best: Genome | None = None
    best_kl = math.inf
    uniform_kl: float | None = None
    supernet: Supernet | None = None
    max_seconds = math.inf
    try:
        model.eval()
        reference = ReferenceOutputs(model, held_out, batch_size=config.batch_size)
        for iteration in range(config.iterations):
            supernet = None  # the last iteration's supernet goes before the next is built (memory)
            ladders = []
            steps = []
            layouts = [layer_layout(block, i) for i, block in enumerate(blocks)]
            for i, layout in enumerate(layouts):
                m = config.channel_multiple
                step = max(m, round(layout.channels * config.first_step / 2**iteration / m) * m)
                steps.append(step)
                ladders.append(_ladder(layout, i, config, step, None if best is None else best[i]))
            supernet = build_supernet(
                model,
                calibration,
                ladders,
                batch_size=config.batch_size,
                dampening=config.dampening,
                cache_bytes=config.cache_bytes,
                progress=progress,
            )
            if config.decode_speedup is not None and max_seconds == math.inf:
                if latency is None and config.decode_latency is not None:
                    latency = DecodeLatencyModel(config.decode_latency)
                latency = latency or fit_decode_latency(supernet)
                max_seconds = latency.seconds(tuple(layout.dense for layout in layouts)) / config.decode_speedup
            space = SearchSpace(
                tuple(layouts),
                tuple(ladders),
                tuple(steps),
                supernet.fixed_params,
                kept_target,
                latency=latency if config.decode_speedup is not None else None,
                max_seconds=max_seconds,
                multiple=config.channel_multiple,
            )
            evaluate = _Scorer(supernet, reference, evaluations)

            seeds: list[Genome] = []
            if best is None:
                uniform = space.uniform()
                if uniform is None:
                    raise StructuralPruningError(
                        f"removing {config.ratio:.0%} of the parameters needs more than the MLPs can give at "
                        f"min_mlp={config.min_mlp} with every attention kept (the search starts from there): lower "
                        "the ratio or min_mlp"
                    )
                uniform_kl = evaluate(uniform)  # the baseline, reported even where it decodes too slowly
                start = uniform if space.meets_target(uniform) else None
                for _ in range(100):
                    if start is not None:
                        break
                    start = space.repair(uniform, rng)
                if start is None:
                    raise StructuralPruningError(
                        f"no genome keeps {1 - config.ratio:.0%} of the parameters and decodes "
                        f"{config.decode_speedup}x faster by the measured latency model: lower decode_speedup or "
                        "raise the ratio"
                    )
                seeds.append(start)
            else:
                seeds.append(best)
            for _ in range(config.population * 50):
                if len(seeds) >= config.population:
                    break
                child: Genome | None = seeds[0]
                for _ in range(rng.randint(1, config.max_moves)):
                    child = space.mutate(child, rng)
                child = space.repair(child, rng)
                if child is not None and child not in seeds:
                    seeds.append(child)
            population = sorted(seeds, key=lambda g: (evaluate(g), g))
            bar = tqdm(
                range(config.generations), desc=f"search {iteration + 1}/{config.iterations}", disable=not progress
            )
            for generation in bar:
                children: list[Genome] = []
                for _ in range(config.offspring * 20):
                    if len(children) >= config.offspring:
                        break
                    parent = min(rng.sample(population, min(2, len(population))), key=evaluate)
                    if rng.random() < config.crossover and len(population) > 1:
                        other = min(rng.sample(population, min(2, len(population))), key=evaluate)
                        parent = space.crossover(parent, other, rng)
                    candidate: Genome | None = parent
                    for _ in range(rng.randint(1, config.max_moves)):
                        candidate = space.mutate(candidate, rng)
                    candidate = space.repair(candidate, rng)
                    if candidate is not None and candidate not in evaluate.fitness and candidate not in children:
                        children.append(candidate)
                for child in children:
                    evaluate(child)
                population = sorted(set(population) | set(children), key=lambda g: (evaluate(g), g))[
                    : config.population
                ]
                step_record = SearchStep(
                    iteration, generation, evaluate(population[0]), time.perf_counter() - started, evaluate.total
                )
                history.append(step_record)
                bar.set_postfix(kl=f"{step_record.best_kl:.4f}")
                if on_step is not None:
                    on_step(step_record)
            best = population[0]
            best_kl = evaluate(best)
            evaluations = evaluate.total
            log.info("search: iteration %d, best KL %.5f after %d evaluations", iteration + 1, best_kl, evaluations)
            evaluate.supernet = None  # this iteration's supernet goes before the next is built (memory)
        assert supernet is not None and best is not None
        dense = tuple(layout.dense for layout in supernet.layouts)
        pruned = supernet.materialise(best)
        # the chosen widths refitted once more with their own errors propagated (not the ladder's expectation)
        exact = prune_to_widths(
            model, calibration, best, batch_size=config.batch_size, dampening=config.dampening, progress=progress
        )
        exact_kl = reference.kl(exact)
        log.info("search: the chosen widths refitted on their own errors: KL %.5f (search's %.5f)", exact_kl, best_kl)
        if exact_kl < best_kl:
            pruned, best_kl = exact, exact_kl
        refit_kl = exact_kl
        params = sum(p.numel() for p in pruned.parameters())
        if params != supernet.params(best):
            raise StructuralPruningError(
                f"the searched model holds {params} parameters, the search counted {supernet.params(best)}"
            )
    finally:
        for module, mode in training.items():
            module.training = mode
    return SearchResult(
        model=pruned,
        genome=best,
        kl=best_kl,
        uniform_kl=uniform_kl,
        refit_kl=refit_kl,
        decode_speedup=None if space.latency is None else space.latency.seconds(dense) / space.latency.seconds(best),
        latency_fit_error=None if space.latency is None else space.latency.error,
        decode_latency=None if space.latency is None else space.latency.coefficients,
        params=params,
        dense_params=dense_params,
        layouts=supernet.layouts,
        history=history,
        seconds=time.perf_counter() - started,
        evaluations=evaluations,
    )
