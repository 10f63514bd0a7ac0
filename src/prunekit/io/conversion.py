"""Checkpoint tensor names as transformers converts them at load time, for streaming one block at a time.

transformers saves some families in their original format and converts at load: Mixtral's experts are stored
one by one (``block_sparse_moe.experts.3.w1.weight``) and become one fused ``mlp.experts.gate_up_proj``; other
keys are only renamed. :class:`ConvertedCheckpoint` presents such a checkpoint under the model's own parameter
names, using transformers' own conversion table for the model (``get_model_conversion_mapping``) and its own
operations (stack the experts, concatenate gate and up), so a streamed block is assembled exactly as
``from_pretrained`` would assemble it. A conversion with an operation other than stacking, concatenating or
transposing is not offered (the tensor stays missing and loading says so).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.io.safetensors_files import SafetensorsCheckpoint, write_safetensors

log = logging.getLogger(__name__)

#: transformers conversion operations a streamed tensor may go through (by class name).
SUPPORTED_OPERATIONS = {"MergeModulelist", "Concatenate", "Transpose"}


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ConvertedCheckpoint:
    """A :class:`SafetensorsCheckpoint` read under the model's parameter names (see the module docstring).
    It offers the same reading interface: ``names``, ``in``, ``dtype``, ``read``, ``map``, ``copy_to``."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        self.checkpoint = checkpoint
        self.directory = checkpoint.directory
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        wanted = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        self._direct: dict[str, str] = {}  # model name -> checkpoint name
        self._fused: dict[str, tuple[Any, dict[str, list[str]]]] = {}  # model name -> (converter, pattern -> names)
        for name in checkpoint.names:
            renamed, pattern = rename_source_key(name, renamings, converters)
            if pattern is None:
                if renamed in wanted:
                    self._direct[renamed] = name
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            ops = {type(op).__name__ for op in converter.operations}
            if not ops <= SUPPORTED_OPERATIONS or renamed not in wanted:
                log.debug("not streaming %s -> %s (operations %s)", name, renamed, sorted(ops))
                continue
            groups = self._fused.setdefault(renamed, (converter, {}))[1]
            groups.setdefault(pattern, []).append(name)
        for target, (converter, groups) in list(self._fused.items()):
            for names in groups.values():
                names.sort(key=_natural)  # expert 0, 1, ..., 10 (as transformers orders them)
            counts = {len(groups.get(pattern, [])) for pattern in converter.source_patterns}
            if len(counts) != 1 or 0 in counts:  # a part missing (w3 of some expert...): not offered
                log.debug("not streaming %s: its parts are incomplete (%s)", target, sorted(counts))
                del self._fused[target]

    @property
    def names(self) -> list[str]:
        return [*self._direct, *self._fused]

    def __contains__(self, name: str) -> bool:
        return name in self._direct or name in self._fused

    def dtype(self, name: str) -> torch.dtype:
        if name in self._direct:
            return self.checkpoint.dtype(self._direct[name])
        first = next(iter(self._fused[name][1].values()))[0]
        return self.checkpoint.dtype(first)

    def read(self, name: str) -> torch.Tensor:
        """The tensor of model parameter ``name``: read, or assembled from its stored parts."""
        if name in self._direct:
            return self.checkpoint.read(self._direct[name])
        converter, groups = self._fused[name]
        parts: dict[str, Any] = {
            pattern: [self.checkpoint.read(n) for n in groups[pattern]]
            for pattern in converter.source_patterns
            if pattern in groups
        }
        for operation in converter.operations:
            parts = operation.convert(
                parts,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=name,
            )
        (tensor,) = parts.values()
        return tensor

    def map(self, name: str) -> torch.Tensor:
        if name in self._direct:
            return self.checkpoint.map(self._direct[name])
        return self.read(name)

    def copy_to(self, name: str, path: Path, chunk_bytes: int = 16 << 20) -> int:
        """Write tensor ``name`` alone, under that name, into a new safetensors file; returns its size."""
        if self._direct.get(name) == name:
            return self.checkpoint.copy_to(name, path, chunk_bytes)
        tensor = self.read(name)
        write_safetensors(path, {name: tensor}, metadata={"format": "pt"})
        return tensor.numel() * tensor.element_size()


def converted_if_needed(
    checkpoint: SafetensorsCheckpoint, model: nn.Module
) -> SafetensorsCheckpoint | ConvertedCheckpoint:
    """The checkpoint as is when it stores every parameter under the model's name, else read through
    transformers' conversion of the model's family (when that covers what is missing)."""
    missing = [name for name, _ in model.named_parameters() if name not in checkpoint]
    if not missing:
        return checkpoint
    try:
        converted = ConvertedCheckpoint(checkpoint, model)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:  # an older or newer transformers
        log.debug("no checkpoint conversion for %s: %s", type(model).__name__, exc)
        return checkpoint
    return converted if all(name in converted for name in missing) else checkpoint
