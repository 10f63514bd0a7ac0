"""Whole-expert pruning of a MoE LM: calibration streams through the decoder blocks one at a time; in each
block every MoE layer's experts are scored on the tokens that reach it, the chosen experts are removed (or
merged into the kept ones) and the block's outputs, computed without them, feed the next block.

Peak memory: the model, one block's calibration activations and, per MoE layer, a sample of its inputs and
outputs (``sample_tokens`` rows). Expert statistics are computed on the compute device one expert at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.capture import capture_block_inputs, hidden_from_output
from prunekit.calibration.engine import module_device, move_outside_blocks, to_device
from prunekit.calibration.hooks import first_input, first_output, observe
from prunekit.core.devices import resolve_device
from prunekit.core.errors import CalibrationError, ConfigError
from prunekit.models.blocks import find_decoder_blocks
from prunekit.models.moe_layers import (
    MoeLayer,
    check_removal,
    config_count_keys,
    experts_to_remove,
    find_moe_layers,
    merge_into,
    remove_experts,
    sync_config,
)
from prunekit.moe.config import ExpertPruneConfig
from prunekit.moe.criteria import Selection, SelectionContext, behaviour_distance, expert_criterion
from prunekit.moe.statistics import LayerRouting

log = logging.getLogger(__name__)


@dataclass
class LayerExperts:
    """What happened to one MoE layer's experts."""

    name: str
    block: int
    experts: int
    kept: list[int]
    removed: list[int]
    #: calibration tokens routed to each expert (before removal)
    counts: list[int]
    #: REAP saliency of each expert
    reap: list[float]
    #: the criterion's score of each expert (higher = kept first), when it scores experts
    scores: list[float] | None
    #: ``||F(x) - F'(x)||^2 / ||F(x)||^2`` of the layer on the sampled calibration tokens, after the removal
    relative_error: float
    #: removed expert -> the kept expert it was merged into (empty unless merging)
    merged_into: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class ExpertPruneResult:
    """The model with experts removed, and a record per MoE layer."""

    model: nn.Module
    layers: list[LayerExperts] = field(default_factory=list)
    experts_before: int = 0
    experts_after: int = 0
    config_keys: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    calibration_shape: tuple[int, int] | None = None


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sliced_copy(layer: MoeLayer, keep: Sequence[int]) -> nn.Module:
    """A copy of the layer module with only the experts ``keep``, sharing the original tensors until they are
    sliced (so a candidate costs the kept experts' memory, not a second whole layer)."""
    memo: dict[int, Any] = {id(t): t for t in [*layer.module.parameters(), *layer.module.buffers()]}
    module = copy.deepcopy(layer.module, memo)
    view = next(candidate for candidate in find_moe_layers(module) if candidate.module is module)
    view.top_k, view.groups = layer.top_k, layer.groups
    remove_experts(module, view, keep)
    return module


