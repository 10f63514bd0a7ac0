"""How a training run is set up (:class:`TrainConfig`, :class:`DistillConfig`) and what its step ``t`` does, as
pure functions: the learning rate (:func:`lr_at`), the examples of the global batch (:func:`global_batch_indices`)
and each rank's part of it (:func:`rank_slice`). :mod:`prunekit.training.loop` explains the choices."""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from pydantic import ConfigDict, field_validator, model_validator

from prunekit.core.config import StrictConfig
from prunekit.core.errors import ConfigError

LRSchedule = Literal["onecycle", "cosine", "constant"]

#: Independent random streams derived from the run's seed (see :func:`derive_seed`).
PERMUTATION_STREAM, AUGMENTATION_STREAM, EVAL_SUBSET_STREAM = 0, 1, 2

#: Default per-channel normalisation: the CIFAR-10 training-pixel statistics (the experiments' data set; equal
#: to :data:`prunekit.training.cifar.augment.CIFAR10_MEAN`/``CIFAR10_STD``, which a test checks), spelled out
#: here so that the generic loop imports nothing of CIFAR.
DEFAULT_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
DEFAULT_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

_WHOLE = {  # field -> least value (None-able fields are checked only when set)
    "batch_size": 1,
    "accumulation_steps": 1,
    "log_every": 1,
    "eval_every": 0,
    "eval_batch_size": 1,
    "padding": 0,
    "seed": 0,
    "steps": 1,
    "threads": 1,
    "eval_samples": 1,
}


