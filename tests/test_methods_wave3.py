"""Behaviour of issue 15's methods against their papers' formulas and official code.

The generic method x backbone checks of these methods (identity at init, counts, gradients, merge,
save/load) are rows of the one matrix in test_methods.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vpeft
from test_methods import DEPTH, HIDDEN, SMALL_SWIN, D, apply_method, lorand_count, perturb_trainable
from vpeft.errors import UnsupportedBackboneError

from conftest import IMG, NUM_CLASSES, make_backbone, make_input


def test_adapter_plus_matches_the_paper_formula() -> None:
    base, model = apply_method("adapter_plus", "vit")
    perturb_trainable(model)
    x = torch.randn(2, 17, D)
    block = model.blocks[0]
    with torch.no_grad():
        h = base.blocks[0](x)
        torch.testing.assert_close(block(x), block.reference(h), rtol=1e-5, atol=1e-6)


def test_adapter_plus_drop_path_drops_whole_samples() -> None:
    _, model = apply_method("adapter_plus", "vit", drop_path=0.5)
    perturb_trainable(model)
    block = model.blocks[0].train()
    x = torch.randn(64, 17, D)
    torch.manual_seed(0)
    with torch.no_grad():
        out = block(x)
        h = block.base_layer(x)
        full = h + 2.0 * (block.reference(h) - h)  # kept samples are scaled by 1 / keep
    kept = [torch.allclose(o, f, atol=1e-5) for o, f in zip(out, full, strict=True)]
    dropped = [torch.allclose(o, hh, atol=1e-6) for o, hh in zip(out, h, strict=True)]
    assert all(k != d for k, d in zip(kept, dropped, strict=True))  # each sample: all or nothing
    assert 10 < sum(kept) < 54


def test_adapter_plus_houlsby_init_bounds() -> None:
    _, model = apply_method("adapter_plus", "vit")
    adapter = model.blocks[0]
    for w in (adapter.down.weight, adapter.up.weight):
        assert w.abs().max() <= 0.02 and w.std() < 0.012
    assert torch.equal(adapter.scale, torch.ones(D))


def _dtl_reference(base: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, join_from: int) -> torch.Tensor:
    """DTL as the official forward writes it: R += B_i A_i x_i before block i, x += swish_beta(R) after it."""
    h = base.patch_embed(x)
    h = base._pos_embed(h)
    residual = 0.0
    for i, (ref, wrapped) in enumerate(zip(base.blocks, model.blocks, strict=True)):
        residual = residual + h @ wrapped.lora_A.t() @ wrapped.lora_B.t()
        h = ref(h)
        if i >= join_from:
            act = residual * torch.sigmoid(wrapped.beta * residual)
            fusion = getattr(model, "vpeft_dtl", None)
            if fusion is not None:
                act = fusion(act)
            h = h + act
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_dtl_matches_the_official_forward(method: str) -> None:
    base = make_backbone("vit")
    base.blocks = torch.nn.Sequential(*[copy.deepcopy(base.blocks[0]) for _ in range(4)])  # 4 blocks
    model = vpeft.apply(copy.deepcopy(base), method, join_from=1).eval()
    perturb_trainable(model)
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _dtl_reference(base, model, x, join_from=1), rtol=1e-4, atol=1e-5)


def test_dtl_default_joins_the_second_half() -> None:
    base = make_backbone("vit")
    base.blocks = torch.nn.Sequential(*[copy.deepcopy(base.blocks[0]) for _ in range(12)])
    model = vpeft.apply(base, "dtl")
    assert [b.join_from for b in model.blocks] == [6] * 12
    assert math.prod(model.blocks[0].lora_A.shape) == 2 * D


def test_dtl_join_from_outside_the_model_is_refused() -> None:
    with pytest.raises(vpeft.ConfigError, match="join_from"):
        vpeft.apply(make_backbone("vit"), "dtl", join_from=2)


def test_hydra_matches_the_paper_formula() -> None:
    _, model = apply_method("hydra", "vit")
    perturb_trainable(model)
    layer = model.blocks[0].mlp.fc2
    x = torch.randn(2, 17, HIDDEN)
    with torch.no_grad():
        y = layer.base_layer(x)
        expected = y + 0.1 * layer.par_up(layer.par_down(x)) + 0.1 * layer.seq_up(layer.seq_down(y))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_hydra_merges_each_branch_against_its_own_layer() -> None:
    """The official merge folds the attention branch against mlp.fc2's weight; vpeft uses attn.proj's."""
    _, model = apply_method("hydra", "vit")
    perturb_trainable(model)
    proj = model.blocks[0].attn.proj
    w0 = proj.base_layer.weight.detach().clone()
    with torch.no_grad():
        proj.merge_into_base()
        s = proj.scale
        expected = w0 + s * (proj.par_up.weight @ proj.par_down.weight + proj.seq_up.weight @ proj.seq_down.weight @ w0)
        torch.testing.assert_close(proj.base_layer.weight, expected)
        proj.unmerge_from_base()
        torch.testing.assert_close(proj.base_layer.weight, w0, rtol=1e-5, atol=1e-6)


def test_vfpt_fourier_prompts_follow_the_official_transform() -> None:
    _, model = apply_method("vfpt", "vit", num_tokens=6, fourier_fraction=0.5)
    block = model.blocks[1]
    p = block.prompt
    expected = torch.fft.fft(torch.fft.fft(p[:, :3], dim=-1), dim=-2).real  # FNetBlock: hidden, then sequence
    with torch.no_grad():
        got = block.prompts(2)
    torch.testing.assert_close(got[:, :3], expected.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 3:], p[:, 3:].expand(2, -1, -1))


def test_vfpt_without_fourier_prompts_is_vpt_deep() -> None:
    base = make_backbone("vit")
    torch.manual_seed(7)
    vfpt = vpeft.apply(copy.deepcopy(base), "vfpt", num_tokens=4, fourier_fraction=0.0).eval()
    torch.manual_seed(7)
    vpt = vpeft.apply(copy.deepcopy(base), "vpt_deep", num_tokens=4).eval()
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(vfpt(x), vpt(x))


GLORA_CONFIGS = [
    dict(a="lora", b="lora", c="lora", d="vector", e="vector"),
    dict(a="constant", b="vector", c="none", d="constant", e="constant"),
    dict(a="none", b="none", c="lora", d="none", e="none"),
]


@pytest.mark.parametrize("options", GLORA_CONFIGS)
def test_glora_matches_the_official_layer(options: dict) -> None:
    """W' = W + W * A + B, b' = b + b * D + E + W C, as the code's SuperScalableLinear (its X_d, X_u slices)."""
    _, model = apply_method("glora", "vit", **options)
    perturb_trainable(model)
    layer = model.blocks[0].mlp.fc1
    w, b = layer.base_layer.weight, layer.base_layer.bias

    def support(key: str, zero: torch.Tensor) -> torch.Tensor:
        kind = options[key]
        if kind == "lora":
            return getattr(layer, f"{key}_down") @ getattr(layer, f"{key}_up")
        return zero if kind == "none" else getattr(layer, key)

    a, bb, c = support("a", torch.zeros(())), support("b", torch.zeros(())), support("c", torch.zeros(D, 1))
    dd, e = support("d", torch.zeros(())), support("e", torch.zeros(()))
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, w + w * a + bb, b + b * dd + e + (w @ c)[:, 0])
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", GLORA_CONFIGS)
def test_glora_merge_any_configuration(options: dict) -> None:
    base, model = apply_method("glora", "vit", **options)
    perturb_trainable(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        reloaded = copy.deepcopy(base)
        reloaded.load_state_dict(vpeft.merge(model).state_dict(), strict=True)
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)
        vpeft.unmerge(model)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_utuning_tuners_read_the_operation_input() -> None:
    """x' = OP(x) + U(x) with OP = attention, MLP (inputs after their norms) and the whole block."""
    base, model = apply_method("utuning", "vit", ops=["attn", "mlp", "block"])
    perturb_trainable(model)
    x = torch.randn(2, 17, D)
    wrapped, ref = model.blocks[0], base.blocks[0]
    inner = wrapped.base_layer
    with torch.no_grad():
        h = ref.norm1(x)
        y = x + ref.attn(h) + inner.attn.up(torch.nn.functional.gelu(inner.attn.down(h)))
        h = ref.norm2(y)
        y = y + ref.mlp(h) + inner.mlp.up(torch.nn.functional.gelu(inner.mlp.down(h)))
        y = y + wrapped.up(torch.nn.functional.gelu(wrapped.down(x)))
        torch.testing.assert_close(wrapped(x), y, rtol=1e-5, atol=1e-5)


