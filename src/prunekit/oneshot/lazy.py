"""Pruning a checkpoint larger than memory: one decoder block at a time, from disk to disk."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunekit.io.atomic import write_atomically
from prunekit.io.streaming import StreamedBlocks, build_skeleton, large_allocations_mapped
from prunekit.models.blocks import find_decoder_blocks
from prunekit.oneshot.config import PruneConfig
from prunekit.oneshot.prune import PruneResult, prune


def prune_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    config: PruneConfig | None = None,
    calibration: torch.Tensor | None = None,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    extra: Callable[[Path, PruneResult], None] | None = None,
    map_large_allocations: bool = True,
) -> PruneResult:
    """Prune a safetensors checkpoint directory into ``out_dir`` with bounded memory.

    The model is built on the meta device; each decoder block is read from disk, pruned, written to its
    own output shard and freed, so peak memory is about one block's weights plus one block's calibration
    activations (and, while the first block's inputs are captured, the embedding), not the whole model.
    The result is bit-identical to :func:`prune` on the loaded model, and the output is a sharded
    checkpoint that plain ``transformers`` loads. Writing is atomic: nothing appears at ``out_dir`` unless
    everything succeeded. ``extra(tmp_dir, result)`` may add files (a report) before the rename.

    With ``map_large_allocations`` (the default), glibc is told to map allocations above 1 MiB individually
    while the run lasts, which keeps the peak low; the process-wide setting is undone afterwards
    (:func:`prunekit.io.streaming.large_allocations_mapped`).
    """
    model, checkpoint = build_skeleton(source, dtype, trust_remote_code)
    blocks_name, blocks = find_decoder_blocks(model)
    outcome: list[PruneResult] = []

    def write(tmp: Path) -> None:
        stream = StreamedBlocks(model, blocks_name, len(blocks), checkpoint, tmp)
        result = prune(model, config, calibration, inplace=True, progress=progress, stream=stream)
        stream.finish()
        model.config.save_pretrained(tmp)
        generation = Path(source) / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, tmp / generation.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp, result)
        outcome.append(result)

    with large_allocations_mapped(enabled=map_large_allocations):
        write_atomically(out_dir, write, overwrite)
    return outcome[0]
