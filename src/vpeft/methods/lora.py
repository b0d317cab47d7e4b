"""LoRA: low-rank updates W + (alpha / r) B A on chosen Linear or Conv2d layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. A is initialised
like a Linear layer (Kaiming-uniform), B at zero, so the model is unchanged at step 0.
On timm's fused ``qkv`` projection, targets ``q``/``k``/``v`` adapt only their output slices;
the full-size delta weight is never built in the forward pass.

Speed (GPU first): one down-projection for all slices, one up-projection whose weight holds each
slice's B in its rows (zeros elsewhere, a small weight built per step), its add fused into the
matmul (``addmm``): no full-size elementwise pass, copy or slice assignment in forward or backward.
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
from vpeft.methods.base import (
    DeltaWeightWrapper,
    Method,
    MethodConfig,
    RoutableUpdate,
    SlicedDeltaWrapper,
    register,
    replace_module,
)
from vpeft.methods.lowrank import SlicedLoRAFunction
from vpeft.methods.targets import default_targets, resolve_targets
from vpeft.modules import matmul_dtype

#: roles a target can name; any other target must be a regular expression prefixed "re:"
ROLES = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = option(8, "rank r of the update B A")
    alpha: float | None = option(
        None, "scaling numerator; the update is scaled by alpha / rank (default: alpha = rank)"
    )
    dropout: float = option(0.0, "dropout on the LoRA branch's input")
    targets: list[str] | None = option(
        None,
        "layers to adapt: roles q, k, v (slices of a fused qkv), qkv, proj, fc1, fc2, or 're:<regex>' "
        "matched against full module names (Linear or Conv2d). Default: q,v on transformers; "
        "fc1,fc2 on CNN blocks with an MLP (ConvNeXt); every non-grouped conv inside the blocks of other CNNs",
    )

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora: rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise ConfigError("lora: targets is empty; give at least one of " + ", ".join(ROLES))
        for t in self.targets or []:
            if t not in ROLES and not t.startswith("re:"):
                raise ConfigError(f"lora: unknown target '{t}'; use one of {', '.join(ROLES)} or 're:<regex>'")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoRALinear(SlicedDeltaWrapper, RoutableUpdate):
    """A Linear layer plus low-rank updates on one or more slices of its output features."""

    def __init__(self, base_layer: nn.Linear, slices: list[tuple[int, int]], rank: int, scaling: float, dropout: float):
        super().__init__(base_layer)
        self.slices = [tuple(s) for s in slices]
        self.scaling = scaling
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        ref = base_layer.weight
        for start, end in self.slices:
            a = torch.empty(rank, base_layer.in_features, device=ref.device, dtype=ref.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(end - start, rank, device=ref.device, dtype=ref.dtype)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        if self.training and not isinstance(self.dropout, nn.Identity):  # the down-projection reads dropout(x)
            out = layer(x)
            low = F.linear(self.dropout(x), self._down_weight())  # every slice's rank-r activations, one matmul
            # one up-projection to the full width, zero rows outside the slices, its add fused into the matmul
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), self._up_weight().t())
            return flat.view(out.shape)
        lora = [*self.lora_A, *self.lora_B]
        flat = x.reshape(-1, x.shape[-1])
        out = SlicedLoRAFunction.apply(
            flat, layer.weight, layer.bias, matmul_dtype(x), self.scaling, self.slices, *lora
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    def _down_weight(self) -> torch.Tensor:
        """All slices' A stacked (slices * r, in), scaled: the scaling multiplies a small weight, not activations."""
        a = self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A))
        return a if self.scaling == 1.0 else a * self.scaling

    def _up_weight(self) -> torch.Tensor:
        """(out, slices * r): B of slice i in its output rows and its own r columns, zero elsewhere."""
        blocks, cursor = [], 0
        for (start, end), b in zip(self.slices, self.lora_B, strict=True):
            if start > cursor:
                blocks.append(b.new_zeros(start - cursor, 0))  # rows no slice adapts: zero-width blocks
            blocks.append(b)
            cursor = end
        if cursor < self.base_layer.out_features:
            blocks.append(blocks[-1].new_zeros(self.base_layer.out_features - cursor, 0))
        return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)

    def add_update_span_(self, out: torch.Tensor, x: torch.Tensor, start: int, end: int) -> None:
        """Add the update of rows ``start:end`` of ``x`` into the same rows of ``out`` (this layer's frozen output)
        in place: a mixed batch sorted by adapter runs the base layer once and each LoRA on its own rows
        (:mod:`vpeft.multi.single_pass`; not for DoRA). Views and in-place matmuls only, no copy."""
        rows = self.dropout(x[start:end])
        low = F.linear(rows, self._down_weight()).reshape(-1, self.lora_A[0].shape[0] * len(self.slices))
        target = out[start:end].view(-1, out.shape[-1])
        lows = low.split(self.lora_A[0].shape[0], dim=1) if len(self.slices) > 1 else [low]
        for (s, e), low_i, b in zip(self.slices, lows, self.lora_B, strict=True):
            target[:, s:e].addmm_(low_i.to(out.dtype), b.t().to(out.dtype))

    def delta_weight(self, index: int) -> torch.Tensor:
        return (self.lora_B[index] @ self.lora_A[index]) * self.scaling


class LoRAConv2d(DeltaWeightWrapper, RoutableUpdate):
    """A Conv2d plus a low-rank update: A is a conv with the base's kernel to r channels, B a 1x1 conv."""

    def __init__(self, base_layer: nn.Conv2d, rank: int, scaling: float, dropout: float):
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise UnsupportedBackboneError("lora: grouped or depth-wise convolutions cannot take a LoRA update")
        self.scaling = scaling
        ref = base_layer.weight
        a = torch.empty(rank, base_layer.in_channels, *base_layer.kernel_size, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_channels, rank, 1, 1, device=ref.device, dtype=ref.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        h = F.conv2d(self.dropout(x), self.lora_A, None, conv.stride, conv.padding, conv.dilation)
        return conv(x) + F.conv2d(h, self.lora_B) * self.scaling

    def add_update_span_(self, out: torch.Tensor, x: torch.Tensor, start: int, end: int) -> None:
        """Add the update of batch rows ``start:end`` of ``x`` into the same rows of ``out`` in place."""
        conv = self.base_layer
        h = F.conv2d(self.dropout(x[start:end]), self.lora_A, None, conv.stride, conv.padding, conv.dilation)
        out[start:end].add_(F.conv2d(h, self.lora_B).to(out.dtype), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        rank = self.lora_A.shape[0]
        delta = self.lora_B.flatten(1) @ self.lora_A.reshape(rank, -1)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling


@register
class LoRA(Method):
    name = "lora"
    family = "partial/reparameterization"
    paper = "Hu et al., LoRA, ICLR 2022 (arXiv 2106.09685)"
    requires = frozenset({"blocks"})
    mergeable = True
    config_class = LoRAConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: LoRAConfig) -> None:
        targets = config.targets if config.targets is not None else default_targets(anatomy)
        for name, slices in resolve_targets(model, anatomy, targets).items():
            layer = model.get_submodule(name)
            if isinstance(layer, nn.Linear):
                wrapper: nn.Module = LoRALinear(
                    layer, slices or [(0, layer.out_features)], config.rank, config.scaling, config.dropout
                )
            elif isinstance(layer, nn.Conv2d):
                wrapper = LoRAConv2d(layer, config.rank, config.scaling, config.dropout)
            else:
                raise UnsupportedBackboneError(f"lora: '{name}' is a {type(layer).__name__}, not a Linear or Conv2d")
            replace_module(model, name, wrapper)