def test_snf_block_matches_the_official_forward_and_gradients() -> None:
    """x = f1(x) + Attn(LN1(x)); x = f2(x) + MLP(LN2(x)), f = planar flows after an affine map, step by step."""
    base, model = apply_method("snf", "vit", init_bound=0.3)
    with torch.no_grad():
        for block in model.blocks:
            for flow in (block.flow1, block.flow2):
                flow.mu.normal_(0, 0.1)
                flow.log_sigma.normal_(0, 0.1)
    block, ref = model.blocks[0], base.blocks[0]
    x = torch.randn(2, 17, D)
    out = block(x)
    y = block.flow1.reference(x) + ref.attn(ref.norm1(x))
    expected = block.flow2.reference(y) + ref.mlp(ref.norm2(y))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [block.flow1.weight, block.flow1.scale, block.flow1.bias, block.flow1.log_sigma, block.flow2.mu]
    fast = torch.autograd.grad(out, params, g)
    slow = torch.autograd.grad(expected, params, g)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_snf_starts_close_to_the_backbone() -> None:
    base, model = apply_method("snf", "vit")
    x = make_input()
    with torch.no_grad():
        assert 0 < (model(x) - base(x)).abs().max() < 0.05


def test_snf_refuses_other_block_types() -> None:
    with pytest.raises(UnsupportedBackboneError, match="snf"):
        vpeft.apply(make_backbone("swin"), "snf")


