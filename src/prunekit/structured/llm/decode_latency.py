"""A measured model of batch-1 decoding time against per-layer widths: the width search's latency constraint.

One decoding step at batch 1 runs small matrix-vector products and, per layer, a fixed set of calls (norms,
rotary embedding, the attention with its KV cache, the MLP) whose cost does not shrink with the width. The
time per generated token is fitted, by least squares over measurements of the model itself at a few genomes
on this machine (:func:`~prunekit.eval.speed.measure_decode`: greedy decoding after a 128-token prompt), to

    t(genome) = t0 + c_attention x (attentions kept) + c_unit x (attention units kept)
                   + c_mlp x (MLPs kept) + c_channel x (MLP channels kept)

(the per-step cost outside the layers, then what each attention call, each attention unit, each MLP call and
each MLP channel adds). Every decoder layer of the models the search handles has the same shapes, so the
five coefficients describe them all. The fit's relative error on its own measurements is kept
(:attr:`DecodeLatencyModel.error`), and a search that uses the model reports the predicted speed-up beside the
one measured on the result.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunekit.core.errors import StructuralPruningError
from prunekit.eval.speed import measure_decode
from prunekit.structured.llm.layer_widths import Genome
from prunekit.structured.llm.supernet import Supernet

log = logging.getLogger(__name__)


def decode_features(genome: Genome) -> tuple[float, float, float, float, float]:
    """``(1, attentions kept, attention units kept, MLPs kept, MLP channels kept)`` of ``genome``."""
    return (
        1.0,
        float(sum(1 for units, _ in genome if units)),
        float(sum(units for units, _ in genome)),
        float(sum(1 for _, channels in genome if channels)),
        float(sum(channels for _, channels in genome)),
    )


@dataclass(frozen=True)
class DecodeLatencyModel:
    """Seconds per generated token (batch 1) as a linear function of :func:`decode_features`."""

    coefficients: tuple[float, float, float, float, float]
    #: the largest relative error of the fit on the genomes it was measured at (``None``: given, not fitted)
    error: float | None = None

    def seconds(self, genome: Genome) -> float:
        return sum(c * f for c, f in zip(self.coefficients, decode_features(genome), strict=True))


def design_genomes(supernet: Supernet) -> list[Genome]:
    """The genomes the decode time is measured at: dense, every MLP at half and at a quarter, every attention at
    one unit, the attention of every other layer dropped, every other layer removed, and a mix, so that each of
    the five features varies apart from the others."""
    layouts = supernet.layouts
    dense = tuple(layout.dense for layout in layouts)
    # the narrowest MLP each layer's local pruning reaches (its ladder's smallest kept width)
    low = [min(c for c in ladder.mlp if c) for ladder in supernet.ladders]

    def mlp(share: float) -> Genome:
        return tuple((u, max(low[i], round(c * share))) for i, (u, c) in enumerate(dense))

    odd = range(1, len(layouts), 2)
    genomes = [
        dense,
        mlp(0.5),
        mlp(0.25),
        tuple((1, c) for _, c in dense),
        tuple((0, c) if i in odd else (u, c) for i, (u, c) in enumerate(dense)),
        tuple((0, 0) if i in odd else (u, c) for i, (u, c) in enumerate(dense)),
        tuple((0, max(low[i], c // 2)) if i % 3 == 1 else (u, c) for i, (u, c) in enumerate(dense)),
    ]
    unique: list[Genome] = []
    for genome in genomes:
        if genome not in unique:
            unique.append(genome)
    return unique


def fit_decode_latency(
    supernet: Supernet,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    rounds: int = 3,
    genomes: Sequence[Genome] | None = None,
) -> DecodeLatencyModel:
    """Measure the seconds per generated token of the supernet's model at ``genomes`` (default:
    :func:`design_genomes`), ``rounds`` interleaved rounds and the median of each, and fit the linear model."""
    genomes = list(genomes or design_genomes(supernet))
    features = torch.tensor([decode_features(g) for g in genomes], dtype=torch.float64)
    if int(torch.linalg.matrix_rank(features)) < features.shape[1]:
        raise StructuralPruningError(
            f"the decode latency model needs genomes that vary its {features.shape[1]} features apart (a model of "
            f"{len(supernet.layouts)} layer(s) cannot): constrain the search by parameters alone"
        )
    times: dict[int, list[float]] = {i: [] for i in range(len(genomes))}
    for _ in range(rounds):
        for i, genome in enumerate(genomes):
            with supernet.applied(genome) as running:
                timing = measure_decode(running, 1, prompt_tokens, new_tokens, warmup=1, repeats=1)
            times[i].append(1.0 / timing.tokens_per_s)
    seconds = torch.tensor([statistics.median(times[i]) for i in range(len(genomes))], dtype=torch.float64)
    solution = torch.linalg.lstsq(features, seconds[:, None]).solution[:, 0]
    predicted = features @ solution
    error = float(((predicted - seconds).abs() / seconds).max())
    model = DecodeLatencyModel(tuple(float(c) for c in solution.tolist()), error)  # type: ignore[arg-type]
    log.info(
        "decode latency model: %.3g s + %.3g s/attention + %.3g s/unit + %.3g s/MLP + %.3g s/channel (fit within %.1f%%)",
        *model.coefficients,
        100 * error,
    )
    return model
