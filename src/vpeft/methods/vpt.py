"""Visual Prompt Tuning: learnable prompt tokens in the token sequence of a ViT.

Jia et al., "Visual Prompt Tuning", ECCV 2022. Prompts are placed after the class, distillation
and register tokens and before the patch tokens, without position embeddings. VPT-shallow
inserts them before the first block; VPT-deep gives every block its own prompts, replacing the
previous block's prompt outputs. The prompts are removed after the last block, so the model's
own pooling (class token, average of patch tokens, attention pooling) sees its usual tokens.
Init: uniform(-v, v), v = sqrt(6 / (3 * patch_area + dim)), the paper's Xavier variant. Prompt
dropout defaults to 0.0, the official config's value (KMnP/vpt, MODEL.PROMPT.DROPOUT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.methods.prompts import prompt_init_bound
from vpeft.modules import first_param


@dataclass
class VPTShallowConfig(MethodConfig):
    num_tokens: int = option(100, "number of prompt tokens (VPT searched 1-200 per task; 100 ~ V-PETL's 0.08M)")
    dropout: float = option(
        0.0,
        "dropout on the prompt embeddings (the official config's default, 0.0; VPT's demo sets 0.1 in its "
        "VPT-deep reproduction runs)",
    )

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"{self.method}: num_tokens must be >= 1, got {self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")


@dataclass
class VPTDeepConfig(VPTShallowConfig):
    num_tokens: int = option(50, "prompt tokens per block (VPT searched 1-200 per task; 50 = 0.46M on ViT-B)")


class PromptedBlock(BaseLayerWrapper):
    """A transformer block that inserts, replaces or strips prompt tokens around the base block."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        offset: int,
        num_tokens: int,
        dim: int,
        init_bound: float,
        learn: bool,
        insert: bool,
        strip: bool,
        dropout: float,
    ):
        super().__init__(base_layer)
        self.offset, self.num_tokens, self.insert, self.strip = offset, num_tokens, insert, strip
        if learn:
            ref = first_param(base_layer)
            prompt = torch.empty(1, num_tokens, dim, device=ref.device, dtype=ref.dtype)
            nn.init.uniform_(prompt, -init_bound, init_bound)
            self.prompt = nn.Parameter(prompt)
        else:
            self.register_parameter("prompt", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        o, n = self.offset, self.num_tokens
        if self.prompt is not None:
            prompt = self.dropout(self.prompt.expand(x.shape[0], -1, -1))
            rest = x[:, o:] if self.insert else x[:, o + n :]
            x = torch.cat([x[:, :o], prompt, rest], dim=1)
        x = self.base_layer(x, *args, **kwargs)
        if self.strip:
            x = torch.cat([x[:, :o], x[:, o + n :]], dim=1)
        return x


class _VPT(Method):
    family = "addition/prompt"
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022 (arXiv 2203.12119)"
    requires = frozenset({"tokens", "isotropic"})
    deep = False

    def inject(self, model: nn.Module, anatomy: Anatomy, config: VPTShallowConfig) -> None:
        bound = prompt_init_bound(anatomy)
        last = anatomy.depth - 1
        for i, block in enumerate(anatomy.blocks):
            wrapper = PromptedBlock(
                model.get_submodule(block.name),
                offset=anatomy.num_prefix_tokens,
                num_tokens=config.num_tokens,
                dim=anatomy.embed_dim,
                init_bound=bound,
                learn=self.deep or i == 0,
                insert=i == 0,
                strip=i == last,
                dropout=config.dropout,
            )
            replace_module(model, block.name, wrapper)


@register
class VPTShallow(_VPT):
    name = "vpt_shallow"
    config_class = VPTShallowConfig


@register
class VPTDeep(_VPT):
    name = "vpt_deep"
    deep = True
    config_class = VPTDeepConfig
