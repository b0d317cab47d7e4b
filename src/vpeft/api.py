"""The public API: apply a method to a timm model, count, save, load, merge."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vpeft import methods  # noqa: F401  (registers every method)
from vpeft.backbones.anatomy import Anatomy, backbone_identity
from vpeft.backbones.registry import describe
from vpeft.errors import AdapterMismatchError, ConfigError, VPeftError
from vpeft.methods.base import (
    BaseLayerWrapper,
    MethodConfig,
    StageData,
    get_method,
    registered_methods,
    replace_module,
)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
_STATE_ATTR = "_vpeft_state"
_MERGED_ATTR = "_vpeft_merged_wrapper"


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
    return getattr(model, _STATE_ATTR, None)


def _require_state(model: nn.Module, action: str) -> PeftState:
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

    ``method`` is a registered name (see :func:`list_methods`) with its options as keywords, or
    a method's config object. The model is changed in place.

    A method with a data stage (GPS, SPT, SCT) first reads ``data``, the training split: a Dataset
    of (model input, label) pairs, a DataLoader or a :class:`~vpeft.methods.base.StageData`. What
    it decides is kept in the config (``get_state(model).config``) and saved with the adapter, so
    :func:`load_adapter` needs no data.
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
    object.__setattr__(model, _STATE_ATTR, PeftState(config.method, config, anatomy, identity))
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


def count_trainable(model: nn.Module, include_head: bool = True) -> int:
    """Number of trainable parameters, with or without the classifier head(s)."""
    return sum(p.numel() for p in trainable_parameters(model, include_head).values())


def count_parameters(model: nn.Module) -> int:
    """All parameters of the model, trainable or not."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- save / load


def _json_config(state: PeftState) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "method": state.method,
        "options": state.config.to_dict(),
        "backbone": state.identity,
        "vpeft_version": _version(),
    }


