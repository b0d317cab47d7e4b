"""SCT: salient channel tuning.

Zhao et al., "SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient Channels",
IJCV 2024. Stage (reads the training split, no gradients): a forward pass of the frozen backbone
over the training set, in evaluation mode, collecting each block's residual stream after
attention (the input of its second norm), patch tokens only. Per class, the L2 norm of every
channel over that class's samples and tokens; averaged over the classes; the ``channels`` (K)
channels with the largest average are the block's salient channels. Training: after each
attention residual, ``y[..., idx] += W y[..., idx] + b`` with a K x K Linear per block, on every
token; 12 x (96^2 + 96) = 111,744 parameters on ViT-B/16. A block narrower than K uses all its
channels.

As the official code (zhaohengyuan1/SCT: train_model_sct.py getSalientChannels,
models/vision_transformer_sct.py ChannelAdapter, tuning mode ``sct_attn``): weight trunc-normal
(std 0.02), bias zero, so the model is not unchanged at step 0 (``init=zero`` starts from the
identity). Not mergeable: the update acts on the residual stream, skip connection included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import (
    BaseLayerWrapper,
    Method,
    SelectionConfig,
    Stage,
    StageData,
    register,
    replace_module,
    stage_mode,
)
from vpeft.modules import InputTap, Stash

INITS = ("trunc_normal", "zero")


@dataclass
class SCTConfig(SelectionConfig):
    channels: int = option(96, "salient channels K per block (the official 96); a narrower block uses all its channels")
    init: str = option("trunc_normal", "the K x K weight: trunc_normal (std 0.02, official) or zero (identity)",
                       choices=INITS)  # fmt: skip
    selection: dict[str, Any] | None = option(
        None,
        "decided by the activation pass: the salient channels of every block; saved with the adapter (set it "
        "only to reuse a saved selection)",
    )

    def validate(self) -> None:
        if self.channels < 1:
            raise ConfigError(f"sct: channels must be >= 1, got {self.channels}")
        if self.init not in INITS:
            raise ConfigError(f"sct: init must be one of {', '.join(INITS)}, got '{self.init}'")


class SalientChannels(BaseLayerWrapper):
    """Wraps the last module of a block's attention branch (its drop-path): the residual y = x + branch
    gets ``y[..., idx] += linear(y[..., idx])``, returned as branch + that update. ``x`` comes from
    the tap on the block's first norm."""

    def __init__(self, base_layer: nn.Module, index: torch.Tensor, stash: Stash, init: str, like: torch.Tensor):
        super().__init__(base_layer)
        self.stash = stash
        self.register_buffer("index", index.to(like.device), persistent=False)
        k = len(index)
        self.linear = nn.Linear(k, k, device=like.device, dtype=like.dtype)
        if init == "zero":
            nn.init.zeros_(self.linear.weight)
        else:
            nn.init.trunc_normal_(self.linear.weight, std=0.02, a=-2.0, b=2.0)
        nn.init.zeros_(self.linear.bias)

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(branch)
        x = self.stash.take(out.shape, "sct")
        update = self.linear((x + out).index_select(-1, self.index))
        return out.index_add(out.ndim - 1, self.index, update)


def _drop_path_name(model: nn.Module, block: str) -> str:
    module = model.get_submodule(block)
    if not hasattr(module, "drop_path1"):
        raise UnsupportedBackboneError(f"sct: block '{block}' ({type(module).__name__}) has no attention drop-path")
    return f"{block}.drop_path1"


@register
class SCT(Method):
    name = "sct"
    family = "addition/adapter"
    paper = "Zhao et al., Salient Channel Tuning (SCT), IJCV 2024 (arXiv 2309.08513)"
    requires = frozenset({"attention", "mlp"})
    config_class = SCTConfig
    stage = Stage("activations", "train", "per-class channel norms of each block's residual stream after attention")

    @torch.no_grad()
    def prepare(self, model: nn.Module, anatomy: Anatomy, config: SCTConfig, data: StageData) -> SCTConfig:
        sums: dict[str, torch.Tensor] = {}  # block -> (classes, channels) sums of squares
        seen = torch.zeros(0, dtype=torch.long)
        labels: list[torch.Tensor] = []
        prefix = anatomy.num_prefix_tokens

        def collect(block: str):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach().double()
                x = x.flatten(1, -2)[:, prefix:]  # (batch, tokens, channels): patch tokens
                y = labels[-1]
                per_sample = x.square().sum(1)
                rows = max(int(y.max()) + 1, sums[block].shape[0] if block in sums else 0)
                acc = sums.get(block, per_sample.new_zeros(0, x.shape[-1]))
                if acc.shape[0] < rows:
                    acc = torch.cat([acc, acc.new_zeros(rows - acc.shape[0], acc.shape[1])])
                sums[block] = acc.index_add(0, y, per_sample)

            return hook

        hooks = [model.get_submodule(b.norm2).register_forward_pre_hook(collect(b.name)) for b in anatomy.blocks]
        try:
            with stage_mode(model):
                for x, y in data.batches():
                    labels.append(y.long())
                    counts = torch.bincount(y.long().cpu())
                    seen = torch.cat([seen, seen.new_zeros(max(0, len(counts) - len(seen)))])
                    seen[: len(counts)] += counts
                    model(x)
        finally:
            for h in hooks:
                h.remove()
        present = (seen > 0).nonzero().flatten()
        selection = {}
        for block in anatomy.blocks:
            score = sums[block.name].cpu()[present].sqrt().mean(0)  # mean over classes of per-class channel L2 norms
            k = min(config.channels, len(score))
            top = score.sort(descending=True, stable=True).indices[:k]
            selection[block.name] = top.sort().values.tolist()
        return replace(config, selection=selection)

    def inject(self, model: nn.Module, anatomy: Anatomy, config: SCTConfig) -> None:
        sel = config.selection
        if sel is None:
            raise ConfigError("sct: no selection; apply it with data=<training set> (vpeft.apply) or load an adapter")
        if set(sel) != {b.name for b in anatomy.blocks}:
            raise ConfigError("sct: the selection's blocks are not this model's; it was made for another backbone")
        for block in anatomy.blocks:
            index = torch.tensor(sel[block.name], dtype=torch.long)
            if len(index) != min(config.channels, block.dim) or len(set(index.tolist())) != len(index):
                raise ConfigError(
                    f"sct: block '{block.name}' needs {min(config.channels, block.dim)} distinct channels"
                )
            if index.min() < 0 or index.max() >= block.dim:
                raise ConfigError(f"sct: a channel of block '{block.name}' is outside its {block.dim} channels")
            target = _drop_path_name(model, block.name)
            stash = Stash()
            norm = model.get_submodule(block.norm1)
            replace_module(model, block.norm1, InputTap(norm, stash))
            like = next(norm.parameters())
            replace_module(model, target, SalientChannels(model.get_submodule(target), index, stash, config.init, like))
