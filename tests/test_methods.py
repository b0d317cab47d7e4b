"""Table-driven checks of every method on every backbone: one (method x backbone) matrix."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vpeft
from test_methods_wave3 import SPECS as WAVE3
from vpeft.errors import UnsupportedBackboneError

from conftest import BACKBONES, IMG, NUM_CLASSES, make_backbone, make_input

METHODS = [m["name"] for m in vpeft.list_methods() if m["name"] not in WAVE3]
#: methods whose papers start from the unchanged model
IDENTITY_AT_INIT = set(METHODS) - {"vpt_shallow", "vpt_deep", "prefix", "mona", "noah", "sct"}
#: methods that read the training split before they are applied (GPS, SPT, SCT)
STAGED = {m for m in METHODS if vpeft.get_method(m).stage is not None}
#: which (method, backbone) pairs must refuse, beyond the method's declared families
REFUSED = {("ln_tune", "resnet"), ("ln_tune", "efficientnet"), ("dora", "resnet"), ("dora", "efficientnet")}


def applies(method: str, backbone: str) -> bool:
    if (method, backbone) in REFUSED:
        return False
    family = vpeft.describe(make_backbone(backbone)).family
    return family in vpeft.get_method(method).backbones


CASES = [(m, b) for m in METHODS for b in BACKBONES]


def stage_data(n: int = 10, seed: int = 5) -> torch.utils.data.TensorDataset:
    """A small training split for the methods with a data stage: random images, every class present."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.arange(n) % NUM_CLASSES)


_SELECTIONS: dict[tuple[str, str], dict] = {}


def selection(method: str, backbone: str) -> dict:
    """The selection a staged method makes on a backbone from :func:`stage_data`, computed once per pair."""
    if (method, backbone) not in _SELECTIONS:
        model = vpeft.apply(make_backbone(backbone), method, data=stage_data())
        _SELECTIONS[method, backbone] = vpeft.get_state(model).config.selection
    return _SELECTIONS[method, backbone]


def _apply(method: str, backbone: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = make_backbone(backbone, seed)
    options = {"selection": selection(method, backbone)} if method in STAGED else {}
    model = vpeft.apply(copy.deepcopy(base), method, **options)
    return base, model.eval()


def _perturb_trainable(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable parameter away from its init (B=0, up=0 ...) so updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method,backbone", CASES)
def test_apply_or_refuse(method: str, backbone: str) -> None:
    base = make_backbone(backbone)
    if not applies(method, backbone):
        with pytest.raises(UnsupportedBackboneError, match=method):
            vpeft.apply(base, method, data=stage_data() if method in STAGED else None)
        return
    model = vpeft.apply(base, method, data=stage_data() if method in STAGED else None)
    out = model(make_input())
    assert out.shape == (2, NUM_CLASSES)
    assert vpeft.count_trainable(model) > vpeft.count_trainable(model, include_head=False) or method == "full"


@pytest.mark.parametrize("method,backbone", [c for c in CASES if c[0] in IDENTITY_AT_INIT])
def test_identity_at_init(method: str, backbone: str) -> None:
    if not applies(method, backbone):
        pytest.skip("method does not apply to this backbone")
    base, model = _apply(method, backbone)
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,backbone", CASES)
def test_one_step_changes_only_method_and_head(method: str, backbone: str) -> None:
    if not applies(method, backbone):
        pytest.skip("method does not apply to this backbone")
    _, model = _apply(method, backbone)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = vpeft.trainable_parameters(model)
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(make_input(4)), torch.arange(4) % NUM_CLASSES)
    loss.backward()
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= set(trainable), f"frozen parameters changed: {sorted(changed - set(trainable))[:5]}"
    method_params = set(vpeft.trainable_parameters(model, include_head=False))
    if method_params:
        assert changed & method_params, "no parameter of the method changed after a step"


@pytest.mark.parametrize("method,backbone", CASES)
def test_save_load_round_trip(method: str, backbone: str, tmp_path) -> None:
    if not applies(method, backbone):
        pytest.skip("method does not apply to this backbone")
    base, model = _apply(method, backbone)
    _perturb_trainable(model)
    vpeft.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert set(saved) == set(vpeft.trainable_parameters(model))
    fresh = vpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


MERGEABLE = [m["name"] for m in vpeft.list_methods() if m["mergeable"]]


@pytest.mark.parametrize("method,backbone", [c for c in CASES if c[0] in MERGEABLE])
def test_merge_equals_unmerged(method: str, backbone: str) -> None:
    if not applies(method, backbone):
        pytest.skip("method does not apply to this backbone")
    base, model = _apply(method, backbone)
    _perturb_trainable(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        vpeft.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        if backbone.startswith(("vit", "deit")):
            merged = model.state_dict()
            plain = base.state_dict()
            assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in plain.items()}
            reloaded = copy.deepcopy(base)
            reloaded.load_state_dict(merged, strict=True)
            torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)
        vpeft.unmerge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