@pytest.mark.parametrize("slots", ["kv", "qkv", "qv"])
def test_bapat_shifts_keys_and_values_as_the_official_attention(slots: str) -> None:
    """q, k, v of the block, then k += s dK, v += s dV with [dK, dV] = up(tanh(down(x))), attention as usual."""
    base, model = apply_method("bapat", "vit", attn_slots=slots)
    perturb_trainable(model)
    qkv = model.blocks[0].attn.qkv
    ref = base.blocks[0].attn
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        q, k, v = ref.qkv(x).reshape(2, 17, 3, 3, D // 3).permute(2, 0, 3, 1, 4)
        shift = qkv.up(torch.tanh(qkv.down(x))).reshape(2, 17, len(slots), 3, D // 3).permute(2, 0, 3, 1, 4)
        parts = {"q": q, "k": k, "v": v}
        for i, name in enumerate(slots):
            parts[name] = parts[name] + 0.8 * shift[i]
        out = torch.nn.functional.scaled_dot_product_attention(parts["q"], parts["k"], parts["v"])
        expected = ref.proj(out.transpose(1, 2).reshape(2, 17, D))
        torch.testing.assert_close(model.blocks[0].attn(x), expected, rtol=1e-5, atol=1e-5)
        mlp = model.blocks[0].mlp
        h = torch.randn(2, 17, D)
        expected = mlp.base_layer(h) + 0.1 * mlp.up(torch.relu(mlp.down(h)))
        torch.testing.assert_close(mlp(h), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share_kv", [True, False])
def test_e2vpt_attention_over_key_value_prompts(share_kv: bool) -> None:
    """Per head, attention over [P_k; K] and [P_v; V] (P_k = P_v when shared), as the code's changeVK attention."""
    base, model = apply_method("e2vpt", "vit", share_kv=share_kv, kv_tokens=3, visual_tokens=0)
    perturb_trainable(model)
    bank, ref = model.vpeft_e2vpt, base.blocks[0].attn
    x = torch.randn(2, 17, D)
    h, hd = ref.num_heads, ref.head_dim
    q, k, v = ref.qkv(x).reshape(2, 17, 3, h, hd).permute(2, 0, 3, 1, 4)
    pk = bank.keys[0]
    pv = pk if share_kv else bank.values[0]
    k = torch.cat([pk.expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.expand(2, -1, -1, -1), v], dim=2)
    weights = (q @ k.transpose(-1, -2) / hd**0.5).softmax(-1)
    expected = ref.proj((weights @ v).transpose(1, 2).reshape(2, 17, D))
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].attn(x), expected, rtol=1e-5, atol=1e-5)
    assert vpeft.count_trainable(model, include_head=False) == DEPTH * 3 * D * (1 if share_kv else 2)


def test_e2vpt_visual_prompts_sit_after_the_prefix_tokens() -> None:
    _, model = apply_method("e2vpt", "vit_reg_cls", visual_tokens=4)
    seen = {}
    model.blocks[1].base_layer.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    with torch.no_grad():
        model(make_input())
    prefix = vpeft.describe(make_backbone("vit_reg_cls")).num_prefix_tokens
    torch.testing.assert_close(seen["in"][:, prefix : prefix + 4], model.blocks[1].prompt.expand(2, -1, -1))


def test_snf_planar_chain_gradients() -> None:
    from vpeft.methods.snf import PlanarChain

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    coupling = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PlanarChain.apply, (pre, coupling))


