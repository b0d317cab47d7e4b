"""Detection: COCO AP against hand-computed cases, detectors over a dense encoder, training and save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpeft.dense.coco_eval import coco_metrics, metric_names
from vpeft.errors import VPeftError


def _t(boxes, labels, masks=None, iscrowd=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    if masks is not None:
        out["masks"] = torch.as_tensor(np.asarray(masks), dtype=torch.uint8)
    if iscrowd is not None:
        out["iscrowd"] = torch.tensor(iscrowd)
    return out


def _p(boxes, labels, scores, masks=None):
    out = _t(boxes, labels)
    if masks is not None:  # torchvision's Mask R-CNN returns N x 1 x H x W probabilities
        out["masks"] = torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]
    out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


def _box_mask(box, size=(40, 40)):
    m = np.zeros(size, dtype=np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    return m


SIZE = (40, 40)
A, B = [0, 0, 10, 10], [20, 20, 30, 30]
FAR = [30, 0, 38, 8]


# ---------------------------------------------------------------- AP against hand-computed values

# (case, targets per image, predictions per image, expected box_ap, box_ap50, box_ap75)
# ranked TP (0.9), FP (0.8), TP (0.7) over 2 objects: the interpolated precision is 1 up to recall 0.5
# (51 of the 101 recall points) and 2/3 above it (50 points): AP = (51 + 50 * 2/3) / 101 at every IoU
ONE_FP = (51 + 50 * 2 / 3) / 101
AP_CASES = [
    ("perfect", [_t([A, B], [1, 1])], [_p([A, B], [1, 1], [0.9, 0.8])], 1.0, 1.0, 1.0),
    ("one_fp_between_tps", [_t([A, B], [1, 1])], [_p([A, FAR, B], [1, 1, 1], [0.9, 0.8, 0.7])], ONE_FP, ONE_FP, ONE_FP),
    # FP ranked last does not lower precision at any recall reached before it
    ("fp_ranked_last", [_t([A, B], [1, 1])], [_p([A, B, FAR], [1, 1, 1], [0.9, 0.8, 0.1])], 1.0, 1.0, 1.0),
    # IoU 0.49 misses every threshold; IoU 0.51 passes only 0.50 (1 of 10 thresholds)
    ("iou_0.49", [_t([A], [1])], [_p([[0, 0, 10, 4.9]], [1], [0.9])], 0.0, 0.0, 0.0),
    ("iou_0.51", [_t([A], [1])], [_p([[0, 0, 10, 5.1]], [1], [0.9])], 0.1, 1.0, 0.0),
    # IoU 0.8 passes 0.50..0.80 (7 of 10 thresholds)
    ("iou_0.80", [_t([A], [1])], [_p([[0, 0, 10, 8.0]], [1], [0.9])], 0.7, 1.0, 1.0),
    # the right box with the wrong class is a miss for class 1 and a false positive for class 2
    ("wrong_class", [_t([A], [1])], [_p([A], [2], [0.9])], 0.0, 0.0, 0.0),
    # one of two objects found, no false positive: precision 1 up to recall 0.5 -> 51 / 101
    ("half_recall", [_t([A, B], [1, 1])], [_p([A], [1], [0.9])], 51 / 101, 51 / 101, 51 / 101),
    # two classes averaged: class 1 perfect, class 2 missed -> 0.5
    ("two_classes", [_t([A, B], [1, 2])], [_p([A], [1], [0.9])], 0.5, 0.5, 0.5),
    # a detection on a crowd region is ignored, not a false positive
    ("crowd_ignored", [_t([A, B], [1, 1], iscrowd=[0, 1])], [_p([B, A], [1, 1], [0.95, 0.9])], 1.0, 1.0, 1.0),
    ("no_detections", [_t([A], [1])], [_p(np.zeros((0, 4)), [], [])], 0.0, 0.0, 0.0),
    # over two images: image 1 perfect, image 2's object missed while a FP scores highest
    (
        "two_images",
        [_t([A], [1]), _t([B], [1])],
        [_p([A], [1], [0.8]), _p([FAR], [1], [0.9])],
        # ranked FP (0.9), TP (0.8): recall 0.5 reached at precision 0.5 -> 51 points at 0.5
        51 * 0.5 / 101,
        51 * 0.5 / 101,
        51 * 0.5 / 101,
    ),
]


@pytest.mark.parametrize("case,targets,preds,ap,ap50,ap75", AP_CASES, ids=[c[0] for c in AP_CASES])
def test_box_ap_hand_computed(case, targets, preds, ap, ap50, ap75):
    m = coco_metrics(targets, preds, [SIZE] * len(targets), categories=[1, 2])
    assert m["box_AP"] == pytest.approx(ap, abs=1e-6)
    assert m["box_AP50"] == pytest.approx(ap50, abs=1e-6)
    assert m["box_AP75"] == pytest.approx(ap75, abs=1e-6)


def test_mask_ap_perfect_and_half():
    ma, mb = _box_mask(A), _box_mask(B)
    targets = [_t([A, B], [1, 1], masks=[ma, mb])]
    # perfect masks (probabilities above the threshold) score 1.0
    perfect = [_p([A, B], [1, 1], [0.9, 0.8], masks=[ma * 0.9, mb * 0.7])]
    m = coco_metrics(targets, perfect, [SIZE], categories=[1], masks=True)
    assert set(m) == set(metric_names(masks=True))
    assert m["mask_AP"] == pytest.approx(1.0) and m["box_AP"] == pytest.approx(1.0)
    # right boxes, but the second mask covers only 40% of its object: mask IoU 0.4 fails every threshold
    partial = mb.copy()
    partial[24:30] = 0
    half = [_p([A, B], [1, 1], [0.9, 0.8], masks=[ma, partial])]
    m = coco_metrics(targets, half, [SIZE], categories=[1], masks=True)
    assert m["box_AP"] == pytest.approx(1.0)
    assert m["mask_AP"] == pytest.approx(51 / 101)
    # probabilities below the threshold are background: an empty mask matches nothing
    empty = [_p([A, B], [1, 1], [0.9, 0.8], masks=[ma * 0.4, mb * 0.4])]
    assert coco_metrics(targets, empty, [SIZE], categories=[1], masks=True)["mask_AP"] == 0.0


@pytest.mark.parametrize(
    "targets,preds,kwargs,match",
    [
        ([_t([A], [7])], [_p([A], [1], [0.9])], {}, "label 7 is not one of the categories"),
        ([_t([], [])], [_p([A], [1], [0.9])], {}, "no ground-truth objects"),
        ([_t([A], [1])], [_p([A], [1], [0.9])], {"masks": True}, "needs target\\['masks'\\]"),
        ([_t([A], [1]), _t([A], [1])], [_p([A], [1], [0.9])], {}, "pass one of each per image"),
    ],
)
def test_ap_bad_input(targets, preds, kwargs, match):
    with pytest.raises(VPeftError, match=match):
        coco_metrics(targets, preds, [SIZE] * len(targets), categories=[1], **kwargs)
