"""Sparse weight encodings of compressed-tensors (0.14): ``sparse-bitmask`` (kept values, one bit per weight,
row offsets) and ``sparse-24-bitmask`` (two values of every four, one bit per weight), one weight at a time, exact
for every dtype. The checkpoint layout around them is :mod:`prunekit.io.compressed`."""

from __future__ import annotations

import math

import numpy as np
import torch

# The kernels work on the raw bits through numpy (exact for every dtype, bfloat16 included, and an order of
# magnitude faster than torch's boolean indexing on CPU).


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_MAGNITUDE_BITS = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFF_FFFF, 8: 0x7FFF_FFFF_FFFF_FFFF}  # all but the sign bit


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bits as a numpy integer array (a view for a contiguous CPU tensor)."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(_INT_OF_SIZE[tensor.element_size()]).numpy()


def _from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits)).view(dtype)


def _nonzero(bits: np.ndarray, floating: bool) -> np.ndarray:
    """Where the values are not zero: for floats, any bit but the sign (``-0.0`` is a zero)."""
    if floating:
        return (bits & bits.dtype.type(_MAGNITUDE_BITS[bits.dtype.itemsize])) != 0
    return bits != 0


def count_nonzero(weight: torch.Tensor) -> int:
    """Number of non-zero values of a tensor."""
    return int(np.count_nonzero(_nonzero(_bits(weight), weight.is_floating_point())))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` bool -> ``(rows, ceil(cols/8))`` uint8, little-endian bit order (compressed-tensors')."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    return torch.from_numpy(_unpack(packed, shape))


def _unpack(packed: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return bits.reshape(shape).astype(bool)


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One 2-D weight in ``sparse-bitmask`` form (local names ``compressed``, ``bitmask``, ...)."""
    bits = _bits(weight)
    keep = _nonzero(bits, weight.is_floating_point())
    counts = np.count_nonzero(keep, axis=-1).astype(np.int64)
    return {
        "compressed": _from_bits(bits[keep], weight.dtype),
        "bitmask": torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little")),
        "row_offsets": torch.from_numpy(np.cumsum(counts) - counts),
        "shape": torch.tensor(list(weight.shape)),
    }


def bitmask_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`bitmask_compress`."""
    shape = _shape_of(parts["shape"])
    values = _bits(parts["compressed"])
    dense = np.zeros(shape, dtype=values.dtype)
    dense[_unpack(parts["bitmask"], shape)] = values
    return _from_bits(dense, parts["compressed"].dtype)


def _groups_of_4(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Raw bits and the non-zero mask, both ``(rows, cols / 4, 4)``."""
    rows, cols = weight.shape
    bits = _bits(weight)
    return bits, _nonzero(bits, weight.is_floating_point()).reshape(rows, cols // 4, 4)


def first_24_violation(weight: torch.Tensor) -> tuple[int, int] | None:
    """``(row, column)`` of the first group of 4 along a row with more than 2 non-zeros, else ``None``.

    A weight that is not 2-D is a violation at ``(0, 0)``, a width not divisible by 4 one at ``(0, cols)``.
    """
    if weight.dim() != 2:
        return (0, 0)
    if weight.shape[1] % 4:
        return (0, weight.shape[1])
    _, nonzero = _groups_of_4(weight)
    bad = np.argwhere(np.count_nonzero(nonzero, axis=-1) > 2)
    if len(bad) == 0:
        return None
    row, group = (int(v) for v in bad[0])
    return (row, 4 * group)


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One 2:4 weight in ``sparse-24-bitmask`` form: the (at most) 2 non-zeros of every group of 4 are kept,
    topped up with zeros (the earliest) to exactly 2."""
    rows, cols = weight.shape
    bits, nonzero = _groups_of_4(weight)
    counts = np.count_nonzero(nonzero, axis=-1)
    if (counts > 2).any():
        raise ValueError("weight is not 2:4 sparse")  # callers check first, with the layer's name
    zeros_so_far = np.cumsum(~nonzero, axis=-1)
    keep = (nonzero | (~nonzero & (zeros_so_far <= (2 - counts)[..., None]))).reshape(rows, cols)
    return {
        "compressed": _from_bits(bits[keep].reshape(rows, cols // 2), weight.dtype),
        "bitmask": torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little")),
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
    }


def sparse24_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`sparse24_compress`."""
    shape = _shape_of(parts["shape"])
    values = _bits(parts["compressed"])
    dense = np.zeros(shape, dtype=values.dtype)
    dense[_unpack(parts["bitmask"], shape)] = values.reshape(-1)
    return _from_bits(dense, parts["compressed"].dtype)


def bitmask_bytes(weight: torch.Tensor) -> int:
    """Bytes one weight takes in ``sparse-bitmask`` form (values, bits, row offsets, shape)."""
    rows, cols = weight.shape
    return count_nonzero(weight) * weight.element_size() + rows * math.ceil(cols / 8) + rows * 8 + 2 * 8


def _shape_of(shape: torch.Tensor) -> tuple[int, int]:
    rows, cols = (int(v) for v in shape.flatten().tolist())
    return rows, cols
