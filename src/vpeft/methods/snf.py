"""SNF: the identity shortcuts of every block become normalizing flows.

Wang et al., "Adapting Shortcut with Normalizing Flow: An Efficient Tuning Framework for Visual
Recognition", CVPR 2023 (Wang-Yaoming/SNF, ``flow.py``, ``snf.py``). In each block,
x <- f1(x) + Attn(LN1(x)) and x <- f2(x) + MLP(LN2(x)), where f = planar_K o ... o planar_1 o affine:
affine(x) = mu + exp(log_sigma) * x per channel (mu = log_sigma = 0 at first) and
planar_k(z) = z + u_k tanh(w_k . z + b_k) with u_k, w_k, b_k ~ U(-0.01, 0.01) and K = 16 flows (the
code's ``flow_length``). So the model starts close to, not exactly at, the pre-trained one. The
flows' log-det-Jacobians, which the code computes and never uses, are not computed.

Speed: the K planar steps are computed in closed form on the narrow (tokens x K) pre-activations:
with a = z0 W^T + b and G = W U^T, step k is t_k = tanh(a_k + sum_{j<k} G_kj t_j) and
f(x) = z0 + T U. The full-width tensor is read once (one matmul) and written once (the add
into the sub-block's output, fused into an ``addmm`` with mu riding on a ones column), instead
of K full-width passes; the sequential part is K steps on (tokens x K) tensors, two kernels each way
per step (:class:`PlanarChain`). Those 4K small kernels per shortcut remain: on a GPU, SNF with
K = 16 is launch-bound.

Not mergeable: the affine part scales the identity shortcut, which has no weight to fold into.
"""

from __future__ import annotations

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


@dataclass
class SNFConfig(MethodConfig):
    flow_length: int = option(16, "K, planar flows after the affine transform in each shortcut (the code's default)")
    init_bound: float = option(0.01, "planar weights, scales and biases are drawn from U(-bound, bound)")

    def validate(self) -> None:
        if self.flow_length < 0:
            raise ConfigError(f"snf: flow_length must be >= 0, got {self.flow_length}")
        if self.init_bound < 0:
            raise ConfigError(f"snf: init_bound must be >= 0, got {self.init_bound}")


class PlanarChain(torch.autograd.Function):
    """T[:, k] = tanh(pre[:, k] + sum_{j<k} G[k, j] T[:, j]) for k = 0..K-1, on narrow (tokens x K) tensors.

    Two kernels per step forward (the tanh, then one rank-1 update of every later pre-activation) and
    two backward (ds_k = (dT_k + sum_{j>k} ds_j G[j, k]) (1 - t_k^2)),
    instead of autograd's record of every step; bfloat16 inputs are computed in float32."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (pre.dtype, coupling.dtype)
        with torch.autocast(pre.device.type, enabled=False):
            dtype = torch.promote_types(pre.dtype, torch.float32)  # bfloat16 -> float32; float64 stays
            s, g = pre.to(dtype, copy=True), coupling.to(dtype)
            t = torch.empty_like(s)
            k_steps = s.shape[1]
            for k in range(k_steps):
                torch.tanh(s[:, k], out=t[:, k])
                if k + 1 < k_steps:
                    s[:, k + 1 :].addr_(t[:, k], g[k + 1 :, k])
        ctx.save_for_backward(t, g)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, g = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(t.dtype)
            slope = torch.addcmul(torch.ones_like(t), t, t, value=-1.0)  # 1 - t^2
            ds = torch.empty_like(t)
            k_steps = t.shape[1]
            for k in reversed(range(k_steps)):
                total = grad[:, k] if k + 1 == k_steps else torch.addmv(grad[:, k], ds[:, k + 1 :], g[k + 1 :, k])
                torch.mul(total, slope[:, k], out=ds[:, k])
            grad_coupling = torch.tril(ds.t() @ t, diagonal=-1)  # G[j, k] acts only for j > k
        return ds.to(ctx.dtypes[0]), grad_coupling.to(ctx.dtypes[1])


class ShortcutFlow(nn.Module):
    """f(x) = planar_K(... planar_1(mu + exp(log_sigma) * x)), added to a sub-block's output."""

    def __init__(self, dim: int, config: SNFConfig, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        k, bound = config.flow_length, config.init_bound
        self.mu = nn.Parameter(torch.zeros(dim, **kw))
        self.log_sigma = nn.Parameter(torch.zeros(dim, **kw))
        self.weight = nn.Parameter(torch.empty(k, dim, **kw).uniform_(-bound, bound))  # w_k
        self.scale = nn.Parameter(torch.empty(k, dim, **kw).uniform_(-bound, bound))  # u_k
        self.bias = nn.Parameter(torch.empty(k, **kw).uniform_(-bound, bound))  # b_k

    def add_to(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """branch + f(x), with one full-width read of x and one full-width write."""
        d = x.shape[-1]
        flat, out = x.reshape(-1, d), branch.reshape(-1, d)
        sigma = self.log_sigma.exp()
        out = torch.addcmul(out, flat, sigma.to(flat.dtype))  # branch + sigma * x (mu comes with the flows)
        if self.weight.shape[0] == 0:
            return (out + self.mu).view(branch.shape)
        # pre-activations of every step on z0 = mu + sigma * x: a = x (W sigma)^T + (W mu + b)
        pre = torch.addmm(torch.addmv(self.bias, self.weight, self.mu), flat, (self.weight * sigma).t())
        t = PlanarChain.apply(pre, self.weight @ self.scale.t())  # (tokens, K): every tanh(.) of the chain
        t = F.pad(t, (0, 1), value=1.0)  # the ones column carries mu
        flows = torch.cat([self.scale, self.mu[None]], dim=0)
        return torch.addmm(out, t, flows).view(branch.shape)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) step by step, as the official code computes it (for tests)."""
        z = self.mu + self.log_sigma.exp() * x
        for w, u, b in zip(self.weight, self.scale, self.bias, strict=True):
            z = z + u * torch.tanh(z @ w + b)[..., None]
        return z


class FlowBlock(BaseLayerWrapper):
    """A pre-norm transformer block whose two identity shortcuts are :class:`ShortcutFlow` s."""

    def __init__(self, base_layer: nn.Module, dim: int, config: SNFConfig):
        super().__init__(base_layer)
        like = first_param(base_layer)
        self.flow1 = ShortcutFlow(dim, config, like)
        self.flow2 = ShortcutFlow(dim, config, like)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        b = self.base_layer
        x = self.flow1.add_to(b.drop_path1(b.ls1(b.attn(b.norm1(x), **kwargs))), x)
        return self.flow2.add_to(b.drop_path2(b.ls2(b.mlp(b.norm2(x)))), x)


@register
class SNF(Method):
    name = "snf"
    family = "addition/adapter"
    paper = "Wang et al., Adapting Shortcut with Normalizing Flow (SNF), CVPR 2023"
    requires = frozenset({"tokens", "isotropic", "attention", "mlp"})
    config_class = SNFConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: SNFConfig) -> None:
        from timm.models.vision_transformer import Block

        for block in anatomy.blocks:
            module = model.get_submodule(block.name)
            if type(module) is not Block:
                raise UnsupportedBackboneError(
                    f"snf: rewrites the shortcuts of timm's pre-norm ViT Block, not {type(module).__name__}"
                )
            replace_module(model, block.name, FlowBlock(module, block.dim, config))
