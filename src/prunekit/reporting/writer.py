"""The one report writer: ``report.json``, ``report.md`` and a plot, from a typed report object.

Every pipeline describes its run as a dataclass that satisfies :class:`Report` (one-shot, structural and
training reports alike); :func:`write_report` writes its three views into a folder atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from prunekit.io.atomic import write_atomically


class Report(Protocol):
    """What a report is: data (JSON-ready), a Markdown rendering and an optional plot."""

    def to_dict(self) -> dict[str, Any]: ...

    def to_markdown(self) -> str: ...

    def plot(self, path: Path) -> bool:
        """Write the report's figure as a PNG at ``path``; False when there is nothing to draw (or no matplotlib)."""
        ...


#: The files a report folder holds.
JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "report.json", "report.md", "layers.png"


def write_files(report: Report, folder: Path) -> None:
    """Write the report's JSON, Markdown and plot into the existing ``folder``, as they are."""
    (folder / JSON_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    (folder / MARKDOWN_FILE).write_text(report.to_markdown())
    report.plot(folder / PLOT_FILE)


def write_report(report: Report, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``report.json``, ``report.md`` and ``layers.png`` into ``directory`` atomically (a new or empty
    folder unless ``overwrite``)."""
    return write_atomically(directory, lambda tmp: write_files(report, tmp), overwrite)