NOT_MERGEABLE = sorted(set(METHODS) - set(MERGEABLE))


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_merge_refused_for_non_mergeable(method: str) -> None:
    _, model = _apply(method, "vit")
    with pytest.raises(vpeft.NotMergeableError, match="cannot be folded"):
        vpeft.merge(model)


# ---------------------------------------------------------------- closed-form parameter counts


def _vit_b():
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


@pytest.mark.parametrize(
    "method,options,expected",
    [
        ("lora", dict(rank=8, targets=["q", "v"]), 12 * 2 * (768 * 8 + 8 * 768)),
        ("adapter", {}, 12 * (768 * 8 + 8 + 8 * 768 + 768)),
        ("adaptformer", {}, 12 * (768 * 8 + 8 + 8 * 768 + 768)),
        ("bitfit", {}, 102_912),
        ("ssf", {}, 205_824),
        ("ln_tune", {}, (12 * 2 + 1) * 2 * 768),
        ("vpt_shallow", dict(num_tokens=100), 100 * 768),
        ("vpt_deep", dict(num_tokens=50), 12 * 50 * 768),
        ("linear", {}, 0),
        ("dora", {}, 294_912 + 12 * 2 * 768),
        ("repadapter", {}, 12 * 2 * (768 * 8 + 8 + 4 * 768 + 768)),
        ("convpass", {}, 12 * 2 * (768 * 8 + 8 + 8 * 8 * 9 + 8 + 8 * 768 + 768)),
        ("fact_tt", dict(rank=16), 2 * 768 * 16 + 12 * 12 * 16 * 16),
        ("fact_tk", dict(rank=32), 2 * 768 * 32 + 32**3 + 12 * 12 * 32),
    ],
)
def test_vit_b16_counts(method: str, options: dict, expected: int) -> None:
    model = vpeft.apply(_vit_b(), method, **options)
    assert vpeft.count_trainable(model, include_head=False) == expected
    assert vpeft.count_trainable(model) == expected + 768 * 100 + 100


def test_vit_b16_known_published_counts() -> None:
    """The issue's figures: LoRA 294,912; Adapter/AdaptFormer 156,768; BitFit 102,912; SSF 205,824."""
    got = {
        m: vpeft.count_trainable(vpeft.apply(_vit_b(), m), include_head=False)
        for m in ("lora", "adapter", "adaptformer", "bitfit", "ssf")
    }
    assert got == {"lora": 294_912, "adapter": 156_768, "adaptformer": 156_768, "bitfit": 102_912, "ssf": 205_824}


def test_vit_b16_selection_counts() -> None:
    """GPS (k=1) and SCT (K=96) on ViT-B/16; their counts do not depend on which entries the data selects."""
    from vpeft.methods.gps import layout

    model = _vit_b()
    matrices, _ = layout(model, vpeft.describe(model))
    first_column = {n: [r * m.weight[0].numel() for r in range(m.weight.shape[0])] for n, m in matrices.items()}
    gps = vpeft.apply(model, "gps", selection=first_column)
    rows = 768 + 12 * (3 * 768 + 768 + 3072 + 768)  # patch embedding, qkv, proj, fc1, fc2
    assert vpeft.count_trainable(gps, include_head=False) == rows + rows == 167_424  # one entry per row + biases
    sct = vpeft.apply(_vit_b(), "sct", selection={f"blocks.{i}": list(range(96)) for i in range(12)})
    assert vpeft.count_trainable(sct, include_head=False) == 12 * (96 * 96 + 96) == 111_744


