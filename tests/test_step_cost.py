"""benchmarks/step_cost.py: the CPU proxy of a training step's GPU cost (ops, matmul FLOPs, non-matmul bytes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
_spec = importlib.util.spec_from_file_location("step_cost", _PATH)
step_cost = importlib.util.module_from_spec(_spec)
sys.modules["step_cost"] = step_cost
_spec.loader.exec_module(step_cost)

TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}


def _cost(method: str, model_kwargs: dict = TINY, img: int = 32, batch: int = 8, **kw) -> step_cost.Cost:
    model = step_cost.build(method, "vit_base_patch16_224", img, model_kwargs)
    return step_cost.step_cost(model, batch, img, **kw)


def test_counting_is_deterministic() -> None:
    a, b = _cost("lora"), _cost("lora")
    assert (a.ops, a.kernels, a.flops, a.bytes_written, a.bytes_read) == (
        b.ops,
        b.kernels,
        b.flops,
        b.bytes_written,
        b.bytes_read,
    )
    assert a.ops > a.kernels > 0 and a.flops > 0 and a.bytes_written > 0


def test_linear_probe_costs_less_than_full_fine_tuning() -> None:
    full, linear = _cost("full"), _cost("linear")
    assert linear.kernels < full.kernels and linear.bytes_written < full.bytes_written
    # full FT: forward, input gradients and weight gradients; a linear probe: the forward only
    assert 2.5 < full.flops / linear.flops < 3.5


def test_flops_match_the_closed_form() -> None:
    """Matmul FLOPs of a linear probe: the forward (patch embedding, qkv/proj/fc1/fc2, attention, head), then
    the head's weight gradient (its input gradient is not needed)."""
    b, img, p, d, depth, hidden, classes = 8, 32, 8, 48, 2, 96, 100
    n = (img // p) ** 2 + 1
    per_block = 2 * b * n * d * (3 * d + d + 2 * hidden) + 2 * 2 * b * n * n * d  # linears + QK^T and AV
    expected = 2 * b * (n - 1) * 3 * p * p * d + depth * per_block + 2 * 2 * b * d * classes
    assert _cost("linear").flops == expected


def test_amp_counts_the_casts() -> None:
    fp32, bf16 = _cost("linear", amp=False), _cost("linear")
    assert bf16.flops == fp32.flops
    assert "_to_copy" not in fp32.kernel_names and bf16.kernel_names["_to_copy"] > 0  # weights, norm outputs
    assert bf16.kernels > fp32.kernels


def test_cuda_like_autocast_casts_as_cuda_does_and_is_undone() -> None:
    x, w = torch.randn(2, 8), torch.randn(8, 8)
    with step_cost.cuda_like_autocast():
        h = torch.nn.functional.linear(x, w)
        assert h.dtype == torch.bfloat16
        assert torch.nn.functional.layer_norm(h, (8,)).dtype == torch.float32  # CPU autocast keeps bf16
        assert h.sum().dtype == torch.float32 and torch.einsum("ij,jk->ik", x, w).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the patch is gone afterwards
        assert torch.nn.functional.layer_norm(torch.nn.functional.linear(x, w), (8,)).dtype == torch.bfloat16


def test_optimizer_step_is_counted_without_its_state_init() -> None:
    plain, with_opt = _cost("linear"), _cost("linear", optimizer=True)
    extra = with_opt.kernels - plain.kernels
    assert 0 < extra < 20  # a handful of foreach kernels, not one per parameter
    assert with_opt.flops == plain.flops


def test_reference_lora_matches_peft_when_installed() -> None:
    pytest.importorskip("peft")
    ref, peft = _cost("ref_lora_qkv"), _cost("peft_lora")
    assert (ref.kernels, ref.flops, ref.bytes_written) == (peft.kernels, peft.flops, peft.bytes_written)


# ---------------------------------------------------------------- the proxy's targets (ViT-B/16 width and tokens)

#: ViT-B/16 blocks (width 768, 12 heads, 197 tokens at 224 px); four of them keep the count fast
VIT_B_4 = {"depth": 4}


def _vit_b(method: str) -> step_cost.Cost:
    return _cost(method, VIT_B_4, img=224, batch=64)


def test_lora_on_q_v_costs_no_more_than_peft_lora_on_qkv() -> None:
    """Issue 19's target: vpeft LoRA (q, v slices) dispatches no more ops and writes no more non-matmul bytes
    than peft's LoRA formula on the whole qkv (``ref_lora_qkv``; equal to peft's own, tested above)."""
    lora, ref = _vit_b("lora"), _vit_b("ref_lora_qkv")
    assert lora.ops <= ref.ops and lora.kernels <= ref.kernels
    assert lora.bytes_written <= ref.bytes_written and lora.bytes_read <= ref.bytes_read
    assert lora.by_op["copy_"] == lora.by_op["slice_backward"] == 0  # no slice assignment, in forward or backward


@pytest.mark.parametrize("method", ["lora", "ssf", "dora", "mona", "fact_tt"])
def test_non_matmul_bytes_at_most_twice_full_fine_tuning(method: str) -> None:
    assert _vit_b(method).bytes_written <= 2 * _vit_b("full").bytes_written


#: a small Swin (two stages of one block) at 32 px: the dense methods' backbone family
TINY_SWIN = {"window_size": 4, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 32}


def _swin(method: str) -> step_cost.Cost:
    return step_cost.step_cost(step_cost.build(method, "swin_tiny_patch4_window7_224", 32, TINY_SWIN), 8, 32)


@pytest.mark.parametrize("method", ["lorand", "e3va"])
def test_dense_methods_write_at_most_twice_full_fine_tuning_on_swin(method: str) -> None:
    full, cost = _swin("full"), _swin(method)
    assert cost.bytes_written <= 2 * full.bytes_written and cost.bytes_read <= 2 * full.bytes_read
    if method == "e3va":  # no backward through the blocks: less than full fine-tuning writes
        assert cost.bytes_written < full.bytes_written and cost.flops < full.flops


def test_reference_lora_builds_on_swin() -> None:
    assert _swin("ref_lora_qkv").flops > 0


# ---------------------------------------------------------------- the cheaper paths compute the same formulas

#: every exactness check runs on the CPU, and on CUDA (with its own autocast) where a GPU is present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 on CUDA means fp32 (cuDNN convolutions would otherwise round to TF32)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _grads(fn, x, params, weight):
    out = fn(x)
    return (out, *torch.autograd.grad((out.float() * weight).sum(), [x, *params]))


@pytest.mark.parametrize("slices", [[(0, 16), (32, 48)], [(0, 48)], [(16, 32)], [(0, 16), (16, 32), (32, 48)]])
@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_lora_fused_function_matches_the_formula(slices, scaling: float, amp: bool, device: str) -> None:
    """out = x W^T + b + sum_i P_i (s B_i A_i x), outputs and every gradient (base weight and bias trainable
    too), in fp32 and under bf16 autocast."""
    from vpeft.methods.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    layer = LoRALinear(base, slices, 4, scaling, 0.0).to(device)
    for b in layer.lora_B:
        torch.nn.init.normal_(b)
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)

    def reference(x):
        out = torch.nn.functional.linear(x, base.weight, base.bias)
        pad = []
        for (start, end), a, b in zip(layer.slices, layer.lora_A, layer.lora_B, strict=True):
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scaling
            pad.append(torch.nn.functional.pad(delta, (start, out.shape[-1] - end)))
        return out + sum(pad)

    params = [base.weight, base.bias, *layer.lora_A, *layer.lora_B]
    weight = torch.randn(3, 5, 48, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        got, want = _grads(layer, x, params, weight), _grads(reference, x, params, weight)
    assert got[0].dtype == want[0].dtype
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2 if amp else 1e-5, atol=2e-2 if amp else 1e-5)


