"""Creating a backbone: a timm name (hub weights when online), a local weights file, or an embedded model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from vpeft.backbones.registry import describe, embedded_factory, embedded_names
from vpeft.errors import VPeftError

__all__ = [
    "HUB_PREFIXES",
    "BackboneError",
    "create_backbone",
    "embedded_names",
    "load_weights_file",
    "local_dir_weights",
    "read_state_dict",
]


class BackboneError(VPeftError, ValueError):
    """A model name or weights file cannot be used."""


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    pretrained_file: str | None = None,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a classification model with a fresh ``num_classes`` head.

    ``name``: a timm model name (``vit_base_patch16_224.augreg_in21k``; weights from the hub when
    ``pretrained``), or an embedded backbone (``vpeft/...``). ``pretrained_file``: a local
    ``.safetensors``, ``.pth``/``.bin`` (loaded with ``weights_only=True``) or Google ``.npz``.
    Embedded names are those a registered backbone family creates (:func:`embedded_names`).
    """
    if name.startswith("vpeft/"):
        factory = embedded_factory(name)
        if factory is None:
            raise BackboneError(
                f"unknown embedded backbone '{name}'; available: {', '.join(embedded_names()) or 'none'}"
            )
        return factory(num_classes=num_classes, pretrained=pretrained, drop_path_rate=drop_path_rate, **kwargs)
    hub_name = name.startswith(HUB_PREFIXES)  # timm resolves these itself (a Hub repo, or a local folder)
    if name.startswith("local-dir:") and not (Path(name.partition(":")[2]) / "config.json").is_file():
        raise BackboneError(
            f"'{name}': a local-dir: backbone is a folder with timm's config.json and model.safetensors "
            "(as `timm` or `huggingface_hub` save them); no config.json there"
        )
    if not hub_name and not timm.is_model(name.split(".")[0]):
        raise BackboneError(
            f"'{name}' is not a timm model name; see timm.list_models(), use hf-hub:<repo>, local-dir:<folder>, "
            "or an embedded vpeft/... name"
        )
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    hub = pretrained and pretrained_file is None
    try:
        model = timm.create_model(name, pretrained=hub, num_classes=num_classes, **kwargs)
    except Exception as exc:  # hub download failures surface as many exception types
        if hub:
            raise BackboneError(
                f"could not load pretrained weights for '{name}' ({type(exc).__name__}: {exc}); "
                "without internet pass --pretrained-file <local weights> or --no-pretrained"
            ) from exc
        raise
    if pretrained_file is not None:
        load_weights_file(model, pretrained_file)
    return model


#: backbone names timm resolves itself: a Hugging Face Hub repository, or a local folder in the Hub's layout
HUB_PREFIXES = ("hf-hub:", "local-dir:")


def local_dir_weights(name: str) -> Path | None:
    """The weights file of a ``local-dir:`` backbone (part of a run's identity), or None."""
    if not name.startswith("local-dir:"):
        return None
    folder = Path(name.partition(":")[2])
    for candidate in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; never unpickles code (safetensors, or torch.load weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # truncated or foreign file
            raise BackboneError(f"'{path}' is damaged or not a safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"'{path}' is not a weights file torch can load safely ({type(exc).__name__}: {str(exc)[:200]}); "
            "only tensors are read (weights_only), never pickled code"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load backbone weights into ``model``, leaving its (new) classifier head as initialised."""
    path = Path(path)
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise BackboneError(f"{type(model).__name__} cannot read Google .npz checkpoints; convert to .safetensors")
        try:
            model.load_pretrained(str(path))
        except (ValueError, KeyError, OSError, EOFError) as exc:  # np.load refuses pickled objects
            raise BackboneError(
                f"'{path}' is not a Google .npz checkpoint this model can read ({type(exc).__name__}: {exc}); "
                "pickled objects are never loaded"
            ) from None
        return
    state = read_state_dict(path)
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception:
            pass
    anatomy = describe(model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (anatomy.is_head_param(k) and k in own and own[k].shape != v.shape)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not anatomy.is_head_param(k)]
    if missing:
        raise BackboneError(
            f"'{path}' does not fit {anatomy.architecture}: {len(missing)} backbone tensors missing, "
            f"e.g. {missing[:3]}; check the model name matches the weights"
        )
