"""Models larger than memory: build the model on the meta device and materialise one block at a time.

:func:`build_skeleton` creates the architecture with every parameter on the ``meta`` device (no memory;
non-persistent buffers such as rotary frequencies are real). :class:`SafetensorsCheckpoint` reads single
tensors from a (sharded) safetensors directory, memory-mapped. :class:`StreamedBlocks` is what the
sequential engine calls around each block: load its weights from disk, and once pruned, write them to
an output shard and release them, so only one block's weights are ever resident. Tensors outside the
blocks (embeddings, final norm, head) are loaded only while the calibration inputs of the first block
are captured, and are copied to the output one tensor at a time.

The output is a standard sharded Hugging Face checkpoint (``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json``) that plain ``transformers`` loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.errors import ModelLoadError
from prunekit.core.measure import current_rss_bytes
from prunekit.io.conversion import ConvertedCheckpoint, converted_if_needed
from prunekit.io.safetensors_files import SafetensorsCheckpoint, write_safetensors

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def _stored_dtype(checkpoint: SafetensorsCheckpoint | ConvertedCheckpoint) -> torch.dtype:
    for name in checkpoint.names:
        dtype = checkpoint.dtype(name)
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def build_skeleton(
    directory: str | Path, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, SafetensorsCheckpoint | ConvertedCheckpoint]:
    """The model of ``directory`` with its parameters on the meta device, and its checkpoint, read under the
    model's parameter names (through transformers' conversion when the family stores them otherwise, such as
    Mixtral's experts one by one: :mod:`prunekit.io.conversion`).

    Raises :class:`~prunekit.core.errors.ModelLoadError` if a parameter can be found in the checkpoint neither
    by name nor by that conversion (such checkpoints must be loaded in memory instead).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = SafetensorsCheckpoint(directory)
    model_dtype = _stored_dtype(checkpoint) if dtype == "auto" else dtype
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=model_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not build the model of {str(directory)!r}: {exc}") from exc
    model.eval()
    model.tie_weights()  # a tied head shares the embedding's parameter, stored once
    checkpoint = converted_if_needed(checkpoint, model)
    missing = [name for name, _ in model.named_parameters() if name not in checkpoint]
    if missing:
        raise ModelLoadError(
            f"lazy loading needs the checkpoint's tensor names to equal the model's parameter names, but "
            f"{str(directory)!r} lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}: "
            "load this model in memory (without --lazy)"
        )
    return model, checkpoint


def materialize(
    module: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint | ConvertedCheckpoint, device: torch.device
) -> None:
    """Replace ``module``'s meta parameters (and stored buffers) by the checkpoint's tensors (in place);
    parameters already materialised are left alone."""
    for name, param in list(module.named_parameters()):
        if param.device.type != "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = checkpoint.read(prefix + name).to(device=device, dtype=param.dtype)
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for name, buffer in list(module.named_buffers()):
        if prefix + name in checkpoint:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._buffers[leaf] = checkpoint.read(prefix + name).to(device=device, dtype=buffer.dtype)


def release(module: nn.Module, recurse: bool = True) -> None:
    """Free ``module``'s parameters (back to the meta device); only its own with ``recurse=False``."""
    for sub in module.modules() if recurse else [module]:
        for leaf, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


#: glibc's initial ``M_MMAP_THRESHOLD`` (128 KiB), what :func:`large_allocations_mapped` restores.
GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


@contextmanager
def large_allocations_mapped(threshold_bytes: int = 1 << 20, *, enabled: bool = True) -> Iterator[bool]:
    """While the ``with`` block runs, make glibc serve every allocation above ``threshold_bytes`` with its
    own memory mapping, returned to the system when freed. By default glibc raises that threshold to the
    largest block freed so far (up to 32 MiB), after which activations of a few MiB come from the heap and
    its high-water mark stays resident: streaming a 1B model block by block then peaks about 0.4 GB higher.

    The setting is process-wide, so it is undone on exit: the threshold goes back to glibc's initial 128 KiB
    (glibc cannot report the dynamic value it had, and setting any value fixes it from then on). Yields
    False, and changes nothing, where it does not apply (not glibc) or ``enabled`` is False."""
    libc = _libc() if enabled else None
    if libc is None or not hasattr(libc, "mallopt"):
        yield False
        return
    changed = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    try:
        yield changed
    finally:
        if changed:
            libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_THRESHOLD)


