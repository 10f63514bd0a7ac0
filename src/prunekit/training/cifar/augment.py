"""The standard CIFAR training augmentation and normalisation (He et al. 2016, Sec. 4.2: pad 4, random 32x32
crop, horizontal flip) with CIFAR-10's per-channel statistics, and a fast in-memory batch iterator for CPU
training. The crop and flip are the generic tensor functions of :mod:`prunekit.training.transforms`; every
draw comes from an explicit ``torch.Generator``, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from prunekit.core.errors import ConfigError
from prunekit.training import transforms
from prunekit.training.transforms import pad_crop, random_crop, random_hflip

# Per-channel mean and standard deviation of the CIFAR-10 training pixels (in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "augment",
    "iterate_batches",
    "normalize",
    "pad_crop",
    "random_crop",
    "random_hflip",
]


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel for ``uint8`` images (float images are taken to be in [0, 1]);
    returns float32 ``(N, C, H, W)``. CIFAR-10's statistics by default."""
    return transforms.normalize(images, mean, std)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR training augmentation on a ``uint8`` batch: random crop (pad ``padding``), then
    horizontal flip, then normalisation (He et al. 2016, Sec. 4.2). Returns float32."""
    return normalize(random_hflip(random_crop(images, generator, padding), generator))


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    train_augment: bool = False,
    drop_last: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(float32 normalised images, labels)`` from an in-memory ``uint8`` tensor, for CPU training.

    One epoch: a permutation from ``generator`` (when ``shuffle``), then per batch the crop and flip draws
    (when ``train_augment``), so the same generator state gives the same epoch. Call again for the next epoch.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if (shuffle or train_augment) and generator is None:
        raise ConfigError("shuffling and augmentation draw from a torch.Generator: pass generator=")
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and idx.numel() < batch_size:
            break
        x = images[idx.to(images.device)]
        if train_augment:
            assert generator is not None
            x = random_hflip(random_crop(x, generator), generator)
        yield normalize(x, mean, std), labels[idx.to(labels.device)]
