"""Dense heads over the encoder's four maps.

:class:`UPerHead` follows UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding",
ECCV 2018) as V-PETL Bench's ADE20K runs use it: a pyramid pooling module (PSPNet's, scales 1, 2, 3, 6)
on the coarsest map, an FPN top-down path with 1x1 lateral and 3x3 output convolutions, and the fusion
of the four levels (upsampled to the finest) by a 3x3 convolution before a 1x1 classifier. Written
here from the papers. Differences from mmseg's UPerHead: the pooling branches have no norm (a 1x1
pooled map with a batch of one cannot be batch-normalised), and there is no auxiliary FCN head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to s x s, 1x1 convolution, upsample, concatenate with the input."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.scales = scales
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(cin, channels, 1), nn.ReLU(inplace=True)) for s in scales
        )
        self.bottleneck = conv_bn_relu(cin + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.bottleneck(torch.cat([x, *(_resize(b(x), size) for b in self.branches)], dim=1))


class UPerHead(nn.Module):
    """UPerNet's head: PPM + FPN fusion of four maps -> class logits at the finest map's resolution."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels)
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        levels = [lateral(m) for lateral, m in zip(self.laterals, maps[:-1], strict=True)]
        levels.append(self.ppm(maps[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(self.dropout(fused))