def return_freed_memory() -> None:
    """Ask glibc to give freed heap memory back to the system (no-op elsewhere): block after block, freed
    weights would otherwise stay in the process's heap and count in its resident size."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def shard_name(number: int, total: int) -> str:
    """Hugging Face's shard file name, 1-based: ``model-00001-of-00031.safetensors``."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class StreamedBlocks:
    """Engine callbacks that stream a skeleton model's blocks from ``checkpoint`` to ``out_dir``.

    One output shard per block, then one per tensor outside the blocks; :meth:`finish` writes the index.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks_name: str,
        n_blocks: int,
        checkpoint: SafetensorsCheckpoint | ConvertedCheckpoint,
        out_dir: Path,
    ) -> None:
        self.model = model
        self.blocks_name = blocks_name
        self.checkpoint = checkpoint
        self.out_dir = out_dir
        prefix = blocks_name + "."
        self.outside = [n for n in checkpoint.names if not n.startswith(prefix)]
        self.total_shards = n_blocks + len(self.outside)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def _outside_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules with weights outside the blocks, except the output head: capturing stops before it
        (a head tied to the input embedding is loaded with the embedding anyway)."""
        prefix = self.blocks_name + "."
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if name != self.blocks_name
            and not name.startswith(prefix)
            and module is not head
            and (any(True for _ in module.parameters(recurse=False)) or module._buffers)
        ]

    def load_outside(self) -> None:
        """Materialise everything outside the blocks, and block 0 (run once to learn a block's output
        type), on the CPU: what capturing the first block's inputs needs."""
        self.load_block(0, self.model.get_submodule(self.blocks_name)[0])
        for name, module in self._outside_modules():
            for leaf, param in list(module._parameters.items()):
                full = f"{name}.{leaf}" if name else leaf
                if param is not None and full in self.checkpoint:
                    value = self.checkpoint.map(full).to(dtype=param.dtype)
                    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()  # re-point a tied head at the loaded embedding

    def release_outside(self) -> None:
        for _, module in self._outside_modules():
            release(module, recurse=False)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def load_block(self, index: int, block: nn.Module) -> None:
        materialize(block, f"{self.blocks_name}.{index}.", self.checkpoint, torch.device("cpu"))

    def finish_block(self, index: int, block: nn.Module) -> None:
        """Write the pruned block to its shard, then free it."""
        prefix = f"{self.blocks_name}.{index}."
        tensors = {prefix + name: t.detach().to("cpu").contiguous() for name, t in block.state_dict().items()}
        tensors = {name: t for name, t in tensors.items() if name in self.checkpoint}
        self._write(index + 1, tensors)
        del tensors
        release(block)
        return_freed_memory()
        log.debug("block %d written and freed; resident %.2f GB", index, current_rss_bytes() / 1e9)

    def finish(self) -> None:
        """Copy the tensors outside the blocks (one shard each) and write the shard index."""
        first = self.total_shards - len(self.outside) + 1
        for offset, name in enumerate(self.outside):
            file = shard_name(first + offset, self.total_shards)
            self.total_size += self.checkpoint.copy_to(name, self.out_dir / file)
            self.weight_map[name] = file
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        file = shard_name(number, self.total_shards)
        write_safetensors(self.out_dir / file, tensors, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            self.weight_map[name] = file
            self.total_size += tensor.numel() * tensor.element_size()
        log.debug("wrote %s (%d tensors)", file, len(tensors))
