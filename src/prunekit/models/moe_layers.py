"""Mixture-of-experts layers as whole units: find each layer's router and fused experts by structure, compute
one expert's output, and remove (or merge away) whole experts, router rows and config counts included.

A MoE layer is a module with a fused ``experts`` child (:func:`prunekit.models.experts.fused_layout`) and a
router child: the one other child whose ``weight`` is ``(num_experts, hidden)`` (``gate`` in Mixtral, Qwen
and DeepSeek, ``router`` in GPT-OSS and Granite-MoE). No family table: shared experts, shared-expert gates
and grouped routing are whatever else the layer holds, and are left as they are.

Removing experts keeps the same number in every layer, so the model's config stays a plain config that
``from_pretrained`` loads: every tensor of the experts module and of the router whose first dimension counts
experts is sliced (weights, biases, DeepSeek's ``e_score_correction_bias``), and every integer attribute
that holds the count (``num_experts``, ``num_local_experts``, ``n_routed_experts``) is updated on the
modules and the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError, TargetError
from prunekit.models.experts import FusedLayout, fused_layout

#: Config attributes that hold the number of routed experts per layer, across families.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: Module attributes that hold it.
MODULE_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class MoeLayer:
    """One MoE layer of a model: its full name, the layer module, its router and its fused experts."""

    name: str
    module: nn.Module
    router_name: str
    router: nn.Module
    experts: nn.Module
    layout: FusedLayout
    top_k: int
    #: expert groups of grouped routing (DeepSeek-V3's ``n_group``); 1 without
    groups: int = 1

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts


def _top_k(layer: nn.Module, router: nn.Module, config: object) -> int:
    for owner in (router, layer):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int):
            return value
    value = getattr(config, "num_experts_per_tok", None)
    if isinstance(value, int):
        return value
    raise TargetError(f"cannot tell how many experts {type(layer).__name__} routes each token to (top_k)")


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE layer of ``model`` with fused experts, in module order (see the module docstring)."""
    config = getattr(model, "config", None)
    layers = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or experts not in module.children():
            continue
        layout = fused_layout(experts)
        if layout is None:
            continue
        routers = [
            (child_name, child)
            for child_name, child in module.named_children()
            if child is not experts
            and isinstance(getattr(child, "weight", None), torch.Tensor)
            and child.weight.dim() == 2
            and child.weight.shape[0] == layout.num_experts
        ]
        if len(routers) != 1:
            raise TargetError(
                f"the MoE layer {name!r} ({type(module).__name__}) has {len(routers)} candidate routers (children "
                f"with a ({layout.num_experts}, hidden) weight): its experts cannot be removed safely"
            )
        router_name, router = routers[0]
        groups = getattr(router, "num_group", None) or getattr(config, "n_group", None) or 1
        layers.append(
            MoeLayer(
                name=name,
                module=module,
                router_name=f"{name}.{router_name}" if name else router_name,
                router=router,
                experts=experts,
                layout=layout,
                top_k=_top_k(module, router, config),
                groups=int(groups),
            )
        )
    return layers


