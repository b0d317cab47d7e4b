"""BAPAT / PATT: a parallel tanh adapter that shifts the attention's keys and values, plus an FFN adapter.

Yu et al., "Towards a Unified View on Visual Parameter-Efficient Transfer Learning" (V-PETL), arXiv
2210.00788 (bruceyo/V-PETL, ``models/video_swin_transformer_patt.py``, mode ``patt_kv``). In every
attention, [dK, dV] = W_up tanh(W_down x) on the attention's input x (width 128, with biases), and
K <- K + s dK, V <- V + s dV with s = 0.8 (the README's run). The MLP gets AdaptFormer's parallel
adapter on its input: MLP(x) + 0.1 * up(relu(down(x))), bottleneck 64, down Kaiming-uniform, up
zero. The attention adapter keeps nn.Linear's default init in the code (``attn_init=default``), so
the model is not the identity at step 0; ``attn_init=zero_up`` zeroes its up-projection.

Implemented on timm's fused ``qkv``: the shift is added to qkv's key and value output slices, in one
``addmm`` (the add fused; zero rows for the query slice), the FFN adapter likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module

SLOTS = ("kv", "qv", "qk", "qkv")
ATTN_INITS = ("default", "zero_up")


@dataclass
class BAPATConfig(MethodConfig):
    attn_hidden: int = option(128, "hidden width of the tanh attention adapter (the README's att_mid_dim)")
    attn_scale: float = option(0.8, "s on the attention shifts (the README's att_prefix_scale)")
    attn_slots: str = option("kv", "which of q, k, v the attention adapter shifts (patt_kv is the paper's)", SLOTS)
    attn_init: str = option(
        "default",
        "'default': nn.Linear's init for both projections (the code's; not the identity); 'zero_up': up zero",
        ATTN_INITS,
    )
    ffn_hidden: int = option(64, "bottleneck of the parallel FFN adapter (the code's ffn_num)")
    ffn_scale: float = option(0.1, "multiplier on the FFN adapter (the code's ffn_adapter_scalar)")

    def validate(self) -> None:
        if self.attn_hidden < 1 or self.ffn_hidden < 1:
            raise ConfigError(f"bapat: hidden widths must be >= 1, got {self.attn_hidden}, {self.ffn_hidden}")
        if self.attn_slots not in SLOTS:
            raise ConfigError(f"bapat: attn_slots must be one of {list(SLOTS)}, got '{self.attn_slots}'")
        if self.attn_init not in ATTN_INITS:
            raise ConfigError(f"bapat: attn_init must be one of {list(ATTN_INITS)}, got '{self.attn_init}'")


def _fused_add(out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """out + alpha * [z, 1] @ weight^T as one addmm; ``weight``'s last column is the bias."""
    z = F.pad(z, (0, 1), value=1.0)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), weight.t(), alpha=alpha)
    return flat.view(out.shape)


class ShiftedQKV(BaseLayerWrapper):
    """The fused qkv projection plus s * W_up tanh(W_down x) on the chosen q/k/v output slices."""

    def __init__(self, base_layer: nn.Linear, config: BAPATConfig):
        super().__init__(base_layer)
        dim, bias = base_layer.in_features, base_layer.bias is not None
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.slots = config.attn_slots
        self.down = nn.Linear(dim, config.attn_hidden, bias=bias, **kw)
        self.up = nn.Linear(config.attn_hidden, len(self.slots) * (base_layer.out_features // 3), bias=bias, **kw)
        if config.attn_init == "zero_up":
            with torch.no_grad():
                nn.init.zeros_(self.up.weight)
                if bias:
                    nn.init.zeros_(self.up.bias)
        self.scale = config.attn_scale

    def _full_weight(self) -> torch.Tensor:
        """(3 d, hidden + 1): the up-projection (and bias column) in its slots' rows, zero elsewhere."""
        up = self.up.weight
        bias = self.up.bias[:, None] if self.up.bias is not None else up.new_zeros(up.shape[0], 1)
        rows = torch.cat([up, bias], dim=1).chunk(len(self.slots))
        zero = up.new_zeros(rows[0].shape)
        return torch.cat([rows[self.slots.index(s)] if s in self.slots else zero for s in "qkv"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused_add(self.base_layer(x), torch.tanh(self.down(x)), self._full_weight(), self.scale)


class ParallelFFNAdapter(BaseLayerWrapper):
    """MLP(x) + s * up(relu(down(x))) on the MLP's input (AdaptFormer's module, the code's placement)."""

    def __init__(self, base_layer: nn.Module, dim: int, config: BAPATConfig, like: torch.Tensor):
        super().__init__(base_layer)
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(dim, config.ffn_hidden, **kw)
        self.up = nn.Linear(config.ffn_hidden, dim, **kw)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            for t in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(t)
        self.scale = config.ffn_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.up.weight, self.up.bias[:, None]], dim=1)
        return _fused_add(self.base_layer(x), F.relu(self.down(x)), weight, self.scale)


@register
class BAPAT(Method):
    name = "bapat"
    family = "addition/prefix"
    paper = "Yu et al., Towards a Unified View on Visual PETL (PATT), arXiv 2210.00788"
    requires = frozenset({"qkv_fused", "mlp"})
    config_class = BAPATConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: BAPATConfig) -> None:
        for block in anatomy.blocks:
            if block.qkv is None or block.mlp is None:
                raise UnsupportedBackboneError(
                    f"bapat: block {block.name} of {anatomy.architecture} needs a fused qkv projection and an MLP"
                )
            qkv = model.get_submodule(block.qkv)
            replace_module(model, block.qkv, ShiftedQKV(qkv, config))
            replace_module(
                model, block.mlp, ParallelFFNAdapter(model.get_submodule(block.mlp), block.dim, config, qkv.weight)
            )
