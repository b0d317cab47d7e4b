"""Prefix tuning: learnable key and value prefixes in every attention layer.

Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021, as applied
to ViTs in the PETL literature. Every attention layer l attends over [P_k^l; K] and [P_v^l; V].
While training, the prefixes are re-parameterised as the paper's code (and peft's PrefixEncoder)
does (``reparameterization=shared``, the default): one embedding E of the prefix positions
(num_tokens x d, N(0, 1) like an nn.Embedding) and one two-layer tanh MLP whose output holds
every layer's keys and values, [P_k^1, P_v^1, ..., P_k^L, P_v^L] = MLP(E), d -> hidden -> 2 L d.
``reparameterization=per_layer`` is vpeft's earlier variant: a per-layer embedding E^l through one
shared MLP d -> hidden -> 2d. The trainable count includes the MLP. ``reparameterize=False``
trains the prefixes directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module

ROOT = "vpeft_prefix"


REPARAMETERIZATIONS = ("shared", "per_layer")


@dataclass
class PrefixConfig(MethodConfig):
    num_tokens: int = option(10, "prefix length: keys and values added per attention layer")
    reparameterize: bool = option(True, "compute the prefixes through an MLP while training (the paper's)")
    reparameterization: str = option(
        "shared",
        "with reparameterize: 'shared' (the official code's and peft's: one embedding of the prefix positions, "
        "one MLP producing every layer's keys and values) or 'per_layer' (a per-layer embedding through an "
        "MLP d -> hidden -> 2d)",
    )
    hidden: int = option(512, "hidden width of the re-parameterisation MLP")
    dropout: float = option(0.0, "dropout on the prefixes")

    def validate(self) -> None:
        if self.num_tokens < 1 or self.hidden < 1:
            raise ConfigError(f"prefix: num_tokens and hidden must be >= 1, got {self.num_tokens}, {self.hidden}")
        if self.reparameterization not in REPARAMETERIZATIONS:
            raise ConfigError(
                f"prefix: reparameterization must be one of {', '.join(REPARAMETERIZATIONS)}, "
                f"got '{self.reparameterization}'"
            )


class PrefixBank(nn.Module):
    """The prefixes of every layer: direct parameters or an embedding passed through an MLP."""

    def __init__(self, depth: int, dim: int, config: PrefixConfig, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.num_tokens, self.dim = config.num_tokens, dim
        self.mode = config.reparameterization if config.reparameterize else "direct"
        if self.mode == "shared":
            self.embedding = nn.Parameter(torch.randn(config.num_tokens, dim, **kw))  # nn.Embedding's N(0, 1)
            self.mlp = nn.Sequential(
                nn.Linear(dim, config.hidden, **kw), nn.Tanh(), nn.Linear(config.hidden, depth * 2 * dim, **kw)
            )
        elif self.mode == "per_layer":
            self.embedding = nn.Parameter(torch.randn(depth, config.num_tokens, dim, **kw) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(dim, config.hidden, **kw), nn.Tanh(), nn.Linear(config.hidden, 2 * dim, **kw)
            )
        else:
            self.prefix = nn.Parameter(torch.randn(depth, config.num_tokens, 2 * dim, **kw) * 0.02)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (num_tokens x d each) of attention layer ``index``."""
        if self.mode == "shared":
            # the MLP's output is (tokens, layer, key/value, d): only this layer's 2d columns are computed
            hidden, out = self.mlp[1](self.mlp[0](self.embedding)), self.mlp[2]
            cols = slice(2 * self.dim * index, 2 * self.dim * (index + 1))
            kv = F.linear(hidden, out.weight[cols], out.bias[cols])
        elif self.mode == "per_layer":
            kv = self.mlp(self.embedding[index])
        else:
            kv = self.prefix[index]
        kv = self.dropout(kv)
        return kv[:, : self.dim], kv[:, self.dim :]


class PrefixAttention(BaseLayerWrapper):
    """timm's Attention computed over prefix keys/values followed by the layer's own."""

    def __init__(self, base_layer: nn.Module, bank: PrefixBank, index: int):
        super().__init__(base_layer)
        object.__setattr__(self, "bank", bank)  # registered once, at the model's root
        self.index = index

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if attn_mask is not None or kwargs.get("is_causal"):
            raise UnsupportedBackboneError("prefix: attention masks are not supported")
        a = self.base_layer
        b, n, _ = x.shape
        q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        pk, pv = self.bank.layer(self.index)
        heads = lambda t: t.reshape(1, -1, a.num_heads, a.head_dim).transpose(1, 2).expand(b, -1, -1, -1)  # noqa: E731
        k, v = torch.cat([heads(pk), k], dim=2), torch.cat([heads(pv), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        out = a.norm(out.transpose(1, 2).reshape(b, n, -1))
        return a.proj_drop(a.proj(out))


@register
class Prefix(Method):
    name = "prefix"
    family = "addition/prefix"
    paper = "Li and Liang, Prefix-Tuning, ACL 2021 (arXiv 2101.00190)"
    requires = frozenset({"tokens", "qkv_fused", "attn_proj"})
    config_class = PrefixConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: PrefixConfig) -> None:
        from timm.layers import Attention

        attns = [model.get_submodule(b.attn) for b in anatomy.blocks]
        for attn in attns:
            if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
                raise UnsupportedBackboneError(f"prefix: supports timm's standard Attention, not {type(attn).__name__}")
        dim = attns[0].attn_dim
        bank = PrefixBank(anatomy.depth, dim, config, like=attns[0].qkv.weight)
        model.add_module(ROOT, bank)
        for i, (block, attn) in enumerate(zip(anatomy.blocks, attns, strict=True)):
            replace_module(model, block.attn, PrefixAttention(attn, bank, i))
