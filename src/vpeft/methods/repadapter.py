"""RepAdapter: a linear, group-wise adapter before attention and MLP, folded into them at merge.

Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization", 2023.
x <- x + s * B(dropout(A x)) on the input of the qkv projection and of fc1 (after the norms):
A is dense (dim -> hidden, Xavier init), B group-wise (hidden -> dim, zero init, 2 groups), both
with bias and no activation in between. Being linear, it folds into the following layer:
W' = W (I + s B A), b' = b + s W (B a + b_B); merged inference costs exactly the backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import matmul_dtype


@dataclass
class RepAdapterConfig(MethodConfig):
    hidden: int = option(8, "hidden width of each adapter")
    groups: int = option(2, "groups of the up-projection B (block-diagonal)")
    scale: float = option(1.0, "scale s of the adapter (the paper searches it per task)")
    dropout: float = option(0.1, "dropout between A and B (training only)")

    def validate(self) -> None:
        if self.hidden < 1 or self.groups < 1 or self.hidden % self.groups:
            raise ConfigError(
                f"repadapter: hidden ({self.hidden}) must be a positive multiple of groups ({self.groups})"
            )


class RepAdapterLinear(BaseLayerWrapper):
    """A Linear layer whose input first passes a linear group-wise adapter."""

    def __init__(self, base_layer: nn.Linear, config: RepAdapterConfig):
        super().__init__(base_layer)
        dim, ref = base_layer.in_features, base_layer.weight
        if dim % config.groups:
            raise ConfigError(f"repadapter: width {dim} is not divisible by groups={config.groups}")
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.groups, self.scale = config.groups, config.scale
        self.down = nn.Linear(dim, config.hidden, **kw)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        # group g maps hidden slice g (hidden/groups) to output slice g (dim/groups)
        self.up_weight = nn.Parameter(
            torch.zeros(config.groups, dim // config.groups, config.hidden // config.groups, **kw)
        )
        self.up_bias = nn.Parameter(torch.zeros(dim, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _up(self, h: torch.Tensor) -> torch.Tensor:
        g = self.groups
        h = h.unflatten(-1, (g, -1))  # (..., g, hidden/g)
        out = torch.einsum("...gi,goi->...go", h, self.up_weight)
        return out.flatten(-2) + self.up_bias

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        return self._up(self.dropout(self.down(x))) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W (x + s (U h + c)) + b  =  W x + (b + s W c) + (s W U) h,  h = dropout(A x + a): the adapter reaches
        # the output through two small weights built per step, (s W U) and b + s W c, so the full-width
        # activations see no elementwise pass: one matmul more, of rank ``hidden``, its add fused (addmm)
        layer = self.base_layer
        dtype = matmul_dtype(x)
        x, weight = x.to(dtype), layer.weight.to(dtype)  # one cast each, shared by the matmuls
        h = self.dropout(self.down(x))
        up = self._dense_up()
        w_up = weight @ (up if self.scale == 1.0 else up * self.scale).to(dtype)  # (out, hidden)
        if layer.bias is None:
            bias = torch.mv(weight, self.up_bias.to(dtype)) * self.scale
        else:
            bias = torch.addmv(layer.bias.to(dtype), weight, self.up_bias.to(dtype), alpha=self.scale)
        out = F.linear(x, weight, bias.to(dtype))
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]).to(dtype), w_up.t())
        return flat.view(out.shape)

    def _dense_up(self) -> torch.Tensor:
        return torch.block_diag(*self.up_weight)  # (dim, hidden)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter as x -> x + M x + c."""
        up = self._dense_up()
        return self.scale * up @ self.down.weight, self.scale * (up @ self.down.bias + self.up_bias)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        m, c = self._affine()
        layer = self.base_layer
        shift = F.linear(c, layer.weight)
        layer.weight += layer.weight @ m
        if layer.bias is None:
            layer.bias = nn.Parameter(
                torch.zeros(layer.out_features, dtype=shift.dtype, device=shift.device), requires_grad=False
            )
        layer.bias += shift

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        m, c = self._affine()
        layer = self.base_layer
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        layer.weight.copy_(torch.linalg.solve(eye + m, layer.weight, left=False))
        layer.bias -= F.linear(c, layer.weight)


@register
class RepAdapter(Method):
    name = "repadapter"
    family = "partial/reparameterization"
    paper = "Luo et al., RepAdapter, 2023 (arXiv 2302.08106)"
    requires = frozenset({"attention", "mlp"})
    mergeable = True
    config_class = RepAdapterConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: RepAdapterConfig) -> None:
        for block in anatomy.blocks:
            for name in (block.qkv or block.q, block.fc1):
                if block.qkv is None and name == block.q:
                    raise ConfigError("repadapter: needs a fused qkv projection to take the attention input")
                replace_module(model, name, RepAdapterLinear(model.get_submodule(name), config))
