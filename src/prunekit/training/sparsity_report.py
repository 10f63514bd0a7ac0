"""How sparse a sparsifier's masks are, per layer and overall (:class:`SparsityReport`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