def _small_vit_closed_forms(d: int, depth: int, hidden: int, patch: int, prefix: int) -> dict:
    return {
        "lora": depth * 2 * 2 * d * 8,
        "adapter": depth * (2 * d * 8 + 8 + d),
        "adaptformer": depth * (2 * d * 8 + 8 + d),
        "bitfit": depth * (3 * d + d + hidden + d + 2 * d) + d + d,
        "ssf": 2 * (depth * (3 * d + d + hidden + d + 2 * d) + d + d),
        "ln_tune": 2 * d * (2 * depth + 1),
        "vpt_shallow": 100 * d,
        "vpt_deep": depth * 50 * d,
        "linear": 0,
        "dora": depth * 2 * 2 * d * 8 + depth * 2 * d,
        # shared rank 8 + task rank 8 on qkv (d -> 3d), proj (d -> d), fc1 (d -> hidden), fc2 (hidden -> d)
        "mtlora": depth * (8 + 8) * ((d + 3 * d) + (d + d) + (d + hidden) + (hidden + d)),
        "repadapter": depth * 2 * (d * 8 + 8 + 4 * d + d),
        "convpass": depth * 2 * (d * 8 + 8 + 8 * 8 * 9 + 8 + 8 * d + d),
        "fact_tt": 2 * d * 16 + depth * (3 + 1 + 2 + 2) * 16 * 16,
        "fact_tk": 2 * d * 32 + 32**3 + depth * (3 + 1 + 2 + 2) * 32,
        "mona": depth * 2 * (4 * d + d * 64 + 64 + 64 * (9 + 25 + 49) + 3 * 64 + 64 * 64 + 64 + 64 * d + d),
        "prefix": 10 * d + d * 512 + 512 + 512 * depth * 2 * d + depth * 2 * d,
        "lst": depth * (4 * 6 + 6 * 18 + 18 + 6 * 6 + 6 + 6 * 24 + 24 + 24 * 6 + 6)
        + depth * (d * 6 + 6)
        + depth
        + 2 * 6
        + 6 * d
        + d,
        "noah": depth * (10 * d + 2 * 2 * d * 8 + 2 * d * 8 + 8 + d),
        # k=1 entry per row of patch embedding, qkv, proj, fc1, fc2, plus every bias
        "gps": 2 * (d + depth * (3 * d + d + hidden + d)),
        "sct": depth * (d * d + d),  # K = min(96, d)
        "partial_k": (4 * d * d + 3 * d + d + 2 * d * hidden + hidden + d + 4 * d) + 2 * d,
    }


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full" and not m.startswith("spt")])
def test_small_vit_closed_forms(method: str) -> None:
    """SPT's count depends on the data: tests/test_selection.py checks it against its selection."""
    _, model = _apply(method, "vit")
    expected = _small_vit_closed_forms(d=48, depth=2, hidden=96, patch=8, prefix=1)[method]
    assert vpeft.count_trainable(model, include_head=False) == expected


def test_full_trains_everything() -> None:
    model = vpeft.apply(make_backbone("swin"), "full")
    assert vpeft.count_trainable(model) == vpeft.count_parameters(model)


# ---------------------------------------------------------------- method-specific behaviour


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a transposed view of an existing weight allocates nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_lora_fused_qkv_never_builds_delta_weight() -> None:
    model = vpeft.apply(make_backbone("vit"), "lora", targets=["q", "v"])
    _perturb_trainable(model)
    d = 48
    with _ShapeRecorder() as rec:
        model(make_input()).sum().backward()
    weight_shapes = {(d, d), (3 * d, d), (d, 3 * d)}
    assert not weight_shapes & set(rec.shapes), "a full-size delta weight was materialised"


def test_lora_adapts_only_q_and_v_slices() -> None:
    model = vpeft.apply(make_backbone("vit"), "lora", targets=["q", "v"])
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == [(0, 48), (96, 144)]
    _perturb_trainable(model)
    x = torch.randn(3, 48)
    with torch.no_grad():
        delta = qkv(x) - qkv.base_layer(x)
    assert delta[:, 48:96].abs().max() == 0
    assert delta[:, :48].abs().max() > 0 and delta[:, 96:].abs().max() > 0


def test_lora_by_pattern_on_cnn_convs() -> None:
    model = vpeft.apply(make_backbone("resnet"), "lora", targets=[r"re:layer\d\.\d\.conv2"], rank=2)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "LoRAConv2d"]
    assert wrapped and all(n.endswith("conv2") for n in wrapped)


@pytest.mark.parametrize("backbone", ["vit", "vit_reg_avg", "vit_reg_cls", "deit_distilled"])
@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_vpt_token_layout(method: str, backbone: str) -> None:
    base = make_backbone(backbone)
    prefix = vpeft.describe(base).num_prefix_tokens
    model = vpeft.apply(copy.deepcopy(base), method, num_tokens=3, dropout=0.0).eval()
    seen = {}
    model.blocks[0].base_layer.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    base.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("base_in", a[0]))
    x = make_input()
    with torch.no_grad():
        feats = model.forward_features(x)
        base_feats = base.forward_features(x)
    n_base = seen["base_in"].shape[1]
    assert seen["in"].shape[1] == n_base + 3
    torch.testing.assert_close(seen["in"][:, :prefix], seen["base_in"][:, :prefix])  # class/dist/reg tokens first
    torch.testing.assert_close(seen["in"][:, prefix : prefix + 3], model.blocks[0].prompt.expand(2, -1, -1))
    torch.testing.assert_close(seen["in"][:, prefix + 3 :], seen["base_in"][:, prefix:])  # then the patches
    assert feats.shape == base_feats.shape  # prompts removed before pooling
    assert not torch.allclose(feats, base_feats)  # ... but they did take part in attention


