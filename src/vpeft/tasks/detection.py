"""Object detection (and instance masks) as a task type: torchvision's FCOS / RetinaNet / Mask R-CNN over
the backbone's dense encoder and an FPN; COCO box AP (and mask AP for Mask R-CNN) with pycocotools.

Data: ``coco:<dir>`` (COCO-format json), ``voc:<dir>`` (PASCAL VOC XML) or a folder in either layout.
Images are resized to the backbone's input size (a square; boxes and masks with them) and flipped
horizontally half the time in training. AP is computed in that resized frame (box IoU is unchanged by
a per-axis rescale, so box AP is the same as at the original size; mask AP differs by the masks'
resampling only). Metrics are percentages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.config import option
from vpeft.data.detection import DetectionData, DetectionDataset, detection_collate, load_detection
from vpeft.data.mini_dense import mini_dense_root
from vpeft.dense.coco_eval import CocoAccumulator
from vpeft.dense.detection import ARCHITECTURES, build_detector, image_size_of
from vpeft.dense.encoder import dense_encoder
from vpeft.errors import ConfigError, VPeftError
from vpeft.tasks.base import DataOptions, Schedule, TaskOptions, TaskType, inner_module, register_task_type


@dataclass
class DetectionOptions(TaskOptions):
    detector: str = option("maskrcnn", "torchvision detector over the encoder + FPN (maskrcnn adds mask AP)",
                           choices=ARCHITECTURES)  # fmt: skip
    fpn_channels: int = option(256, "width of the FPN and the heads (torchvision: 256; FCOS needs a multiple of 32)")
    representation_size: int = option(1024, "width of Mask R-CNN's two-layer box head (torchvision: 1024)")
    image_size: int = option(0, "square input size in px (0: the backbone's input size)")
    flip: bool = option(True, "random horizontal flip in training (boxes and masks flipped with the image)")
    score_thresh: float = option(0.05, "detections scoring below this are dropped before AP (torchvision: 0.05)")
    detections_per_image: int = option(100, "detections kept per image (COCO AP counts up to 100)")

    def validate(self) -> None:
        if self.fpn_channels < 1 or self.representation_size < 1 or self.detections_per_image < 1:
            raise ConfigError("detection options fpn_channels, representation_size, detections_per_image must be >= 1")
        if self.detector == "fcos" and self.fpn_channels % 32:
            raise ConfigError(
                f"detector fcos needs fpn_channels a multiple of 32 (GroupNorm(32)), got {self.fpn_channels}"
            )
        if self.image_size < 0:
            raise ConfigError(f"detection option image_size must be >= 0 (0: the backbone's), got {self.image_size}")
        if not 0 <= self.score_thresh < 1:
            raise ConfigError(f"detection option score_thresh must be in [0, 1), got {self.score_thresh}")


@register_task_type
class Detection(TaskType):
    """Boxes (and masks): labels 1..K, ``num_classes`` = K object classes (the background is added)."""

    name = "detection"
    hub_tag = "object-detection"
    find_unused_parameters = True  # FCOS and RetinaNet read P3-P7: a pyramid level may go unused
    primary_metric = "box_AP"
    #: mask_* are reported by the maskrcnn detector only
    metric_names = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")
    options_class = DetectionOptions
    data_kinds = ("coco", "voc", "mini-dense")

    # ------------------------------------------------------------ data

    def load_task(self, spec: str, num_classes: int | None = None) -> DetectionData:
        kind, _, rest = spec.partition(":")
        if kind == "mini-dense":
            data = _mini_dense(rest)
        else:
            data = load_detection(spec)
        if num_classes is not None and num_classes != data.num_classes:
            raise ConfigError(
                f"the detection data '{spec}' has {data.num_classes} categories, not {num_classes}; "
                "drop --num-classes or fix the categories"
            )
        return data

    def dataset(self, task: DetectionData, split: str, model: nn.Module, options: TaskOptions, *, train: bool,
                data: DataOptions | None = None) -> DetectionDataset:  # fmt: skip
        masks = bool(getattr(model, "predicts_masks", False))
        if masks and not task.has_masks:
            raise ConfigError(
                f"detector maskrcnn needs instance masks, but '{task.spec()}' has none; pass detector=retinanet or fcos"
            )
        flip = train and bool(getattr(options, "flip", True))
        return DetectionDataset(task.records(split), model.image_size, train=train, masks=masks, flip=flip)

    def collate(self, items: list[Any]) -> Any:
        return detection_collate(items)

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    # ------------------------------------------------------------ model

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        """torchvision's detector with the backbone's dense encoder + FPN as its backbone (K + 1 classes)."""
        encoder = dense_encoder(backbone_model)
        size = (options.image_size, options.image_size) if options.image_size else image_size_of(encoder)
        detector = build_detector(
            encoder,
            options.detector,
            num_classes + 1,
            image_size=size,
            fpn_channels=options.fpn_channels,
            representation_size=options.representation_size,
            detections_per_image=options.detections_per_image,
            score_thresh=options.score_thresh,
        )
        ref = next(backbone_model.parameters())
        detector.to(ref.device)
        detector.num_classes = num_classes
        detector.predicts_masks = options.detector == "maskrcnn"
        detector.image_size = size
        return detector

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if not model.training:
            raise VPeftError(
                "the detection loss needs the model in training mode (torchvision returns losses only then)"
            )
        images, targets = batch
        return sum(model(images, _train_targets(targets, inner_module(model))).values())

    def lr_schedule(self, options: TaskOptions) -> Schedule:
        return Schedule("poly", 1.0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], **kwargs: Any) -> dict[str, float]:
        model = inner_module(model)
        was_training = model.training
        model.eval()
        masks = bool(getattr(model, "predicts_masks", False))
        acc = CocoAccumulator(categories=range(1, model.num_classes + 1), masks=masks)
        try:
            for images, targets in batches:
                if not images:
                    continue
                for image, target, prediction in zip(images, targets, model(images), strict=True):
                    acc.add(target, prediction, tuple(image.shape[-2:]))
        finally:
            model.train(was_training)
        if not acc.images:
            return dict.fromkeys(self.metric_names[: 6 if masks else 3], 0.0)
        return {name: 100.0 * value for name, value in acc.compute().items()}


def _mini_dense(name: str) -> DetectionData:
    """``mini-dense:detection``: the mini dense suite's canvases as COCO instances (5 classes, masks)."""
    if name != "detection":
        raise ConfigError(
            f"'mini-dense:{name}' is not a detection task; the mini dense suite has: "
            "mini-dense:detection (task type detection), mini-dense:segmentation (task type segmentation)"
        )
    root = mini_dense_root()
    data = load_detection(f"coco:{root}")
    data.name, data.kind, data.root = "mini-det", "mini-dense", str(root)
    return data


def _train_targets(targets: list[dict], model: nn.Module) -> list[dict]:
    """What torchvision's detectors read: boxes and labels (and masks for Mask R-CNN)."""
    keys = ("boxes", "labels", "masks") if getattr(model, "predicts_masks", False) else ("boxes", "labels")
    return [{k: t[k] for k in keys} for t in targets]
