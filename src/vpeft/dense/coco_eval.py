"""COCO box AP and mask AP (AP, AP50, AP75) with pycocotools, from in-memory targets and predictions.

Ground truth and predictions use the detection API of torchvision: per image a dict with ``boxes``
(N x 4, ``x1, y1, x2, y2`` in pixels), ``labels`` (N, category ids), optional ``masks`` (N x H x W,
binary for ground truth, probabilities or binary for predictions), and for predictions ``scores``.
Ground truth may carry ``iscrowd`` (N, 1 = ignored region: matching it neither helps nor hurts).
Metrics are fractions in [0, 1], as pycocotools computes them (101-point interpolated precision,
IoU thresholds 0.50:0.05:0.95, up to 100 detections per image, all object sizes).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vpeft.errors import VPeftError

#: metric name -> (iou type, index into COCOeval.stats)
_STATS = {"AP": 0, "AP50": 1, "AP75": 2}
IOU_TYPES = {"box": "bbox", "mask": "segm"}


def metric_names(masks: bool) -> list[str]:
    """The names :func:`coco_metrics` returns: box_AP, box_AP50, box_AP75 (and mask_* when ``masks``)."""
    kinds = ["box", "mask"] if masks else ["box"]
    return [f"{kind}_{stat}" for kind in kinds for stat in _STATS]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class CocoAccumulator:
    """Collects ground truth and predictions image by image, then scores them with :meth:`compute`.

    ``categories`` are the category ids predictions and targets use (e.g. 1..K); ``masks`` adds mask AP.
    ``mask_threshold`` binarises predicted mask probabilities (torchvision's Mask R-CNN returns them).
    """

    categories: Sequence[int]
    masks: bool = False
    mask_threshold: float = 0.5
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)

    def add(self, target: dict[str, Any], prediction: dict[str, Any], size: tuple[int, int]) -> None:
        """One image: its ground truth, the model's prediction and the (height, width) both refer to."""
        image_id = len(self.images) + 1
        height, width = int(size[0]), int(size[1])
        self.images.append({"id": image_id, "height": height, "width": width})
        known = set(self.categories)
        boxes, labels = _numpy(target["boxes"]).reshape(-1, 4), _numpy(target["labels"]).reshape(-1)
        crowd = _numpy(target["iscrowd"]).reshape(-1) if "iscrowd" in target else np.zeros(len(labels))
        gt_masks = _numpy(target["masks"]) if self.masks and "masks" in target else None
        if self.masks and (gt_masks is None or len(gt_masks) != len(labels)):
            raise VPeftError("mask AP needs target['masks'] with one mask per box; load the data with masks")
        for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            if int(label) not in known:
                raise VPeftError(f"ground-truth label {int(label)} is not one of the categories {sorted(known)}")
            x1, y1, x2, y2 = (float(v) for v in box)
            ann = {
                "id": len(self.annotations) + 1,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(crowd[i]),
            }
            if self.masks:
                ann["segmentation"] = _rle(gt_masks[i] > 0)
                ann["area"] = float((gt_masks[i] > 0).sum())
            self.annotations.append(ann)
        boxes = _numpy(prediction["boxes"]).reshape(-1, 4)
        scores = _numpy(prediction["scores"]).reshape(-1)
        labels = _numpy(prediction["labels"]).reshape(-1)
        pred_masks = None
        if self.masks:
            if "masks" not in prediction:
                raise VPeftError("mask AP needs prediction['masks']; use a detector with a mask head (maskrcnn)")
            pred_masks = _numpy(prediction["masks"]).reshape(len(scores), height, width)
        for i, (box, score, label) in enumerate(zip(boxes, scores, labels, strict=True)):
            x1, y1, x2, y2 = (float(v) for v in box)
            det = {"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            det["score"] = float(score)
            if pred_masks is not None:
                det["segmentation"] = _rle(pred_masks[i] >= self.mask_threshold)
            self.detections.append(det)

    def compute(self) -> dict[str, float]:
        """box_AP, box_AP50, box_AP75 (and mask_*) over everything added, as fractions."""
        if not any(not a["iscrowd"] for a in self.annotations):
            raise VPeftError("no ground-truth objects were added; AP is undefined on data without objects")
        out: dict[str, float] = {}
        for kind in ["box", "mask"] if self.masks else ["box"]:
            out.update(_evaluate(self, kind))
        return out


def _evaluate(acc: CocoAccumulator, kind: str) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    iou_type = IOU_TYPES[kind]
    if not acc.detections:  # pycocotools cannot load an empty result list; no detection means AP 0
        return {f"{kind}_{stat}": 0.0 for stat in _STATS}
    dataset = {
        "images": acc.images,
        "annotations": copy.deepcopy(acc.annotations),
        "categories": [{"id": int(c), "name": str(c)} for c in acc.categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(acc.detections))
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # -1 means no category had ground truth at that setting; report it as 0
    return {f"{kind}_{stat}": max(float(evaluator.stats[i]), 0.0) for stat, i in _STATS.items()}


def coco_metrics(
    targets: Sequence[dict[str, Any]],
    predictions: Sequence[dict[str, Any]],
    sizes: Sequence[tuple[int, int]],
    categories: Sequence[int],
    masks: bool = False,
) -> dict[str, float]:
    """Box AP (and mask AP) of ``predictions`` against ``targets``; ``sizes`` are the images' (height, width)."""
    if not len(targets) == len(predictions) == len(sizes):
        raise VPeftError(
            f"{len(targets)} targets, {len(predictions)} predictions and {len(sizes)} sizes: pass one of each per image"
        )
    acc = CocoAccumulator(categories, masks=masks)
    for target, prediction, size in zip(targets, predictions, sizes, strict=True):
        acc.add(target, prediction, size)
    return acc.compute()
