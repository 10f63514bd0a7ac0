"""Training reports: experiment histories as JSON (for machines), a Markdown table (for people) and one PNG
figure with three panels against the optimizer step: sparsity (the schedule as measured from the weights, e.g.
Zhu & Gupta 2017's cubic ramp), test accuracy, and the PQ Index of the kept weights (Diao et al. 2023); one line
per experiment.

A report is a plain dict::

    {"title": str, "budget": {...}, "experiments": {name: entry, ...}, "floors": [{"floor", "result", "met"}]}

where an entry (:func:`history_entry`) holds ``accuracy``, ``sparsity``, ``steps``, ``seconds``, ``history`` (the
:class:`~prunekit.training.loop.StepRecord`\\ s as dicts) and any extra fields. Every file is written to a temporary
sibling and renamed over the target (:func:`write_file_atomically`), so a reader never sees a half-written file and a
failure leaves the previous version in place. :class:`TrainingReport` is the typed form
(a :class:`prunekit.reporting.Report`); figures come from :mod:`prunekit.reporting` (matplotlib's object API, no
pyplot, no global backend switch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.io.atomic import write_file_atomically
from prunekit.reporting import new_figure, save_figure
from prunekit.training.history import TrainHistory

__all__ = ["TrainingReport", "history_entry", "plot_histories", "render_markdown", "write_training_report"]


@dataclass
class TrainingReport:
    """A training report (satisfies :class:`prunekit.reporting.Report`): ``title``, the ``budget`` (settings shared
    by every experiment), ``experiments`` (name -> :func:`history_entry`) and the ``floors`` checked. ``to_dict``
    is the JSON layout the bench scripts read; :func:`prunekit.reporting.write_report` writes it into a folder,
    :func:`write_training_report` to chosen file names."""

    title: str = "Training report"
    budget: dict[str, Any] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    floors: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingReport:
        """From the plain-dict layout (missing sections empty)."""
        return cls(
            title=data.get("title", "Training report"),
            budget=dict(data.get("budget") or {}),
            experiments=dict(data.get("experiments") or {}),
            floors=list(data.get("floors") or []),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "budget": self.budget, "experiments": self.experiments, "floors": self.floors}

    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def plot(self, path: Path) -> bool:
        return plot_histories(self.to_dict(), path)


def _as_dict(report: Mapping[str, Any] | TrainingReport) -> Mapping[str, Any]:
    return report.to_dict() if isinstance(report, TrainingReport) else report


def history_entry(history: TrainHistory, **extra: Any) -> dict[str, Any]:
    """A report entry for one training run: final accuracy and sparsity, steps run, wall seconds, the logged
    records, plus ``extra`` fields (which win over the defaults)."""
    entry: dict[str, Any] = {
        "accuracy": history.final_accuracy,
        "sparsity": history.final_sparsity,
        "steps": history.end_step - history.start_step,
        "start_step": history.start_step,
        "seconds": history.seconds,
        "history": [asdict(r) for r in history.records],
    }
    entry.update(extra)
    return entry


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: Mapping[str, Any] | TrainingReport) -> str:
    """The report as Markdown: the budget, one table row per experiment (accuracy in %, sparsity, steps, wall
    seconds, note), and the floors when present."""
    report = _as_dict(report)
    lines = [f"# {report.get('title', 'Training report')}", ""]
    budget = report.get("budget") or {}
    if budget:
        lines += ["## Budget", ""] + [f"- {key}: {value}" for key, value in budget.items()] + [""]
    lines += [
        "## Results",
        "",
        "| experiment | test accuracy % | sparsity | steps | wall s | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in (report.get("experiments") or {}).items():
        accuracy = entry.get("accuracy")
        lines.append(
            f"| {name} | {_fmt(None if accuracy is None else 100 * accuracy, '.2f')} | "
            f"{_fmt(entry.get('sparsity'), '.4f')} | {entry.get('steps', '-')} | {_fmt(entry.get('seconds'), '.0f')} | "
            f"{entry.get('note', '')} |"
        )
    floors = report.get("floors") or []
    if floors:
        lines += ["", "## Floors", "", "| floor | result | met? |", "|---|---|---|"]
        for floor in floors:
            met = floor.get("met")
            lines.append(f"| {floor['floor']} | {floor['result']} | {'-' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def plot_histories(report: Mapping[str, Any] | TrainingReport, path: str | Path) -> bool:
    """Sparsity, test accuracy and PQ Index against the optimizer step, one line per experiment with a
    ``history``, as a PNG written atomically to ``path``. Returns False (and logs a warning) without matplotlib."""
    report = _as_dict(report)
    fig = new_figure(9, 10)
    if fig is None:
        return False
    axes = fig.subplots(3, 1, sharex=True)
    panels = (("sparsity", "sparsity (measured)"), ("accuracy", "test accuracy"), ("pqi", "PQ Index (p=0.5, q=1)"))
    for name, entry in (report.get("experiments") or {}).items():
        records = entry.get("history") or []
        if not records:
            continue
        for ax, (key, _) in zip(axes, panels, strict=True):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if key == "accuracy" else None, markersize=3, label=name)
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.0)
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(report.get("title", "training"))
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[0].legend(fontsize=8, ncol=2)
    write_file_atomically(path, lambda tmp: save_figure(fig, tmp, dpi=100))
    return True


def write_training_report(
    report: Mapping[str, Any] | TrainingReport,
    json_path: str | Path,
    *,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> list[Path]:
    """Write the report as JSON (and, when paths are given, Markdown and the PNG figure), each file atomically;
    returns the paths written."""
    report = _as_dict(report)
    written = []
    if plot_path is not None and plot_histories(report, plot_path):
        written.append(Path(plot_path))
    if markdown_path is not None:
        text = render_markdown(report)
        written.append(write_file_atomically(markdown_path, lambda tmp: tmp.write_text(text)))
    payload = json.dumps(report, indent=1, allow_nan=False)
    written.append(write_file_atomically(json_path, lambda tmp: tmp.write_text(payload)))
    return written
