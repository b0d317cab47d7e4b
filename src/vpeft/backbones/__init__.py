"""Backbones: what a model is made of (:mod:`.anatomy`), the families that describe and create models
(:mod:`.registry`, one module per built-in family), and creating a backbone by name (:mod:`.create`).

Adding a backbone family: build a :class:`BackboneFamily` (``matches``, ``describe``, optionally
``input_config`` and embedded ``create``) and pass it to :func:`register_family`.
"""

from vpeft.backbones import cnn, efficientnet_lite, swin, vit, vit_mini  # noqa: F401  (register the built-ins)
from vpeft.backbones.anatomy import PARTS, Anatomy, BlockParts, backbone_identity
from vpeft.backbones.create import (
    HUB_PREFIXES,
    BackboneError,
    create_backbone,
    embedded_names,
    load_weights_file,
    local_dir_weights,
    read_state_dict,
)
from vpeft.backbones.registry import (
    BackboneFamily,
    UnsupportedBackboneError,
    describe,
    family_names,
    input_config,
    register_family,
)

__all__ = [
    "HUB_PREFIXES",
    "PARTS",
    "Anatomy",
    "BackboneError",
    "BackboneFamily",
    "BlockParts",
    "UnsupportedBackboneError",
    "backbone_identity",
    "create_backbone",
    "describe",
    "embedded_names",
    "family_names",
    "input_config",
    "load_weights_file",
    "local_dir_weights",
    "read_state_dict",
    "register_family",
]
