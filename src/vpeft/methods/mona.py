"""Mona: multi-cognitive visual adapters after the attention and the MLP sub-blocks.

Yin et al., "5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition
Tasks" (Mona), CVPR 2025. After each sub-block the residual stream y passes
y <- y + up(dropout(gelu(MonaOp(down(LN'(y)))))), where LN'(y) = gamma * LN(y) + gamma_x * y
(gamma = 1e-6, gamma_x = 1 at init), down is d -> 64, and MonaOp averages depth-wise 3x3, 5x5 and
7x7 convolutions over the patch-token grid (plus a skip), then adds a 1x1 projection. Class and
register tokens skip the convolutions. Init as the official code leaves it (Leiyi-Hu/mona): its
backbone's ``init_weights`` sets every Linear, Mona's two projections included, to trunc-normal
(std 0.02, timm's cut at +-2) with zero bias before loading the checkpoint, which holds no Mona
weights; the convolutions keep PyTorch's default init. So the model is not unchanged at step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, register, replace_module
from vpeft.modules import InputTap, Stash, first_param, matmul_dtype

#: the depth-wise kernel sizes MonaOp averages
KERNELS = (3, 5, 7)


@dataclass
class MonaConfig(MethodConfig):
    hidden: int = option(64, "width of the adapter (the paper's 64)")
    dropout: float = option(0.1, "dropout before the up-projection")

    def validate(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"mona: hidden must be >= 1, got {self.hidden}")


class _MonaDown(torch.autograd.Function):
    """z = down(gamma * LN(y) + gamma_x * y) on rows of ``y``, LN with affine (weight w, bias b).

    Forward: one norm kernel whose affine is (w gamma, b gamma), one kernel adding gamma_x * y that writes h
    straight in the matmul dtype (no separate cast), one matmul. Backward: the norm's own backward kernel
    (input, w gamma and b gamma gradients), the gamma_x term added in place, dL/d gamma_x from a narrow
    product (rows of (g^T y) . W_down), so no activation-sized pass beyond those two; saved: y, the norm's
    statistics and h in the matmul dtype."""

    @staticmethod
    def forward(ctx, y, weight, bias, gamma, gamma_x, down_weight, down_bias, eps, dtype):
        scale, shift = weight * gamma, bias * gamma
        ln, mean, rstd = torch.native_layer_norm(y, (y.shape[-1],), scale, shift, eps)
        h = torch.addcmul(ln, y, gamma_x, out=torch.empty(y.shape, dtype=dtype, device=y.device))
        z = torch.addmm(down_bias.to(dtype), h, down_weight.to(dtype).t())
        ctx.save_for_backward(y, mean, rstd, h, weight, bias, gamma, gamma_x, down_weight, scale, shift)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # the dtypes below are chosen, not autocast's
            return _MonaDown._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        y, mean, rstd, h, weight, bias, gamma, gamma_x, down_weight, scale, shift = ctx.saved_tensors
        need = ctx.needs_input_grad
        wide = grad.to(y.dtype)  # narrow: r columns
        grads: list[torch.Tensor | None] = [None] * 9
        grad_h = torch.mm(wide, down_weight.to(y.dtype))
        mask = [need[0], need[1] or need[3], need[2] or need[3]]
        grad_y, grad_scale, grad_shift = torch.ops.aten.native_layer_norm_backward(
            grad_h, y, (y.shape[-1],), mean, rstd, scale, shift, mask
        )
        if need[0]:
            grads[0] = grad_y.addcmul_(grad_h, gamma_x)
        if need[1]:
            grads[1] = grad_scale * gamma
        if need[2]:
            grads[2] = grad_shift * gamma
        if need[3]:
            grads[3] = (grad_scale * weight).addcmul_(grad_shift, bias)
        if need[4]:  # sum_t (g_t W_down) * y_t, from the narrow product g^T y
            grads[4] = (torch.mm(wide.t(), y) * down_weight).sum(0)
        if need[5]:
            grads[5] = torch.mm(grad.to(h.dtype).t(), h).to(down_weight.dtype)
        if need[6]:
            grads[6] = wide.sum(0)
        return tuple(grads)


class MonaBranch(nn.Module):
    """delta(y) of one Mona layer: the adapter's output before it is added to y.

    Speed (GPU first), each step exact: LN'(y) is one norm kernel (gamma folded into its affine) and one
    kernel adding gamma_x y that writes the matmul dtype (:class:`_MonaDown`); the three depth-wise
    convolutions, their average and the skip are one depth-wise convolution with the averaged kernel plus a
    one-hot centre, the projector and its skip one 1x1 convolution with weight P + I, which also takes the
    depth-wise bias (conv is linear); the weights are folded per step in their own dtype (weight-sized
    work). The up-projection's output is added to the sub-block's as a plain add: Mona is launch-bound on
    a GPU, and fusing that add into the matmul (a ones column on its input) costs more ops than the pass."""

    def __init__(self, dim: int, config: MonaConfig, prefix: int, grid: tuple[int, int], like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        r = config.hidden
        self.prefix, self.grid = prefix, grid
        self.norm = nn.LayerNorm(dim, **kw)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6, **kw))
        self.gamma_x = nn.Parameter(torch.ones(dim, **kw))
        self.down = nn.Linear(dim, r, **kw)
        self.dw = nn.ModuleList([nn.Conv2d(r, r, k, padding=k // 2, groups=r, **kw) for k in KERNELS])
        self.projector = nn.Conv2d(r, r, 1, **kw)
        # constants of the folded convolutions (not saved): the one-hot centre of the largest kernel, and I
        size = max(KERNELS)
        centre = torch.zeros(r, 1, size, size, **kw)
        centre[:, :, size // 2, size // 2] = 1
        self.register_buffer("centre", centre, persistent=False)
        self.register_buffer("eye", torch.eye(r, **kw)[:, :, None, None], persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.Linear(r, dim, **kw)
        for proj in (self.down, self.up):
            nn.init.trunc_normal_(proj.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(proj.bias)

    def _down(self, y: torch.Tensor) -> torch.Tensor:
        """down(gamma * LN(y) + gamma_x * y)."""
        norm, down = self.norm, self.down
        flat = y.reshape(-1, y.shape[-1])
        z = _MonaDown.apply(
            flat, norm.weight, norm.bias, self.gamma, self.gamma_x, down.weight, down.bias, norm.eps, matmul_dtype(y)
        )
        return z.view(*y.shape[:-1], z.shape[-1])

    def _folded_convs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MonaOp's convolutions as two: (depth-wise kernel, 1x1 weight, 1x1 bias), all exact.

        (K3 * g + K5 * g + K7 * g) / 3 + g, with bias b3 + b5 + b7 over 3, is one depth-wise convolution with
        the zero-padded kernels averaged plus a one-hot centre; g1 + P g1 + p is the 1x1 convolution P + I,
        which also takes the depth-wise bias: (P + I)(K * g + k) + p = (P + I)(K * g) + (p + (P + I) k)."""
        size = max(KERNELS)
        kernel = None
        for conv, k in zip(self.dw, KERNELS, strict=True):
            w = conv.weight if k == size else F.pad(conv.weight, [(size - k) // 2] * 4)
            kernel = w if kernel is None else kernel + w
        kernel = torch.add(self.centre, kernel, alpha=1 / len(KERNELS))
        proj = self.projector.weight + self.eye
        dw_bias = None
        for conv in self.dw:
            dw_bias = conv.bias if dw_bias is None else dw_bias + conv.bias
        bias = torch.addmv(self.projector.bias, proj.flatten(1), dw_bias, alpha=1 / len(KERNELS))
        return kernel, proj, bias

    def _mona_op(self, z: torch.Tensor) -> torch.Tensor:
        b, n, r = z.shape
        p = self.prefix
        gh, gw = self.grid if (n - p) == self.grid[0] * self.grid[1] else (math.isqrt(n - p),) * 2
        prefix, patches = z.split([p, n - p], dim=1) if p else (None, z)
        grid = patches.transpose(1, 2).reshape(b, r, gh, gw)  # a channels-last view of the tokens
        with torch.autocast(z.device.type, enabled=False):  # weight-sized folding, in the weights' dtype
            kernel, proj, bias = self._folded_convs()
        grid = F.conv2d(grid, kernel, None, padding=kernel.shape[-1] // 2, groups=r)
        tokens = F.conv2d(grid, proj, bias).flatten(2).transpose(1, 2)
        return tokens if prefix is None else torch.cat([prefix, tokens.to(prefix.dtype)], dim=1)

    def hidden(self, y: torch.Tensor) -> torch.Tensor:
        """dropout(gelu(MonaOp(down(LN'(y))))): the up-projection's input."""
        return self.dropout(F.gelu(self._mona_op(self._down(y))))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(self.hidden(y))

    def add_to(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """out + delta(y)."""
        return out + self.up(self.hidden(y))


class MonaAfter(BaseLayerWrapper):
    """A sub-block f whose residual output is followed by Mona: f(n(x)) + delta(x + f(n(x)))."""

    def __init__(self, base_layer: nn.Module, branch: MonaBranch, stash: Stash):
        super().__init__(base_layer)
        self.branch, self.stash = branch, stash

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(h, *args, **kwargs)
        x = self.stash.take(out.shape, "mona")
        return self.branch.add_to(out, x + out)


@register
class Mona(Method):
    name = "mona"
    family = "addition/adapter"
    paper = "Yin et al., Mona (5%>100%), CVPR 2025 (arXiv 2408.08345)"
    requires = frozenset({"tokens", "token_grid_2d", "attention", "mlp"})
    config_class = MonaConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: MonaConfig) -> None:
        grid = tuple(model.patch_embed.grid_size)
        for block in anatomy.blocks:
            for norm, role in ((block.norm1, block.attn), (block.norm2, block.mlp)):
                stash = Stash()
                replace_module(model, norm, InputTap(model.get_submodule(norm), stash))
                base = model.get_submodule(role)
                branch = MonaBranch(block.dim, config, anatomy.num_prefix_tokens, grid, first_param(base))
                replace_module(model, role, MonaAfter(base, branch, stash))
