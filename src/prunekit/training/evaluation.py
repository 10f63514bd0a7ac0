"""Measuring a classifier during training: top-1 accuracy (:func:`evaluate`), the sparsity of chosen weights
(:func:`measure_sparsity`) and their PQ Index (Diao et al. 2023; :func:`weights_pq_index`), on in-memory
``(images, labels)`` tensors. Nothing here knows a data set: normalisation statistics are arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.training.pqi import model_pq_index
from prunekit.training.train_config import DEFAULT_MEAN, DEFAULT_STD
from prunekit.training.transforms import normalize

__all__ = [
    "Data",
    "LabelledImages",
    "evaluate",
    "measure_sparsity",
    "model_device",
    "state_difference",
    "unpack",
    "weights_pq_index",
]


class LabelledImages(Protocol):
    """Anything with ``images`` ``(N, C, H, W)`` and ``labels`` ``(N,)`` tensors (e.g. ``cifar.ImageSet``)."""

    images: torch.Tensor
    labels: torch.Tensor


Data = LabelledImages | tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def measure_sparsity(model: nn.Module, names: Sequence[str]) -> float:
    """Fraction of exact zeros over the named parameters of ``model`` (measured from the weights)."""
    zeros = total = 0
    for name in names:
        weight = model.get_parameter(name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(1, total)


@torch.no_grad()
def weights_pq_index(model: nn.Module, names: Sequence[str]) -> float | None:
    """Whole-model PQ Index (Diao et al. 2023, ``p = 0.5, q = 1``) of the non-zero entries of the named weights
    (pruned entries, exact zeros, are left out); ``None`` when a weight is all zero."""
    weights = {name: model.get_parameter(name).detach() for name in names}
    masks = {name: w != 0 for name, w in weights.items()}
    if any(not bool(m.any()) for m in masks.values()):
        return None
    return model_pq_index(weights, masks).model


def unpack(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data if isinstance(data, tuple) else (data.images, data.labels)
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    return images, labels


def model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test_set: Data,
    *,
    batch_size: int = 1000,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on ``test_set`` in eval mode, images normalised with
    ``mean``/``std`` (:func:`~prunekit.training.transforms.normalize`; CIFAR-10's by default) or passed through
    ``transform`` (a batch of images -> the model's input) when given. The model's train/eval flag is restored."""
    images, labels = unpack(test_set)
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = 0
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            x = (normalize(batch, mean, std) if transform is None else transform(batch)).to(device)
            y = labels[start : start + batch_size].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return correct / max(1, images.shape[0])


def state_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys (floating-point entries)."""
    worst = 0.0
    for name, value in a.items():
        if value.is_floating_point():
            worst = max(worst, float((value - b[name]).abs().max()) if value.numel() else 0.0)
    return worst
