"""CIFAR-style ResNets (He et al. 2016) and VGG with batch norm (Simonyan & Zisserman 2015), as plain,
traceable ``nn.Module``\\ s.

**ResNet-20/32/56** (He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2): a 3x3 conv
with ``width`` filters, three stages of ``n`` basic blocks (two 3x3 convs with batch norm) at ``width``,
``2*width`` and ``4*width`` filters on 32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 has
stride 2), global average pooling and a linear classifier: depth ``6n + 2`` (n = 3, 5, 9 for 20, 32, 56).
Convolutions have no bias (batch norm follows each).

Where a block changes shape, the shortcut is by default **option B** of He et al. (a 1x1 convolution with
stride 2 and batch norm, a projection), as in open_lth (Frankle & Carbin 2019's code), so that the lottery-
ticket papers' ResNet-20 (16/32/64 filters) is this one: 272,474 parameters. ``shortcut="A"`` is the
paper's CIFAR choice (identity on every other pixel, zero channels appended; no parameters): 269,722
parameters, the "0.27M" of He et al.'s Table 6.

**VGG-11/16** for CIFAR: the VGG configurations A and D (Simonyan & Zisserman 2015, Table 1) with batch norm
after each conv (no conv bias), five 2x2 max pools taking 32x32 to 1x1, then one linear layer (the usual
CIFAR adaptation; open_lth's ``cifar_vgg`` differs only in keeping conv biases and average-pooling last).
``width`` scales every conv (64 = the paper's).

Initialisation: Kaiming normal for convolutions (He et al. 2015, fan-out, ReLU gain), batch-norm weight 1 and
bias 0, PyTorch's default for the linear layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.errors import ConfigError

Shortcut = Literal["A", "B"]

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "init_weights",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg11",
    "vgg16",
]


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """The initialisation these models are built with (He et al. 2015 Kaiming normal, fan-out, for convolutions;
    batch norm scale 1, shift 0, running statistics reset; PyTorch's default for linear layers). Pass it as
    ``init`` to :func:`prunekit.training.lottery.random_reinit` / ``scratch_init``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


class _PadShortcut(nn.Module):
    """He et al. 2016 option A: keep every other pixel and append zero channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (N, C, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # (N, C + extra, H/2, W/2)


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``
    (He et al. 2016, Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: Shortcut = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            if stride != 2 or out_channels < in_channels:
                raise ConfigError("option A shortcuts only halve the map and add channels")
            self.shortcut = _PadShortcut(out_channels - in_channels)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` for 32x32 inputs (He et al. 2016, Sec. 4.2); see the module docstring."""

    def __init__(self, depth: int, num_classes: int = 10, width: int = 16, shortcut: Shortcut = "B") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if width < 1 or num_classes < 1:
            raise ConfigError(f"width and num_classes must be positive, got {width}, {num_classes}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, shortcut))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))  # (N, w, 32, 32)
        out = self.blocks(out)  # (N, 4w, 8, 8)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 4w)
        return self.fc(out)


def resnet20(num_classes: int = 10, width: int = 16, shortcut: Shortcut = "B") -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016; n = 3). 272,474 parameters at width 16 with option B shortcuts."""
    return CifarResNet(20, num_classes, width, shortcut)


def resnet32(num_classes: int = 10, width: int = 16, shortcut: Shortcut = "B") -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016; n = 5)."""
    return CifarResNet(32, num_classes, width, shortcut)


def resnet56(num_classes: int = 10, width: int = 16, shortcut: Shortcut = "B") -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016; n = 9)."""
    return CifarResNet(56, num_classes, width, shortcut)


_VGG_PLANS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # configuration A
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),  # D
}


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 inputs (Simonyan & Zisserman 2015, Table 1); see the module docstring."""

    def __init__(self, depth: int, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if depth not in _VGG_PLANS:
            raise ConfigError(f"VGG depth must be one of {sorted(_VGG_PLANS)}, got {depth}")
        if width < 1 or num_classes < 1:
            raise ConfigError(f"width and num_classes must be positive, got {width}, {num_classes}")
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG_PLANS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, int(item) * width // 64)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)  # (N, 8w, 1, 1) after five 2x2 pools of 32x32
        return self.fc(out.flatten(1))


def vgg11(num_classes: int = 10, width: int = 64) -> CifarVGG:
    """VGG-11 (configuration A) with batch norm for CIFAR; 9,228,362 parameters at width 64."""
    return CifarVGG(11, num_classes, width)


def vgg16(num_classes: int = 10, width: int = 64) -> CifarVGG:
    """VGG-16 (configuration D) with batch norm for CIFAR; 14,724,042 parameters at width 64."""
    return CifarVGG(16, num_classes, width)
