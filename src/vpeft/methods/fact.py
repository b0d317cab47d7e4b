"""FacT: factor-tuning. All weight increments of a ViT form one tensor, factorised with shared factors.

Jie and Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023.
Every d x d block of every adapted matrix (q, k, v, proj, and the d x d blocks of fc1 and fc2,
12 per block of a ViT with MLP ratio 4) gets the increment s * V S U^T, where U and V (d x r) are
shared by all layers and the r x r core S is per block:
- ``fact_tt`` (tensor-train): S is a free r x r matrix per d x d block;
- ``fact_tk`` (Tucker): S = sum_k C[:, :, k] P[block, k], with one r x r x r core C and one row
  of P per d x d block.
V starts at zero (identity at initialization). Each increment is linear, so merging adds it to W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import DeltaWeightWrapper, Method, MethodConfig, register, replace_module

ROOT = "vpeft_fact"


@dataclass
class FacTTTConfig(MethodConfig):
    rank: int = option(16, "rank r of the shared factors U, V (the paper searches 8-32 per task)")
    scale: float = option(1.0, "scale s of the increments (the paper searches it per task)")
    dropout: float = option(0.1, "dropout after the core")

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"{self.method}: rank must be >= 1, got {self.rank}")


@dataclass
class FacTTKConfig(FacTTTConfig):
    rank: int = option(32, "rank r of U, V and of the r x r x r core (the paper searches 8-32 per task)")


class SharedFactors(nn.Module):
    """U, V shared by every adapted layer; for Tucker also the core C and the per-block rows P."""

    def __init__(self, dim: int, rank: int, num_blocks: int, tucker: bool, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.u = nn.Parameter(torch.empty(dim, rank, **kw))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # like the paper's code: a Linear(d, r) layer
        self.v = nn.Parameter(torch.zeros(dim, rank, **kw))
        if tucker:
            self.core = nn.Parameter(torch.empty(rank, rank, rank, **kw))
            nn.init.uniform_(self.core, -1 / math.sqrt(rank), 1 / math.sqrt(rank))
            self.p = nn.Parameter(torch.empty(num_blocks, rank, **kw))
            nn.init.uniform_(self.p, -1 / math.sqrt(rank), 1 / math.sqrt(rank))


class FacTLinear(DeltaWeightWrapper):
    """A Linear layer of in_blocks x out_blocks d x d blocks, each with the increment s * V S U^T."""

    def __init__(self, base_layer: nn.Linear, factors: SharedFactors, first_block: int, config: FacTTTConfig):
        super().__init__(base_layer)
        dim = factors.u.shape[0]
        if base_layer.in_features % dim or base_layer.out_features % dim:
            raise UnsupportedBackboneError(
                f"fact: a {base_layer.in_features}->{base_layer.out_features} layer is not made of {dim}x{dim} blocks"
            )
        self.in_blocks, self.out_blocks = base_layer.in_features // dim, base_layer.out_features // dim
        object.__setattr__(self, "factors", factors)  # shared: registered once, at the model's root
        self.first_block, self.scale = first_block, config.scale
        r = factors.u.shape[1]
        self.tucker = hasattr(factors, "core")
        if not self.tucker:
            core = torch.empty(self.out_blocks, self.in_blocks, r, r, device=factors.u.device, dtype=factors.u.dtype)
            nn.init.uniform_(core, -1 / math.sqrt(r * self.in_blocks), 1 / math.sqrt(r * self.in_blocks))
            self.core = nn.Parameter(core)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def num_blocks(self) -> int:
        return self.in_blocks * self.out_blocks

    def cores(self) -> torch.Tensor:
        """S for every d x d block: (out_blocks, in_blocks, r_V, r_U), mapping U^T x to the V side."""
        if not self.tucker:
            return self.core
        f = self.factors
        rows = f.p[self.first_block : self.first_block + self.num_blocks]  # (blocks, r)
        s = torch.einsum("abk,nk->nab", f.core, rows)
        return s.reshape(self.out_blocks, self.in_blocks, *s.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        u = x.unflatten(-1, (self.in_blocks, -1)) @ f.u  # (..., in_blocks, r)
        z = torch.einsum("...ir,oisr->...os", u, self.cores())  # (..., out_blocks, r)
        delta = self.dropout(z) @ f.v.T  # (..., out_blocks, d)
        return self.base_layer(x) + self.scale * delta.flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        blocks = torch.einsum("ds,oisr,er->oide", f.v, self.cores(), f.u)  # (o, i, d_out, d_in)
        o, i, d, e = blocks.shape
        return self.scale * blocks.permute(0, 2, 1, 3).reshape(o * d, i * e)


class _FacT(Method):
    family = "partial/reparameterization"
    paper = "Jie and Deng, FacT, AAAI 2023 (arXiv 2212.03145)"
    backbones = ("vit",)
    mergeable = True
    tucker = False

    def inject(self, model: nn.Module, anatomy: Anatomy, config: FacTTTConfig) -> None:
        layers = []
        for block in anatomy.blocks:
            if block.qkv is None:
                raise UnsupportedBackboneError(f"{self.name}: needs the fused qkv projection of timm's ViT blocks")
            layers += [block.qkv, block.proj, block.fc1, block.fc2]
        dim = anatomy.embed_dim
        modules = [model.get_submodule(n) for n in layers]
        num_blocks = sum((m.in_features // dim) * (m.out_features // dim) for m in modules)
        factors = SharedFactors(dim, config.rank, num_blocks, self.tucker, like=modules[0].weight)
        model.add_module(ROOT, factors)
        first = 0
        for name, layer in zip(layers, modules, strict=True):
            wrapper = FacTLinear(layer, factors, first, config)
            first += wrapper.num_blocks
            replace_module(model, name, wrapper)

    def after_merge(self, model: nn.Module) -> None:
        object.__setattr__(model, "_vpeft_fact_stash", model._modules.pop(ROOT))

    def before_unmerge(self, model: nn.Module) -> None:
        model.add_module(ROOT, model.__dict__.pop("_vpeft_fact_stash"))


@register
class FacTTT(_FacT):
    name = "fact_tt"
    config_class = FacTTTConfig


@register
class FacTTK(_FacT):
    name = "fact_tk"
    tucker = True
    config_class = FacTTKConfig
