"""Classification as a task type: the timm model's own classifier head, cross-entropy, top-1 accuracy.

Its splits are :class:`vpeft.data.ImageDataset` s; under a deterministic transform they hold decoded
images that the trainer gathers on the device as whole batches (and that a frozen prefix can turn into
cached features), so classification keeps the fast input path without a loop of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from vpeft.api import save_adapter
from vpeft.data import ImageDataset, Task, build_transform, input_config, is_deterministic, load_task
from vpeft.tasks.base import DataOptions, TaskOptions, TaskType, register_task_type


def preset_of(task: Task, data: DataOptions) -> str:
    """The transform preset: the run's, else fgvc for FGVC data and vtab for the rest."""
    return data.preset or ("fgvc" if task.kind == "fgvc" else "vtab")


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs, labels, valid rows): device-held batches carry the count of real rows of a padded batch."""
    x, y, *rest = batch
    return x, y, int(rest[0]) if rest else int(y.shape[0])


@register_task_type
class Classification(TaskType):
    name = "classification"
    hub_tag = "image-classification"
    primary_metric = "top1"
    metric_names = ("top1",)
    data_kinds = ("vtab1k", "fgvc", "folder", "mini")
    head_in_backbone = True
    data_stages = True
    feature_cache = True

    def load_task(self, spec: str, num_classes: int | None = None) -> Task:
        return load_task(spec, num_classes)

    def dataset(self, task: Task, split: str, model: nn.Module, options: TaskOptions, *, train: bool,
                data: DataOptions | None = None) -> ImageDataset:  # fmt: skip
        data = data or DataOptions()
        preset = preset_of(task, data)
        geometry, normalize = build_transform(input_config(model), preset, train)
        cache = data.cache_images == "on" or (data.cache_images == "auto" and is_deterministic(preset, train))
        return ImageDataset(task.split(split), geometry, normalize=normalize, skip_bad_images=data.skip_bad_images,
                            cache=cache and not data.read_once, read=task.read)  # fmt: skip

    def stage_dataset(self, task: Task, split: str, model: nn.Module, data: DataOptions,
                      train_set: Dataset | None = None) -> Dataset:  # fmt: skip
        if train_set is not None and is_deterministic(preset_of(task, data), True):
            return train_set  # the training set itself: its transform is the evaluation one
        geometry, normalize = build_transform(input_config(model), preset_of(task, data), train=False)
        return ImageDataset(task.split(split), geometry, normalize=normalize, skip_bad_images=data.skip_bad_images,
                            cache=data.cache_images != "off", read=task.read)  # fmt: skip

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        """The backbone itself: its classifier head (sized when it was created) is the task's head."""
        return backbone_model

    def batch_size(self, batch: Any) -> int:
        return _unpack(batch)[2]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.training_step(model, batch)[0]

    def training_step(self, model: nn.Module, batch: Any, label_smoothing: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        x, y, valid = _unpack(batch)
        logits = model(x)
        if valid < y.shape[0]:  # a padded last batch (compiled model): the extra rows count for nothing
            mask = (torch.arange(y.shape[0], device=y.device) < valid).float()
            per_sample = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
            loss = (per_sample * mask).sum() / valid
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        correct = (logits.detach()[:valid].argmax(dim=-1) == y[:valid]).sum()
        return loss, correct

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], **kwargs: Any) -> dict[str, float]:
        correct, seen = None, 0
        for batch in batches:
            x, y, valid = _unpack(batch)
            hits = (model(x)[:valid].argmax(dim=-1) == y[:valid]).sum()
            correct = hits if correct is None else correct + hits  # stays on the device: one sync at the end
            seen += valid
        return {"top1": 100.0 * ((0 if correct is None else correct.item()) / max(1, seen))}

    def save(self, model: nn.Module, directory: str | Path, num_classes: int, options: TaskOptions) -> Path:
        """The adapter alone: the classifier head is one of its trainable modules."""
        return save_adapter(model, directory)
