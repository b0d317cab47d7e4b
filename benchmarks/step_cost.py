"""A CPU proxy of a training step's GPU cost: ATen ops, matmul FLOPs and non-matmul bytes, per method.

    python benchmarks/step_cost.py [--model vit_base_patch16_224 --img 224 --batch 64] [--optimizer]

One training step of every method (forward, cross-entropy, backward; with ``--optimizer`` also
``zero_grad`` and a foreach AdamW step, as the trainer does) runs under a TorchDispatchMode that
records every ATen op that reaches the backend. Columns, each also relative to full fine-tuning:

- ``ops``: every ATen op dispatched (views included).
- ``kernels``: the ops that would launch a GPU kernel: all but views, aliases and bare allocations.
  On a GPU every one costs a launch (~5 us) even when it moves no data.
- ``GFLOP``: matmul, convolution and attention FLOPs (``torch.utils.flop_counter``'s formulas).
- ``MB written``: bytes written by every kernel that is not a matmul, convolution or attention
  (elementwise ops, norms, reductions, copies, cat, index, slice assignment). On a GPU these are
  bandwidth-bound: the H100 step-time gaps between methods are mostly these bytes and the kernel
  count (``/work/shared/reference/gpu-measurements.md``, one H100, bf16).
- ``MB read``: bytes those same kernels read (a strided or broadcast input counts its storage once).
- ``est. ms``: a roofline estimate of the H100 step, max(GPU time, host time), GPU time = FLOP at
  250 TFLOP/s (the ~25% of bf16 peak full FT reaches) + non-matmul bytes read and written at
  2.5 TB/s + 4 us per kernel, host time = 21 us per dispatched op (eager PyTorch with autograd;
  calibrated on LST, which the H100 showed launch-bound). Its ratio to full FT is what to compare
  with the H100 column (measured with the AdamW step; the estimate leaves it out unless ``--optimizer``).

The step runs on fake tensors (``FakeTensorMode``): shapes, dtypes and the dispatched ops are those of
a real step, nothing is computed, so the real geometry (ViT-B/16 at 224 px, batch 64) costs seconds
and the counts are exact and deterministic. By default under the trainer's CUDA autocast (bf16): CPU
autocast with its op lists patched to CUDA's (layer norm, softmax, sums and norms in fp32; einsum and
every matmul in bf16), so dtype promotions and casts cost what they cost on a GPU; ``--amp off``
counts fp32. Attention goes through the fused flash (or, with a mask, efficient) attention op a GPU
runs, dropout through the fused dropout kernel. Not modelled: what ``torch.compile`` or a GPU library
would fuse further, and Python's own overhead per module call.
With Hugging Face peft installed, its LoRA on the whole ``qkv`` is counted beside vpeft's
(``vpeft_lora_qkv``); ``ref_lora_qkv`` is a hand-written reference of peft's formula,
base(x) + B(A(dropout(x))) * s, counted always.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from collections import Counter

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import vpeft

DEFAULT_METHODS = ["full", "linear", "bitfit", "ln_tune", "partial_k", "lora", "dora", "ssf", "adapter",
                   "adaptformer", "vpt_shallow", "vpt_deep", "convpass", "repadapter", "fact_tt", "fact_tk",
                   "mona", "prefix", "lst"]  # fmt: skip

#: the H100's step time / full FT's (bf16 autocast, AdamW step included), ViT-B/16, 224 px, batch 64;
#: from /work/shared/reference/gpu-measurements.md (commit 24f7af9), to check the proxy's ranking
H100_STEP_RATIO = {
    "full": 1.000, "linear": 0.325, "bitfit": 0.784, "lora": 1.208, "dora": 1.510, "ssf": 1.414,
    "adapter": 0.879, "adaptformer": 1.043, "vpt_shallow": 0.939, "vpt_deep": 0.903, "fact_tt": 2.021,
    "repadapter": 1.472, "convpass": 2.209, "mona": 2.868, "prefix": 0.881, "lst": 1.552,
    "vpeft_lora_qkv": 0.796, "peft_lora": 0.747,
}  # fmt: skip

#: ops that launch no GPU kernel although their schema does not mark them as views (allocations, host
#: reads of AdamW's CPU step counters, profiler markers)
_NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "lift_fresh", "_reshape_alias", "set_", "resize_",
              "_local_scalar_dense", "_record_function_enter_new", "_record_function_exit"}  # fmt: skip
_MATMUL = set(flop_registry)  # mm, addmm, bmm, baddbmm, convolutions, fused attention (forward and backward)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: its elements, or its storage if smaller (broadcast views)."""
    own = t.numel() * t.element_size()
    try:
        return min(own, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return own


@dataclasses.dataclass
class Cost:
    ops: int = 0
    kernels: int = 0
    flops: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    by_op: Counter = dataclasses.field(default_factory=Counter)  # op name -> non-matmul bytes written
    kernel_names: Counter = dataclasses.field(default_factory=Counter)  # op name -> kernels


class CostMode(TorchDispatchMode):
    """Counts the ops, matmul FLOPs and non-matmul bytes of everything dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.cost = Cost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":  # metadata queries (prim.device), no ATen op
            return out
        c = self.cost
        c.ops += 1
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_KERNEL or name in ("detach", "alias"):
            return out
        results = _tensors(out)
        if results and all(t.numel() == 0 for t in results):  # an empty result launches nothing
            return out
        c.kernels += 1
        c.kernel_names[name] += 1
        packet = func.overloadpacket
        if packet not in _MATMUL and name.endswith("_"):  # in-place matmuls (addmm_, baddbmm_) are matmuls
            packet = getattr(torch.ops.aten, name[:-1], packet)
        if packet in _MATMUL:
            c.flops += flop_registry[packet](*args, **kwargs, out_val=out)
            return out
        written = results
        if not written:  # in-place ops returning nothing (foreach): the mutated arguments
            schema_args = func._schema.arguments
            written = [
                t
                for a, v in zip(schema_args, args, strict=False)
                if a.alias_info is not None and a.alias_info.is_write
                for t in _tensors(v)
            ]
        nbytes = sum(_nbytes(t) for t in written)
        c.bytes_written += nbytes
        c.bytes_read += sum(_nbytes(t) for t in _tensors(args) + _tensors(list(kwargs.values())))
        c.by_op[name] += nbytes
        return out


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What a GPU runs for F.scaled_dot_product_attention: one fused attention op (flash, or efficient with a mask)."""
    if torch.is_autocast_enabled("cpu"):  # sdpa is on CUDA autocast's lower-precision list
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dtype) for t in (q, k, v))
        attn_mask = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, -math.inf)
    bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal,
                                                                  scale=scale)[0]  # fmt: skip


