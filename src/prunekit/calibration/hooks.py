"""Collect what modules receive and return while a model runs: the one way prunekit hooks activations.

:func:`observe` registers forward (pre-)hooks on named modules for the length of a ``with`` block and
removes them on exit, whatever happens inside. Every statistic that is gathered outside the streamed
calibration engine (block influence, attention scores, activation spreads, layer input norms and Grams,
module inputs and outputs) is a pair of callbacks given to it; :func:`run_batches` runs the model over
calibration batches under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: ``on_input(name, args, kwargs)``: called before a module runs, with the call's arguments.
InputCallback = Callable[[str, tuple[Any, ...], dict[str, Any]], None]
#: ``on_output(name, args, kwargs, output)``: called after a module runs.
OutputCallback = Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]
#: A calibration batch: the positional and keyword arguments of one model call.
Batch = tuple[tuple[Any, ...], dict[str, Any]]


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any], keyword: str = "hidden_states") -> Any:
    """A call's first positional argument, or its ``keyword`` argument (transformers passes hidden states
    by keyword in some layers), or ``None``."""
    if args:
        return args[0]
    return kwargs.get(keyword, next(iter(kwargs.values()), None))


def first_output(output: Any) -> Any:
    """A module's main output: itself, or the first element of a tuple or list."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def observe(
    modules: Mapping[str, nn.Module],
    *,
    on_input: InputCallback | None = None,
    on_output: OutputCallback | None = None,
) -> Iterator[None]:
    """Call ``on_input`` before and ``on_output`` after every call of every module in ``modules``
    (``name -> module``) while the ``with`` block runs."""
    handles = []

    def before(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            assert on_input is not None
            on_input(name, args, kwargs)

        return hook

    def after(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            assert on_output is not None
            on_output(name, args, kwargs, output)

        return hook

    try:
        for name, module in modules.items():
            if on_input is not None:
                handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            if on_output is not None:
                handles.append(module.register_forward_hook(after(name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_batches(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Call ``model(*args, **kwargs)`` for every batch without gradients; return the number of batches."""
    count = 0
    with torch.no_grad():
        for args, kwargs in batches:
            model(*args, **kwargs)
            count += 1
    return count
