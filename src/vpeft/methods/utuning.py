"""U-Tuning: a parallel tuner around a frozen operation, x' = OP(x) + U(x).

Jiang et al., "Rethinking Efficient Tuning Methods from a Unified Perspective", arXiv 2303.00690.
The paper writes every tuning method as a frozen operation OP (multi-head attention, the FFN, or a
whole block) plus a U-tuner that reads OP's own input and adds to its output. No code is public:
vpeft implements it from the paper, with the U-tuner a bottleneck up(act(down(x))) (down Kaiming-
uniform, up zero: the identity at step 0), around attention and the MLP by default
(``ops=attn,mlp``) and optionally around whole blocks. The attention and MLP tuners read the
sub-block's input after its norm (OP's input), unlike AdaptFormer, which reads the residual stream.

Speed: the tuner's add, its bias and its scale are one ``addmm`` (the add fused into the matmul).
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
from vpeft.modules import activation, first_param

OPS = ("attn", "mlp", "block")
ACTS = ("gelu", "relu", "silu", "identity")


@dataclass
class UTuningConfig(MethodConfig):
    ops: list[str] = option(
        ["attn", "mlp"], "frozen operations with a parallel U-tuner: attn (MHA), mlp (FFN), block (a whole block)"
    )
    bottleneck: int = option(8, "hidden width of each U-tuner")
    act: str = option("gelu", "activation inside the U-tuner", choices=ACTS)
    scale: float = option(1.0, "multiplier on the U-tuner's output")
    dropout: float = option(0.0, "dropout inside the U-tuner")

    def validate(self) -> None:
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ConfigError(f"utuning: ops must be distinct values among {list(OPS)}, got {self.ops}")
        if self.bottleneck < 1:
            raise ConfigError(f"utuning: bottleneck must be >= 1, got {self.bottleneck}")
        if self.act not in ACTS:
            raise ConfigError(f"utuning: act must be one of {list(ACTS)}, got '{self.act}'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"utuning: dropout must be in [0, 1), got {self.dropout}")


class ParallelTuner(BaseLayerWrapper):
    """OP(x) + scale * up(act(down(x))), x being OP's own input."""

    def __init__(self, base_layer: nn.Module, dim: int, config: UTuningConfig):
        super().__init__(base_layer)
        ref = first_param(base_layer)
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.down = nn.Linear(dim, config.bottleneck, **kw)
        self.up = nn.Linear(config.bottleneck, dim, **kw)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            for t in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(t)
        self.act = activation(config.act)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        z = F.pad(self.dropout(self.act(self.down(x))), (0, 1), value=1.0)  # the ones column carries up's bias
        weight = torch.cat([self.up.weight, self.up.bias[:, None]], dim=1)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), weight.t(), alpha=self.scale)
        return flat.view(out.shape)


@register
class UTuning(Method):
    name = "utuning"
    family = "unified"
    paper = "Jiang et al., Rethinking Efficient Tuning Methods from a Unified Perspective (U-Tuning), arXiv 2303.00690"
    requires = frozenset({"attention", "mlp"})
    config_class = UTuningConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: UTuningConfig) -> None:
        for block in anatomy.blocks:
            for role in ("attn", "mlp"):  # inside the block first: wrapping the block moves these paths
                if role in config.ops:
                    name = getattr(block, role)
                    replace_module(model, name, ParallelTuner(model.get_submodule(name), block.dim, config))
            if "block" in config.ops:
                replace_module(model, block.name, ParallelTuner(model.get_submodule(block.name), block.dim, config))
