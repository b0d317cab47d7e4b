"""What a timm backbone is made of. The one module of vpeft that knows how timm builds models.

Methods never inspect a model's classes themselves: they ask :func:`describe` for the blocks,
the attention and MLP of each block, the norms, the token layout and the classifier head, and
write their changes against those roles. Supporting a new timm family means teaching this file
about it, not touching the methods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from vpeft.errors import UnsupportedBackboneError

#: Backbone families a method can declare it applies to.
FAMILIES = ("vit", "swin", "cnn")


@dataclass
class BlockParts:
    """Module names (relative to the model) of one block's parts; ``None`` where absent."""

    name: str
    dim: int
    norm1: str | None = None
    attn: str | None = None
    #: fused q/k/v projection, output laid out as [q | k | v]
    qkv: str | None = None
    #: separate q, k, v projections (EVA-style models); empty when fused
    q: str | None = None
    k: str | None = None
    v: str | None = None
    proj: str | None = None
    norm2: str | None = None
    mlp: str | None = None
    fc1: str | None = None
    fc2: str | None = None


@dataclass
class Anatomy:
    """The roles of a backbone's modules, as found by :func:`describe`."""

    family: str
    architecture: str
    blocks: list[BlockParts]
    #: module names of the classifier head(s); DeiT-distilled has two
    heads: list[str]
    #: the patch embedding (transformers) or stem (CNNs)
    embed: str | None
    #: norms after the last block (``norm``, ``fc_norm``, ConvNeXt's ``head.norm``)
    final_norms: list[str] = field(default_factory=list)
    embed_dim: int = 0
    patch_size: tuple[int, int] | None = None
    #: tokens before the patch tokens: class + distillation + register tokens (ViTs only)
    num_prefix_tokens: int = 0
    num_register_tokens: int = 0
    has_class_token: bool = False
    global_pool: str = ""

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def is_head_param(self, param_name: str) -> bool:
        """True when a parameter (by its name in the model) belongs to a classifier head."""
        return any(param_name == h or param_name.startswith(h + ".") for h in self.heads)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise UnsupportedBackboneError("internal: module not found in model")


def _has(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Module)


def _transformer_block(prefix: str, block: nn.Module, dim: int) -> BlockParts:
    parts = BlockParts(name=prefix, dim=dim)
    for role in ("norm1", "attn", "norm2", "mlp"):
        if _has(block, role):
            setattr(parts, role, f"{prefix}.{role}")
    attn = getattr(block, "attn", None)
    if attn is not None:
        if isinstance(getattr(attn, "qkv", None), nn.Linear):
            parts.qkv = f"{parts.attn}.qkv"
        for role, candidates in (("q", ("q_proj", "q")), ("k", ("k_proj", "k")), ("v", ("v_proj", "v"))):
            for cand in candidates:
                if isinstance(getattr(attn, cand, None), nn.Linear):
                    setattr(parts, role, f"{parts.attn}.{cand}")
                    break
        if isinstance(getattr(attn, "proj", None), nn.Linear):
            parts.proj = f"{parts.attn}.proj"
    mlp = getattr(block, "mlp", None)
    if mlp is not None:
        for role in ("fc1", "fc2"):
            if isinstance(getattr(mlp, role, None), (nn.Linear, nn.Conv2d)):
                setattr(parts, role, f"{parts.mlp}.{role}")
    return parts


