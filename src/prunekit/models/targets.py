"""Prunable targets: a target is a weight *matrix*, whatever module stores it.

Adapters turn a module into an ``(out, in)`` view of its weight: ``nn.Linear`` (and subclasses) as is,
transformers' GPT-2-style ``Conv1D`` (stored ``(in, out)``) transposed, and one expert's gate, up or down
matrix inside fused 3-D expert parameters (:class:`prunekit.models.experts.ExpertMatrix`). The view shares
storage, so masking it in place prunes the module. MoE routers are never targets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.core.errors import TargetError
from prunekit.models.experts import (
    ExpertMatrix,
    expert_index,
    expert_matrices,
    fused_layout,
    router_linears,
    unhandled_stacked_parameters,
)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_map(module: nn.Module) -> bool:
    """True for modules whose weight is one linear map: ``nn.Linear`` (and subclasses), HF ``Conv1D``, one
    expert's matrix of fused experts."""
    return isinstance(module, (nn.Linear, ExpertMatrix)) or _is_hf_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``(out, in)`` tensor view sharing its storage."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if _is_hf_conv1d(module):
        return module.weight.data.t()
    if isinstance(module, ExpertMatrix):
        return module.matrix()
    raise TypeError(f"{type(module).__name__} is not a supported linear map")


@dataclass(frozen=True)
class Target:
    """A prunable weight matrix: its module's full name, the module, its block (None: outside) and, for an
    expert's matrix of a MoE layer, the expert's index."""

    name: str
    module: nn.Module
    block_index: int | None
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = weight_matrix(self.module).shape
        return out_features, in_features


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    """Compile name patterns (regular expressions searched in module names) once, with a clear error."""
    compiled = []
    for text in patterns:
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise TargetError(f"{what} pattern {text!r} is not a valid regular expression: {exc}") from None
    return compiled


def find_targets(
    model: nn.Module,
    blocks_name: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[Target]:
    """Select the linear maps to prune, in forward order.

    Default: every linear map inside the decoder blocks (``blocks_name``), each expert's gate, up and down
    matrices of MoE layers included and their routers left out. ``include`` patterns replace
    that default with every linear map of the model whose name matches one (so ``lm_head`` can be asked
    for); ``exclude`` patterns then drop matches. A pattern that matches nothing is an error (a typo
    would otherwise silently prune the wrong thing).
    """
    prefix = blocks_name + "."
    unhandled = [] if include else unhandled_stacked_parameters(model, prefix)
    if unhandled:
        raise TargetError(
            f"{type(model).__name__} stores weights prunekit cannot see as matrices ({', '.join(unhandled[:3])}"
            f"{', ...' if len(unhandled) > 3 else ''}): an expert layout it does not know, which the default "
            "targets would leave dense while reporting the rest as pruned. Name the layers to prune with "
            "--include (the report then covers just those), and please report the family"
        )
    routers = router_linears(model)

    def block_of(name: str) -> int | None:
        return int(name[len(prefix) :].split(".", 1)[0]) if name.startswith(prefix) else None

    candidates: list[Target] = []
    for name, module in model.named_modules():
        if fused_layout(module) is not None:
            block_index = block_of(name)
            candidates += [Target(n, m, block_index, m.expert) for n, m in expert_matrices(name, module)]
        elif is_linear_map(module) and name not in routers:
            candidates.append(Target(name, module, block_of(name), expert_index(name)))
    if not candidates:
        raise TargetError(f"{type(model).__name__} has no linear layer to prune (nn.Linear or Conv1D)")

    if include:
        selected = []
        for pattern in compile_patterns(include, "include"):
            hits = [t for t in candidates if pattern.search(t.name)]
            if not hits:
                raise TargetError(
                    f"include pattern {pattern.pattern!r} matches no linear layer; layer names look like "
                    f"{candidates[0].name!r}"
                )
            selected.extend(t for t in hits if t not in selected)
        selected.sort(key=candidates.index)
    else:
        selected = [t for t in candidates if t.block_index is not None]
        if not selected:
            raise TargetError(f"no linear layer inside the decoder blocks {blocks_name!r}")

    for pattern in compile_patterns(exclude, "exclude"):
        kept = [t for t in selected if not pattern.search(t.name)]
        if len(kept) == len(selected):
            raise TargetError(
                f"exclude pattern {pattern.pattern!r} matches no selected layer; layer names look like "
                f"{selected[0].name!r}"
            )
        selected = kept
    if not selected:
        raise TargetError("the include/exclude patterns leave no layer to prune")
    return selected
