"""A backbone family added from outside vpeft: a toy transformer (not a timm class) registered through
:func:`vpeft.backbones.register_family`; methods apply to it by the parts it offers, unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vpeft
from vpeft.backbones.anatomy import Anatomy, transformer_block
from vpeft.backbones.registry import BackboneFamily, describe, family_names, input_config, register_family
from vpeft.data import input_config as data_input_config
from vpeft.errors import UnsupportedBackboneError

DIM, DEPTH, PATCH, IMG, CLASSES = 24, 2, 8, 32, 3


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ToyMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention:
            self.attn = ToyAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ToyMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "attn"):
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyTransformer(nn.Module):
    """Patch embedding, a class token, pre-norm blocks, a final norm and a linear head on the class token."""

    def __init__(self, attention: bool = True):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (IMG // PATCH) ** 2, DIM) * 0.02)
        self.blocks = nn.Sequential(*[ToyBlock(DIM, attention) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def describe_toy(model: nn.Module) -> Anatomy:
    return Anatomy(
        family="toy",
        architecture="toy-transformer",
        blocks=[transformer_block(f"blocks.{i}", b, DIM) for i, b in enumerate(model.blocks)],
        heads=["head"],
        embed="patch_embed",
        final_norms=["norm"],
        embed_dim=DIM,
        patch_size=(PATCH, PATCH),
        num_prefix_tokens=1,
        has_class_token=True,
        global_pool="token",
        extra_parts=frozenset({"tokens", "layernorm"}),
    )


TOY = register_family(
    BackboneFamily(
        name="toy",
        matches=lambda model: isinstance(model, ToyTransformer),
        describe=describe_toy,
        input_config=lambda model: {
            "size": (IMG, IMG),
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "interpolation": "bilinear",
        },
        summary="the test's toy transformer",
    )
)


def toy(attention: bool = True, seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    model = ToyTransformer(attention)
    with torch.no_grad():  # biases away from zero, so BitFit's and the methods' updates are visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def inputs(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_the_family_describes_its_models() -> None:
    assert "toy" in family_names()
    anatomy = describe(toy())
    assert anatomy.family == "toy" and anatomy.depth == DEPTH
    assert {
        "blocks",
        "attention",
        "qkv_fused",
        "attn_proj",
        "mlp",
        "isotropic",
        "tokens",
        "token_grid_2d",
    } <= anatomy.parts
    assert anatomy.token_grid((IMG, IMG)) == (IMG // PATCH, IMG // PATCH)
    assert data_input_config(toy()).interpolation == "bilinear" and input_config(toy())["size"] == (IMG, IMG)


def test_token_grid_can_be_three_dimensional() -> None:
    video = Anatomy(family="video", architecture="v", blocks=[], heads=[], embed=None, patch_size=(2, 16, 16))
    assert video.token_grid((16, 224, 224)) == (8, 14, 14)
    assert "token_grid_3d" in video.parts and "token_grid_2d" not in video.parts


def test_an_unknown_model_lists_the_known_families() -> None:
    with pytest.raises(UnsupportedBackboneError, match=r"Known backbone families: .*swin.*vit.*toy"):
        describe(nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "vpt_deep"])
def test_methods_apply_train_and_round_trip(method: str, tmp_path) -> None:
    base = toy()
    model = vpeft.apply(copy.deepcopy(base), method)
    trainable = vpeft.trainable_parameters(model)
    assert vpeft.count_trainable(model, include_head=False) > 0
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    torch.nn.functional.cross_entropy(model(inputs(4)), torch.arange(4) % CLASSES).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= set(trainable) and changed & set(vpeft.trainable_parameters(model, include_head=False))
    model.eval()
    vpeft.save_adapter(model, tmp_path)
    assert set(load_file(str(tmp_path / "adapter.safetensors"))) == set(trainable)
    fresh = vpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(inputs()), model(inputs()))


def test_a_method_whose_parts_are_missing_is_refused_naming_them() -> None:
    mlp_only = toy(attention=False)
    assert "attention" not in describe(mlp_only).parts
    with pytest.raises(UnsupportedBackboneError, match=r"'adapter' does not apply to toy-transformer.*lacks attention"):
        vpeft.apply(mlp_only, "adapter")
    with pytest.raises(UnsupportedBackboneError, match=r"lacks attn_proj, qkv_fused"):
        vpeft.apply(toy(attention=False), "glora")
    assert vpeft.count_trainable(vpeft.apply(toy(attention=False), "lora"), include_head=False) > 0  # fc1, fc2
