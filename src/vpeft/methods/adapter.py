"""Adapter: a sequential bottleneck with its own residual, after the MLP (and optionally attention).

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019 (two adapters per
block); Pfeiffer et al., "AdapterFusion", EACL 2021 (one adapter after the MLP, the placement
the V-PETL benchmark uses and vpeft's default). h <- h + s * up(act(down(h))) on the sub-block's
output h, before the block's residual. Up-projection at zero: identity at initialization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import _ACTIVATIONS, Bottleneck, first_param


@dataclass
class AdapterConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width of each adapter")
    placement: str = option("pfeiffer", "'pfeiffer': after the MLP; 'houlsby': after attention and after the MLP")
    scale: float = option(1.0, "multiplier s on the adapter's output")
    act: str = option("gelu", "activation inside the bottleneck: " + ", ".join(_ACTIVATIONS))
    dropout: float = option(0.0, "dropout inside the bottleneck")

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adapter: bottleneck must be >= 1, got {self.bottleneck}")
        if self.placement not in ("pfeiffer", "houlsby"):
            raise ConfigError(f"adapter: placement must be 'pfeiffer' or 'houlsby', got '{self.placement}'")
        if self.act not in _ACTIVATIONS:
            raise ConfigError(f"adapter: act must be one of {list(_ACTIVATIONS)}, got '{self.act}'")


class SequentialAdapter(BaseLayerWrapper):
    """Runs the wrapped sub-block, then adds a bottleneck of its output to it."""

    def __init__(self, base_layer: nn.Module, dim: int, config: AdapterConfig):
        super().__init__(base_layer)
        self.adapter = Bottleneck(dim, config.bottleneck, config.act, config.dropout, like=first_param(base_layer))
        self.scale = config.scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        return h + self.scale * self.adapter(h)


@register
class Adapter(Method):
    name = "adapter"
    family = "addition/adapter"
    paper = "Houlsby et al., ICML 2019 (arXiv 1902.00751); Pfeiffer et al., EACL 2021 (arXiv 2005.00247)"
    backbones = ("vit", "swin")
    config_class = AdapterConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: AdapterConfig) -> None:
        roles = ("attn", "mlp") if config.placement == "houlsby" else ("mlp",)
        for block in anatomy.blocks:
            for role in roles:
                name = getattr(block, role)
                replace_module(model, name, SequentialAdapter(model.get_submodule(name), block.dim, config))
