"""Capture what each decoder block receives, without running the blocks.

Every block's ``forward`` is temporarily replaced by a recorder. Block 0 runs for real once, so the
recorders know the shape of a block's output (a tensor, or a tuple led by the hidden states); the other
recorders pass their input through unchanged, so one cheap model call records the extra arguments each
block gets (attention mask, position ids, rotary position embeddings, cache position...). Those can differ
per block (sliding-window layers), so they are kept per block. The last recorder stops the model before
the final norm and LM head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _StopModel(Exception):
    """Raised by the last block's recorder to end the model call early."""


@dataclass
class BlockCall:
    """The positional (after the hidden states) and keyword arguments of one block call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CapturedInputs:
    """Hidden states entering block 0, per batch; and each block's other arguments, per batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[BlockCall]] = field(default_factory=list)  # [block][batch]


def split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    """Separate a block call's hidden states (first positional or ``hidden_states=``) from the rest."""
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs))
    rest = dict(kwargs)
    return rest.pop("hidden_states"), BlockCall((), rest)


def hidden_from_output(output: Any) -> torch.Tensor:
    """A block's output hidden states: the tensor itself, or the first element of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def _like_output(template: Any, hidden: torch.Tensor) -> Any:
    if isinstance(template, torch.Tensor):
        return hidden
    return (hidden, *tuple(template)[1:])


@contextmanager
def _recording(blocks: nn.ModuleList, per_block: list[BlockCall | None], state: dict[str, Any]) -> Iterator[None]:
    originals = [block.forward for block in blocks]
    own = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's offload wrappers
    last = len(blocks) - 1

    def make_recorder(i: int, original: Any) -> Any:
        def recorder(*args: Any, **kwargs: Any) -> Any:
            hidden, call = split_hidden(args, kwargs)
            per_block[i] = call
            if i == 0:
                state["hidden"] = hidden
            if i == last:
                raise _StopModel
            if "template" not in state:
                state["template"] = original(*args, **kwargs)
            return _like_output(state["template"], hidden)

        return recorder

    try:
        for i, block in enumerate(blocks):
            block.forward = make_recorder(i, originals[i])
        yield
    finally:
        for block, previous in zip(blocks, own, strict=True):
            if previous is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = previous


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> CapturedInputs:
    """Record, for every batch of ``input_ids``, the hidden states entering block 0 and every block's
    other arguments. Only the modules outside the blocks (embeddings, rotary tables) need to be on
    ``device``.
    """
    captured = CapturedInputs(calls=[[] for _ in blocks])
    state: dict[str, Any] = {}
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            per_block: list[BlockCall | None] = [None] * len(blocks)
            with _recording(blocks, per_block, state), suppress(_StopModel):
                model(input_ids=batch, use_cache=False)
            if any(call is None for call in per_block):
                missing = [i for i, call in enumerate(per_block) if call is None]
                raise RuntimeError(f"the model call never reached blocks {missing}; cannot calibrate")
            captured.hidden.append(state.pop("hidden"))
            for i, call in enumerate(per_block):
                assert call is not None
                captured.calls[i].append(call)
    return captured
