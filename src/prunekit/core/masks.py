"""The :class:`Mask` value object: which weights of one matrix are kept."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Mask:
    """A boolean keep-mask over a weight matrix (``True`` = kept).

    Masks are values: :meth:`compose` returns a new mask, :meth:`apply` returns a new tensor, and
    :meth:`apply_` is the one explicit in-place operation.
    """

    keep: torch.Tensor

    def __post_init__(self) -> None:
        if self.keep.dtype != torch.bool:
            raise TypeError(f"Mask.keep must be a bool tensor, got {self.keep.dtype}")

    @property
    def shape(self) -> torch.Size:
        return self.keep.shape

    @property
    def numel(self) -> int:
        return self.keep.numel()

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def density(self) -> float:
        """Fraction of weights kept."""
        return self.kept / max(1, self.numel)

    @property
    def sparsity(self) -> float:
        """Fraction of weights removed."""
        return 1.0 - self.density

    def compose(self, other: Mask) -> Mask:
        """Keep a weight only where both masks keep it (iterating pruning = composing masks)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot compose masks of shapes {tuple(self.shape)} and {tuple(other.shape)}")
        return Mask(self.keep & other.keep.to(self.keep.device))

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` with removed entries set to (positive) zero (a new tensor)."""
        self._check(weight)
        return weight.masked_fill(~self.keep.to(weight.device), 0)

    def apply_(self, weight: torch.Tensor) -> torch.Tensor:
        """Zero removed entries of ``weight`` in place (works on transposed views too)."""
        self._check(weight)
        return weight.masked_fill_(~self.keep.to(weight.device), 0)

    def _check(self, weight: torch.Tensor) -> None:
        if weight.shape != self.shape:
            raise ValueError(f"mask of shape {tuple(self.shape)} cannot apply to {tuple(weight.shape)}")

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Mask:
        """The mask of the non-zero entries of ``weight``."""
        return cls(weight != 0)


def save_masks(masks: Mapping[str, Mask], path: str | Path) -> None:
    """Save named masks as a safetensors file (uint8 0/1, loadable without pickle)."""
    from safetensors.torch import save_file

    save_file({name: m.keep.to(torch.uint8).contiguous().cpu() for name, m in masks.items()}, str(path))


def load_masks(path: str | Path) -> dict[str, Mask]:
    """Load masks written by :func:`save_masks`."""
    from safetensors.torch import load_file

    return {name: Mask(t.bool()) for name, t in load_file(str(path)).items()}
