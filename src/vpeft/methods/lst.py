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

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import (
    BaseLayerWrapper,
    Method,
    MethodConfig,
    PrefixSplit,
    register,
    replace_module,
    token_embedding,
)
from vpeft.modules import matmul_dtype

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

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """down_i(f_i) of every block in one batched matmul: ``[depth, ..., D]`` -> ``[depth, ..., side]``."""
        dtype = features.dtype
        weight = torch.stack([d.weight for d in self.down]).to(dtype)  # (depth, side, D)
        bias = torch.stack([d.bias for d in self.down]).to(dtype)
        flat = features.reshape(features.shape[0], -1, features.shape[-1])
        out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
        return out.view(*features.shape[:-1], -1)

    def run(self, downs: torch.Tensor) -> torch.Tensor:
        """The side blocks over the projected features: block i reads mu_i * down_i + (1 - mu_i) * state."""
        mus = torch.sigmoid(self.alpha / self.temperature).to(downs.dtype).unbind()  # every gate at once
        state = None
        for block, down, mu in zip(self.blocks, downs.unbind(), mus, strict=True):  # unbind: one backward op
            state = block(down if state is None else torch.lerp(state, down.to(state.dtype), mu.to(state.dtype)))
        return state

    def output(self, state: torch.Tensor) -> torch.Tensor:
        return self.up(self.norm(state))

    def ladder(self, features: torch.Tensor) -> torch.Tensor:
        """The last block's output after the side network, from all block outputs ``[B, depth, T, D]``.

        What the ladder blocks compute in a forward pass, for training from cached backbone features."""
        packed = features.new_empty(
            (features.shape[1], features.shape[0], *features.shape[2:]), dtype=matmul_dtype(features)
        )
        packed.copy_(features.transpose(0, 1))  # one copy, in the matmul's dtype
        return features[:, -1] + self.output(self.run(self.project(packed)))


class _LadderState:
    features: torch.Tensor | None = None  # every block's output so far, [depth, ...], in the matmul's dtype


class LadderBlock(BaseLayerWrapper):
    """Runs a frozen backbone block without autograd and keeps its output; the last one runs the side network.

    Every block's output goes into one buffer (already cast for the matmuls), so the side network's
    down-projections run as one batched matmul and its gates as one op, not one small op per block."""

    def __init__(self, base_layer: nn.Module, side: SideNetwork, index: int, last: bool, ladder: _LadderState):
        super().__init__(base_layer)
        object.__setattr__(self, "side", side)  # registered once, at the model's root
        self.index, self.last, self.ladder = index, last, ladder

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            feature = self.base_layer(x.detach(), *args, **kwargs)
        if self.index == 0:
            depth = len(self.side.blocks)
            self.ladder.features = feature.new_empty((depth, *feature.shape), dtype=matmul_dtype(feature))
        features = self.ladder.features
        features[self.index].copy_(feature)  # the cast the down-projection would make
        if not self.last:
            return feature
        self.ladder.features = None
        return feature + self.side.output(self.side.run(self.side.project(features)))


@register
class LST(Method):
    name = "lst"
    family = "addition/side"
    paper = "Sung et al., LST, NeurIPS 2022 (arXiv 2206.06522)"
    requires = frozenset({"tokens", "isotropic"})
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

    def cached_prefix(self, model: nn.Module, anatomy: Anatomy, config: LSTConfig) -> PrefixSplit | None:
        """The frozen backbone runs under no gradient: the cache holds every block's output, and epochs run
        only the side network, the final norm and the head."""
        embedding = token_embedding(model, anatomy)
        if embedding is None or len(anatomy.heads) != 1:
            return None
        embed, modules = embedding
        blocks = [block.base_layer for block in model.blocks]
        side = model.get_submodule(ROOT)

        def prefix(x):
            x, outputs = embed(x), []
            for block in blocks:
                x = block(x)
                outputs.append(x)
            return torch.stack(outputs, dim=1)

        def suffix(features):
            return model.forward_head(model.norm(side.ladder(features)))

        return PrefixSplit(prefix, suffix, [*modules, *blocks])
