"""Print the one-shot benchmark result JSON as the Markdown table used in BENCHMARKS.md.

python bench/summarize.py bench/results/oneshot_smollm2.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def per_round(row: dict) -> str:
    """`` (0.45, 0.48)``: the ratio of each timing round, when there was more than one."""
    rounds = row.get("time_ratio_per_round", [])
    return f" ({', '.join(f'{r:.2f}' for r in rounds)})" if len(rounds) > 1 else ""


def peer_method(name: str, row: dict) -> str:
    """`` (sparsegpt)``: the peer's method, when it is not the prunekit run's own."""
    method = row.get("llmcompressor_method")
    return f" ({method})" if method and not name.startswith(method + " ") else ""


def main() -> int:
    result = json.loads(Path(sys.argv[1]).read_text())
    print("| tool | method | pattern | statistics | perplexity | prune s | peak RSS GiB | sparsity |")
    print("|---|---|---|---|---|---|---|---|")
    for run in result["runs"]:
        prune = run.get("prune_seconds")
        rss = run.get("peak_rss_gib")
        sparsity = run.get("sparsity")
        print(
            f"| {run['tool']} | {run['method']} | {run['pattern']} | {run.get('label', run.get('propagation', '-'))} | "
            f"{run['perplexity']:.3f} | {'-' if prune is None else f'{prune:.1f}'} | "
            f"{'-' if rss is None else f'{rss:.2f}'} | {'-' if sparsity is None else f'{sparsity:.4f}'} |"
        )
    print()
    print(
        "| prunekit run | ppl prunekit | ppl llm-compressor | time ratio | peak RSS GiB (prunekit / llm-compressor) |"
    )
    print("|---|---|---|---|---|")
    for name, row in result["summary"].items():
        print(
            f"| {name} | {row['ppl_prunekit']:.3f} | {row['ppl_llmcompressor']:.3f}{peer_method(name, row)} | "
            f"{row['time_ratio_prunekit_over_llmcompressor']:.2f}{per_round(row)} | "
            f"{row['peak_rss_gib_prunekit']:.2f} / {row['peak_rss_gib_llmcompressor']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
