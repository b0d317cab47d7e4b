"""E3VA: low-rank adapters on a gradient highway beside the frozen blocks; no backward through the backbone.

Yin et al., "Parameter-efficient is not sufficient: Exploring Parameter, Memory, and Time Efficient
Adapter Tuning for Dense Predictions", ACM MM 2024 (arXiv 2306.09729). No code was released;
vpeft's version follows the paper's description (its Figure 2: "a highway parallel to SwinBlock for
the trainable adapters ... intermediate activations from W/SA-MSA and MLP are sent to E3VA;
downsampling layers are added in the highway and are inherited from the backbone; the highway is
integrated ... with trainable norm").

Every block runs under ``torch.no_grad`` on the backbone's own stream x (it never sees the highway),
so no block builds an autograd graph. Its attention-branch output a = x_mid - x and MLP-branch
output m = out - x_mid (x_mid: the stream between the two sub-blocks) feed two parallel adapters,
whose sum grows the highway: h <- h + A_attn(a) + A_mlp(m). Each block hands on out + h, and the
next block reads the backbone's x and h back from the shared state, so every block output (and so
every Swin stage output a dense head reads) carries the highway while the blocks never do. At a
Swin stage boundary the stage's frozen patch merging M carries the highway down:
h <- M(x + h) - M(x) (gradients flow through M to h; M's weights stay frozen).

Each adapter is LoRand's (same authors): z -> W_up(GELU(W_down z)), hidden width dim / 2, each W a
sum of ``branches`` low-rank products P_i K_i Q_i (the paper's "dual low-rank structure"), the two
layers sharing their kernels as LoRand's default. The backbone's final norm, where the highway
joins the output, trains (``train_norm``; the paper: "integrated to the FPN with trainable norm").
With the defaults the count on Swin-B is 1,197,312 + 2,048 = 1,199,360, the published 1.20M.

Inferred (the paper text available to us does not fix them): the adapters read the branch outputs
(not their inputs); the adapter is LoRand's layer with its default sizes; the highway starts at zero
and crosses a stage boundary as M(x + h) - M(x) (the paper: "downsampling inherited from the
backbone"); the trainable norm is the backbone's final one (a dense model's per-stage output norms
are its neck's, trained with it). Init ``kaiming`` (LoRand's) is not the identity at step 0;
``zero_up`` is. Applies to Swin (the paper) and to ViT (one stage, no downsampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, register, replace_module
from vpeft.methods.lorand import LoRandBottleneck, LoRandConfig
from vpeft.modules import InputTap, Stash, first_param


@dataclass
class E3VAConfig(LoRandConfig):
    train_norm: bool = option(True, "train the backbone's final norm(s), where the highway joins the output")


class _Highway:
    """What one forward pass hands from block to block: the backbone's stream, the highway, and their sum."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.backbone: torch.Tensor | None = None
        self.highway: torch.Tensor | None = None
        self.output: torch.Tensor | None = None  # backbone + highway, the tensor last handed on

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(backbone stream, highway) for an input: ours if ``x`` is what we handed on, else a fresh pass."""
        if self.output is not None and x is self.output:
            return self.backbone, self.highway
        return x.detach(), None

    def hand_on(self, backbone: torch.Tensor, highway: torch.Tensor, output: torch.Tensor, last: bool) -> None:
        if last:
            self.clear()
        else:
            self.backbone, self.highway, self.output = backbone, highway, output


class E3VABlock(BaseLayerWrapper):
    """A frozen block run without autograd; its two branch outputs feed the highway's adapters."""

    def __init__(self, base_layer: nn.Module, norm2: str, dim: int, config: E3VAConfig, path: _Highway, last: bool):
        super().__init__(base_layer)
        like = first_param(base_layer)
        self.attn_adapter = LoRandBottleneck(dim, config, like=like)
        self.mlp_adapter = LoRandBottleneck(dim, config, like=like)
        self.stash = Stash()
        replace_module(base_layer, norm2, InputTap(base_layer.get_submodule(norm2), self.stash))
        self.path, self.last = path, last

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        xb, h = self.path.take(x)
        with torch.no_grad():
            out = self.base_layer(xb, *args, **kwargs)
            mid = self.stash.tensor
            self.stash.tensor = None
            if mid is None or mid.numel() != out.numel():
                raise RuntimeError("e3va: the block ran without its second norm; this block layout is not supported")
            mid = mid.reshape(out.shape)
            attn_out, mlp_out = mid - xb, out - mid
        h = self.attn_adapter(attn_out) if h is None else self.attn_adapter.add_to(h, attn_out)
        h = self.mlp_adapter.add_to(h, mlp_out)
        combined = out + h
        self.path.hand_on(out, h, combined, self.last)
        return combined


class E3VADownsample(BaseLayerWrapper):
    """A stage's frozen patch merging M; carries the highway down as M(x + h) - M(x)."""

    def __init__(self, base_layer: nn.Module, path: _Highway):
        super().__init__(base_layer)
        self.path = path

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        xb, h = self.path.take(y)
        if h is None:
            return self.base_layer(y)
        with torch.no_grad():
            down = self.base_layer(xb)
        combined = self.base_layer(y)
        self.path.hand_on(down, combined - down, combined, last=False)
        return combined


def _downsample_of(model: nn.Module, block_name: str) -> str | None:
    """The patch merging at the start of a Swin block's stage (``layers.<s>.downsample``), if it has one."""
    stage = block_name.rsplit(".blocks.", 1)[0]
    name = f"{stage}.downsample"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return None if isinstance(module, nn.Identity) else name


@register
class E3VA(Method):
    name = "e3va"
    family = "addition/side"
    paper = (
        "Yin et al., Parameter-efficient is not sufficient: Exploring Parameter, Memory, and Time Efficient "
        "Adapter Tuning for Dense Predictions, ACM MM 2024 (arXiv 2306.09729)"
    )
    requires = frozenset({"attention", "mlp"})
    config_class = E3VAConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: E3VAConfig) -> None:
        path = _Highway()
        last = len(anatomy.blocks) - 1
        for i, block in enumerate(anatomy.blocks):
            if block.norm2 is None or block.mlp is None:
                raise ConfigError(f"e3va: block {block.name} has no norm before its MLP; E3VA needs both branches")
            module = model.get_submodule(block.name)
            norm2 = block.norm2[len(block.name) + 1 :]
            if "stages" in anatomy.parts and block.name.endswith(".blocks.0"):
                down = _downsample_of(model, block.name)
                if down is not None:
                    replace_module(model, down, E3VADownsample(model.get_submodule(down), path))
            replace_module(model, block.name, E3VABlock(module, norm2, block.dim, config, path, i == last))
        if config.train_norm:
            for name in anatomy.final_norms:
                for param in model.get_submodule(name).parameters():
                    param.requires_grad_(True)
