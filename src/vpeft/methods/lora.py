"""LoRA: low-rank updates W + (alpha / r) B A on chosen Linear or Conv2d layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. A is initialised
like a Linear layer (Kaiming-uniform), B at zero, so the model is unchanged at step 0.
On timm's fused ``qkv`` projection, targets ``q``/``k``/``v`` adapt only their output slices;
the full-size delta weight is never built in the forward pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import (
    BaseLayerWrapper,
    DeltaWeightWrapper,
    Method,
    MethodConfig,
    backbone_modules,
    match_pattern,
    register,
    replace_module,
)

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


class LoRALinear(BaseLayerWrapper):
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
        out = self.base_layer(x)
        h = self.dropout(x)
        # the scaling multiplies the rank-r activations, not the layer's full-width output
        if len(self.slices) == 1 and self.slices[0] == (0, self.base_layer.out_features):
            low = F.linear(h, self.lora_A[0]) * self.scaling
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_B[0].t())
            return flat.view(out.shape)  # the add is fused into the up-projection's matmul
        for (start, end), a, b in zip(self.slices, self.lora_A, self.lora_B, strict=True):
            out[..., start:end] += F.linear(F.linear(h, a) * self.scaling, b)
        return out

    def delta_weight(self, index: int) -> torch.Tensor:
        return (self.lora_B[index] @ self.lora_A[index]) * self.scaling

    @torch.no_grad()
    def merge_into_base(self) -> None:
        for i, (start, end) in enumerate(self.slices):
            self.base_layer.weight[start:end] += self.delta_weight(i)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        for i, (start, end) in enumerate(self.slices):
            self.base_layer.weight[start:end] -= self.delta_weight(i)


class LoRAConv2d(DeltaWeightWrapper):
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

    def delta_weight(self) -> torch.Tensor:
        rank = self.lora_A.shape[0]
        delta = self.lora_B.flatten(1) @ self.lora_A.reshape(rank, -1)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling


def default_targets(anatomy: Anatomy) -> list[str]:
    if anatomy.family in ("vit", "swin"):
        return ["q", "v"]
    if all(b.fc1 is not None for b in anatomy.blocks):
        return ["fc1", "fc2"]
    blocks = "|".join(re.escape(b.name) for b in anatomy.blocks)
    return [f"re:({blocks})\\..*"]


def resolve_targets(model: nn.Module, anatomy: Anatomy, targets: list[str]) -> dict[str, list[tuple[int, int]] | None]:
    """Map module name -> output slices to adapt (None: the whole layer)."""
    found: dict[str, list[tuple[int, int]] | None] = {}
    for target in targets:
        if target.startswith("re:"):
            names = [
                n
                for n, m in backbone_modules(model, anatomy)
                if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
            ]
            matched = match_pattern(names, target[3:])
            if not matched:
                raise ConfigError(
                    f"lora: pattern '{target}' matches no Linear or Conv2d layer of {anatomy.architecture}"
                )
            for name in matched:
                found[name] = None
            continue
        hits = 0
        for block in anatomy.blocks:
            if target in ("q", "k", "v") and getattr(block, target) is None and block.qkv is not None:
                qkv = model.get_submodule(block.qkv)
                width = qkv.out_features // 3
                index = "qkv".index(target)
                slices = found.setdefault(block.qkv, [])
                if slices is None:
                    continue  # whole qkv already targeted
                slices.append((index * width, (index + 1) * width))
                hits += 1
                continue
            name = getattr(block, target)
            if name is not None:
                found[name] = None
                hits += 1
        if hits == 0:
            raise UnsupportedBackboneError(
                f"lora: target '{target}' names no layer of {anatomy.architecture} (a {anatomy.family} backbone); "
                "pick layers with 're:<regex>' instead"
            )
    for name, slices in found.items():
        if slices is not None:
            found[name] = sorted(set(slices))
    return found


@register
class LoRA(Method):
    name = "lora"
    family = "partial/reparameterization"
    paper = "Hu et al., LoRA, ICLR 2022 (arXiv 2106.09685)"
    backbones = ("vit", "swin", "cnn")
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
