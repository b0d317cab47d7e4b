"""timm's CNNs: ResNet, ConvNeXt (blocks with a Linear MLP, LayerNorm) and EfficientNet."""

from __future__ import annotations

from collections.abc import Callable

from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn

from vpeft.backbones.anatomy import (
    Anatomy,
    BlockParts,
    architecture,
    classifier_heads,
    find_module,
    has_layernorm,
    has_module,
    transformer_block,
)
from vpeft.backbones.registry import BackboneFamily, register_family


def describe_cnn(model: nn.Module, stages: list[tuple[str, nn.Module]]) -> Anatomy:
    """``stages``: (name, module) of each stage, whose children (or ``.blocks``) are the blocks."""
    blocks: list[BlockParts] = []
    for stage_name, stage in stages:
        inner = stage.blocks if has_module(stage, "blocks") else stage
        inner_prefix = f"{stage_name}.blocks" if has_module(stage, "blocks") else stage_name
        for b, block in enumerate(inner.children()):
            name = f"{inner_prefix}.{b}"
            parts = BlockParts(name=name, dim=0)
            if has_module(block, "mlp"):  # ConvNeXt blocks have an MLP
                parts = transformer_block(name, block, 0)
            blocks.append(parts)
    final = [n for n in ("head.norm", "bn2", "conv_head") if find_module(model, n) is not None]
    stem = next((n for n in ("stem", "conv_stem", "conv1") if has_module(model, n)), None)
    return Anatomy(
        family="cnn",
        architecture=architecture(model),
        blocks=blocks,
        heads=classifier_heads(model),
        embed=stem,
        final_norms=final,
        embed_dim=int(getattr(model, "num_features", 0)),
        global_pool=str(getattr(model, "global_pool", "")),
        extra_parts=frozenset({"stages", "conv", *(["layernorm"] if has_layernorm(model) else [])}),
    )


def _cnn_family(name: str, cls: type, stages: Callable[[nn.Module], list[tuple[str, nn.Module]]]) -> BackboneFamily:
    return register_family(
        BackboneFamily(
            name=name,
            matches=lambda model: isinstance(model, cls),
            describe=lambda model: describe_cnn(model, stages(model)),
            summary=f"timm {cls.__name__}",
        )
    )


RESNET = _cnn_family("resnet", ResNet, lambda m: [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)])
CONVNEXT = _cnn_family("convnext", ConvNeXt, lambda m: [(f"stages.{i}", s) for i, s in enumerate(m.stages)])
EFFICIENTNET = _cnn_family("efficientnet", EfficientNet, lambda m: [(f"blocks.{i}", s) for i, s in enumerate(m.blocks)])
