"""Speed of a (pruned) model where it runs: prefill and decode timings (:mod:`.decode`), size on disk and in
memory, 2:4 semi-structured kernels (:mod:`.semi_structured`), and the dense/pruned comparison behind
``prunekit bench-speed`` (:mod:`.measure`)."""

from prunekit.eval.speed.decode import greedy_decode, measure_decode, measure_prefill, random_prompt
from prunekit.eval.speed.measure import (
    SizeStats,
    SpeedComparison,
    SpeedResult,
    check_speed_args,
    compare_results,
    compare_speed,
    measure_speed,
    size_stats,
)
from prunekit.eval.speed.semi_structured import SemiStructuredResult, semi_structured_plan, semi_structured_unsupported
from prunekit.eval.speed.timing import PhaseTiming, phase_timing, seconds_per_call

__all__ = [
    "PhaseTiming",
    "SemiStructuredResult",
    "SizeStats",
    "SpeedComparison",
    "SpeedResult",
    "check_speed_args",
    "compare_results",
    "compare_speed",
    "greedy_decode",
    "measure_decode",
    "measure_prefill",
    "measure_speed",
    "phase_timing",
    "random_prompt",
    "seconds_per_call",
    "semi_structured_plan",
    "semi_structured_unsupported",
    "size_stats",
]
