"""GLoRA: generalised LoRA, W' = W0 + W0 * A + B and b' = b0 + b0 * D + E + W0 C on every Linear.

Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning", 2023
(Arnav0400/ViT-Slim, ``GLoRA/layer.py``). Each support tensor is one of: ``lora`` (a rank-r product
X_d X_u), ``vector`` (one value per output row; for C, per input), ``constant`` (one scalar) or
``none``; ``*`` is the element-wise product. Init as the code: the X_d factors, vectors and constants
zero, X_u Xavier-uniform, so the layer is unchanged at step 0.

Stages, as the paper and its code (``supernet.py``, ``evolution.py``, ``evolution_utils.py``):

1. ``stage=fixed`` (default): one configuration (a..e) for every adapted layer. The default, A
   vector, B LoRA (r = 4), C, D and E vectors, combines LoRA (B) with SSF-like row scales and
   shifts (A, D, E) and a prompt-like bias (C): 903,168 parameters on ViT-B/16.
2. ``stage=supernet``: every layer holds A, B, C as rank-r LoRA factors and D, E as vectors; each
   training forward draws every layer's A..E uniformly among its kinds (the code draws per layer
   and forward) and computes them from slices of those tensors (weight entanglement: a vector is
   the down factor's first column, a constant its first entry). Evaluation after training uses a..e.
3. ``stage=search`` (a ``vpeft train --mode tune`` run that trains nothing, or :func:`search`):
   evolutionary search (:mod:`vpeft.methods.evolution`) of every layer's A..E, each candidate scored
   by validation top-1 with the supernet's weights, under ``budget`` trainable parameters without
   head (the code's parameter count). It writes ``glora_search.json`` and, as the code (it has no
   retraining step), the found subnet with the supernet's weights as the run's adapter. The code
   searches on its test loader; vpeft reads the validation split only. The children of a generation are
   crossover-then-mutation of the best ``parents`` (the code builds separate mutation and crossover
   sets plus random candidates); population 50, 20 generations, 10 parents, mutation 0.2 as the code.
4. ``stage=subnet`` with ``layers``: the per-layer configuration built at exactly those kinds (to
   retrain it from scratch; the search's adapter is one too). Saved inline with the adapter, so it
   reloads without data, and mergeable like every GLoRA layer.

Speed: the adapted weight and bias are built once per forward (weight-sized element-wise work,
independent of the batch) and the layer runs one matmul. Merging writes them into the layer; the
original weights are kept aside for an exact unmerge.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import (
    BaseLayerWrapper,
    Method,
    MethodConfig,
    Stage,
    StageContext,
    StageData,
    StageOutput,
    register,
    replace_module,
)
from vpeft.methods.evolution import evolve, sampling_hook, subnet_set, top1
from vpeft.methods.state import apply, get_state, trainable_parameters

ROLES = ("qkv", "proj", "fc1", "fc2")
STAGES = ("fixed", "supernet", "search", "subnet")
#: stage=search as a run of the protocol: reads the validation split (tune mode), trains nothing
SEARCH = Stage("search", "val", "evolutionary search of per-layer support tensors on the validation split")
KINDS = {
    "a": ("lora", "vector", "constant", "none"),
    "b": ("lora", "vector", "constant", "none"),
    "c": ("lora", "vector", "none"),
    "d": ("vector", "constant", "none"),
    "e": ("vector", "constant", "none"),
}


@dataclass
class GLoRAConfig(MethodConfig):
    stage: str = option(
        "fixed",
        "fixed: one configuration a..e for every layer; supernet: train with a random configuration per layer "
        "and step; search: evolutionary search on the validation split (a `vpeft train --mode tune` run, "
        "trains nothing); subnet: the per-layer configuration in layers",
        choices=STAGES,
    )
    rank: int = option(4, "rank r of the 'lora' support tensors (the code's default)")
    a: str = option("vector", "A in W0 + W0 * A: " + ", ".join(KINDS["a"]), choices=KINDS["a"])
    b: str = option("lora", "B in W0 + B: " + ", ".join(KINDS["b"]), choices=KINDS["b"])
    c: str = option(
        "vector", "C in the bias term W0 C (per input feature): " + ", ".join(KINDS["c"]), choices=KINDS["c"]
    )
    d: str = option("vector", "D in b0 + b0 * D: " + ", ".join(KINDS["d"]), choices=KINDS["d"])
    e: str = option("vector", "E in b0 + E: " + ", ".join(KINDS["e"]), choices=KINDS["e"])
    targets: list[str] = option(
        list(ROLES), "Linear layers to adapt, by role (the code adapts every Linear but the head)"
    )
    layers: str | None = option(
        None,
        "subnet: the per-layer configuration, JSON {layer: {a, b, c, d, e}} or a path to the search's "
        "glora_search.json; saved inline with the adapter",
    )
    supernet: str | None = option(None, "search: the run folder of the stage=supernet run")
    budget: int = option(1_000_000, "search: most trainable parameters without head (the code's --param-limits 1 M)")
    population: int = option(50, "search: candidates per generation (the code's --population-num)")
    generations: int = option(20, "search: generations (the code's --max-epochs)")
    parents: int = option(10, "search: best candidates kept as parents each generation (the code's --select-num)")
    mutation_prob: float = option(0.2, "search: probability to redraw each choice of a child (the code's --m_prob)")

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"glora: stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        if self.rank < 1:
            raise ConfigError(f"glora: rank must be >= 1, got {self.rank}")
        for key, kinds in KINDS.items():
            if getattr(self, key) not in kinds:
                raise ConfigError(f"glora: {key} must be one of {list(kinds)}, got '{getattr(self, key)}'")
        bad = [t for t in self.targets if t not in ROLES]
        if bad or not self.targets:
            raise ConfigError(f"glora: targets must be among {list(ROLES)}, got {self.targets}")
        if self.stage == "fixed" and self.a == self.b == self.c == self.d == self.e == "none":
            raise ConfigError("glora: every support tensor is 'none'; nothing would train")
        if self.stage == "subnet" and self.layers is None:
            raise ConfigError("glora: stage=subnet needs layers=<glora_search.json from the search, or JSON>")
        if self.stage == "search" and self.supernet is None:
            raise ConfigError("glora: stage=search needs supernet=<run folder of the stage=supernet run>")
        if self.population < 2 or self.generations < 1 or self.parents < 2 or not 0 <= self.mutation_prob <= 1:
            raise ConfigError(
                "glora: the search needs population >= 2, generations >= 1, parents >= 2 and mutation_prob in [0, 1]"
            )

    def kinds(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in KINDS}


def load_layers(value: str) -> dict[str, dict[str, str]]:
    """A per-layer configuration from inline JSON or from the file the search writes."""
    inline = value.lstrip().startswith("{")
    text = value if inline or not Path(value).is_file() else Path(value).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"glora: layers is neither a JSON object nor a readable file: {value!r}") from exc
    data = data.get("layers", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError("glora: layers must map each layer name to its {a, b, c, d, e}")
    layers = {}
    for name, kinds in data.items():
        if not isinstance(kinds, dict) or set(kinds) != set(KINDS):
            raise ConfigError(f"glora: layer '{name}' needs exactly the keys a, b, c, d, e, got {kinds}")
        for key, kind in kinds.items():
            if kind not in KINDS[key]:
                raise ConfigError(f"glora: layer '{name}': {key} must be one of {list(KINDS[key])}, got '{kind}'")
        layers[name] = {k: kinds[k] for k in KINDS}
    return layers


def count_layer(kinds: dict[str, str], in_features: int, out_features: int, rank: int) -> int:
    """Trainable parameters of one adapted Linear with these support tensors (the code's get_param)."""
    total = 0
    for key, rows, cols in (("a", out_features, in_features), ("b", out_features, in_features), ("c", in_features, 1)):
        total += {"lora": rank * (rows + cols), "vector": rows, "constant": 1, "none": 0}[kinds[key]]
    for key in ("d", "e"):
        total += {"vector": out_features, "constant": 1, "none": 0}[kinds[key]]
    return total


class GLoRALinear(BaseLayerWrapper):
    """A Linear layer computed with GLoRA's adapted weight and bias.

    ``kinds`` gives A..E. A supernet layer (``supernet=True``) holds every support tensor at its
    largest form (A, B, C as LoRA factors, D, E as vectors) and computes the active ``kinds`` from
    slices of them, as the official supernet: a vector is the first column of the down factor, a
    constant its first entry (D, E: the vector's first entry).
    """

    def __init__(self, base_layer: nn.Linear, kinds: dict[str, str], rank: int, supernet: bool = False):
        super().__init__(base_layer)
        out_f, in_f, r = base_layer.out_features, base_layer.in_features, rank
        self.kinds, self.supernet = dict(kinds), supernet
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        for key, rows, cols in (("a", out_f, in_f), ("b", out_f, in_f), ("c", in_f, 1)):
            kind = "lora" if supernet else self.kinds[key]
            if kind == "lora":
                up = torch.empty(r, cols, **kw)
                nn.init.xavier_uniform_(up)
                self.register_parameter(f"{key}_down", nn.Parameter(torch.zeros(rows, r, **kw)))
                self.register_parameter(f"{key}_up", nn.Parameter(up))
            elif kind == "vector":
                self.register_parameter(key, nn.Parameter(torch.zeros(rows, 1, **kw)))
            elif kind == "constant":
                self.register_parameter(key, nn.Parameter(torch.zeros((), **kw)))
        for key in ("d", "e"):
            kind = "vector" if supernet else self.kinds[key]
            if kind != "none":
                self.register_parameter(key, nn.Parameter(torch.zeros(out_f if kind == "vector" else (), **kw)))
        self._stash: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _support(self, key: str) -> torch.Tensor | None:
        kind = self.kinds[key]
        if kind == "none":
            return None
        if kind == "lora":
            return getattr(self, f"{key}_down") @ getattr(self, f"{key}_up")
        if not self.supernet:
            return getattr(self, key)
        if key in ("d", "e"):
            return getattr(self, key) if kind == "vector" else getattr(self, key)[0]
        down = getattr(self, f"{key}_down")
        return down[:, :1] if kind == "vector" else down[0, 0]

    def adapted(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + W0 * A + B, b0 + b0 * D + E + W0 C) from the base layer's current weights, in few kernels."""
        w0, b0, kinds = self.base_layer.weight, self.base_layer.bias, self.kinds
        weight = w0 if kinds["a"] == "none" else torch.addcmul(w0, w0, self._support("a"))
        if kinds["b"] == "lora":
            weight = torch.addmm(weight, self.b_down, self.b_up)
        elif kinds["b"] != "none":
            weight = weight + self._support("b")
        d, e = self._support("d"), self._support("e")
        bias = b0
        if b0 is not None and d is not None:
            bias = torch.addcmul(b0 if e is None else b0 + e, b0, d)
        elif e is not None:
            bias = e.expand(w0.shape[0]) if b0 is None else b0 + e
        c = self._support("c")
        if c is not None:
            bias = torch.mv(w0, c[:, 0]) if bias is None else torch.addmv(bias, w0, c[:, 0])
        return weight, bias

    def subnet_tensors(self, kinds: dict[str, str]) -> dict[str, torch.Tensor]:
        """A supernet layer's tensors for a fixed layer of ``kinds`` (the weights a searched subnet inherits)."""
        out: dict[str, torch.Tensor] = {}
        for key in ("a", "b", "c"):
            down, up = getattr(self, f"{key}_down"), getattr(self, f"{key}_up")
            if kinds[key] == "lora":
                out[f"{key}_down"], out[f"{key}_up"] = down, up
            elif kinds[key] == "vector":
                out[key] = down[:, :1]
            elif kinds[key] == "constant":
                out[key] = down[0, 0]
        for key in ("d", "e"):
            if kinds[key] != "none":
                out[key] = getattr(self, key) if kinds[key] == "vector" else getattr(self, key)[0]
        return {k: v.detach() for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.adapted()
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        layer = self.base_layer
        weight, bias = self.adapted()
        self._stash = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
        layer.weight.copy_(weight)
        if bias is not None:
            if layer.bias is None:
                layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            else:
                layer.bias.copy_(bias)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        layer = self.base_layer
        weight, bias = self._stash
        layer.weight.copy_(weight)
        if bias is None:
            layer.bias = None
        else:
            layer.bias.copy_(bias)
        self._stash = None


def _layers(model: nn.Module) -> dict[str, GLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, GLoRALinear)}


def set_layers(model: nn.Module, layers: dict[str, dict[str, str]]) -> None:
    """Make a supernet compute these per-layer support tensors."""
    for name, layer in _layers(model).items():
        layer.kinds = dict(layers[name])
    subnet_set(model)


def count_layers(model: nn.Module, layers: dict[str, dict[str, str]], rank: int) -> int:
    """Trainable parameters without head of a per-layer configuration, as a subnet builds it."""
    return sum(
        count_layer(layers[name], m.base_layer.in_features, m.base_layer.out_features, rank)
        for name, m in _layers(model).items()
    )


@register
class GLoRA(Method):
    name = "glora"
    family = "unified"
    paper = "Chavan et al., One-for-All: Generalized LoRA, 2023 (arXiv 2306.07967)"
    requires = frozenset({"qkv_fused", "attn_proj", "mlp"})
    mergeable = True
    config_class = GLoRAConfig

    def standalone_stage(self, config: GLoRAConfig) -> Stage | None:
        return SEARCH if config.stage == "search" else None

    def run_standalone(self, config: GLoRAConfig, context: StageContext) -> StageOutput:
        """`vpeft train --method glora --mode tune --opt stage=search --opt supernet=DIR`: search on val.

        Writes ``glora_search.json`` and, as the code (it has no retraining step), the found subnet with
        the supernet's weights as the run's adapter (stage=subnet)."""
        saved = context.read_adapter_config(config.supernet)
        if saved["method"] != "glora" or saved["options"]["stage"] != "supernet":
            raise ConfigError(f"glora: '{config.supernet}' does not hold a GLoRA supernet adapter")
        num_classes = saved["backbone"]["num_classes"]
        model = context.load_adapter(context.build_backbone(num_classes), config.supernet)
        data = context.data_for(model)
        found = search(model.to(data.device), data, config, seed=context.seed)
        subnet = inherit(model, found["layers"], context.build_backbone(num_classes).to(data.device))
        record = {"top1": found["val_top1"], "trainable_params": found["params"], "budget": config.budget,
                  "supernet": config.supernet, "evaluated": found["evaluated"]}  # fmt: skip
        return StageOutput(record=record, files={"glora_search.json": found}, adapter=subnet)

    def inject(self, model: nn.Module, anatomy: Anatomy, config: GLoRAConfig) -> None:
        if config.stage == "search":
            raise ConfigError("glora: stage=search trains nothing; run it through `vpeft train` or glora.search()")
        names = []
        for block in anatomy.blocks:
            for role in config.targets:
                name = getattr(block, role)
                layer = model.get_submodule(name) if name else None
                if not isinstance(layer, nn.Linear):
                    raise UnsupportedBackboneError(
                        f"glora: block {block.name} of {anatomy.architecture} has no Linear '{role}'"
                    )
                names.append(name)
        if config.stage == "subnet":
            layers = load_layers(config.layers)
            if set(layers) != set(names):
                raise ConfigError(
                    f"glora: the layers' configuration names {len(layers)} layers, this model adapts {len(names)} "
                    f"({', '.join(sorted(set(layers) ^ set(names))[:3])} ...); it was made for another backbone "
                    "or other targets"
                )
            config.layers = json.dumps(layers, sort_keys=True)  # saved inline with the adapter
        else:
            layers = dict.fromkeys(names, config.kinds())
        supernet = config.stage == "supernet"
        for name in names:
            replace_module(model, name, GLoRALinear(model.get_submodule(name), layers[name], config.rank, supernet))
        if supernet:  # a training forward draws every layer's A..E; evaluation after training the config's a..e
            rng = random.Random(torch.initial_seed())
            fixed, wrapped = config.kinds(), [model.get_submodule(n) for n in names]

            def draw() -> None:
                for layer in wrapped:
                    layer.kinds = {k: rng.choice(v) for k, v in KINDS.items()}

            def reset() -> None:
                for layer in wrapped:
                    layer.kinds = dict(fixed)

            model.register_forward_pre_hook(sampling_hook(draw, reset))


def search(model: nn.Module, data: Any, config: GLoRAConfig | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Evolutionary search of every layer's A..E on validation data, under ``config.budget`` parameters (no head).

    ``model`` carries a trained GLoRA supernet; ``data`` is the validation split (a Dataset, a
    DataLoader or a StageData). ``config`` gives the budget and search sizes (default: the
    supernet's). Returns the best per-layer configuration, its validation top-1 and parameter
    count, and the search's history.
    """
    state = get_state(model)
    if state is None or state.method != "glora" or state.config.stage != "supernet":
        raise ConfigError("glora search needs a model with a trained GLoRA supernet (stage=supernet)")
    config = config or state.config
    rank, names = state.config.rank, list(_layers(model))
    data = StageData.wrap(data, model)

    def named(candidate: list[dict[str, str]]) -> dict[str, dict[str, str]]:
        return dict(zip(names, candidate, strict=True))

    def score(candidate: list[dict[str, str]]) -> float:
        set_layers(model, named(candidate))
        return top1(model, data.batches())

    found = evolve(
        {k: list(v) for k, v in KINDS.items()},
        len(names),
        score,
        lambda candidate: count_layers(model, named(candidate), rank),
        config.budget,
        population=config.population,
        generations=config.generations,
        parents=config.parents,
        mutation_prob=config.mutation_prob,
        rng=random.Random(seed),
        what="glora",
    )
    set_layers(model, dict.fromkeys(names, state.config.kinds()))
    return {"layers": named(found["best"]), "val_top1": 100 * found["score"], "params": found["params"],
            "budget": config.budget, "rank": rank, "history": found["history"], "evaluated": found["evaluated"]}  # fmt: skip


def inherit(supernet: nn.Module, layers: dict[str, dict[str, str]], fresh: nn.Module) -> nn.Module:
    """``fresh`` (the backbone the supernet was applied to, unchanged) with the subnet ``layers`` applied and
    the supernet's weights: its slices for the support tensors, its classifier head."""
    config = replace(get_state(supernet).config, stage="subnet", layers=json.dumps(layers, sort_keys=True))
    model = apply(fresh, config)
    source = _layers(supernet)
    head = {n: p for n, p in trainable_parameters(supernet).items() if get_state(supernet).anatomy.is_head_param(n)}
    with torch.no_grad():
        for name, layer in _layers(model).items():
            for key, tensor in source[name].subnet_tensors(layers[name]).items():
                getattr(layer, key).copy_(tensor)
        for name, param in trainable_parameters(model).items():
            if name in head:
                param.copy_(head[name])
    return model
