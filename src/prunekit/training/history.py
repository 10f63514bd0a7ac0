"""What a training run leaves behind: a :class:`StepRecord` per logged step and the :class:`TrainHistory`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["StepRecord", "TrainHistory"]


@dataclass(frozen=True)
class StepRecord:
    """One logged point: after ``step`` optimizer steps (``epoch`` = step / steps per epoch), the mean training
    ``loss`` since the previous record (``None`` at the start), the learning rate of the last step, the sparsity
    and PQ Index of the prunable weights, the test ``accuracy`` when evaluated here (on ``eval_examples``
    examples), and the seconds since training began."""

    step: int
    epoch: float
    loss: float | None
    lr: float
    sparsity: float
    pqi: float | None
    accuracy: float | None = None
    eval_examples: int | None = None
    seconds: float = 0.0


@dataclass
class TrainHistory:
    """What :func:`train` returns: the records, the final accuracy on the whole test set (``None`` without one),
    the steps run (``start_step`` to ``end_step``), wall seconds, the names whose sparsity was logged, and the
    rewind point (``state_dict`` copy after ``rewind_step`` steps) when one was asked for."""

    records: list[StepRecord] = field(default_factory=list)
    final_accuracy: float | None = None
    start_step: int = 0
    end_step: int = 0
    seconds: float = 0.0
    targets: tuple[str, ...] = ()
    rewind_state: dict[str, torch.Tensor] | None = None

    @property
    def final_sparsity(self) -> float | None:
        """Sparsity of the last record."""
        return self.records[-1].sparsity if self.records else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything but the rewind tensors."""
        return {
            "final_accuracy": self.final_accuracy,
            "final_sparsity": self.final_sparsity,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "seconds": self.seconds,
            "targets": list(self.targets),
            "records": [asdict(r) for r in self.records],
        }