def _fused_dropout(x, p=0.5, training=True, inplace=False):
    """What a GPU runs for F.dropout while training: one fused kernel (CPU tensors take bernoulli, div, mul)."""
    if not training or p == 0:
        return x
    return torch.native_dropout(x, p, True)[0]


@contextlib.contextmanager
def gpu_kernels():
    """Route attention and dropout to the fused ops a GPU runs (CPU tensors take other kernels)."""
    originals = F.scaled_dot_product_attention, F.dropout
    F.scaled_dot_product_attention, F.dropout = _fused_sdpa, _fused_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = originals


# CUDA autocast's op lists where they differ from CPU autocast's (aten/src/ATen/autocast_mode.cpp)
_CUDA_FP32 = ["layer_norm", "native_layer_norm", "group_norm", "exp", "log", "log2", "log10", "log1p", "expm1",
              "rsqrt", "reciprocal", "softplus", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "acos", "asin", "cosh",
              "sinh", "tan", "erfinv", "nll_loss", "kl_div", "mse_loss", "l1_loss", "smooth_l1_loss", "logsumexp",
              "cosine_similarity", "binary_cross_entropy_with_logits", "cdist", "dist", "renorm",
              "norm.Scalar", "norm.ScalarOpt_dim"]  # fmt: skip
_CUDA_FP32_OUT = ["softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "cumsum", "cumprod", "prod",
                  "prod.dim_int", "linalg_vector_norm"]  # fmt: skip
