"""GLoRA: generalised LoRA, W' = W0 + W0 * A + B and b' = b0 + b0 * D + E + W0 C on every Linear.

Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning", 2023
(Arnav0400/ViT-Slim, ``GLoRA/layer.py``). Each support tensor is one of: ``lora`` (a rank-r product
X_d X_u), ``vector`` (one value per output row; for C, per input), ``constant`` (one scalar) or
``none``; ``*`` is the element-wise product. Init as the code: the X_d factors, vectors and constants
zero, X_u Xavier-uniform, so the layer is unchanged at step 0.

The paper trains a supernet over every per-layer choice and picks one by evolutionary search on
validation data; vpeft builds one fixed configuration for all adapted layers (the search is not
built). The default, A vector, B LoRA (r = 4), C, D and E vectors, combines LoRA (B) with
SSF-like row scales and shifts (A, D, E) and a prompt-like bias (C): 903,168 parameters on ViT-B/16.

Speed: the adapted weight and bias are built once per forward (weight-sized element-wise work,
independent of the batch) and the layer runs one matmul. Merging writes them into the layer; the
original weights are kept aside for an exact unmerge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module

ROLES = ("qkv", "proj", "fc1", "fc2")
KINDS = {
    "a": ("lora", "vector", "constant", "none"),
    "b": ("lora", "vector", "constant", "none"),
    "c": ("lora", "vector", "none"),
    "d": ("vector", "constant", "none"),
    "e": ("vector", "constant", "none"),
}


@dataclass
class GLoRAConfig(MethodConfig):
    rank: int = option(4, "rank r of the 'lora' support tensors (the code's default)")
    a: str = option("vector", "A in W0 + W0 * A: " + ", ".join(KINDS["a"]), choices=KINDS["a"])
    b: str = option("lora", "B in W0 + B: " + ", ".join(KINDS["b"]), choices=KINDS["b"])
    c: str = option(
        "vector", "C in the bias term W0 C (per input feature): " + ", ".join(KINDS["c"]), choices=KINDS["c"]
    )
    d: str = option("vector", "D in b0 + b0 * D: " + ", ".join(KINDS["d"]), choices=KINDS["d"])
    e: str = option("vector", "E in b0 + E: " + ", ".join(KINDS["e"]), choices=KINDS["e"])
    targets: list[str] = option(
        list(ROLES), "Linear layers to adapt, by role (the code adapts every Linear but the head)"
    )

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"glora: rank must be >= 1, got {self.rank}")
        for key, kinds in KINDS.items():
            if getattr(self, key) not in kinds:
                raise ConfigError(f"glora: {key} must be one of {list(kinds)}, got '{getattr(self, key)}'")
        bad = [t for t in self.targets if t not in ROLES]
        if bad or not self.targets:
            raise ConfigError(f"glora: targets must be among {list(ROLES)}, got {self.targets}")
        if self.a == self.b == self.c == self.d == self.e == "none":
            raise ConfigError("glora: every support tensor is 'none'; nothing would train")


class GLoRALinear(BaseLayerWrapper):
    """A Linear layer computed with GLoRA's adapted weight and bias."""

    def __init__(self, base_layer: nn.Linear, config: GLoRAConfig):
        super().__init__(base_layer)
        out_f, in_f, r = base_layer.out_features, base_layer.in_features, config.rank
        self.kinds = {k: getattr(config, k) for k in KINDS}
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        for key, rows, cols in (("a", out_f, in_f), ("b", out_f, in_f), ("c", in_f, 1)):
            kind = self.kinds[key]
            if kind == "lora":
                up = torch.empty(r, cols, **kw)
                nn.init.xavier_uniform_(up)
                self.register_parameter(f"{key}_down", nn.Parameter(torch.zeros(rows, r, **kw)))
                self.register_parameter(f"{key}_up", nn.Parameter(up))
            elif kind == "vector":
                self.register_parameter(key, nn.Parameter(torch.zeros(rows, 1, **kw)))
            elif kind == "constant":
                self.register_parameter(key, nn.Parameter(torch.zeros((), **kw)))
        for key in ("d", "e"):
            kind = self.kinds[key]
            if kind != "none":
                self.register_parameter(key, nn.Parameter(torch.zeros(out_f if kind == "vector" else (), **kw)))
        self._stash: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _support(self, key: str) -> torch.Tensor | None:
        kind = self.kinds[key]
        if kind == "none":
            return None
        if kind == "lora":
            return getattr(self, f"{key}_down") @ getattr(self, f"{key}_up")
        return getattr(self, key)

    def adapted(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + W0 * A + B, b0 + b0 * D + E + W0 C) from the base layer's current weights, in few kernels."""
        w0, b0, kinds = self.base_layer.weight, self.base_layer.bias, self.kinds
        weight = w0 if kinds["a"] == "none" else torch.addcmul(w0, w0, self._support("a"))
        if kinds["b"] == "lora":
            weight = torch.addmm(weight, self.b_down, self.b_up)
        elif kinds["b"] != "none":
            weight = weight + self.b
        bias = b0
        if b0 is not None and kinds["d"] != "none":
            bias = torch.addcmul(b0 if kinds["e"] == "none" else b0 + self.e, b0, self.d)
        elif kinds["e"] != "none":
            bias = self.e.expand(w0.shape[0]) if b0 is None else b0 + self.e
        c = self._support("c")
        if c is not None:
            bias = torch.mv(w0, c[:, 0]) if bias is None else torch.addmv(bias, w0, c[:, 0])
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.adapted()
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        layer = self.base_layer
        weight, bias = self.adapted()
        self._stash = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
        layer.weight.copy_(weight)
        if bias is not None:
            if layer.bias is None:
                layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            else:
                layer.bias.copy_(bias)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        layer = self.base_layer
        weight, bias = self._stash
        layer.weight.copy_(weight)
        if bias is None:
            layer.bias = None
        else:
            layer.bias.copy_(bias)
        self._stash = None


@register
class GLoRA(Method):
    name = "glora"
    family = "unified"
    paper = "Chavan et al., One-for-All: Generalized LoRA, 2023 (arXiv 2306.07967)"
    backbones = ("vit", "swin")
    mergeable = True
    config_class = GLoRAConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: GLoRAConfig) -> None:
        for block in anatomy.blocks:
            for role in config.targets:
                name = getattr(block, role)
                layer = model.get_submodule(name) if name else None
                if not isinstance(layer, nn.Linear):
                    raise UnsupportedBackboneError(
                        f"glora: block {block.name} of {anatomy.architecture} has no Linear '{role}'"
                    )
                replace_module(model, name, GLoRALinear(layer, config))
