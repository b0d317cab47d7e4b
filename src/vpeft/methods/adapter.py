"""Adapter: a sequential bottleneck with its own residual, after the MLP (and optionally attention).

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019 (two adapters per
block); Pfeiffer et al., "AdapterFusion", EACL 2021 (one adapter after the MLP, the placement
the V-PETL benchmark uses and vpeft's default). h <- h + s * up(act(down(h))) on the sub-block's
output h, before the block's residual. Up-projection at zero: identity at initialization.

For the published adapter rows (NOAH's code, reused by V-PETL Bench): ``act=quick_gelu``
(x * sigmoid(1.702 x)) and ``init=xavier`` (the adapter module's own init: Xavier-uniform on both
projections, biases N(0, 1e-6)) or ``init=trunc_normal`` (what NOAH's ViT actually trains from:
its ``init_weights`` re-initialises every Linear, the adapter's included, to trunc-normal std 0.02
with zero biases). Neither is the identity at initialization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import ACTIVATIONS as LAYER_ACTIVATIONS
from vpeft.modules import Bottleneck, first_param

INITS = ("zero_up", "xavier", "trunc_normal")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's GELU approximation, the activation of NOAH's adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = (*LAYER_ACTIVATIONS, "quick_gelu")


@dataclass
class AdapterConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width of each adapter")
    placement: str = option("pfeiffer", "'pfeiffer': after the MLP; 'houlsby': after attention and after the MLP")
    scale: float = option(1.0, "multiplier s on the adapter's output")
    act: str = option("gelu", "activation inside the bottleneck: " + ", ".join(ACTIVATIONS))
    dropout: float = option(0.0, "dropout inside the bottleneck")
    init: str = option(
        "zero_up",
        "'zero_up': down Kaiming-uniform, up and biases zero (identity at step 0); 'xavier': NOAH's adapter "
        "module (Xavier-uniform, biases N(0, 1e-6)); 'trunc_normal': what NOAH's code trains from (std 0.02, "
        "zero biases)",
    )

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adapter: bottleneck must be >= 1, got {self.bottleneck}")
        if self.placement not in ("pfeiffer", "houlsby"):
            raise ConfigError(f"adapter: placement must be 'pfeiffer' or 'houlsby', got '{self.placement}'")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"adapter: act must be one of {list(ACTIVATIONS)}, got '{self.act}'")
        if self.init not in INITS:
            raise ConfigError(f"adapter: init must be one of {list(INITS)}, got '{self.init}'")


@torch.no_grad()
def init_bottleneck(adapter: Bottleneck, init: str) -> None:
    """Re-initialise a bottleneck's projections for ``init`` other than 'zero_up' (its own init)."""
    for proj in (adapter.down, adapter.up):
        if init == "xavier":
            nn.init.xavier_uniform_(proj.weight)
            nn.init.normal_(proj.bias, std=1e-6)
        elif init == "trunc_normal":
            nn.init.trunc_normal_(proj.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(proj.bias)


class SequentialAdapter(BaseLayerWrapper):
    """Runs the wrapped sub-block, then adds a bottleneck of its output to it."""

    def __init__(self, base_layer: nn.Module, dim: int, config: AdapterConfig):
        super().__init__(base_layer)
        act = config.act if config.act in LAYER_ACTIVATIONS else "identity"
        self.adapter = Bottleneck(dim, config.bottleneck, act, config.dropout, like=first_param(base_layer))
        if config.act == "quick_gelu":
            self.adapter.act = QuickGELU()
        init_bottleneck(self.adapter, config.init)
        self.scale = config.scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        return h + self.scale * self.adapter(h)


@register
class Adapter(Method):
    name = "adapter"
    family = "addition/adapter"
    paper = "Houlsby et al., ICML 2019 (arXiv 1902.00751); Pfeiffer et al., EACL 2021 (arXiv 2005.00247)"
    requires = frozenset({"attention", "mlp"})
    config_class = AdapterConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: AdapterConfig) -> None:
        roles = ("attn", "mlp") if config.placement == "houlsby" else ("mlp",)
        for block in anatomy.blocks:
            for role in roles:
                name = getattr(block, role)
                replace_module(model, name, SequentialAdapter(model.get_submodule(name), block.dim, config))
