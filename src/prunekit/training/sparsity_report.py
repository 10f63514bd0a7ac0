"""How sparse a sparsifier's masks are, per layer and overall (:class:`SparsityReport`, a
:class:`prunekit.reporting.Report`: ``write_report(sparsifier.sparsity_report(), folder)`` writes its JSON, Markdown and a
bar chart of the layers' sparsity)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.reporting import new_figure, save_figure


@dataclass(frozen=True)
class LayerSparsity:
    """Kept and total weights of one pruned parameter."""

    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int

    @property
    def sparsity(self) -> float:
        """Fraction of this parameter's weights pruned."""
        return 1.0 - self.kept / max(1, self.numel)


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall sparsity of the masks after ``step`` optimizer steps (``target``: the schedule's)."""

    step: int
    target: float
    layers: tuple[LayerSparsity, ...]

    @property
    def numel(self) -> int:
        """All chosen weights."""
        return sum(layer.numel for layer in self.layers)

    @property
    def kept(self) -> int:
        """Weights kept over all layers."""
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall fraction pruned."""
        return 1.0 - self.kept / max(1, self.numel)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "step": self.step,
            "target": self.target,
            "sparsity": self.sparsity,
            "layers": {layer.name: {"shape": list(layer.shape), "sparsity": layer.sparsity} for layer in self.layers},
        }

    def to_markdown(self) -> str:
        """A table of the layers' sparsity under the overall figure."""
        lines = [
            f"# Sparsity after {self.step} steps",
            "",
            f"Overall {self.sparsity:.4f} (schedule target {self.target:.4f}), {self.kept} of {self.numel} weights kept.",
            "",
            "| layer | shape | sparsity |",
            "|---|---|---|",
        ]
        lines += [f"| {layer.name} | {tuple(layer.shape)} | {layer.sparsity:.4f} |" for layer in self.layers]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> bool:
        """One horizontal bar per layer (its sparsity), the schedule's target as a line; False without layers or
        matplotlib."""
        if not self.layers:
            return False
        fig = new_figure(7, max(2.5, 0.3 * len(self.layers) + 1))
        if fig is None:
            return False
        ax = fig.subplots()
        ax.barh([layer.name for layer in self.layers], [layer.sparsity for layer in self.layers])
        ax.axvline(self.target, color="black", linestyle="--", linewidth=1, label="target")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("sparsity")
        ax.legend(fontsize=8)
        save_figure(fig, path)
        return True
