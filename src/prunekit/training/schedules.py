"""Sparsity schedules for pruning during training: frozen strict configs (the one config style,
:class:`~prunekit.core.config.StrictConfig`) and pure functions over them.

A schedule says which sparsity a model should have after optimizer step ``t`` and at which steps the mask
may change ("update steps"); between update steps the sparsity holds.

* :class:`OneShotSchedule`: dense (sparsity 0) before ``step``, ``sparsity`` from ``step`` on.
* :class:`LinearSchedule`: ``s_i`` until ``t0``, then ``s_t = s_i + (s_f - s_i) (t - t0) / (n Δt)`` at the update steps
  ``t0, t0 + Δt, ..., t0 + nΔt``, ``s_f`` after.
* :class:`CubicSchedule`: gradual pruning of Zhu & Gupta 2017 ("To prune or not to prune", eq. 1)::

      s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3     for t in {t0, t0 + Δt, ..., t0 + nΔt}

  fast pruning early (many redundant weights) and slow near the end.

``start_step`` is ``t0``, ``end_step`` is ``t0 + nΔt`` and ``frequency`` is ``Δt``; ``end_step - start_step`` must be
a multiple of ``frequency`` so that ``s_f`` is reached on an update step. In YAML a schedule is a mapping with
its ``kind`` (``oneshot``, ``linear``, ``cubic``) beside its fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, field_validator, model_validator

from prunekit.core.config import StrictConfig
from prunekit.core.errors import ConfigError


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")


def _check_sparsity(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{name} must be in [0, 1), got {value!r}: pass e.g. 0.9 to remove 90% of the weights "
            "(sparsity 1 would remove every weight)"
        )


class _Schedule(StrictConfig):
    model_config = ConfigDict(frozen=True)

    def sparsity_at(self, step: int) -> float:
        """See :func:`sparsity_at`."""
        return sparsity_at(step, self)  # type: ignore[arg-type]

    def is_update_step(self, step: int) -> bool:
        """See :func:`is_update_step`."""
        return is_update_step(step, self)  # type: ignore[arg-type]


class OneShotSchedule(_Schedule):
    """Prune once, at optimizer step ``step``, to ``sparsity``; dense before, constant after."""

    kind: Literal["oneshot"] = "oneshot"
    sparsity: float
    step: int = 0

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, value: object) -> object:
        _check_sparsity("sparsity", value)
        return value

    @field_validator("step", mode="before")
    @classmethod
    def _step(cls, value: object) -> object:
        _check_int("step", value, 0)
        return value

    @property
    def final_sparsity(self) -> float:
        """The sparsity from ``step`` on."""
        return float(self.sparsity)

    @property
    def end_step(self) -> int:
        """The last (and only) update step."""
        return self.step


class _Gradual(_Schedule):
    final_sparsity: float
    start_step: int
    end_step: int
    frequency: int = 1
    initial_sparsity: float = 0.0

    @field_validator("final_sparsity", "initial_sparsity", mode="before")
    @classmethod
    def _sparsities(cls, value: object, info: object) -> object:
        _check_sparsity(getattr(info, "field_name", "sparsity"), value)
        return value

    @field_validator("start_step", "end_step", mode="before")
    @classmethod
    def _steps(cls, value: object, info: object) -> object:
        _check_int(getattr(info, "field_name", "step"), value, 0)
        return value

    @field_validator("frequency", mode="before")
    @classmethod
    def _frequency(cls, value: object) -> object:
        _check_int("frequency", value, 1)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _Gradual:
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(
                f"initial_sparsity {self.initial_sparsity:g} exceeds final_sparsity {self.final_sparsity:g}: "
                "pruning schedules only remove weights; swap them"
            )
        if self.end_step <= self.start_step:
            raise ConfigError(
                f"end_step ({self.end_step}) must be after start_step ({self.start_step}): "
                "use OneShotSchedule to prune at a single step"
            )
        if (self.end_step - self.start_step) % self.frequency:
            raise ConfigError(
                f"end_step - start_step = {self.end_step - self.start_step} is not a multiple of frequency "
                f"{self.frequency}: the final sparsity would never be reached on an update step; "
                f"set end_step to {self.start_step + (self.end_step - self.start_step) // self.frequency * self.frequency}"
                f" or {self.start_step + ((self.end_step - self.start_step) // self.frequency + 1) * self.frequency}"
            )
        return self

    @property
    def num_updates(self) -> int:
        """``n``: the number of pruning updates after ``t0`` (``t0 + nΔt = end_step``)."""
        return (self.end_step - self.start_step) // self.frequency


class LinearSchedule(_Gradual):
    """Sparsity rising linearly from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``,
    changing only every ``frequency`` steps."""

    kind: Literal["linear"] = "linear"


class CubicSchedule(_Gradual):
    """Gradual magnitude pruning schedule of Zhu & Gupta 2017, eq. 1 (cubic decay of the remaining gap)."""

    kind: Literal["cubic"] = "cubic"


Schedule = OneShotSchedule | LinearSchedule | CubicSchedule


def last_update_step(step: int, schedule: Schedule) -> int | None:
    """The latest update step ``<= step`` (``None`` before the first one)."""
    if isinstance(schedule, OneShotSchedule):
        return schedule.step if step >= schedule.step else None
    if step < schedule.start_step:
        return None
    k = min((step - schedule.start_step) // schedule.frequency, schedule.num_updates)
    return schedule.start_step + k * schedule.frequency


def sparsity_at(step: int, schedule: Schedule) -> float:
    """Target sparsity after optimizer step ``step`` (held between update steps).

    Cubic: Zhu & Gupta 2017 eq. 1, ``s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3`` evaluated at the latest update
    step ``t <= step``; ``s_i`` before ``t0`` and ``s_f`` after ``t0 + nΔt``. Linear: the same with exponent 1.
    OneShot: 0 before its step, its sparsity from then on.
    """
    t = last_update_step(step, schedule)
    if isinstance(schedule, OneShotSchedule):
        return 0.0 if t is None else float(schedule.sparsity)
    s_i, s_f = float(schedule.initial_sparsity), float(schedule.final_sparsity)
    if t is None:
        return s_i
    progress = (t - schedule.start_step) / (schedule.end_step - schedule.start_step)  # (t - t0) / (nΔt), in [0, 1]
    if isinstance(schedule, CubicSchedule):
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3
    return s_i + (s_f - s_i) * progress


def is_update_step(step: int, schedule: Schedule) -> bool:
    """True at the steps where the mask may change: ``t0 + kΔt`` for ``k = 0..n`` (OneShot: its one step)."""
    return last_update_step(step, schedule) == step
