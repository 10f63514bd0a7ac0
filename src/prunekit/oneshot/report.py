"""Run reports: one dict, written as JSON (for machines), Markdown (for people) and a PNG plot.

The plot shows, per target layer, the sparsity reached and the relative reconstruction error
``||WX - W'X||^2 / ||WX||^2`` on calibration inputs, and the time spent per block.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prunekit import reporting
from prunekit.core.measure import versions
from prunekit.eval.perplexity import PerplexityResult
from prunekit.io.compressed import checkpoint_format, checkpoint_size_bytes
from prunekit.oneshot.config import Recipe
from prunekit.oneshot.prune import PruneResult
from prunekit.reporting import new_figure, save_figure

log = logging.getLogger(__name__)

GIB = 1024**3


def build_report(
    recipe: Recipe,
    result: PruneResult,
    *,
    ppl_before: PerplexityResult | None = None,
    ppl_after: PerplexityResult | None = None,
    command: str | None = None,
    model_source: str = "",
    load_seconds: float | None = None,
    total_seconds: float | None = None,
    process_peak_rss_bytes: int | None = None,
) -> dict[str, Any]:
    """Collect everything about a run into a JSON-ready dict."""
    errors = [r.relative_error for r in result.layers if r.relative_error is not None]
    return {
        "command": command if command is not None else shlex.join(sys.argv),
        "recipe": recipe.model_dump(mode="json"),
        "versions": versions(),
        "model": model_source,
        "pattern": str(recipe.prune.parsed_pattern()),
        "method": recipe.prune.method,
        "propagation": recipe.prune.resolved_propagation(),
        "refit_steps": recipe.prune.resolved_refit_steps(),
        "calibration": {
            "windows": result.calibration_shape[0] if result.calibration_shape else 0,
            "seqlen": result.calibration_shape[1] if result.calibration_shape else 0,
        },
        "summary": {
            "layers": len(result.layers),
            "overall_sparsity": result.overall_sparsity,
            "mean_relative_error": sum(errors) / len(errors) if errors else None,
            "prune_seconds": result.seconds,
            "load_seconds": load_seconds,
            "total_seconds": total_seconds,
            "prune_peak_rss_gib": result.peak_rss_bytes / GIB,
            "process_peak_rss_gib": None if process_peak_rss_bytes is None else process_peak_rss_bytes / GIB,
            "peak_device_gib": None if result.peak_device_bytes is None else result.peak_device_bytes / GIB,
        },
        "perplexity": {
            "before": None if ppl_before is None else asdict(ppl_before),
            "after": None if ppl_after is None else asdict(ppl_after),
        },
        "output": {
            "dir": recipe.output.dir,
            "save_format": recipe.output.save_format,
            "written_format": None,  # filled by record_checkpoint once saved
            "size_bytes": None,
        },
        "blocks": [asdict(b) for b in result.blocks],
        "layers": [asdict(layer) for layer in result.layers],
    }


def record_checkpoint(report: dict[str, Any], directory: str | Path) -> None:
    """Fill ``report["output"]`` with the format written (``dense``, ``sparse-bitmask``, ``sparse-24-bitmask``)
    and the on-disk size of the weight files of the checkpoint in ``directory``."""
    output = report.setdefault("output", {})
    output["written_format"] = checkpoint_format(directory)
    output["size_bytes"] = checkpoint_size_bytes(directory)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """A human summary of a report dict."""
    s = report["summary"]
    lines = [
        "# prunekit report",
        "",
        f"- model: `{report['model']}`",
        f"- method: **{report['method']}**, pattern: **{report['pattern']}**"
        + (f", kept weights refitted ({report['refit_steps']} CG steps)" if report.get("refit_steps") else ""),
        f"- calibration: {report['calibration']['windows']} windows x {report['calibration']['seqlen']} tokens"
        + (f", statistics: {report['propagation']}" if report.get("propagation") else ""),
        f"- overall sparsity of {s['layers']} target layers: {s['overall_sparsity']:.4%}",
        f"- mean relative reconstruction error: {_fmt(s['mean_relative_error'])}",
        f"- prune time: {s['prune_seconds']:.1f} s; peak RSS while pruning: {s['prune_peak_rss_gib']:.2f} GiB"
        + (f"; peak device memory: {s['peak_device_gib']:.2f} GiB" if s["peak_device_gib"] is not None else ""),
    ]
    output = report.get("output") or {}
    if output.get("size_bytes") is not None:
        lines.append(
            f"- checkpoint: {output['size_bytes'] / 2**20:.1f} MiB of weights, format **{output['written_format']}** "
            f"(asked: {output['save_format']})"
        )
    ppl = report["perplexity"]
    for when in ("before", "after"):
        if ppl[when]:
            p = ppl[when]
            lines.append(
                f"- perplexity {when}: **{p['perplexity']:.3f}** ({p['windows']} non-overlapping windows x "
                f"{p['seqlen']} tokens of `{p['source']}`)"
            )
    lines += ["", f"Command: `{report['command']}`", "", "## Layers", ""]
    lines += [
        "| layer | shape | method | sparsity | rel. error | tokens | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        lines.append(
            f"| {layer['name']} | {layer['shape'][0]}x{layer['shape'][1]} | {layer['method']} | "
            f"{layer['sparsity']:.4f} | {_fmt(layer['relative_error'])} | {layer['error_tokens']} | "
            f"{layer['seconds']:.3f} |"
        )
    if report["blocks"]:
        lines += ["", "## Time per block", "", "| block | seconds |", "|---|---|"]
        lines += [f"| {b['index']} | {b['seconds']:.2f} |" for b in report["blocks"]]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> bool:
    """Per-layer sparsity and reconstruction error, and time per block, as a PNG. False if no matplotlib."""
    layers = report["layers"]
    panels = 3 if report["blocks"] else 2
    fig = new_figure(max(8, len(layers) * 0.08), 3 * panels)
    if fig is None:
        return False
    axes = fig.subplots(panels, 1)
    x = range(len(layers))
    axes[0].bar(x, [layer["sparsity"] for layer in layers], color="tab:blue")
    axes[0].set_ylabel("sparsity")
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"{report['method']} {report['pattern']} - {report['model']}")
    errors = [layer["relative_error"] if layer["relative_error"] is not None else 0.0 for layer in layers]
    axes[1].bar(x, errors, color="tab:red")
    axes[1].set_ylabel("rel. error ||WX-W'X||²/||WX||²")
    axes[1].set_xlabel("target layer (forward order)")
    if report["blocks"]:
        axes[2].bar([b["index"] for b in report["blocks"]], [b["seconds"] for b in report["blocks"]], color="tab:gray")
        axes[2].set_ylabel("seconds")
        axes[2].set_xlabel("block")
    save_figure(fig, path)
    return True


@dataclass
class OneShotReport:
    """A one-shot run's report (:func:`build_report`'s data) as a :class:`prunekit.reporting.Report`."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def to_markdown(self) -> str:
        return render_markdown(self.data)

    def plot(self, path: Path) -> bool:
        return plot_report(self.data, path)


def write_report(report: dict[str, Any], directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``report.json``, ``report.md`` and ``layers.png`` into ``directory`` atomically."""
    return reporting.write_report(OneShotReport(report), directory, overwrite)
