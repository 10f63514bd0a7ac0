"""Mixture-of-experts layers: find them by structure, and see each expert's matrices as prunable targets.

Current transformers store a MoE layer's experts *fused*: one module (``experts``) holds every expert's
weights as 3-D parameters, ``gate_up_proj`` ``(E, 2I, H)`` (or ``up_proj`` ``(E, I, H)`` without a gate) and
``down_proj`` ``(E, H, I)``, transposed in some families (GPT-OSS: ``(E, H, 2I)`` and ``(E, I, H)``), gate
and up concatenated ``[gate; up]`` or interleaved ``[g0, u0, g1, u1, ...]``, with optional biases. Its
``forward(hidden, top_k_index, top_k_weights)`` runs each expert on the tokens routed to it and sums the
outputs scaled by the routing weights. transformers' ``use_experts_implementation`` decorator records the
layout on the module (``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``,
``has_post_expert_norm``, ``_apply_gate``), and :func:`fused_layout` reads it there.

:class:`ExpertMatrix` is one expert's gate, up or down matrix as an ``(out, in)`` view of the live fused
parameter (no copy: pruning the view prunes the checkpoint's tensor). :func:`routed_through` makes a fused
experts module compute its forward through those views, one expert at a time on the tokens routed to it,
so calibration statistics are per expert and from its own tokens only (the statistics hooks of
:mod:`prunekit.calibration` see each call with the tokens' routing weights). Before the first batch goes
through, the view is checked against the module's own forward on that batch, so a family whose experts
compute something else is refused, never pruned wrongly.

Older layouts keep experts as a ``ModuleList`` of MLPs of ``nn.Linear``: those are targets as they are (each
expert is called on its routed tokens only). Routers stay dense: :func:`router_linears` names the ``nn.Linear``
routers (and shared-expert gates) of both layouts, which :func:`prunekit.models.find_targets` leaves out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import TargetError

log = logging.getLogger(__name__)

Part = Literal["gate", "up", "down"]

#: Largest relative difference allowed between the per-expert view and the module's own forward, per dtype.
VIEW_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@dataclass(frozen=True)
class FusedLayout:
    """How a fused experts module stores its weights (transformers' ``use_experts_implementation`` flags)."""

    num_experts: int
    has_gate: bool
    concatenated: bool
    transposed: bool
    has_bias: bool
    post_norm: bool

    @property
    def parts(self) -> tuple[Part, ...]:
        return ("gate", "up", "down") if self.has_gate else ("up", "down")


def fused_layout(module: nn.Module) -> FusedLayout | None:
    """The layout of a fused experts module: one with a 3-D ``down_proj`` and a 3-D ``gate_up_proj`` (or
    ``up_proj``) parameter sharing their leading (expert) dimension. ``None`` for any other module, and for
    one whose layout cannot be told for sure (its 3-D weights are then refused as unknown, not guessed at).

    transformers' flags decide where they are set; without them, a gated module is transposed when its
    ``gate_up_proj`` is ``(E, H, 2I)`` beside a ``down_proj`` ``(E, I, H)``, and not when they are ``(E, 2I, H)``
    and ``(E, H, I)``; shapes that fit both, and modules without a gate, are ambiguous."""
    down = module._parameters.get("down_proj")
    has_gate = "gate_up_proj" in module._parameters
    up = module._parameters.get("gate_up_proj" if has_gate else "up_proj")
    if down is None or up is None or down.dim() != 3 or up.dim() != 3 or down.shape[0] != up.shape[0]:
        return None
    if bool(getattr(module, "has_gate", has_gate)) != has_gate:
        return None  # flags that contradict the parameters it holds
    if hasattr(module, "is_transposed"):
        transposed = bool(module.is_transposed)
    else:
        plain = up.shape[2] == down.shape[1] and up.shape[1] == 2 * down.shape[2]
        flipped = up.shape[1] == down.shape[2] and up.shape[2] == 2 * down.shape[1]
        if not has_gate or plain == flipped:
            return None
        transposed = flipped
    bias_name = f"{'gate_up_proj' if has_gate else 'up_proj'}_bias"
    return FusedLayout(
        num_experts=int(up.shape[0]),
        has_gate=has_gate,
        concatenated=bool(getattr(module, "is_concatenated", True)),
        transposed=transposed,
        has_bias=bool(getattr(module, "has_bias", bias_name in module._parameters)),
        post_norm=bool(getattr(module, "has_post_expert_norm", False)),
    )


class ExpertMatrix(nn.Module):
    """One expert's ``gate``, ``up`` or ``down`` matrix inside a fused experts module, as an ``(out, in)``
    view of the module's *current* parameter (re-read at every access, so a streamed block whose tensors
    are replaced is seen as loaded). Calling it applies the matrix (and its bias); its second argument,
    the routing weight of each row, is ignored by the computation and read by statistics hooks.

    The owner is held outside the module tree (not a submodule), so an ``ExpertMatrix`` adds no
    parameters, no state-dict keys and no cycles."""

    def __init__(self, owner: nn.Module, layout: FusedLayout, expert: int, part: Part) -> None:
        super().__init__()
        if not 0 <= expert < layout.num_experts:
            raise ValueError(f"expert {expert} outside 0..{layout.num_experts - 1}")
        if part == "gate" and not layout.has_gate:
            raise ValueError("this experts module has no gate matrix")
        self.__dict__["owner"] = owner
        self.layout = layout
        self.expert = expert
        self.part = part

    @property
    def _param_name(self) -> str:
        if self.part == "down":
            return "down_proj"
        return "gate_up_proj" if self.layout.has_gate else "up_proj"

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        """The part's rows (output features) of an ``(out_total, ...)`` tensor of the expert."""
        if self.part == "down" or not self.layout.has_gate:
            return full
        half = full.shape[0] // 2
        if self.layout.concatenated:
            return full[:half] if self.part == "gate" else full[half:]
        return full[0::2] if self.part == "gate" else full[1::2]

    def matrix(self) -> torch.Tensor:
        """The ``(out, in)`` weight, a view sharing the fused parameter's storage."""
        stacked = getattr(self.owner, self._param_name).data[self.expert]
        return self._rows(stacked.t() if self.layout.transposed else stacked)

    def bias(self) -> torch.Tensor | None:
        if not self.layout.has_bias:
            return None
        return self._rows(getattr(self.owner, f"{self._param_name}_bias").data[self.expert])

    def forward(self, x: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.matrix(), self.bias())

    def extra_repr(self) -> str:
        out_features, in_features = self.matrix().shape
        return f"expert={self.expert}, part={self.part}, out={out_features}, in={in_features}"


def expert_matrices(name: str, owner: nn.Module) -> list[tuple[str, ExpertMatrix]]:
    """Every expert's matrices of a fused experts module called ``name``, in forward order, named
    ``{name}.{expert}.{part}_proj``; fresh views, the module is left as it is."""
    layout = fused_layout(owner)
    if layout is None:
        raise TypeError(f"{name!r} ({type(owner).__name__}) is not a fused experts module")
    return [
        (f"{name}.{e}.{part}_proj", ExpertMatrix(owner, layout, e, part))
        for e in range(layout.num_experts)
        for part in layout.parts
    ]


def fused_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused experts module of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if fused_layout(m) is not None]


