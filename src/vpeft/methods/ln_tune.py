"""LayerNorm tuning: train only the affine parameters of the backbone's LayerNorms.

Basu et al., "Strong Baselines for Parameter Efficient Few-Shot Fine-tuning", AAAI 2024
(LN-Tune in the V-PETL benchmark). Applies to backbones built with LayerNorm (ViT, Swin, ConvNeXt).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.errors import UnsupportedBackboneError
from vpeft.methods.base import Method, MethodConfig, backbone_modules, register


@dataclass
class LNTuneConfig(MethodConfig):
    pass


@register
class LNTune(Method):
    name = "ln_tune"
    family = "partial/specification"
    paper = "Basu et al., Strong Baselines for PEFT Few-Shot Fine-tuning, AAAI 2024 (arXiv 2304.01917)"
    requires = frozenset({"layernorm"})
    #: where a family is only partly covered
    mergeable = True  # the trained parameters are the backbone's own
    config_class = LNTuneConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: LNTuneConfig) -> None:
        norms = [m for _, m in backbone_modules(model, anatomy) if isinstance(m, nn.LayerNorm) and m.elementwise_affine]
        if not norms:
            raise UnsupportedBackboneError(
                f"ln_tune: {anatomy.architecture} has no LayerNorm with affine parameters "
                "(BatchNorm CNNs such as ResNet and EfficientNet); use bitfit or ssf instead"
            )
        for norm in norms:
            for param in norm.parameters(recurse=False):
                param.requires_grad_(True)
