"""Full fine-tuning: every parameter trains. The reference point of every benchmark."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.methods.base import Method, MethodConfig, register


@dataclass
class FullConfig(MethodConfig):
    pass


@register
class FullFineTuning(Method):
    name = "full"
    family = "baseline"
    paper = "baseline (all parameters trained)"
    requires = frozenset()
    mergeable = True  # nothing to fold: the weights are the backbone's own
    trains_everything = True
    shareable = False
    not_shareable_reason = (
        "full fine-tuning trains every backbone weight, so an adapter would share nothing; use separate models"
    )
    config_class = FullConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: FullConfig) -> None:
        for param in model.parameters():
            param.requires_grad_(True)
