"""DoRA: weight-decomposed low-rank adaptation, W' = m * (W0 + s B A) / ||W0 + s B A||.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024. The magnitude m (one per
output feature, initialised to the row norms of W0) and the direction's LoRA update are trained;
B starts at zero, so the model is unchanged at step 0. As in the paper (section 4.3), the norm is
treated as a constant in the backward pass. Same targets as LoRA, incl. slices of a fused qkv.
Unlike LoRA, each forward builds the adapted rows' weight to take their norms, as DoRA requires.

With dropout, training computes what the official code (NVlabs/DoRA) and peft compute:
W x + b + (m/n - 1) W drop(x) + (m/n) s B A drop(x), i.e. dropout acts on the LoRA path and on the
magnitude correction, never on the frozen base path. Without dropout, and in eval, this is exactly
(m/n) (W x + s B A x) + b.

Speed (GPU first): the per-feature scale m/n multiplies the weights, not the activations (one autograd
function, :class:`_DoRAFunction`: the base matmul on diag(m/n) W plus LoRA's fused low-rank matmuls), so
a training step adds weight-sized work only; with dropout the official formula's extra terms are one
matmul on drop(x) whose (m/n - 1) W + (m/n) s B A weight is built per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from vpeft.backbones.anatomy import Anatomy
from vpeft.errors import UnsupportedBackboneError
from vpeft.methods.base import Method, register, replace_module
from vpeft.methods.lora import LoRAConfig, LoRALinear
from vpeft.methods.lowrank import split_sizes, stack_rows
from vpeft.methods.targets import default_targets, resolve_targets
from vpeft.modules import matmul_dtype


@dataclass
class DoRAConfig(LoRAConfig):
    pass


def _scale_rows(weight: torch.Tensor, slices, scales, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """diag(c) W in ``dtype`` in one weight-sized kernel, c = scales[i] on slice i's rows and 1 elsewhere."""
    pieces, cursor = [], 0
    for (start, end), c in zip(slices, scales, strict=True):
        if start > cursor:
            pieces.append(c.new_ones(start - cursor))
        pieces.append(c)
        cursor = end
    if cursor < weight.shape[0]:
        pieces.append(scales[0].new_ones(weight.shape[0] - cursor))
    column = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(weight.dtype)[:, None]
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return torch.mul(weight, column, out=out), column


