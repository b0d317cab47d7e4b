"""Semantic segmentation: the backbone as a dense encoder, a UPerNet head, pixel cross-entropy, mIoU.

Training crops are the backbone's input size (``crop_size`` 0), so a ViT or Swin with a fixed input
size runs unchanged. Inference is ``whole`` (the image resized to the crop, logits resized back to the
label's size) or ``slide`` (mmseg's: keep-ratio rescale to the (4 * crop, crop) scale, crop-sized
windows at ``slide_stride``, logits averaged over overlaps). Scores are computed at the label's full size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vpeft.config import option
from vpeft.data.segmentation import (
    IGNORE_INDEX,
    SegmentationDataset,
    SegTask,
    SegTransform,
    collate_segmentation,
    load_seg_task,
    rescale_size,
    slide_windows,
)
from vpeft.data.transforms import input_config
from vpeft.dense.encoder import DenseEncoder
from vpeft.dense.heads import UPerHead
from vpeft.dense.metrics import confusion_matrix, segmentation_scores
from vpeft.errors import ConfigError
from vpeft.tasks.base import DataOptions, Schedule, TaskOptions, TaskType, inner_module, register_task_type


@dataclass
class SegmentationOptions(TaskOptions):
    channels: int = option(512, "width of the UPerNet head (512 in UPerNet / V-PETL Bench)")
    dropout: float = option(0.1, "dropout before the head's classifier")
    crop_size: int = option(0, "training crop and inference window, in px (0: the backbone's input size)")
    inference: str = option("auto", "whole or slide inference (auto: slide for ADE20K/VOC, whole otherwise)",
                            choices=("auto", "whole", "slide"))  # fmt: skip
    slide_stride: int = option(0, "slide inference stride in px (0: two thirds of the crop, mmseg's 341 for 512)")
    augment: str = option("auto", "random rescale 0.5-2, crop and flip (auto: on for ADE20K/VOC, off for mini-dense)",
                          choices=("auto", "on", "off"))  # fmt: skip
    schedule: str = option("poly", "learning-rate schedule after warm-up", choices=("poly", "cosine"))
    poly_power: float = option(1.0, "power of the poly schedule (mmseg: 1.0)")
    warmup_iters: int = option(-1, "linear warm-up steps (-1: the recipe's warmup_epochs; 1500 for ADE20K)")

    def validate(self) -> None:
        if self.channels < 1:
            raise ConfigError(f"segmentation option 'channels' must be >= 1, got {self.channels}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"segmentation option 'dropout' must be in [0, 1), got {self.dropout}")
        if self.crop_size < 0 or self.slide_stride < 0:
            raise ConfigError("segmentation options 'crop_size' and 'slide_stride' must be >= 0 (0: automatic)")
        if self.poly_power <= 0:
            raise ConfigError(f"segmentation option 'poly_power' must be > 0, got {self.poly_power}")
        if self.warmup_iters < -1:
            raise ConfigError(f"segmentation option 'warmup_iters' must be >= 0 (or -1), got {self.warmup_iters}")


class SegmentationModel(nn.Module):
    """Encoder (backbone + ViT pyramid) and UPerNet head; ``forward(x)`` -> logits at x's size."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: SegmentationOptions):
        super().__init__()
        self.encoder = DenseEncoder(backbone)
        ref = next(backbone.parameters())
        self.head = UPerHead(self.encoder.channels, num_classes, options.channels, options.dropout).to(ref.device)
        self.num_classes = num_classes
        self.options = options
        size = input_config(backbone).size
        self.crop = (options.crop_size, options.crop_size) if options.crop_size else (int(size[0]), int(size[1]))
        self.mean = tuple(input_config(backbone).mean)
        self.std = tuple(input_config(backbone).std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the backbone's normalised float input."""
        return (images.float() / 255.0 - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x))
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, mode: str, stride: int = 0) -> torch.Tensor:
        """Logits (C, H, W) of one uint8 image (3, H, W) at its own size."""
        height, width = image.shape[-2:]
        if mode == "whole":
            x = F.interpolate(self.normalize(image[None]), self.crop, mode="bilinear", align_corners=False)
            return F.interpolate(self(x), (height, width), mode="bilinear", align_corners=False)[0]
        size = rescale_size(height, width, (4 * max(self.crop), min(self.crop)))
        x = F.interpolate(self.normalize(image[None]), size, mode="bilinear", align_corners=False)
        ch, cw = self.crop
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        step = stride or max(1, (2 * min(self.crop)) // 3)
        corners = slide_windows(x.shape[-2], x.shape[-1], self.crop, (step, step))
        windows = torch.cat([x[:, :, y : y + ch, c : c + cw] for y, c in corners])
        logits = torch.cat([self(w) for w in windows.split(8)])
        total = x.new_zeros(1, self.num_classes, x.shape[-2], x.shape[-1])
        count = x.new_zeros(1, 1, x.shape[-2], x.shape[-1])
        for (y, c), window in zip(corners, logits, strict=True):
            total[:, :, y : y + ch, c : c + cw] += window
            count[:, :, y : y + ch, c : c + cw] += 1
        merged = (total / count)[:, :, : size[0], : size[1]]
        return F.interpolate(merged, (height, width), mode="bilinear", align_corners=False)[0]


@register_task_type
class Segmentation(TaskType):
    name = "segmentation"
    hub_tag = "image-segmentation"
    primary_metric = "mIoU"
    metric_names = ("mIoU", "pixel_acc", "mean_acc")
    options_class = SegmentationOptions
    data_kinds = ("ade20k", "vocseg", "masks", "mini-dense")

    def load_task(self, spec: str, num_classes: int | None = None) -> SegTask:
        return load_seg_task(spec, num_classes)

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        return SegmentationModel(backbone_model, num_classes, options)

    def dataset(self, task: SegTask, split: str, model: nn.Module, options: TaskOptions, *, train: bool,
                data: DataOptions | None = None) -> SegmentationDataset:  # fmt: skip
        augment = task.default_augment if options.augment == "auto" else options.augment == "on"
        transform = SegTransform(model.crop, augment, model.mean, model.std)
        return SegmentationDataset(task, split, transform, train=train, cache=task.kind == "mini-dense")

    def collate(self, items: list[Any]) -> Any:
        return collate_segmentation(items)

    def batch_size(self, batch: Any) -> int:
        return len(batch["image"])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = model(inner_module(model).normalize(batch["image"]))
        return F.cross_entropy(logits.float(), batch["label"], ignore_index=IGNORE_INDEX)

    def lr_schedule(self, options: TaskOptions) -> Schedule:
        warmup = options.warmup_iters if options.warmup_iters >= 0 else None
        return Schedule(options.schedule, options.poly_power, warmup)

    def inference_mode(self, task: SegTask, options: TaskOptions) -> str:
        return task.default_inference if options.inference == "auto" else options.inference

    def eval_kwargs(self, task: SegTask, options: TaskOptions) -> dict[str, Any]:
        return {"mode": self.inference_mode(task, options)}

    def record_fields(self, task: SegTask, options: TaskOptions) -> dict[str, Any]:
        return {"inference": self.inference_mode(task, options)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], mode: str = "whole") -> dict[str, float]:
        model = inner_module(model)
        confusion = None
        for batch in batches:
            images, labels = batch["image"], batch["label"]
            if mode == "whole" and isinstance(images, torch.Tensor):  # one forward for the batch
                x = F.interpolate(model.normalize(images), model.crop, mode="bilinear", align_corners=False)
                logits = F.interpolate(model(x), labels.shape[-2:], mode="bilinear", align_corners=False)
                part = confusion_matrix(logits.argmax(1), labels, model.num_classes, IGNORE_INDEX)
                confusion = part if confusion is None else confusion + part
                continue
            stride = model.options.slide_stride
            for image, label in zip(images, labels, strict=True):
                pred = model.predict(image, mode, stride).argmax(0)
                part = confusion_matrix(pred, label, model.num_classes, IGNORE_INDEX)
                confusion = part if confusion is None else confusion + part
        if confusion is None:
            return dict.fromkeys(self.metric_names, 0.0)
        return segmentation_scores(confusion)
