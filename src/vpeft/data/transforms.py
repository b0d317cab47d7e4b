"""Input transforms resolved from the backbone's own data config, plus the protocol presets.

Presets (V-PETL Bench / VPT):
- ``vtab``: resize to the input size, no augmentation (deterministic: decoded images are cached);
- ``fgvc``: training: resize to 256/224 of the input size, random crop, horizontal flip;
  evaluation: the same resize and a center crop.
Mean and std always come from the model's data config, never hard-coded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms import v2 as T

from vpeft.backbones.registry import input_config as family_input_config
from vpeft.errors import ConfigError

PRESETS = ("vtab", "fgvc")


@dataclass
class InputConfig:
    """What a backbone expects as input."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


def input_config(model: nn.Module) -> InputConfig:
    """Input size, mean, std and interpolation of ``model``, as its backbone family gives them
    (by default timm's data config, with the model's own size where it has one)."""
    return InputConfig(**family_input_config(model))


def _interp(name: str) -> T.InterpolationMode:
    return {"bilinear": T.InterpolationMode.BILINEAR, "nearest": T.InterpolationMode.NEAREST}.get(
        name, T.InterpolationMode.BICUBIC
    )


def is_deterministic(preset: str, train: bool) -> bool:
    """Whether a preset's transform gives the same tensor for an image every time."""
    return preset == "vtab" or not train


def build_transform(
    cfg: InputConfig, preset: str, train: bool
) -> tuple[Callable, Callable[[torch.Tensor], torch.Tensor]]:
    """Return (geometry: PIL -> uint8 tensor, normalize: uint8 tensor -> float tensor).

    The split lets a deterministic geometry be cached as uint8 while normalization runs per batch.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown transform preset '{preset}'; use one of {', '.join(PRESETS)}")
    interp = _interp(cfg.interpolation)
    if preset == "vtab":
        geometry = [T.Resize(cfg.size, interpolation=interp, antialias=True)]
    else:
        resize = tuple(round(s * 256 / 224) for s in cfg.size)
        if train:
            geometry = [
                T.Resize(resize, interpolation=interp, antialias=True),
                T.RandomCrop(cfg.size),
                T.RandomHorizontalFlip(),
            ]
        else:
            geometry = [T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(cfg.size)]
    geometry_t = T.Compose([T.PILToTensor(), *geometry])
    normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(cfg.mean, cfg.std)])
    return geometry_t, normalize
