"""Each method against a small hand-written reference of its official code, in float64.

One table of forward cases (outputs and gradients of a randomised, non-zero instance, with a fixed
dropout mask where dropout matters), one table of initial distributions, one of defaults, and the
closed-form trainable counts that change with the official layouts. The references are written
from the official formulas (peft / NVlabs DoRA, JieShibo/PETL-ViT FacT, Leiyi-Hu/mona, Li and
Liang's PrefixTuning and peft's PrefixEncoder), one small function each, independent of vpeft's
own implementation: they read vpeft's parameters only, mapped to the official tensors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vpeft

from conftest import VIT_KW

D, DEPTH, TOKENS, PREFIX_TOKENS = 48, 2, 17, 1  # the test ViT: 48 wide, 2 blocks, 4x4 patches + class token


def _vit(mlp_ratio: float = 4.0) -> nn.Module:
    """A small timm ViT with the MLP ratio of ViT-B (4 d x d blocks in fc1, as FacT's code assumes)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT_KW, "mlp_ratio": mlp_ratio})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


class FixedDropout(nn.Module):
    """Dropout with one fixed mask per input shape, so vpeft and the reference drop the same entries."""

    def __init__(self, p: float = 0.3, seed: int = 7):
        super().__init__()
        self.p, self.seed, self.masks = p, seed, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape not in self.masks:
            g = torch.Generator().manual_seed(self.seed + len(self.masks))
            keep = (torch.rand(x.shape, generator=g) >= self.p).to(x.dtype)
            self.masks[x.shape] = keep / (1 - self.p)
        return x * self.masks[x.shape]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# ---------------------------------------------------------------- references of the official formulas


def dora_reference(model: nn.Module, wrapper: nn.Module, x: torch.Tensor, drop: Callable) -> torch.Tensor:
    """peft / NVlabs DoRA: W x + b + (m/n - 1) W drop(x) + (m/n) s B A drop(x), n = ||W + s B A|| detached."""
    base = wrapper.base_layer
    out = F.linear(x, base.weight, base.bias)
    dx = drop(x)
    parts, cursor = [], 0
    for i, (start, end) in enumerate(wrapper.slices):
        parts.append(out[..., cursor:start])
        w, a, b, m = base.weight[start:end], wrapper.lora_A[i], wrapper.lora_B[i], wrapper.magnitude[i]
        s = wrapper.scaling
        n = (w + s * b @ a).norm(dim=1).detach()
        parts.append(out[..., start:end] + (m / n - 1) * (dx @ w.T) + (m / n) * s * (dx @ a.T @ b.T))
        cursor = end
    parts.append(out[..., cursor:])
    return torch.cat(parts, dim=-1)


def _layer_role(name: str) -> tuple[int, str]:
    """(block index, role) of a module path such as 'blocks.1.mlp.fc2'."""
    parts = name.split(".")
    return int(parts[1]), parts[-1]


def fact_tk_reference(layout: str) -> Callable:
    """FacT-TK as JieShibo/PETL-ViT FacT/fact_tk.py computes it ('official'), or the paper's S_j = C x3 P_j."""

    def reference(model: nn.Module, wrapper: nn.Module, x: torch.Tensor, drop: Callable) -> torch.Tensor:
        f, s = model.vpeft_fact, wrapper.scale
        fact_u = lambda t: t @ f.u  # FacTu, a Linear(d, r) whose weight is u^T
        fact_v = lambda t: t @ f.v.T  # FacTv, a Linear(r, d) whose weight is v
        core, p = f.core, f.p.T  # FacTc (r, r, r), FacTp (r, 12 per block)
        r = core.shape[0]
        block, role = _layer_role(wrapper_name[id(wrapper)])
        m = model.blocks[block].mlp.fc1.base_layer.out_features // D
        attn_idx = block * (4 + 2 * m)  # the code's running idx: 4 per Attention, 8 (2m) per Mlp
        mlp_idx = attn_idx + 4
        base = wrapper.base_layer(x)
        if role in ("qkv", "proj"):
            t = core @ p[:, attn_idx : attn_idx + 4]  # (r, r, 4): q, k, v, proj
            slots = (0, 1, 2) if role == "qkv" else (3,)
            z = torch.stack([fact_u(x) @ t[:, :, j] for j in slots], dim=-2)
            return base + fact_v(drop(z)).flatten(-2) * s
        t = core @ p[:, mlp_idx : mlp_idx + 2 * m]  # (r, r, 2m)
        if layout == "paper":
            if role == "fc1":
                z = torch.stack([fact_u(x) @ t[:, :, j] for j in range(m)], dim=-2)
                return base + fact_v(drop(z)).flatten(-2) * s
            h = x.unflatten(-1, (m, D))
            z = sum(fact_u(h[..., i, :]) @ t[:, :, m + i] for i in range(m))
            return base + fact_v(drop(z.unsqueeze(-2))).flatten(-2) * s
        fc1_core, fc2_core = t[:, :, :m].reshape(r, m * r), t[:, :, m:].reshape(r, m * r)
        if role == "fc1":
            z = (fact_u(x) @ fc1_core).unflatten(-1, (m, r))
            return base + fact_v(drop(z)).flatten(-2) * s
        u = fact_u(x.unflatten(-1, (m, D))).flatten(-2)  # (..., m r)
        z = (u @ fc2_core.t()).unsqueeze(-2)
        return base + fact_v(drop(z)).flatten(-2) * s

    return reference


def fact_tt_reference(model: nn.Module, wrapper: nn.Module, x: torch.Tensor, drop: Callable) -> torch.Tensor:
    """FacT-TT as FacT/fact_tt.py: a Linear(r, r) per q, k, v, proj, Linear(r, m r) for fc1, Linear(m r, r) for fc2."""
    f, s, core = model.vpeft_fact, wrapper.scale, wrapper.core  # core: (out_blocks, in_blocks, r, r)
    o, i, r, _ = core.shape
    fact_u = lambda t: t @ f.u
    fact_v = lambda t: t @ f.v.T
    base = wrapper.base_layer(x)
    if i == 1:  # q/k/v/proj (each its own Linear(r, r)) and fc1 (a Linear(r, o r) read as o blocks)
        weight = core[:, 0].reshape(o * r, r)
        z = (fact_u(x) @ weight.T).unflatten(-1, (o, r))
        return base + fact_v(drop(z)).flatten(-2) * s
    weight = core[0].permute(1, 0, 2).reshape(r, i * r)  # fc2: Linear(i r, r) over the i blocks of U^T h
    z = fact_u(x.unflatten(-1, (i, D))).flatten(-2) @ weight.T
    return base + fact_v(drop(z.unsqueeze(-2))).flatten(-2) * s


def _attention_with_prefix(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


def prefix_shared_reference(model: nn.Module, wrapper: nn.Module, x: torch.Tensor, drop: Callable) -> torch.Tensor:
    """Li and Liang / peft PrefixEncoder: past = MLP(E) viewed (tokens, 2 L, heads, head_dim); layer l's K, V = 2l, 2l+1."""
    bank, attn = model.vpeft_prefix, wrapper.base_layer
    layer = int(wrapper_name[id(wrapper)].split(".")[1])
    lin1, lin2 = bank.mlp[0], bank.mlp[2]
    past = torch.tanh(bank.embedding @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias  # (n, 2 L d)
    n, heads, hd = past.shape[0], attn.num_heads, attn.head_dim
    past = past.view(n, 2 * DEPTH, heads, hd)
    kv = drop(torch.cat([past[:, 2 * layer].reshape(n, D), past[:, 2 * layer + 1].reshape(n, D)], dim=-1))
    key, value = (t.reshape(1, n, heads, hd).transpose(1, 2) for t in (kv[:, :D], kv[:, D:]))
    return _attention_with_prefix(attn, x, key, value)


def prefix_per_layer_reference(model: nn.Module, wrapper: nn.Module, x: torch.Tensor, drop: Callable) -> torch.Tensor:
    """vpeft's per-layer variant: kv = MLP(E^l), d -> hidden -> 2d; keys first."""
    bank, attn = model.vpeft_prefix, wrapper.base_layer
    layer = int(wrapper_name[id(wrapper)].split(".")[1])
    kv = drop(bank.mlp(bank.embedding[layer]))
    heads = lambda t: t.reshape(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    return _attention_with_prefix(attn, x, heads(kv[:, :D]), heads(kv[:, D:]))


def mona_reference(model: nn.Module, wrapper: nn.Module, y: torch.Tensor, drop: Callable) -> torch.Tensor:
    """Leiyi-Hu/mona's Mona.forward(y) - y on the patch grid; the class token skips the convolutions."""
    br = wrapper.branch
    x = F.layer_norm(y, (D,), br.norm.weight, br.norm.bias, br.norm.eps) * br.gamma + y * br.gamma_x
    p1 = x @ br.down.weight.T + br.down.bias
    cls, grid = p1[:, :PREFIX_TOKENS], p1[:, PREFIX_TOKENS:]
    b, n, c = grid.shape
    side = math.isqrt(n)
    g = grid.reshape(b, side, side, c).permute(0, 3, 1, 2)
    convs = [
        F.conv2d(g, conv.weight, conv.bias, padding=k // 2, groups=c) for conv, k in zip(br.dw, (3, 5, 7), strict=True)
    ]
    g = (convs[0] + convs[1] + convs[2]) / 3.0 + g
    g = g + F.conv2d(g, br.projector.weight, br.projector.bias)
    z = torch.cat([cls, g.permute(0, 2, 3, 1).reshape(b, n, c)], dim=1)
    return drop(F.gelu(z)) @ br.up.weight.T + br.up.bias


#: id(wrapper) -> its module path, for references that need the layer's position
wrapper_name: dict[int, str] = {}


# ---------------------------------------------------------------- forward and gradient cases


@dataclass(frozen=True)
class Case:
    method: str
    options: dict
    layer: str  # module path of the wrapper under test
    reference: Callable
    train: bool = False  # training mode, with a fixed dropout mask in place of the method's dropout
    dropout_at: str = "dropout"  # the dropout module to fix, relative to the model (or '@' + to the wrapper)
    call: Callable = field(default=lambda wrapper, x: wrapper(x))


def _dora(targets: list[str], layer: str, train: bool) -> Case:
    return Case("dora", dict(targets=targets, dropout=0.3, rank=4), layer, dora_reference, train, "@dropout")


def _fact(method: str, layout: str | None, layer: str, train: bool = True) -> Case:
    options = dict(rank=6, scale=0.7, dropout=0.3) | ({"layout": layout} if layout else {})
    ref = fact_tt_reference if method == "fact_tt" else fact_tk_reference(layout)
    return Case(method, options, layer, ref, train, "@dropout")


CASES = {
    "dora-qkv-slices-train-dropout": _dora(["q", "v"], "blocks.1.attn.qkv", True),
    "dora-fc1-train-dropout": _dora(["fc1"], "blocks.0.mlp.fc1", True),
    "dora-qkv-slices-eval": _dora(["q", "v"], "blocks.1.attn.qkv", False),
    **{
        f"fact_tk-{layout}-{role}": _fact("fact_tk", layout, f"blocks.1.{role}")
        for layout in ("official", "paper")
        for role in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    },
    **{f"fact_tt-{role}": _fact("fact_tt", None, f"blocks.1.{role}") for role in ("attn.qkv", "mlp.fc1", "mlp.fc2")},
    "prefix-shared": Case("prefix", dict(num_tokens=3, dropout=0.2), "blocks.1.attn", prefix_shared_reference, True,
                          "vpeft_prefix.dropout"),
    "prefix-per_layer": Case("prefix", dict(num_tokens=3, dropout=0.2, reparameterization="per_layer"),
                             "blocks.1.attn", prefix_per_layer_reference, True, "vpeft_prefix.dropout"),
    "mona-branch": Case("mona", {}, "blocks.1.mlp", mona_reference, True, "@branch.dropout",
                        call=lambda wrapper, y: wrapper.branch(y)),
}  # fmt: skip


def _prepared(case: Case) -> tuple[nn.Module, nn.Module, Callable]:
    model = vpeft.apply(_vit(), case.method, **case.options).double().train(case.train)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a randomised, non-zero instance: V, B, up-projections away from zero
        for p in vpeft.trainable_parameters(model, include_head=False).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    wrapper = model.get_submodule(case.layer)
    wrapper_name[id(wrapper)] = case.layer
    drop: Callable = _identity
    if case.train:
        owner, path = (wrapper, case.dropout_at[1:]) if case.dropout_at.startswith("@") else (model, case.dropout_at)
        parent, _, name = path.rpartition(".")
        holder = owner.get_submodule(parent) if parent else owner
        assert isinstance(getattr(holder, name), nn.Dropout), f"{case.method}: expected dropout at {case.dropout_at}"
        drop = FixedDropout()
        setattr(holder, name, drop)
    return model, wrapper, drop


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_official(case: Case) -> None:
    model, wrapper, drop = _prepared(case)
    width = getattr(wrapper.base_layer, "in_features", D)
    x = torch.randn(2, TOKENS, width, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x.requires_grad_(True)
    leaves = [*vpeft.trainable_parameters(model, include_head=False).values(), x]
    got = case.call(wrapper, x)
    expected = case.reference(model, wrapper, x, drop)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got - wrapper.base_layer(x) if case.method != "mona" else got).abs().max() > 1e-3  # a visible update
    weights = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(6))
    grads = torch.autograd.grad((got * weights).sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True)
    assert any(gr is not None and gr.abs().max() > 0 for gr in grads[:-1])
    for a, b, leaf in zip(grads, ref_grads, leaves, strict=True):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_fact_tk_layouts_differ_only_in_the_mlp() -> None:
    """Same parameters, two layouts: q, k, v and proj agree; fc1 and fc2 read the core differently."""
    official = vpeft.apply(_vit(), "fact_tk", rank=6, layout="official").double()
    paper = vpeft.apply(_vit(), "fact_tk", rank=6, layout="paper").double()
    with torch.no_grad():
        for p in vpeft.trainable_parameters(official, include_head=False).values():
            p.add_(torch.randn_like(p) * 0.1)
        paper.load_state_dict(official.state_dict())
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        a, b = official.blocks[1].get_submodule(name), paper.blocks[1].get_submodule(name)
        same = torch.equal(a.delta_weight(), b.delta_weight())
        assert same == name.startswith("attn"), name


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_fact_tk_merge_equals_unmerged_and_layout_is_saved(layout: str, tmp_path) -> None:
    base = _vit()
    model = vpeft.apply(copy.deepcopy(base), "fact_tk", rank=6, layout=layout).double().eval()
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        vpeft.save_adapter(model, tmp_path)
        vpeft.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
        vpeft.unmerge(model)
    assert vpeft.read_adapter_config(tmp_path)["options"]["layout"] == layout
    fresh = vpeft.load_adapter(copy.deepcopy(base).double(), tmp_path).eval()
    roles = {fresh.blocks[0].mlp.fc1.role, fresh.blocks[0].mlp.fc2.role}
    assert roles == ({"fc1", "fc2"} if layout == "official" else {"attn"})
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- initial distributions

R = 8
FACT_SLOTS = DEPTH * (3 + 1 + 4 + 4)  # d x d blocks of a ViT with MLP ratio 4


@dataclass(frozen=True)
class Init:
    method: str
    options: dict
    param: str
    kind: str  # 'uniform' (bound), 'normal' or 'trunc_normal' (std), 'zero'
    value: float = 0.0


INITS = {
    # FacT: FacTu = nn.Linear(768, r): bound 1/sqrt(d), not 1/sqrt(r)
    "fact_tt-u": Init("fact_tt", dict(rank=R), "vpeft_fact.u", "uniform", 1 / math.sqrt(D)),
    "fact_tk-u": Init("fact_tk", dict(rank=R), "vpeft_fact.u", "uniform", 1 / math.sqrt(D)),
    "fact_tt-v": Init("fact_tt", dict(rank=R), "vpeft_fact.v", "zero"),
    # TT cores: Linear(r, r), Linear(r, 4r) for fc1, Linear(4r, r) for fc2
    "fact_tt-qkv-core": Init("fact_tt", dict(rank=R), "blocks.0.attn.qkv.core", "uniform", 1 / math.sqrt(R)),
    "fact_tt-fc1-core": Init("fact_tt", dict(rank=R), "blocks.0.mlp.fc1.core", "uniform", 1 / math.sqrt(R)),
    "fact_tt-fc2-core": Init("fact_tt", dict(rank=R), "blocks.0.mlp.fc2.core", "uniform", 1 / math.sqrt(4 * R)),
    # TK: xavier_uniform_ on FacTc (r, r, r) and on FacTp (r, blocks)
    "fact_tk-core": Init("fact_tk", dict(rank=R), "vpeft_fact.core", "uniform", math.sqrt(6 / (2 * R * R))),
    "fact_tk-p": Init("fact_tk", dict(rank=R), "vpeft_fact.p", "uniform", math.sqrt(6 / (R + FACT_SLOTS))),
    # Mona: the backbone's init_weights: trunc-normal std 0.02, zero bias, on both projections
    "mona-down": Init("mona", {}, "blocks.0.attn.branch.down.weight", "trunc_normal", 0.02),
    "mona-up": Init("mona", {}, "blocks.1.mlp.branch.up.weight", "trunc_normal", 0.02),
    "mona-down-bias": Init("mona", {}, "blocks.0.attn.branch.down.bias", "zero"),
    "mona-up-bias": Init("mona", {}, "blocks.1.mlp.branch.up.bias", "zero"),
    # Prefix: nn.Embedding's N(0, 1) for the shared embedding of the prefix positions
    "prefix-embedding": Init("prefix", {}, "vpeft_prefix.embedding", "normal", 1.0),
    # Adapter as NOAH's code: its own Xavier init, or the ViT's trunc-normal pass that overrides it
    "adapter-xavier-down": Init("adapter", dict(init="xavier"), "blocks.0.mlp.adapter.down.weight", "uniform",
                                math.sqrt(6 / (D + 8))),
    "adapter-xavier-up": Init("adapter", dict(init="xavier"), "blocks.0.mlp.adapter.up.weight", "uniform",
                              math.sqrt(6 / (D + 8))),
    "adapter-xavier-up-bias": Init("adapter", dict(init="xavier"), "blocks.0.mlp.adapter.up.bias", "normal", 1e-6),
    "adapter-trunc_normal-up": Init("adapter", dict(init="trunc_normal"), "blocks.0.mlp.adapter.up.weight",
                                    "trunc_normal", 0.02),
    "adapter-trunc_normal-down-bias": Init("adapter", dict(init="trunc_normal"), "blocks.0.mlp.adapter.down.bias",
                                           "zero"),
    "adapter-default-up": Init("adapter", {}, "blocks.0.mlp.adapter.up.weight", "zero"),
}  # fmt: skip


@pytest.mark.parametrize("case", INITS.values(), ids=INITS.keys())
def test_initial_distribution_matches_official(case: Init) -> None:
    model = vpeft.apply(_vit(), case.method, **case.options)
    w = model.get_parameter(case.param).detach().double().flatten()
    if case.kind == "zero":
        assert torch.count_nonzero(w) == 0
        return
    tol = 4 / math.sqrt(w.numel())  # a few standard errors of the sample std, relative
    if case.kind == "uniform":
        assert w.abs().max() <= case.value
        assert w.abs().max() >= 0.9 * case.value
        std = case.value / math.sqrt(3)
    else:
        std = case.value
        if case.kind == "trunc_normal":
            assert w.abs().max() <= 2.0  # timm's / torch's trunc_normal_ cut at +-2 (absolute)
    assert abs(w.std().item() / std - 1) < tol, f"std {w.std().item():.4g}, official {std:.4g}"
    assert abs(w.mean().item()) < tol * std


# ---------------------------------------------------------------- defaults and counts

DEFAULTS = {
    "vpt_shallow-dropout": ("vpt_shallow", "dropout", 0.0),
    "vpt_deep-dropout": ("vpt_deep", "dropout", 0.0),
    "fact_tk-layout": ("fact_tk", "layout", "official"),
    "prefix-reparameterization": ("prefix", "reparameterization", "shared"),
    "mona-dropout": ("mona", "dropout", 0.1),
    "adapter-init": ("adapter", "init", "zero_up"),
}


@pytest.mark.parametrize("method,option,value", DEFAULTS.values(), ids=DEFAULTS.keys())
def test_default_follows_official(method: str, option: str, value: object) -> None:
    config = vpeft.make_config(method)
    assert getattr(config, option) == value


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_vpt_trains_without_prompt_dropout(method: str) -> None:
    model = vpeft.apply(_vit(), method, num_tokens=4).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_adapter_quick_gelu() -> None:
    model = vpeft.apply(_vit(), "adapter", act="quick_gelu", init="xavier").eval()
    adapter = model.blocks[0].mlp.adapter
    h = torch.randn(2, TOKENS, D)
    z = adapter.down(h)
    torch.testing.assert_close(adapter(h), adapter.up(z * torch.sigmoid(1.702 * z)))


def _prefix_count(d: int, depth: int, tokens: int, hidden: int, shared: bool) -> int:
    if shared:  # one embedding of the positions, MLP d -> hidden -> depth * 2d
        return tokens * d + (d * hidden + hidden) + (hidden * depth * 2 * d + depth * 2 * d)
    return depth * tokens * d + (d * hidden + hidden) + (hidden * 2 * d + 2 * d)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, 9_857_024),
        (dict(reparameterization="per_layer"), 1_273_856),
        (dict(reparameterize=False), 184_320),
    ],
    ids=["shared", "per_layer", "direct"],
)
def test_prefix_counts_on_vit_b16(options: dict, expected: int) -> None:
    model = vpeft.apply(
        timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100), "prefix", **options
    )
    count = vpeft.count_trainable(model, include_head=False)
    assert count == expected
    if "reparameterize" not in options:
        shared = options.get("reparameterization", "shared") == "shared"
        assert count == _prefix_count(768, 12, 10, 512, shared)
    else:
        assert count == 12 * 10 * 2 * 768
