"""Batches gathered on the training device, without a DataLoader.

When a split's inputs are held in memory (decoded uint8 images under a deterministic transform, or
cached frozen-prefix features), the whole split sits on the device (or in pinned host memory when it
does not fit): a batch is one index gather and one normalisation over the batch, with no per-sample
Python, no collation and no worker processes. The batches are exactly the DataLoader's (same seeded
permutation, same rank striding), and the normalisation is the dataset's own transform applied to
the batch, so both paths give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, TensorDataset

#: fraction of the free CUDA memory a split may take on the device; above it, pinned host memory
DEVICE_FRACTION = 0.25


class DeviceBatches:
    """A split as tensors: ``inputs[i]`` (uint8 images or features), ``labels[i]``, and a batch transform."""

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        device: torch.device,
    ):
        self.device = device
        self.transform = transform
        on_device = device.type == "cpu" or _fits(inputs, device)
        if on_device:
            self.inputs = inputs.to(device)
        else:
            self.inputs = inputs.pin_memory()
        self.labels = labels.to(device)
        self.on_device = on_device

    @classmethod
    def from_dataset(cls, dataset: Dataset, device: torch.device) -> DeviceBatches | None:
        """The split as device tensors, or None when its inputs are not held in memory (streamed, augmented)."""
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            inputs, labels = dataset.tensors
            return cls(inputs, labels.long(), None, device)
        as_tensors = getattr(dataset, "as_tensors", None)
        held = as_tensors() if as_tensors is not None else None
        if held is None:
            return None
        inputs, labels = held
        return cls(inputs, labels, getattr(dataset, "normalize", None), device)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batches(
        self, order: torch.Tensor, batch_size: int, pad: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, labels, valid) per batch of ``order``'s indices; ``pad`` repeats the first indices to fill
        the last batch (fixed shapes for a compiled model; the caller masks the ``batch_size - valid`` extra)."""
        order = order.to(self.inputs.device)
        for start in range(0, order.numel(), batch_size):
            index = order[start : start + batch_size]
            valid = index.numel()
            if pad and valid < batch_size:
                missing = batch_size - valid
                fill = order.repeat(-(-missing // order.numel()))[:missing]
                index = torch.cat([index, fill])
            x = self.inputs.index_select(0, index)
            if not self.on_device:
                x = x.to(self.device, non_blocking=True)
            if self.transform is not None:
                x = self.transform(x)
            yield x, self.labels.index_select(0, index.to(self.labels.device)), valid


def _fits(inputs: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return inputs.numel() * inputs.element_size() <= DEVICE_FRACTION * free
