"""A per-method memory figure on machines without a CUDA allocator to ask.

On CPU the process's peak RSS says nothing per method (the interpreter, torch and the decoded
images dominate it). The estimate counts what a training step must hold, as a GPU would: every
parameter, the tensors autograd saves for the backward pass (each storage once), the gradients of
the trainable parameters and AdamW's two moments. Measured on one real step of the run.
"""

from __future__ import annotations

import torch
from torch import nn

KIND = "estimate: parameters + autograd-saved tensors + grads + AdamW state (one step)"


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for the backward pass (each storage once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step_memory_mb(model: nn.Module, saved_bytes: int) -> float:
    """MB a step holds: all parameters, saved activations, and grad + 2 AdamW moments per trainable parameter."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return (params + saved_bytes + 3 * trainable) / 2**20
