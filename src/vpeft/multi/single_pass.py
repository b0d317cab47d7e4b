"""Single-pass mixed batches for additive low-rank adapters (peft's ``adapter_names`` semantics).

The batch is put in adapter order once (one gather of the input images, skipped when it already is),
so each adapter's samples are a contiguous run of rows. Every frozen layer then runs once on the whole
batch, and at each layer an adapter adapts, that adapter adds its low-rank update to its own run of
rows: views of the layer's input and output, one small down-projection and an in-place ``addmm_`` per
output slice, no per-layer gather, scatter or full-size copy. Each group's features then go through
its own head (a view again), and the logits keep the caller's batch positions.

It applies to adapters whose model differs from the backbone only by wrappers of the types in
wrappers that declare the :class:`~vpeft.methods.base.RoutableUpdate` capability (LoRA on Linear and
Conv2d, MTLoRA) and by the head: their update is a sum added to
the frozen layer's output, so the rows of other tasks stay exact. Methods that change the token count
or the residual stream (VPT, prefix, adapters, SSF's rescaling, DoRA's per-row magnitude) are not
additive in that sense and use the grouped path.

A layer whose input folds other dimensions into the batch (Swin's windows: ``B * windows`` rows,
sample-major) gets each sample's rows as a contiguous run of ``rows / B``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vpeft.backbones.registry import describe
from vpeft.methods.base import BaseLayerWrapper, replace_module, routes_update


def routable_wrappers(backbone: nn.Module, model: nn.Module) -> dict[str, nn.Module] | None:
    """Module name -> wrapper of an adapter's model, or None when the model differs from the backbone by
    anything else than routable wrappers and its head (then a mixed batch needs the grouped path)."""
    if type(model) is not type(backbone):
        return None
    anatomy = describe(backbone)
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, BaseLayerWrapper)}
    if not all(routes_update(m) for m in wrappers.values()):
        return None
    own = dict(backbone.named_modules())
    inside = lambda name: any(name == w or name.startswith(w + ".") for w in wrappers)  # noqa: E731
    for name, module in model.named_modules():
        if anatomy.is_head_param(name) and name:
            continue
        if "forward" in vars(module):  # a method that patched a module's forward
            return None
        if name in wrappers:
            if type(own.get(name)) is not type(module.base_layer):
                return None
        elif not inside(name) and type(own.get(name)) is not type(module):
            return None
    shared = {n: p for n, p in [*backbone.named_parameters(), *backbone.named_buffers()]}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if anatomy.is_head_param(name):
            continue
        wrapper = next((w for w in wrappers if name.startswith(w + ".")), None)
        if wrapper is not None:
            rest = name[len(wrapper) + 1 :]
            if not rest.startswith("base_layer."):
                continue  # the wrapper's own low-rank factors
            name = f"{wrapper}.{rest[len('base_layer.') :]}"
        if shared.get(name) is not tensor:
            return None  # a trained copy of a backbone tensor (BitFit ...) or a tensor the backbone lacks
    return wrappers


class Routing:
    """The mixed batch being run, in adapter order: adapter name -> its run of rows ``(start, end)``."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[int, int]] = {}
        self.batch = 0

    def set(self, spans: dict[str, tuple[int, int]], batch: int) -> None:
        self.spans, self.batch = spans, batch


class RoutedLayer(nn.Module):
    """A frozen layer run once on the whole batch, plus each adapter's update on its own run of rows."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "updates", {})  # adapter -> wrapper (owned by the adapter's model, not here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        batch = self.routing.batch
        if x.shape[0] % batch:
            raise RuntimeError(f"a layer's input has {x.shape[0]} rows, not a multiple of the batch {batch}")
        k = x.shape[0] // batch  # rows per sample (Swin: windows), sample-major
        for name, (start, end) in self.routing.spans.items():
            wrapper = self.updates.get(name)
            if wrapper is not None:
                wrapper.add_update_span_(out, x, start * k, end * k)
        return out


class Router:
    """The backbone once (its frozen tensors by identity), with a :class:`RoutedLayer` wherever an adapter adapts."""

    def __init__(self, backbone: nn.Module, adapters: dict[str, dict[str, nn.Module]]) -> None:
        memo: dict[int, Any] = {id(t): t for t in [*backbone.parameters(), *backbone.buffers()]}
        self.model = copy.deepcopy(backbone, memo)
        self.routing = Routing()
        layers: dict[str, RoutedLayer] = {}
        for adapter, wrappers in adapters.items():
            for name, wrapper in wrappers.items():
                if name not in layers:
                    layers[name] = RoutedLayer(self.model.get_submodule(name), self.routing)
                    replace_module(self.model, name, layers[name])
                layers[name].updates[adapter] = wrapper

    def features(self, x: torch.Tensor, spans: dict[str, tuple[int, int]]) -> torch.Tensor:
        """``forward_features`` of a batch in adapter order, each adapter's update on its ``spans`` rows."""
        self.routing.set(spans, x.shape[0])
        try:
            return self.model.forward_features(x)
        finally:
            self.routing.set({}, 0)
