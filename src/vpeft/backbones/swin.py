"""timm's SwinTransformer: hierarchical stages of windowed-attention blocks on an (H, W) token grid."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer
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


def describe_swin(model: nn.Module) -> Anatomy:
    """The anatomy of a timm SwinTransformer."""
    blocks = []
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            dim = block.norm1.normalized_shape[0]
            blocks.append(transformer_block(f"layers.{s}.blocks.{b}", block, dim))
    final = ["norm"] if has_module(model, "norm") and not isinstance(model.norm, nn.Identity) else []
    patch = getattr(model.patch_embed, "patch_size", None)
    return Anatomy(
        family="swin",
        architecture=architecture(model),
        blocks=blocks,
        heads=classifier_heads(model),
        embed="patch_embed",
        final_norms=final,
        embed_dim=int(model.embed_dim),
        patch_size=tuple(patch) if patch is not None else None,
        global_pool=str(getattr(model, "global_pool", "")),
        extra_parts=frozenset({"stages", *(["layernorm"] if has_layernorm(model) else [])}),
    )


SWIN = register_family(
    BackboneFamily(
        name="swin",
        matches=lambda model: isinstance(model, SwinTransformer),
        describe=describe_swin,
        summary="timm SwinTransformer",
    )
)