def test_vpt_init_bound() -> None:
    model = vpeft.apply(make_backbone("vit"), "vpt_deep", num_tokens=20)
    bound = (6.0 / (3 * 8 * 8 + 48)) ** 0.5
    for block in model.blocks:
        assert block.prompt.abs().max() <= bound
        assert block.prompt.abs().max() > 0.5 * bound


def test_adapter_houlsby_has_two_per_block() -> None:
    model = vpeft.apply(make_backbone("vit"), "adapter", placement="houlsby", bottleneck=4)
    assert vpeft.count_trainable(model, include_head=False) == 2 * 2 * (2 * 48 * 4 + 4 + 48)


def test_partial_k_trains_last_blocks_and_final_norm() -> None:
    model = vpeft.apply(make_backbone("vit"), "partial_k", k=1)
    names = set(vpeft.trainable_parameters(model, include_head=False))
    assert all(n.startswith(("blocks.1.", "norm.")) for n in names)
    assert "norm.weight" in names and "blocks.1.attn.qkv.weight" in names


@pytest.mark.parametrize(
    "options", [dict(reparameterization="shared"), dict(reparameterization="per_layer"), dict(reparameterize=False)]
)
def test_prefix_attention_matches_reference(options: dict) -> None:
    """Attention over [prefix; tokens], computed naively from the layer's own weights."""
    model = vpeft.apply(make_backbone("vit_reg_cls"), "prefix", num_tokens=4, **options).eval()
    _perturb_trainable(model)
    wrapper = model.blocks[0].attn
    attn, (pk, pv) = wrapper.base_layer, model.vpeft_prefix.layer(0)
    x = torch.randn(2, 21, 48)
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(2, 21, 3, h, hd).permute(2, 0, 3, 1, 4)
    k = torch.cat([pk.reshape(1, 4, h, hd).transpose(1, 2).expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.reshape(1, 4, h, hd).transpose(1, 2).expand(2, -1, -1, -1), v], dim=2)
    weights = (q @ k.transpose(-1, -2) / hd**0.5).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 21, 48))
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


def test_mona_branch_sees_the_residual_stream() -> None:
    """Mona after attention equals y + delta(y) with y = x + attn(norm1(x)), computed by hand."""
    base = make_backbone("vit")
    model = vpeft.apply(copy.deepcopy(base), "mona", dropout=0.0).eval()
    x = torch.randn(2, 17, 48)
    block, ref = model.blocks[0], base.blocks[0]
    with torch.no_grad():
        y = x + ref.attn(ref.norm1(x))
        y = y + block.attn.branch(y)
        y = y + ref.mlp(ref.norm2(y))
        y = y + block.mlp.branch(y)
        torch.testing.assert_close(block(x), y, rtol=1e-5, atol=1e-5)


def test_lst_builds_no_backward_graph_through_the_backbone() -> None:
    model = vpeft.apply(make_backbone("vit"), "lst").train()
    _perturb_trainable(model)
    outputs = []
    for block in model.blocks:
        block.base_layer.register_forward_hook(lambda m, a, out: outputs.append(out))
    model(make_input()).sum().backward()
    assert len(outputs) == 2 and all(o.grad_fn is None and not o.requires_grad for o in outputs)
    assert model.vpeft_lst.down[0].weight.grad is not None and model.vpeft_lst.alpha.grad is not None


@pytest.mark.parametrize("backbone", ["vit", "swin", "resnet", "convnext", "efficientnet"])
def test_ssf_fast_paths_match_the_plain_formula(backbone: str) -> None:
    """The LayerNorm fold and the custom backward give gamma * base(x) + beta and autograd's gradients."""
    from vpeft.methods.ssf import ScaleShift

    model = vpeft.apply(make_backbone(backbone), "ssf", init_std=0.1).train()
    wrappers = [m for m in model.modules() if isinstance(m, ScaleShift)]
    assert any(w.fold_into_norm for w in wrappers) == (backbone in ("vit", "swin", "convnext"))
    inputs: dict[torch.nn.Module, torch.Tensor] = {}

    def keep_input(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.setdefault(module, args[0].detach())

    for w in wrappers:
        w.register_forward_hook(keep_input)
    model(make_input())
    assert len(inputs) == len(wrappers)
    for w, x in inputs.items():
        x = x.clone().requires_grad_(True)
        grad_out = torch.randn_like(w(x))
        fast = torch.autograd.grad(w(x), (x, w.scale, w.shift), grad_out)
        shape = [1] * x.ndim
        shape[w.channel_dim] = -1
        plain_out = w.scale.view(shape) * w.base_layer(x) + w.shift.view(shape)
        plain = torch.autograd.grad(plain_out, (x, w.scale, w.shift), grad_out)
        torch.testing.assert_close(w(x), plain_out, rtol=1e-5, atol=1e-5)
        for a, b in zip(fast, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