def expert_index(name: str) -> int | None:
    """The expert a target belongs to, from its name: ``...experts.3.gate_proj`` -> 3 (fused or ModuleList)."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "experts" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def router_linears(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` routers of every MoE layer: in a module with an ``experts`` child (fused or
    a ``ModuleList``), the direct ``nn.Linear`` children whose output is one score per expert, or a single
    gate (Qwen2-MoE's ``shared_expert_gate``). Routers decide which expert runs; they stay dense."""
    names: set[str] = set()
    for parent_name, parent in model.named_modules():
        experts = getattr(parent, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        layout = fused_layout(experts)
        count = layout.num_experts if layout is not None else len(experts) if isinstance(experts, nn.ModuleList) else 0
        if not count:
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.out_features in (count, 1):
                names.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def unhandled_stacked_parameters(model: nn.Module, prefix: str) -> list[str]:
    """Parameters under ``prefix`` with more than two dimensions that neither a fused experts module nor a
    convolution owns: weights prunekit cannot see as matrices (an unknown expert layout), which must not be
    left dense while the report counts the rest."""
    unhandled = []
    for module_name, module in model.named_modules():
        if fused_layout(module) is not None or isinstance(module, nn.modules.conv._ConvNd):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if param.dim() > 2 and name.startswith(prefix):
                unhandled.append(name)
    return unhandled


def _routed(
    owner: nn.Module,
    layout: FusedLayout,
    matrices: dict[tuple[int, Part], ExpertMatrix],
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    call: Callable[..., torch.Tensor],
    weigh_rows: bool,
) -> torch.Tensor:
    """The fused module's computation, one expert at a time through ``matrices`` (see the module docstring).
    ``call(matrix, x, row_weight)`` applies one matrix (through its hooks, or not)."""
    out = torch.zeros_like(hidden)
    routed = top_k_index.t()  # (top_k, tokens), as transformers' eager loop
    for e in range(layout.num_experts):
        top_k_pos, token_idx = torch.where(routed == e)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        weight = top_k_weights[token_idx, top_k_pos]
        row_weight = weight if weigh_rows else None
        if layout.has_gate:
            gate = call(matrices[(e, "gate")], x, row_weight)
            up = call(matrices[(e, "up")], x, row_weight)
            joined = torch.cat([gate, up], -1) if layout.concatenated else torch.stack([gate, up], -1).flatten(-2)
            h = owner._apply_gate(joined)
        else:
            h = owner.act_fn(call(matrices[(e, "up")], x, row_weight))
        y = call(matrices[(e, "down")], h, row_weight)
        if layout.post_norm:
            y = owner.post_expert_norm(y)
        out.index_add_(0, token_idx, (y * weight.unsqueeze(-1)).to(out.dtype))
    return out


def _check_view(owner: nn.Module, name: str, original: Callable[..., Any], mine: torch.Tensor, args: tuple) -> None:
    """Refuse when the per-expert view does not reproduce the module's own forward on this batch."""
    with torch.no_grad():
        reference = original(*args)
    if not isinstance(reference, torch.Tensor) or reference.shape != mine.shape:
        raise TargetError(
            f"the experts module {name!r} ({type(owner).__name__}) returns "
            f"{type(reference).__name__} {getattr(reference, 'shape', '')}, not one tensor of its input's shape: "
            "prunekit cannot view its experts as matrices; exclude them (--exclude experts) or report the family"
        )
    scale = reference.abs().max().clamp_min(1e-12)
    difference = float((reference.float() - mine.float()).abs().max() / scale)
    tolerance = VIEW_TOLERANCE.get(reference.dtype, 1e-2)
    if difference > tolerance:
        raise TargetError(
            f"the experts of {name!r} ({type(owner).__name__}) compute something prunekit's per-expert view does "
            f"not reproduce (relative difference {difference:.2e} > {tolerance:.0e}): this layout is not "
            "supported; exclude its experts (--exclude experts) or report the family"
        )


@contextmanager
def routed_through(
    owners: Sequence[tuple[str, nn.Module]],
    matrices: Sequence[ExpertMatrix],
    *,
    weigh_rows: bool = True,
) -> Iterator[None]:
    """Within the block, each fused experts module in ``owners`` runs one expert at a time through
    :class:`ExpertMatrix` calls: the given ``matrices`` (hooked by the caller) where they belong to it, fresh
    views for the rest. Each call passes the rows' routing weights when ``weigh_rows``. The first call of
    each module is checked against its own forward (see :func:`_check_view`). The modules' own forward is
    restored on exit."""
    given = {(id(m.owner), m.expert, m.part): m for m in matrices}
    installed: list[tuple[nn.Module, Any]] = []  # with the instance forward it had (accelerate sets one)
    try:
        for name, owner in owners:
            layout = fused_layout(owner)
            assert layout is not None
            table: dict[tuple[int, Part], ExpertMatrix] = {}
            for e in range(layout.num_experts):
                for part in layout.parts:
                    table[(e, part)] = given.get((id(owner), e, part)) or ExpertMatrix(owner, layout, e, part)
            original = owner.forward
            checked: list[bool] = []

            def forward(
                hidden: torch.Tensor,
                top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor,
                owner: nn.Module = owner,
                layout: FusedLayout = layout,
                table: dict[tuple[int, Part], ExpertMatrix] = table,
                original: Callable[..., Any] = original,
                checked: list[bool] = checked,
                name: str = name,
            ) -> torch.Tensor:
                if not checked:
                    plain = _routed(owner, layout, table, hidden, top_k_index, top_k_weights, _unhooked, False)
                    _check_view(owner, name, original, plain, (hidden, top_k_index, top_k_weights))
                    checked.append(True)
                return _routed(owner, layout, table, hidden, top_k_index, top_k_weights, _hooked, weigh_rows)

            installed.append((owner, owner.__dict__.get("forward")))
            owner.forward = forward  # an instance attribute: the class's forward is untouched
        yield
    finally:
        for owner, previous in installed:
            if previous is None:
                del owner.forward
            else:
                owner.forward = previous


def _hooked(matrix: ExpertMatrix, x: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    return matrix(x, row_weight)


def _unhooked(matrix: ExpertMatrix, x: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    return matrix.forward(x, row_weight)
