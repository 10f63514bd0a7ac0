"""Calibration windows of a causal LM as model calls."""

from __future__ import annotations

import torch

from prunekit.calibration.hooks import Batch


def window_batches(windows: torch.Tensor, batch_size: int) -> list[Batch]:
    """The ``(n, seqlen)`` token ``windows`` in model calls of ``batch_size`` windows, without a KV cache."""
    return [((windows[i : i + batch_size],), {"use_cache": False}) for i in range(0, len(windows), batch_size)]
