"""Detectors over a dense encoder: torchvision's FCOS, RetinaNet and Mask R-CNN with an FPN neck.

The encoder (a timm backbone, a vpeft method applied or not) is the detector's backbone; the FPN neck
and the detection heads are new and train. The detectors never know which method is applied.

Levels and anchors follow torchvision's COCO models, expressed in strides so that any encoder fits:

- FCOS / RetinaNet: the encoder's three coarsest maps (strides s, 2s, 4s; 8-32 on Swin) through the FPN,
  plus P6 and P7 by stride-2 convolutions; FCOS anchors are one point per location (size = stride),
  RetinaNet's three scales x three aspect ratios with base size 4 x stride (32 at stride 8).
- Mask R-CNN: all four maps (strides 4-32 on Swin) plus a max-pooled fifth level; anchors of size
  8 x stride (32 at stride 4) and three aspect ratios; RoIAlign over the four FPN maps.

Labels are 1..K for every detector (``num_classes`` = K + 1; 0 is the background of Mask R-CNN and never
a target of the others). Images enter as [0, 1] tensors already at the model's input size; the detector
normalises them with the backbone's mean and std and does not resize them. The detection task type
(:mod:`vpeft.tasks.detection`) saves the neck and heads with the method's adapter
(:func:`vpeft.tasks.save_task_model`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from vpeft.data.transforms import input_config
from vpeft.dense.encoder import DenseEncoder
from vpeft.errors import ConfigError

ARCHITECTURES = ("fcos", "retinanet", "maskrcnn")


class EncoderFPN(nn.Module):
    """A dense encoder and an FPN: ``forward(x)`` -> OrderedDict of maps with ``out_channels`` channels each.

    ``levels`` picks the encoder maps the FPN reads (indices into the encoder's four); ``extra`` adds
    coarser levels: ``"p6p7"`` (two stride-2 convolutions on P5, RetinaNet / FCOS) or ``"pool"``
    (max-pooled P5, Mask R-CNN).
    """

    def __init__(self, encoder: DenseEncoder, levels: list[int], out_channels: int, extra: str):
        super().__init__()
        self.encoder = encoder
        self.levels = list(levels)
        extra_block = LastLevelP6P7(out_channels, out_channels) if extra == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([encoder.channels[i] for i in levels], out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        base = [encoder.strides[i] for i in levels]
        self.strides = base + [base[-1] * 2] + ([base[-1] * 4] if extra == "p6p7" else [])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.encoder(x)
        return self.fpn(OrderedDict((str(i), maps[level]) for i, level in enumerate(self.levels)))


def _image_stats(encoder: DenseEncoder) -> tuple[list[float], list[float]]:
    cfg = input_config(encoder.backbone)
    return list(cfg.mean), list(cfg.std)


def image_size_of(encoder: DenseEncoder) -> tuple[int, int]:
    """The (height, width) the backbone takes (its timm input size)."""
    return tuple(input_config(encoder.backbone).size)  # type: ignore[return-value]


def build_detector(
    encoder: DenseEncoder,
    architecture: str,
    num_classes: int,
    image_size: int | tuple[int, int] | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    detections_per_image: int = 100,
    score_thresh: float = 0.05,
) -> nn.Module:
    """A torchvision detector over ``encoder``; ``num_classes`` counts the background (K object classes -> K + 1).

    ``image_size`` is the size images arrive at (default: the backbone's input size); ``fpn_channels``
    the neck's and heads' width (FCOS's GroupNorm needs a multiple of 32); ``representation_size`` the
    width of Mask R-CNN's box head.
    """
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"unknown detector '{architecture}'; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes counts the background: K object classes need K + 1, got {num_classes}")
    if architecture == "fcos" and fpn_channels % 32:
        raise ConfigError(
            f"FCOS's head uses GroupNorm(32, ...): fpn_channels must be a multiple of 32, got {fpn_channels}"
        )
    size = image_size or image_size_of(encoder)
    height, width = (size, size) if isinstance(size, int) else size
    mean, std = _image_stats(encoder)
    # torchvision pads a batch to a multiple of size_divisible; a fixed-size ViT or Swin takes no padding,
    # so use the largest divisor of the input size up to the coarsest stride (the FPN fits any map size)
    divisible = encoder.strides[-1]
    while divisible > 1 and (height % divisible or width % divisible):
        divisible //= 2
    common: dict[str, Any] = dict(
        min_size=min(height, width),
        max_size=max(height, width),
        image_mean=mean,
        image_std=std,
        size_divisible=divisible,
    )
    if architecture == "maskrcnn":
        neck = EncoderFPN(encoder, [0, 1, 2, 3], fpn_channels, "pool")
        sizes = tuple((8 * s,) for s in neck.strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        c = fpn_channels
        return MaskRCNN(
            neck,
            num_classes=None,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
            box_head=TwoMLPHead(c * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes),
            mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
            mask_head=MaskRCNNHeads(c, (c, c, c, c), 1),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes),
            box_detections_per_img=detections_per_image,
            box_score_thresh=score_thresh,
            **common,
        )
    neck = EncoderFPN(encoder, [1, 2, 3], fpn_channels, "p6p7")
    if architecture == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in neck.strides), ((1.0,),) * len(neck.strides))
        head = FCOSHead(fpn_channels, 1, num_classes)
        return FCOS(
            neck,
            num_classes,
            anchor_generator=anchors,
            head=head,
            detections_per_img=detections_per_image,
            score_thresh=score_thresh,
            **common,
        )
    sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in neck.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
    return RetinaNet(
        neck,
        num_classes,
        anchor_generator=anchors,
        head=head,
        detections_per_img=detections_per_image,
        score_thresh=score_thresh,
        **common,
    )


def detector_loss(detector: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> torch.Tensor:
    """The detector's training loss: the sum of torchvision's loss terms (call in train mode)."""
    losses = detector(images, targets)
    return sum(losses.values())  # type: ignore[return-value]


__all__ = [
    "ARCHITECTURES",
    "EncoderFPN",
    "build_detector",
    "detector_loss",
    "image_size_of",
]
