"""What a backbone is made of: the roles of its modules (:class:`Anatomy`) and the parts it offers.

Methods never inspect a model's classes themselves: they read the blocks, the attention and MLP of
each block, the norms, the token layout and the classifier head from an :class:`Anatomy`, and declare
the :data:`PARTS` they need. A backbone family (:mod:`vpeft.backbones.registry`) builds the anatomy.

The parts vocabulary (what :attr:`Anatomy.parts` may hold):

- ``blocks``: a sequence of residual blocks (every supported backbone)
- ``attention``: blocks have an attention module (``attn``)
- ``qkv_fused`` / ``qkv_separate``: attention projects q, k, v with one Linear ``[q | k | v]`` / three Linears
- ``attn_proj``: attention ends with a Linear output projection
- ``mlp``: blocks have an MLP with Linear ``fc1`` and ``fc2`` (ViT, Swin, ConvNeXt)
- ``layernorm``: the backbone has affine LayerNorms
- ``isotropic``: every block has the same width (a columnar ViT, not a hierarchical model)
- ``tokens``: one flat token sequence (B, N, C) through the blocks, prefix tokens first, then the patches;
  prompts can be inserted after the prefix tokens
- ``token_grid_2d`` / ``token_grid_3d``: the patch tokens form an (H, W) / (T, H, W) grid
- ``stages``: hierarchical stages that downsample (Swin, CNNs)
- ``conv``: blocks are convolutional (CNNs)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from vpeft.errors import UnsupportedBackboneError

#: the parts vocabulary: capabilities an anatomy offers and a method can require
PARTS = frozenset({
    "blocks", "attention", "qkv_fused", "qkv_separate", "attn_proj", "mlp", "layernorm", "isotropic",
    "tokens", "token_grid_2d", "token_grid_3d", "stages", "conv",
})  # fmt: skip


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
    """The roles of a backbone's modules, as a backbone family describes them."""

    #: layout family ("vit", "swin", "cnn", or a registered family's own), part of a backbone's identity
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
    #: patch size, (H, W) or (T, H, W) for a video tubelet; None for CNNs
    patch_size: tuple[int, ...] | None = None
    #: tokens before the patch tokens: class + distillation + register tokens (ViTs only)
    num_prefix_tokens: int = 0
    num_register_tokens: int = 0
    has_class_token: bool = False
    global_pool: str = ""
    #: parts the family states beyond those read off the blocks (``tokens``, ``stages``, ``conv``, ``layernorm``)
    extra_parts: frozenset[str] = frozenset()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def parts(self) -> frozenset[str]:
        """The capabilities this backbone offers, in the vocabulary of :data:`PARTS`."""
        found = set(self.extra_parts)
        blocks = self.blocks
        if blocks:
            found.add("blocks")
            checks = {
                "attention": lambda b: b.attn is not None,
                "qkv_fused": lambda b: b.qkv is not None,
                "qkv_separate": lambda b: None not in (b.q, b.k, b.v),
                "attn_proj": lambda b: b.proj is not None,
                "mlp": lambda b: None not in (b.mlp, b.fc1, b.fc2),
            }
            found.update(part for part, has in checks.items() if all(has(b) for b in blocks))
            if len({b.dim for b in blocks}) == 1 and blocks[0].dim > 0:
                found.add("isotropic")
        if self.patch_size is not None and len(self.patch_size) in (2, 3):
            found.add(f"token_grid_{len(self.patch_size)}d")
        return frozenset(found)

    def token_grid(self, input_size: tuple[int, ...]) -> tuple[int, ...]:
        """The grid of patch tokens for an input of ``input_size`` ((H, W), or (T, H, W) for video)."""
        if self.patch_size is None:
            raise UnsupportedBackboneError(f"{self.architecture} has no patch tokens")
        if len(input_size) != len(self.patch_size):
            raise ValueError(f"input size {tuple(input_size)} does not match the patch size {self.patch_size}")
        return tuple(int(s) // int(p) for s, p in zip(input_size, self.patch_size, strict=True))

    def is_head_param(self, param_name: str) -> bool:
        """True when a parameter (by its name in the model) belongs to a classifier head."""
        return any(param_name == h or param_name.startswith(h + ".") for h in self.heads)


def module_name(model: nn.Module, target: nn.Module) -> str:
    """The name of ``target`` inside ``model``."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise UnsupportedBackboneError("internal: module not found in model")


def has_module(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a submodule."""
    return isinstance(getattr(module, name, None), nn.Module)


def find_module(model: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at ``dotted``, or None where absent or an ``nn.Identity``."""
    try:
        module = model.get_submodule(dotted)
    except AttributeError:
        return None
    return None if isinstance(module, nn.Identity) else module


def transformer_block(prefix: str, block: nn.Module, dim: int) -> BlockParts:
    """The parts of a pre-norm transformer block laid out as timm's (norm1, attn.qkv/q/k/v, attn.proj, norm2, mlp)."""
    parts = BlockParts(name=prefix, dim=dim)
    for role in ("norm1", "attn", "norm2", "mlp"):
        if has_module(block, role):
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


def classifier_heads(model: nn.Module) -> list[str]:
    """Module names of the model's classifier(s), from ``get_classifier()``."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None:
        raise UnsupportedBackboneError(
            f"{type(model).__name__} has no get_classifier(); vpeft needs a timm classification model"
        )
    modules = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return [module_name(model, m) for m in modules]


def has_layernorm(model: nn.Module) -> bool:
    """Whether the model has a LayerNorm with affine parameters."""
    return any(isinstance(m, nn.LayerNorm) and m.weight is not None for m in model.modules())


def architecture(model: nn.Module) -> str:
    """The architecture name from timm's pretrained config, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


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
