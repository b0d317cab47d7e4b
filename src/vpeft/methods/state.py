"""What vpeft records on a model it changed, and applying a method to a model.

Below the public API (:mod:`vpeft.api` re-exports these), so a method that applies another
configuration of itself to a copy (E2VPT's pruning probe, GLoRA's subnet) does so without
importing the API back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vpeft.backbones.anatomy import Anatomy, backbone_identity
from vpeft.backbones.registry import describe
from vpeft.errors import ConfigError, VPeftError
from vpeft.methods.base import MethodConfig, StageData, get_method

#: the model attribute that holds the :class:`PeftState` (a plain attribute, outside the state_dict)
STATE_ATTR = "_vpeft_state"


@dataclass
class PeftState:
    """What vpeft records on a model it changed (a plain attribute, not part of the state_dict)."""

    method: str
    config: MethodConfig
    anatomy: Anatomy
    identity: dict[str, Any]
    merged: bool = False
    merged_names: list[str] = field(default_factory=list)


def get_state(model: nn.Module) -> PeftState | None:
    """The vpeft state of a model, or None if no method was applied."""
    return getattr(model, STATE_ATTR, None)


def require_state(model: nn.Module, action: str) -> PeftState:
    """The vpeft state of a model; a clear error naming ``action`` if no method was applied."""
    state = get_state(model)
    if state is None:
        raise VPeftError(
            f"cannot {action}: no vpeft method was applied to this model; call vpeft.apply(model, ...) first"
        )
    return state


def make_config(method: str | MethodConfig, **options: Any) -> MethodConfig:
    """Turn a method name plus options, or a config object, into a validated config."""
    if isinstance(method, MethodConfig):
        if options:
            raise ConfigError("pass options either inside the config object or as keywords, not both")
        return method
    return get_method(method).config_class.from_options(**options)


def apply(model: nn.Module, method: str | MethodConfig, *, data: Any = None, **options: Any) -> nn.Module:
    """Freeze the backbone, inject the method, keep the classifier head trainable. Returns ``model``.

    ``method`` is a registered name (see :func:`vpeft.list_methods`) with its options as keywords, or
    a method's config object. The model is changed in place.

    A method with a data stage (GPS, SPT, SCT) first reads ``data``, the training split: a Dataset
    of (model input, label) pairs, a DataLoader or a :class:`~vpeft.methods.base.StageData`. What
    it decides is kept in the config (``get_state(model).config``) and saved with the adapter, so
    :func:`vpeft.load_adapter` needs no data.
    """
    if get_state(model) is not None:
        raise VPeftError(
            f"this model already has vpeft method '{get_state(model).method}' applied; "
            "create a fresh model to apply another"
        )
    config = make_config(method, **options)
    impl = get_method(config.method)
    anatomy = describe(model)
    impl.check_backbone(anatomy)
    identity = backbone_identity(model, anatomy)
    if impl.stage is not None and not impl.prepared(config):
        if data is None:
            raise ConfigError(
                f"method '{impl.name}' chooses what to train from the training data ({impl.stage.description}): "
                "pass data=<training Dataset of (input, label) pairs> to vpeft.apply, or a saved selection"
            )
        config = impl.prepare(model, anatomy, config, StageData.wrap(data, model))
    elif data is not None:
        what = "its config already holds the stage's decision" if impl.stage else "it reads no data"
        raise ConfigError(f"method '{impl.name}' was given data, but {what}; drop data=")
    for param in model.parameters():
        param.requires_grad_(False)
    impl.inject(model, anatomy, config)
    for name, param in model.named_parameters():
        if anatomy.is_head_param(name):
            param.requires_grad_(True)
    object.__setattr__(model, STATE_ATTR, PeftState(config.method, config, anatomy, identity))
    return model


def trainable_parameters(model: nn.Module, include_head: bool = True) -> dict[str, nn.Parameter]:
    """The parameters that train, by name; without the classifier head(s) if ``include_head`` is False."""
    state = get_state(model)
    anatomy = state.anatomy if state else describe(model)
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and (include_head or not anatomy.is_head_param(name))
    }
