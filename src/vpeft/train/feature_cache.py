"""Frozen-prefix feature caching: when every layer below the first trainable one is frozen and the
input transform is deterministic, compute those layers' output once per image and train from it.

Switched on only where it is exact: the frozen prefix must hold no active randomness in training
mode (dropout, drop-path), and the run must be single-process. Covers linear probing on every
backbone family (prefix = everything but the head) and Partial-k on ViTs (prefix = the embedding and
the frozen blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import vpeft
from vpeft.anatomy import Anatomy


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
    def features(self, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> TensorDataset:
        was_training = model.training
        model.eval()
        xs, ys = [], []
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for x, y in loader:
            xs.append(self.prefix(x.to(device)).cpu())
            ys.append(torch.as_tensor(y))
        model.train(was_training)
        return TensorDataset(torch.cat(xs), torch.cat(ys))


def plan_cached_prefix(model: nn.Module) -> CachedPrefix | None:
    """A prefix/suffix split of a vpeft model when caching is exact for it; None otherwise."""
    state = vpeft.get_state(model)
    if state is None or state.merged:
        return None
    anatomy: Anatomy = state.anatomy
    if len(anatomy.heads) != 1:
        return None  # DeiT-distilled: two heads, a training-time tuple output
    head = model.get_submodule(anatomy.heads[0])
    if state.method == "linear":
        body = [m for n, m in model.named_children() if m is not head]
        if any(_stochastic(m) for m in body):
            return None

        def prefix(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(x), pre_logits=True)

        return CachedPrefix(prefix, head)
    if state.method == "partial_k" and anatomy.family == "vit" and hasattr(model, "_pos_embed"):
        k = state.config.k
        frozen = model.blocks[: len(model.blocks) - k]
        if any(_stochastic(m) for m in (model.patch_embed, model.patch_drop, model.norm_pre, frozen)):
            return None
        if getattr(model, "pos_drop", None) is not None and _stochastic(model.pos_drop):
            return None

        def vit_prefix(x: torch.Tensor) -> torch.Tensor:
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            return frozen(x)

        def vit_suffix(h: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(model.blocks[len(model.blocks) - k :](h)))

        return CachedPrefix(vit_prefix, vit_suffix)
    return None
