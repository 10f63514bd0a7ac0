"""What a :class:`~prunekit.training.sparsifier.Sparsifier` prunes, when and how: :class:`SparsifierConfig`,
validated once at construction (every bad value is a :class:`~prunekit.core.errors.ConfigError` naming the fix)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from prunekit.core.config import StrictConfig
from prunekit.core.errors import ConfigError
from prunekit.core.patterns import NM, Unstructured, parse_pattern
from prunekit.training.schedules import CubicSchedule, LinearSchedule, OneShotSchedule
from prunekit.training.selection import ExcludePatterns, IncludePatterns, ModuleTypes

Method = Literal["gmp", "granet"]
Distribution = Literal["uniform", "erk", "global"]
Init = Literal["magnitude", "erk", "uniform"]
Granularity = Literal["unstructured", "channel"] | NM


def _granularity(value: object) -> str | NM:
    granularity = value
    if isinstance(granularity, str) and granularity not in ("unstructured", "channel"):
        granularity = parse_pattern(granularity)  # "2:4" -> NM(2, 4), or a ConfigError naming the choices
        if isinstance(granularity, Unstructured):
            granularity = "unstructured"
    if not isinstance(granularity, NM) and granularity not in ("unstructured", "channel"):
        raise ConfigError(f"granularity must be 'unstructured', 'channel' or an N:M pattern, got {granularity!r}")
    return granularity  # type: ignore[return-value]


#: A schedule: one of the schedule configs, told apart by its ``kind`` (``{kind: cubic, ...}`` in YAML).
ScheduleField = Annotated[OneShotSchedule | LinearSchedule | CubicSchedule, Field(discriminator="kind")]
#: ``"unstructured"``, ``"channel"`` or an :class:`~prunekit.core.patterns.NM` (``"2:4"`` is parsed); YAML: text.
GranularityField = Annotated[
    Granularity,
    PlainValidator(_granularity),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string"}),
]


class SparsifierConfig(StrictConfig):
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

    A strict, frozen pydantic configuration (``from_yaml``/``to_yaml``). ``schedule`` is a schedule config
    (``{kind: cubic, ...}`` in YAML); ``module_types`` holds ``nn.Module`` classes checked by a plain validator
    rather than ``arbitrary_types_allowed`` (import paths in YAML).
    """

    model_config = ConfigDict(frozen=True)

    schedule: ScheduleField
    method: Method = "gmp"
    distribution: Distribution = "uniform"
    granularity: GranularityField = "unstructured"
    min_density: float = 0.0
    erk_power_scale: float = 1.0
    init: Init = "magnitude"
    regrow_fraction: float = 0.5
    regrow_end_step: int | None = None
    mask_gradients: bool = True
    include: IncludePatterns = ()
    exclude: ExcludePatterns = ()
    module_types: ModuleTypes = ()
    seed: int = 0

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        kinds = ("oneshot", "linear", "cubic")
        if isinstance(value, (OneShotSchedule, LinearSchedule, CubicSchedule)):
            return value
        if isinstance(value, dict) and value.get("kind") in kinds:
            return value
        raise ConfigError(
            "schedule must be a OneShotSchedule, LinearSchedule or CubicSchedule (in YAML a mapping with kind: "
            f"{' | '.join(kinds)} beside its fields), got {value!r}"
        )

    @field_validator("method", "distribution", "init", mode="before")
    @classmethod
    def _choice(cls, value: object, info: ValidationInfo) -> object:
        choices = {"method": ("gmp", "granet"), "distribution": ("uniform", "erk", "global")}
        _check_choice(info.field_name, value, choices.get(info.field_name, ("magnitude", "erk", "uniform")))
        return value

    @field_validator("min_density", "regrow_fraction", mode="before")
    @classmethod
    def _fraction(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{info.field_name} must be in [0, 1], got {value!r}")
        return value

    @field_validator("erk_power_scale", mode="before")
    @classmethod
    def _power(cls, value: object) -> object:
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"erk_power_scale must be >= 0, got {value!r}")
        return value

    @field_validator("regrow_end_step", mode="before")
    @classmethod
    def _end(cls, value: object) -> object:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"regrow_end_step must be a whole number >= 1 or None, got {value!r}")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"seed must be a whole number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _combination(self) -> SparsifierConfig:
        self._check_combination()
        return self

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
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name] = repr(tuple(t.__qualname__ for t in value)) if name == "module_types" else repr(value)
        return out


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
