"""timm's VisionTransformer: ViT, DeiT (incl. distilled), register tokens."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpeft.backbones.anatomy import (
    Anatomy,
    architecture,
    classifier_heads,
    has_layernorm,
    has_module,
    transformer_block,
)
from vpeft.backbones.registry import BackboneFamily, register_family

#: parts of a timm ViT (what ``vpeft bench --methods all`` picks methods by)
VIT_PARTS = frozenset({
    "blocks", "attention", "qkv_fused", "attn_proj", "mlp", "layernorm", "isotropic", "tokens", "token_grid_2d",
})  # fmt: skip


def describe_vit(model: nn.Module) -> Anatomy:
    """The anatomy of a timm VisionTransformer (flat token sequence, prefix tokens first)."""
    dim = int(model.embed_dim)
    blocks = [transformer_block(f"blocks.{i}", b, dim) for i, b in enumerate(model.blocks)]
    final = [n for n in ("norm", "fc_norm") if has_module(model, n) and not isinstance(getattr(model, n), nn.Identity)]
    patch = getattr(model.patch_embed, "patch_size", None)
    num_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    return Anatomy(
        family="vit",
        architecture=architecture(model),
        blocks=blocks,
        heads=classifier_heads(model),
        embed="patch_embed",
        final_norms=final,
        embed_dim=dim,
        patch_size=tuple(patch) if patch is not None else None,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        num_register_tokens=num_reg,
        has_class_token=getattr(model, "cls_token", None) is not None,
        global_pool=str(getattr(model, "global_pool", "")),
        extra_parts=frozenset({"tokens", *(["layernorm"] if has_layernorm(model) else [])}),
    )


VIT = register_family(
    BackboneFamily(
        name="vit",
        matches=lambda model: isinstance(model, VisionTransformer),
        describe=describe_vit,
        summary="timm VisionTransformer: ViT, DeiT, registers",
    )
)
