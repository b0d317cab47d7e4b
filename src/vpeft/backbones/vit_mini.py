"""``vpeft/vit-mini``: the embedded mini ViT (patch 4, width 192, depth 6, 28 px), pre-trained on
Fashion-MNIST by vpeft (``scripts/pretrain_vit_mini.py``); its weights and card ship in ``vpeft.assets``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import timm
from safetensors.torch import load
from torch import nn

from vpeft.backbones.registry import BackboneFamily, register_family
from vpeft.backbones.vit import VIT, describe_vit

NAME = "vpeft/vit-mini"


@lru_cache(maxsize=1)
def vit_mini_card() -> dict[str, Any]:
    """Recipe, pre-training accuracy and transfer report of the mini ViT."""
    return json.loads(resources.files("vpeft.assets").joinpath("vit_mini.json").read_text())


def create_vit_mini(num_classes: int, pretrained: bool = True, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    """The mini ViT with a fresh ``num_classes`` head; Fashion-MNIST weights when ``pretrained``."""
    card = vit_mini_card()
    arch = {**card["recipe"]["architecture"], **kwargs}
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, **arch
    )
    mean, std = card["recipe"]["mean"], card["recipe"]["std"]
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "architecture": NAME,
        "tag": "fmnist" if pretrained else "",
        "input_size": (3, arch["img_size"], arch["img_size"]),
        "mean": (mean,) * 3,
        "std": (std,) * 3,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "num_classes": num_classes,
    }
    if pretrained:
        state = load(resources.files("vpeft.assets").joinpath("vit_mini.safetensors").read_bytes())
        result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or unexpected:
            raise RuntimeError(f"vit_mini.safetensors does not fit the mini ViT: {missing[:3]} {unexpected[:3]}")
    return model


def _is_vit_mini(model: nn.Module) -> bool:
    return VIT.matches(model) and (getattr(model, "pretrained_cfg", None) or {}).get("architecture") == NAME


VIT_MINI = register_family(
    BackboneFamily(
        name="vit-mini",
        matches=_is_vit_mini,
        describe=describe_vit,
        embedded=(NAME,),
        create=create_vit_mini,
        summary="the embedded mini ViT, vpeft/vit-mini",
    )
)
