"""FacT: factor-tuning. All weight increments of a ViT form one tensor, factorised with shared factors.

Jie and Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023.
Every d x d block of every adapted matrix (q, k, v, proj, and the d x d blocks of fc1 and fc2,
12 per block of a ViT with MLP ratio 4) gets the increment s * V S U^T, where U and V (d x r) are
shared by all layers and the r x r core S is per block:
- ``fact_tt`` (tensor-train): S is a free r x r matrix per d x d block;
- ``fact_tk`` (Tucker): one r x r x r core C and one row P_j of P per d x d block (slot j).
  ``layout=paper`` uses the paper's S_j = C x3 P_j for all 12 slots of a transformer block.
  ``layout=official`` (the default, which produced the published FacT-TK numbers) reproduces the
  official code (JieShibo/PETL-ViT, FacT/fact_tk.py): q, k, v and proj as in the paper, but the
  MLP's slots are read through a reshape, so each d x d block of fc1 mixes the slots 1-4 of its
  MLP, and fc2 contracts U^T h with the core's second axis (see :func:`_official_mlp_core`).
V starts at zero (identity at initialization). Init as in the official code: U like the weight of
a Linear(d, r) (uniform, bound 1/sqrt(d)), a TT core like a Linear(r * in_blocks, r); Xavier-uniform
on the Tucker core C (r, r, r) and on P. Each increment is linear, so merging adds it to W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import DeltaWeightWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import matmul_dtype

ROOT = "vpeft_fact"


@dataclass
class FacTTTConfig(MethodConfig):
    rank: int = option(16, "rank r of the shared factors U, V (the paper searches 8-32 per task)")
    scale: float = option(1.0, "scale s of the increments (the paper searches it per task)")
    dropout: float = option(0.1, "dropout after the core")

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"{self.method}: rank must be >= 1, got {self.rank}")


LAYOUTS = ("official", "paper")


@dataclass
class FacTTKConfig(FacTTTConfig):
    rank: int = option(32, "rank r of U, V and of the r x r x r core (the paper searches 8-32 per task)")
    layout: str = option(
        "official",
        "how the MLP's d x d blocks read the Tucker core: 'official' as the authors' code (and their "
        "published numbers) does, 'paper' the paper's S_j = C x3 P_j for every block",
    )

    def validate(self) -> None:
        super().validate()
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{self.method}: layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")


class SharedFactors(nn.Module):
    """U, V shared by every adapted layer; for Tucker also the core C and the per-block rows P.

    ``u`` and ``v`` are (d, r): the official FacTu.weight is u^T, FacTv.weight is v. ``core`` is
    (r_U, r_V, r) and ``p`` is (blocks, r): the official FacTc and FacTp^T.
    """

    def __init__(self, dim: int, rank: int, num_blocks: int, tucker: bool, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.u = nn.Parameter(torch.empty(dim, rank, **kw))
        nn.init.uniform_(self.u, -1 / math.sqrt(dim), 1 / math.sqrt(dim))  # the default init of a Linear(d, r)
        self.v = nn.Parameter(torch.zeros(dim, rank, **kw))
        if tucker:
            self.core = nn.Parameter(torch.empty(rank, rank, rank, **kw))
            nn.init.xavier_uniform_(self.core)  # bound sqrt(6 / (2 r^2)) = sqrt(3) / r
            self.p = nn.Parameter(torch.empty(num_blocks, rank, **kw))
            nn.init.xavier_uniform_(self.p)  # bound sqrt(6 / (r + blocks)), as on the official (r, blocks)


def _official_mlp_core(t: torch.Tensor, role: str) -> torch.Tensor:
    """The official code's fc1/fc2 cores, as (out_blocks, in_blocks, r_V, r_U) blocks.

    ``t`` is (r_U, r_V, m): the core contracted with the m rows of P of fc1 (or of fc2). The code
    reshapes t to an (r, m r) matrix M (column b m + j holds t[:, b, j]). fc1 multiplies U^T x by M
    and reads the result as m blocks of r: block o, channel c is column o r + c. fc2 concatenates
    the m blocks of U^T h and multiplies by M^T: output channel a takes row a of M, so fc2's output
    runs along the core's first axis and its input along the second axis and the slots.
    """
    r, _, m = t.shape
    mat = t.reshape(r, m, r)  # mat[a, o, c] = M[a, o r + c]
    if role == "fc1":
        return mat.permute(1, 2, 0).unsqueeze(1)  # S[o, 0, c, a]
    return mat.permute(1, 0, 2).unsqueeze(0)  # S[0, i, a, a']


class FacTLinear(DeltaWeightWrapper):
    """A Linear layer of in_blocks x out_blocks d x d blocks, each with the increment s * V S U^T."""

    def __init__(
        self, base_layer: nn.Linear, factors: SharedFactors, first_block: int, config: FacTTTConfig, role: str = "attn"
    ):
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
        # only the official Tucker layout treats the MLP's layers apart; the role is fc1, fc2 or attn
        self.role = role if self.tucker and getattr(config, "layout", "paper") == "official" else "attn"
        if not self.tucker:
            core = torch.empty(self.out_blocks, self.in_blocks, r, r, device=factors.u.device, dtype=factors.u.dtype)
            nn.init.uniform_(core, -1 / math.sqrt(r * self.in_blocks), 1 / math.sqrt(r * self.in_blocks))
            self.core = nn.Parameter(core)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # I over the output blocks, shaped to place V^T on the diagonal of the up weight (a constant, not saved)
        eye = torch.eye(self.out_blocks, device=factors.u.device, dtype=factors.u.dtype)
        self.register_buffer("block_eye", eye[:, None, :, None], persistent=False)

    @property
    def num_blocks(self) -> int:
        return self.in_blocks * self.out_blocks

    def cores(self) -> torch.Tensor:
        """S for every d x d block: (out_blocks, in_blocks, r_V, r_U), mapping U^T x to the V side."""
        if not self.tucker:
            return self.core
        f = self.factors
        rows = f.p[self.first_block : self.first_block + self.num_blocks]  # (blocks, r)
        t = torch.einsum("abk,nk->abn", f.core, rows)  # (r_U, r_V, blocks): the official FacTc @ FacTp
        if self.role in ("fc1", "fc2"):
            return _official_mlp_core(t, self.role)
        r = t.shape[0]
        return t.permute(2, 1, 0).reshape(self.out_blocks, self.in_blocks, r, r)

    def low_rank_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up): z = x down is U^T of each input block times its cores, (i d, o r); the increment is
        s drop(z) up, up the block-diagonal V^T of every output block, (o r, o d). Small, built per step."""
        f = self.factors
        cores = self.cores()  # (o, i, r_V, r_U)
        o, i, r = self.out_blocks, self.in_blocks, cores.shape[-1]
        mix = cores.permute(1, 3, 0, 2).reshape(i, r, o * r)  # [i, r_U, (o, r_V)]
        down = (f.u @ mix[0]) if i == 1 else torch.matmul(f.u, mix).reshape(i * f.u.shape[0], o * r)
        up = (self.block_eye * f.v.t()[None, :, None, :]).reshape(o * r, -1)  # V^T on the diagonal
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(matmul_dtype(x))  # one cast shared by the base layer and the low-rank path
        out = self.base_layer(x)
        with torch.autocast(x.device.type, enabled=False):  # the small weights in their own dtype
            down, up = self.low_rank_weights()
        z = torch.mm(x.reshape(-1, x.shape[-1]), down.to(x.dtype))
        z = self.dropout(z.view(*x.shape[:-1], self.out_blocks, -1)).view(z.shape)  # per block, as (..., o, r)
        # the increment's scale and add are the up-projection's matmul epilogue: no activation-sized pass
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), z, up.to(x.dtype), alpha=self.scale)
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        blocks = torch.einsum("ds,oisr,er->oide", f.v, self.cores(), f.u)  # (o, i, d_out, d_in)
        o, i, d, e = blocks.shape
        return self.scale * blocks.permute(0, 2, 1, 3).reshape(o * d, i * e)


class _FacT(Method):
    family = "partial/reparameterization"
    paper = "Jie and Deng, FacT, AAAI 2023 (arXiv 2212.03145)"
    requires = frozenset({"isotropic", "qkv_fused", "attn_proj", "mlp"})
    mergeable = True
    tucker = False

    def inject(self, model: nn.Module, anatomy: Anatomy, config: FacTTTConfig) -> None:
        layers, roles = [], []
        for block in anatomy.blocks:
            if block.qkv is None:
                raise UnsupportedBackboneError(f"{self.name}: needs the fused qkv projection of timm's ViT blocks")
            layers += [block.qkv, block.proj, block.fc1, block.fc2]
            roles += ["attn", "attn", "fc1", "fc2"]
        dim = anatomy.embed_dim
        modules = [model.get_submodule(n) for n in layers]
        num_blocks = sum((m.in_features // dim) * (m.out_features // dim) for m in modules)
        factors = SharedFactors(dim, config.rank, num_blocks, self.tucker, like=modules[0].weight)
        model.add_module(ROOT, factors)
        first = 0
        for name, layer, role in zip(layers, modules, roles, strict=True):
            wrapper = FacTLinear(layer, factors, first, config, role)
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
