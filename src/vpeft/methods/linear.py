"""Linear probing: only the classifier head trains; the backbone is a fixed feature extractor."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.methods.base import Method, MethodConfig, PrefixSplit, register


@dataclass
class LinearConfig(MethodConfig):
    pass


@register
class LinearProbe(Method):
    name = "linear"
    family = "partial/specification"
    paper = "baseline (frozen backbone, trained head)"
    requires = frozenset()
    mergeable = True  # nothing to fold
    config_class = LinearConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: LinearConfig) -> None:
        """Nothing to add: the head is made trainable by :func:`vpeft.apply` for every method."""

    def cached_prefix(self, model: nn.Module, anatomy: Anatomy, config: LinearConfig) -> PrefixSplit | None:
        """Everything but the head is frozen: the pre-logits features are the prefix's output."""
        if len(anatomy.heads) != 1:
            return None  # DeiT-distilled: two heads, a training-time tuple output
        head = model.get_submodule(anatomy.heads[0])

        def prefix(x):
            return model.forward_head(model.forward_features(x), pre_logits=True)

        return PrefixSplit(prefix, head, [m for m in model.children() if m is not head])