class _DoRAFunction(torch.autograd.Function):
    """DoRA without dropout: out = x (diag(c) W)^T + b, then out[:, slice_i] += (x (s A_i)^T) (diag(c_i) B_i)^T.

    c_i = m_i / ||W_i + s B_i A_i|| (the norm detached; c = 1 on rows no slice adapts) scales the weights,
    not the activations: the forward is the base matmul on a rescaled copy of the weight (the cast to the
    matmul dtype that autocast makes anyway) plus LoRA's low-rank matmuls, whose adds are fused into them.
    ``tensors`` holds every slice's A, then every B, then every c. The backward is matmuls plus weight-sized
    work: dL/dc_j = sum_t g_tj (x_t . W_j + s (A x_t) . B_j) = rows of (g^T x) . W + (g^T low) . B, from the
    weight-gradient product of the adapted rows (no activation-sized elementwise pass or saved pre-scale
    output). Each c's gradient reaches its magnitude through c = m / n outside this function."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, scaling, slices, *tensors):
        n = len(slices)
        lora_a, lora_b, scales = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        ctx.dtypes = (x.dtype, weight.dtype, lora_a[0].dtype, lora_b[0].dtype, scales[0].dtype)
        ctx.scaling, ctx.ranks = scaling, [t.shape[0] for t in lora_a]
        ctx.sizes, ctx.index = split_sizes(slices, weight.shape[0])
        x = x.to(dtype)
        scaled_weight, column = _scale_rows(weight, slices, scales, dtype)
        a = stack_rows(lora_a, dtype)
        a = a * scaling if scaling != 1.0 else a  # the scaling multiplies a small weight, not activations
        scaled_b = [(b * c.to(b.dtype)[:, None]).to(dtype) for b, c in zip(lora_b, scales, strict=True)]
        out = torch.addmm(bias.to(dtype), x, scaled_weight.t()) if bias is not None else torch.mm(x, scaled_weight.t())
        low = torch.mm(x, a.t())
        pieces, lows = out.split(ctx.sizes, dim=1), low.split(ctx.ranks, dim=1) if n > 1 else [low]
        for i, low_i, b_i in zip(ctx.index, lows, scaled_b, strict=True):
            pieces[i].addmm_(low_i, b_i.t())
        ctx.save_for_backward(x, weight, scaled_weight, column, a, *lows, *lora_b, *scaled_b, *scales)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        n = len(ctx.index)
        x, weight, scaled_weight, column, a, *saved = ctx.saved_tensors
        lows, lora_b, scaled_b, scales = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n], saved[3 * n :]
        need, (x_dtype, w_dtype, a_dtype, b_dtype, c_dtype) = ctx.needs_input_grad, ctx.dtypes
        grad = grad.to(x.dtype)
        split = grad.split(ctx.sizes, dim=1) if len(ctx.sizes) > 1 else [grad]
        pieces = [split[i] for i in ctx.index]
        bounds = [sum(ctx.sizes[:i]) for i in ctx.index]
        need_b, need_c = any(need[6 + n : 6 + 2 * n]), any(need[6 + 2 * n :])
        grad_bs, grad_cs = [None] * n, [None] * n
        for i, (g, low_i) in enumerate(zip(pieces, lows, strict=True)):
            if not (need_b or need_c):
                break
            grad_scaled = torch.mm(g.t(), low_i)  # dL/d(diag(c) B_i) = g^T low
            if need_b:
                grad_bs[i] = (grad_scaled * scales[i].to(grad_scaled.dtype)[:, None]).to(b_dtype)
            if need_c:
                rows = weight[bounds[i] : bounds[i] + g.shape[1]]
                pre = (torch.mm(g.t(), x) * rows).sum(1) + (grad_scaled * lora_b[i]).sum(1)
                grad_cs[i] = pre.to(c_dtype)
        if n == 1:
            grad_low = torch.mm(pieces[0], scaled_b[0])
        else:  # every slice's low-rank gradient into its own columns of one buffer
            grad_low = grad.new_empty((grad.shape[0], a.shape[0]))
            for g, b_i, out in zip(pieces, scaled_b, grad_low.split(ctx.ranks, dim=1), strict=True):
                torch.mm(g, b_i, out=out)
        grad_as = [None] * n
        if any(need[6 : 6 + n]):
            grad_a = torch.mm(grad_low.t(), x)
            grad_a = grad_a * ctx.scaling if ctx.scaling != 1.0 else grad_a
            grad_a = grad_a.to(a_dtype)
            grad_as = list(grad_a.split(ctx.ranks)) if n > 1 else [grad_a]
        grad_x = torch.mm(grad, scaled_weight).addmm_(grad_low, a).to(x_dtype) if need[0] else None
        grad_weight = (torch.mm(grad.t(), x) * column).to(w_dtype) if need[1] else None
        grad_bias = grad.sum(0).to(w_dtype) if need[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, *grad_as, *grad_bs, *grad_cs


class DoRALinear(LoRALinear):
    """LoRA on output slices of a Linear, with a learned magnitude per adapted output feature."""

    def __init__(self, base_layer: nn.Linear, slices: list[tuple[int, int]], rank: int, scaling: float, dropout: float):
        super().__init__(base_layer, slices, rank, scaling, dropout)
        with torch.no_grad():
            self.magnitude = nn.ParameterList(
                [nn.Parameter(base_layer.weight[start:end].norm(dim=1)) for start, end in self.slices]
            )
        self._merged_norms: list[torch.Tensor] = []

    @torch.no_grad()
    def _direction_norm(self, index: int) -> torch.Tensor:
        """||W_i + s B_i A_i|| per row, in the weight's dtype (fp32 under autocast too): a weight-sized pass."""
        start, end = self.slices[index]
        weight = self.base_layer.weight
        with torch.autocast(weight.device.type, enabled=False):
            merged = torch.addmm(weight[start:end], self.lora_B[index], self.lora_A[index], alpha=self.scaling)
            return torch.linalg.vector_norm(merged, dim=1)

    def _scales(self) -> list[torch.Tensor]:
        """c_i = m_i / n_i, the norm n_i detached (paper, section 4.3): gradients reach m only."""
        return [m / self._direction_norm(i) for i, m in enumerate(self.magnitude)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        scales = self._scales()
        if self.training and not isinstance(self.dropout, nn.Identity):
            # the official formula: W x + b + (c - 1) W drop(x) + c s B A drop(x), the dropped terms as one
            # matmul on drop(x) whose weight (c - 1) W + c s B A is built per step (zero rows outside the slices)
            out = layer(x)
            h = self.dropout(x)
            weight, blocks, cursor = layer.weight, [], 0
            for (start, end), a, b, c in zip(self.slices, self.lora_A, self.lora_B, scales, strict=True):
                if start > cursor:
                    blocks.append(weight.new_zeros(start - cursor, weight.shape[1]))
                rows = weight[start:end] * (c - 1)[:, None]
                blocks.append(torch.addmm(rows, b * c[:, None], a, alpha=self.scaling))
                cursor = end
            if cursor < weight.shape[0]:
                blocks.append(weight.new_zeros(weight.shape[0] - cursor, weight.shape[1]))
            extra = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), extra.t())
            return flat.view(out.shape)
        flat = x.reshape(-1, x.shape[-1])
        out = _DoRAFunction.apply(
            flat, layer.weight, layer.bias, matmul_dtype(x), self.scaling, self.slices,
            *self.lora_A, *self.lora_B, *scales,
        )  # fmt: skip
        return out.view(*x.shape[:-1], out.shape[-1])

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self._merged_norms = []
        for i, (start, end) in enumerate(self.slices):
            norm = self._direction_norm(i)
            self._merged_norms.append(norm)
            weight = self.base_layer.weight[start:end] + self.delta_weight(i)
            self.base_layer.weight[start:end] = weight * (self.magnitude[i] / norm)[:, None]

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        for i, (start, end) in enumerate(self.slices):
            weight = self.base_layer.weight[start:end] * (self._merged_norms[i] / self.magnitude[i])[:, None]
            self.base_layer.weight[start:end] = weight - self.delta_weight(i)
        self._merged_norms = []


@register
class DoRA(Method):
    name = "dora"
    family = "partial/reparameterization"
    paper = "Liu et al., DoRA, ICML 2024 (arXiv 2402.09353)"
    requires = frozenset({"mlp"})
    #: where a family is only partly covered
    mergeable = True
    config_class = DoRAConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: DoRAConfig) -> None:
        targets = config.targets if config.targets is not None else default_targets(anatomy)
        for name, slices in resolve_targets(model, anatomy, targets).items():
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise UnsupportedBackboneError(
                    f"dora: '{name}' is a {type(layer).__name__}; vpeft's DoRA adapts Linear layers only "
                    "(pick Linear layers with targets, e.g. fc1,fc2 on ConvNeXt)"
                )
            slices = slices or [(0, layer.out_features)]
            replace_module(model, name, DoRALinear(layer, slices, config.rank, config.scaling, config.dropout))
