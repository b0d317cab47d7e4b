"""Frozen-prefix feature caching: when every layer below the first trainable one is frozen and the
input transform is deterministic, compute those layers' output once per image and train from it.

Switched on only where it is exact: the frozen prefix must hold no active randomness in training
mode (dropout, drop-path), and the run must be single-process. The method says where its model splits
(:meth:`vpeft.methods.Method.cached_prefix`: linear probing, Partial-k and LST today). A cache larger
than ``limit_bytes`` is not built.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from vpeft.api import get_state
from vpeft.methods.base import get_method


def _stochastic(module: nn.Module) -> bool:
    """Whether a module holds randomness that is active in training mode (dropout, drop-path)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0.0) > 0:
            return True
    return False


class CachedPrefix:
    """How to split a model into a frozen, deterministic prefix and a trainable suffix."""

    def __init__(self, prefix: Callable[[torch.Tensor], torch.Tensor], suffix: Callable[[torch.Tensor], torch.Tensor]):
        self.prefix, self.suffix = prefix, suffix

    @torch.no_grad()
    def features(
        self,
        model: nn.Module,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        limit_bytes: float = float("inf"),
    ) -> TensorDataset | None:
        """The prefix's output for every sample, or None when it would exceed ``limit_bytes``."""
        was_training = model.training
        model.eval()
        try:
            features, labels = None, []
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
            start = 0
            for x, y in loader:
                out = self.prefix(x.to(device))
                if features is None:
                    shape = (len(dataset), *out.shape[1:])
                    if math.prod(shape) * out.element_size() > limit_bytes:
                        return None
                    features = torch.empty(shape, dtype=out.dtype)
                features[start : start + len(out)] = out.cpu()
                start += len(out)
                labels.append(torch.as_tensor(y))
        finally:
            model.train(was_training)
        return None if features is None else TensorDataset(features, torch.cat(labels))


def plan_cached_prefix(model: nn.Module) -> CachedPrefix | None:
    """A prefix/suffix split of a vpeft model when caching is exact for it (the method says where it splits,
    :meth:`vpeft.methods.Method.cached_prefix`); None otherwise."""
    state = get_state(model)
    if state is None or state.merged:
        return None
    split = get_method(state.method).cached_prefix(model, state.anatomy, state.config)
    if split is None or any(_stochastic(m) for m in split.prefix_modules):
        return None
    return CachedPrefix(split.prefix, split.suffix)
