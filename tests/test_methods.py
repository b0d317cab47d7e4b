"""Table-driven checks of every method on every backbone: one (method x backbone) matrix.

Each method has one row in ``SPECS``: the options under which the paper starts from the unchanged
model (None where it does not), its trainable count in closed form on the small test ViT, on ViT-B/16
and, for some, on Swin, and, for side methods, the blocks that must build no autograd graph.
``APPLIES`` is the expected (method, backbone) applicability, which the methods' required parts must give.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import vpeft
from vpeft.backbones.vit import VIT_PARTS
from vpeft.errors import UnsupportedBackboneError

from conftest import BACKBONES, IMG, NUM_CLASSES, make_backbone, make_input

#: the small test ViT of conftest: width, depth, MLP width
D, DEPTH, HIDDEN = 48, 2, 96


@dataclass
class Spec:
    #: options under which the model equals the backbone at step 0; None: the paper's init is not the identity
    identity: dict | None
    #: closed-form trainable count (head excluded) on conftest's "vit" with default options; None: data-dependent
    small_vit: int | None
    #: the same on ViT-B/16 (d = 768, 12 blocks, MLP 3072, 196 patches) with ``vit_b_options``; None: not checked
    vit_b: int | None = None
    vit_b_options: dict = field(default_factory=dict)
    #: blocks (by index, on the small ViT) that must run without an autograd graph
    frozen_blocks: tuple[int, ...] = ()
    #: options used by every generic test (e.g. to switch off a training-only randomness)
    options: dict = field(default_factory=dict)
    #: input width of the classifier head (HST's head reads its side network's last stage, 72 wide)
    head_in: int = 768
    #: merging adds biases to bias-free layers (SSF on Swin's downsampling and CNN convs): the merged state
    #: dict has the backbone's keys only on ViTs
    merge_adds_biases: bool = False
    #: closed-form counts on conftest's "swin" (widths 16, 32; one block each) and on Swin-B, for Swin methods
    small_swin: int | None = None
    swin_b: int | None = None


def _adapter_plus(d: int, depth: int, r: int = 8) -> int:
    return depth * (d * r + r + r * d + d + d)


def _dtl(d: int, depth: int, r: int = 2) -> int:
    return depth * 2 * d * r


def _hydra_layer(fan_in: int, fan_out: int, r: int = 2) -> int:
    return (fan_in * r + r + r * fan_out + fan_out) + (fan_out * r + r + r * fan_out + fan_out)


def _hydra(d: int, depth: int, hidden: int) -> int:
    return depth * (_hydra_layer(d, d) + _hydra_layer(hidden, d))


def _glora_layer(fan_in: int, fan_out: int, r: int = 4) -> int:
    """Default configuration: A, C, D, E vectors (out, in, out, out), B rank-r."""
    return fan_out + r * (fan_in + fan_out) + fan_in + 2 * fan_out


def _glora(d: int, depth: int, hidden: int) -> int:
    return depth * (_glora_layer(d, 3 * d) + _glora_layer(d, d) + _glora_layer(d, hidden) + _glora_layer(hidden, d))


def _bapat(d: int, depth: int, mid: int = 128, ffn: int = 64) -> int:
    return depth * ((d * mid + mid + mid * 2 * d + 2 * d) + (d * ffn + ffn + ffn * d + d))


def _hst(d: int, read: int, vit_depth: int, dims=(32, 48, 64, 72), depths=(3, 3, 3, 3)) -> int:
    """HST on a ViT of width d and depth vit_depth whose side network reads ``read`` of its blocks."""
    m_blocks = sum(
        k * (12 * c * c + 13 * c) for c, k in zip(dims, depths, strict=True)
    )  # LN, q, k, v, proj, LN, MLP x4
    stem = 9 * 3 * dims[0] + 2 * dims[0] + 4 * dims[0] * dims[0] + dims[0] + 2 * dims[0]  # conv, BN, conv, LN
    downs = sum(9 * a * b + b + 2 * b for a, b in itertools.pairwise(dims))  # 3x3 conv + LN
    stage_norms = 2 * sum(dims)
    bridges = sum((d + 1) * c for c in dims)
    meta_norms = sum(k * 2 * c for c, k in zip(dims, depths, strict=True))
    return m_blocks + stem + downs + stage_norms + bridges + meta_norms + read * d + vit_depth * 4 * d


def _last(d: int, depth: int, r: int = 16) -> int:
    return depth * (2 * d + (d * 3 * r + 3 * r) + (r * d + d))  # LN, fused q/k/v, output projection


def _lorand_layer(fan_in: int, fan_out: int, branches: int = 2, kernel: int = 8) -> int:
    """sum_i P_i K_i Q_i and a bias, without the kernels K_i."""
    return branches * (fan_in * kernel + kernel * fan_out) + fan_out


def lorand_count(widths: list[int], shared: bool = True, branches: int = 2, kernel: int = 8) -> int:
    """Two LoRand adapters (down to width / 2 and back up) per block; ``widths``: each block's width.
    The adapter's two layers share one set of kernels (``shared``) or have one each."""
    kernels = (1 if shared else 2) * branches * kernel * kernel
    return sum(2 * (_lorand_layer(d, d // 2) + _lorand_layer(d // 2, d) + kernels) for d in widths)


#: block widths of Swin-B (depths 2, 2, 18, 2; widths 128 ... 1024) and of conftest's small Swin
SWIN_B = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2
SMALL_SWIN = [16, 32]

SPECS: dict[str, Spec] = {
    "lora": Spec(
        identity={},
        small_vit=DEPTH * 2 * 2 * D * 8,
        vit_b=12 * 2 * (768 * 8 + 8 * 768),
        vit_b_options=dict(rank=8, targets=["q", "v"]),
    ),
    "adapter": Spec(identity={}, small_vit=DEPTH * (2 * D * 8 + 8 + D), vit_b=12 * (768 * 8 + 8 + 8 * 768 + 768)),
    "adaptformer": Spec(identity={}, small_vit=DEPTH * (2 * D * 8 + 8 + D), vit_b=12 * (768 * 8 + 8 + 8 * 768 + 768)),
    "bitfit": Spec(identity={}, small_vit=DEPTH * (3 * D + D + HIDDEN + D + 2 * D) + D + D, vit_b=102_912),
    "ssf": Spec(
        identity={},
        small_vit=2 * (DEPTH * (3 * D + D + HIDDEN + D + 2 * D) + D + D),
        vit_b=205_824,
        merge_adds_biases=True,
    ),
    "ln_tune": Spec(identity={}, small_vit=2 * D * (2 * DEPTH + 1), vit_b=(12 * 2 + 1) * 2 * 768),
    "vpt_shallow": Spec(identity=None, small_vit=100 * D, vit_b=100 * 768, vit_b_options=dict(num_tokens=100)),
    "vpt_deep": Spec(identity=None, small_vit=DEPTH * 50 * D, vit_b=12 * 50 * 768, vit_b_options=dict(num_tokens=50)),
    "linear": Spec(identity={}, small_vit=0, vit_b=0),
    "full": Spec(identity={}, small_vit=None),
    "dora": Spec(identity={}, small_vit=DEPTH * 2 * 2 * D * 8 + DEPTH * 2 * D, vit_b=294_912 + 12 * 2 * 768),
    # shared rank 8 + task rank 8 on qkv (d -> 3d), proj (d -> d), fc1 (d -> hidden), fc2 (hidden -> d)
    "mtlora": Spec(identity={}, small_vit=DEPTH * (8 + 8) * ((D + 3 * D) + (D + D) + (D + HIDDEN) + (HIDDEN + D))),
    "repadapter": Spec(
        identity={}, small_vit=DEPTH * 2 * (D * 8 + 8 + 4 * D + D), vit_b=12 * 2 * (768 * 8 + 8 + 4 * 768 + 768)
    ),
    "convpass": Spec(
        identity={},
        small_vit=DEPTH * 2 * (D * 8 + 8 + 8 * 8 * 9 + 8 + 8 * D + D),
        vit_b=12 * 2 * (768 * 8 + 8 + 8 * 8 * 9 + 8 + 8 * 768 + 768),
    ),
    "fact_tt": Spec(
        identity={},
        small_vit=2 * D * 16 + DEPTH * (3 + 1 + 2 + 2) * 16 * 16,
        vit_b=2 * 768 * 16 + 12 * 12 * 16 * 16,
        vit_b_options=dict(rank=16),
    ),
    "fact_tk": Spec(
        identity={},
        small_vit=2 * D * 32 + 32**3 + DEPTH * (3 + 1 + 2 + 2) * 32,
        vit_b=2 * 768 * 32 + 32**3 + 12 * 12 * 32,
        vit_b_options=dict(rank=32),
    ),
    "mona": Spec(
        identity=None,
        small_vit=DEPTH * 2 * (4 * D + D * 64 + 64 + 64 * (9 + 25 + 49) + 3 * 64 + 64 * 64 + 64 + 64 * D + D),
    ),
    "prefix": Spec(identity=None, small_vit=10 * D + D * 512 + 512 + 512 * DEPTH * 2 * D + DEPTH * 2 * D),
    "lst": Spec(
        identity={},
        small_vit=DEPTH * (4 * 6 + 6 * 18 + 18 + 6 * 6 + 6 + 6 * 24 + 24 + 24 * 6 + 6)
        + DEPTH * (D * 6 + 6)
        + DEPTH
        + 2 * 6
        + 6 * D
        + D,
    ),
    "noah": Spec(identity=None, small_vit=DEPTH * (10 * D + 2 * 2 * D * 8 + 2 * D * 8 + 8 + D)),
    # k=1 entry per row of patch embedding, qkv, proj, fc1, fc2, plus every bias
    "gps": Spec(identity={}, small_vit=2 * (D + DEPTH * (3 * D + D + HIDDEN + D))),
    "sct": Spec(identity=None, small_vit=DEPTH * (D * D + D)),  # K = min(96, d)
    "partial_k": Spec(identity={}, small_vit=(4 * D * D + 3 * D + D + 2 * D * HIDDEN + HIDDEN + D + 4 * D) + 2 * D),
    # SPT's count depends on the data: tests/test_selection.py checks it against its selection
    "spt_lora": Spec(identity={}, small_vit=None),
    "spt_adapter": Spec(identity={}, small_vit=None),
    # ---- issue 15's methods
    "adapter_plus": Spec(identity=dict(init="lora"), small_vit=_adapter_plus(D, DEPTH), vit_b=_adapter_plus(768, 12)),
    "dtl": Spec(identity={}, small_vit=_dtl(D, DEPTH), vit_b=_dtl(768, 12), frozen_blocks=(0, 1)),
    "dtl_plus": Spec(
        identity={}, small_vit=_dtl(D, DEPTH) + D * 9, vit_b=_dtl(768, 12) + 768 * 9, frozen_blocks=(0, 1)
    ),
    "hydra": Spec(identity={}, small_vit=_hydra(D, DEPTH, HIDDEN), vit_b=_hydra(768, 12, 3072)),
    "vfpt": Spec(identity=None, small_vit=DEPTH * 50 * D, vit_b=12 * 50 * 768),
    "glora": Spec(identity={}, small_vit=_glora(D, DEPTH, HIDDEN), vit_b=_glora(768, 12, 3072)),
    "utuning": Spec(identity={}, small_vit=DEPTH * 2 * (2 * D * 8 + 8 + D), vit_b=12 * 2 * (2 * 768 * 8 + 8 + 768)),
    "snf": Spec(identity=None, small_vit=DEPTH * 2 * (2 * D + 16 * (2 * D + 1)), vit_b=24 * (2 * 768 + 16 * 1537)),
    "bapat": Spec(identity=dict(attn_init="zero_up"), small_vit=_bapat(D, DEPTH), vit_b=_bapat(768, 12)),
    "e2vpt": Spec(identity=None, small_vit=DEPTH * (5 * D + 5 * D), vit_b=12 * (5 * 768 + 5 * 768)),
    # HST replaces the model's output (its head reads the side network): no identity at init. Gradients
    # flow through every block (the meta tokens enter each), so no block is graph-free.
    "hst": Spec(identity=None, small_vit=_hst(D, DEPTH, DEPTH), vit_b=_hst(768, 12, 12), head_in=72),
    # LAST: the paper gives no init; ours (zero output projections) starts from the backbone, tested below
    "last": Spec(identity=None, small_vit=_last(D, DEPTH), vit_b=_last(768, 12), frozen_blocks=(0, 1)),
    # the paper's (the author's code's) Kaiming init of every factor is not the identity; zero_up is
    "lorand": Spec(
        identity=dict(init="zero_up"),
        small_vit=lorand_count([D] * DEPTH),
        vit_b=lorand_count([768] * 12),
        small_swin=lorand_count(SMALL_SWIN),
        swin_b=lorand_count(SWIN_B),  # 1,197,312: the published 1.20M (COCO, Swin-B)
    ),
    # LoRand's adapters, two per block, on the highway, and the final norm (2 x the last width)
    "e3va": Spec(
        identity=dict(init="zero_up"),
        small_vit=lorand_count([D] * DEPTH) + 2 * D,
        vit_b=lorand_count([768] * 12) + 2 * 768,
        frozen_blocks=(0, 1),
        small_swin=lorand_count(SMALL_SWIN) + 2 * 32,
        swin_b=lorand_count(SWIN_B) + 2 * 1024,  # 1,199,360: the published 1.20M
    ),
}
METHODS = sorted(SPECS)
CASES = [(m, b) for m in METHODS for b in BACKBONES]

#: expected applicability, written down from the family names the methods declared before they declared parts
ANY_BACKBONE = {"bitfit", "full", "gps", "linear", "lora", "partial_k", "ssf"}
CONVNEXT = ANY_BACKBONE | {"dora", "ln_tune"}  # a CNN whose blocks have a Linear MLP and LayerNorms
SWIN = CONVNEXT | {
    "adapter", "adapter_plus", "adaptformer", "bapat", "e3va", "glora", "hydra", "lorand", "mtlora", "repadapter",
    "sct", "spt_adapter", "spt_lora", "utuning",
}  # fmt: skip
VIT = set(METHODS)
APPLIES: dict[str, set[str]] = {
    "vit": VIT, "vit_reg_avg": VIT, "vit_reg_cls": VIT, "deit_distilled": VIT, "swin": SWIN,
    "resnet": ANY_BACKBONE, "convnext": CONVNEXT, "efficientnet": ANY_BACKBONE,
}  # fmt: skip

#: methods that read the training split before they are applied (GPS, SPT, SCT)
STAGED = {m for m in METHODS if vpeft.get_method(m).stage is not None and not vpeft.get_method(m).prepared(
    vpeft.make_config(m))}  # fmt: skip


def applies(method: str, backbone: str) -> bool:
    return method in APPLIES[backbone]


def stage_data(n: int = 10, seed: int = 5) -> torch.utils.data.TensorDataset:
    """A small training split for the methods with a data stage: random images, every class present."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.arange(n) % NUM_CLASSES)


SELECTIONS: dict[tuple[str, str], dict] = {}


def selection(method: str, backbone: str) -> dict:
    """The selection a staged method makes on a backbone from :func:`stage_data`, computed once per pair."""
    if (method, backbone) not in SELECTIONS:
        model = vpeft.apply(make_backbone(backbone), method, data=stage_data())
        SELECTIONS[method, backbone] = vpeft.get_state(model).config.selection
    return SELECTIONS[method, backbone]


def apply_method(method: str, backbone: str, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, the method applied to a copy of it, in eval mode) with the row's options and ``options``."""
    base = make_backbone(backbone)
    staged = {"selection": selection(method, backbone)} if method in STAGED else {}
    model = vpeft.apply(copy.deepcopy(base), method, **{**SPECS[method].options, **staged, **options})
    return base, model.eval()


def perturb_trainable(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable parameter away from its init (B = 0, up = 0 ...) so updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_every_method_has_a_row_family_and_paper() -> None:
    listed = {m["name"]: m for m in vpeft.list_methods()}
    assert set(listed) == set(SPECS)
    for name, m in listed.items():
        assert m["family"] and m["paper"]
        assert bool(m["options"]) == bool(dataclasses.fields(vpeft.get_method(name).config_class))
        assert vpeft.get_method(name).requires <= VIT_PARTS  # every method applies to a timm ViT ...
        assert vpeft.get_method(name).single_run or name == "noah"  # ... and is in `bench --methods all`


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_required_parts_give_the_applicability_table(backbone: str) -> None:
    parts = vpeft.describe(make_backbone(backbone)).parts
    assert {m for m in METHODS if vpeft.get_method(m).requires <= parts} == APPLIES[backbone]


@pytest.mark.parametrize("method,backbone", CASES)
def test_apply_or_refuse(method: str, backbone: str) -> None:
    base = make_backbone(backbone)
    if not applies(method, backbone):
        with pytest.raises(UnsupportedBackboneError, match=f"'{method}' does not apply.*lacks"):
            vpeft.apply(base, method, data=stage_data() if method in STAGED else None)
        return
    model = vpeft.apply(base, method, data=stage_data() if method in STAGED else None, **SPECS[method].options)
    assert model(make_input()).shape == (2, NUM_CLASSES)
    method_count = vpeft.count_trainable(model, include_head=False)
    assert vpeft.count_trainable(model) > method_count or method == "full"
    assert method_count > 0 or method == "linear"


@pytest.mark.parametrize("method,backbone", [c for c in CASES if SPECS[c[0]].identity is not None and applies(*c)])
def test_identity_at_init(method: str, backbone: str) -> None:
    base, model = apply_method(method, backbone, **SPECS[method].identity)
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,backbone", [c for c in CASES if applies(*c)])
def test_one_step_changes_only_method_and_head(method: str, backbone: str) -> None:
    _, model = apply_method(method, backbone)
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


@pytest.mark.parametrize("method,backbone", [c for c in CASES if applies(*c)])
def test_save_load_round_trip(method: str, backbone: str, tmp_path) -> None:
    base, model = apply_method(method, backbone)
    perturb_trainable(model)
    vpeft.save_adapter(model, tmp_path)
    buffers = vpeft.get_method(method).saved_buffers(model)
    saved = set(load_file(str(tmp_path / "adapter.safetensors")))
    assert saved == set(vpeft.trainable_parameters(model)) | set(buffers)
    fresh = vpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


MERGEABLE = [m for m in METHODS if vpeft.get_method(m).mergeable]


@pytest.mark.parametrize("method,backbone", [c for c in CASES if c[0] in MERGEABLE and applies(*c)])
def test_merge_equals_unmerged(method: str, backbone: str) -> None:
    base, model = apply_method(method, backbone)
    perturb_trainable(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        vpeft.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        if not (SPECS[method].merge_adds_biases and not backbone.startswith(("vit", "deit"))):
            merged = model.state_dict()
            assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.state_dict().items()}
            reloaded = copy.deepcopy(base)
            reloaded.load_state_dict(merged, strict=True)
            torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)
        vpeft.unmerge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        vpeft.merge(model)  # a second round trip starts from the restored weights
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(MERGEABLE)))
def test_merge_refused_for_non_mergeable(method: str) -> None:
    _, model = apply_method(method, "vit")
    with pytest.raises(vpeft.NotMergeableError, match="cannot be folded"):
        vpeft.merge(model)


# ---------------------------------------------------------------- closed-form parameter counts


@pytest.mark.parametrize("method", [m for m in METHODS if SPECS[m].small_vit is not None])
def test_small_vit_closed_form(method: str) -> None:
    _, model = apply_method(method, "vit")
    assert vpeft.count_trainable(model, include_head=False) == SPECS[method].small_vit


def test_full_trains_everything() -> None:
    model = vpeft.apply(make_backbone("swin"), "full")
    assert vpeft.count_trainable(model) == vpeft.count_parameters(model)


@pytest.fixture(scope="module")
def vit_b() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


@pytest.mark.parametrize("method", [m for m in METHODS if SPECS[m].vit_b is not None])
def test_vit_b16_count(method: str, vit_b: torch.nn.Module) -> None:
    spec = SPECS[method]
    model = vpeft.apply(copy.deepcopy(vit_b), method, **spec.vit_b_options)
    assert vpeft.count_trainable(model, include_head=False) == spec.vit_b
    assert vpeft.count_trainable(model) == spec.vit_b + spec.head_in * 100 + 100


def test_vit_b16_known_published_counts(vit_b: torch.nn.Module) -> None:
    """The issue's figures: LoRA 294,912; Adapter/AdaptFormer 156,768; BitFit 102,912; SSF 205,824."""
    got = {
        m: vpeft.count_trainable(vpeft.apply(copy.deepcopy(vit_b), m), include_head=False)
        for m in ("lora", "adapter", "adaptformer", "bitfit", "ssf")
    }
    assert got == {"lora": 294_912, "adapter": 156_768, "adaptformer": 156_768, "bitfit": 102_912, "ssf": 205_824}


def test_vit_b16_selection_counts(vit_b: torch.nn.Module) -> None:
    """GPS (k=1) and SCT (K=96) on ViT-B/16; their counts do not depend on which entries the data selects."""
    from vpeft.methods.gps import layout

    model = copy.deepcopy(vit_b)
    matrices, _ = layout(model, vpeft.describe(model))
    first_column = {n: [r * m.weight[0].numel() for r in range(m.weight.shape[0])] for n, m in matrices.items()}
    gps = vpeft.apply(model, "gps", selection=first_column)
    rows = 768 + 12 * (3 * 768 + 768 + 3072 + 768)  # patch embedding, qkv, proj, fc1, fc2
    assert vpeft.count_trainable(gps, include_head=False) == rows + rows == 167_424  # one entry per row + biases
    sct = vpeft.apply(copy.deepcopy(vit_b), "sct", selection={f"blocks.{i}": list(range(96)) for i in range(12)})
    assert vpeft.count_trainable(sct, include_head=False) == 12 * (96 * 96 + 96) == 111_744


@pytest.mark.parametrize("method", [m for m in METHODS if SPECS[m].small_swin is not None])
def test_small_swin_closed_form(method: str) -> None:
    model = vpeft.apply(make_backbone("swin"), method)
    assert vpeft.count_trainable(model, include_head=False) == SPECS[method].small_swin


@pytest.fixture(scope="module")
def swin_b() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=100)