class TrainConfig(StrictConfig):
    """How to train (see the module docstring for the choices and their papers).

    ``epochs`` (may be fractional) or ``steps`` (optimizer steps; overrides ``epochs``) set the length.
    ``batch_size`` is the global batch (all ranks, all micro-batches). ``lr`` is the peak learning rate of
    ``lr_schedule`` (``"onecycle"``: linear up over ``warmup`` of the steps, linear down to 0; ``"cosine"``: same
    warm-up, cosine down to 0; ``"constant"``: warm-up then flat). ``momentum``/``nesterov``/``weight_decay``:
    SGD's (decay on every parameter). ``seed`` fixes the data order and augmentation; ``threads`` sets
    ``torch.set_num_threads`` for the run (restored afterwards; ``None`` leaves it). ``accumulation_steps``:
    micro-batches per optimizer step (per rank). ``augment``: pad-``padding`` random crop + horizontal flip;
    ``mean``/``std``: per-channel normalisation (uint8 images are divided by 255 first). ``log_every``: a
    :class:`StepRecord` every so many steps and wherever the measured sparsity changed; ``eval_every``: test
    accuracy every so many steps (0: only at the end), on ``eval_samples`` seeded test examples (``None``: all);
    the final evaluation always uses the whole test set. ``eval_batch_size``: evaluation batch.

    A strict pydantic configuration (:class:`~prunekit.core.config.StrictConfig`): unknown keys and bad values
    are :class:`~prunekit.core.errors.ConfigError`\\ s, and ``from_yaml``/``to_yaml`` read and write recipes.
    Frozen, like the dataclass it replaces.
    """

    model_config = ConfigDict(frozen=True)

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: LRSchedule = "onecycle"
    warmup: float = 0.2
    seed: int = 0
    threads: int | None = None
    accumulation_steps: int = 1
    augment: bool = True
    padding: int = 4
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    log_every: int = 10
    eval_every: int = 0
    eval_samples: int | None = None
    eval_batch_size: int = 1000

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"epochs must be > 0 (fractions allowed), got {value!r}")
        return value

    @field_validator(*_WHOLE, mode="before")
    @classmethod
    def _whole(cls, value: object, info) -> object:
        if value is not None or info.field_name not in ("steps", "threads", "eval_samples"):
            _check_int(info.field_name, value, _WHOLE[info.field_name])
        return value

    @field_validator("lr_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        if value not in ("onecycle", "cosine", "constant"):
            raise ConfigError(f"lr_schedule must be 'onecycle', 'cosine' or 'constant', got {value!r}")
        return value

    @model_validator(mode="after")
    def _combination(self) -> TrainConfig:
        if not (self.lr > 0 and 0.0 <= self.momentum < 1.0 and self.weight_decay >= 0 and 0.0 <= self.warmup < 1.0):
            raise ConfigError(
                f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0 and 0 <= warmup < 1, got lr={self.lr!r}, "
                f"momentum={self.momentum!r}, weight_decay={self.weight_decay!r}, warmup={self.warmup!r}"
            )
        if self.nesterov and self.momentum == 0:
            raise ConfigError("Nesterov momentum needs momentum > 0: set nesterov=False or a momentum")
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise ConfigError(f"mean and std need one entry per channel and std > 0, got {self.mean}, {self.std}")
        return self


class DistillConfig(StrictConfig):
    """Hinton et al. 2015 distillation: loss ``alpha T^2 KL(p_teacher^T || p_student^T) + (1 - alpha) CE``
    (:func:`~prunekit.training.distill.kd_loss`); the paper tunes both, so both are required (positionally too:
    ``DistillConfig(0.5, 2.0)``)."""

    model_config = ConfigDict(frozen=True)

    alpha: float
    temperature: float

    def __init__(self, alpha: float, temperature: float, **data: object) -> None:
        super().__init__(alpha=alpha, temperature=temperature, **data)


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of random stream ``stream`` of a run seeded ``seed`` (SHA-256, so streams
    and items never collide and nothing depends on Python's hash randomisation)."""
    digest = hashlib.sha256(f"prunekit/{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``num_examples`` (the last partial batch is dropped)."""
    steps = num_examples // batch_size
    if steps < 1:
        raise ConfigError(f"batch_size {batch_size} exceeds the {num_examples} training examples: lower it")
    return steps


def total_steps(config: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of the whole run: ``config.steps``, else ``round(epochs · steps_per_epoch)`` (at least 1)."""
    if config.steps is not None:
        return config.steps
    return max(1, round(config.epochs * steps_per_epoch(num_examples, config.batch_size)))


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total`` (see :class:`TrainConfig`).

    With ``w = max(1, round(warmup · total))`` warm-up steps: ``lr (step + 1) / w`` while ``step < w``; then
    one-cycle ``lr (total - step) / (total - w)`` (Smith & Topin 2019, linear annealing to 0), cosine
    ``lr/2 (1 + cos(π (step - w) / (total - w)))`` (Loshchilov & Hutter 2017), or ``lr``.
    """
    warm = max(1, round(config.warmup * total)) if config.warmup > 0 else 0
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.lr_schedule == "constant" or total <= warm:
        return config.lr
    progress = (step - warm) / (total - warm)  # in [0, 1)
    if config.lr_schedule == "onecycle":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch_indices(
    step: int, num_examples: int, batch_size: int, seed: int, cache: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """Example indices of global batch ``step``: slice ``step mod E`` of the permutation of epoch
    ``step // E`` (``E`` = :func:`steps_per_epoch`), drawn from a generator seeded ``derive_seed(seed, 0, epoch)``.
    ``cache`` (epoch -> permutation) avoids drawing a permutation again."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = None if cache is None else cache.get(epoch)
    if order is None:
        generator = torch.Generator().manual_seed(derive_seed(seed, PERMUTATION_STREAM, epoch))
        order = torch.randperm(num_examples, generator=generator)
        if cache is not None:
            cache.clear()  # one epoch at a time
            cache[epoch] = order
    return order[position * batch_size : (position + 1) * batch_size]


def rank_slice(batch: int, rank: int, world: int) -> slice:
    """The contiguous part of a global batch of ``batch`` examples that rank ``rank`` of ``world`` trains on."""
    if batch % world:
        raise ConfigError(f"the global batch {batch} does not split evenly over {world} ranks")
    part = batch // world
    return slice(rank * part, (rank + 1) * part)
