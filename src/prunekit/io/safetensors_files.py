"""Safetensors files read and written one tensor at a time: :class:`SafetensorsCheckpoint` reads single
tensors of a (sharded) checkpoint directory, memory-mapped where asked; :func:`write_safetensors` writes a file
from the tensors' own memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.core.errors import ModelLoadError

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

    def _entry(self, name: str) -> tuple[dict[str, Any], int]:
        """A tensor's header entry and where the data section of its file starts."""
        with self._file_of[name].open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            return json.loads(handle.read(header_len))[name], 8 + header_len

    def copy_to(self, name: str, path: Path, chunk_bytes: int = 16 << 20) -> int:
        """Write tensor ``name`` alone into a new safetensors file at ``path``, copying its bytes in chunks
        (never the whole tensor in memory); returns its size in bytes."""
        entry, data_start = self._entry(name)
        begin, end = entry["data_offsets"]
        header = json.dumps({"__metadata__": {"format": "pt"}, name: {**entry, "data_offsets": [0, end - begin]}})
        encoded = header.encode() + b" " * (-len(header.encode()) % 8)
        with self._file_of[name].open("rb") as source, path.open("wb") as target:
            target.write(len(encoded).to_bytes(8, "little"))
            target.write(encoded)
            source.seek(data_start + begin)
            left = end - begin
            while left > 0:
                chunk = source.read(min(chunk_bytes, left))
                target.write(chunk)
                left -= len(chunk)
        return end - begin

    def map(self, name: str) -> torch.Tensor:
        """One tensor memory-mapped copy-on-write: only the pages that are read become resident (an
        embedding table of which calibration touches a few rows), and writes never reach the file."""
        entry, data_start = self._entry(name)
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        raw = np.memmap(self._file_of[name], dtype=np.uint8, mode="c", offset=data_start + begin, shape=(end - begin,))
        return torch.from_numpy(raw).view(dtype).reshape(entry["shape"])


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory (``safetensors.torch.save_file``
    first copies every tensor into one buffer, doubling a block's footprint). Same format, readable by
    ``safetensors``: an 8-byte little-endian header length, a JSON header, then the raw bytes."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    ordered = sorted(tensors.items())
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for _, tensor in ordered:
            data = tensor.detach().to("cpu").contiguous()
            handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
