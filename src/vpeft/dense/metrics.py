"""Semantic segmentation metrics from a confusion matrix (mmseg's definitions).

``confusion[t, p]`` counts pixels of true class t predicted as p; ignored pixels are left out.
IoU_c = TP / (TP + FP + FN); mIoU averages over the classes present in the ground truth or the
predictions (a class with TP + FP + FN = 0 is NaN and skipped, as mmseg does); pixel accuracy
(mmseg's aAcc) = correct / labelled pixels; mean accuracy averages per-class recall over present classes.
"""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Confusion matrix (num_classes x num_classes, int64) of one batch, on the tensors' device (no host sync)."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU, pixel accuracy and mean class accuracy, in percent."""
    confusion = confusion.double().cpu()
    tp = confusion.diag()
    truth, predicted = confusion.sum(1), confusion.sum(0)
    union = truth + predicted - tp
    iou = tp / union  # NaN where a class is neither labelled nor predicted
    recall = tp / truth
    labelled = confusion.sum()
    out = {
        "mIoU": 100.0 * float(torch.nanmean(iou)) if bool((union > 0).any()) else 0.0,
        "pixel_acc": 100.0 * float(tp.sum() / labelled) if labelled > 0 else 0.0,
        "mean_acc": 100.0 * float(torch.nanmean(recall)) if bool((truth > 0).any()) else 0.0,
    }
    return out


def per_class_iou(confusion: torch.Tensor) -> list[float | None]:
    """IoU of each class in percent, None where the class is neither labelled nor predicted."""
    confusion = confusion.double().cpu()
    tp = confusion.diag()
    union = confusion.sum(1) + confusion.sum(0) - tp
    return [None if u == 0 else 100.0 * float(t / u) for t, u in zip(tp.tolist(), union.tolist(), strict=True)]
