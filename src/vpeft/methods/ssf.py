"""SSF: scale and shift the features after every linear, convolution and norm layer.

Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
NeurIPS 2022. On a ViT: after qkv, proj, fc1, fc2, both norms of every block, the patch
embedding and the final norm; y <- gamma * y + beta per channel. Because each layer before an
SSF is linear in its output, merging folds gamma and beta into its weight and bias.
The paper's code draws gamma ~ N(1, 0.02) and beta ~ N(0, 0.02); vpeft starts at the identity
(gamma = 1, beta = 0) so the model is unchanged at step 0; ``init_std=0.02`` restores the code's.

Speed: after a LayerNorm the scale and shift fold into the norm's own affine (one fused kernel, no
extra pass over the activations); after a frozen Linear the input gradient folds gamma into the
weight; elsewhere a custom backward does the minimum, two multiplies and two reductions
(autograd's addcmul backward adds two more full-size multiplies). Without autograd (inference,
unmerged) it is one plain fused multiply-add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, NotMergeableError
from vpeft.methods.base import BaseLayerWrapper, Method, MethodConfig, backbone_modules, register, replace_module
from vpeft.modules import first_param


@dataclass
class SSFConfig(MethodConfig):
    init_std: float = option(0.0, "std of the random init around gamma=1, beta=0 (0: exact identity; paper code: 0.02)")

    def validate(self) -> None:
        if self.init_std < 0:
            raise ConfigError(f"ssf: init_std must be >= 0, got {self.init_std}")


def _channel_dim(layer: nn.Module) -> int:
    """1 for channels-first layers (conv, batch norm, timm's LayerNorm2d), -1 for channels-last."""
    from timm.layers import LayerNorm2d

    return 1 if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, LayerNorm2d)) else -1


def _channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.BatchNorm2d):
        return layer.num_features
    return int(layer.normalized_shape[-1])


def _targets(model: nn.Module, anatomy: Anatomy) -> list[str]:
    from timm.layers import BatchNormAct2d

    names = []
    for name, module in backbone_modules(model, anatomy):
        if isinstance(module, BatchNormAct2d):
            continue  # the activation inside would sit between the norm and the SSF; its conv gets one
        if isinstance(module, nn.LayerNorm) and not module.elementwise_affine:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d)):
            names.append(name)
    return names


def _channel_shape(ndim: int, channel_dim: int) -> list[int]:
    """The view that broadcasts a per-channel vector over a tensor of ``ndim`` dimensions."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return shape


class _ScaleShiftFunction(torch.autograd.Function):
    """out = gamma * y + beta per channel, in y's dtype, with a backward of two multiplies and two reductions.

    Every elementwise op writes its result in the activations' dtype (``out=``): fp32 parameters and bf16
    activations make one kernel, with neither a cast of the parameters nor an fp32 copy of the output."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = _channel_shape(y.ndim, channel_dim)
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, scale)
        ctx.shape, ctx.reduce = shape, [d for d in range(y.ndim) if d != channel_dim % y.ndim]
        return torch.addcmul(shift.view(shape), y, scale.view(shape), out=torch.empty_like(y))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, scale = ctx.saved_tensors
        grad_y = torch.mul(grad, scale.view(ctx.shape), out=torch.empty_like(grad)) if ctx.needs_input_grad[0] else None
        grad_scale = (grad * y).sum(ctx.reduce, dtype=scale.dtype) if ctx.needs_input_grad[1] else None
        grad_shift = grad.sum(ctx.reduce, dtype=scale.dtype) if ctx.needs_input_grad[2] else None
        return grad_y, grad_scale, grad_shift, None