def _version() -> str:
    from vpeft import __version__

    return __version__


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` (the method's and head's weights) and ``adapter_config.json``."""
    state = _require_state(model, "save an adapter")
    if state.merged:
        raise VPeftError("the model is merged; call vpeft.unmerge(model) before saving its adapter")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in trainable_parameters(model).items()}
    tensors.update(
        {name: b.detach().contiguous().cpu() for name, b in get_method(state.method).saved_buffers(model).items()}
    )
    _atomic_write(out / ADAPTER_WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"method": state.method}))
    text = json.dumps(_json_config(state), indent=2, sort_keys=True)
    _atomic_write(out / ADAPTER_CONFIG, lambda path: Path(path).write_text(text + "\n"))
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a saved adapter, with a clear error if the folder is not one.

    ``directory`` may be ``hf-hub:<repo id>[@revision]``: the adapter is fetched through huggingface_hub."""
    from vpeft.hub import resolve_adapter

    folder = directory = resolve_adapter(directory)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        if (folder / "peft" / ADAPTER_CONFIG).is_file():
            raise AdapterMismatchError(
                f"'{directory}' holds no vpeft adapter, only a peft export in its peft/ subfolder; load that with "
                f"vpeft.import_from_peft(model, '{folder / 'peft'}'), or pass the folder vpeft.save_adapter wrote"
            )
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in '{directory}'; pass the folder written by vpeft.save_adapter")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatchError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged") from exc
    if isinstance(config, dict) and "peft_type" in config:
        raise AdapterMismatchError(
            f"'{directory}' holds a Hugging Face peft adapter ({config.get('peft_type')}), not a vpeft one; "
            f"import it with vpeft.import_from_peft(model, '{directory}') (LoRA and DoRA)"
        )
    missing = [k for k in ("method", "options", "backbone") if not isinstance(config, dict) or k not in config]
    if missing:
        raise AdapterMismatchError(
            f"{path} is not a vpeft adapter config (no {', '.join(missing)}); pass a folder written by "
            "vpeft.save_adapter (a peft folder imports with vpeft.import_from_peft)"
        )
    return config


#: options whose default changed to follow the official code: an adapter saved without the option was
#: trained with the old value, which it keeps (method -> option -> value before the change)
_PRE_OFFICIAL_DEFAULTS = {"fact_tk": {"layout": "paper"}, "prefix": {"reparameterization": "per_layer"}}


def _legacy_defaults(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A saved config that predates an option gets the value it was trained with, not today's default."""
    return {**_PRE_OFFICIAL_DEFAULTS.get(method, {}), **options}


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the saved method to ``model`` (a fresh timm model of the same backbone) and load its weights.

    ``directory`` is a folder written by :func:`save_adapter`, or ``hf-hub:<repo id>[@revision]`` (``vpeft push``)."""
    from vpeft.hub import resolve_adapter

    directory = resolve_adapter(directory)
    saved = read_adapter_config(directory)
    expected = saved["backbone"]
    state = get_state(model)
    if state is None:
        anatomy = describe(model)
        identity = backbone_identity(model, anatomy)
    else:
        anatomy, identity = state.anatomy, state.identity
        if state.method != saved["method"]:
            raise AdapterMismatchError(
                f"the model already has method '{state.method}' applied, the adapter is '{saved['method']}'"
            )
    if identity["structure"] != expected["structure"]:
        raise AdapterMismatchError(
            f"the adapter in '{directory}' was saved for backbone {expected['architecture']} "
            f"(structure {expected['structure']}), but this model is {identity['architecture']} "
            f"(structure {identity['structure']}); create the model the adapter was trained on"
        )
    if identity["num_classes"] != expected["num_classes"]:
        raise AdapterMismatchError(
            f"the adapter's head has {expected['num_classes']} classes, this model's has {identity['num_classes']}; "
            f"create the model with num_classes={expected['num_classes']}"
        )
    if identity["weights"] != expected["weights"]:
        warnings.warn(
            f"the backbone's weights differ from those the adapter was trained on "
            f"({identity['weights']} vs {expected['weights']}); results may be meaningless",
            stacklevel=2,
        )
    if state is None:
        apply(model, saved["method"], **_legacy_defaults(saved["method"], saved["options"]))
    weights_path = Path(directory) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError:
        raise AdapterMismatchError(f"no {ADAPTER_WEIGHTS} in '{directory}'; the adapter folder is incomplete") from None
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        raise AdapterMismatchError(
            f"{weights_path} is damaged or not a safetensors file ({exc}); save or copy the adapter again"
        ) from None
    wanted: dict[str, torch.Tensor] = {
        **trainable_parameters(model),
        **get_method(saved["method"]).saved_buffers(model),
    }
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter weights do not match method '{saved['method']}' on this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, param in wanted.items():
            if param.shape != tensors[name].shape:
                raise AdapterMismatchError(
                    f"'{name}': saved shape {tuple(tensors[name].shape)}, model {tuple(param.shape)}"
                )
            param.copy_(tensors[name])
    return model


# ---------------------------------------------------------------- merge


def _wrappers(model: nn.Module) -> list[tuple[str, BaseLayerWrapper]]:
    """Every wrapper, in model order (vpeft's wrappers never nest)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseLayerWrapper)]


def merge(model: nn.Module) -> nn.Module:
    """Fold the method into the backbone's weights and put the backbone's own modules back.

    Afterwards the model's state_dict has exactly the backbone's keys (plus any bias a bias-free
    layer needed), so it loads into a plain timm model. :func:`unmerge` reverses it.
    """
    state = _require_state(model, "merge")
    if state.merged:
        return model
    impl = get_method(state.method)
    impl.merge(model)  # raises for methods that cannot be merged
    names = []
    for name, wrapper in _wrappers(model):
        wrapper.merge_into_base()
        base = wrapper.base_layer
        object.__setattr__(base, _MERGED_ATTR, wrapper)
        replace_module(model, name, base)
        names.append(name)
    impl.after_merge(model)
    state.merged, state.merged_names = True, names
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: subtract the update from the backbone's weights and restore the wrappers."""
    state = _require_state(model, "unmerge")
    if not state.merged:
        return model
    get_method(state.method).before_unmerge(model)
    for name in state.merged_names:
        base = model.get_submodule(name)
        wrapper = getattr(base, _MERGED_ATTR)
        wrapper.unmerge_from_base()
        object.__delattr__(base, _MERGED_ATTR)
        replace_module(model, name, wrapper)
    state.merged, state.merged_names = False, []
    return model


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, family, paper, requires (backbone parts), mergeable, options with help."""
    return [
        {
            "name": m.name,
            "family": m.family,
            "paper": m.paper,
            "requires": sorted(m.requires),
            "mergeable": m.mergeable,
            "options": m.config_class.option_help(),
        }
        for m in registered_methods()
    ]
