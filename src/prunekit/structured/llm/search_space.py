"""The genomes one iteration of the width search may visit, and the operations on them (Týr-the-Pruner's
evolutionary search, Li et al. 2025, Sec. 3.3): the parameter budget met to one MLP channel, the optional
decode-time bound, repair, mutation, crossover and the uniform starting point. Pure functions of a genome and a
``random.Random``; nothing here runs a model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from prunekit.structured.llm.decode_latency import DecodeLatencyModel
from prunekit.structured.llm.layer_widths import Genome, Ladder, LayerChoice, LayerLayout


@dataclass(frozen=True)
class SearchSpace:
    """The genomes one iteration may visit and the parameter budget they must meet: per layer the attention
    widths and the MLP range ``[low, high]`` (with ``0`` where the layer may go whole), the MLP step of a
    mutation, the parameters outside the decoder layers and the most the model may keep."""

    layouts: tuple[LayerLayout, ...]
    ladders: tuple[Ladder, ...]
    step: tuple[int, ...]
    fixed_params: int
    kept_target: int
    #: with a decode-speed constraint: the measured latency model and the most seconds per token allowed
    latency: DecodeLatencyModel | None = None
    max_seconds: float = math.inf
    #: MLP widths other than the dense one are multiples of this (the budget is met to within one multiple)
    multiple: int = 1

    def _down(self, channels: int) -> int:
        """``channels`` rounded down to a multiple of :attr:`multiple`."""
        return channels - channels % self.multiple

    def low(self, layer: int) -> int:
        return min(c for c in self.ladders[layer].mlp if c)

    def high(self, layer: int) -> int:
        return max(self.ladders[layer].mlp)

    def params(self, genome: Genome) -> int:
        return self.fixed_params + sum(layout.params(c) for layout, c in zip(self.layouts, genome, strict=True))

    def legal(self, layer: int, choice: LayerChoice) -> bool:
        units, channels = choice
        ladder = self.ladders[layer]
        if units not in ladder.attention:
            return False
        if channels == 0:
            return units == 0 and 0 in ladder.mlp
        return self.low(layer) <= channels <= self.high(layer)

    def fast_enough(self, genome: Genome) -> bool:
        """Decodes within :attr:`max_seconds` per token by the latency model (always, without one)."""
        return self.latency is None or self.latency.seconds(genome) <= self.max_seconds

    def within_budget(self, genome: Genome) -> bool:
        """Keeps at most the parameter target, and less than one MLP channel's parameters under it (one
        :attr:`multiple` of channels)."""
        kept = self.params(genome)
        slack = max(layout.channel_params for layout in self.layouts) * self.multiple
        return kept <= self.kept_target and self.kept_target - kept < slack

    def meets_target(self, genome: Genome) -> bool:
        """:meth:`within_budget` and :meth:`fast_enough`."""
        return self.within_budget(genome) and self.fast_enough(genome)

    def repair(self, genome: Genome, rng: random.Random) -> Genome | None:
        """``genome`` brought to the budget (:meth:`_repair_params`); where it decodes too slowly, the
        attention of random layers dropped (the fixed per-layer cost that narrowing cannot remove) and the
        parameters freed given back to the MLPs, until it is fast enough; ``None`` where that fails."""
        repaired = self._repair_params(genome, rng)
        for _ in range(len(genome)):
            if repaired is None or self.fast_enough(repaired):
                break
            layers = [i for i, (u, _) in enumerate(repaired) if u and self.legal(i, (0, repaired[i][1]))]
            if not layers:
                return None
            i = rng.choice(layers)
            repaired = self._repair_params((*repaired[:i], (0, repaired[i][1]), *repaired[i + 1 :]), rng)
        return repaired if repaired is not None and self.meets_target(repaired) else None

    def _repair_params(self, genome: Genome, rng: random.Random) -> Genome | None:
        """``genome`` with MLP channels taken from (or given back to) random layers, at most one ladder step at
        a time (in steps of :attr:`multiple`), until it keeps the parameter target; ``None`` where the MLP ranges
        cannot absorb the difference."""
        choices = list(genome)
        excess = self.params(genome) - self.kept_target
        while excess > 0:
            layers = [i for i, (_, c) in enumerate(choices) if c > self.low(i)]
            if not layers:
                return None
            i = rng.choice(layers)
            units, channels = choices[i]
            per = self.layouts[i].channel_params
            need = min(self.step[i], math.ceil(excess / per))
            narrower = max(self.low(i), self._down(channels - need))
            choices[i] = (units, narrower)
            excess -= (channels - narrower) * per
        while True:
            layers = [
                i
                for i, (_, c) in enumerate(choices)
                if 0 < c < self.high(i) and -excess >= self.layouts[i].channel_params * self.multiple
            ]
            if not layers:
                break
            i = rng.choice(layers)
            units, channels = choices[i]
            per = self.layouts[i].channel_params
            give = min(self.step[i], -excess // per)
            wider = self.high(i) if channels + give >= self.high(i) else self._down(channels + give)
            if wider <= channels:  # a step shorter than a multiple: nothing to give
                break
            choices[i] = (units, wider)
            excess += (wider - channels) * per
        return tuple(choices) if self.within_budget(tuple(choices)) else None

    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        """One move on one random layer (the budget is not repaired here): the MLP a step narrower or wider,
        the attention a unit more or less (or none), or the layer removed or restored."""
        for _ in range(100):
            i = rng.randrange(len(genome))
            units, channels = genome[i]
            ladder = self.ladders[i]
            move = rng.random()
            if move < 0.6 and channels:
                proposal = (units, channels + rng.choice((-1, 1)) * self.step[i])
                if channels + self.step[i] > self.high(i) and proposal[1] > channels:
                    proposal = (units, self.high(i))
                if proposal[1] < self.low(i) < channels:
                    proposal = (units, self.low(i))
                if proposal[1] != self.high(i):
                    proposal = (units, max(self.low(i), self._down(proposal[1])))
            elif move < 0.9:
                position = ladder.attention.index(units)
                neighbours = [
                    ladder.attention[p] for p in (position - 1, position + 1) if 0 <= p < len(ladder.attention)
                ]
                if not neighbours:
                    continue
                new_units = rng.choice(neighbours)
                proposal = (new_units, channels or (self.low(i) if new_units else 0))
            else:  # the layer removed, or restored with its full attention and the narrowest MLP
                proposal = (max(ladder.attention), self.low(i)) if channels == 0 else (0, 0)
            if proposal != (units, channels) and self.legal(i, proposal):
                return (*genome[:i], proposal, *genome[i + 1 :])
        return genome

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        """Each layer's choice from ``a`` or ``b`` at random (uniform crossover; the budget is not repaired)."""
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True))

    def uniform(self, attention: tuple[int, ...] | None = None) -> Genome | None:
        """The genome that keeps every layer's attention (or ``attention``) and takes the same share of every
        MLP, to the target (the uniform baseline); ``None`` where the MLPs alone cannot meet it."""
        units = attention or tuple(layout.units for layout in self.layouts)
        dense = tuple((u, layout.channels) for u, layout in zip(units, self.layouts, strict=True))
        excess = self.params(dense) - self.kept_target
        total = sum(layout.channels * layout.channel_params for layout in self.layouts)
        share = max(0.0, excess / total)
        genome = tuple(
            (u, max(self.low(i), min(self.high(i), self._down(round(layout.channels * (1 - share))))))
            for i, (u, layout) in enumerate(zip(units, self.layouts, strict=True))
        )
        return self.settle(genome)

    def settle(self, genome: Genome) -> Genome | None:
        """``genome`` brought to the parameter budget one MLP channel (one :attr:`multiple`) at a time, on the
        layers in turn (no randomness: for genomes a channel or so per layer off, like rounded shares); ``None``
        where the MLP ranges cannot absorb the difference."""
        choices = list(genome)
        excess = self.params(genome) - self.kept_target
        m = self.multiple
        start = 0
        while True:
            turn = [(start + k) % len(choices) for k in range(len(choices))]
            if excess > 0:
                layers = [j for j in turn if self._down(choices[j][1] - 1) >= self.low(j)]
            else:
                layers = [
                    j
                    for j in turn
                    if choices[j][1] + m <= self.high(j) and -excess >= self.layouts[j].channel_params * m
                ]
            if not layers:
                break
            i = layers[0]
            u, c = choices[i]
            new = self._down(c - 1) if excess > 0 else c + m
            choices[i] = (u, new)
            excess += (new - c) * self.layouts[i].channel_params
            start = i + 1
        result = tuple(choices)
        return result if self.within_budget(result) else None
