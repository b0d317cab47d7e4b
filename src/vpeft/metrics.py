"""Benchmark metrics: accuracy and the Performance-Parameter Trade-off (PPT)."""

from __future__ import annotations

import math

import torch

#: PPT's normalising constant C (V-PETL Bench)
PPT_C = 1e7


def ppt(accuracy: float, trainable_params: int, c: float = PPT_C) -> float:
    """PPT = M * exp(-log10(P / C + 1)), with M the accuracy as a fraction in [0, 1].

    >>> round(ppt(0.7170, 2_380_000), 2)   # LST in V-PETL Bench
    0.65
    """
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy}")
    return accuracy * math.exp(-math.log10(trainable_params / c + 1.0))


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(dim=-1) == labels).sum().item())
