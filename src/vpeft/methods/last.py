"""LAST: low-rank attention side-tuning. Low-rank self-attention modules beside a frozen ViT, no backward through it.

Tang et al., "Low-rank Attention Side-Tuning for Parameter-Efficient Fine-Tuning", arXiv 2402.04009.
No code is public: this file implements the paper's description, and where the description leaves a
choice open the choice is ours and said so below.

The backbone is a frozen feature extractor: its blocks run under ``torch.no_grad`` and build no
autograd graph, so training needs no backward pass through them. With u_m the input of block m
(u_0 the embedded tokens, u_L the last block's output), the side network keeps the corrected
representation v_m = u_m - sum_{i<m} z_i (the paper's bias correction) and adds one low-rank
self-attention module (LSA) per block, z_m = LSA_m(v_m). LSA: LayerNorm, then q, k, v projected from
d to r << d (r = 16), softmax attention in that r-dimensional space, and an output projection r -> d.
The model's final norm and head read v_L = u_L - sum_i z_i.

Our choices where the paper's text is silent: one attention head in the r dimensions, a pre-norm
LayerNorm inside each LSA, biases on every projection, q/k/v trunc-normal(0.02), and the output
projection at zero, so the model starts as the backbone (the paper states no init). Whether the
corrections are added or subtracted is a reparameterisation (negate the output projections).

Speed: q, k and v come from one fused (d -> 3r) projection; each block costs the side path one
subtraction, one LayerNorm, a 197 x 197 single-head attention of width r and one addition.
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
from vpeft.modules import first_param

ROOT = "vpeft_last"


@dataclass
class LASTConfig(MethodConfig):
    rank: int = option(16, "width r of the low-rank attention (q, k, v: d -> r; output: r -> d)")
    heads: int = option(1, "attention heads inside the r dimensions (r must divide by it)")

    def validate(self) -> None:
        if self.rank < 1 or self.heads < 1 or self.rank % self.heads:
            raise ConfigError(
                f"last: rank must be >= 1 and divisible by heads, got rank {self.rank}, heads {self.heads}"
            )


class LowRankAttention(nn.Module):
    """z = out(attention(LN(v) W_q, LN(v) W_k, LN(v) W_v)), every projection d -> r, then r -> d."""

    def __init__(self, dim: int, rank: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * rank)
        self.out = nn.Linear(rank, dim)
        nn.init.trunc_normal_(self.qkv.weight, std=0.02)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        b, n, _ = v.shape
        h = self.heads
        q, k, val = self.qkv(self.norm(v)).view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, val).transpose(1, 2).reshape(b, n, -1))


class SideNetwork(nn.Module):
    def __init__(self, depth: int, dim: int, config: LASTConfig, like: torch.Tensor):
        super().__init__()
        self.blocks = nn.ModuleList([LowRankAttention(dim, config.rank, config.heads) for _ in range(depth)])
        self.to(device=like.device, dtype=like.dtype)
        self.total: torch.Tensor | None = None  # sum of the corrections so far, during one forward pass


class LASTBlock(BaseLayerWrapper):
    """Runs a frozen block without autograd; beside it, LSA_m on v_m = u_m - sum z. The last returns v_L."""

    def __init__(self, base_layer: nn.Module, side: SideNetwork, index: int, last: bool):
        super().__init__(base_layer)
        object.__setattr__(self, "side", side)  # registered once, at the model's root
        self.index, self.last = index, last

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        side = self.side
        u = x.detach()
        total = None if self.index == 0 else side.total
        z = side.blocks[self.index](u if total is None else u - total)
        total = z if total is None else total + z
        with torch.no_grad():
            out = self.base_layer(u, *args, **kwargs)
        if not self.last:
            side.total = total
            return out
        side.total = None
        return out - total


@register
class LAST(Method):
    name = "last"
    family = "addition/side"
    paper = "Tang et al., Low-rank Attention Side-Tuning for PEFT, arXiv 2402.04009 (no public code)"
    requires = frozenset({"tokens", "isotropic", "attention"})
    config_class = LASTConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: LASTConfig) -> None:
        ref = first_param(model.get_submodule(anatomy.blocks[0].name))
        side = SideNetwork(anatomy.depth, anatomy.embed_dim, config, like=ref)
        model.add_module(ROOT, side)
        last = anatomy.depth - 1
        for i, block in enumerate(anatomy.blocks):
            replace_module(model, block.name, LASTBlock(model.get_submodule(block.name), side, i, i == last))
