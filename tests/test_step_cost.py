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
