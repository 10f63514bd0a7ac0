"""Run reports: a typed :class:`OneShotReport`, written as JSON (for machines), Markdown (for people) and a
PNG plot by :func:`prunekit.reporting.write_report`.

The plot shows, per target layer, the sparsity reached and the relative reconstruction error
``||WX - W'X||^2 / ||WX||^2`` on calibration inputs, and the time spent per block.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit import reporting
from prunekit.calibration.engine import BlockTiming
from prunekit.core.measure import versions
from prunekit.eval.perplexity import PerplexityResult
from prunekit.io.compressed import checkpoint_format, checkpoint_size_bytes
from prunekit.oneshot.config import Recipe
from prunekit.oneshot.prune import LayerResult, PruneResult
from prunekit.reporting import new_figure, save_figure
from prunekit.reporting.model_card import Metric, ModelCard, perplexity_metric

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class RunSummary:
    """The run in numbers: target layers, sparsity over all of them, mean error, time and memory."""

    layers: int
    overall_sparsity: float
    mean_relative_error: float | None
    prune_seconds: float
    load_seconds: float | None
    total_seconds: float | None
    prune_peak_rss_gib: float
    process_peak_rss_gib: float | None
    peak_device_gib: float | None


@dataclass
class CheckpointRecord:
    """Where the pruned model went: the folder and format asked for, and (once saved) the format written
    (``dense``, ``sparse-bitmask``, ``sparse-24-bitmask``) and the bytes of its weight files."""

    dir: str | None
    save_format: str
    written_format: str | None = None
    size_bytes: int | None = None


@dataclass
class OneShotReport:
    """One one-shot run (satisfies :class:`prunekit.reporting.Report`); :meth:`to_dict` is ``report.json``."""

    command: str
    #: the whole recipe, as ``prunekit prune --print-recipe`` writes it
    recipe: dict[str, Any]
    versions: dict[str, str]
    model: str
    pattern: str
    method: str
    propagation: str
    refit_steps: int
    calibration_windows: int
    calibration_seqlen: int
    summary: RunSummary
    output: CheckpointRecord
    perplexity_before: PerplexityResult | None = None
    perplexity_after: PerplexityResult | None = None
    blocks: list[BlockTiming] = field(default_factory=list)
    layers: list[LayerResult] = field(default_factory=list)
    #: ``layer_budget`` owl: each block's sparsity and its share of outlier scores
    block_sparsity: dict[int, float] = field(default_factory=dict)
    block_outliers: dict[int, float] = field(default_factory=dict)
    #: ``reconstruct`` block: each block's output error against the dense block, before and after
    block_reconstruction: dict[int, Any] = field(default_factory=dict)
    #: several ranks (torchrun): per rank, its calibration windows, layers solved, seconds and peak memory
    ranks: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "recipe": self.recipe,
            "versions": self.versions,
            "model": self.model,
            "pattern": self.pattern,
            "method": self.method,
            "propagation": self.propagation,
            "refit_steps": self.refit_steps,
            "calibration": {"windows": self.calibration_windows, "seqlen": self.calibration_seqlen},
            "summary": asdict(self.summary),
            "perplexity": {
                "before": None if self.perplexity_before is None else asdict(self.perplexity_before),
                "after": None if self.perplexity_after is None else asdict(self.perplexity_after),
            },
            "output": asdict(self.output),
            "blocks": [asdict(b) for b in self.blocks],
            "layers": [asdict(layer) for layer in self.layers],
            "block_budgets": [
                {"block": b, "sparsity": s, "outlier_share": self.block_outliers.get(b)}
                for b, s in sorted(self.block_sparsity.items())
            ],
            "block_reconstruction": [{"block": b, **asdict(r)} for b, r in sorted(self.block_reconstruction.items())],
            "ranks": list(self.ranks),
        }

    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def plot(self, path: Path) -> bool:
        return plot_report(self.to_dict(), path)


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
) -> OneShotReport:
    """Collect everything about a run into a :class:`OneShotReport`."""
    errors = [r.relative_error for r in result.layers if r.relative_error is not None]
    windows, seqlen = result.calibration_shape or (0, 0)
    return OneShotReport(
        command=command if command is not None else shlex.join(sys.argv),
        recipe=recipe.model_dump(mode="json"),
        versions=versions(),
        model=model_source,
        pattern=str(recipe.prune.parsed_pattern()),
        method=recipe.prune.method,
        propagation=recipe.prune.resolved_propagation(),
        refit_steps=recipe.prune.resolved_refit_steps(),
        calibration_windows=windows,
        calibration_seqlen=seqlen,
        summary=RunSummary(
            layers=len(result.layers),
            overall_sparsity=result.overall_sparsity,
            mean_relative_error=sum(errors) / len(errors) if errors else None,
            prune_seconds=result.seconds,
            load_seconds=load_seconds,
            total_seconds=total_seconds,
            prune_peak_rss_gib=result.peak_rss_bytes / GIB,
            process_peak_rss_gib=None if process_peak_rss_bytes is None else process_peak_rss_bytes / GIB,
            peak_device_gib=None if result.peak_device_bytes is None else result.peak_device_bytes / GIB,
        ),
        output=CheckpointRecord(dir=recipe.output.dir, save_format=recipe.output.save_format),
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        blocks=list(result.blocks),
        layers=list(result.layers),
        block_sparsity=dict(result.block_sparsity),
        block_outliers=dict(result.block_outliers),
        block_reconstruction=dict(result.block_reconstruction),
        ranks=list(result.ranks),
    )


def record_checkpoint(report: OneShotReport, directory: str | Path) -> None:
    """Fill ``report.output`` with the format written and the on-disk size of the weight files of the
    checkpoint in ``directory``."""
    report.output.written_format = checkpoint_format(directory)
    report.output.size_bytes = checkpoint_size_bytes(directory)


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
        f"- overall sparsity of {s['layers']} target layers: {s['overall_sparsity']:.4%}"
        + (
            f" (OWL budgets: blocks from {min(b['sparsity'] for b in report['block_budgets']):.2%} to "
            f"{max(b['sparsity'] for b in report['block_budgets']):.2%})"
            if report.get("block_budgets")
            else ""
        ),
        f"- mean relative reconstruction error: {_fmt(s['mean_relative_error'])}",
        f"- prune time: {s['prune_seconds']:.1f} s; peak RSS while pruning: {s['prune_peak_rss_gib']:.2f} GiB"
        + (f"; peak device memory: {s['peak_device_gib']:.2f} GiB" if s["peak_device_gib"] is not None else ""),
    ]
    for r in report.get("ranks") or []:
        lines.append(
            f"- rank {r['rank']}: {r['windows']} calibration windows, {r['layers_solved']} layers solved, "
            f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, calibration activations "
            f"{r['activation_bytes'] / 2**20:.1f} MiB"
        )
    rebuilt = report.get("block_reconstruction") or []
    if rebuilt:
        lines.append(
            f"- block reconstruction: {sum(r['kept'] for r in rebuilt)} of {len(rebuilt)} blocks improved; mean output "
            f"error {sum(r['error_before'] for r in rebuilt) / len(rebuilt):.4g} -> "
            f"{sum(r['error_after'] for r in rebuilt) / len(rebuilt):.4g}"
        )
    experts = [layer for layer in report["layers"] if layer["expert"] is not None]
    if experts:
        underused = [layer for layer in experts if layer["note"]]
        lines.append(
            f"- MoE: {len(experts)} expert matrices pruned from their own routed tokens; "
            f"{len(underused)} had too few tokens (see the notes below)"
        )
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
        "| layer | shape | method | sparsity | rel. error | calib. tokens | seconds | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        lines.append(
            f"| {layer['name']} | {layer['shape'][0]}x{layer['shape'][1]} | {layer['method']} | "
            f"{layer['sparsity']:.4f} | {_fmt(layer['relative_error'])} | {layer['calibration_tokens']} | "
            f"{layer['seconds']:.3f} | {layer['note']} |"
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


def model_card(report: OneShotReport, base_model: str, derived_from: str | None = None) -> ModelCard:
    """The model card of the checkpoint a one-shot run saved (``base_model`` and ``derived_from``: what it was
    pruned from, :func:`prunekit.reporting.model_card.lineage`)."""
    s = report.summary
    refit = (
        f", the kept weights refitted by least squares ({report.refit_steps} CG steps)" if report.refit_steps else ""
    )
    calibrated = (
        f", calibrated on {report.calibration_windows} windows of {report.calibration_seqlen} tokens"
        if report.calibration_windows
        else ""
    )
    stored = report.output.written_format or report.output.save_format
    summary = (
        f"`{base_model}` pruned one-shot by prunekit with **{report.method}** to the **{report.pattern}** pattern: "
        f"{s.overall_sparsity:.2%} of the weights of its {s.layers} target layers are zero{refit}{calibrated}. "
        f"The weights are stored in the {stored} format"
        + (" (zeros included: `--save-format compressed` stores the kept weights only)." if stored == "dense" else ".")
    )
    ppl = [report.perplexity_before, report.perplexity_after]
    known = next((p for p in ppl if p is not None), None)
    results = []
    if known is not None:
        results.append(
            perplexity_metric(
                *(None if p is None else p.perplexity for p in ppl), known.source, known.windows, known.seqlen
            )
        )
    results.append(Metric("sparsity of the target layers", None, s.overall_sparsity, ".2%"))
    if s.mean_relative_error is not None:
        results.append(Metric("mean relative reconstruction error", None, s.mean_relative_error, ".4f"))
    return ModelCard(
        base_model=base_model,
        derived_from=derived_from,
        method=report.method,
        kind=report.pattern.split()[0],
        summary=summary,
        command=report.command,
        recipe=report.recipe,
        recipe_command="prunekit prune --recipe recipe.yaml",
        results=results,
    )


def write_report(report: OneShotReport, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``report.json``, ``report.md`` and ``layers.png`` into ``directory`` atomically."""
    return reporting.write_report(report, directory, overwrite)
