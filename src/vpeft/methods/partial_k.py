"""Partial-k: fine-tune the last k blocks and every layer after them, freeze the rest.

"After" follows the model's parameter order, which in timm is the forward order: the final
norms of a ViT, Swin's patch-merging layers between late stages, a CNN's last conv and norm.

Yosinski et al., "How transferable are features in deep neural networks?", NeurIPS 2014;
used as "Partial-1" in VPT (Jia et al., ECCV 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import Method, MethodConfig, PrefixSplit, register, token_embedding


@dataclass
class PartialKConfig(MethodConfig):
    k: int = option(1, "number of final blocks to fine-tune")

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"partial_k: k must be >= 1, got {self.k}")


@register
class PartialK(Method):
    name = "partial_k"
    family = "partial/specification"
    paper = "Yosinski et al., NeurIPS 2014; Partial-1 in VPT, ECCV 2022 (arXiv 2203.12119)"
    requires = frozenset({"blocks"})
    mergeable = True  # the trained parameters are the backbone's own
    config_class = PartialKConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: PartialKConfig) -> None:
        if config.k > anatomy.depth:
            raise ConfigError(f"partial_k: k={config.k} exceeds the {anatomy.depth} blocks of {anatomy.architecture}")
        first = anatomy.blocks[-config.k].name + "."
        started = False
        for name, param in model.named_parameters():
            started = started or name.startswith(first)
            if started:
                param.requires_grad_(True)

    def cached_prefix(self, model: nn.Module, anatomy: Anatomy, config: PartialKConfig) -> PrefixSplit | None:
        """On a token backbone: the embedding and the frozen blocks are the prefix."""
        embedding = token_embedding(model, anatomy)
        if embedding is None or len(anatomy.heads) != 1:
            return None
        embed, modules = embedding
        split = len(model.blocks) - config.k
        frozen = model.blocks[:split]

        def prefix(x):
            return frozen(embed(x))

        def suffix(h):
            return model.forward_head(model.norm(model.blocks[split:](h)))

        return PrefixSplit(prefix, suffix, [*modules, frozen])