@pytest.mark.parametrize("slices", [[(0, 16), (32, 48)], [(0, 48)], [(16, 32)]])
@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_dora_fused_function_matches_the_formula(slices, scaling: float, amp: bool, device: str) -> None:
    """Training without dropout: (m/n) (x W^T + s x A^T B^T) + b on each slice, n = ||W + s B A|| detached, x W^T + b
    elsewhere; outputs and every gradient (base weight and bias trainable too), in fp32 and under bf16 autocast."""
    from vpeft.methods.dora import DoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    layer = DoRALinear(base, slices, 4, scaling, 0.0).to(device).train()
    with torch.no_grad():
        for b, m in zip(layer.lora_B, layer.magnitude, strict=True):
            torch.nn.init.normal_(b)
            m.mul_(torch.rand_like(m) + 0.5)
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)

    def reference(x):
        out = torch.nn.functional.linear(x, base.weight, base.bias)
        parts, cursor = [], 0
        for (start, end), a, b, m in zip(layer.slices, layer.lora_A, layer.lora_B, layer.magnitude, strict=True):
            w = base.weight[start:end]
            n = (w.float() + scaling * b.float() @ a.float()).norm(dim=1).detach()
            pre = (
                torch.nn.functional.linear(x, w)
                + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scaling
            )
            parts += [out[..., cursor:start], (m / n) * pre + base.bias[start:end]]
            cursor = end
        return torch.cat([*parts, out[..., cursor:]], dim=-1)

    params = [base.weight, base.bias, *layer.lora_A, *layer.lora_B, *layer.magnitude]
    weight = torch.randn(3, 5, 48, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        got, want = _grads(layer, x, params, weight), _grads(reference, x, params, weight)
    for g, w in zip(got, want, strict=True):  # bf16: within 3% of each tensor's largest entry
        atol = 3e-2 * w.float().abs().max().item() if amp else 1e-5
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2 if amp else 1e-5, atol=atol)


