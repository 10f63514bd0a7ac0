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

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ModelLoadError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint directory (one file or shards), read one at a time."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(
                f"{str(self.directory)!r} has no .safetensors files: lazy loading needs a safetensors checkpoint "
                "(re-save the model with save_pretrained(safe_serialization=True))"
            )
        self._file_of: dict[str, Path] = {}
        self._dtype_of: dict[str, torch.dtype] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self._file_of[name] = file
                    self._dtype_of[name] = _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype(), torch.uint8)

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype_of[name]

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor of the stored dtype)."""
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def _stored_dtype(checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    for name in checkpoint.names:
        dtype = checkpoint.dtype(name)
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def build_skeleton(
    directory: str | Path, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, SafetensorsCheckpoint]:
    """The model of ``directory`` with its parameters on the meta device, and its checkpoint.

    Raises :class:`~prunekit.errors.ModelLoadError` if a parameter has no tensor of the same name in the
    checkpoint (checkpoints whose names need converting must be loaded in memory instead).
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
    missing = [name for name, _ in model.named_parameters() if name not in checkpoint]
    if missing:
        raise ModelLoadError(
            f"lazy loading needs the checkpoint's tensor names to equal the model's parameter names, but "
            f"{str(directory)!r} lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}: "
            "load this model in memory (without --lazy)"
        )
    return model, checkpoint


def materialize(module: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint, device: torch.device) -> None:
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


def release(module: nn.Module) -> None:
    """Free ``module``'s parameters (back to the meta device)."""
    for sub in module.modules():
        for leaf, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)


def shard_name(number: int, total: int) -> str:
    """Hugging Face's shard file name, 1-based: ``model-00001-of-00031.safetensors``."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class StreamedBlocks:
    """Engine callbacks that stream a skeleton model's blocks from ``checkpoint`` to ``out_dir``.

    One output shard per block, then one per tensor outside the blocks; :meth:`finish` writes the index.
    """

    def __init__(
        self, model: nn.Module, blocks_name: str, n_blocks: int, checkpoint: SafetensorsCheckpoint, out_dir: Path
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
                    value = self.checkpoint.read(full).to(dtype=param.dtype)
                    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()  # re-point a tied head at the loaded embedding

    def release_outside(self) -> None:
        for _, module in self._outside_modules():
            for leaf, param in list(module._parameters.items()):
                if param is not None and param.device.type != "meta":
                    module._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)
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
        release(block)

    def finish(self, extra_files: dict[str, Any] | None = None) -> None:
        """Copy the tensors outside the blocks (one shard each) and write the shard index."""
        first = self.total_shards - len(self.outside) + 1
        for offset, name in enumerate(self.outside):
            self._write(first + offset, {name: self.checkpoint.read(name)})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file = shard_name(number, self.total_shards)
        save_file(tensors, str(self.out_dir / file), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            self.weight_map[name] = file
            self.total_size += tensor.numel() * tensor.element_size()
        log.debug("wrote %s (%d tensors)", file, len(tensors))
