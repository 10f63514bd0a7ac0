"""Batch image transforms as tensor functions drawing from an explicit ``torch.Generator`` (so a run is
reproducible), and the training loop's default transform built from a :class:`TrainConfig`.

The augmentation is the standard one of He et al. 2016 (Sec. 4.2: pad 4, random crop back to the image size,
horizontal flip), followed by per-channel normalisation. Nothing here knows a data set: the statistics come
from the caller (:mod:`prunekit.training.cifar.augment` holds CIFAR-10's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from prunekit.training.train_config import AUGMENTATION_STREAM, TrainConfig, derive_seed

#: What the training loop applies to each global batch: ``transform(images, step) -> float32 batch`` (``step``
#: is the 0-based optimizer step, so a transform can draw reproducibly from it).
BatchTransform = Callable[[torch.Tensor, int], torch.Tensor]

__all__ = [
    "BatchTransform",
    "config_transform",
    "normalize",
    "pad_crop",
    "random_crop",
    "random_hflip",
]


def pad_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``images`` ``(N, C, H, W)`` by ``padding`` on every side and cut an ``H x W`` window from
    each at ``offsets`` ``(N, 2)`` = (row, column) in the padded image, each in ``[0, 2 * padding]``.

    Offset ``(padding, padding)`` returns the image unchanged; ``(0, 0)`` shifts it down and right.
    """
    n, _, h, w = images.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets must be (N, 2) = ({n}, 2), got {tuple(offsets.shape)}")
    if padding == 0:
        return images.clone()
    offsets = offsets.to(images.device, torch.long)
    if bool(((offsets < 0) | (offsets > 2 * padding)).any()):
        raise ValueError(f"offsets must lie in [0, {2 * padding}]")
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    window = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (N, H, W, C)
    return window.permute(0, 3, 1, 2).contiguous()


def random_crop(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random ``H x W`` crop of each zero-padded image (He et al. 2016, Sec. 4.2: pad 4, crop 32).

    Offsets are drawn as ``torch.randint(0, 2 * padding + 1, (N, 2), generator=generator)`` on the CPU.
    """
    offsets = torch.randint(0, 2 * padding + 1, (images.shape[0], 2), generator=generator)
    return pad_crop(images, offsets, padding)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p`` (drawn as ``torch.rand(N, generator=generator) < p``)."""
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel for ``uint8`` images (float images are taken to be in [0, 1]);
    returns float32 ``(N, C, H, W)``."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x - m) / s


def config_transform(config: TrainConfig) -> BatchTransform:
    """The transform :func:`~prunekit.training.loop.train` uses by default: when ``config.augment``, a
    pad-``config.padding`` random crop then a horizontal flip, drawn from a generator seeded
    ``derive_seed(config.seed, AUGMENTATION_STREAM, step)``; then normalisation with ``config.mean``/``config.std``."""

    def transform(images: torch.Tensor, step: int) -> torch.Tensor:
        if config.augment:
            generator = torch.Generator().manual_seed(derive_seed(config.seed, AUGMENTATION_STREAM, step))
            images = random_hflip(random_crop(images, generator, config.padding), generator)
        return normalize(images, config.mean, config.std)

    return transform