# ---------------------------------------------------------------- HST and LAST


def _four_block_vit() -> torch.nn.Module:
    base = make_backbone("vit")
    base.blocks = torch.nn.Sequential(*[copy.deepcopy(base.blocks[0]) for _ in range(4)])
    return base


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention written out: q [B, N, C], k and v [B, M, C], ``heads`` heads."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * (c // heads) ** -0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def _hst_reference(model: torch.nn.Module, base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HST in the official order (vit_hsn.forward_features): resize the 768-wide features, then bridge."""
    side = model.vpeft_hst
    b, g = x.shape[0], IMG // 8
    h = base._pos_embed(base.patch_embed(x))
    metas, feats = [], []
    for i, wrapped in enumerate(model.blocks):
        h = wrapped.base_layer(torch.cat([side.meta_for(i).expand(b, -1, -1), h], dim=1))
        metas.append(h[:, :1])
        feats.append(h[:, 2:].transpose(1, 2).reshape(b, D, g, g))
        h = h[:, 1:]
    xm, k = x, 0
    for s in range(4):
        xm, hh, ww = side.embeds[s](xm)
        bridge = side.bridges[s]
        for blk in side.stages[s]:
            f = torch.nn.functional.interpolate(feats[side.reads[k]], size=(hh, ww), mode="bilinear")
            f = bridge(f.flatten(2).transpose(1, 2))
            keys = torch.cat([side.meta_norms[k](bridge(metas[side.reads[k]])), f.mean(1, keepdim=True)], dim=1)
            kk, vv = blk.kv(keys).chunk(2, dim=-1)
            xm = xm + blk.proj(_attention(blk.q(blk.norm1(xm)), kk, vv, blk.heads))
            xm = xm + f
            xm = xm + blk.fc2(torch.nn.functional.gelu(blk.fc1(blk.norm2(xm))))
            k += 1
        xm = side.norms[s](xm)
        if s < 3:
            xm = xm.reshape(b, hh, ww, -1).permute(0, 3, 1, 2)
    return model.head(side.head_norm(xm.mean(1)))


def test_hst_matches_the_official_forward() -> None:
    base = _four_block_vit()
    model = vpeft.apply(copy.deepcopy(base), "hst", depths=[1, 1, 1, 1]).eval()
    perturb_trainable(model)
    assert model.vpeft_hst.reads == [0, 1, 2, 3]
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _hst_reference(model, base, x), rtol=1e-4, atol=1e-5)


