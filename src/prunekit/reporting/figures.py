"""Figures through matplotlib's object API: no ``pyplot``, no global backend switch, nothing to close.

A :class:`matplotlib.figure.Figure` built directly renders with the Agg canvas on ``savefig`` whatever
backend the process has chosen, so a report written from a notebook or a GUI program leaves its
matplotlib state alone. matplotlib is an optional extra (``prunekit[plots]``): without it, plots are skipped
with a warning and every other report file is still written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def new_figure(width: float, height: float) -> Any:
    """A new ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches with a constrained layout, or
    ``None`` (and a warning) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; skipping the plot (pip install 'prunekit[plots]')")
        return None
    return Figure(figsize=(width, height), constrained_layout=True)


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> None:
    """Render ``figure`` to a PNG at ``path``."""
    figure.savefig(Path(path), format="png", dpi=dpi)
