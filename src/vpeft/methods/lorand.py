"""LoRand: adapters whose two projections are synthesised from low-rank branches.

Yin et al., "1% VS 100%: Parameter-Efficient Low Rank Adapter for Dense Predictions", CVPR 2023
(arXiv 2303.06233). No code was released with the paper; vpeft's version follows the paper's
description and the first author's later re-implementation of LoRand as a baseline
(DongshuoYin/CoLin, ``MMDetection/mmdet/models/backbones/swin_lorand.py``) and a public
reproduction from the authors' code, read, not copied.

Each projection of the adapter is a LoRand layer, W = sum_{i=1..alpha} P_i K_i Q_i + b, with
P_i (in x beta), a kernel K_i (beta x beta) and Q_i (beta x out): alpha branches of rank beta.
An adapter is h -> h + W_up(GELU(W_down h)), hidden width dim / 2. Two adapters per block, on the
attention's output and on the MLP's output, before each residual add (Houlsby's placement).
Defaults alpha = 2, beta = 8 give 1,197,312 parameters on Swin-B, the published 1.20M (COCO).

The two layers of an adapter share their kernels K_i by default (``share_kernel``): W_down =
sum_i P_i K_i Q_i, W_up = sum_i P'_i K_i Q'_i, as a public reproduction built from the authors'
code has it (and as the author's later LoRand++ shares its kernels between the projections); the
author's 2026 baseline code keeps one set per layer (``share_kernel=false``). Either way Swin-B
counts 1.20M: 1,197,312 shared, 1,203,456 not.

Init (``init="kaiming"``, the authors' code): every P_i, K_i, Q_i Kaiming-uniform (a = sqrt(5)) on
its own shape, biases U(-1/sqrt(in), 1/sqrt(in)): not the identity at step 0. ``init="zero_up"``
zeroes the up-projection's Q_i and bias instead (W_up = 0): the identity at step 0.

Inferred (not fixed by the paper text available to us): the kernel sharing above; GELU; biases on
both layers.
Differs from that code only in training: its adapter reads the attention's output after drop-path
(mmdet's window attention applies it inside), here drop-path acts on the adapted output. On Swin the
attention adapter runs on the windowed tokens, before the windows are merged back: per token, the same.

Speed: the synthesised weight is never built at full size: x [P_1 K_1 | ... | P_a K_a] is a narrow
(tokens x alpha*beta) product, then one matmul with [Q_1; ...; Q_a] (the residual add and bias as its
``addmm`` epilogue for the up-projection).
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
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import first_param

INITS = ("kaiming", "zero_up")


@dataclass
class LoRandConfig(MethodConfig):
    branches: int = option(2, "alpha: low-rank branches summed in each LoRand layer")
    kernel: int = option(8, "beta: size of each branch's kernel K_i (the branch rank)")
    ratio: float = option(0.5, "hidden width of each adapter as a fraction of the block's width")
    share_kernel: bool = option(
        True,
        "the adapter's two LoRand layers use the same kernels K_i (a reproduction from the authors' code); false: "
        "one set per layer (the first author's 2026 baseline code)",
    )
    init: str = option(
        "kaiming",
        "'kaiming': every factor Kaiming-uniform (the authors' code; not the identity at step 0); 'zero_up': "
        "the up-projection's Q_i and bias at zero (identity at step 0)",
    )

    def validate(self) -> None:
        if self.branches < 1 or self.kernel < 1:
            raise ConfigError(f"{self.method}: branches and kernel must be >= 1, got {self.branches}, {self.kernel}")
        if not 0 < self.ratio <= 4:
            raise ConfigError(f"{self.method}: ratio must be in (0, 4], got {self.ratio}")
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {list(INITS)}, got '{self.init}'")


def hidden_width(dim: int, ratio: float) -> int:
    return max(1, int(dim * ratio))


class LoRandLayer(nn.Module):
    """W = sum_i P_i K_i Q_i (in x out) and a bias: a linear layer synthesised from low-rank branches.

    Stored as the matmuls read them: ``Pt`` holds every P_i^T (beta x in), ``Kt`` every K_i^T, ``Q`` every
    Q_i, so no transpose (and no copy of a transposed gradient) happens in a step."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        branches: int,
        kernel: int,
        *,
        like: torch.Tensor,
        kernel_from: LoRandLayer | None = None,
    ):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.Pt = nn.Parameter(torch.empty(branches, kernel, fan_in, **kw))
        if kernel_from is None:
            self.Kt = nn.Parameter(torch.empty(branches, kernel, kernel, **kw))
        else:  # the other layer's kernels, not registered here (one tensor in the state_dict)
            object.__setattr__(self, "kernel_from", kernel_from)
        self.Q = nn.Parameter(torch.empty(branches, kernel, fan_out, **kw))
        self.bias = nn.Parameter(torch.empty(fan_out, **kw))
        self.reset_parameters()

    @property
    def kernels(self) -> torch.Tensor:
        """Every K_i^T: this layer's own, or the layer's it shares them with."""
        owner = self.__dict__.get("kernel_from")
        return self.Kt if owner is None else owner.Kt

    @torch.no_grad()
    def reset_parameters(self) -> None:
        own = [(self.Pt, True), (self.Q, False)] + ([(self.Kt, True)] if "kernel_from" not in self.__dict__ else [])
        for factor, transposed in own:
            for branch in factor:  # each factor Kaiming-uniform on its own 2-D shape, as the authors' code
                target = branch.t() if transposed else branch
                target.copy_(nn.init.kaiming_uniform_(torch.empty_like(target), a=math.sqrt(5)))
        bound = 1 / math.sqrt(self.Pt.shape[2])
        nn.init.uniform_(self.bias, -bound, bound)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, K, Q), each (branches, ., .): the paper's P_i (in x beta), K_i, Q_i (beta x out)."""
        return self.Pt.transpose(1, 2), self.kernels.transpose(1, 2), self.Q

    def weight(self) -> torch.Tensor:
        """The synthesised (in x out) matrix sum_i P_i K_i Q_i (for tests and inspection)."""
        return torch.einsum("aik,akl,alo->io", *self.factors())

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """x [P_1 K_1 | ... | P_a K_a]: (..., alpha * beta)."""
        left = torch.bmm(self.kernels, self.Pt)  # (a, beta, in): K_i^T P_i^T
        return F.linear(x, left.view(-1, left.shape[-1]))

    def right(self) -> torch.Tensor:
        """[Q_1; ...; Q_a]: (alpha * beta, out), a view."""
        return self.Q.view(-1, self.Q.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.narrow(x)
        out = torch.addmm(self.bias, z.reshape(-1, z.shape[-1]), self.right())
        return out.view(*z.shape[:-1], -1)


class LoRandBottleneck(nn.Module):
    """h -> W_up(GELU(W_down h)) with two LoRand layers (no residual: callers add it)."""

    def __init__(self, dim: int, config: LoRandConfig, *, like: torch.Tensor):
        super().__init__()
        hidden = hidden_width(dim, config.ratio)
        self.down = LoRandLayer(dim, hidden, config.branches, config.kernel, like=like)
        shared = self.down if config.share_kernel else None
        self.up = LoRandLayer(hidden, dim, config.branches, config.kernel, like=like, kernel_from=shared)
        if config.init == "zero_up":
            with torch.no_grad():
                self.up.Q.zero_()
                self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(h)))

    def add_to(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """out + self(h) as one ``addmm`` into ``out``: the bias rides on a constant column of the narrow product
        (as :func:`vpeft.modules.add_linear`, with the weight already in the matmul's layout)."""
        z = F.pad(self.up.narrow(F.gelu(self.down(h))), (0, 1), value=1.0)
        weight = torch.cat([self.up.right(), self.up.bias[None]], dim=0)  # (alpha * beta + 1, out)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), weight)
        return flat.view(out.shape)


class LoRandAdapter(BaseLayerWrapper):
    """Runs the wrapped sub-block (attention or MLP), then h + W_up(GELU(W_down h)) on its output h."""

    def __init__(self, base_layer: nn.Module, dim: int, config: LoRandConfig):
        super().__init__(base_layer)
        self.lorand = LoRandBottleneck(dim, config, like=first_param(base_layer))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        return self.lorand.add_to(h, h)


@register
class LoRand(Method):
    name = "lorand"
    family = "addition/adapter"
    paper = "Yin et al., 1% VS 100%: Parameter-Efficient Low Rank Adapter for Dense Predictions, CVPR 2023 (arXiv 2303.06233)"
    requires = frozenset({"attention", "mlp"})
    config_class = LoRandConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: LoRandConfig) -> None:
        for block in anatomy.blocks:
            for role in ("attn", "mlp"):
                name = getattr(block, role)
                if name is None:
                    raise ConfigError(f"lorand: block {block.name} has no {role}; LoRand needs attention and an MLP")
                replace_module(model, name, LoRandAdapter(model.get_submodule(name), block.dim, config))