@pytest.mark.parametrize("slices", [[(0, 16), (32, 48)], [(0, 48)]])
def test_lora_with_dropout_matches_the_formula(slices) -> None:
    """The dropout path (one up-projection with a zero-padded weight, its add fused) against the formula,
    with the same dropout mask."""
    from vpeft.methods.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48).requires_grad_(False)
    layer = LoRALinear(base, slices, 4, 0.5, 0.3).train()
    for b in layer.lora_B:
        torch.nn.init.normal_(b)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def seeded(fn):
        def call(x):
            torch.manual_seed(7)
            return fn(x)

        return call

    def reference(x):
        h, out = torch.nn.functional.dropout(x, 0.3), base(x)
        for (start, end), a, b in zip(layer.slices, layer.lora_A, layer.lora_B, strict=True):
            delta = torch.nn.functional.linear(torch.nn.functional.linear(h, a), b) * 0.5
            out = out + torch.nn.functional.pad(delta, (start, 48 - end))
        return out

    params, weight = [*layer.lora_A, *layer.lora_B], torch.randn(3, 5, 48)
    for g, w in zip(
        _grads(seeded(layer), x, params, weight), _grads(seeded(reference), x, params, weight), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv", "layernorm"])
@pytest.mark.parametrize("device", DEVICES)
def test_ssf_keeps_the_activation_dtype_under_autocast(kind: str, device: str) -> None:
    """Under bf16 autocast SSF's output has the wrapped layer's dtype (no fp32 copy of the activations), and
    its outputs and gradients match gamma * layer(x) + beta."""
    from vpeft.methods.ssf import ScaleShift

    torch.manual_seed(0)
    base = {"linear": torch.nn.Linear(16, 24), "conv": torch.nn.Conv2d(3, 8, 3), "layernorm": torch.nn.LayerNorm(16)}[
        kind
    ]
    base.requires_grad_(False)
    layer = ScaleShift(base, 0.1).to(device)
    x = torch.randn(4, 3, 9, 9, device=device) if kind == "conv" else torch.randn(4, 5, 16, device=device)
    x.requires_grad_(True)
    shape = [1, -1, 1, 1] if kind == "conv" else [-1]

    def reference(x):
        return base(x) * layer.scale.view(shape) + layer.shift.view(shape)

    for amp in (False, True):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            weight = torch.randn(base(x).shape, device=device)
            got = _grads(layer, x, [layer.scale, layer.shift], weight)
            want = _grads(reference, x, [layer.scale, layer.shift], weight)
            plain = base(x).dtype
        assert got[0].dtype == plain  # bf16 after a Linear or conv, fp32 after a norm, as without SSF
        for g, w in zip(got, want, strict=True):
            tol = 2e-2 if amp else 1e-5
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


def _check_against(model, reference, x, amp: bool) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out_ref = reference(x)
        weight = torch.randn(out_ref.shape, device=x.device)
        want = (out_ref, *torch.autograd.grad((out_ref.float() * weight).sum(), [x, *params]))
        got = _grads(model, x, params, weight)
    tol = 3e-2 if amp else 1e-5
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


def _randomise(model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_repadapter_folded_path_matches_the_formula(amp: bool, device: str) -> None:
    """base(x + s (B (A x + a) + c)) with B group-wise, the form the paper writes, against the folded forward."""
    from vpeft.methods.repadapter import RepAdapterConfig, RepAdapterLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).requires_grad_(False)
    layer = RepAdapterLinear(base, RepAdapterConfig(hidden=4, groups=2, scale=0.7, dropout=0.0))
    _randomise(layer)

    def reference(x):
        h = layer.down(x).unflatten(-1, (2, 2))
        up = torch.einsum("...gi,goi->...go", h, layer.up_weight).flatten(-2) + layer.up_bias
        return base(x + 0.7 * up)

    _check_against(layer.to(device), reference, torch.randn(3, 5, 16, device=device, requires_grad=True), amp)


@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_convpass_fused_path_matches_the_formula(prefix: int, amp: bool, device: str) -> None:
    """f(h) + s up(qgelu(conv3x3(qgelu(down h)))) with prefix tokens through the centre tap, written plainly."""
    from vpeft.methods.convpass import ConvBypass, ConvpassConfig, ParallelBypass, quick_gelu

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 16).requires_grad_(False)
    bypass = ConvBypass(16, ConvpassConfig(hidden=4, dropout=0.0), prefix, (3, 3), base.weight)
    layer = ParallelBypass(base, bypass, 0.3)
    _randomise(layer)

    def reference(h):
        z = quick_gelu(bypass.down(h))
        b, _, r = z.shape
        patches = bypass.conv(z[:, prefix:].transpose(1, 2).reshape(b, r, 3, 3)).flatten(2).transpose(1, 2)
        cls = torch.nn.functional.linear(z[:, :prefix], bypass.conv.weight[:, :, 1, 1], bypass.conv.bias)
        z = quick_gelu(torch.cat([cls, patches], dim=1))
        return base(h) + 0.3 * bypass.up(z)

    x = torch.randn(2, prefix + 9, 16, device=device, requires_grad=True)
    _check_against(layer.to(device), reference, x, amp)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_adaptformer_fused_path_matches_the_formula(amp: bool, device: str) -> None:
    """mlp(norm(x)) + s up(relu(down x)), written plainly, against the fused add."""
    from vpeft.methods.adaptformer import AdaptFormerConfig, ParallelAdapter
    from vpeft.modules import InputTap, Stash

    torch.manual_seed(0)
    mlp, norm, stash = torch.nn.Linear(16, 16).requires_grad_(False), torch.nn.LayerNorm(16), Stash()
    norm.requires_grad_(False)
    tap, layer = InputTap(norm, stash), ParallelAdapter(mlp, 16, AdaptFormerConfig(bottleneck=4, scale=0.1), stash)
    _randomise(layer)
    adapter = layer.adapter

    def reference(x):
        return mlp(norm(x)) + 0.1 * adapter.up(torch.relu(adapter.down(x)))

    model = torch.nn.Sequential(tap, layer).to(device)
    _check_against(model, reference, torch.randn(2, 5, 16, device=device, requires_grad=True), amp)


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_mona_folded_path_matches_the_formula(prefix: int, amp: bool, device: str) -> None:
    """out + up(gelu(MonaOp(down(gamma LN(y) + gamma_x y)))), y = x + out, with the three depth-wise convolutions,
    their average, the skips and the projector written out, against the folded forward."""
    from vpeft.methods.mona import MonaBranch, MonaConfig

    torch.manual_seed(0)
    branch = MonaBranch(16, MonaConfig(hidden=4, dropout=0.0), prefix, (3, 3), torch.empty(1))
    _randomise(branch)
    F = torch.nn.functional

    def reference(inputs):
        x, out = inputs[..., 0], inputs[..., 1]
        y = x + out
        h = F.layer_norm(y, (16,), branch.norm.weight, branch.norm.bias) * branch.gamma + y * branch.gamma_x
        z = branch.down(h)
        b, _, r = z.shape
        g = z[:, prefix:].transpose(1, 2).reshape(b, r, 3, 3)
        g = g + sum(conv(g) for conv in branch.dw) / 3
        g = g + branch.projector(g)
        z = torch.cat([z[:, :prefix], g.flatten(2).transpose(1, 2)], dim=1)
        return out + branch.up(F.gelu(z))

    def fused(inputs):
        x, out = inputs[..., 0], inputs[..., 1]
        return branch.add_to(out, x + out)

    branch.to(device)
    inputs = torch.randn(2, prefix + 9, 16, 2, device=device, requires_grad=True)  # x and out, stacked
    params = [p for p in branch.parameters() if p.requires_grad]
    weight = torch.randn(2, prefix + 9, 16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        got, want = _grads(fused, inputs, params, weight), _grads(reference, inputs, params, weight)
    for g, w in zip(got, want, strict=True):  # bf16: within 3% of each tensor's largest entry
        atol = 3e-2 * w.float().abs().max().item() if amp else 1e-5
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2 if amp else 1e-5, atol=atol)


