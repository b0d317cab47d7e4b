"""Low-rank update kernels shared by LoRA, DoRA and MTLoRA: sliced outputs of a fused layer, stacked factors."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def split_sizes(slices: list[tuple[int, int]], width: int) -> tuple[list[int], list[int]]:
    """Sizes that split ``width`` columns at every slice boundary, and which pieces are the slices."""
    sizes, index, cursor = [], [], 0
    for start, end in slices:
        if start > cursor:
            sizes.append(start - cursor)
        index.append(len(sizes))
        sizes.append(end - start)
        cursor = end
    if cursor < width:
        sizes.append(width - cursor)
    return sizes, index


def stack_rows(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors stacked along dim 0 in ``dtype``: one kernel (cat writes the cast)."""
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    if tensors[0].dtype == dtype:
        return torch.cat(tensors)
    out = tensors[0].new_empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=dtype)
    return torch.cat(tensors, out=out)


class SlicedLoRAFunction(torch.autograd.Function):
    """out = x W^T + b, then out[:, slice_i] += (x (s A_i)^T) B_i^T, all in matmuls, in ``dtype``.

    ``lora`` is every slice's A, then every slice's B. One down-projection for all slices; each
    up-projection adds into its output columns in place (a strided matmul output); the backward pass is
    matmuls only, the LoRA and base input gradients meeting in one ``addmm``. No full-size elementwise
    pass, copy or slice assignment runs in forward or backward; the casts are those autocast makes."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, scaling, slices, *lora):
        n = len(slices)
        ctx.dtypes = (x.dtype, weight.dtype, lora[0].dtype, lora[n].dtype)
        ctx.scaling, ctx.ranks, ctx.heights = scaling, [t.shape[0] for t in lora[:n]], [t.shape[0] for t in lora[n:]]
        ctx.sizes, ctx.index = split_sizes(slices, weight.shape[0])
        x, weight = x.to(dtype), weight.to(dtype)
        a = stack_rows(lora[:n], dtype)
        a = a * scaling if scaling != 1.0 else a  # the scaling multiplies a small weight, not activations
        # the Bs: as they are, or cast together in one kernel
        bs = lora[n:] if lora[n].dtype == dtype else stack_rows(lora[n:], dtype).split(ctx.heights)
        out = torch.addmm(bias.to(dtype), x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        low = torch.mm(x, a.t())
        pieces, lows = out.split(ctx.sizes, dim=1), low.split(ctx.ranks, dim=1) if n > 1 else [low]
        for i, low_i, b_i in zip(ctx.index, lows, bs, strict=True):
            pieces[i].addmm_(low_i, b_i.t())
        ctx.save_for_backward(x, weight, a, *lows, *bs)
        return out

    @staticmethod
    @once_differentiable  # the backward writes into buffers (out=): no double backward
    def backward(ctx, grad):
        n = len(ctx.index)
        x, weight, a, *saved = ctx.saved_tensors
        lows, bs = saved[:n], saved[n:]
        need, (x_dtype, w_dtype, a_dtype, b_dtype) = ctx.needs_input_grad, ctx.dtypes
        grad = grad.to(x.dtype)
        split = grad.split(ctx.sizes, dim=1) if len(ctx.sizes) > 1 else [grad]
        pieces = [split[i] for i in ctx.index]
        if n == 1:
            grad_low = torch.mm(pieces[0], bs[0])
        else:
            grad_low = grad.new_empty((grad.shape[0], a.shape[0]))
            for g, b_i, out in zip(pieces, bs, grad_low.split(ctx.ranks, dim=1), strict=True):
                torch.mm(g, b_i, out=out)
        grad_as, grad_bs = [None] * n, [None] * n
        if any(need[6 + n :]):
            if b_dtype == x.dtype or n == 1:
                grad_bs = [torch.mm(g.t(), low_i).to(b_dtype) for g, low_i in zip(pieces, lows, strict=True)]
            else:  # one buffer, cast back in one kernel
                grad_b = grad.new_empty((sum(ctx.heights), bs[0].shape[1]))
                for g, low_i, out in zip(pieces, lows, grad_b.split(ctx.heights), strict=True):
                    torch.mm(g.t(), low_i, out=out)
                grad_bs = list(grad_b.to(b_dtype).split(ctx.heights))
        if any(need[6 : 6 + n]):
            grad_a = torch.mm(grad_low.t(), x)
            grad_a = grad_a * ctx.scaling if ctx.scaling != 1.0 else grad_a
            grad_a = grad_a.to(a_dtype)
            grad_as = list(grad_a.split(ctx.ranks)) if n > 1 else [grad_a]
        grad_x = torch.mm(grad, weight).addmm_(grad_low, a).to(x_dtype) if need[0] else None
        grad_weight = torch.mm(grad.t(), x).to(w_dtype) if need[1] else None
        grad_bias = grad.sum(0).to(w_dtype) if need[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, *grad_as, *grad_bs
