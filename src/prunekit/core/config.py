"""The one configuration style of every pipeline: typed, strict (unknown keys are errors that name the key),
validated by pydantic, readable from and writable to YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from prunekit.core.errors import ConfigError

C = TypeVar("C", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base of every configuration section: unknown keys and invalid values raise :class:`ConfigError` with one
    ``location: message`` per problem; assignments are validated too; ``from_yaml``/``to_yaml`` for recipes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = ConfigError(format_validation_error(exc))
            error.problems = tuple(_problems(exc))  # read back when this section is nested in another
            raise error from None

    def __setattr__(self, name: str, value: Any) -> None:
        """Validated assignment; an invalid value raises :class:`ConfigError` and leaves the config as it was."""
        before = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            self.__dict__[name] = before  # whole-model validators run after the field was set
            raise ConfigError(format_validation_error(exc)) from None

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Validate a plain dict, turning pydantic's error into a :class:`ConfigError` that names the key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        """Load a YAML recipe file (a mapping of this configuration's keys)."""
        return cls.from_dict(read_yaml_mapping(path))

    def to_yaml(self) -> str:
        """The configuration as YAML, every key spelled out (what ``--print-recipe`` prints)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML recipe file holds, unvalidated (flags are laid over it before validation)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe file {str(file)!r} not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(file)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(file)!r} must be a mapping of sections or keys")
    return data


_PREFIX = "invalid configuration: "


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted location, message)`` per problem. pydantic calls a nested section's own ``__init__``,
    whose :class:`ConfigError` carries its problems: their locations are joined to the section's."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, ConfigError) and inner.problems:
            problems += [(f"{where}.{loc}" if where and loc else where or loc, msg) for loc, msg in inner.problems]
        elif err["type"] == "extra_forbidden":
            problems.append((where, "unknown key; check the spelling (the README lists every key)"))
        else:
            problems.append((where, err["msg"].removeprefix("Value error, ")))
    return problems


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``location: message``, with unknown keys called out as such."""
    return _PREFIX + "; ".join(f"{where}: {msg}" if where else msg for where, msg in _problems(exc))
