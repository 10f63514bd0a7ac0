"""Timing: seconds per call with the device synchronised, and per-phase statistics over repeated runs."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.core.devices import synchronize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseTiming:
    """Timed repeats of one phase (prefill or decode) and the tokens/s they give."""

    tokens: int
    """Tokens per timed run: ``batch_size * prompt_tokens`` (prefill) or ``batch_size * new_tokens`` (decode)."""
    warmup: int
    repeats: int
    seconds: tuple[float, ...]
    median_s: float
    min_s: float
    max_s: float
    tokens_per_s: float
    """``tokens / median_s``."""
    spread: float
    """``(max_s - min_s) / median_s``: 0.05 means the timed runs lay within 5% of the median's size."""


def seconds_per_call(call: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Wall seconds per call over ``calls`` back-to-back calls of ``call``, ``device`` synchronised before
    and after (the timing loop that the structural report and the latency table share)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def phase_timing(seconds: list[float], tokens: int, warmup: int) -> PhaseTiming:
    """Summarise timed runs of ``tokens`` tokens each (median, min, max, spread, tokens/s); also for pooling
    runs taken in rounds, interleaved with other models, as ``bench/bench_speed.py`` does."""
    median = statistics.median(seconds)
    lo, hi = min(seconds), max(seconds)
    return PhaseTiming(
        tokens=tokens,
        warmup=warmup,
        repeats=len(seconds),
        seconds=tuple(seconds),
        median_s=median,
        min_s=lo,
        max_s=hi,
        tokens_per_s=tokens / median if median > 0 else float("inf"),
        spread=(hi - lo) / median if median > 0 else 0.0,
    )


def _repeat(run: Callable[[], float], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]
