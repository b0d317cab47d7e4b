"""LST: ladder side tuning. A small side transformer reads the frozen backbone's block outputs.

Sung et al., "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning",
NeurIPS 2022. The backbone runs without building a backward graph (its blocks run under
``torch.no_grad``); a side network of width d / reduction, one block per backbone block, takes at
block i the gated mix  mu_i * down_i(f_i) + (1 - mu_i) * s,  mu_i = sigmoid(alpha_i / T), of the
backbone feature f_i and its own state s. Its final state returns to width d through an
up-projection added to the backbone's last block output: f_L + up(LN(s)). The up-projection starts
at zero, so the model is unchanged at step 0. Side blocks are initialised randomly (the paper
prunes the backbone's weights to initialise them; not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module

ROOT = "vpeft_lst"


@dataclass
class LSTConfig(MethodConfig):
    reduction: int = option(8, "the side network's width is the backbone's divided by this")
    temperature: float = option(0.1, "T of the gates mu_i = sigmoid(alpha_i / T)")
    mlp_ratio: float = option(4.0, "MLP ratio of the side blocks")

    def validate(self) -> None:
        if self.reduction < 1 or self.temperature <= 0:
            raise ConfigError(
                f"lst: reduction must be >= 1 and temperature > 0, got {self.reduction}, {self.temperature}"
            )


class SideNetwork(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, config: LSTConfig, like: torch.Tensor):
        super().__init__()
        from timm.models.vision_transformer import Block

        kw = {"device": like.device, "dtype": like.dtype}
        side = dim // config.reduction
        if side < 1:
            raise ConfigError(f"lst: reduction {config.reduction} leaves no width of the {dim}-wide backbone")
        side_heads = heads if side % heads == 0 else 1
        self.temperature = config.temperature
        self.down = nn.ModuleList([nn.Linear(dim, side, **kw) for _ in range(depth)])
        self.blocks = nn.ModuleList(
            [Block(side, side_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True).to(**kw) for _ in range(depth)]
        )
        self.alpha = nn.Parameter(torch.zeros(depth, **kw))
        self.norm = nn.LayerNorm(side, **kw)
        self.up = nn.Linear(side, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def step(self, index: int, feature: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        down = self.down[index](feature)
        if state is None:
            mixed = down
        else:
            mu = torch.sigmoid(self.alpha[index] / self.temperature)
            mixed = mu * down + (1 - mu) * state
        return self.blocks[index](mixed)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        return self.up(self.norm(state))

    def ladder(self, features: torch.Tensor) -> torch.Tensor:
        """The last block's output after the side network, from all block outputs ``[B, depth, T, D]``.

        What the ladder blocks compute in a forward pass, for training from cached backbone features.
        """
        state = None
        for index in range(features.shape[1]):
            state = self.step(index, features[:, index], state)
        return features[:, -1] + self.output(state)


class _LadderState:
    state: torch.Tensor | None = None


class LadderBlock(BaseLayerWrapper):
    """Runs a frozen backbone block without autograd, then one step of the side network."""

    def __init__(self, base_layer: nn.Module, side: SideNetwork, index: int, last: bool, ladder: _LadderState):
        super().__init__(base_layer)
        object.__setattr__(self, "side", side)  # registered once, at the model's root
        self.index, self.last, self.ladder = index, last, ladder

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            feature = self.base_layer(x.detach(), *args, **kwargs)
        state = self.side.step(self.index, feature, None if self.index == 0 else self.ladder.state)
        if not self.last:
            self.ladder.state = state
            return feature
        self.ladder.state = None
        return feature + self.side.output(state)


@register
class LST(Method):
    name = "lst"
    family = "addition/side"
    paper = "Sung et al., LST, NeurIPS 2022 (arXiv 2206.06522)"
    backbones = ("vit",)
    config_class = LSTConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: LSTConfig) -> None:
        first = model.get_submodule(anatomy.blocks[0].name)
        heads = first.attn.num_heads
        side = SideNetwork(anatomy.depth, anatomy.embed_dim, heads, config, like=first.norm1.weight)
        model.add_module(ROOT, side)
        ladder = _LadderState()
        last = anatomy.depth - 1
        for i, block in enumerate(anatomy.blocks):
            replace_module(model, block.name, LadderBlock(model.get_submodule(block.name), side, i, i == last, ladder))
