"""Small building blocks shared by several methods."""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class Bottleneck(nn.Module):
    """down-projection -> activation -> up-projection, with the up-projection at zero.

    The down-projection keeps a Linear layer's random (Kaiming-uniform) init: with both at zero
    only the last bias could learn, the pitfall of several published adapter implementations.
    """

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", dropout: float = 0.0, *, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(dim, bottleneck, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class Stash:
    """Carries a sub-block's input (the residual stream before its norm) to a wrapper of that sub-block."""

    tensor: torch.Tensor | None = None

    def take(self, shape: torch.Size, method: str) -> torch.Tensor:
        x, self.tensor = self.tensor, None
        if x is None or x.shape != shape:
            raise RuntimeError(
                f"{method}: the sub-block ran without its norm first; this block layout is not supported"
            )
        return x


class InputTap(nn.Module):
    """Wraps the norm before a sub-block and records the norm's input (the residual stream)."""

    def __init__(self, base_layer: nn.Module, stash: Stash):
        super().__init__()
        self.base_layer = base_layer
        self.stash = stash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stash.tensor = x
        return self.base_layer(x)


def first_param(module: nn.Module) -> torch.Tensor:
    """A parameter of ``module`` to take device and dtype from."""
    return next(module.parameters())
