"""What a :class:`~prunekit.training.sparsifier.Sparsifier` prunes, when and how: :class:`SparsifierConfig`,
validated once at construction (every bad value is a :class:`~prunekit.core.errors.ConfigError` naming the fix)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Literal

from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.core.patterns import NM, Unstructured, parse_pattern
from prunekit.training.schedules import CubicSchedule, LinearSchedule, OneShotSchedule, Schedule

Method = Literal["gmp", "granet"]
Distribution = Literal["uniform", "erk", "global"]
Init = Literal["magnitude", "erk", "uniform"]
Granularity = Literal["unstructured", "channel"] | NM


@dataclass(frozen=True, kw_only=True)
class SparsifierConfig:
    """What to prune during training, when and how (see the module docstring for the papers).

    ``schedule``: a :mod:`~prunekit.training.schedules` schedule (sparsity per optimizer step).
    ``method``: ``"gmp"`` or ``"granet"``. ``distribution``: ``"uniform"``, ``"erk"`` or ``"global"`` (Global MP).
    ``granularity``: ``"unstructured"``, ``"channel"``, or an N:M pattern (``NM(2, 4)`` or ``"2:4"``).
    ``min_density``: per-layer floor of Global MP. ``erk_power_scale``: exponent of the ERK ratio.
    ``init``: how the step-0 mask is chosen when the schedule starts sparse: by magnitude, or at random with ERK
    or uniform layer densities (sparse-to-sparse training). ``regrow_fraction``: GraNet's initial death/regrowth
    fraction ``α``; ``regrow_end_step``: ``T_end`` of its cosine decay (default: the schedule's end; GraNet uses the
    whole training run). ``mask_gradients``: zero the gradients of pruned weights with a hook.
    ``include``/``exclude``: regular expressions searched in parameter names (``"features.0.weight"``);
    ``module_types``: which modules' weights are candidates (default :data:`DEFAULT_MODULE_TYPES`).
    ``seed``: seeds the random sparse initialisation.
    """

    schedule: Schedule
    method: Method = "gmp"
    distribution: Distribution = "uniform"
    granularity: Granularity = "unstructured"
    min_density: float = 0.0
    erk_power_scale: float = 1.0
    init: Init = "magnitude"
    regrow_fraction: float = 0.5
    regrow_end_step: int | None = None
    mask_gradients: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    module_types: tuple[type[nn.Module], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, (OneShotSchedule, LinearSchedule, CubicSchedule)):
            raise ConfigError(
                f"schedule must be a OneShotSchedule, LinearSchedule or CubicSchedule, got {self.schedule!r}"
            )
        _check_choice("method", self.method, ("gmp", "granet"))
        _check_choice("distribution", self.distribution, ("uniform", "erk", "global"))
        _check_choice("init", self.init, ("magnitude", "erk", "uniform"))
        granularity = self.granularity
        if isinstance(granularity, str) and granularity not in ("unstructured", "channel"):
            granularity = parse_pattern(granularity)  # "2:4" -> NM(2, 4), or a ConfigError naming the choices
            if isinstance(granularity, Unstructured):
                granularity = "unstructured"
            object.__setattr__(self, "granularity", granularity)
        if not isinstance(granularity, NM) and granularity not in ("unstructured", "channel"):
            raise ConfigError(f"granularity must be 'unstructured', 'channel' or an N:M pattern, got {granularity!r}")
        for name in ("min_density", "regrow_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.erk_power_scale, (int, float)) or self.erk_power_scale < 0:
            raise ConfigError(f"erk_power_scale must be >= 0, got {self.erk_power_scale!r}")
        if self.regrow_end_step is not None and (
            isinstance(self.regrow_end_step, bool)
            or not isinstance(self.regrow_end_step, int)
            or self.regrow_end_step < 1
        ):
            raise ConfigError(f"regrow_end_step must be a whole number >= 1 or None, got {self.regrow_end_step!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be a whole number, got {self.seed!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
            object.__setattr__(self, name, patterns)
            for text in patterns:
                try:
                    re.compile(text)
                except (re.error, TypeError) as exc:
                    raise ConfigError(f"{name} pattern {text!r} is not a valid regular expression: {exc}") from None
        types = tuple(self.module_types)
        object.__setattr__(self, "module_types", types)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise ConfigError(f"module_types must be nn.Module classes such as nn.Linear, got {types!r}")
        self._check_combination()

    def _check_combination(self) -> None:
        structured = self.granularity != "unstructured"
        if structured and self.method != "gmp":
            raise ConfigError(
                f"GraNet regrows single weights, so it needs granularity 'unstructured', got {self.granularity}: "
                "use method='gmp' for N:M or channel pruning"
            )
        if structured and self.init != "magnitude":
            raise ConfigError(f"a random sparse init is unstructured; use init='magnitude' with {self.granularity}")
        if isinstance(self.granularity, NM):
            if self.distribution != "uniform":
                raise ConfigError("N:M granularity fixes every layer's sparsity: use distribution='uniform'")
            if not math.isclose(self.schedule.final_sparsity, self.granularity.target_sparsity, abs_tol=1e-9):
                raise ConfigError(
                    f"pattern {self.granularity} means sparsity {self.granularity.target_sparsity:g}, but the schedule "
                    f"ends at {self.schedule.final_sparsity:g}: make the schedule's final sparsity "
                    f"{self.granularity.target_sparsity:g}"
                )
        if self.granularity == "channel" and self.distribution == "global":
            raise ConfigError("row norms of different layers are not comparable: use distribution 'uniform' or 'erk'")
        if self.method == "granet" and isinstance(self.schedule, OneShotSchedule):
            raise ConfigError(
                "GraNet prunes and regrows at regular update steps: use a CubicSchedule (or LinearSchedule) "
                "with a frequency"
            )

    def describe(self) -> dict[str, str]:
        """Every field as text (stored in checkpoints to refuse resuming under another configuration)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = repr(tuple(t.__qualname__ for t in value)) if f.name == "module_types" else repr(value)
        return out


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