def layer_output(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output for ``inputs`` ``(tokens, H)`` (run as one sequence)."""
    return first_output(module(inputs.unsqueeze(0))).reshape(inputs.shape)


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    denominator = float(reference.double().pow(2).sum())
    return float((reference.double() - output.double()).pow(2).sum()) / denominator if denominator > 0 else 0.0


def check_expert_removal(
    model: nn.Module, config: ExpertPruneConfig, calibration: torch.Tensor | None
) -> list[MoeLayer]:
    """Refuse, before any work, what cannot be done: no MoE layer, a removal that rounds to nothing or leaves
    too few experts, grouped routing that cannot be cut evenly, calibration too small to reach every expert."""
    layers = find_moe_layers(model)
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no mixture-of-experts layer with fused experts: expert removal needs a MoE "
            "model (for a dense model use `prunekit prune` or `prunekit structured`)"
        )
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise ConfigError(f"MoE layers with different expert counts ({sorted(counts)}) are not supported")
    experts = counts.pop()
    config_count_keys(model, experts)
    remove = experts_to_remove(experts, config.remove)
    if remove == 0:
        raise ConfigError(
            f"--remove {config.remove} of {experts} experts rounds to 0 experts per layer: one expert is "
            f"{1 / experts:.3f} of them"
        )
    for layer in layers:
        if remove % layer.groups:
            raise ConfigError(
                f"{layer.name} routes within {layer.groups} expert groups: remove a multiple of {layer.groups} "
                f"experts per layer (asked: {remove} of {experts})"
            )
        size = experts // layer.groups
        per_group = remove // layer.groups
        check_removal(layer, [e for e in range(experts) if e % size >= per_group])
    if calibration is None or calibration.dim() != 2 or calibration.numel() == 0:
        raise CalibrationError("expert removal needs calibration token ids: a non-empty (nsamples, seqlen) tensor")
    needed = math.ceil(experts / layers[0].top_k)
    if calibration.numel() < needed:
        raise CalibrationError(
            f"{calibration.numel()} calibration tokens cannot reach all {experts} experts ({layers[0].top_k} per "
            f"token): give at least {needed} tokens, and far more for meaningful statistics (e.g. 32 x 512)"
        )
    return layers


def prune_experts(
    model: nn.Module,
    config: ExpertPruneConfig | None = None,
    calibration: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    progress: bool = True,
) -> ExpertPruneResult:
    """Remove ``config.remove`` of the experts of every MoE layer, chosen by ``config.criterion`` on the
    calibration token ids ``calibration`` ``(nsamples, seqlen)``; see the module docstring. The model's
    config is updated so that the saved model reloads with ``from_pretrained``; ``model`` itself is left
    untouched unless ``inplace``."""
    config = config or ExpertPruneConfig()
    check_expert_removal(model, config, calibration)
    assert calibration is not None
    if not inplace:
        model = copy.deepcopy(model)
    layers = find_moe_layers(model)
    experts = layers[0].num_experts
    remove = experts_to_remove(experts, config.remove)
    criterion = expert_criterion(config.criterion)
    blocks_name, blocks = find_decoder_blocks(model)
    device = resolve_device(config.device)
    started = time.perf_counter()
    result = ExpertPruneResult(model=model, experts_before=experts, params_before=_parameters(model))
    result.calibration_shape = (int(calibration.shape[0]), int(calibration.shape[1]))

    home = module_device(model)
    move_outside_blocks(model, blocks_name, device)
    try:
        captured = capture_block_inputs(model, blocks, calibration, config.batch_size, device)
    finally:
        move_outside_blocks(model, blocks_name, home)
    hidden = list(captured.hidden)
    rows_per_batch = max(1, math.ceil(config.sample_tokens / len(hidden)))
    dense_hidden = list(hidden) if config.propagation == "dense" else None
    if dense_hidden is not None:
        hidden = []  # every layer is scored on the unpruned model's activations: no pruned chain to carry

    for index in tqdm(range(len(blocks)), desc="removing experts", unit="block", disable=not progress):
        block = blocks[index]
        block_home = module_device(block)
        block.to(device)
        calls = captured.calls[index]

        def run(inputs: list[torch.Tensor], block: nn.Module = block, calls: list = calls) -> list[torch.Tensor]:
            with torch.no_grad():
                return [
                    hidden_from_output(
                        block(to_device(x, device), *to_device(c.args, device), **to_device(c.kwargs, device))
                    )
                    for x, c in zip(inputs, calls, strict=True)
                ]

        prefix = f"{blocks_name}.{index}."
        mine = [layer for layer in layers if layer.name.startswith(prefix)]
        if mine:
            t0 = time.perf_counter()
            routing = {layer.name: LayerRouting.empty(layer.num_experts) for layer in mine}
            by_name = {layer.name: layer for layer in mine}

            def on_experts(
                name: str, args: tuple, kwargs: dict, by_name: dict = by_name, routing: dict = routing
            ) -> None:
                hidden_states, top_k_index, top_k_weights = [*args, *kwargs.values()][:3]
                routing[name].add_routing(by_name[name], hidden_states, top_k_index, top_k_weights)

            def on_layer(name: str, args: tuple, kwargs: dict, output: Any, routing: dict = routing) -> None:
                routing[name].add_sample(first_input(args, kwargs), first_output(output), rows_per_batch)

            watched_experts = {layer.name: layer.experts for layer in mine}
            watched_layers = {layer.name: layer.module for layer in mine}
            scoring_inputs = dense_hidden if dense_hidden is not None else hidden
            with observe(watched_experts, on_input=on_experts), observe(watched_layers, on_output=on_layer):
                dense_outputs = run(scoring_inputs)
            if dense_hidden is not None:
                dense_hidden = dense_outputs
            for layer in mine:
                result.layers.append(_prune_layer(model, layer, routing[layer.name], index, remove, config, criterion))
            per_layer = (time.perf_counter() - t0) / len(mine)
            for record in result.layers[-len(mine) :]:
                record.seconds = per_layer
            if dense_hidden is None:  # sequential: the next block sees this one's outputs without the experts
                hidden = run(hidden)
        elif dense_hidden is not None:
            dense_hidden = run(dense_hidden)
        else:
            hidden = run(hidden)
        block.to(block_home)

    result.config_keys = sync_config(model, experts, experts - remove)
    result.experts_after = experts - remove
    result.params_after = _parameters(model)
    result.seconds = time.perf_counter() - started
    log.info(
        "removed %d of %d experts in each of %d MoE layers (%s): %.1f%% of the parameters in %.1f s",
        remove,
        experts,
        len(layers),
        config.criterion,
        100 * (1 - result.params_after / result.params_before),
        result.seconds,
    )
    return result


def _prune_layer(
    model: nn.Module,
    layer: MoeLayer,
    routing: LayerRouting,
    block: int,
    remove: int,
    config: ExpertPruneConfig,
    criterion: Any,
) -> LayerExperts:
    """Choose, (merge,) remove; measure the layer's output error on the sampled tokens."""
    inputs = torch.cat(routing.inputs)
    reference = torch.cat(routing.outputs)

    def loss(keep: list[int]) -> float:
        with torch.no_grad():
            return relative_error(reference, layer_output(sliced_copy(layer, keep), inputs))

    router_weight = layer.router.weight.detach()
    context = SelectionContext(
        remove=remove,
        groups=layer.groups,
        router_weight=router_weight,
        loss=loss,
        expert_tensors=lambda e: [p.detach()[e] for p in layer.experts.parameters(recurse=False)],
        coactivation_weight=config.coactivation_weight,
        exhaustive_limit=config.exhaustive_limit,
    )
    selection: Selection = criterion(routing, context)
    keep = selection.keep
    removed = [e for e in range(layer.num_experts) if e not in keep]
    unreached = [e for e in range(layer.num_experts) if routing.counts[e] == 0]
    if unreached:
        log.warning("%s: no calibration token was routed to experts %s", layer.name, unreached)
    merged: dict[int, int] = {}
    if config.merge:
        distance = behaviour_distance(routing, router_weight, 0.0)
        for r in removed:
            merged[r] = min(keep, key=lambda k: (float(distance[r, k]), k))
        mass = {e: float(routing.gate_mass[e]) for e in range(layer.num_experts)}
        merge_into(layer, {k: [(r, mass[r]) for r in removed if merged[r] == k] for k in keep}, mass)
    remove_experts(model, layer, keep)
    with torch.no_grad():
        error = relative_error(reference, layer_output(layer.module, inputs))
    return LayerExperts(
        name=layer.name,
        block=block,
        experts=len(keep) + len(removed),
        kept=keep,
        removed=removed,
        counts=[int(c) for c in routing.counts.tolist()],
        reap=[float(v) for v in routing.reap.tolist()],
        scores=selection.scores,
        relative_error=error,
        merged_into=merged,
    )
