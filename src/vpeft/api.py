"""The public API: apply a method to a timm model, count, save, load, merge."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vpeft.methods  # noqa: F401  (registers every method)
from vpeft.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT_VERSION, legacy_defaults, read_folder_config
from vpeft.backbones.anatomy import backbone_identity
from vpeft.backbones.registry import describe
from vpeft.errors import AdapterMismatchError, VPeftError
from vpeft.files import atomic_write
from vpeft.hub import resolve_adapter
from vpeft.methods.base import BaseLayerWrapper, get_method, registered_methods, replace_module
from vpeft.methods.state import PeftState, apply, get_state, make_config, require_state, trainable_parameters
from vpeft.version import __version__

_MERGED_ATTR = "_vpeft_merged_wrapper"
#: the old private name of :func:`vpeft.files.atomic_write`, kept until tasks/base.py imports that
_atomic_write = atomic_write

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "PeftState",
    "apply",
    "count_parameters",
    "count_trainable",
    "get_state",
    "legacy_defaults",
    "list_methods",
    "load_adapter",
    "make_config",
    "merge",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]


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
        "vpeft_version": __version__,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` (the method's and head's weights) and ``adapter_config.json``."""
    state = require_state(model, "save an adapter")
    if state.merged:
        raise VPeftError("the model is merged; call vpeft.unmerge(model) before saving its adapter")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in trainable_parameters(model).items()}
    tensors.update(
        {name: b.detach().contiguous().cpu() for name, b in get_method(state.method).saved_buffers(model).items()}
    )
    atomic_write(out / ADAPTER_WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"method": state.method}))
    text = json.dumps(_json_config(state), indent=2, sort_keys=True)
    atomic_write(out / ADAPTER_CONFIG, lambda path: Path(path).write_text(text + "\n"))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a saved adapter, with a clear error if the folder is not one.

    ``directory`` may be ``hf-hub:<repo id>[@revision]``: the adapter is fetched through huggingface_hub."""
    return read_folder_config(resolve_adapter(directory))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the saved method to ``model`` (a fresh timm model of the same backbone) and load its weights.

    ``directory`` is a folder written by :func:`save_adapter`, or ``hf-hub:<repo id>[@revision]`` (``vpeft push``)."""
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
        apply(model, saved["method"], **legacy_defaults(saved["method"], saved["options"]))
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
    state = require_state(model, "merge")
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
    state = require_state(model, "unmerge")
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