def expert_output(layer: MoeLayer, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``f_e(x)``: expert ``expert``'s output for rows ``x`` ``(tokens, hidden)``, before its routing weight."""
    experts, layout = layer.experts, layer.layout
    name = "gate_up_proj" if layout.has_gate else "up_proj"
    first = getattr(experts, name)[expert]
    first_bias = getattr(experts, f"{name}_bias")[expert] if layout.has_bias else None
    down = experts.down_proj[expert]
    down_bias = experts.down_proj_bias[expert] if layout.has_bias else None
    h = F.linear(x, first.t() if layout.transposed else first, first_bias)
    h = experts._apply_gate(h) if layout.has_gate else experts.act_fn(h)
    y = F.linear(h, down.t() if layout.transposed else down, down_bias)
    return experts.post_expert_norm(y) if layout.post_norm else y


def check_removal(layer: MoeLayer, keep: Sequence[int]) -> None:
    """Refuse a kept set that the layer cannot route with: fewer than ``top_k`` experts, unknown or repeated
    indices, or (grouped routing) groups of unequal size or too few experts in the groups a token may use."""
    count = len(keep)
    if sorted(set(keep)) != sorted(keep) or any(not 0 <= e < layer.num_experts for e in keep):
        raise ConfigError(f"{layer.name}: experts to keep must be distinct indices in 0..{layer.num_experts - 1}")
    if count < layer.top_k:
        raise ConfigError(
            f"{layer.name}: keeping {count} experts leaves fewer than the {layer.top_k} each token is routed to "
            f"(num_experts_per_tok): remove at most {layer.num_experts - layer.top_k} experts per layer"
        )
    if layer.groups > 1:
        size = layer.num_experts // layer.groups
        per_group = [sum(1 for e in keep if e // size == g) for g in range(layer.groups)]
        if len(set(per_group)) != 1:
            raise ConfigError(
                f"{layer.name} routes within {layer.groups} expert groups (grouped routing): keep the same number "
                f"of experts in every group (got {per_group}); remove a multiple of {layer.groups} experts"
            )
        topk_group = getattr(layer.router, "topk_group", 1)
        if per_group[0] * topk_group < layer.top_k or per_group[0] < 2:
            raise ConfigError(
                f"{layer.name}: {per_group[0]} experts per group x {topk_group} groups per token cannot supply the "
                f"{layer.top_k} experts each token needs (and group scores need 2 per group): remove fewer"
            )


def merge_into(
    layer: MoeLayer, merges: Mapping[int, Sequence[tuple[int, float]]], kept_mass: Mapping[int, float]
) -> None:
    """Fold removed experts into kept ones (before :func:`remove_experts`): for each kept expert ``k`` with
    removed experts ``[(r, mass_r), ...]``, every expert tensor becomes the routing-mass-weighted mean
    ``(m_k W_k + sum_r m_r W_r) / (m_k + sum_r m_r)`` (the merge of REAP's and HC-SMoE's baselines)."""
    with torch.no_grad():
        for kept, absorbed in merges.items():
            if not absorbed:
                continue
            total = kept_mass[kept] + sum(m for _, m in absorbed)
            if total <= 0:
                continue
            for param in layer.experts.parameters(recurse=False):
                merged = param[kept] * (kept_mass[kept] / total)
                for removed, mass in absorbed:
                    merged = merged + param[removed] * (mass / total)
                param[kept] = merged


def remove_experts(model: nn.Module, layer: MoeLayer, keep: Sequence[int]) -> None:
    """Keep only the experts ``keep`` of ``layer`` in ``model`` (in ascending order): slice the per-expert
    tensors of the experts module, of the router and of the layer itself, and update the counts on the modules
    (the config: :func:`sync_config`). A router that holds per-expert tensors elsewhere (in a submodule, or
    along another dimension) is refused: slicing part of it would leave a model that fails later."""
    keep = sorted(keep)
    check_removal(layer, keep)
    old = layer.num_experts
    index = torch.tensor(keep, dtype=torch.long)
    sliced: set[int] = set()
    for module, everything in ((layer.experts, True), (layer.router, True), (layer.module, False)):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1 and param.shape[0] == old and (everything or name.endswith("bias")):
                new = nn.Parameter(param.data.index_select(0, index.to(param.device)).clone(), param.requires_grad)
                module._parameters[name] = new
                sliced.add(id(new))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == old and (everything or "bias" in name):
                module._buffers[name] = buffer.index_select(0, index.to(buffer.device)).clone()
                sliced.add(id(module._buffers[name]))
    leftover = [
        name
        for name, tensor in [*layer.router.named_parameters(), *layer.router.named_buffers()]
        if id(tensor) not in sliced and old in tensor.shape
    ]
    if leftover:
        raise TargetError(
            f"the router of {layer.name!r} holds per-expert tensors prunekit does not know how to slice "
            f"({', '.join(leftover)}): experts cannot be removed from this family; please report it"
        )
    for module in (layer.module, layer.router, layer.experts):
        for key in MODULE_COUNT_KEYS:
            if getattr(module, key, None) == old:
                setattr(module, key, len(keep))
    new_layout = fused_layout(layer.experts)
    assert new_layout is not None and new_layout.num_experts == len(keep)
    layer.layout = new_layout


def config_count_keys(model: nn.Module, count: int) -> list[str]:
    """The keys of the model's config that hold the expert count ``count``; ``[]`` for a model without a
    config. Refuses a config that has none (a model with experts removed would not reload from it)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    keys = [key for key in EXPERT_COUNT_KEYS if getattr(config, key, None) == count]
    if not keys:
        raise TargetError(
            f"the model's config has no expert count equal to {count} ({', '.join(EXPERT_COUNT_KEYS)}): a model "
            "with experts removed could not be reloaded from it; please report the family"
        )
    return keys


def sync_config(model: nn.Module, old: int, new: int) -> list[str]:
    """Set every expert-count key of the model's config that says ``old`` to ``new`` (and the count held by
    any module of the model, such as ``MixtralForCausalLM.num_experts``); returns the config keys set."""
    keys = config_count_keys(model, old)
    for key in keys:
        setattr(model.config, key, new)
    for module in model.modules():
        for key in MODULE_COUNT_KEYS:
            if getattr(module, key, None) == old and not isinstance(getattr(type(module), key, None), property):
                setattr(module, key, new)
    return keys


def experts_to_remove(count: int, fraction: float) -> int:
    """Experts removed per layer for a fraction ``fraction`` of ``count`` (rounded to the nearest)."""
    return math.floor(count * fraction + 0.5)
