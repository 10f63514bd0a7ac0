"""Find the stack of decoder blocks of any Hugging Face decoder-only model without a per-family table.

The blocks are the ``nn.ModuleList`` whose children all share one class and that holds the most
parameters (``model.layers`` in Llama/Mistral/Qwen2/Gemma/Phi, ``transformer.h`` in GPT-2,
``model.decoder.layers`` in OPT...).
"""

from __future__ import annotations

from torch import nn

from prunekit.core.errors import TargetError


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, blocks)`` for the model's repeated block stack."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = _n_params(module)
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise TargetError(
            f"found no stack of repeated blocks (nn.ModuleList) in {type(model).__name__}: prunekit's "
            "sequential engine needs a decoder-only transformer"
        )
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if expected is not None and len(best[2]) != expected:
        raise TargetError(
            f"the largest block list {best[1]!r} has {len(best[2])} blocks but the config says "
            f"num_hidden_layers={expected}: this architecture needs an adapter"
        )
    return best[1], best[2]
