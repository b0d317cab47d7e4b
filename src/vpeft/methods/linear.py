"""Linear probing: only the classifier head trains; the backbone is a fixed feature extractor."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.methods.base import Method, MethodConfig, register


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
