"""Benchmark: one-shot pruning of SmolLM2-135M-Instruct, prunekit beside llm-compressor, same run.

Setting (issue 3): the bundled SmolLM2-135M-Instruct de-quantized to float32; calibration 32 windows x 512
tokens drawn with seed 0 from ``wikitext2_valid.txt``; perplexity on the first 40 windows x 2048 tokens of
``wikitext2_test.txt``; this machine's CPU. Each pruning run is its own process, so its peak RSS (from
``wait4``) covers loading, calibration, pruning and saving. Prune time is the pruning phase alone for both
tools (prunekit: ``prune()``; llm-compressor: the ``oneshot`` call). Every checkpoint, both tools', is then
scored by the same perplexity code.

    python bench/bench_oneshot.py --peer-python .venv-peer/bin/python --time-rounds 2      # Wanda, ~65 min
    python bench/bench_oneshot.py --peer-python .venv-peer/bin/python --suite sparsegpt-defaults --time-rounds 3
    python bench/bench_oneshot.py --peer-python .venv-peer/bin/python --suite sparsegpt --time-rounds 2  # + variants

Each pattern's prunekit runs are followed directly by the peer's, and ``--time-rounds N`` repeats every
timed run N times in that order; times are then medians, and the time ratio is the median of the ratios
taken within each round (the machine's speed drifts over minutes, so runs far apart are not compared).

Writes ``bench/results/oneshot_smollm2.json`` (Wanda suite), ``sparsegpt_smollm2.json`` (SparseGPT with
prunekit's defaults) or ``sparsegpt_smollm2_variants.json`` (also without the refit, and Wanda with it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import prunekit
from prunekit.core.measure import versions
from prunekit.eval.perplexity import perplexity
from prunekit.io.loading import prepare_bundled_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_oneshot")

# Per suite: prunekit's (method, pattern, propagation, refit steps) runs and llm-compressor's (method,
# pattern) runs. "sequential" is prunekit's one-pass engine; "block" reproduces the dense-within-block
# statistics of the Wanda reference code and llm-compressor (two passes per block). Refit steps ``None``
# are prunekit's default (4 for SparseGPT, 0 otherwise); 0 is the paper's SparseGPT.
SUITES = {
    "wanda": (
        [
            ("magnitude", "unstructured", "sequential", None),
            ("magnitude", "2:4", "sequential", None),
            ("wanda", "unstructured", "sequential", None),
            ("wanda", "2:4", "sequential", None),
            ("wanda", "unstructured", "block", None),
            ("wanda", "2:4", "block", None),
            ("wanda", "unstructured", "dense", None),
        ],
        [("wanda", "unstructured"), ("wanda", "2:4")],
    ),
    "sparsegpt-defaults": (
        [
            ("sparsegpt", "unstructured", "sequential", None),
            ("sparsegpt", "2:4", "sequential", None),
        ],
        [("sparsegpt", "unstructured"), ("sparsegpt", "2:4")],
    ),
    "sparsegpt": (
        [
            ("sparsegpt", "unstructured", "sequential", None),
            ("sparsegpt", "unstructured", "sequential", 0),
            ("wanda", "unstructured", "sequential", 4),
            ("sparsegpt", "2:4", "sequential", None),
            ("sparsegpt", "2:4", "sequential", 0),
            ("wanda", "2:4", "sequential", 4),
        ],
        [("sparsegpt", "unstructured"), ("sparsegpt", "2:4")],
    ),
}
RESULT_FILES = {
    "wanda": "oneshot_smollm2.json",
    "sparsegpt": "sparsegpt_smollm2_variants.json",
    "sparsegpt-defaults": "sparsegpt_smollm2.json",
}


def run_measured(cmd: list[str], log_file: Path) -> tuple[int, float, float]:
    """Run a command under ``peak_rss.py``; return (exit code, wall seconds, peak RSS in GiB of the command)."""
    measured = log_file.with_suffix(".rss.json")
    wrapper = [sys.executable, str(ROOT / "bench" / "peak_rss.py"), str(measured), "--", *cmd]
    with log_file.open("w") as out:
        code = subprocess.run(wrapper, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
    stats = json.loads(measured.read_text())
    return code, stats["wall_s"], stats["peak_rss_bytes"] / 2**30


def pattern_flags(pattern: str) -> list[str]:
    return ["--sparsity", "0.5"] if pattern == "unstructured" else ["--pattern", pattern]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default=None, help="python of the llm-compressor venv (skip peer if absent)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"), help="scratch directory for checkpoints")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--suite", choices=sorted(SUITES), default="wanda", help="which methods to compare")
    parser.add_argument("--skip-dense", action="store_true", help="do not re-evaluate the dense model")
    parser.add_argument(
        "--time-rounds", type=int, default=1, help="repeat every timed run this many times, interleaved (median)"
    )
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/<suite file>)")
    args = parser.parse_args()
    prunekit_runs, peer_runs = SUITES[args.suite]
    out_file = Path(args.out or ROOT / "bench" / "results" / RESULT_FILES[args.suite])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    valid, test = DATA / "wikitext2_valid.txt", DATA / "wikitext2_test.txt"

    model_dir = prepare_bundled_model()
    dense = prunekit.load_model(str(model_dir))
    calib = prunekit.calibration_windows(dense.tokenizer, valid, args.nsamples, args.seqlen, seed=0)
    calib_file = work / "calib.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_file))
    del dense

    peer_python = args.peer_python if args.peer_python and Path(args.peer_python).exists() else None
    if peer_python is None:
        log.warning("no --peer-python: llm-compressor is not compared")
    jobs = []  # (record, command, log name), each pattern's prunekit runs followed by the peer's
    for pattern in ("unstructured", "2:4"):
        for method, run_pattern, propagation, refit in prunekit_runs:
            if run_pattern != pattern:
                continue
            label = propagation if refit is None else f"{propagation}-refit{refit}"
            name = f"prunekit-{method}-{pattern.replace(':', 'of')}-{label}"
            out = work / name
            cmd = [
                sys.executable, "-m", "prunekit.cli", "-q", "prune", str(model_dir), "--method", method,
                *pattern_flags(pattern), "--calib", str(valid), "--nsamples", str(args.nsamples),
                "--seqlen", str(args.seqlen), "--seed", "0", "--device", "cpu", "--propagation", propagation,
                *([] if refit is None else ["--refit-steps", str(refit)]), "--out", str(out), "--overwrite",
            ]  # fmt: skip
            record = {"tool": "prunekit", "method": method, "pattern": pattern, "propagation": propagation,
                      "label": label, "dir": str(out), "command": " ".join(cmd)}  # fmt: skip
            jobs.append((record, cmd, name))
        for method, run_pattern in peer_runs if peer_python else []:
            if run_pattern != pattern:
                continue
            name = f"llmcompressor-{method}-{pattern.replace(':', 'of')}"
            out = work / name
            cmd = [
                peer_python, str(ROOT / "bench" / "peer_llmcompressor.py"), "--model", str(model_dir),
                "--calib-ids", str(calib_file), "--method", method, *pattern_flags(pattern),
                "--out", str(out), "--result", str(work / f"{name}.json"),
            ]  # fmt: skip
            jobs.append(({"tool": "llm-compressor", "method": method, "pattern": pattern, "dir": str(out),
                          "command": " ".join(cmd)}, cmd, name))  # fmt: skip

    # The machine's speed drifts (by up to 1.5x within minutes), so the timed runs are repeated in rounds:
    # every round runs each pattern's prunekit runs and then the peer's, and the time ratios are taken
    # within a round, between runs minutes apart.
    for round_index in range(args.time_rounds):
        for record, cmd, name in jobs:
            code, wall, rss = run_measured(cmd, work / f"{name}.log")
            if code != 0:
                raise SystemExit(f"{name} failed; see {work / (name + '.log')}")
            if record["tool"] == "prunekit":
                report = json.loads((Path(record["dir"]) / "prunekit-report" / "report.json").read_text())
                seconds, sparsity = report["summary"]["prune_seconds"], report["summary"]["overall_sparsity"]
            else:
                peer = json.loads((work / f"{name}.json").read_text())
                seconds, sparsity = peer["prune_seconds"], peer.get("measured_sparsity_of_targets")
                record["version"] = peer.get("version")
            record.setdefault("prune_seconds_per_round", []).append(seconds)
            record.setdefault("process_wall_s_per_round", []).append(wall)
            record["peak_rss_gib"] = max(rss, record.get("peak_rss_gib", 0.0))
            record["sparsity"] = sparsity
            log.info("round %d, %s: prune %.1f s, peak RSS %.2f GiB", round_index + 1, name, seconds, rss)
    runs = [record for record, _, _ in jobs]
    for record in runs:
        record["prune_seconds"] = statistics.median(record["prune_seconds_per_round"])
        record["process_wall_s"] = statistics.median(record["process_wall_s_per_round"])

    dense_run = [] if args.skip_dense else [{"tool": "dense", "method": "dense", "pattern": "-", "dir": str(model_dir)}]
    evaluated = [*dense_run, *runs]
    # ~105 s per checkpoint here
    for run in evaluated:
        loaded = prunekit.load_model(run["dir"])
        ppl = perplexity(loaded.model, loaded.tokenizer, test, args.ppl_seqlen, args.ppl_windows, progress=False)
        run["perplexity"] = ppl.perplexity
        run["ppl_windows"], run["ppl_seqlen"] = ppl.windows, ppl.seqlen
        log.info("%s: perplexity %.3f", Path(run["dir"]).name, ppl.perplexity)
        del loaded

    summary = {}
    for pattern in ("unstructured", "2:4"):
        peer = next((r for r in runs if r["tool"] == "llm-compressor" and r["pattern"] == pattern), None)
        for ours in runs:
            if peer and ours["tool"] == "prunekit" and ours["pattern"] == pattern:
                paired = [
                    a / b for a, b in zip(ours["prune_seconds_per_round"], peer["prune_seconds_per_round"], strict=True)
                ]
                summary[f"{ours['method']} {pattern} {ours['label']}"] = {
                    "ppl_prunekit": ours["perplexity"],
                    "ppl_llmcompressor": peer["perplexity"],
                    "llmcompressor_method": peer["method"],
                    "time_ratio_prunekit_over_llmcompressor": statistics.median(paired),
                    "time_ratio_per_round": paired,
                    "peak_rss_gib_prunekit": ours["peak_rss_gib"],
                    "peak_rss_gib_llmcompressor": peer["peak_rss_gib"],
                }
    result = {
        "benchmark": "one-shot pruning, SmolLM2-135M-Instruct float32",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "calibration": {"file": valid.name, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "evaluation": {"file": test.name, "windows": args.ppl_windows, "seqlen": args.ppl_seqlen},
        "runs": evaluated,
        "summary": summary,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", out_file)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
