"""Frozen-prefix feature caching: when every layer below the first trainable one is frozen and the
input transform is deterministic, compute those layers' output once per image and train from it.

Switched on only where it is exact: the frozen prefix must hold no active randomness in training
mode (dropout, drop-path), and the run must be single-process. Covers linear probing on every
backbone family (prefix = everything but the head), Partial-k on ViTs (prefix = the embedding and
the frozen blocks) and LST on ViTs (the cache holds every frozen block's output; epochs run only the
side network, the final norm and the head). A cache larger than ``limit_bytes`` is not built.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import vpeft
from vpeft.backbones.anatomy import Anatomy


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
    if anatomy.family != "vit" or not hasattr(model, "_pos_embed"):
        return None
    embedding = [model.patch_embed, model.patch_drop, model.norm_pre, getattr(model, "pos_drop", nn.Identity())]

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    if state.method == "partial_k":
        split = len(model.blocks) - state.config.k
        frozen = model.blocks[:split]
        if any(_stochastic(m) for m in (*embedding, frozen)):
            return None

        def vit_prefix(x: torch.Tensor) -> torch.Tensor:
            return frozen(embed(x))

        def vit_suffix(h: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(model.blocks[split:](h)))

        return CachedPrefix(vit_prefix, vit_suffix)
    if state.method == "lst":
        from vpeft.methods.lst import ROOT

        backbone_blocks = [block.base_layer for block in model.blocks]
        if any(_stochastic(m) for m in (*embedding, *backbone_blocks)):
            return None
        side = model.get_submodule(ROOT)

        def all_block_outputs(x: torch.Tensor) -> torch.Tensor:
            x, outputs = embed(x), []
            for block in backbone_blocks:
                x = block(x)
                outputs.append(x)
            return torch.stack(outputs, dim=1)

        def side_suffix(features: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(side.ladder(features)))

        return CachedPrefix(all_block_outputs, side_suffix)
    return None