def test_hst_trains_the_block_norms_and_not_the_unused_backbone_parts() -> None:
    _, model = apply_method("hst", "vit_reg_avg")
    trainable = vpeft.trainable_parameters(model, include_head=False)
    norms = {n for n in trainable if n.startswith("blocks.")}
    assert norms == {
        f"blocks.{i}.base_layer.norm{j}.{w}" for i in range(DEPTH) for j in (1, 2) for w in ("weight", "bias")
    }
    assert not any(n.startswith(("norm.", "fc_norm.", "patch_embed.")) for n in trainable)
    assert vpeft.describe(make_backbone("vit")).heads == ["head"] and model.head.in_features == 72
    unused = [model.norm.base_layer, model.fc_norm.base_layer]  # the ViT's own final norm and pooled norm
    called = []
    for module in unused:
        module.register_forward_hook(lambda m, a, out: called.append(m))
    model(make_input())
    assert not called, "HST's classifier reads the side network, not the ViT's final norms"


def test_hst_side_blocks_read_every_block_of_other_depths() -> None:
    from vpeft.methods.hst import HierarchicalSideNetwork, HSTConfig

    like = torch.zeros(1)
    deep = HierarchicalSideNetwork(D, 24, 1, HSTConfig(), like=like)
    assert deep.reads == list(range(1, 24, 2)) and deep.meta.shape == (12, 1, D)
    shallow = HierarchicalSideNetwork(D, 2, 1, HSTConfig(), like=like)
    assert shallow.reads == [0] * 6 + [1] * 6 and shallow.meta.shape == (2, 1, D)


def test_hst_meta_tokens_are_xavier_uniform() -> None:
    _, model = apply_method("hst", "vit")
    bound = math.sqrt(6 / (2 * D))  # fan_in = fan_out = D for each (1, 1, D) token, as the official init
    meta = model.vpeft_hst.meta
    assert meta.abs().max() <= bound and meta.abs().max() > 0.8 * bound


