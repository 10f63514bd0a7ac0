"""Writing outputs safely: check the destination first, write into a temporary sibling, then rename.

The result is an ordinary ``save_pretrained`` directory (with the tokenizer) that plain
``transformers.AutoModelForCausalLM.from_pretrained`` loads; prunekit is not needed to use it. With
``save_format`` other than ``dense`` the sparse layers are stored compressed (see :mod:`prunekit.io.compressed`);
:func:`prunekit.io.loading.load_model` reads those back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.io.atomic import check_output_dir, write_atomically
from prunekit.io.compressed import DENSE, plan_compression, save_compressed
from prunekit.io.pruned import write_pruned
from prunekit.models.dropped_attention import dropped_attention_layers, save_pretrained_refusal


def save_pretrained(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    save_format: str = DENSE,
) -> Path:
    """Save a model (safetensors) and its tokenizer atomically; ``extra(dir)`` may add files (a report).

    ``save_format``: ``dense`` (plain), ``compressed`` (the best sparse format for the weights),
    ``sparse-bitmask`` or ``sparse-24`` / ``sparse-24-bitmask``; see :func:`prunekit.io.compressed.plan_compression`.
    The format is chosen (and a mismatch refused) before anything is written.
    """
    check_output_dir(path, overwrite)
    plan = plan_compression(model, save_format)

    def write(tmp: Path) -> None:
        if plan.format == DENSE:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_compressed(model, tmp, plan)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return write_atomically(path, write, overwrite)


def save_causal_lm(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save a (possibly structurally pruned) causal LM atomically, as it can be reloaded: with
    :func:`save_pretrained` (plain transformers loads it) unless the model's ``save_pretrained`` is refused
    (:func:`~prunekit.models.dropped_attention.refuse_save_pretrained`: a dropped attention, layers of different
    widths that the family's config cannot describe): then with :func:`prunekit.io.pruned.write_pruned` and the
    config (``prunekit.load_model`` rebuilds it)."""
    if save_pretrained_refusal(model) is None and not dropped_attention_layers(model):
        return save_pretrained(model, tokenizer, path, overwrite, extra)

    def write(tmp: Path) -> None:
        write_pruned(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return write_atomically(path, write, overwrite)