_CUDA_LOWER = ["einsum", "mv", "addmv", "addr", "addbmm", "chain_matmul", "linalg_multi_dot", "conv_transpose1d",
               "conv_transpose2d.input", "conv_transpose3d.input", "_convolution"]  # fmt: skip


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in (dtype, torch.float64):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _autocast_kernel(op, policy: str):
    guard = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    has_dtype = [a.name for a in op._schema.arguments].count("dtype") == 1
    dtype_index = [a.name for a in op._schema.arguments].index("dtype") if has_dtype else -1

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(guard):
            if policy == "lower":
                dtype = torch.get_autocast_dtype("cpu")
                return op(*_cast(args, dtype), **_cast(kwargs, dtype))
            if policy == "fp32_out" and has_dtype:  # CUDA passes dtype=float32: no input copy, fp32 out
                first = args[0]
                if (
                    first.dtype in (torch.float16, torch.bfloat16)
                    and len(args) <= dtype_index
                    and "dtype" not in kwargs
                ):
                    return op(*args, **kwargs, dtype=torch.float32)
                return op(*args, **kwargs)
            return op(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))

    return kernel


@contextlib.contextmanager
def cuda_like_autocast(dtype: torch.dtype = torch.bfloat16):
    """CPU autocast that casts like CUDA autocast (for fake or CPU tensors, on a machine without a GPU)."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    policies = [(n, "fp32") for n in _CUDA_FP32] + [(n, "fp32_out") for n in _CUDA_FP32_OUT]
    policies += [(n, "lower") for n in _CUDA_LOWER]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, policy in policies:
            packet, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, packet), overload or "default")
            lib.impl(name, _autocast_kernel(op, policy), "AutocastCPU")
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        lib._destroy()


def to_fake(model: nn.Module, mode) -> nn.Module:
    """Swap every parameter and buffer for a fake tensor of the same shape (shared ones stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None:
                    continue
                if id(t) not in memo:
                    fake = mode.from_tensor(t.detach())
                    memo[id(t)] = (
                        nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else fake
                    )
                table[key] = memo[id(t)]
    return model


class RefLoRA(nn.Module):
    """peft's LoRA formula on a whole Linear: base(x) + B(A(dropout(x))) * s, as peft's ``Linear.forward`` does."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 8.0):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def build(name: str, model_name: str, img: int, model_kwargs: dict | None = None) -> nn.Module:
    """A timm model with method ``name`` applied (or peft's LoRA, or the reference LoRA), in train mode."""
    torch.manual_seed(0)
    kw = {"num_classes": 100, "img_size": img, **(model_kwargs or {})}
    model = timm.create_model(model_name, pretrained=False, **kw)
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        head = vpeft.describe(model).heads
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=head))
    elif name == "ref_lora_qkv":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        for parts in vpeft.describe(model).blocks:  # ViT and Swin blocks alike
            attn = model.get_submodule(parts.attn)
            attn.qkv = RefLoRA(attn.qkv)
    elif name == "vpeft_lora_qkv":
        vpeft.apply(model, "lora", rank=8, targets=["qkv"])
    else:
        vpeft.apply(model, name)
    return model.train()


def step_cost(model: nn.Module, batch: int, img: int, amp: bool = True, optimizer: bool = False) -> Cost:
    """The cost of one training step on fake tensors: forward under autocast (bf16, CUDA's op lists) when
    ``amp``, cross-entropy on fp32 logits, backward; with ``optimizer`` also a foreach AdamW step and zero_grad.
    The model's parameters become fake tensors (its real values are no longer used)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake(model, fake)
    params = [p for p in model.parameters() if p.requires_grad]
    with fake:
        x = torch.empty(batch, 3, img, img)
        y = torch.zeros(batch, dtype=torch.long)
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True) if optimizer else None
        if opt is not None:  # a first step creates the optimizer's state: not part of a steady step
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with gpu_kernels(), CostMode() as mode:
            with cuda_like_autocast() if amp else contextlib.nullcontext():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return mode.cost


#: roofline constants of :func:`estimate_ms` (H100, bf16, eager PyTorch)
MATMUL_FLOP_PER_S = 250e12
BYTES_PER_S = 2.5e12
KERNEL_S = 4e-6
HOST_S_PER_OP = 21e-6


def estimate_ms(c: Cost) -> float:
    """A step's H100 time from its counts: the larger of GPU time and host (dispatch) time."""
    gpu = c.flops / MATMUL_FLOP_PER_S + (c.bytes_written + c.bytes_read) / BYTES_PER_S + c.kernels * KERNEL_S
    return 1000 * max(gpu, c.ops * HOST_S_PER_OP)


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb)


