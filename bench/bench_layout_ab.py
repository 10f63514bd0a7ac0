"""Benchmark: does a refactor change one-shot pruning? Two source trees of prunekit, the same run, alternated.

Prunes the bundled SmolLM2-135M-Instruct (float32) with each source tree in turn, in the setting of
``bench_oneshot.py`` (calibration 32 windows x 512 tokens drawn with seed 0 from ``wikitext2_valid.txt``; CPU),
for Wanda and SparseGPT at 50% and 2:4 (their defaults: SparseGPT refits 4 steps). Each run is its own process
(``python -m prunekit.cli prune`` with ``PYTHONPATH`` pointing at the tree). ``--rounds N`` repeats every run N
times, alternating which tree goes first, and prune time (the report's ``prune_seconds``) is compared within
each round. Every checkpoint of the first round is then scored by one perplexity code (the current tree's,
first 40 windows x 2048 tokens of ``wikitext2_test.txt``) and the weights of the two trees' checkpoints are
compared bit for bit.

    git worktree add /tmp/old <commit>
    .venv/bin/python bench/bench_layout_ab.py --old /tmp/old/src --new src --rounds 2 --out bench/results/layout_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from prunekit.core.measure import versions
from prunekit.eval.perplexity import perplexity
from prunekit.io.loading import load_model, prepare_bundled_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RUNS = [("wanda", "0.5"), ("wanda", "2:4"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4")]


def prune_command(model: Path, method: str, target: str, out: Path) -> list[str]:
    amount = ["--pattern", target] if ":" in target else ["--sparsity", target]
    return [
        sys.executable, "-m", "prunekit.cli", "-q", "prune", str(model), "--method", method, *amount,
        "--calib", str(DATA / "wikitext2_valid.txt"), "--nsamples", "32", "--seqlen", "512", "--seed", "0",
        "--device", "cpu", "--out", str(out), "--overwrite",
    ]  # fmt: skip


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the old tree's src/ folder")
    parser.add_argument("--new", type=Path, default=ROOT / "src", help="the new tree's src/ folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "layout_ab")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "layout_ab.json")
    args = parser.parse_args()
    model = prepare_bundled_model()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    records: dict[str, dict[str, dict]] = {}
    for method, target in RUNS:
        key = f"{method}-{target}"
        records[key] = {name: {"prune_seconds_per_round": []} for name in trees}
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in order:
                out = args.work / f"{key}-{name}-r{round_index}"
                env = {**os.environ, "PYTHONPATH": str(trees[name])}
                started = time.perf_counter()
                subprocess.run(prune_command(model, method, target, out), env=env, check=True)
                wall = time.perf_counter() - started
                report = json.loads((out / "prunekit-report" / "report.json").read_text())
                record = records[key][name]
                record["prune_seconds_per_round"].append(report["summary"]["prune_seconds"])
                record.setdefault("process_wall_s_per_round", []).append(wall)
                record["sparsity"] = report["summary"]["overall_sparsity"]
                print(
                    f"{key} {name} round {round_index}: prune {record['prune_seconds_per_round'][-1]:.1f} s", flush=True
                )
    test = DATA / "wikitext2_test.txt"
    for key, by_tree in records.items():
        dirs = {name: args.work / f"{key}-{name}-r0" for name in trees}
        for name, record in by_tree.items():
            loaded = load_model(str(dirs[name]), dtype="float32")
            record["perplexity"] = perplexity(
                loaded.model, loaded.tokenizer, test, 2048, args.ppl_windows, progress=False
            ).perplexity
            record["prune_seconds"] = statistics.median(record["prune_seconds_per_round"])
            print(f"{key} {name}: perplexity {record['perplexity']:.3f}", flush=True)
        ratios = [
            n / o
            for n, o in zip(
                by_tree["new"]["prune_seconds_per_round"], by_tree["old"]["prune_seconds_per_round"], strict=True
            )
        ]
        by_tree["time_ratio_new_over_old_per_round"] = ratios
        by_tree["identical_weights"] = same_weights(dirs["old"], dirs["new"])
    result = {
        "benchmark": "layout refactor A/B: one-shot pruning of SmolLM2-135M-Instruct float32, two source trees",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "trees": {name: str(path) for name, path in trees.items()},
        "calibration": {"file": "wikitext2_valid.txt", "nsamples": 32, "seqlen": 512, "seed": 0},
        "evaluation": {"file": "wikitext2_test.txt", "windows": args.ppl_windows, "seqlen": 2048},
        "runs": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
