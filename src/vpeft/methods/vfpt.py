"""VFPT: Visual Fourier Prompt Tuning, VPT-deep whose first prompts pass through a 2-D FFT.

Zeng et al., "Visual Fourier Prompt Tuning", NeurIPS 2024 (runtsang/VFPT,
``src/models/vit_prompt/vit_fourier.py``). Every block gets its own prompts as in VPT-deep; of each
block's n prompts, the first floor(alpha n) are replaced by Re(FFT_seq(FFT_hidden(P_f))), the FFT over
the hidden dimension then over those prompts (the code's defaults: ``FOURIER_DIMENSION: all``,
``FOURIER_LOCATION: prepend``, ``FOURIER_PERCENTAGE: 0.5``, the first layer included). Layout, init
and removal after the last block are VPT's (:mod:`vpeft.methods.vpt`); not the identity at step 0.
The FFT runs once per block on the (prompts x d) parameter, in float32, and is broadcast over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import Method, register, replace_module
from vpeft.methods.prompts import prompt_init_bound
from vpeft.methods.vpt import PromptedBlock, VPTDeepConfig


@dataclass
class VFPTConfig(VPTDeepConfig):
    fourier_fraction: float = option(
        0.5, "alpha: the fraction of each block's prompts passed through the 2-D FFT (the code's default 0.5)"
    )

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.fourier_fraction <= 1.0:
            raise ConfigError(f"vfpt: fourier_fraction must be in [0, 1], got {self.fourier_fraction}")


def fourier(p: torch.Tensor) -> torch.Tensor:
    """Re(FFT over the tokens of FFT over the hidden dimension), in float32 (FFTs have no bfloat16 kernels)."""
    return torch.fft.fft2(p.float(), dim=(-2, -1)).real.to(p.dtype)


class FourierPromptedBlock(PromptedBlock):
    """VPT-deep's prompted block; the first ``num_fourier`` prompts enter through :func:`fourier`."""

    def __init__(self, base_layer: nn.Module, *, num_fourier: int, **kwargs: Any):
        super().__init__(base_layer, **kwargs)
        self.num_fourier = num_fourier

    def prompts(self, batch: int) -> torch.Tensor:
        """The prompt tokens this block inserts, (batch, n, d): dropout first, then the FFT (the code's order)."""
        p, f = self.prompt, self.num_fourier
        if isinstance(self.dropout, nn.Dropout) and self.training:
            p = self.dropout(p.expand(batch, -1, -1))
            return torch.cat([fourier(p[:, :f]), p[:, f:]], dim=1) if f else p
        if f:
            p = torch.cat([fourier(p[:, :f]), p[:, f:]], dim=1)
        return p.expand(batch, -1, -1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        o, n = self.offset, self.num_tokens
        rest = x[:, o:] if self.insert else x[:, o + n :]
        x = torch.cat([x[:, :o], self.prompts(x.shape[0]).to(x.dtype), rest], dim=1)
        x = self.base_layer(x, *args, **kwargs)
        if self.strip:
            x = torch.cat([x[:, :o], x[:, o + n :]], dim=1)
        return x


@register
class VFPT(Method):
    name = "vfpt"
    family = "addition/prompt"
    paper = "Zeng et al., Visual Fourier Prompt Tuning, NeurIPS 2024 (arXiv 2411.01327)"
    requires = frozenset({"tokens", "isotropic"})
    config_class = VFPTConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: VFPTConfig) -> None:
        bound = prompt_init_bound(anatomy)
        last = anatomy.depth - 1
        for i, block in enumerate(anatomy.blocks):
            wrapper = FourierPromptedBlock(
                model.get_submodule(block.name),
                num_fourier=math.floor(config.num_tokens * config.fourier_fraction),
                offset=anatomy.num_prefix_tokens,
                num_tokens=config.num_tokens,
                dim=anatomy.embed_dim,
                init_bound=bound,
                learn=True,
                insert=i == 0,
                strip=i == last,
                dropout=config.dropout,
            )
            replace_module(model, block.name, wrapper)
