"""DoRA: weight-decomposed low-rank adaptation, W' = m * (W0 + s B A) / ||W0 + s B A||.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024. The magnitude m (one per
output feature, initialised to the row norms of W0) and the direction's LoRA update are trained;
B starts at zero, so the model is unchanged at step 0. As in the paper (section 4.3), the norm is
treated as a constant in the backward pass. Same targets as LoRA, incl. slices of a fused qkv.
Unlike LoRA, each forward builds the adapted rows' weight to take their norms, as DoRA requires.

With dropout, training computes what the official code (NVlabs/DoRA) and peft compute:
W x + b + (m/n - 1) W drop(x) + (m/n) s B A drop(x), i.e. dropout acts on the LoRA path and on the
magnitude correction, never on the frozen base path. Without dropout, and in eval, this is exactly
(m/n) (W x + s B A x) + b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.errors import UnsupportedBackboneError
from vpeft.methods.base import Method, register, replace_module
from vpeft.methods.lora import LoRAConfig, LoRALinear, default_targets, resolve_targets


@dataclass
class DoRAConfig(LoRAConfig):
    pass


class DoRALinear(LoRALinear):
    """LoRA on output slices of a Linear, with a learned magnitude per adapted output feature."""

    def __init__(self, base_layer: nn.Linear, slices: list[tuple[int, int]], rank: int, scaling: float, dropout: float):
        super().__init__(base_layer, slices, rank, scaling, dropout)
        with torch.no_grad():
            self.magnitude = nn.ParameterList(
                [nn.Parameter(base_layer.weight[start:end].norm(dim=1)) for start, end in self.slices]
            )
        self._merged_norms: list[torch.Tensor] = []

    def _direction_norm(self, index: int) -> torch.Tensor:
        start, end = self.slices[index]
        weight = self.base_layer.weight[start:end] + self.delta_weight(index)
        return weight.norm(dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        h = self.dropout(x) if dropped else x
        bias = self.base_layer.bias
        segments, cursor = [], 0
        for i, (start, end) in enumerate(self.slices):
            segments.append(out[..., cursor:start])
            plain = out[..., start:end]
            if dropped:  # the magnitude correction reads the dropped input, as the LoRA path does
                base = F.linear(h, self.base_layer.weight[start:end])
            else:
                base = plain if bias is None else plain - bias[start:end]
            lora = F.linear(F.linear(h, self.lora_A[i]), self.lora_B[i]) * self.scaling
            ratio = self.magnitude[i] / self._direction_norm(i)
            segments.append(plain + (ratio - 1) * base + ratio * lora)  # the bias is not rescaled
            cursor = end
        segments.append(out[..., cursor:])
        return torch.cat(segments, dim=-1)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self._merged_norms = []
        for i, (start, end) in enumerate(self.slices):
            norm = self._direction_norm(i)
            self._merged_norms.append(norm)
            weight = self.base_layer.weight[start:end] + self.delta_weight(i)
            self.base_layer.weight[start:end] = weight * (self.magnitude[i] / norm)[:, None]

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        for i, (start, end) in enumerate(self.slices):
            weight = self.base_layer.weight[start:end] * (self._merged_norms[i] / self.magnitude[i])[:, None]
            self.base_layer.weight[start:end] = weight - self.delta_weight(i)
        self._merged_norms = []


@register
class DoRA(Method):
    name = "dora"
    family = "partial/reparameterization"
    paper = "Liu et al., DoRA, ICML 2024 (arXiv 2402.09353)"
    backbones = ("vit", "swin", "cnn")
    #: where a family is only partly covered
    backbone_notes: ClassVar[dict[str, str]] = {"cnn": "ConvNeXt only: CNNs whose blocks have Linear layers"}
    mergeable = True
    config_class = DoRAConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: DoRAConfig) -> None:
        targets = config.targets if config.targets is not None else default_targets(anatomy)
        for name, slices in resolve_targets(model, anatomy, targets).items():
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise UnsupportedBackboneError(
                    f"dora: '{name}' is a {type(layer).__name__}; vpeft's DoRA adapts Linear layers only "
                    "(pick Linear layers with targets, e.g. fc1,fc2 on ConvNeXt)"
                )
            slices = slices or [(0, layer.out_features)]
            replace_module(model, name, DoRALinear(layer, slices, config.rank, config.scaling, config.dropout))
