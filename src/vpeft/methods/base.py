"""The method registry, the config base class and the helpers every method shares.

A method is a :class:`Method` subclass in its own file, decorated with :func:`register`. It
declares a :class:`MethodConfig` dataclass (every field carries ``help`` metadata), the backbone
families it applies to, and implements :meth:`Method.inject`, which changes a model whose
parameters are already all frozen.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vpeft.anatomy import Anatomy
from vpeft.config import convert_options
from vpeft.errors import ConfigError, NotMergeableError, UnknownMethodError, UnsupportedBackboneError


@dataclass
class MethodConfig:
    """Base of every method's options. Subclasses add dataclass fields made with :func:`option`."""

    method: ClassVar[str] = ""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def option_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build a config from keyword options; strings (from a command line) are converted."""
        valid = cls.option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method '{cls.method}'; valid options: "
                f"{valid or 'none (this method takes no options)'}"
            )
        return cls(**convert_options(cls, cls.method, options))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for out-of-range values. Override in subclasses."""


class Method:
    """A PEFT method. Subclasses set the class attributes and implement :meth:`inject`."""

    name: ClassVar[str]
    family: ClassVar[str]  # taxonomy: "addition/adapter", "partial/reparameterization", ...
    paper: ClassVar[str]
    backbones: ClassVar[tuple[str, ...]]  # anatomy families it applies to
    mergeable: ClassVar[bool] = False
    #: whether the method trains the whole model itself (full fine-tuning)
    trains_everything: ClassVar[bool] = False
    #: whether one training run is the whole method (NOAH needs supernet -> search -> retrain runs)
    single_run: ClassVar[bool] = True
    config_class: ClassVar[type[MethodConfig]]

    def check_backbone(self, anatomy: Anatomy) -> None:
        if anatomy.family not in self.backbones:
            raise UnsupportedBackboneError(
                f"method '{self.name}' does not apply to {anatomy.architecture} (a {anatomy.family} "
                f"backbone); it applies to: {', '.join(self.backbones)}"
            )

    def inject(self, model: nn.Module, anatomy: Anatomy, config: MethodConfig) -> None:
        raise NotImplementedError

    def after_merge(self, model: nn.Module) -> None:
        """Called after every wrapper was folded: remove any module the method added at the model's root."""

    def before_unmerge(self, model: nn.Module) -> None:
        """Called before the wrappers are restored: put back what :meth:`after_merge` removed."""

    def merge(self, model: nn.Module) -> None:
        """Fold the method into the backbone. Selection methods have nothing to fold."""
        if not self.mergeable:
            raise NotMergeableError(
                f"method '{self.name}' adds modules that cannot be folded into the backbone's "
                "weights; serve the model unmerged (mergeable methods: "
                f"{', '.join(m.name for m in _REGISTRY.values() if m.mergeable)})"
            )


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method '{cls.name}' registered twice")
    cls.config_class.method = cls.name
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method '{name}'; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_methods() -> list[Method]:
    return list(_REGISTRY.values())


# ---------------------------------------------------------------- helpers for methods


class BaseLayerWrapper(nn.Module):
    """A module that replaces a backbone module and keeps it as ``base_layer``.

    Mergeable wrappers implement :meth:`merge_into_base` and :meth:`unmerge_from_base`, which
    change ``base_layer``'s weights in place.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def merge_into_base(self) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged")

    def unmerge_from_base(self) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged")


class DeltaWeightWrapper(BaseLayerWrapper):
    """A wrapper whose update is W + delta_weight(): merging adds it to the base weight, unmerging subtracts it."""

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight += self.delta_weight()

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        self.base_layer.weight -= self.delta_weight()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def backbone_modules(model: nn.Module, anatomy: Anatomy) -> typing.Iterator[tuple[str, nn.Module]]:
    """Named modules of the model, without the classifier head(s)."""
    for name, module in model.named_modules():
        if name and not anatomy.is_head_param(name):
            yield name, module


def match_pattern(names: typing.Iterable[str], pattern: str) -> list[str]:
    """Module names that fully match a regular expression."""
    regex = re.compile(pattern)
    return [n for n in names if regex.fullmatch(n)]