@pytest.mark.parametrize("method", [m for m in METHODS if SPECS[m].swin_b is not None])
def test_swin_b_count(method: str, swin_b: torch.nn.Module) -> None:
    model = vpeft.apply(copy.deepcopy(swin_b), method)
    assert vpeft.count_trainable(model, include_head=False) == SPECS[method].swin_b


# ---------------------------------------------------------------- side methods: no graph in the frozen part


@pytest.mark.parametrize("method", [m for m in METHODS if SPECS[m].frozen_blocks])
def test_side_method_builds_no_graph_in_frozen_blocks(method: str) -> None:
    _, model = apply_method(method, "vit")
    model.train()
    perturb_trainable(model)
    outputs: dict[int, torch.Tensor] = {}
    fired: list[int] = []
    for i, block in enumerate(model.blocks):
        inner = block.base_layer
        inner.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out))
        inner.register_full_backward_hook(lambda m, gi, go, i=i: fired.append(i))
    model(make_input(4)).sum().backward()
    for i in SPECS[method].frozen_blocks:
        assert outputs[i].grad_fn is None and not outputs[i].requires_grad, f"block {i} built a graph"
        assert i not in fired, f"backward ran through block {i}"
    method_params = vpeft.trainable_parameters(model, include_head=False)
    assert all(p.grad is not None for p in method_params.values()), "a method parameter got no gradient"


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
    perturb_trainable(model)
    d = 48
    with _ShapeRecorder() as rec:
        model(make_input()).sum().backward()
    weight_shapes = {(d, d), (3 * d, d), (d, 3 * d)}
    assert not weight_shapes & set(rec.shapes), "a full-size delta weight was materialised"


def test_lora_adapts_only_q_and_v_slices() -> None:
    model = vpeft.apply(make_backbone("vit"), "lora", targets=["q", "v"])
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == [(0, 48), (96, 144)]
    perturb_trainable(model)
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
    perturb_trainable(model)
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
    perturb_trainable(model)
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
