"""Convpass: convolutional bypasses in parallel with attention and MLP, on the patch-token grid.

Jie and Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", 2022.
Beside each sub-block f with input h = norm(x): f(h) + s * up(act(conv3x3(act(down(h))))), the
3x3 convolution running over the patch tokens laid out as their image grid; class, distillation
and register tokens each go through it as a 1x1 image. QuickGELU, dropout 0.1 before up;
down Xavier, conv initialised to the identity kernel, up at zero: identity at initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import add_linear, first_param, matmul_dtype


@dataclass
class ConvpassConfig(MethodConfig):
    hidden: int = option(8, "channels of the bypass")
    scale: float = option(0.01, "scale s of the bypass output")
    dropout: float = option(0.1, "dropout before the up-projection")
    conv_init: str = option("identity", "init of the 3x3 conv: identity (centre tap = I) or xavier")

    def validate(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"convpass: hidden must be >= 1, got {self.hidden}")
        if self.conv_init not in ("identity", "xavier"):
            raise ConfigError(f"convpass: conv_init must be identity or xavier, got '{self.conv_init}'")


_K = 1.702  # quick_gelu(x) = x * sigmoid(K x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(_K * x)


class ConvBypass(nn.Module):
    def __init__(self, dim: int, config: ConvpassConfig, prefix: int, grid: tuple[int, int], like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        r = config.hidden
        self.prefix, self.grid = prefix, grid
        self.down = nn.Linear(dim, r, **kw)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.conv = nn.Conv2d(r, r, 3, padding=1, **kw)
        if config.conv_init == "identity":
            nn.init.zeros_(self.conv.weight)
            with torch.no_grad():
                self.conv.weight[:, :, 1, 1] = torch.eye(r, **kw)
        else:
            nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.Linear(r, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.hidden_scaled(h), self.up.weight) / _K + self.up.bias

    def add_to(self, out: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        """out + scale * self(h) in one matmul, its add fused (``addmm``): the full-width output sees no
        elementwise pass. The up-projection's bias rides on a constant column appended to the narrow hidden
        activations; the scale and 1/K are the matmul's alpha."""
        return add_linear(out, self.hidden_scaled(h), self.up.weight, self.up.bias, scale / _K, bias_column=_K)

    def hidden_scaled(self, h: torch.Tensor) -> torch.Tensor:
        """K times the bypass before its up-projection (after the dropout).

        quick_gelu(x) = silu(K x) / K, and each factor K folds into a neighbouring linear map's (small)
        weights: the down-projection's, the conv's bias; the caller's up-projection divides by K. Each
        activation is one silu kernel instead of three elementwise ops."""
        b, n, _ = h.shape
        z = nn.functional.silu(nn.functional.linear(h, self.down.weight * _K, self.down.bias * _K))  # K qgelu(down h)
        r, p = z.shape[-1], self.prefix
        gh, gw = self.grid if (n - p) == self.grid[0] * self.grid[1] else (math.isqrt(n - p),) * 2
        conv, dtype = self.conv, z.dtype
        weight, bias = conv.weight.to(dtype), (conv.bias * _K).to(dtype)  # cast once for both uses
        patches = z[:, p:].transpose(1, 2).reshape(b, r, gh, gw)
        patches = nn.functional.conv2d(patches, weight, bias, conv.stride, conv.padding)
        parts = [patches.flatten(2).transpose(1, 2)]
        if p:  # a prefix token as a 1x1 image sees only the kernel's centre tap
            prefix = torch.addmm(bias, z[:, :p].reshape(b * p, r), weight[:, :, 1, 1].t())
            parts.insert(0, prefix.view(b, p, r))
        return self.dropout(nn.functional.silu(torch.cat(parts, dim=1)))  # K quick_gelu(conv(...))


class ParallelBypass(BaseLayerWrapper):
    """f(h) + s * bypass(h) for a sub-block f (attention or MLP) with input h."""

    def __init__(self, base_layer: nn.Module, bypass: ConvBypass, scale: float):
        super().__init__(base_layer)
        self.bypass, self.scale = bypass, scale

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = h.to(matmul_dtype(h))  # one cast shared by the sub-block's first matmul and the bypass's
        return self.bypass.add_to(self.base_layer(h, *args, **kwargs), h, self.scale)


@register
class Convpass(Method):
    name = "convpass"
    family = "addition/adapter"
    paper = "Jie and Deng, Convpass, 2022 (arXiv 2207.07039)"
    requires = frozenset({"tokens", "token_grid_2d", "attention", "mlp"})
    config_class = ConvpassConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: ConvpassConfig) -> None:
        grid = tuple(model.patch_embed.grid_size)
        for block in anatomy.blocks:
            for role in ("attn", "mlp"):
                name = getattr(block, role)
                base = model.get_submodule(name)
                bypass = ConvBypass(block.dim, config, anatomy.num_prefix_tokens, grid, first_param(base))
                replace_module(model, name, ParallelBypass(base, bypass, config.scale))
