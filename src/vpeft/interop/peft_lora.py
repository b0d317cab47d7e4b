"""Move LoRA and DoRA adapters between vpeft and Hugging Face peft, with the same outputs.

A vpeft LoRA on slices of a fused ``qkv`` (targets ``q``, ``v``: one rank-r A and B per slice) is
exactly a peft LoRA on the whole ``qkv`` of rank ``n r``: A stacks the slices' A, B holds each
slice's B in its output rows and its own r columns, zero elsewhere (the rows of ``k`` are zero),
and ``lora_alpha = scaling * n r`` keeps ``alpha / r`` equal to vpeft's scaling. Modules of different
ranks are written with peft's ``rank_pattern``/``alpha_pattern``. DoRA: peft keeps one magnitude
per output row of the layer; the rows vpeft does not adapt get their weight's own row norm
(ratio 1). The classifier head goes into peft's ``modules_to_save``.

Both tools name their config ``adapter_config.json``, so a peft export never shares a folder with
a vpeft adapter: :func:`export_to_peft` writes into ``<folder>/peft/`` (``adapter_model.safetensors``
+ ``adapter_config.json``, what ``PeftModel.from_pretrained(timm_model, "<folder>/peft")`` reads).

Import reads a peft LoRA (or DoRA) folder saved from a timm model: each adapted layer becomes a
whole-layer vpeft LoRA (targets ``re:<its name>``). vpeft has one rank and scaling per adapter, so
when peft's differ by layer the smaller A/B are zero-padded to the largest rank (the padding adds
exact zeros) and each layer's scaling is folded into its B (equal within float rounding).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vpeft.api import apply, get_state, trainable_parameters
from vpeft.errors import AdapterMismatchError, ConfigError, VPeftError
from vpeft.methods.lora import LoRAConv2d, LoRALinear

#: peft's file names, kept in their own folder (vpeft's are adapter.safetensors + adapter_config.json)
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_SUBDIR = "peft"
_PREFIX = "base_model.model."


def _lora_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))]


def _peft_tensors(wrapper: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, B, magnitude or None) of one vpeft wrapper in peft's layout."""
    if isinstance(wrapper, LoRAConv2d):
        conv = wrapper.base_layer
        if tuple(conv.dilation) != (1, 1):
            raise VPeftError("peft's Conv2d LoRA has no dilation: a LoRA on a dilated conv cannot be exported")
        return wrapper.lora_A.detach(), wrapper.lora_B.detach(), None
    weight = wrapper.base_layer.weight.detach()
    a = torch.cat([p.detach() for p in wrapper.lora_A])
    b = weight.new_zeros(weight.shape[0], a.shape[0])
    col = 0
    for (start, end), b_i in zip(wrapper.slices, wrapper.lora_B, strict=True):
        b[start:end, col : col + b_i.shape[1]] = b_i.detach()
        col += b_i.shape[1]
    magnitude = None
    if hasattr(wrapper, "magnitude"):
        magnitude = weight.norm(dim=1)  # rows vpeft leaves alone: ratio m / ||W|| = 1
        for (start, end), m in zip(wrapper.slices, wrapper.magnitude, strict=True):
            magnitude[start:end] = m.detach()
    return a, b, magnitude