def test_hst_batchnorm_statistics_are_saved_with_the_adapter(tmp_path) -> None:
    base, model = apply_method("hst", "vit")
    model.train()
    with torch.no_grad():
        model(make_input(4, seed=5))
    model.eval()
    stats = model.vpeft_hst.head_norm.running_var
    assert not torch.equal(stats, torch.ones_like(stats))  # training moved them
    vpeft.save_adapter(model, tmp_path)
    fresh = vpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_hst_every_trainable_tensor_gets_a_gradient() -> None:
    """The meta tokens of every block, the block norms, the bridges, the stem: all reached by the loss."""
    _, model = apply_method("hst", "vit")
    model.train()
    torch.nn.functional.cross_entropy(model(make_input(4)), torch.arange(4) % NUM_CLASSES).backward()
    missing = [n for n, p in vpeft.trainable_parameters(model).items() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_hst_trains_on_a_batch_of_one() -> None:
    """BatchNorm1d has no batch statistics for one sample; the running ones stand in (a dataset's last batch)."""
    _, model = apply_method("hst", "vit")
    model.train()
    model(make_input(1)).sum().backward()
    assert model.vpeft_hst.head_norm.num_batches_tracked == 0


def test_hst_multiscale_features_are_a_stride_4_to_32_pyramid() -> None:
    _, model = apply_method("hst", "vit")
    maps = model.vpeft_hst.multiscale_features(make_input())
    assert [tuple(m.shape) for m in maps] == [
        (2, c, IMG // s, IMG // s) for c, s in zip((32, 48, 64, 72), (4, 8, 16, 32), strict=True)
    ]
    assert model.vpeft_hst.records.maps == [] and not model.vpeft_hst.records.keep_maps
    assert model(make_input()).shape == (2, NUM_CLASSES)  # the classifier still works afterwards


def test_hst_patch_embedding_keeps_its_attributes() -> None:
    base, model = apply_method("hst", "vit")
    assert model.patch_embed.grid_size == base.patch_embed.grid_size
    assert model.patch_embed.patch_size == base.patch_embed.patch_size


def test_hst_refuses_bad_stage_options() -> None:
    with pytest.raises(vpeft.ConfigError, match="divisible"):
        vpeft.apply(make_backbone("vit"), "hst", dims=[32, 48, 64, 70])
    with pytest.raises(vpeft.ConfigError, match="one entry per stage"):
        vpeft.apply(make_backbone("vit"), "hst", depths=[3, 3])


def _last_reference(model: torch.nn.Module, base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """v_m = u_m - sum_{i<m} z_i, z_m = LSA_m(v_m); the head reads v_L = u_L - sum z."""
    h = base._pos_embed(base.patch_embed(x))
    total = torch.zeros_like(h)
    for lsa, block in zip(model.vpeft_last.blocks, base.blocks, strict=True):
        q, k, v = lsa.qkv(lsa.norm(h - total)).chunk(3, dim=-1)
        total = total + lsa.out(_attention(q, k, v, lsa.heads))
        h = block(h)
    return model.forward_head(model.norm(h - total))


@pytest.mark.parametrize("heads", [1, 4])
def test_last_matches_the_paper_formula(heads: int) -> None:
    base = _four_block_vit()
    model = vpeft.apply(copy.deepcopy(base), "last", heads=heads).eval()
    perturb_trainable(model)
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _last_reference(model, base, x), rtol=1e-4, atol=1e-5)


def test_last_zero_output_projections_start_from_the_backbone() -> None:
    """Our init (the paper states none): zero output projections, so step 0 is the backbone."""
    base, model = apply_method("last", "vit")
    x = make_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


def test_last_refuses_a_rank_the_heads_do_not_divide() -> None:
    with pytest.raises(vpeft.ConfigError, match="divisible by heads"):
        vpeft.apply(make_backbone("vit"), "last", rank=10, heads=4)


# ---------------------------------------------------------------- LoRand and E3VA (dense-prediction methods on Swin)


@pytest.mark.parametrize("shared", [True, False])
def test_lorand_kernel_sharing(shared: bool) -> None:
    """Shared: the up-projection reads the down-projection's K_i, one tensor in the state_dict."""
    model = vpeft.apply(make_backbone("swin"), "lorand", share_kernel=shared)
    adapter = model.layers[0].blocks[0].mlp.lorand
    assert (adapter.up.kernels is adapter.down.Kt) == shared
    assert torch.equal(adapter.up.factors()[1], adapter.down.factors()[1]) == shared
    kernels = [k for k in model.state_dict() if k.endswith("Kt")]
    assert len(kernels) == (1 if shared else 2) * 2 * 2  # per adapter, 2 adapters per block, 2 blocks
    assert vpeft.count_trainable(model, include_head=False) == lorand_count(SMALL_SWIN, shared=shared)
    if shared:
        model.train()
        model(make_input()).sum().backward()
        assert adapter.down.Kt.grad is not None and "Kt" not in dict(adapter.up.named_parameters())


def test_lorand_layer_is_the_sum_of_branch_products() -> None:
    from vpeft.methods.lorand import LoRandLayer

    torch.manual_seed(0)
    layer = LoRandLayer(12, 6, branches=3, kernel=4, like=torch.zeros(()))
    x = torch.randn(2, 5, 12)
    p, k, q = layer.factors()
    assert p.shape == (3, 12, 4) and k.shape == (3, 4, 4) and q.shape == (3, 4, 6)
    w = sum(p[i] @ k[i] @ q[i] for i in range(3))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w + layer.bias, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_lorand_adapts_the_attention_and_mlp_outputs(backbone: str) -> None:
    """h -> h + W_up(GELU(W_down h)) on each sub-block's output h, W = sum_i P_i K_i Q_i."""
    base, model = apply_method("lorand", backbone)
    parts = vpeft.describe(base).blocks[0]
    x = torch.randn(2, 16, parts.dim)  # 16 tokens: one 4 x 4 window of the small Swin
    for role in ("attn", "mlp"):
        wrapped, ref = model.get_submodule(getattr(parts, role)), base.get_submodule(getattr(parts, role))
        down, up = wrapped.lorand.down, wrapped.lorand.up
        with torch.no_grad():
            h = ref(x)
            z = torch.nn.functional.gelu(h @ down.weight() + down.bias)
            torch.testing.assert_close(wrapped(x), h + z @ up.weight() + up.bias, rtol=1e-5, atol=1e-5)


def _e3va_reference(base: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor):
    """The highway written out: the backbone runs alone; h += A(x_mid - x) + M(out - x_mid) per block,
    h <- D(x + h) - D(x) at a Swin stage's downsampling D; every stage hands on x + h. Returns
    (logits, every stage's x + h)."""
    anatomy = vpeft.describe(base)
    mids: dict[str, torch.Tensor] = {}
    for p in anatomy.blocks:
        base.get_submodule(p.norm2).register_forward_pre_hook(lambda m, a, n=p.name: mids.__setitem__(n, a[0]))
    if anatomy.family == "vit":
        t = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
        stages = [(None, list(zip(base.blocks, anatomy.blocks, strict=True)))]
    else:
        t = base.patch_embed(x)
        names = iter(anatomy.blocks)
        stages = [(s.downsample, [(b, next(names)) for b in s.blocks]) for s in base.layers]
    h, outs = None, []
    for downsample, blocks in stages:
        if downsample is not None:
            td = downsample(t)
            h = None if h is None else downsample(t + h) - td
            t = td
        for block, parts in blocks:
            out = block(t)
            mid = mids[parts.name].reshape(out.shape)
            wrapped = model.get_submodule(parts.name)
            delta = wrapped.attn_adapter(mid - t) + wrapped.mlp_adapter(out - mid)
            h = delta if h is None else h + delta
            t = out
        outs.append(t + h)
    return model.forward_head(model.norm(t + h)), outs


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_e3va_matches_the_highway_formula(backbone: str) -> None:
    base, model = apply_method("e3va", backbone)
    perturb_trainable(model)  # the final norm too
    x = make_input()
    with torch.no_grad():
        expected, stages = _e3va_reference(base, model, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        if backbone == "swin":  # a dense head's multi-scale features carry the highway at every stage
            got = model.forward_intermediates(x, intermediates_only=True)
            plain = base.forward_intermediates(x, intermediates_only=True)
            assert len(got) == len(stages) == 2
            for g, e, p in zip(got, stages, plain, strict=True):
                torch.testing.assert_close(g, e.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-5)
                assert (g - p).abs().max() > 1e-3  # the highway is there


def test_e3va_swin_runs_every_block_without_autograd() -> None:
    """No Swin block builds a graph or sees a backward pass; every adapter still gets its gradient."""
    _, model = apply_method("e3va", "swin")
    model.train()
    outputs: dict[str, torch.Tensor] = {}
    fired: list[str] = []
    names = [p.name for p in vpeft.describe(make_backbone("swin")).blocks]
    for name in names:
        inner = model.get_submodule(name).base_layer
        inner.register_forward_hook(lambda m, a, out, n=name: outputs.setdefault(n, out))
        inner.register_full_backward_hook(lambda m, gi, go, n=name: fired.append(n))
    model(make_input(4)).sum().backward()
    for name in names:
        assert outputs[name].grad_fn is None and not outputs[name].requires_grad, f"{name} built a graph"
    assert not fired, f"backward ran through {fired}"
    method_params = vpeft.trainable_parameters(model, include_head=False)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method_params.values())


@pytest.mark.parametrize("train_norm", [False, True])
def test_e3va_trains_the_adapters_and_optionally_the_final_norm(train_norm: bool) -> None:
    model = vpeft.apply(make_backbone("swin"), "e3va", train_norm=train_norm)
    names = set(vpeft.trainable_parameters(model, include_head=False))
    assert {n for n in names if "adapter" not in n} == ({"norm.weight", "norm.bias"} if train_norm else set())
    assert vpeft.count_trainable(model, include_head=False) == lorand_count(SMALL_SWIN) + train_norm * 2 * 32
