"""Which weights a sparsifier prunes: the selection by module type and name pattern, and the ``(out, in·k·k)``
matrix view every mask decision works on."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema
from torch import nn

from prunekit.core.errors import ConfigError, TargetError
from prunekit.models.targets import is_linear_map

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules pruned by default (plus transformers' GPT-2-style ``Conv1D``); ``nn.MultiheadAttention`` can be added
(its ``in_proj_weight`` is then pruned; its ``out_proj`` is an ``nn.Linear`` already)."""


def _patterns(value: object, name: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]
    for text in patterns:
        try:
            re.compile(text)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{name} pattern {text!r} is not a valid regular expression: {exc}") from None
    return patterns


def _module_type(value: object) -> object:
    """A class, or its import path (``"torch.nn.Linear"``, as :func:`_type_path` writes it in YAML)."""
    if not isinstance(value, str):
        return value
    module, _, name = value.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"module_types: cannot import {value!r}: give a class's import path") from None


def _module_types(value: object) -> tuple[type[nn.Module], ...]:
    types = tuple(_module_type(t) for t in value)  # type: ignore[union-attr]
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ConfigError(f"module_types must be nn.Module classes such as nn.Linear, got {types!r}")
    return types  # type: ignore[return-value]


def _type_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: ``include``/``exclude`` fields of the training configurations: regular expressions (one string or several),
#: each checked to compile (the error names the field).
IncludePatterns = Annotated[
    tuple[str, ...],
    PlainValidator(lambda v: _patterns(v, "include")),
    PlainSerializer(list, return_type=list[str]),
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]
ExcludePatterns = Annotated[
    tuple[str, ...],
    PlainValidator(lambda v: _patterns(v, "exclude")),
    PlainSerializer(list, return_type=list[str]),
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]
#: ``module_types`` fields: ``nn.Module`` classes (not data, so a plain validator checks them); in YAML, import
#: paths such as ``torch.nn.modules.linear.Linear``.
ModuleTypes = Annotated[
    tuple[type[nn.Module], ...],
    PlainValidator(_module_types),
    PlainSerializer(lambda types: [_type_path(t) for t in types], return_type=list[str]),
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]


class TargetSelectionError(TargetError, ConfigError):
    """A name pattern or module type selects no parameter (a :class:`~prunekit.core.errors.TargetError`, as in
    one-shot pruning, and a :class:`~prunekit.core.errors.ConfigError`)."""


@dataclass(frozen=True, eq=False)
class SparseParameter:
    """A pruned parameter: its full name, the tensor, and whether it stores ``(in, out)`` (transformers' Conv1D)."""

    name: str
    parameter: nn.Parameter
    transposed: bool = False


def _weights_of(module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    else:
        names = ("weight",)
    return [
        n for n in names if isinstance(module._parameters.get(n), nn.Parameter) and module._parameters[n].dim() >= 2
    ]


def select_parameters(
    model: nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    module_types: tuple[type[nn.Module], ...] = (),
) -> list[SparseParameter]:
    """The weights to prune, in model order: weights of ``module_types`` (default: Linear, Conv1d/2d/3d and
    transformers' ``Conv1D``), kept if an ``include`` pattern matches their name (all when none is given), minus
    ``exclude`` matches. A pattern that matches nothing, or an empty selection, is a :class:`TargetSelectionError`.
    """
    candidates: list[SparseParameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if module_types:
            chosen = isinstance(module, module_types)
        else:
            chosen = isinstance(module, DEFAULT_MODULE_TYPES) or is_linear_map(module)
        if not chosen:
            continue
        transposed = is_linear_map(module) and not isinstance(module, nn.Linear)
        for param_name in _weights_of(module):
            parameter = module._parameters[param_name]
            if id(parameter) in seen:  # tied weights are pruned once
                continue
            seen.add(id(parameter))
            full = f"{module_name}.{param_name}" if module_name else param_name
            candidates.append(SparseParameter(full, parameter, transposed))
    if not candidates:
        kinds = ", ".join(t.__name__ for t in (module_types or DEFAULT_MODULE_TYPES))
        raise TargetSelectionError(f"{type(model).__name__} has no weight to prune among {kinds}: set module_types")
    selected = candidates
    if include:
        selected = []
        for text in include:
            hits = [p for p in candidates if re.search(text, p.name)]
            if not hits:
                raise TargetSelectionError(
                    f"include pattern {text!r} matches no prunable weight; names look like {candidates[0].name!r}"
                )
            selected.extend(p for p in hits if p not in selected)
        selected.sort(key=candidates.index)
    for text in exclude:
        kept = [p for p in selected if not re.search(text, p.name)]
        if len(kept) == len(selected):
            raise TargetSelectionError(
                f"exclude pattern {text!r} matches no selected weight; names look like {selected[0].name!r}"
            )
        selected = kept
    if not selected:
        raise TargetSelectionError("the include/exclude patterns leave no weight to prune")
    return selected


def as_matrix(tensor: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """A weight (or mask) as an ``(out, in·k·k)`` matrix: conv kernels flattened, ``(in, out)`` storage transposed."""
    return tensor.t() if transposed else tensor.reshape(tensor.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: torch.Size, transposed: bool = False) -> torch.Tensor:
    """Inverse of :func:`as_matrix` (contiguous)."""
    return matrix.t().contiguous() if transposed else matrix.reshape(shape).contiguous()
