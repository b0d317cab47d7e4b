"""A timm backbone, with or without a vpeft method applied, as a multi-scale dense encoder.

Hierarchical backbones (Swin, ConvNeXt, ResNet, EfficientNet) give their stage outputs through timm's
``forward_intermediates``; the four finest levels at stride >= 4 are kept (a backbone with fewer stages
gets the missing coarse levels by 2x2 max-pooling of its last map). A plain ViT gives one map, from its
last block (after any method's extra tokens are removed), at stride ``p`` (the patch size); a ViTDet-style
simple feature pyramid (Li et al., ECCV 2022) makes strides p/4, p/2, p, 2p from it with two
deconvolutions, one deconvolution, the identity and a max-pool. The pyramid's parameters train with the
dense head.

The encoder never knows which method is applied: the method changed the backbone's modules in place,
and the forward pass runs through them.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from vpeft.api import get_state
from vpeft.backbones.anatomy import Anatomy
from vpeft.backbones.registry import describe
from vpeft.errors import ConfigError, UnsupportedBackboneError

#: pyramid levels the dense heads read
NUM_LEVELS = 4


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-p map -> strides p/4, p/2, p, 2p.

    Channels: d/4, d/2, d, d (the deconvolutions halve the width, as in ViTDet).
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise UnsupportedBackboneError(f"the ViT's width {dim} is not divisible by 4 (the pyramid halves it twice)")
        half, quarter = dim // 2, dim // 4
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, half, 2, stride=2),
            LayerNorm2d(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, half, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.channels = [quarter, half, dim, dim]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(x), self.up2(x), x, self.down2(x)]


class DenseEncoder(nn.Module):
    """Multi-scale feature maps of a timm backbone: ``forward(x)`` -> four NCHW maps, finest first.

    ``channels`` and ``strides`` describe the four maps. The backbone's own parameters keep the
    ``requires_grad`` the method gave them; the ViT pyramid (if any) is trainable.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        state = get_state(backbone)
        anatomy: Anatomy = state.anatomy if state is not None else describe(backbone)
        _refuse_classifier(backbone, anatomy)
        self.backbone = backbone
        self.family = anatomy.family
        self.pyramid: SimpleFeaturePyramid | None = None
        if not hasattr(backbone, "forward_intermediates"):
            raise UnsupportedBackboneError(
                f"{type(backbone).__name__} has no forward_intermediates(); upgrade timm (>= 1.0) for dense tasks"
            )
        if "stages" not in anatomy.parts:  # a columnar ViT: build a simple feature pyramid
            patch = (anatomy.patch_size or (16, 16))[0]
            if patch % 4:
                raise UnsupportedBackboneError(
                    f"the ViT's patch size {patch} is not divisible by 4; the simple feature pyramid needs stride p/4"
                )
            self.pyramid = SimpleFeaturePyramid(anatomy.embed_dim)
            self._last = anatomy.depth - 1
            self.channels = list(self.pyramid.channels)
            self.strides = [patch // 4, patch // 2, patch, patch * 2]
        else:
            info = backbone.feature_info
            levels = [i for i, f in enumerate(info) if int(f["reduction"]) >= 4]
            if not levels:
                raise UnsupportedBackboneError(f"{anatomy.architecture} has no feature level at stride >= 4")
            self._indices = levels[-NUM_LEVELS:] if len(levels) > NUM_LEVELS else levels
            self.channels = [int(info[i]["num_chs"]) for i in self._indices]
            self.strides = [int(info[i]["reduction"]) for i in self._indices]
            self._extra = NUM_LEVELS - len(self._indices)
            for _ in range(self._extra):
                self.channels.append(self.channels[-1])
                self.strides.append(self.strides[-1] * 2)
        if self.pyramid is not None:
            ref = next(backbone.parameters())
            self.pyramid.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.pyramid is not None:
            (last,) = self.backbone.forward_intermediates(
                x, indices=[self._last], intermediates_only=True, output_fmt="NCHW"
            )
            return self.pyramid(last)
        maps = list(
            self.backbone.forward_intermediates(x, indices=self._indices, intermediates_only=True, output_fmt="NCHW")
        )
        for _ in range(self._extra):
            maps.append(nn.functional.max_pool2d(maps[-1], 2, ceil_mode=True))
        return maps


def _refuse_classifier(backbone: nn.Module, anatomy: Anatomy) -> None:
    """A dense task has no use for the classification head; its parameters would train and be saved for nothing."""
    for head in anatomy.heads:
        if any(True for _ in backbone.get_submodule(head).parameters()):
            raise ConfigError(
                f"the backbone {anatomy.architecture} has a classifier head ('{head}'); a dense encoder reads "
                "feature maps only: create the backbone with num_classes=0"
            )


def dense_encoder(model: nn.Module) -> DenseEncoder:
    """The dense encoder of a timm model (apply the vpeft method first, with ``vpeft.apply``)."""
    return DenseEncoder(model)
