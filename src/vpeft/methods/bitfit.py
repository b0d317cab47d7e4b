"""BitFit: train only the bias terms of the backbone.

Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", ACL 2022. Every bias of the blocks, the patch embedding and the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.errors import UnsupportedBackboneError
from vpeft.methods.base import Method, MethodConfig, register


@dataclass
class BitFitConfig(MethodConfig):
    pass


@register
class BitFit(Method):
    name = "bitfit"
    family = "partial/specification"
    paper = "Ben Zaken et al., BitFit, ACL 2022 (arXiv 2106.10199)"
    requires = frozenset()
    mergeable = True  # the trained biases are the backbone's own parameters
    config_class = BitFitConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: BitFitConfig) -> None:
        count = 0
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias" and not anatomy.is_head_param(name):
                param.requires_grad_(True)
                count += 1
        if count == 0:
            raise UnsupportedBackboneError(f"bitfit: {anatomy.architecture} has no bias parameters to tune")
