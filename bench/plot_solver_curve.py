"""The one-shot solvers' quality against pruning time (issue 22): every run of ``bench_oneshot_solvers.py``'s
results as a point (perplexity against prune seconds), one panel per pattern, as one PNG. The knobs (iCBS
exchanges, ALPS iterations, reconstruction steps, OWL) show as the same method at several times.

    .venv/bin/python bench/plot_solver_curve.py bench/results/oneshot_solvers.json \
        --out bench/results/oneshot_solvers_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.reporting import new_figure, save_figure


def pattern_of(run: str) -> str:
    """``sparsegpt:2:4:owl`` -> ``2:4``; ``icbs:0.7`` -> ``0.7``; a recipe -> its file's stem."""
    if run.startswith("recipe "):
        return (
            Path(run.split(" ", 1)[1])
            .stem.removeprefix("best-")
            .replace("2of4", "2:4")
            .replace("50", "0.5")
            .replace("70", "0.7")
        )
    parts = run.split(":")
    return f"{parts[1]}:{parts[2]}" if len(parts) > 2 and parts[2].isdigit() else parts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "oneshot_solvers_curve.png"
    )
    args = parser.parse_args()
    runs = json.loads(args.results.read_text())["runs"]
    patterns = sorted({pattern_of(r["run"]) for r in runs})
    fig = new_figure(5 * len(patterns), 4)
    for i, pattern in enumerate(patterns):
        ax = fig.add_subplot(1, len(patterns), i + 1)
        for r in (r for r in runs if pattern_of(r["run"]) == pattern and r.get("prune_seconds")):
            if r["run"].startswith("recipe"):
                name = "recipe " + Path(r["run"].split(" ", 1)[1]).stem
            else:
                name = r["run"].replace(f":{pattern}", "").replace(":", " ")
            label = name if r["tool"] == "prunekit" else f"{r['tool']} {name}"
            marker = "x" if r["tool"] != "prunekit" else ("*" if r["run"].startswith("recipe") else "o")
            ax.scatter(r["prune_seconds"], r["perplexity"], marker=marker)
            ax.annotate(
                label.split(":", 1)[0] if ":" in label else label, (r["prune_seconds"], r["perplexity"]), fontsize=7
            )
        ax.set_xscale("log")
        ax.set_xlabel("prune time (s, 2 CPU cores, log)")
        ax.set_ylabel("perplexity (wikitext2 test)")
        ax.set_title(f"pattern {pattern}")
    save_figure(fig, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
