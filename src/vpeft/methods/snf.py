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
of K full-width passes; the sequential part is K steps on (tokens x K) tensors.

Not mergeable: the affine part scales the identity shortcut, which has no weight to fold into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.anatomy import Anatomy
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
        coupling = self.weight @ self.scale.t()  # G[j, k] = w_j . u_k
        steps = []
        for k in range(pre.shape[1]):
            t = torch.tanh(pre[:, k])
            steps.append(t)
            if k + 1 < pre.shape[1]:
                pre = torch.addr(pre, t, coupling[:, k].to(t.dtype))  # later steps see u_k t_k
        t = F.pad(torch.stack(steps, dim=1), (0, 1), value=1.0)  # the ones column carries mu
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
    backbones = ("vit",)
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
