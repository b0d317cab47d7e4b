"""E2VPT: key-value prompts in every attention plus visual prompts in every block's input.

Han et al., "E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023
(ChengHan111/E2VPT, ``vit_prompt_VK.py``, ``vit_changeVK.py``). Every attention attends over
[P_kv; K] and [P_kv; V], P_kv learnable per layer and head (the code's defaults: 5 tokens, one tensor
shared by keys and values, Kaiming-uniform init, prompts before the layer's own tokens); every block
also gets VPT-deep visual prompts (5 tokens, VPT's layout and init, :mod:`vpeft.methods.vpt`).
Not the identity at step 0.

Not built: the paper's second stage, token-wise and segment-wise pruning of the visual prompts
with rewinding, which reads training data (the code's learnable token masks belong to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import Method, MethodConfig, register, replace_module
from vpeft.methods.prefix import PrefixAttention
from vpeft.methods.vpt import PromptedBlock

ROOT = "vpeft_e2vpt"


@dataclass
class E2VPTConfig(MethodConfig):
    kv_tokens: int = option(5, "key-value prompts per attention layer (the code's P_VK.NUM_TOKENS)")
    visual_tokens: int = option(5, "visual prompts per block (the code's NUM_TOKENS_P); 0 for key-value prompts only")
    share_kv: bool = option(True, "one prompt tensor serves as keys and values (the code's SHARE_PARAM_KV)")
    dropout: float = option(0.0, "dropout on the visual and on the key-value prompts")

    def validate(self) -> None:
        if self.kv_tokens < 1 or self.visual_tokens < 0:
            raise ConfigError(
                f"e2vpt: kv_tokens must be >= 1 and visual_tokens >= 0, got {self.kv_tokens}, {self.visual_tokens}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"e2vpt: dropout must be in [0, 1), got {self.dropout}")


class KVPromptBank(nn.Module):
    """Every layer's key-value prompts, (heads, tokens, head_dim) each, handed to the attention as (tokens, d)."""

    def __init__(self, depth: int, heads: int, head_dim: int, config: E2VPTConfig, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        bound = math.sqrt(6.0 / (config.kv_tokens * head_dim))  # kaiming_uniform_ (a=0, fan_in) on that shape

        def prompts() -> nn.ParameterList:
            shape = (heads, config.kv_tokens, head_dim)
            return nn.ParameterList(
                [nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound)) for _ in range(depth)]
            )

        self.keys = prompts()
        self.values = None if config.share_kv else prompts()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @staticmethod
    def _flat(p: torch.Tensor) -> torch.Tensor:
        return p.transpose(0, 1).reshape(p.shape[1], -1)  # (tokens, heads * head_dim)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.dropout(self._flat(self.keys[index]))
        v = k if self.values is None else self.dropout(self._flat(self.values[index]))
        return k, v


@register
class E2VPT(Method):
    name = "e2vpt"
    family = "addition/prompt"
    paper = "Han et al., E2VPT, ICCV 2023 (arXiv 2307.13770)"
    backbones = ("vit",)
    config_class = E2VPTConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: E2VPTConfig) -> None:
        from timm.layers import Attention

        attns = [model.get_submodule(b.attn) for b in anatomy.blocks]
        for attn in attns:
            if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
                raise UnsupportedBackboneError(f"e2vpt: supports timm's standard Attention, not {type(attn).__name__}")
        bank = KVPromptBank(anatomy.depth, attns[0].num_heads, attns[0].head_dim, config, like=attns[0].qkv.weight)
        model.add_module(ROOT, bank)
        for i, (block, attn) in enumerate(zip(anatomy.blocks, attns, strict=True)):
            replace_module(model, block.attn, PrefixAttention(attn, bank, i))
        if config.visual_tokens == 0:
            return
        bound = math.sqrt(6.0 / float(3 * math.prod(anatomy.patch_size or (16, 16)) + anatomy.embed_dim))
        for i, block in enumerate(anatomy.blocks):
            wrapper = PromptedBlock(
                model.get_submodule(block.name),
                offset=anatomy.num_prefix_tokens,
                num_tokens=config.visual_tokens,
                dim=anatomy.embed_dim,
                init_bound=bound,
                learn=True,
                insert=i == 0,
                strip=i == anatomy.depth - 1,
                dropout=config.dropout,
            )
            replace_module(model, block.name, wrapper)