def _heads(model: nn.Module) -> list[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None:
        raise UnsupportedBackboneError(
            f"{type(model).__name__} has no get_classifier(); vpeft needs a timm classification model"
        )
    modules = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return [_module_name(model, m) for m in modules]


def _describe_vit(model: nn.Module) -> Anatomy:
    dim = int(model.embed_dim)
    blocks = [_transformer_block(f"blocks.{i}", b, dim) for i, b in enumerate(model.blocks)]
    final = [n for n in ("norm", "fc_norm") if _has(model, n) and not isinstance(getattr(model, n), nn.Identity)]
    patch = getattr(model.patch_embed, "patch_size", None)
    num_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    return Anatomy(
        family="vit",
        architecture=_architecture(model),
        blocks=blocks,
        heads=_heads(model),
        embed="patch_embed",
        final_norms=final,
        embed_dim=dim,
        patch_size=tuple(patch) if patch is not None else None,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        num_register_tokens=num_reg,
        has_class_token=getattr(model, "cls_token", None) is not None,
        global_pool=str(getattr(model, "global_pool", "")),
    )


def _describe_swin(model: nn.Module) -> Anatomy:
    blocks = []
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage.blocks):
            dim = block.norm1.normalized_shape[0]
            blocks.append(_transformer_block(f"layers.{s}.blocks.{b}", block, dim))
    final = ["norm"] if _has(model, "norm") and not isinstance(model.norm, nn.Identity) else []
    patch = getattr(model.patch_embed, "patch_size", None)
    return Anatomy(
        family="swin",
        architecture=_architecture(model),
        blocks=blocks,
        heads=_heads(model),
        embed="patch_embed",
        final_norms=final,
        embed_dim=int(model.embed_dim),
        patch_size=tuple(patch) if patch is not None else None,
        global_pool=str(getattr(model, "global_pool", "")),
    )


def _describe_cnn(model: nn.Module, stages: list[tuple[str, nn.Module]]) -> Anatomy:
    """``stages``: (name, module) of each stage, whose children (or ``.blocks``) are the blocks."""
    blocks: list[BlockParts] = []
    for stage_name, stage in stages:
        inner = stage.blocks if _has(stage, "blocks") else stage
        inner_prefix = f"{stage_name}.blocks" if _has(stage, "blocks") else stage_name
        for b, block in enumerate(inner.children()):
            name = f"{inner_prefix}.{b}"
            parts = BlockParts(name=name, dim=0)
            if _has(block, "mlp"):  # ConvNeXt blocks have an MLP
                parts = _transformer_block(name, block, 0)
            blocks.append(parts)
    final = [n for n in ("head.norm", "bn2", "conv_head") if _get(model, n) is not None]
    stem = next((n for n in ("stem", "conv_stem", "conv1") if _has(model, n)), None)
    return Anatomy(
        family="cnn",
        architecture=_architecture(model),
        blocks=blocks,
        heads=_heads(model),
        embed=stem,
        final_norms=final,
        embed_dim=int(getattr(model, "num_features", 0)),
        global_pool=str(getattr(model, "global_pool", "")),
    )


def _get(model: nn.Module, dotted: str) -> nn.Module | None:
    try:
        module = model.get_submodule(dotted)
    except AttributeError:
        return None
    return None if isinstance(module, nn.Identity) else module


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def describe(model: nn.Module) -> Anatomy:
    """Return the anatomy of a timm model, or raise a clear error for an unknown family."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return _describe_vit(model)
    if isinstance(model, SwinTransformer):
        return _describe_swin(model)
    if isinstance(model, ResNet):
        return _describe_cnn(model, [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)])
    if isinstance(model, ConvNeXt):
        return _describe_cnn(model, [(f"stages.{i}", s) for i, s in enumerate(model.stages)])
    if isinstance(model, EfficientNet):
        return _describe_cnn(model, [(f"blocks.{i}", s) for i, s in enumerate(model.blocks)])
    raise UnsupportedBackboneError(
        f"vpeft does not know the anatomy of {type(model).__name__}. Supported timm families: "
        "VisionTransformer (ViT, DeiT, registers), SwinTransformer, ResNet, ConvNeXt, EfficientNet."
    )


def backbone_identity(model: nn.Module, anatomy: Anatomy) -> dict:
    """Identify a backbone's architecture and weights, ignoring the classifier head.

    ``structure`` hashes every backbone parameter's name and shape, so an adapter saved for
    one architecture cannot be loaded into another. ``weights`` hashes a sample of each
    backbone tensor's values, to warn when the same architecture carries other weights.
    """
    structure = hashlib.sha256()
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if anatomy.is_head_param(name):
            continue
        structure.update(f"{name}:{tuple(tensor.shape)};".encode())
        sample = tensor.detach().flatten()[:64].to(torch.float32).cpu().contiguous()
        weights.update(sample.numpy().tobytes())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "architecture": anatomy.architecture,
        "family": anatomy.family,
        "pretrained_tag": cfg.get("tag") or "",
        "structure": structure.hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
    }