class _FrozenLinearScaleShiftFunction(torch.autograd.Function):
    """out = gamma * (x W^T + b) + beta for a frozen W, b, in the matmul's dtype (bf16 under autocast, as
    the Linear alone would give: no fp32 copy of the activations). The input gradient is g (gamma W), one
    matmul with the scale folded into the (small) weight instead of a pass over the activations."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> torch.Tensor:
        y = nn.functional.linear(x, weight, bias)
        ctx.save_for_backward(y if ctx.needs_input_grad[3] else None, weight, scale)
        return torch.addcmul(shift, y, scale, out=torch.empty_like(y))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, weight, scale = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            folded = torch.mul(weight, scale[:, None], out=weight.new_empty(weight.shape, dtype=grad.dtype))
            grad_x = grad.matmul(folded)
        else:
            grad_x = None
        dims = tuple(range(grad.ndim - 1))
        grad_scale = (grad * y).sum(dims, dtype=scale.dtype) if ctx.needs_input_grad[3] else None
        grad_shift = grad.sum(dims, dtype=scale.dtype) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_scale, grad_shift


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype (a parameter cast to the activations' dtype, as autocast casts weights)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _folds_into_norm(layer: nn.Module) -> bool:
    """A channels-last LayerNorm with weight and bias: gamma * LN(x) + beta is LN(x) with a new affine."""
    from timm.layers import LayerNorm

    return type(layer) in (nn.LayerNorm, LayerNorm) and layer.weight is not None and layer.bias is not None


class ScaleShift(BaseLayerWrapper):
    """y = gamma * base(x) + beta, per output channel."""

    def __init__(self, base_layer: nn.Module, init_std: float):
        super().__init__(base_layer)
        ref = first_param(base_layer)
        channels = _channels(base_layer)
        self.channel_dim = _channel_dim(base_layer)
        self.scale = nn.Parameter(torch.ones(channels, device=ref.device, dtype=ref.dtype))
        self.shift = nn.Parameter(torch.zeros(channels, device=ref.device, dtype=ref.dtype))
        if init_std > 0:
            nn.init.normal_(self.scale, 1.0, init_std)
            nn.init.normal_(self.shift, 0.0, init_std)
        self.fold_into_norm = _folds_into_norm(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the plain op; the fused paths only pay off in backward
            y = self.base_layer(x)
            shape = _channel_shape(y.ndim, self.channel_dim)
            return torch.addcmul(_as(self.shift, y).view(shape), y, _as(self.scale, y).view(shape))
        if self.fold_into_norm:
            norm = self.base_layer
            weight = norm.weight * self.scale
            bias = torch.addcmul(self.shift, norm.bias, self.scale)
            return nn.functional.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
        layer = self.base_layer
        if type(layer) is nn.Linear and not any(p.requires_grad for p in layer.parameters()):
            return _FrozenLinearScaleShiftFunction.apply(x, layer.weight, layer.bias, self.scale, self.shift)
        return _ScaleShiftFunction.apply(layer(x), self.scale, self.shift, self.channel_dim)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = self.base_layer
        return layer.weight, layer.bias

    @torch.no_grad()
    def merge_into_base(self) -> None:
        weight, bias = self._affine()
        gamma = self.scale.view(-1, *([1] * (weight.ndim - 1)))
        weight.mul_(gamma)
        if bias is None:
            if isinstance(self.base_layer, (nn.Linear, nn.Conv2d)):
                self.base_layer.bias = nn.Parameter(torch.zeros_like(self.shift), requires_grad=False)
                bias = self.base_layer.bias
            else:
                raise NotMergeableError(f"ssf: cannot merge into a bias-free {type(self.base_layer).__name__}")
        bias.mul_(self.scale).add_(self.shift)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        weight, bias = self._affine()
        bias.sub_(self.shift).div_(self.scale)
        weight.div_(self.scale.view(-1, *([1] * (weight.ndim - 1))))


@register
class SSF(Method):
    name = "ssf"
    family = "partial/reparameterization"
    paper = "Lian et al., SSF, NeurIPS 2022 (arXiv 2210.08823)"
    requires = frozenset()
    mergeable = True
    config_class = SSFConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: SSFConfig) -> None:
        for name in _targets(model, anatomy):
            replace_module(model, name, ScaleShift(model.get_submodule(name), config.init_std))
