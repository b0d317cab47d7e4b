"""DTL and DTL+: a low-rank side path, disentangled from the frozen blocks, joining the late blocks.

Fu et al., "DTL: Disentangled Transfer Learning for Visual Recognition", AAAI 2024 (heekhero/DTL,
``models/vision_transformer.py``). Every block i adds B_i A_i x_i (x_i its input, rank r = 2) to a
running sum R; after each block from ``join_from`` on (blocks 6-11 of 12), the block's output gets
swish_beta(R) = R * sigmoid(beta R), beta = 100. A is Kaiming-uniform, B zero: the identity at step 0.
DTL+ (``dtl_plus``) passes swish_beta(R) of the patch tokens through one depth-wise k x k
convolution on the patch grid (shared by all joins, no bias); class, distillation and register
tokens join without it.

The blocks up to and including the first join see no trainable input: they run under
``torch.no_grad`` and build no backward graph (the paper's memory saving); their inputs reach
the trainable A_i only through the narrow products x_i A_i^T.

Speed: beta folds into B, swish_beta(R) = silu(beta R) / beta, and R grows by ``addmm`` (one matmul
with the add as its epilogue); each join is one silu and one add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import first_param

ROOT = "vpeft_dtl"


@dataclass
class DTLConfig(MethodConfig):
    rank: int = option(2, "rank r of each block's B_i A_i")
    beta: float = option(100.0, "beta of swish_beta(R) = R * sigmoid(beta R)")
    join_from: int | None = option(
        None, "first block after which the side path joins (every later block joins too); default depth // 2 (6 of 12)"
    )

    def validate(self) -> None:
        if self.rank < 1 or self.beta <= 0:
            raise ConfigError(f"{self.method}: rank must be >= 1 and beta > 0, got {self.rank}, {self.beta}")
        if self.join_from is not None and self.join_from < 0:
            raise ConfigError(f"{self.method}: join_from must be >= 0, got {self.join_from}")


@dataclass
class DTLPlusConfig(DTLConfig):
    kernel: int = option(3, "kernel size of DTL+'s depth-wise convolution on the patch grid (odd)")

    def validate(self) -> None:
        super().validate()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"dtl_plus: kernel must be odd and >= 1, got {self.kernel}")


class _SidePath:
    """What the blocks of one forward pass hand each other: the low-rank terms before the join, then R."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lows: list[torch.Tensor] = []
        self.ups: list[torch.Tensor] = []
        self.total: torch.Tensor | None = None  # beta * R, flattened to (tokens, d)


class Fusion(nn.Module):
    """DTL+'s depth-wise convolution of the patch tokens on their grid; prefix tokens pass unchanged."""

    def __init__(self, dim: int, kernel: int, prefix: int, grid: tuple[int, int], like: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.conv.to(device=like.device, dtype=like.dtype)
        self.prefix, self.grid = prefix, grid

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        b, n, d = r.shape
        p = self.prefix
        gh, gw = self.grid if n - p == self.grid[0] * self.grid[1] else (math.isqrt(n - p),) * 2
        patches = r[:, p:].reshape(b, gh, gw, d).permute(0, 3, 1, 2)  # channels-last strides: no copy
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(b, gh * gw, d)
        return torch.cat([r[:, :p], patches], dim=1) if p else patches


class DTLBlock(BaseLayerWrapper):
    """A block plus its rank-r term of the side path; from the first join on, adds swish_beta(R)."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        index: int,
        join_from: int,
        last: int,
        dim: int,
        config: DTLConfig,
        path: _SidePath,
        fusion: Fusion | None,
    ):
        super().__init__(base_layer)
        ref = first_param(base_layer)
        a = torch.empty(config.rank, dim, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(dim, config.rank, device=ref.device, dtype=ref.dtype))
        self.index, self.join_from, self.last, self.beta = index, join_from, last, config.beta
        self.path = path
        object.__setattr__(self, "fusion", fusion)  # registered once, at the model's root

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        path = self.path
        if self.index == 0:
            path.reset()
        if self.index <= self.join_from:  # nothing trainable reaches these blocks: no backward graph
            x = x.detach()
            with torch.no_grad():
                out = self.base_layer(x, *args, **kwargs)
        else:
            out = self.base_layer(x, *args, **kwargs)
        low = F.linear(x, self.lora_A).reshape(-1, self.lora_A.shape[0])  # (tokens, r)
        up = self.lora_B * self.beta  # beta folds into the small weight
        if self.index < self.join_from:
            path.lows.append(low)
            path.ups.append(up)
            return out
        if self.index == self.join_from:  # every term so far in one matmul
            total = torch.mm(torch.cat([*path.lows, low], dim=1), torch.cat([*path.ups, up], dim=1).t())
            path.lows, path.ups = [], []
        else:
            total = torch.addmm(path.total, low, up.t())
        path.total = None if self.index == self.last else total
        act = F.silu(total).view(out.shape)  # beta * swish_beta(R)
        if self.fusion is not None:
            act = self.fusion(act)
        return torch.add(out, act, alpha=1.0 / self.beta)


class _DTL(Method):
    family = "addition/side"
    paper = "Fu et al., DTL: Disentangled Transfer Learning for Visual Recognition, AAAI 2024 (arXiv 2312.07856)"
    requires = frozenset({"tokens", "isotropic"})
    plus = False

    def inject(self, model: nn.Module, anatomy: Anatomy, config: DTLConfig) -> None:
        depth = anatomy.depth
        join_from = depth // 2 if config.join_from is None else config.join_from
        if join_from >= depth:
            raise ConfigError(f"{self.name}: join_from {join_from} is not a block of this {depth}-block model")
        fusion = None
        if self.plus:
            patch = model.patch_embed
            grid = tuple(getattr(patch, "grid_size", None) or (0, 0))
            fusion = Fusion(anatomy.embed_dim, config.kernel, anatomy.num_prefix_tokens, grid, like=first_param(patch))
            model.add_module(ROOT, fusion)
        path = _SidePath()
        for i, block in enumerate(anatomy.blocks):
            wrapper = DTLBlock(
                model.get_submodule(block.name),
                index=i,
                join_from=join_from,
                last=depth - 1,
                dim=anatomy.embed_dim,
                config=config,
                path=path,
                fusion=fusion,
            )
            replace_module(model, block.name, wrapper)


@register
class DTL(_DTL):
    name = "dtl"
    config_class = DTLConfig


@register
class DTLPlus(_DTL):
    name = "dtl_plus"
    plus = True
    config_class = DTLPlusConfig
