"""Mona: multi-cognitive visual adapters after the attention and the MLP sub-blocks.

Yin et al., "5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition
Tasks" (Mona), CVPR 2025. After each sub-block the residual stream y passes
y <- y + up(dropout(gelu(MonaOp(down(LN'(y)))))), where LN'(y) = gamma * LN(y) + gamma_x * y
(gamma = 1e-6, gamma_x = 1 at init), down is d -> 64, and MonaOp averages depth-wise 3x3, 5x5 and
7x7 convolutions over the patch-token grid (plus a skip), then adds a 1x1 projection. Class and
register tokens skip the convolutions. Init as the official code leaves it (Leiyi-Hu/mona): its
backbone's ``init_weights`` sets every Linear, Mona's two projections included, to trunc-normal
(std 0.02, timm's cut at +-2) with zero bias before loading the checkpoint, which holds no Mona
weights; the convolutions keep PyTorch's default init. So the model is not unchanged at step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import InputTap, Stash, first_param


@dataclass
class MonaConfig(MethodConfig):
    hidden: int = option(64, "width of the adapter (the paper's 64)")
    dropout: float = option(0.1, "dropout before the up-projection")

    def validate(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"mona: hidden must be >= 1, got {self.hidden}")


class MonaBranch(nn.Module):
    """delta(y) of one Mona layer: the adapter's output before it is added to y."""

    def __init__(self, dim: int, config: MonaConfig, prefix: int, grid: tuple[int, int], like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        r = config.hidden
        self.prefix, self.grid = prefix, grid
        self.norm = nn.LayerNorm(dim, **kw)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6, **kw))
        self.gamma_x = nn.Parameter(torch.ones(dim, **kw))
        self.down = nn.Linear(dim, r, **kw)
        self.dw = nn.ModuleList([nn.Conv2d(r, r, k, padding=k // 2, groups=r, **kw) for k in (3, 5, 7)])
        self.projector = nn.Conv2d(r, r, 1, **kw)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.Linear(r, dim, **kw)
        for proj in (self.down, self.up):
            nn.init.trunc_normal_(proj.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(proj.bias)

    def _mona_op(self, z: torch.Tensor) -> torch.Tensor:
        b, n, r = z.shape
        p = self.prefix
        gh, gw = self.grid if (n - p) == self.grid[0] * self.grid[1] else (math.isqrt(n - p),) * 2
        grid = z[:, p:].transpose(1, 2).reshape(b, r, gh, gw)
        grid = grid + sum(conv(grid) for conv in self.dw) / len(self.dw)
        grid = grid + self.projector(grid)
        return torch.cat([z[:, :p], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(y) * self.gamma + y * self.gamma_x
        return self.up(self.dropout(F.gelu(self._mona_op(self.down(h)))))


class MonaAfter(BaseLayerWrapper):
    """A sub-block f whose residual output is followed by Mona: f(n(x)) + delta(x + f(n(x)))."""

    def __init__(self, base_layer: nn.Module, branch: MonaBranch, stash: Stash):
        super().__init__(base_layer)
        self.branch, self.stash = branch, stash

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(h, *args, **kwargs)
        x = self.stash.take(out.shape, "mona")
        return out + self.branch(x + out)


@register
class Mona(Method):
    name = "mona"
    family = "addition/adapter"
    paper = "Yin et al., Mona (5%>100%), CVPR 2025 (arXiv 2408.08345)"
    backbones = ("vit",)
    config_class = MonaConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: MonaConfig) -> None:
        grid = tuple(model.patch_embed.grid_size)
        for block in anatomy.blocks:
            for norm, role in ((block.norm1, block.attn), (block.norm2, block.mlp)):
                stash = Stash()
                replace_module(model, norm, InputTap(model.get_submodule(norm), stash))
                base = model.get_submodule(role)
                branch = MonaBranch(block.dim, config, anatomy.num_prefix_tokens, grid, first_param(base))
                replace_module(model, role, MonaAfter(base, branch, stash))
