"""Benchmark: does a pruned SmolLM2-135M-Instruct run faster on this CPU? (It should not, and here is proof.)

Setting: the bundled SmolLM2-135M-Instruct de-quantized to float32; the same model pruned to 50% by
magnitude, unstructured (per row) and 2:4. Magnitude pruning is used because speed depends only on the
weights' sparsity pattern and storage, not on which weights were chosen: Wanda or SparseGPT at the same
pattern give the same shapes and the same dense matmuls. Each model is measured with
:func:`prunekit.eval.speed.measure_speed`: prefill of one 1 x 512-token prompt, and greedy decoding of 64 tokens
after it with the KV cache; median of 7 timed runs per phase. The machine is shared, and other processes on
its 2 cores slow decoding (many small ops) far more than prefill, so the models are measured in
interleaved rounds (one untimed warm-up round, then each round times every model once, in an order that
rotates): a burst of load then hits every model alike and the medians stay comparable. The load average
before and after is recorded.

    python bench/bench_speed.py        # ~3 min on 2 CPU cores

Writes ``bench/results/speed_smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

import prunekit
from prunekit.core.measure import versions
from prunekit.eval.speed import SpeedResult, compare_results, measure_speed, phase_timing

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_speed")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary_row(result: SpeedResult) -> dict[str, float]:
    return {
        "prefill_tokens_per_s": round(result.prefill.tokens_per_s, 1),
        "prefill_spread": round(result.prefill.spread, 3),
        "decode_tokens_per_s": round(result.decode.tokens_per_s, 2),
        "decode_spread": round(result.decode.spread, 3),
        "nonzero_parameters": result.size.nonzero_parameters,
        "target_sparsity": round(result.size.target_sparsity, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; each times every model once")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed_smollm2.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = {
        "batch_size": args.batch_size,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    loaded = prunekit.load_model(dtype="float32", device="cpu")
    dense_model = loaded.model
    pruned_models = {}
    for label, config in (
        ("magnitude-50-unstructured", prunekit.PruneConfig(method="magnitude", sparsity=0.5)),
        ("magnitude-2of4", prunekit.PruneConfig(method="magnitude", pattern="2:4")),
    ):
        pruned_models[label] = prunekit.prune(dense_model, config, progress=False).model

    models = {"dense": dense_model, **pruned_models}
    runs: dict[str, list[SpeedResult]] = {label: [] for label in models}
    labels = list(models)
    for round_index in range(args.rounds + 1):  # round 0 is the warm-up round, not kept
        order = labels[round_index % len(labels) :] + labels[: round_index % len(labels)]
        log.info("round %d of %d (%s)", round_index, args.rounds, "warm-up" if round_index == 0 else "timed")
        for label in order:
            result = measure_speed(models[label], **settings, warmup=0, repeats=1)
            if round_index > 0:
                runs[label].append(result)

    def pooled(results: list[SpeedResult]) -> SpeedResult:
        prefill = phase_timing([r.prefill.seconds[0] for r in results], results[0].prefill.tokens, 1)
        decode = phase_timing([r.decode.seconds[0] for r in results], results[0].decode.tokens, 1)
        return replace(results[0], prefill=prefill, decode=decode)

    measured = {label: pooled(results) for label, results in runs.items()}
    dense = measured["dense"]
    ratios = {}
    for label in pruned_models:
        cmp = compare_results(dense, measured[label])
        ratios[label] = {
            "prefill_speedup": round(cmp.prefill_speedup, 3),
            "decode_speedup": round(cmp.decode_speedup, 3),
            "nonzero_ratio": round(cmp.nonzero_ratio, 4),
        }
    result = {
        "setting": {
            "model": loaded.source,
            "dtype": "float32",
            "device": "cpu",
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            **settings,
            "timed_rounds": args.rounds,
            "warmup_rounds": 1,
            "pruning": (
                "magnitude, no calibration: speed depends on the sparsity pattern and storage, not on which "
                "weights a method keeps, so Wanda/SparseGPT checkpoints of the same pattern run alike"
            ),
            "prefill": "one forward over batch_size x prompt_tokens, KV cache built, logits of the last token",
            "decode": "new_tokens one-token greedy steps with the KV cache after the prompt; only the steps timed",
        },
        "note": dense.note,
        "summary": {label: summary_row(r) for label, r in measured.items()},
        "ratios_vs_dense": ratios,
        "results": {label: r.to_dict() for label, r in measured.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "versions": versions(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("summary", "ratios_vs_dense", "wall_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