@pytest.mark.parametrize("layer", ["attn.qkv", "mlp.fc1", "mlp.fc2"])
@pytest.mark.parametrize("amp", [False, True])
def test_fact_fused_path_matches_the_formula(layer: str, amp: bool) -> None:
    """base(x) + s (x_i U) S_oi V^T per d x d block (o out, i in), written blockwise, against the fused forward
    (one down weight, the scale and the add in the up-projection's matmul)."""
    import timm

    import vpeft

    from conftest import VIT_KW

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT_KW, "mlp_ratio": 4.0})
    model = vpeft.apply(model, "fact_tt", rank=4, scale=0.7, dropout=0.0)
    _randomise(model)
    wrapper = model.blocks[0].get_submodule(layer)
    f, base, cores = model.vpeft_fact, wrapper.base_layer, wrapper.core
    o, i, _, _ = cores.shape
    d = f.u.shape[0]

    def reference(x):
        ux = x.unflatten(-1, (i, d)) @ f.u  # (..., i, r)
        z = torch.stack([sum(ux[..., k, :] @ cores[j, k].T for k in range(i)) for j in range(o)], dim=-2)
        return base(x) + 0.7 * (z @ f.v.T).flatten(-2)

    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    params, weight = [p for p in wrapper.parameters() if p.requires_grad] + [f.u, f.v], torch.randn(2, 5, o * d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        got, want = _grads(wrapper, x, params, weight), _grads(reference, x, params, weight)
    for g, w in zip(got, want, strict=True):  # bf16: within 3% of each tensor's largest entry
        assert g.dtype == w.dtype
        atol = 3e-2 * w.float().abs().max().item() if amp else 1e-5
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2 if amp else 1e-5, atol=atol)
