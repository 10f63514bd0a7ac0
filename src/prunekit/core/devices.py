"""Devices and dtypes: which device to compute on, which dtype to load in, where a model lives."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.core.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given, validated."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available: use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"auto"`` keeps the checkpoint's dtype; names map to torch dtypes."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}") from None


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def dtype_of(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (nothing to wait for elsewhere), so wall-clock timings are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
