"""Markdown tables from the structural-pruning benchmark results (coverage, speed, LLM).

python bench/summarize_structured.py bench/results/structured_coverage.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def coverage(data: dict) -> str:
    results = data["results"]
    tools = list(results)
    names = sorted({n for r in results.values() for n in r})
    lines = [
        "| model | " + " | ".join(f"{t}: params / MACs kept" for t in tools) + " |",
        "|---|" + "---|" * len(tools),
    ]
    for name in names:
        cells = []
        for tool in tools:
            r = results[tool].get(name)
            if r is None:
                cells.append("not run")
            elif r["ok"]:
                extra = " (tied attention)" if r.get("tied") else ""
                extra += " (kept whole: " + ", ".join(r["kept_whole"]) + ")" if r.get("kept_whole") else ""
                cells.append(f"{r['params_ratio']:.3f} / {r['macs_ratio']:.3f}{extra}")
            else:
                cells.append("**fails**: " + r.get("error", "")[-90:].replace("|", "/"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = {t: (sum(r["ok"] for r in results[t].values()), len(results[t])) for t in tools}
    lines.append("")
    lines.append("Pruned, ran, output shape kept: " + "; ".join(f"{t} {ok}/{n}" for t, (ok, n) in totals.items()))
    return "\n".join(lines)


def speed(data: dict) -> str:
    """One row per model, rounding, tool: batch-1 and batch-32 speed-up / MACs reduction (files of the current
    layout, ``results[model]["round_to=R"][tool]``, and of the first one, ``results[model][tool]``)."""
    lines = [
        "| model | round_to | tool | MACs reduction | speed-up / ratio, per batch |",
        "|---|---|---|---|---|",
    ]
    for name, by_round in data["results"].items():
        if not all(key.startswith("round_to=") for key in by_round):
            by_round = {"round_to=-": by_round}
        for key, tools in by_round.items():
            for tool, r in tools.items():
                if not r.get("ok"):
                    lines.append(f"| {name} | {key[9:]} | {tool} | - | fails: {r.get('error', '')[-80:]} |")
                    continue
                cells = ", ".join(
                    f"batch {row['batch']}: {row['speedup']:.2f} / {row['speedup_over_macs_reduction']:.2f}"
                    for row in r["rows"]
                )
                lines.append(f"| {name} | {key[9:]} | {tool} | {r['rows'][0]['macs_reduction']:.2f} | {cells} |")
    return "\n".join(lines)


def llm(data: dict) -> str:
    lines = ["| run | params kept | perplexity | decode tok/s | decode gain |", "|---|---|---|---|---|"]
    for name, r in data["runs"].items():
        if not r.get("ok", True):
            lines.append(f"| {name} | fails: {r.get('error', '')[-100:]} | | | |")
            continue
        kept = f"{r['pruned_params'] / r['params']:.3f}" if "params" in r else "1.000"
        gain = f"{r['decode_gain']:.2f}x" if "decode_gain" in r else "-"
        lines.append(
            f"| {name} | {kept} | {r.get('perplexity', float('nan')):.3f} | {r.get('decode_tok_s', float('nan')):.2f} | {gain} |"
        )
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        if "results" in data and "summary" in data:
            print(coverage(data))
        elif "results" in data:
            print(speed(data))
        else:
            print(llm(data))
        print()


if __name__ == "__main__":
    main()
