"""A plain U-Net trained from scratch (no pretrained weights to download).

Width is the channel count of the first level and doubles at each of the
``depth`` down-sampling steps, so inputs need H and W divisible by
``2**depth``. Width 16 / depth 4 is ~1.9 M parameters: small enough to train
on a laptop CPU in minutes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    # GroupNorm does not depend on batch statistics: better for batch sizes of 1-2.
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.BatchNorm2d(channels)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv -> norm -> ReLU layers."""

    def __init__(self, cin: int, cout: int, norm: Norm) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Bilinear upsampling (no checkerboard artefacts), 1x1 channel reduction,
    concatenation with the skip connection, conv block."""

    def __init__(self, cin: int, cout: int, norm: Norm) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cout, 1)
        self.block = ConvBlock(2 * cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear",
                                      align_corners=False)
        return self.block(torch.cat([self.reduce(x), skip], dim=1))


class UNet(nn.Module):
    """Logits [B, out_channels, H, W] for an input [B, in_channels, H, W]."""

    def __init__(self, out_channels: int, width: int = 16, depth: int = 4,
                 norm: Norm = "batch", in_channels: int = 3) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.stem = ConvBlock(in_channels, chans[0], norm)
        pairs = list(zip(chans, chans[1:], strict=False))
        self.down = nn.ModuleList(ConvBlock(a, b, norm) for a, b in pairs)
        self.up = nn.ModuleList(Up(b, a, norm) for a, b in reversed(pairs))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(nn.functional.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)
