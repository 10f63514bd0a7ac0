"""The registry of one-shot methods: a method registered here is found by the configuration, the recipe
and the command line without any other module knowing its name (as PEFT's ``register_peft_method``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from prunekit.core.errors import ConfigError
from prunekit.methods.base import OneShotMethod

M = TypeVar("M", bound=type[OneShotMethod])

_METHODS: dict[str, type[OneShotMethod]] = {}


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name``. A second class under a taken name is an
    error (unregister the first, or choose another name)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute 'name' to be registered")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({_METHODS[name].__qualname__})")
    _METHODS[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plug-ins that replace one)."""
    _METHODS.pop(name, None)


@contextmanager
def registered(cls: type[OneShotMethod]) -> Iterator[type[OneShotMethod]]:
    """Register ``cls`` for the length of a ``with`` block."""
    register_method(cls)
    try:
        yield cls
    finally:
        unregister_method(cls.name)


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type[OneShotMethod]:
    """Look a method up, with an error that lists the registered ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(method_names())}") from None


def method_classes() -> list[type[OneShotMethod]]:
    """Every registered method class, by name."""
    return [_METHODS[name] for name in method_names()]
