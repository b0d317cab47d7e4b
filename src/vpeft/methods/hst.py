"""HST: hierarchical side-tuning. A small 4-stage pyramid network beside a ViT, steered by per-block meta tokens.

Lin et al., "Hierarchical Side-Tuning for Vision Transformers", arXiv 2310.05393 (official code:
AFeng-x/HST, ``models/vit_hsn.py`` and ``models/vit_custom_modules.py``; read to get the formulas
right, this file is written anew).

- Every ViT block gets one learnable meta token, prepended before the class token and read back after
  the block (xavier-uniform init); the next block gets its own.
- A side network of 4 stages (widths 32/48/64/72, 3 M-blocks each, 12 in all) starts from the image:
  a convolutional stem to stride 4, then a strided 3x3 convolution before each later stage (strides
  8, 16, 32). Stage s reads the ViT blocks assigned to it (3 each on a 12-block ViT) through one
  linear bridge ``T_Bridge_s`` (768 -> width): M-block k attends from its pyramid tokens to
  [LN_k(bridge(meta token)), mean of the bridged features] (cross-attention, two keys), then adds the
  block's bridged patch features, bilinearly resized to the stage's grid, and runs its MLP.
- The classifier sits on the side network: mean of the last stage's tokens -> BatchNorm1d without
  affine -> Linear(72, classes). The ViT's own final norm and head are not used.
- The LayerNorms inside the ViT blocks train too (the official ``freeze_vit``); everything else of the
  backbone is frozen. Gradients flow back through every block (the meta tokens enter each of them): HST
  saves no backward pass, unlike LST, DTL or LAST.

Not the identity at init: the side network replaces the model's output. The stem's BatchNorm2d and the
head's BatchNorm1d keep running statistics, saved with the adapter (:meth:`HST.saved_buffers`).

Speed: each block's features go through the bridge *before* the bilinear resize. Bilinear
interpolation mixes positions with weights summing to one and the bridge is affine per position, so
the two orders give the same result (up to rounding) while the resize moves 32-72 channels, not 768.

On a ViT whose depth differs from the side network's 12 blocks, side block k reads ViT block
ceil((k + 1) * depth / 12) - 1 (a 24-block ViT feeds every second block, a 2-block ViT feeds six side
blocks each); only the blocks read get a meta token.

Dense prediction: ``model.vpeft_hst.multiscale_features(images)`` returns the four stage outputs as
NCHW maps at strides 4, 8, 16 and 32, for use as a neck.
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
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import first_param

ROOT = "vpeft_hst"


@dataclass
class HSTConfig(MethodConfig):
    dims: list[int] = option([32, 48, 64, 72], "widths of the side network's stages (the official m_embed_dims)")
    heads: list[int] = option([2, 4, 8, 12], "attention heads of each stage's M-blocks (m_c_num_heads)")
    depths: list[int] = option([3, 3, 3, 3], "M-blocks per stage (m_depths); each reads one ViT block")
    mlp_ratio: float = option(4.0, "MLP ratio of the M-blocks")
    meta_tokens: int = option(1, "meta tokens prepended to each ViT block (metaG_num)")
    train_norms: bool = option(True, "train the LayerNorms inside the ViT blocks (the official freeze_vit does)")

    def validate(self) -> None:
        n = len(self.dims)
        if n < 1 or len(self.heads) != n or len(self.depths) != n:
            raise ConfigError(
                f"hst: dims, heads and depths need one entry per stage, got {self.dims}, {self.heads}, {self.depths}"
            )
        for dim, head, depth in zip(self.dims, self.heads, self.depths, strict=True):
            if dim < 1 or head < 1 or dim % head or depth < 1:
                raise ConfigError(
                    f"hst: each stage needs width divisible by its heads and depth >= 1, got width {dim}, "
                    f"heads {head}, depth {depth}"
                )
        if self.mlp_ratio <= 0 or self.meta_tokens < 1:
            raise ConfigError(
                f"hst: mlp_ratio must be > 0 and meta_tokens >= 1, got {self.mlp_ratio}, {self.meta_tokens}"
            )


def _init_side(module: nn.Module) -> None:
    """The official init of the side modules: linear trunc-normal(0.02), conv normal(sqrt(2 / fan_out)), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Downsample(nn.Module):
    """The stem (stage 1: 3x3 stride-2 conv, BatchNorm, ReLU, 2x2 stride-2 conv) or a 3x3 stride-2 conv; then LN."""

    def __init__(self, in_dim: int, dim: int, stem: bool):
        super().__init__()
        if stem:
            self.conv = nn.Sequential(
                nn.Conv2d(in_dim, dim, 3, 2, padding=1, bias=False),
                nn.BatchNorm2d(dim),
                nn.ReLU(inplace=True),
                nn.Conv2d(dim, dim, 2, 2),
            )
        else:
            self.conv = nn.Conv2d(in_dim, dim, 3, 2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.conv(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MBlock(nn.Module):
    """x += proj(attn(q = LN1(x), k, v = meta/global tokens)); x += ViT features; x += MLP(LN2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # the official separate k and v, fused: same parameters
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def attend(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(keys).view(b, keys.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, vit: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x), keys) + vit
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _Records:
    """What one forward pass collects for the side network: the image, and (meta out, patch tokens) per block."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None
        self.blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keep_maps = False
        self.maps: list[torch.Tensor] = []


class HierarchicalSideNetwork(nn.Module):
    """The side network, the meta tokens, the bridges and the classifier's BatchNorm (all at the model's root)."""

    def __init__(self, vit_dim: int, depth: int, prefix: int, config: HSTConfig, like: torch.Tensor):
        super().__init__()
        dims, total = config.dims, sum(config.depths)
        #: the stage of each side block, and the ViT block it reads
        self.stage_of = [s for s, d in enumerate(config.depths) for _ in range(d)]
        self.reads = [math.ceil((k + 1) * depth / total) - 1 for k in range(total)]
        self.read_blocks = sorted(set(self.reads))
        self.prefix, self.meta_tokens = prefix, config.meta_tokens
        self.embeds = nn.ModuleList(
            [Downsample(3 if s == 0 else dims[s - 1], dims[s], stem=s == 0) for s in range(len(dims))]
        )
        self.stages = nn.ModuleList(
            [
                nn.ModuleList([MBlock(dims[s], config.heads[s], config.mlp_ratio) for _ in range(d)])
                for s, d in enumerate(config.depths)
            ]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-6) for d in dims])
        self.bridges = nn.ModuleList([nn.Linear(vit_dim, d) for d in dims])
        self.meta_norms = nn.ModuleList([nn.LayerNorm(dims[s]) for s in self.stage_of])
        self.apply(_init_side)
        meta = torch.empty(len(self.read_blocks), config.meta_tokens, vit_dim)
        for token in meta.split(1):
            nn.init.xavier_uniform_(token)  # per block, as the official (1, n, D) parameters
        self.meta = nn.Parameter(meta)
        self.head_norm = nn.BatchNorm1d(dims[-1], affine=False, eps=1e-6)
        self.to(device=like.device, dtype=like.dtype)
        self.records = _Records()
        self._owner: list[nn.Module] = []  # the model, unregistered (a module cannot own its parent)

    def meta_for(self, block: int) -> torch.Tensor | None:
        """The meta tokens of ViT block ``block`` ([n, D]), or None for a block the side network does not read."""
        if block not in self.read_blocks:
            return None
        return self.meta[self.read_blocks.index(block)]

    def run(self, grid: tuple[int, int]) -> torch.Tensor:
        """The side network over the recorded pass; returns the pooled, normalised feature ``[B, dims[-1]]``."""
        rec = self.records
        x, rec.image = rec.image, None
        blocks, rec.blocks = rec.blocks, {}
        maps = []
        k = 0
        for s, (embed, stage) in enumerate(zip(self.embeds, self.stages, strict=True)):
            x, h, w = embed(x)
            bridge = self.bridges[s]
            for block in stage:
                meta, patches = blocks[self.reads[k]]
                b = patches.shape[0]
                feat = bridge(patches).transpose(1, 2).reshape(b, -1, *grid)  # bridge first: 768 -> width
                feat = F.interpolate(feat, size=(h, w), mode="bilinear", align_corners=False)
                feat = feat.flatten(2).transpose(1, 2)
                keys = torch.cat([self.meta_norms[k](bridge(meta)), feat.mean(1, keepdim=True)], dim=1)
                x = block(x, keys, feat)
                k += 1
            x = self.norms[s](x)
            if rec.keep_maps:
                maps.append(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
            if s + 1 < len(self.stages):
                x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        rec.maps = maps
        pooled = x.mean(1)
        norm = self.head_norm
        if norm.training and pooled.shape[0] == 1:  # a last batch of one has no batch statistics: use the running ones
            return F.batch_norm(pooled, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
        return norm(pooled)

    def multiscale_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The side network's stage outputs for ``images``: NCHW maps at strides 4, 8, 16, 32 (a dense neck)."""
        if not self._owner:
            raise ConfigError("hst: this side network is not attached to a model; apply it with vpeft.apply")
        self.records.keep_maps = True
        try:
            self._owner[0].forward_features(images)
            return self.records.maps
        finally:
            self.records.keep_maps = False
            self.records.maps = []


class HSTEmbed(BaseLayerWrapper):
    """The patch embedding; keeps the image for the side network's stem."""

    def __init__(self, base_layer: nn.Module, side: HierarchicalSideNetwork):
        super().__init__(base_layer)
        object.__setattr__(self, "side", side)  # registered once, at the model's root

    def __getattr__(self, name: str) -> Any:
        """The patch embedding's own attributes (``grid_size``, ``patch_size``, ...), which timm reads."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.side.records.image = x
        self.side.records.blocks = {}
        return self.base_layer(x, *args, **kwargs)


class HSTBlock(BaseLayerWrapper):
    """A ViT block run with its meta tokens in front; records the meta tokens' and the patches' outputs."""

    def __init__(self, base_layer: nn.Module, side: HierarchicalSideNetwork, index: int):
        super().__init__(base_layer)
        object.__setattr__(self, "side", side)
        self.index = index

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        side = self.side
        meta = side.meta_for(self.index)
        if meta is None:
            return self.base_layer(x, *args, **kwargs)
        n = meta.shape[0]
        y = self.base_layer(torch.cat([meta.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1), *args, **kwargs)
        meta_out, rest = y.split([n, y.shape[1] - n], dim=1)  # backward: one cat, not two zero-filled slices
        side.records.blocks[self.index] = (meta_out, rest[:, side.prefix :])
        return rest


class HSTNeck(BaseLayerWrapper):
    """Replaces the ViT's final norm: runs the side network and hands its pooled feature to the head.

    The feature is returned as every token of a ``[B, prefix + 1, width]`` view, so the model's own
    pooling (class token, distillation pair, average of the patch tokens) hands the head that feature."""

    def __init__(self, base_layer: nn.Module, side: HierarchicalSideNetwork, patch: tuple[int, int]):
        super().__init__(base_layer)
        object.__setattr__(self, "side", side)
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side
        image = side.records.image
        if image is None:
            raise ConfigError("hst: the side network needs the image; call the model on images, not on tokens")
        grid = (image.shape[-2] // self.patch[0], image.shape[-1] // self.patch[1])
        pooled = side.run(grid)
        return pooled.unsqueeze(1).expand(-1, side.prefix + 1, -1)


class Bypass(BaseLayerWrapper):
    """A frozen module the side network makes unused (the ViT's fc_norm): passes its input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register
class HST(Method):
    name = "hst"
    family = "addition/side"
    paper = "Lin et al., Hierarchical Side-Tuning for Vision Transformers, arXiv 2310.05393"
    requires = frozenset({"tokens", "isotropic", "token_grid_2d"})
    config_class = HSTConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: HSTConfig) -> None:
        if getattr(model, "attn_pool", None) is not None or anatomy.global_pool not in (
            "token",
            "avg",
            "max",
            "avgmax",
        ):
            raise UnsupportedBackboneError(
                f"hst: {anatomy.architecture} pools with '{anatomy.global_pool}'; HST needs a ViT pooled by class "
                "token or average (its head reads the side network's pooled feature)"
            )
        if anatomy.patch_size is None:
            raise UnsupportedBackboneError(f"hst: {anatomy.architecture} has no patch size")
        ref = first_param(model.patch_embed)
        side = HierarchicalSideNetwork(anatomy.embed_dim, anatomy.depth, anatomy.num_prefix_tokens, config, like=ref)
        model.add_module(ROOT, side)
        side._owner.append(model)
        replace_module(model, anatomy.embed, HSTEmbed(model.get_submodule(anatomy.embed), side))
        for i, block in enumerate(anatomy.blocks):
            if config.train_norms:
                for role in (block.norm1, block.norm2):
                    if role is not None:
                        for p in model.get_submodule(role).parameters():
                            p.requires_grad_(True)
            replace_module(model, block.name, HSTBlock(model.get_submodule(block.name), side, i))
        model.norm = HSTNeck(model.norm, side, anatomy.patch_size)
        if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
            model.fc_norm = Bypass(model.fc_norm)
        for head in anatomy.heads:  # the classifier reads the side network's last width
            old = model.get_submodule(head)
            if isinstance(old, nn.Linear):
                new = nn.Linear(config.dims[-1], old.out_features, device=ref.device, dtype=ref.dtype)
                _init_side(new)
                replace_module(model, head, new)

    def saved_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{ROOT}.{n}": b for n, b in model.get_submodule(ROOT).named_buffers()}
