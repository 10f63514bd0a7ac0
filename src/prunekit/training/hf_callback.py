"""Pruning during training inside a Hugging Face ``transformers.Trainer``.

:func:`sparsifier_callback` returns a ``transformers.TrainerCallback`` that

* attaches the Trainer's optimizer to the sparsifier at ``on_train_begin`` (optimizer state masking),
* calls :meth:`Sparsifier.step` at ``on_step_end`` (after each optimizer step; gradient accumulation counts as
  one step, as in the schedule),
* adds ``sparsity`` and ``sparsity_target`` to the Trainer's logs (``on_log``, also in ``state.log_history``),
* saves the sparsifier state as ``sparsifier.pt`` in each checkpoint folder and restores it when training resumes
  from a checkpoint (``on_save`` / ``on_train_begin``), so a resumed run keeps the same masks.

transformers is imported only when the callback is created::

    trainer = Trainer(model, args, train_dataset=data, callbacks=[sparsifier_callback(sparsifier)])
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from prunekit.training.sparsifier import Sparsifier

logger = logging.getLogger(__name__)

STATE_FILE = "sparsifier.pt"


def sparsifier_callback(sparsifier: Sparsifier) -> TrainerCallback:
    """A ``TrainerCallback`` driving ``sparsifier`` from the Trainer's loop (see the module docstring; the
    sparsifier implements Zhu & Gupta 2017 / Global MP / GraNet, Liu et al. 2021)."""
    from transformers import TrainerCallback

    class SparsifierCallback(TrainerCallback):
        """Steps a :class:`~prunekit.training.sparsifier.Sparsifier` after every optimizer step."""

        def __init__(self) -> None:
            self.sparsifier = sparsifier

        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            if optimizer is not None:
                self.sparsifier.attach_optimizer(optimizer)
            if state.global_step > 0:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
                if os.path.isfile(path):
                    self.sparsifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                elif self.sparsifier.step_count != state.global_step:
                    logger.warning(
                        "resuming at step %d without %s: the sparsifier continues from its step %d",
                        state.global_step,
                        path,
                        self.sparsifier.step_count,
                    )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sparsifier.step()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if state.is_world_process_zero and os.path.isdir(folder):
                torch.save(self.sparsifier.state_dict(), os.path.join(folder, STATE_FILE))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
            report = self.sparsifier.sparsity_report()
            extra = {"sparsity": round(report.sparsity, 6), "sparsity_target": round(report.target, 6)}
            if logs is not None:
                logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)

    return SparsifierCallback()
