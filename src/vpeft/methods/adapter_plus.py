"""Adapter+: a bottleneck after the whole block, with a channel-wise scale and drop-path on the adapter.

Steitz and Roth, "Adapters Strike Back", CVPR 2024 (visinf/adapter_plus, ``config: post``,
``scaling: channel``, ``norm_layer: false``). On the block's output h:
h <- h + drop_path(s * up(act(down(h)))), s a learnable per-channel scale (init 1), no LayerNorm
inside the adapter. Init ``houlsby`` (the paper's and the code's): both projections trunc-normal with
std 0.01 (cut at two std), biases zero: close to, but not exactly, the identity. ``init=lora`` (the
code's alternative) keeps the down-projection's Linear init and zeroes the up-projection: the
identity at step 0.

Speed: the scale and the up-projection's bias fold into a small weight, and the drop-path mask
multiplies the narrow hidden activations (a per-sample factor commutes with the up-projection), so
the adapter's add is the epilogue of one matmul (``addmm``): no full-width elementwise pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import activation, first_param

INITS = ("houlsby", "lora")
ACTS = ("gelu", "relu", "silu", "identity")


@dataclass
class AdapterPlusConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width of each adapter (the paper picks 1-32 per task; 8 is its base config)")
    drop_path: float = option(0.1, "drop-path rate on the adapter's output while training (the code's default)")
    dropout: float = option(0.0, "dropout inside the bottleneck")
    act: str = option("gelu", "activation inside the bottleneck", choices=ACTS)
    init: str = option(
        "houlsby",
        "'houlsby': both projections trunc-normal std 0.01, biases zero (the paper's); 'lora': down Linear init, "
        "up zero (identity at step 0)",
        choices=INITS,
    )

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adapter_plus: bottleneck must be >= 1, got {self.bottleneck}")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"adapter_plus: drop_path and dropout must be in [0, 1), got {self.drop_path}, {self.dropout}"
            )
        if self.act not in ACTS:
            raise ConfigError(f"adapter_plus: act must be one of {list(ACTS)}, got '{self.act}'")
        if self.init not in INITS:
            raise ConfigError(f"adapter_plus: init must be one of {list(INITS)}, got '{self.init}'")


class PostBlockAdapter(BaseLayerWrapper):
    """Runs the block, then adds drop_path(scale * up(act(down(h)))) of its output h."""

    def __init__(self, base_layer: nn.Module, dim: int, config: AdapterPlusConfig):
        super().__init__(base_layer)
        ref = first_param(base_layer)
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.down = nn.Linear(dim, config.bottleneck, **kw)
        self.up = nn.Linear(config.bottleneck, dim, **kw)
        self.scale = nn.Parameter(torch.ones(dim, **kw))
        self.act = activation(config.act)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.drop_path = config.drop_path
        with torch.no_grad():
            if config.init == "houlsby":
                for proj in (self.down, self.up):
                    nn.init.trunc_normal_(proj.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(proj.bias)
            else:  # lora: the down-projection keeps nn.Linear's own init
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        z = F.pad(self.dropout(self.act(self.down(h))), (0, 1), value=1.0)  # a ones column carries the bias
        if self.training and self.drop_path > 0:  # per-sample mask on the narrow activations
            keep = 1.0 - self.drop_path
            mask = z.new_empty((z.shape[0],) + (1,) * (z.ndim - 1)).bernoulli_(keep).div_(keep)
            z = z * mask
        weight = torch.cat([self.up.weight, self.up.bias[:, None]], dim=1) * self.scale[:, None]
        flat = torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]), weight.t())
        return flat.view(h.shape)

    def reference(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter on a block output ``h`` as the paper writes it (evaluation mode), for tests."""
        return h + self.scale * self.up(self.dropout(self.act(self.down(h))))


@register
class AdapterPlus(Method):
    name = "adapter_plus"
    family = "addition/adapter"
    paper = "Steitz and Roth, Adapters Strike Back, CVPR 2024 (arXiv 2406.06820)"
    requires = frozenset({"attention", "mlp"})
    config_class = AdapterPlusConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: AdapterPlusConfig) -> None:
        for block in anatomy.blocks:
            replace_module(model, block.name, PostBlockAdapter(model.get_submodule(block.name), block.dim, config))
