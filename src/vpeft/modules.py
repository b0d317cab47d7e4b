"""Small building blocks shared by several methods."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


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

    def add_to(self, out: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """out + scale * self(x), the add and the scale fused into the up-projection's matmul."""
        return add_linear(out, self.dropout(self.act(self.down(x))), self.up.weight, self.up.bias, scale)


def add_linear(
    out: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float = 1.0,
    bias_column: float = 1.0,
) -> torch.Tensor:
    """out + alpha * (z W^T + bias_column * b) as one matmul (``addmm``) for a narrow ``z``.

    The full-width ``out`` sees no elementwise pass (the scale is the matmul's alpha, the add its
    epilogue); the bias rides on a constant column appended to ``z``, a copy of the narrow ``z`` only."""
    if bias is not None:
        z = nn.functional.pad(z, (0, 1), value=bias_column)
        weight = torch.cat([weight, bias[:, None]], dim=1)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), weight.t(), alpha=alpha)
    return flat.view(out.shape)


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


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for ``x``'s device, else ``x``'s.

    Casting ``x`` once to it lets several matmuls share the cast (autocast casts per call)."""
    device = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def first_param(module: nn.Module) -> torch.Tensor:
    """A parameter of ``module`` to take device and dtype from."""
    return next(module.parameters())