def export_to_peft(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the model's vpeft LoRA or DoRA (and its head) in peft's format into ``<folder>/peft/``; returns that path."""
    state = get_state(model)
    if state is None or state.method not in ("lora", "dora"):
        raise VPeftError(
            f"only vpeft LoRA and DoRA map onto peft's LoRA; this model has {state.method if state else 'no method'}"
        )
    if state.merged:
        raise VPeftError("the model is merged; call vpeft.unmerge(model) before exporting")
    scaling = state.config.scaling
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, wrapper in _lora_wrappers(model):
        a, b, magnitude = _peft_tensors(wrapper)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        if magnitude is not None:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitude.contiguous().cpu()
        ranks[name] = a.shape[0]
    anatomy = state.anatomy
    head_modules: set[str] = set()
    for pname, p in trainable_parameters(model).items():
        if anatomy.is_head_param(pname):
            tensors[_PREFIX + pname] = p.detach().contiguous().cpu()
            head_modules.add(pname.rpartition(".")[0])
    rank = min(ranks.values())
    odd = {re.escape(n): r for n, r in ranks.items() if r != rank}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": scaling * rank,
        "rank_pattern": odd,
        "alpha_pattern": {k: scaling * r for k, r in odd.items()},
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(head_modules) or None,
        "lora_dropout": state.config.dropout,
        "use_dora": state.method == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(folder) / PEFT_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def peft_folder(folder: str | os.PathLike) -> Path:
    """The peft adapter folder: ``folder`` itself or its ``peft/`` subfolder; refuses a vpeft adapter folder."""
    for path in (Path(folder), Path(folder) / PEFT_SUBDIR):
        if (path / PEFT_WEIGHTS).is_file() and (path / PEFT_CONFIG).is_file():
            return path
    if (Path(folder) / "adapter.safetensors").is_file():
        raise AdapterMismatchError(f"'{folder}' holds a vpeft adapter, not a peft one: use vpeft.load_adapter")
    raise FileNotFoundError(f"no {PEFT_WEIGHTS} + {PEFT_CONFIG} in '{folder}' or '{Path(folder) / PEFT_SUBDIR}'")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():  # peft's own rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_num_classes(folder: str | os.PathLike) -> int | None:
    """The class count of the head saved in a peft folder (None if it saved no head)."""
    path = peft_folder(folder)
    config = json.loads((path / PEFT_CONFIG).read_text())
    tensors = load_file(str(path / PEFT_WEIGHTS))
    for module in config.get("modules_to_save") or []:
        key = f"{_PREFIX}{module}.weight"
        if key in tensors:
            return int(tensors[key].shape[0])
    return None


def import_from_peft(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply a peft LoRA/DoRA saved from this timm architecture to ``model`` (a fresh one) as a vpeft LoRA/DoRA."""
    if get_state(model) is not None:
        raise VPeftError("import into a fresh timm model: this one already has a vpeft method applied")
    path = peft_folder(folder)
    config = json.loads((path / PEFT_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"only peft LoRA (and DoRA) adapters import; this one is {config.get('peft_type')}")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False)):
        if config.get(key, ok) != ok:
            raise ConfigError(f"peft option {key}={config[key]!r} has no vpeft counterpart")
    tensors = load_file(str(path / PEFT_WEIGHTS))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            raise AdapterMismatchError(f"unexpected key '{key}' in {path / PEFT_WEIGHTS}")
        key = key[len(_PREFIX) :]
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", key)
        if match:
            layers.setdefault(match.group(1), {})[match.group(2).split(".")[0]] = value
        else:
            others[key] = value
    if not layers:
        raise AdapterMismatchError(f"{path / PEFT_WEIGHTS} holds no LoRA weights")
    dora = bool(config.get("use_dora"))
    scalings: dict[str, float] = {}
    for name, parts in layers.items():
        r = parts["lora_A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scalings[name] = alpha / (r**0.5 if config.get("use_rslora") else r)
    rank = max(parts["lora_A"].shape[0] for parts in layers.values())
    uniform = len({p["lora_A"].shape[0] for p in layers.values()}) == 1 and len(set(scalings.values())) == 1
    scaling = next(iter(scalings.values())) if uniform else 1.0
    targets = ["re:" + "|".join(re.escape(n) for n in sorted(layers))]
    apply(
        model, "dora" if dora else "lora", rank=rank, alpha=scaling * rank, targets=targets,
        dropout=float(config.get("lora_dropout", 0.0)),
    )  # fmt: skip
    wrappers = dict(_lora_wrappers(model))
    with torch.no_grad():
        for name, parts in layers.items():
            wrapper = wrappers[name]
            a, b = parts["lora_A"], parts["lora_B"] * (scalings[name] / scaling)
            pad = rank - a.shape[0]
            if pad:  # zero rows of A and columns of B add exact zeros
                a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
                b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
            if isinstance(wrapper, LoRAConv2d):
                if tuple(wrapper.base_layer.dilation) != (1, 1):
                    raise AdapterMismatchError(f"'{name}' is a dilated conv; peft's conv LoRA ignores dilation")
                wrapper.lora_A.copy_(a)
                wrapper.lora_B.copy_(b)
            else:
                wrapper.lora_A[0].copy_(a)
                wrapper.lora_B[0].copy_(b)
                if dora:
                    wrapper.magnitude[0].copy_(parts["lora_magnitude_vector"])
        params = trainable_parameters(model)
        for key, value in others.items():
            if key not in params or params[key].shape != value.shape:
                raise AdapterMismatchError(
                    f"peft weight '{key}' {tuple(value.shape)} has no place in this model "
                    "(create it with the head's num_classes, or a LoRA-only peft adapter)"
                )
            params[key].copy_(value)
    return model