def main(argv: list[str] | None = None) -> dict[str, Cost]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--amp", choices=["bf16", "off"], default="bf16", help="the trainer's CUDA autocast, or fp32")
    parser.add_argument("--optimizer", action="store_true", help="include zero_grad and a foreach AdamW step")
    parser.add_argument("--top", type=int, default=0, help="also print each method's N largest non-matmul writers")
    args = parser.parse_args(argv)
    names = args.methods.split(",")
    names += ["vpeft_lora_qkv", "ref_lora_qkv"]
    try:
        import peft  # noqa: F401

        names.append("peft_lora")
    except ImportError:
        print("(peft not installed: pip install peft to count its LoRA alongside)")
    costs: dict[str, Cost] = {}
    for name in names:
        try:
            model = build(name, args.model, args.img)
        except vpeft.VPeftError as exc:
            print(f"skip {name}: {exc}")
            continue
        costs[name] = step_cost(model, args.batch, args.img, args.amp == "bf16", args.optimizer)
        del model
    what = "forward + backward + AdamW step" if args.optimizer else "forward + backward (no optimizer step)"
    amp = "bf16 autocast (CUDA's op lists)" if args.amp == "bf16" else "fp32"
    print(f"{args.model} at {args.img}px, batch {args.batch}, {amp}, {what}, counted on fake tensors")
    print("| method | ops | kernels | GFLOP | MB written | MB read | est. ms | ops / full | kernels / full "
          "| FLOP / full | written / full | read / full | est. / full | H100 step / full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = costs["full"]
    for n, c in costs.items():
        h100 = H100_STEP_RATIO.get(n)
        print(f"| {n} | {c.ops} | {c.kernels} | {c.flops / 1e9:.0f} | {c.bytes_written / 2**20:.0f} | "
              f"{c.bytes_read / 2**20:.0f} | {estimate_ms(c):.1f} | {c.ops / base.ops:.2f} | "
              f"{c.kernels / base.kernels:.2f} | {c.flops / base.flops:.2f} | "
              f"{c.bytes_written / base.bytes_written:.2f} | {c.bytes_read / base.bytes_read:.2f} | "
              f"{estimate_ms(c) / estimate_ms(base):.2f} | {'' if h100 is None else f'{h100:.2f}'} |")  # fmt: skip
    print()
    for ref in ("peft_lora", "ref_lora_qkv"):
        if ref in costs:
            b = costs[ref]
            for mine in ("lora", "vpeft_lora_qkv"):
                if mine in costs:
                    a = costs[mine]
                    print(f"{mine} / {ref}: ops {a.ops / b.ops:.2f}, kernels {a.kernels / b.kernels:.2f}, "
                          f"MB written {a.bytes_written / b.bytes_written:.2f}, "
                          f"MB read {a.bytes_read / b.bytes_read:.2f}, est. {estimate_ms(a) / estimate_ms(b):.2f}")  # fmt: skip
    timed = [n for n in costs if n in H100_STEP_RATIO]
    if len(timed) > 2:
        h = [H100_STEP_RATIO[n] for n in timed]
        print(f"\nSpearman rank correlation with the H100 step time over {len(timed)} methods: "
              f"kernels {_spearman([costs[n].kernels for n in timed], h):.2f}, "
              f"MB written {_spearman([costs[n].bytes_written for n in timed], h):.2f}, "
              f"MB read+written {_spearman([costs[n].bytes_written + costs[n].bytes_read for n in timed], h):.2f}, "
              f"GFLOP {_spearman([costs[n].flops for n in timed], h):.2f}, "
              f"est. ms {_spearman([estimate_ms(costs[n]) for n in timed], h):.2f}")  # fmt: skip
    if args.top:
        for n, c in costs.items():
            top = ", ".join(f"{op} {b / 2**20:.0f}" for op, b in c.by_op.most_common(args.top))
            print(f"{n}: {top}")
    return costs


if __name__ == "__main__":
    main(sys.argv[1:])
