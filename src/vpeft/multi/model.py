"""Many named adapters on one frozen backbone: add, load, switch, disable, delete, mixed batches.

Each adapter is a *shallow copy* of the backbone: ``copy.deepcopy`` with a memo that maps every
frozen backbone parameter and buffer to itself, so all copies hold the same frozen tensors (by
object identity, no memory duplicated) and differ only in the modules and parameters their method
adds, and in their own classifier head. :func:`vpeft.apply` then injects the adapter's method into
its copy, so every method works unchanged. A method that trains existing backbone parameters
(BitFit, LN-tune, Partial-k, GPS's and SPT's chosen entries of existing tensors) gets private
clones of exactly those parameters in its copy; the rest stays shared.

A mixed batch (an adapter name per sample) runs one of two ways. *Single pass*, as peft's
``adapter_names``: when every adapter in the batch is an additive low-rank update (LoRA, MTLoRA; see
:mod:`vpeft.multi.single_pass`), each frozen layer runs once on the whole batch and each adapter adds
its update to its own rows; then each group's rows go through its own head. *Grouped*, for every
other method: the batch is split into one group per adapter and each group runs through that
adapter's copy (every sample passes the shared frozen weights once, but the frozen matmuls run once
per group); this is what routes VPT's tokens, prefixes and residual adapters per sample.

Methods whose adapters share trained tensors across tasks (MTLoRA's task-agnostic update: see
:meth:`vpeft.methods.base.Method.task_shared_parameters`) get those tensors tied: every adapter of
that method on this backbone holds the same ``nn.Parameter`` objects, trained by all their tasks.
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

from vpeft.adapter_files import legacy_defaults
from vpeft.api import apply, get_state, read_adapter_config, save_adapter, trainable_parameters
from vpeft.api import load_adapter as _load_into
from vpeft.backbones.registry import describe
from vpeft.errors import ConfigError, VPeftError
from vpeft.hub import resolve_adapter
from vpeft.methods.base import MethodConfig, get_method
from vpeft.multi.single_pass import Router, routable_wrappers

#: the adapter name that means "no adapter": the plain backbone with its own head (as in peft)
BASE = "__base__"


def check_shareable(method: str) -> None:
    """Raise :class:`ConfigError` when adapters of ``method`` cannot share a backbone (its ``Method.shareable``)."""
    impl = get_method(method)
    if not impl.shareable:
        raise ConfigError(f"method '{method}' cannot share a backbone: {impl.not_shareable_reason}")


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
        #: method -> its tied task-shared parameters (MTLoRA's shared update), by name in each adapter's model
        self._shared: dict[str, dict[str, nn.Parameter]] = {}
        #: method -> the options its adapters must agree on to share those parameters
        self._shared_options: dict[str, dict[str, Any]] = {}
        self._router: tuple[tuple, Router] | None = None

    @property
    def _shared_trainable(self) -> list[nn.Parameter]:
        """Parameters shared by several adapters although they train (MTLoRA's task-agnostic update)."""
        return [p for group in self._shared.values() for p in group.values()]

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

    def _tie_shared(self, clone: nn.Module, *, check_values: bool) -> None:
        """Make the copy's task-shared parameters (if its method has any) the ones every adapter of its method
        holds; the first such adapter provides them. ``check_values``: a loaded adapter must carry equal values."""
        state = get_state(clone)
        impl = get_method(state.method)
        params = impl.task_shared_parameters(clone)
        if not params:
            return
        signature = getattr(state.config, "shared_signature", lambda: {})()
        group = self._shared.get(state.method)
        if group is None:
            self._shared[state.method] = dict(params)
            self._shared_options[state.method] = signature
            return
        if signature != self._shared_options[state.method] or set(params) != set(group):
            raise ConfigError(
                f"{state.method} adapters on one backbone share their task-agnostic update, so they need the same "
                f"{sorted(signature)}: this one has {signature}, the others {self._shared_options[state.method]}"
            )
        for pname, p in params.items():
            mine = group[pname]
            if p.shape != mine.shape:
                raise ConfigError(
                    f"{state.method}: shared '{pname}' is {tuple(p.shape)} here, {tuple(mine.shape)} in the others"
                )
            if check_values and not torch.equal(p.detach(), mine.detach()):
                raise ConfigError(
                    f"this {state.method} adapter's shared update ('{pname}' ...) differs from the one the adapters "
                    "on this backbone share: load adapters saved from the same multi-task model, or start a new one"
                )
            parent, _, leaf = pname.rpartition(".")
            clone.get_submodule(parent)._parameters[leaf] = mine

    def _check_name(self, name: str) -> None:
        if not name or "." in name or name == BASE:
            raise ConfigError(f"adapter name '{name}' is not allowed: no dots, not empty, not '{BASE}'")
        if name in self.adapters:
            raise ConfigError(f"adapter '{name}' exists; delete_adapter('{name}') first or pick another name")

    def _install(self, name: str, clone: nn.Module, build, *, tie: bool = True) -> nn.Module:
        try:
            build(clone)
        finally:  # whatever the method did to the shared tensors' flags, the backbone stays frozen
            self._unshare_trained(clone)
        if tie:
            self._tie_shared(clone, check_values=False)
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
        check_shareable(method.method if isinstance(method, MethodConfig) else method)
        clone = self._shallow_copy(num_classes)
        return self._install(name, clone, lambda m: apply(m, method, data=data, **options))

    def load_adapter(self, name: str, directory: str | os.PathLike) -> nn.Module:
        """Add adapter ``name`` from a folder written by :func:`vpeft.save_adapter` (its head's class count included),
        or from ``hf-hub:<repo id>``."""
        self._check_name(name)
        directory = resolve_adapter(directory)  # an hf-hub: id is fetched once
        saved = read_adapter_config(directory)
        check_shareable(saved["method"])
        clone = self._shallow_copy(int(saved["backbone"]["num_classes"]))
        # apply first, so that the weights load into the copy's private clones, never into shared tensors
        self._install(
            name,
            clone,
            lambda m: apply(m, saved["method"], **legacy_defaults(saved["method"], saved["options"])),
            tie=False,  # task-shared tensors are tied after loading, once their values are known
        )
        try:
            _load_into(clone, directory)
            self._tie_shared(clone, check_values=True)
        except Exception:
            del self.adapters[name]
            if self.active_adapter == name:
                self.active_adapter = next(iter(self.adapters), None)
            self._drop_unused_shared()
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
        self._drop_unused_shared()

    def _drop_unused_shared(self) -> None:
        methods = {get_state(m).method for m in self.adapters.values()}
        for method in set(self._shared) - methods:
            del self._shared[method], self._shared_options[method]

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
        plus the task-shared ones of their methods once each (``shared.<method>.<parameter>``)."""
        out: dict[str, nn.Parameter] = {}
        shared = {id(p) for p in self._shared_trainable}
        chosen = list(names) if names is not None else list(self.adapters)
        for name in chosen:
            for pname, p in trainable_parameters(self.get_adapter(name)).items():
                if id(p) not in shared:
                    out[f"{name}.{pname}"] = p
        methods = {get_state(self.get_adapter(n)).method for n in chosen}
        for method, group in self._shared.items():
            if method in methods:
                out.update({f"shared.{method}.{pname}": p for pname, p in group.items()})
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
        return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in self._positions(adapter_names).items()}

    def _positions(self, adapter_names: Sequence[str | None]) -> dict[str, list[int]]:
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            key = BASE if name is None else name
            if key != BASE:
                self.get_adapter(key)
            positions.setdefault(key, []).append(i)
        return positions

    def model_for(self, name: str | None) -> nn.Module:
        return self.backbone if name is None or name == BASE else self.get_adapter(name)

    def forward(
        self,
        x: torch.Tensor,
        adapter_names: Sequence[str | None] | None = None,
        *,
        single_pass: bool | None = None,
    ) -> torch.Tensor | MixedOutput:
        """Logits of the active adapter, or with ``adapter_names`` (one per sample) a :class:`MixedOutput`.

        ``single_pass``: None (default) runs the frozen layers once on the whole batch when every adapter
        in it is single-pass capable (:meth:`single_pass_capable`), else one pass per group; True insists
        on the single pass (an error names the adapters that cannot), False always groups."""
        if adapter_names is None:
            return self.model_for(self.active_adapter)(x)
        if len(adapter_names) != x.shape[0]:
            raise ConfigError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]}")
        positions = self._positions(adapter_names)
        groups = {k: torch.tensor(v, dtype=torch.long, device=x.device) for k, v in positions.items()}
        if single_pass is not False:
            router = self._single_pass_router()
            unable = sorted(n for n in groups if n != BASE and n not in router[0])
            if not unable:
                return self._forward_single_pass(x, positions, groups, router[1])
            if single_pass:
                raise ConfigError(
                    f"adapters {unable} cannot run in a single pass (not additive low-rank updates: "
                    "LoRA, MTLoRA); use single_pass=None or False to run them in groups"
                )
        out = {}
        for name, index in groups.items():
            part = x if len(index) == x.shape[0] else x.index_select(0, index)
            out[name] = (index, self.model_for(name)(part))
        return MixedOutput(out, x.shape[0])

    def single_pass_capable(self) -> list[str]:
        """The adapters a mixed batch can serve in one pass of the frozen layers (additive low-rank updates)."""
        return sorted(self._single_pass_router()[0])

    def _single_pass_router(self) -> tuple[tuple, Router]:
        """(names of the single-pass adapters, the router); rebuilt when adapters or the backbone's buffers change."""
        key = (
            tuple((n, id(m)) for n, m in self.adapters.items()),
            tuple(id(b) for b in self.backbone.buffers()),
            tuple(p.device for p in self.backbone.parameters())[:1],
        )
        if self._router is None or self._router[0] != key:
            wrappers = {}
            for name, model in self.adapters.items():
                found = routable_wrappers(self.backbone, model)
                if found is not None:
                    wrappers[name] = found
            object.__setattr__(self, "_router", (key, (tuple(wrappers), Router(self.backbone, wrappers))))
        return self._router[1]

    def _forward_single_pass(
        self, x: torch.Tensor, positions: dict[str, list[int]], groups: dict[str, torch.Tensor], router: Router
    ) -> MixedOutput:
        model = router.model
        if model.training != self.training:
            model.train(self.training)
            if self.training:
                shared = self._shared_ids()
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(id(b) in shared for b in m.buffers()):
                        m.eval()
        # the batch in adapter order (groups keep first-seen order): each adapter's samples one run of rows
        order = [i for rows in positions.values() for i in rows]
        spans, start = {}, 0
        for name, rows in positions.items():
            spans[name] = (start, start + len(rows))
            start += len(rows)
        if order != list(range(len(order))):  # one gather of the input images, not one per layer
            x = x.index_select(0, torch.tensor(order, dtype=torch.long, device=x.device))
        features = router.features(x, spans)
        out = {}
        for name, index in groups.items():
            s, e = spans[name]
            out[name] = (index, self.model_for(name).forward_head(features[s:e]))
        return MixedOutput(out, x.shape[0])

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
