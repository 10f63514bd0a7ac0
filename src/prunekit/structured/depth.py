"""Depth pruning of any model: residual blocks removed whole.

A block computes ``x + f(x)`` (possibly followed by an activation its input already satisfies, as the ReLU
after a ResNet bottleneck). Such a block can be dropped, leaving its input to flow on, and with it goes every
operation it runs: its MACs, and also the fixed cost per operation that width pruning never removes, which is
what dominates small batches on CPUs (layer removal as in "Layers play the lottery, all tickets win at
initialization", and for LLM layers ShortGPT, Men et al. 2024).

Which blocks qualify is found by running the model, not by reading its code: a module with parameters whose
output has its input's shape is *removable* when, with all its parameters set to zero, it returns its input
on the example data (its residual branch then outputs zero). The innermost such modules are the blocks (a
``Sequential`` of removable blocks qualifies too, and is split into them). Blocks are ranked by ShortGPT's
Block Influence, ``BI = 1 - cos(x_in, x_out)`` (Men et al. 2024, Eq. 1), here per example over the whole
flattened tensor (:func:`block_influence`): the blocks that change their input least go first.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunekit.calibration.hooks import observe, run_batches
from prunekit.core.errors import StructuralPruningError

log = logging.getLogger(__name__)

#: The vectors whose cosine :func:`block_influence` averages: every token's, or every example's.
Granularity = Literal["token", "example"]


@dataclass
class DepthResult:
    """The model without ``removed`` (a new one), and the Block Influence of every removable block."""

    model: nn.Module
    removed: list[str]
    influence: dict[str, float]


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, *, per: Granularity = "example") -> float:
    """ShortGPT's Block Influence of a block that maps ``x_in`` to ``x_out``: ``1 - E[cos(x_in, x_out)]`` (Men
    et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", Eq. 1).

    ``per="token"`` (the paper's definition) takes the cosine of every token's hidden vector, the last
    dimension, and averages over all the leading indices (batch and positions). ``per="example"`` flattens
    each example (dim 0) whole: for a convolutional block there is no token, and a pixel's channel vector
    is a poor one (its cosine swings with the local activation), so depth pruning of any model compares
    whole feature maps. Both are the same measure, the cosine of what goes in and what comes out; only the
    vectors compared differ, which is why this is one function with a parameter."""
    if per == "token":
        a = x_in.detach().float().reshape(-1, x_in.shape[-1])
        b = x_out.detach().float().reshape(-1, x_out.shape[-1])
    elif per == "example":
        a = x_in.detach().float().reshape(x_in.shape[0], -1)
        b = x_out.detach().float().reshape(x_out.shape[0], -1)
    else:
        raise ValueError(f"per must be 'token' or 'example', got {per!r}")
    return float((1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)).mean())


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _capture(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: dict[str, Any] | None,
    names: Sequence[str] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (input, output)`` of every non-root module with parameters whose output has its input's shape
    (only those in ``names``, when given)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = None if names is None else set(names)

    def record(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x, y = (args[0] if len(args) == 1 else None), _first_tensor(output)
        if isinstance(x, torch.Tensor) and y is not None and x.shape == y.shape and name not in seen:
            seen[name] = (x.detach().clone(), y.detach().clone())

    modules = {
        name: module
        for name, module in model.named_modules()
        if name and (wanted is None or name in wanted) and any(True for _ in module.parameters())
    }
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with observe(modules, on_output=record):
            run_batches(model, [(tuple(example_inputs), example_kwargs or {})])
    finally:
        for m, training in modes.items():
            m.training = training
    return seen


def _is_identity_when_zeroed(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` with zero parameters returns its input, on ``x`` moved away from zero (a dead input,
    all zeros, would make any zeroed layer look like an identity) but kept on the same side of it (a ReLU after
    the residual add is an identity on non-negative inputs)."""
    if not x.is_floating_point():
        return False
    generator = torch.Generator(device=x.device).manual_seed(0)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    probe = x + torch.where(x < 0, -noise, noise) * (x.abs().mean() + 1.0)
    zeroed = copy.deepcopy(module).eval()
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
        try:
            y = _first_tensor(zeroed(probe))
        except Exception:  # a module that cannot run alone on its captured input is not a candidate
            return False
    return y is not None and y.shape == probe.shape and torch.allclose(y, probe, rtol=1e-5, atol=1e-6)


def removable_blocks(
    model: nn.Module, example_inputs: Sequence[Any], example_kwargs: dict[str, Any] | None = None
) -> dict[str, float]:
    """The blocks of ``model`` that can be removed whole (see the module docstring), in model order, each with
    its Block Influence on the example inputs. ``model`` is not modified."""
    captured = _capture(model, example_inputs, example_kwargs)
    modules = dict(model.named_modules())
    removable = [n for n, (x, _) in captured.items() if _is_identity_when_zeroed(modules[n], x)]
    innermost = [n for n in removable if not any(o != n and o.startswith(n + ".") for o in removable)]
    return {n: block_influence(*captured[n], per="example") for n in innermost}


def remove_blocks(model: nn.Module, names: Sequence[str], *, shorten_lists: bool = False) -> nn.Module:
    """A copy of ``model`` without the named blocks (``model`` is not modified): each is replaced by
    ``nn.Identity``, so its input flows on and the other modules keep their names (what
    :func:`~prunekit.io.pruned.save_pruned` records and :func:`~prunekit.io.pruned.load_pruned` rebuilds).

    With ``shorten_lists``, a block held in an ``nn.ModuleList`` (a transformer's decoder layers) is taken
    out of the list instead, the blocks after it renumbered (their modules' ``layer_idx``, which indexes the
    KV cache) and a Hugging Face config's ``num_hidden_layers`` and ``layer_types`` follow, so that
    ``save_pretrained`` output loads with plain ``transformers``."""
    pruned = copy.deepcopy(model)
    lists: dict[str, set[int]] = {}
    for name in names:
        if not name:
            raise StructuralPruningError("cannot remove the whole model: name a block inside it")
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = pruned.get_submodule(parent_name) if parent_name else pruned
            getattr(parent, attr)
        except AttributeError:
            raise StructuralPruningError(f"{type(model).__name__} has no block {name!r}") from None
        if shorten_lists and isinstance(parent, nn.ModuleList):
            lists.setdefault(parent_name, set()).add(int(attr))
        else:
            setattr(parent, attr, nn.Identity())
    for list_name, drop in lists.items():
        shorten_module_list(pruned, list_name, drop)
    return pruned


def shorten_module_list(model: nn.Module, list_name: str, drop: set[int]) -> None:
    """Take the blocks ``drop`` out of the ``nn.ModuleList`` ``list_name``, renumber the rest, update the
    config's layer count where it counts this list."""
    blocks = model.get_submodule(list_name)
    if len(drop) >= len(blocks):
        raise StructuralPruningError("cannot remove every decoder layer")
    kept = [block for i, block in enumerate(blocks) if i not in drop]
    parent_name, _, attr = list_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != len(blocks):
        return
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [t for i, t in enumerate(types) if i not in drop]
    config.num_hidden_layers = len(kept)


def prune_depth(
    model: nn.Module,
    example_inputs: Sequence[Any],
    count: int,
    *,
    example_kwargs: dict[str, Any] | None = None,
    calibration: Sequence[Sequence[Any]] | None = None,
) -> DepthResult:
    """Remove the ``count`` removable blocks of lowest Block Influence, measured on ``calibration`` (batches of
    positional inputs; default: the example inputs). Raises
    :class:`~prunekit.core.errors.StructuralPruningError` if fewer blocks are removable."""
    blocks = removable_blocks(model, example_inputs, example_kwargs)
    if count < 0 or count > len(blocks):
        raise StructuralPruningError(
            f"asked to remove {count} blocks, but {type(model).__name__} has {len(blocks)} removable ones "
            f"({', '.join(list(blocks)[:5])}{'...' if len(blocks) > 5 else ''}): ask for at most {len(blocks)}"
        )
    influence = dict(blocks)
    if calibration is not None:
        influence = _influence_on(model, list(blocks), calibration, example_kwargs)
    order = sorted(influence, key=lambda n: (influence[n], n))
    removed = sorted(order[:count], key=list(blocks).index)
    log.info("depth: removing %d of %d removable blocks: %s", count, len(blocks), ", ".join(removed))
    return DepthResult(remove_blocks(model, removed), removed, influence)


def _influence_on(
    model: nn.Module, names: list[str], batches: Sequence[Sequence[Any]], example_kwargs: dict[str, Any] | None
) -> dict[str, float]:
    totals = dict.fromkeys(names, 0.0)
    count = 0
    for inputs in batches:
        captured = _capture(model, inputs, example_kwargs, names)
        for name in names:
            totals[name] += block_influence(*captured[name], per="example") * len(inputs[0])
        count += len(inputs[0])
    return {n: t / max(1, count) for n, t in totals.items()}
