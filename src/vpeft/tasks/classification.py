"""Classification as a task type: the timm model's own classifier head, cross-entropy, top-1 accuracy.

Runs of this type keep the trainer's fast path (:class:`vpeft.train.trainer.Trainer`, with its in-memory
batches and frozen-prefix feature cache); this class describes the task for code that works over every
task type (reports, sweeps, the registry) and can score a model on batches of (images, labels).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vpeft.tasks.base import TaskOptions, TaskType, register_task_type


@register_task_type
class Classification(TaskType):
    name = "classification"
    primary_metric = "top1"
    metric_names = ("top1",)
    data_kinds = ("vtab1k", "fgvc", "folder", "mini")

    def load_task(self, spec: str, num_classes: int | None = None) -> Any:
        from vpeft.data import load_task

        return load_task(spec, num_classes)

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        """The backbone itself: its classifier head (sized when it was created) is the task's head."""
        return backbone_model

    def batch_size(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        correct = torch.zeros((), dtype=torch.long)
        seen = 0
        for x, y, *_ in batches:
            correct += (model(x).argmax(-1) == y).sum().cpu()
            seen += y.shape[0]
        return {"top1": 100.0 * correct.item() / max(1, seen)}
