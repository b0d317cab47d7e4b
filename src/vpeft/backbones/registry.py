"""Backbone families: the one seam for adding a backbone architecture to vpeft.

A :class:`BackboneFamily` recognises its models (``matches``), describes them (``describe`` -> an
:class:`~vpeft.backbones.anatomy.Anatomy`), gives their input configuration, and may create models by
embedded name (``vpeft/...``). :func:`register_family` adds one; :func:`describe` asks the registered
families, the most recently registered first, so a new family can refine a built-in one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.errors import UnsupportedBackboneError

__all__ = [
    "BackboneFamily",
    "UnsupportedBackboneError",
    "default_input_config",
    "describe",
    "embedded_factory",
    "embedded_names",
    "family_names",
    "find_family",
    "input_config",
    "register_family",
]


def default_input_config(model: nn.Module) -> dict[str, Any]:
    """Input ``size`` (H, W), ``mean``, ``std`` and ``interpolation`` from timm's data config of ``model``.

    The size is the model's own when it has one (a ViT built with ``img_size=32`` expects 32 px,
    whatever its pretrained config says).
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = tuple(cfg["input_size"][1:])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    return {"size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "interpolation": cfg["interpolation"]}


@dataclass(frozen=True)
class BackboneFamily:
    """One family of backbones.

    ``create(num_classes, pretrained=..., drop_path_rate=..., **kwargs)`` builds the models named in
    ``embedded`` (``vpeft/...`` names); most families create nothing (timm builds their models).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], Anatomy]
    input_config: Callable[[nn.Module], dict[str, Any]] = default_input_config
    embedded: tuple[str, ...] = ()
    create: Callable[..., nn.Module] | None = None
    #: what the family covers, for error messages (e.g. "timm VisionTransformer: ViT, DeiT, registers")
    summary: str = ""


_FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Add (or replace, by name) a family; it is asked before the families registered earlier."""
    if family.embedded and family.create is None:
        raise ValueError(f"family '{family.name}' names embedded models but has no create()")
    _FAMILIES.pop(family.name, None)
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    """Names of the registered families, in registration order."""
    return list(_FAMILIES)


def find_family(model: nn.Module) -> BackboneFamily:
    """The family that recognises ``model``; :class:`UnsupportedBackboneError` listing the known ones if none."""
    for family in reversed(_FAMILIES.values()):
        if family.matches(model):
            return family
    known = "; ".join(f"{f.name} ({f.summary})" if f.summary else f.name for f in _FAMILIES.values())
    raise UnsupportedBackboneError(
        f"vpeft does not know the anatomy of {type(model).__name__}. Known backbone families: {known}. "
        "Add one with vpeft.backbones.register_family."
    )


def describe(model: nn.Module) -> Anatomy:
    """The anatomy of ``model``, from the family that recognises it."""
    return find_family(model).describe(model)


def input_config(model: nn.Module) -> dict[str, Any]:
    """Input size, mean, std, interpolation of ``model``: its family's, or timm's data config for an unknown model."""
    for family in reversed(_FAMILIES.values()):
        if family.matches(model):
            return family.input_config(model)
    return default_input_config(model)


def embedded_names() -> list[str]:
    """The ``vpeft/...`` model names the registered families create."""
    return sorted(name for f in _FAMILIES.values() for name in f.embedded)


def embedded_factory(name: str) -> Callable[..., nn.Module] | None:
    """The ``create`` of the family that makes the embedded model ``name``, or None."""
    for family in reversed(_FAMILIES.values()):
        if name in family.embedded:
            return family.create
    return None
