"""The width search's quality against search time (best held-apart KL after each generation), from the
``prunekit-search`` runs of ``bench_structured_llm.py`` results, as one PNG.

    .venv/bin/python bench/plot_search_curve.py bench/results/structured_llm_search25.json ... \
        --out bench/results/search_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.reporting import new_figure, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "search_curve.png")
    args = parser.parse_args()
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    for path in args.results:
        data = json.loads(path.read_text())
        run = data["runs"].get("prunekit-search")
        if not run or not run.get("history"):
            continue
        label = f"{data['ratio']:.0%} removed" + (", decode >= 1.3x" if run.get("decode_speedup_predicted") else "")
        history = run["history"]
        line = ax.plot([h["seconds"] / 60 for h in history], [h["best_kl"] for h in history], marker=".", label=label)
        ax.axhline(run["uniform_kl"], color=line[0].get_color(), linestyle=":", linewidth=1)
        if run.get("perplexity"):
            ax.annotate(f"ppl {run['perplexity']:.1f}", (history[-1]["seconds"] / 60, history[-1]["best_kl"]))
    ax.set_xlabel("search time (minutes, 2 CPU cores)")
    ax.set_ylabel("KL from dense (dotted: uniform widths)")
    ax.set_title("SmolLM2-135M: Týr width search, quality against search time")
    ax.legend()
    save_figure(fig, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
