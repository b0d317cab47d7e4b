"""The dense encoder: four NCHW maps at the declared strides and channels, for every backbone family and
method, with gradients only where the method (and the ViT pyramid) trains."""

from __future__ import annotations

import pytest
import torch

import vpeft
from dense_data import DENSE_BACKBONES, IMG, make_dense_backbone
from vpeft.dense import DenseEncoder, dense_encoder
from vpeft.errors import ConfigError, UnsupportedBackboneError

#: the methods of the issue's "done when" list, two that add tokens and the two V-PETL dense methods; "linear" is the frozen row
METHODS = ["linear", "lora", "adapter", "adaptformer", "bitfit", "ssf", "mona", "ln_tune", "partial_k", "full",
           "vpt_deep", "prefix", "lorand", "e3va"]  # fmt: skip
CASES = [(b, m) for b in DENSE_BACKBONES for m in METHODS]


def _applied(backbone: str, method: str) -> torch.nn.Module:
    model = make_dense_backbone(backbone)
    try:
        vpeft.apply(model, method)
    except UnsupportedBackboneError:
        pytest.skip(f"{method} does not apply to {backbone}")
    return model


@pytest.mark.parametrize("backbone,method", CASES)
def test_four_maps_at_the_declared_strides(backbone: str, method: str) -> None:
    encoder = dense_encoder(_applied(backbone, method))
    x = torch.randn(2, 3, IMG, IMG)
    maps = encoder(x)
    assert len(maps) == 4 == len(encoder.channels) == len(encoder.strides)
    assert encoder.strides == sorted(encoder.strides) and len(set(encoder.strides)) == 4
    for m, c, s in zip(maps, encoder.channels, encoder.strides, strict=True):
        assert m.shape == (2, c, -(-IMG // s), -(-IMG // s))
        assert torch.isfinite(m).all()
    if backbone in ("swin", "convnext", "resnet"):
        assert encoder.strides == [4, 8, 16, 32]
    else:
        assert encoder.strides == [2, 4, 8, 16]  # patch 8: p/4, p/2, p, 2p


@pytest.mark.parametrize("backbone,method", CASES)
def test_gradients_reach_the_method_and_pyramid_only(backbone: str, method: str) -> None:
    model = _applied(backbone, method)
    encoder = dense_encoder(model)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    loss = sum(m.square().mean() for m in encoder(torch.randn(2, 3, IMG, IMG)))
    if not trainable:  # the frozen row on a hierarchical backbone: nothing in the encoder trains
        assert not loss.requires_grad
        return
    loss.backward()
    assert all(p.grad is None for n, p in encoder.named_parameters() if n in frozen)
    got = {n for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got <= trainable
    pyramid = {n for n in trainable if n.startswith("pyramid.")}
    assert (len(pyramid) > 0) == (backbone == "vit")
    assert pyramid <= got
    method_params = trainable - pyramid
    if method != "linear":  # some trainable backbone parameters receive a gradient (final norms may not)
        assert got - pyramid, f"no gradient reached {sorted(method_params)[:4]}"


@pytest.mark.parametrize("backbone", list(DENSE_BACKBONES))
def test_identity_at_init_methods_leave_the_maps_unchanged(backbone: str) -> None:
    """LoRA starts at zero: the encoder of the adapted backbone gives the plain backbone's maps."""
    plain = dense_encoder(make_dense_backbone(backbone))
    adapted = dense_encoder(vpeft.apply(make_dense_backbone(backbone), "lora"))
    adapted.pyramid = plain.pyramid  # the ViT pyramid is initialised randomly; share it
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        for a, b in zip(plain(x), adapted(x), strict=True):
            torch.testing.assert_close(a, b)


def test_prompt_methods_see_only_patch_tokens_in_the_map() -> None:
    """VPT-deep strips its prompts after the last block, so the stride-p map is the patch grid."""
    model = vpeft.apply(make_dense_backbone("vit"), "vpt_deep", num_tokens=3)
    maps = dense_encoder(model)(torch.randn(1, 3, IMG, IMG))
    assert maps[2].shape == (1, 48, IMG // 8, IMG // 8)


def test_a_classifier_head_is_refused_with_the_fix() -> None:
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    with pytest.raises(ConfigError, match="num_classes=0"):
        DenseEncoder(vpeft.apply(model, "bitfit"))


def test_a_backbone_with_two_stages_gets_pooled_coarse_levels() -> None:
    import timm

    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=IMG, window_size=4, depths=(1, 1),
        num_heads=(1, 2), embed_dim=16, num_classes=0,
    )  # fmt: skip
    encoder = dense_encoder(model)
    maps = encoder(torch.randn(1, 3, IMG, IMG))
    assert encoder.strides == [4, 8, 16, 32] and encoder.channels == [16, 32, 32, 32]
    torch.testing.assert_close(maps[2], torch.nn.functional.max_pool2d(maps[1], 2))
