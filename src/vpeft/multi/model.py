"""Many named adapters on one frozen backbone: add, load, switch, disable, delete, mixed batches.

Each adapter is a *shallow copy* of the backbone: ``copy.deepcopy`` with a memo that maps every
frozen backbone parameter and buffer to itself, so all copies hold the same frozen tensors (by
object identity, no memory duplicated) and differ only in the modules and parameters their method
adds, and in their own classifier head. :func:`vpeft.apply` then injects the adapter's method into
its copy, so every method works unchanged. A method that trains existing backbone parameters
(BitFit, LN-tune, Partial-k, GPS's and SPT's chosen entries of existing tensors) gets private
clones of exactly those parameters in its copy; the rest stays shared.

Compared with peft's mixed batch (LoRA only: the base layer runs once on the whole batch, each
adapter adds its low-rank update to its own rows), a mixed batch here is split into one group per
adapter and each group runs through that adapter's copy: every sample passes the shared frozen
weights once, but the frozen matmuls run once per group, not once for the whole batch. This is
what lets methods that change the token count (VPT, prefix) or the residual stream (adapters,
side networks) route per sample. For batches of LoRA adapters only, see
:func:`vpeft.multi.lora_single_pass` (the base layers on the whole batch, per-group deltas).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vpeft.anatomy import describe
from vpeft.api import apply, get_state, read_adapter_config, save_adapter, trainable_parameters
from vpeft.api import load_adapter as _load_into
from vpeft.errors import ConfigError, VPeftError
from vpeft.methods.base import MethodConfig, get_method

#: the adapter name that means "no adapter": the plain backbone with its own head (as in peft)
BASE = "__base__"

#: methods that cannot share a backbone, and why
NOT_SHAREABLE = {
    "full": "full fine-tuning trains every backbone weight, so an adapter would share nothing; use separate models",
}


def _legacy_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    from vpeft.api import _legacy_defaults  # the rule load_adapter applies to old saved configs

    return _legacy_defaults(method, options)


@dataclass
class MixedOutput:
    """The logits of a mixed batch: per adapter, the batch positions of its samples and their logits.

    Heads may differ in class count, so logits stay per group; :meth:`per_sample` lists them in batch
    order and :meth:`stack` makes one tensor when every head has the same width.
    """

    groups: dict[str, tuple[torch.Tensor, torch.Tensor]]
    batch_size: int

    def per_sample(self) -> list[torch.Tensor]:
        """One logits vector per sample, in batch order."""
        out: list[torch.Tensor | None] = [None] * self.batch_size
        for index, logits in self.groups.values():
            for row, i in enumerate(index.tolist()):
                out[i] = logits[row]
        return out  # type: ignore[return-value]

    def stack(self) -> torch.Tensor:
        """(batch, classes) logits in batch order; every adapter's head must have the same class count."""
        widths = {logits.shape[-1] for _, logits in self.groups.values()}
        if len(widths) != 1:
            raise VPeftError(f"the adapters' heads have different class counts {sorted(widths)}; use per_sample()")
        first = next(iter(self.groups.values()))[1]
        out = first.new_empty(self.batch_size, *first.shape[1:])
        for index, logits in self.groups.values():
            out[index.to(out.device)] = logits
        return out


class _Restore(contextlib.AbstractContextManager):
    """What :meth:`MultiAdapterModel.disable_adapter` returns: on ``with`` exit, the previous adapter is active again."""

    def __init__(self, model: MultiAdapterModel, previous: str | None) -> None:
        self.model, self.previous = model, previous

    def __exit__(self, *exc: object) -> None:
        self.model.active_adapter = self.previous if self.previous in self.model.adapters else None


