"""Adapt-Pruner's incremental loop: prune a few percent of the parameters at a time, each layer by its own
importance, and recover by distillation from the dense model between the steps.

Pan et al. (2025), "Adapt-Pruner: Adaptive Structural Pruning for Efficient Small Language Model Training",
Sec. 3 (Adapt-Accel: pruning interleaved with training). Each step:

1. the importance of every decoder layer, ShortGPT's Block Influence ``1 - E[cos(x_in, x_out)]`` on the
   calibration windows (:func:`~prunekit.structured.llm.depth.layer_influence`), of the model as it is now;
2. the step's per-layer sparsities around the share that brings the model to ``step``, ``2 x step``... of the
   original parameters removed (:func:`~prunekit.incremental.schedule.adaptive_sparsities`), as widths meeting
   the parameter count exactly (to one MLP channel);
3. the widths cut layer by layer with second-order local pruning and least-squares refits on the outputs of the
   already-pruned layers (:func:`~prunekit.structured.llm.supernet.prune_to_widths`);
4. distillation from the dense model on the training text (:func:`~prunekit.training.lm_distill.distill_lm`),
   ``distill.tokens`` tokens per step (none with ``0`` steps of recovery: pruning in increments alone).

The input model is not modified.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.config import StrictConfig
from prunekit.core.errors import ConfigError
from prunekit.incremental.schedule import adaptive_sparsities, widths_for_sparsities
from prunekit.models.blocks import find_decoder_blocks
from prunekit.structured.llm.depth import layer_influence
from prunekit.structured.llm.layer_widths import Genome, layer_layout
from prunekit.structured.llm.supernet import prune_to_widths
from prunekit.training.lm_distill import LMDistillConfig, distill_lm

log = logging.getLogger(__name__)


class IncrementalConfig(StrictConfig):
    """Adapt-Pruner's settings."""

    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of the original parameters to remove")
    step: float = Field(0.05, gt=0.0, lt=1.0, description="fraction of the original parameters removed per step")
    amplitude: float = Field(0.02, ge=0.0, lt=1.0, description="A: layer sparsities spread s - A z_l, z in [-1, 1]")
    distill: LMDistillConfig = Field(
        default_factory=lambda: LMDistillConfig(tokens=65_536), description="recovery after each step"
    )
    recover: bool = Field(True, description="distill after each step (off: pruning in increments alone)")
    batch_size: int = Field(1, ge=1)
    dampening: float = Field(0.01, ge=0.0)

    @model_validator(mode="after")
    def _steps(self) -> IncrementalConfig:
        if self.step > self.ratio:
            raise ValueError(f"step {self.step} is larger than the ratio {self.ratio}: one step would overshoot")
        return self


@dataclass
class IncrementalStep:
    """One step: the share of the original parameters removed after it, the parameters kept, the layer
    importances and sparsities it used, the widths it cut to, and the held-out KL before and after recovery."""

    removed: float
    params: int
    importance: list[float]
    sparsities: list[float]
    genome: Genome
    kl_before: float | None = None
    kl_after: float | None = None
    seconds: float = 0.0


@dataclass
class IncrementalResult:
    """The pruned (and recovered) model and its steps."""

    model: nn.Module
    dense_params: int
    steps: list[IncrementalStep] = field(default_factory=list)


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put ``model``'s device, train/eval modes and ``requires_grad`` flags back as they were afterwards (the
    distillation moves and freezes its teacher, here the caller's model)."""
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    flags = {param: param.requires_grad for param in model.parameters()}
    try:
        yield
    finally:
        model.to(device)
        for module, mode in modes.items():
            module.training = mode
        for param, flag in flags.items():
            param.requires_grad_(flag)


def _schedule(ratio: float, step: float) -> list[float]:
    """The cumulative shares removed after each step: ``step, 2 step, ...`` ending exactly at ``ratio``."""
    shares, done = [], 0.0
    while done < ratio - 1e-9:
        done = min(ratio, done + step)
        shares.append(done)
    return shares


def prune_incrementally(
    model: nn.Module,
    calibration: torch.Tensor,
    text_tokens: torch.Tensor | None,
    config: IncrementalConfig,
    *,
    progress: bool = True,
) -> IncrementalResult:
    """Adapt-Pruner on a causal LM (see the module docstring): ``calibration`` ``(n, seqlen)`` windows for the
    importances and local prunings, ``text_tokens`` (1-D) the text recovery trains on (``None`` only without
    recovery). ``model`` is not modified; it is the teacher of every recovery."""
    if config.recover and text_tokens is None:
        raise ConfigError("recovery distills on a text: give its tokens, or set recover=False")
    dense_params = sum(p.numel() for p in model.parameters())
    teacher = model
    current = copy.deepcopy(model).eval()
    result = IncrementalResult(current, dense_params)
    for share in _schedule(config.ratio, config.step):
        started = time.perf_counter()
        _, blocks = find_decoder_blocks(current)
        layouts = [layer_layout(block, i) for i, block in enumerate(blocks)]
        widths = tuple(layout.dense for layout in layouts)
        kept_now = sum(p.numel() for p in current.parameters())
        kept_target = dense_params - round(share * dense_params)
        fixed = kept_now - sum(layout.params(w) for layout, w in zip(layouts, widths, strict=True))
        layer_params = kept_now - fixed
        mean = (kept_now - kept_target) / layer_params  # the share of the layers' parameters this step takes
        importance = layer_influence(current, calibration, config.batch_size)
        sparsities = adaptive_sparsities(importance, mean, config.amplitude)
        genome = widths_for_sparsities(layouts, widths, sparsities, fixed, kept_target)
        current.eval()
        pruned = prune_to_widths(
            current, calibration, genome, batch_size=config.batch_size, dampening=config.dampening, progress=progress
        )
        record = IncrementalStep(share, sum(p.numel() for p in pruned.parameters()), importance, sparsities, genome)
        if config.recover:
            assert text_tokens is not None
            pruned.requires_grad_(True)  # our own copy: trainable whatever the input's flags
            with _restored(teacher):
                recovery = distill_lm(pruned, teacher, text_tokens, config.distill, progress=progress)
            record.kl_before, record.kl_after = recovery.kl_before, recovery.kl_after
        pruned.eval()
        record.seconds = time.perf_counter() - started
        log.info(
            "incremental: %.1f%% removed, %d parameters, held-out KL %s -> %s",
            100 * share,
            record.params,
            record.kl_before,
            record.kl_after,
        )
        result.steps.append(record)
        current = pruned
    result.model = current
    return result
