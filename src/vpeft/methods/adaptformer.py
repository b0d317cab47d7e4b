"""AdaptFormer: a scaled bottleneck in parallel with each block's MLP.

Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition",
NeurIPS 2022. The branch reads the MLP sub-block's input before its norm, x, and adds
s * up(relu(down(x))) to the MLP's output. Up-projection at zero: identity at initialization.
The branch joins the MLP's output inside the sub-block, so drop-path and LayerScale (both
Identity at evaluation and in standard ViTs) act on the sum rather than on the MLP alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import ACTIVATIONS, Bottleneck, InputTap, Stash, first_param


@dataclass
class AdaptFormerConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width of the parallel branch (8 in the V-PETL VTAB-1k setting)")
    scale: float = option(0.1, "scale s of the branch's output (the paper's 0.1)")
    act: str = option("relu", "activation inside the bottleneck: " + ", ".join(ACTIVATIONS))
    dropout: float = option(0.0, "dropout inside the bottleneck")

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adaptformer: bottleneck must be >= 1, got {self.bottleneck}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"adaptformer: act must be one of {list(ACTIVATIONS)}, got '{self.act}'")


class ParallelAdapter(BaseLayerWrapper):
    """Wraps the MLP: mlp(norm(x)) + s * bottleneck(x)."""

    def __init__(self, base_layer: nn.Module, dim: int, config: AdaptFormerConfig, stash: Stash):
        super().__init__(base_layer)
        self.adapter = Bottleneck(dim, config.bottleneck, config.act, config.dropout, like=first_param(base_layer))
        self.scale = config.scale
        self.stash = stash

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.stash.take(h.shape, "adaptformer")
        return self.adapter.add_to(self.base_layer(h), x, self.scale)  # add and scale fused into a matmul


@register
class AdaptFormer(Method):
    name = "adaptformer"
    family = "addition/adapter"
    paper = "Chen et al., AdaptFormer, NeurIPS 2022 (arXiv 2205.13535)"
    requires = frozenset({"attention", "mlp"})
    config_class = AdaptFormerConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: AdaptFormerConfig) -> None:
        for block in anatomy.blocks:
            stash = Stash()
            replace_module(model, block.norm2, InputTap(model.get_submodule(block.norm2), stash))
            mlp = model.get_submodule(block.mlp)
            replace_module(model, block.mlp, ParallelAdapter(mlp, block.dim, config, stash))