class MultiAdapterModel(nn.Module):
    """One frozen timm backbone and any number of named adapters, each with its own method and head.

    >>> mm = MultiAdapterModel(timm.create_model("vit_base_patch16_224", num_classes=10))
    >>> mm.add_adapter("cars", "lora", num_classes=196, rank=8)
    >>> mm.add_adapter("birds", "adaptformer", num_classes=200)
    >>> mm.set_adapter("cars"); logits = mm(x)
    >>> out = mm(x, adapter_names=["cars", "birds", "cars", BASE])  # a MixedOutput
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if get_state(backbone) is not None:
            raise VPeftError("pass the plain timm backbone: this model already has a vpeft method applied")
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        #: parameters shared by every copy although they train (the shared LoRA of an MTLoRA model)
        self._shared_trainable: list[nn.Parameter] = []

    # ------------------------------------------------------------ building copies

    def _shallow_copy(self, num_classes: int | None) -> nn.Module:
        """The backbone with its frozen tensors shared by identity and its own (copied or new) head."""
        anatomy = describe(self.backbone)
        memo: dict[int, Any] = {}
        for name, p in self.backbone.named_parameters(remove_duplicate=False):
            if not anatomy.is_head_param(name):
                memo[id(p)] = p
        for b in self.backbone.buffers():
            memo[id(b)] = b
        clone = copy.deepcopy(self.backbone, memo)
        if num_classes is not None and num_classes != getattr(self.backbone, "num_classes", None):
            clone.reset_classifier(num_classes)
            clone.requires_grad_(False)
            for p in self._shared_trainable:
                p.requires_grad_(True)
        return clone

    def _shared_ids(self) -> set[int]:
        return {id(p) for p in self.backbone.parameters()} | {id(b) for b in self.backbone.buffers()}

    def _unshare_trained(self, clone: nn.Module) -> None:
        """Give the copy private clones of the shared parameters its method trains; re-freeze the originals."""
        shared, keep = self._shared_ids(), {id(p) for p in self._shared_trainable}
        clones: dict[int, nn.Parameter] = {}
        for module in clone.modules():
            for pname, p in list(module._parameters.items()):
                if p is None or id(p) not in shared or id(p) in keep or not p.requires_grad:
                    continue
                if id(p) not in clones:
                    clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
                module._parameters[pname] = clones[id(p)]
        for p in self.backbone.parameters():
            p.requires_grad_(id(p) in keep)

    def _check_name(self, name: str) -> None:
        if not name or "." in name or name == BASE:
            raise ConfigError(f"adapter name '{name}' is not allowed: no dots, not empty, not '{BASE}'")
        if name in self.adapters:
            raise ConfigError(f"adapter '{name}' exists; delete_adapter('{name}') first or pick another name")

    def _install(self, name: str, clone: nn.Module, build) -> nn.Module:
        try:
            build(clone)
        finally:  # whatever the method did to the shared tensors' flags, the backbone stays frozen
            self._unshare_trained(clone)
        for p in self._shared_trainable:
            p.requires_grad_(True)
        self.adapters[name] = clone
        self.train(self.training)
        if self.active_adapter is None:
            self.active_adapter = name
        return clone

    # ------------------------------------------------------------ the named-adapter API

    def add_adapter(
        self,
        name: str,
        method: str | MethodConfig,
        num_classes: int | None = None,
        *,
        data: Any = None,
        **options: Any,
    ) -> nn.Module:
        """Add adapter ``name``: ``method`` with ``options`` and a new head of ``num_classes`` (default:
        a copy of the backbone's head). ``data`` is the training split for GPS, SPT, SCT. Returns the
        adapter's model (a timm model sharing the frozen weights); the first adapter added becomes active."""
        self._check_name(name)
        method_name = method.method if isinstance(method, MethodConfig) else method
        if method_name in NOT_SHAREABLE:
            raise ConfigError(f"method '{method_name}' cannot share a backbone: {NOT_SHAREABLE[method_name]}")
        get_method(method_name)
        clone = self._shallow_copy(num_classes)
        return self._install(name, clone, lambda m: apply(m, method, data=data, **options))

    def load_adapter(self, name: str, directory: str | os.PathLike) -> nn.Module:
        """Add adapter ``name`` from a folder written by :func:`vpeft.save_adapter` (its head's class count included)."""
        self._check_name(name)
        saved = read_adapter_config(directory)
        if saved["method"] in NOT_SHAREABLE:
            raise ConfigError(f"method '{saved['method']}' cannot share a backbone: {NOT_SHAREABLE[saved['method']]}")
        clone = self._shallow_copy(int(saved["backbone"]["num_classes"]))
        # apply first, so that the weights load into the copy's private clones, never into shared tensors
        self._install(
            name, clone, lambda m: apply(m, saved["method"], **_legacy_options(saved["method"], saved["options"]))
        )
        try:
            _load_into(clone, directory)
        except Exception:
            del self.adapters[name]
            if self.active_adapter == name:
                self.active_adapter = next(iter(self.adapters), None)
            raise
        return clone

    def save_adapter(self, name: str, directory: str | os.PathLike) -> os.PathLike:
        """Write adapter ``name`` as :func:`vpeft.save_adapter` does (``adapter.safetensors`` + ``adapter_config.json``)."""
        return save_adapter(self.get_adapter(name), directory)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter plain forwards use (None or ``BASE``: the backbone alone)."""
        if name is not None and name != BASE:
            self.get_adapter(name)
        self.active_adapter = None if name == BASE else name

    def disable_adapter(self) -> _Restore:
        """Forward through the plain backbone; as a context manager, the previous adapter comes back on exit."""
        previous, self.active_adapter = self.active_adapter, None
        return _Restore(self, previous)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (its method's modules and head); the shared backbone is untouched."""
        self.get_adapter(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def get_adapter(self, name: str) -> nn.Module:
        """Adapter ``name``'s model: a timm model whose frozen weights are the backbone's own tensors.

        Do not call :func:`vpeft.merge` on it (merging writes into the shared weights), nor ``.train()``
        (use the MultiAdapterModel's, which keeps the shared BatchNorm statistics fixed)."""
        if name not in self.adapters:
            raise VPeftError(f"no adapter '{name}'; adapters: {sorted(self.adapters) or 'none'}")
        return self.adapters[name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def trainable_parameters(self, names: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
        """Every adapter's trainable parameters (methods and heads), keyed ``<adapter>.<parameter>``,
        plus any shared trainable ones (``shared.<name>``)."""
        out: dict[str, nn.Parameter] = {}
        for name in names if names is not None else self.adapters:
            for pname, p in trainable_parameters(self.get_adapter(name)).items():
                if all(p is not q for q in self._shared_trainable):
                    out[f"{name}.{pname}"] = p
        for i, p in enumerate(self._shared_trainable):
            out[f"shared.{i}"] = p
        return out

    def train(self, mode: bool = True) -> MultiAdapterModel:
        """``train(mode)``, but BatchNorms keep their shared running statistics in eval mode: those
        statistics belong to the backbone (and are not in a saved adapter), so no task may move them."""
        super().train(mode)
        if mode:
            shared = self._shared_ids()
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(id(b) in shared for b in m.buffers()):
                    m.eval()
        return self

    # ------------------------------------------------------------ forward

    def groups(
        self, adapter_names: Sequence[str | None], device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Adapter name -> the batch positions of its samples (None counts as ``BASE``), in first-seen order."""
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            key = BASE if name is None else name
            if key != BASE:
                self.get_adapter(key)
            positions.setdefault(key, []).append(i)
        return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in positions.items()}

    def model_for(self, name: str | None) -> nn.Module:
        return self.backbone if name is None or name == BASE else self.get_adapter(name)

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str | None] | None = None) -> torch.Tensor | MixedOutput:
        """Logits of the active adapter, or with ``adapter_names`` (one per sample) a :class:`MixedOutput`."""
        if adapter_names is None:
            return self.model_for(self.active_adapter)(x)
        if len(adapter_names) != x.shape[0]:
            raise ConfigError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]}")
        groups = {}
        for name, index in self.groups(adapter_names, x.device).items():
            part = x if len(index) == x.shape[0] else x.index_select(0, index)
            groups[name] = (index, self.model_for(name)(part))
        return MixedOutput(groups, x.shape[0])

    def shared_bytes(self) -> int:
        """Bytes of the backbone's tensors, held once however many adapters there are."""
        return sum(t.numel() * t.element_size() for t in [*self.backbone.parameters(), *self.backbone.buffers()])

    def adapter_bytes(self, name: str) -> int:
        """Bytes adapter ``name`` adds: its tensors that are not the backbone's."""
        shared = self._shared_ids()
        model = self.get_adapter(name)
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in shared}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def iter_adapters(self) -> Iterator[tuple[str, nn.Module]]:
        yield from self.adapters.items()
