"""Hydra: a parallel and a sequential low-rank branch on a layer, foldable into its weights.

Kim et al., "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning", 2023
(extremebird/Hydra, ``vtab1k/hydra.py``). On attn.proj and mlp.fc2:
y = W0 x + b0 + s * P(x) + s * S(W0 x + b0), P (on the layer's input) and S (on its output) each
up(dropout(down(.))) with biases, rank 2; down Xavier-uniform, up and biases zero (the identity
at step 0). Defaults follow the official scripts: rank 2, s = 0.1 and dropout 0.2 (most per-task
configs; some tasks set s up to 4.5).

Merge: W' = W0 + s (Up_p Dn_p + Up_s Dn_s W0), b' = b0 + s (Up_s Dn_s b0 + c), c the branches' bias
terms. The official ``set_hydraWeight`` folds the attention branch against mlp.fc2's weight and bias
instead of attn.proj's (a bug); vpeft folds each layer against its own. Unmerge inverts
I + s Up_s Dn_s through the Woodbury identity (an r x r solve), so no copy of W0 is kept.

Speed: one down-projection per branch (narrow), then both up-projections, the bias terms and s in one
``addmm`` whose add is fused: no full-width elementwise pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module

ROLES = ("qkv", "proj", "fc1", "fc2")


@dataclass
class HydraConfig(MethodConfig):
    rank: int = option(2, "rank of each branch (the official scripts' dim)")
    scale: float = option(0.1, "s, the multiplier on both branches (official per-task configs: 0.1 on most tasks)")
    dropout: float = option(0.2, "dropout between each branch's down- and up-projection (the official configs')")
    targets: list[str] = option(["proj", "fc2"], "layers to adapt, by role: " + ", ".join(ROLES))

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"hydra: rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"hydra: dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in ROLES]
        if bad or not self.targets:
            raise ConfigError(f"hydra: targets must be among {list(ROLES)}, got {self.targets}")


def _branch(fan_in: int, rank: int, fan_out: int, like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    kw = {"device": like.device, "dtype": like.dtype}
    down, up = nn.Linear(fan_in, rank, **kw), nn.Linear(rank, fan_out, **kw)
    with torch.no_grad():
        nn.init.xavier_uniform_(down.weight)
        for t in (down.bias, up.weight, up.bias):
            nn.init.zeros_(t)
    return down, up


class HydraLinear(BaseLayerWrapper):
    """W0 x + b0 + s * par_up(drop(par_down(x))) + s * seq_up(drop(seq_down(W0 x + b0)))."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float, dropout: float):
        super().__init__(base_layer)
        ref = base_layer.weight
        self.par_down, self.par_up = _branch(base_layer.in_features, rank, base_layer.out_features, ref)
        self.seq_down, self.seq_up = _branch(base_layer.out_features, rank, base_layer.out_features, ref)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._added_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        z = self.dropout(torch.cat([self.par_down(x), self.seq_down(y)], dim=-1))  # narrow: both branches at once
        z = F.pad(z, (0, 1), value=1.0)  # a ones column carries the up-projections' biases
        bias = (self.par_up.bias + self.seq_up.bias)[:, None]
        weight = torch.cat([self.par_up.weight, self.seq_up.weight, bias], dim=1)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), weight.t(), alpha=self.scale)
        return flat.view(y.shape)

    def _bias_terms(self) -> torch.Tensor:
        """c: what the branches add to the bias, apart from the sequential branch's Up_s Dn_s b0."""
        return (
            self.par_up.weight @ self.par_down.bias
            + self.par_up.bias
            + self.seq_up.weight @ self.seq_down.bias
            + self.seq_up.bias
        )

    @torch.no_grad()
    def merge_into_base(self) -> None:
        layer, s = self.base_layer, self.scale
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(layer.weight[:, 0]), requires_grad=False)
            self._added_bias = True
        up_s, down_s = self.seq_up.weight, self.seq_down.weight
        weight = layer.weight + s * (self.par_up.weight @ self.par_down.weight + up_s @ (down_s @ layer.weight))
        bias = layer.bias + s * (up_s @ (down_s @ layer.bias) + self._bias_terms())
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        layer, s = self.base_layer, self.scale
        up_s, down_s = self.seq_up.weight, self.seq_down.weight
        eye = torch.eye(up_s.shape[1], dtype=up_s.dtype, device=up_s.device)
        core = eye + s * (down_s @ up_s)  # r x r

        def solve(t: torch.Tensor) -> torch.Tensor:  # (I + s Up_s Dn_s)^-1 t, by Woodbury
            return t - s * up_s @ torch.linalg.solve(core, down_s @ t)

        layer.weight.copy_(solve(layer.weight - s * self.par_up.weight @ self.par_down.weight))
        bias = solve((layer.bias - s * self._bias_terms())[:, None])[:, 0]
        if self._added_bias:
            layer.bias = None
            self._added_bias = False
        else:
            layer.bias.copy_(bias)


@register
class Hydra(Method):
    name = "hydra"
    family = "partial/reparameterization"
    paper = "Kim et al., Hydra: Multi-head Low-rank Adaptation, 2023 (arXiv 2309.06922)"
    requires = frozenset({"attn_proj", "mlp"})
    mergeable = True
    config_class = HydraConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: HydraConfig) -> None:
        for block in anatomy.blocks:
            for role in config.targets:
                name = getattr(block, role)
                layer = model.get_submodule(name) if name else None
                if not isinstance(layer, nn.Linear):
                    raise UnsupportedBackboneError(
                        f"hydra: block {block.name} of {anatomy.architecture} has no Linear '{role}'"
                    )
                replace_module(model, name, HydraLinear(layer, config.rank, config.scale, config.dropout))
