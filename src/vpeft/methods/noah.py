"""NOAH: neural prompt search over Adapter, LoRA and VPT with per-block sizes.

Zhang, Zhou and Liu, "Neural Prompt Search", 2022. Every block carries three modules whose size is
searched per block: an Adapter after the MLP (bottleneck), LoRA on the q and v slices of qkv (rank)
and VPT-deep prompts (tokens). Three stages:

1. ``stage=supernet``: modules at their largest sizes; each training forward samples a random size
   per module and block and uses the first that-many rows/columns/tokens (weight entanglement);
   evaluation after training uses the largest sizes (a search sets each candidate's sizes).
2. ``search(model, val_set, budget)``: evolutionary search (mutation and crossover) over per-block
   sizes, each candidate scored by validation accuracy with the supernet's weights, under a budget
   of trainable parameters without head. Test data is never used. In a run (``stage=search``) it
   is the method's standalone stage: the runner hands it the validation split, in tune mode only.
3. ``stage=retrain`` with ``architecture``: the chosen sizes, built at exactly those sizes and
   trained from scratch; the architecture is saved in the adapter config.

A size of 0 removes the module from that block. Identity at initialization: Adapter up, LoRA B zero;
prompts change the output (as in VPT).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError
from vpeft.methods.base import (
    BaseLayerWrapper,
    Method,
    MethodConfig,
    Stage,
    StageContext,
    StageOutput,
    register,
    replace_module,
)
from vpeft.methods.evolution import evolve, sample, sampling_hook, subnet_set, top1
from vpeft.methods.prompts import prompt_init_bound
from vpeft.methods.state import get_state

MODULES = ("adapter", "lora", "prompt")
STAGES = ("supernet", "search", "retrain")
#: stage=search as a run of the protocol: reads the validation split (tune mode), trains nothing
SEARCH = Stage("search", "val", "evolutionary search of per-block sizes on the validation split")


@dataclass
class NOAHConfig(MethodConfig):
    stage: str = option("supernet", "supernet (train with sampled sizes) or retrain (a searched architecture)")
    adapter_choices: list[int] = option([0, 4, 8], "Adapter bottleneck sizes to search over, per block")
    lora_choices: list[int] = option([0, 4, 8], "LoRA ranks (on q and v) to search over, per block")
    prompt_choices: list[int] = option([0, 5, 10], "VPT-deep prompt counts to search over, per block")
    architecture: str | None = option(
        None, "retrain: per-block sizes, a JSON list of {adapter, lora, prompt} or a path to architecture.json"
    )
    supernet: str | None = option(None, "search: the run folder of the trained supernet")
    budget: int = option(500_000, "search: most trainable parameters without head of the chosen subnet")

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"noah: stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        for name in ("adapter_choices", "lora_choices", "prompt_choices"):
            values = getattr(self, name)
            if not values or min(values) < 0:
                raise ConfigError(f"noah: {name} must be non-negative sizes, got {values}")
        if self.stage == "retrain" and self.architecture is None:
            raise ConfigError("noah: stage=retrain needs architecture=<architecture.json from the search>")
        if self.stage == "search" and self.supernet is None:
            raise ConfigError("noah: stage=search needs supernet=<run folder of the stage=supernet run>")

    def maxima(self) -> dict[str, int]:
        return {
            "adapter": max(self.adapter_choices),
            "lora": max(self.lora_choices),
            "prompt": max(self.prompt_choices),
        }

    def choices(self) -> dict[str, list[int]]:
        return {"adapter": self.adapter_choices, "lora": self.lora_choices, "prompt": self.prompt_choices}


def load_architecture(value: str) -> list[dict[str, int]]:
    """An architecture from inline JSON or from a file written by :func:`search`."""
    text = Path(value).read_text() if not value.lstrip().startswith("[") and Path(value).is_file() else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"noah: architecture is neither a JSON list nor a readable file: {value!r}") from exc
    data = data["architecture"] if isinstance(data, dict) else data
    return [{k: int(block[k]) for k in MODULES} for block in data]


class NOAHBlock(BaseLayerWrapper):
    """A transformer block with sized VPT-deep prompts, LoRA on q/v and an Adapter after the MLP."""

    def __init__(self, block: nn.Module, sizes: dict[str, int], prefix: int, init_bound: float):
        super().__init__(block)
        ref, dim = block.norm1.weight, block.norm1.weight.shape[0]
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.prefix, self.dim = prefix, dim
        self.active = dict(sizes)
        self.prompt = nn.Parameter(torch.empty(sizes["prompt"], dim, **kw).uniform_(-init_bound, init_bound))
        r = sizes["lora"]
        self.lora_a = nn.Parameter(torch.empty(2, r, dim, **kw))
        if r:
            for i in range(2):
                nn.init.kaiming_uniform_(self.lora_a[i], a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(2, dim, r, **kw))
        b = sizes["adapter"]
        self.down_w = nn.Parameter(torch.empty(b, dim, **kw))
        if b:
            nn.init.kaiming_uniform_(self.down_w, a=math.sqrt(5))
        self.down_b = nn.Parameter(torch.zeros(b, **kw))
        self.up_w = nn.Parameter(torch.zeros(dim, b, **kw))
        self.up_b = nn.Parameter(torch.zeros(dim, **kw)) if b else nn.Parameter(torch.zeros(0, **kw))
        self._hooks = [
            block.attn.qkv.register_forward_hook(self._lora_hook),
            block.mlp.register_forward_hook(self._adapter_hook),
        ]

    def _lora_hook(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        r = self.active["lora"]
        if r == 0:
            return out
        x, d = inputs[0], out.shape[-1] // 3
        q = F.linear(F.linear(x, self.lora_a[0, :r]), self.lora_b[0, :, :r])
        v = F.linear(F.linear(x, self.lora_a[1, :r]), self.lora_b[1, :, :r])
        return out + torch.cat([q, out.new_zeros(*out.shape[:-1], d), v], dim=-1)

    def _adapter_hook(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        b = self.active["adapter"]
        if b == 0:
            return out
        h = F.gelu(F.linear(out, self.down_w[:b], self.down_b[:b]))
        return out + F.linear(h, self.up_w[:, :b], self.up_b)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n, p = self.active["prompt"], self.prefix
        if n == 0:
            return self.base_layer(x, *args, **kwargs)
        prompts = self.prompt[:n].unsqueeze(0).expand(x.shape[0], -1, -1)
        y = self.base_layer(torch.cat([x[:, :p], prompts, x[:, p:]], dim=1), *args, **kwargs)
        return torch.cat([y[:, :p], y[:, p + n :]], dim=1)  # VPT-deep: the next block gets fresh prompts

    def count(self, sizes: dict[str, int]) -> int:
        """Trainable parameters of this block at ``sizes``."""
        dim = self.dim
        adapter = 2 * dim * sizes["adapter"] + sizes["adapter"] + dim if sizes["adapter"] else 0
        return sizes["prompt"] * dim + 2 * 2 * dim * sizes["lora"] + adapter


def _blocks(model: nn.Module) -> list[NOAHBlock]:
    return [m for m in model.modules() if isinstance(m, NOAHBlock)]


def set_architecture(model: nn.Module, architecture: list[dict[str, int]] | None) -> None:
    """Use these per-block sizes (None: the largest of every module)."""
    for block, sizes in zip(_blocks(model), architecture or [None] * len(_blocks(model)), strict=True):
        block.active = dict(sizes) if sizes else {k: _largest(block, k) for k in MODULES}
    subnet_set(model)


def _largest(block: NOAHBlock, module: str) -> int:
    return {"prompt": block.prompt.shape[0], "lora": block.lora_a.shape[1], "adapter": block.down_w.shape[0]}[module]


def count_architecture(model: nn.Module, architecture: list[dict[str, int]]) -> int:
    """Trainable parameters without head of a subnet, as retraining it would build it."""
    return sum(b.count(s) for b, s in zip(_blocks(model), architecture, strict=True))


@register
class NOAH(Method):
    name = "noah"
    family = "unified"
    paper = "Zhang et al., Neural Prompt Search (NOAH), 2022 (arXiv 2206.04673)"
    requires = frozenset({"tokens", "isotropic", "attention", "mlp"})
    single_run = False
    config_class = NOAHConfig

    def standalone_stage(self, config: NOAHConfig) -> Stage | None:
        return SEARCH if config.stage == "search" else None

    def run_standalone(self, config: NOAHConfig, context: StageContext) -> StageOutput:
        """`vpeft train --method noah --mode tune --opt stage=search --opt supernet=DIR`: search on val."""
        saved = context.read_adapter_config(config.supernet)
        if saved["method"] != "noah" or saved["options"]["stage"] != "supernet":
            raise ConfigError(f"noah: '{config.supernet}' does not hold a NOAH supernet adapter")
        model = context.build_backbone(saved["backbone"]["num_classes"])
        context.load_adapter(model, config.supernet)
        data = context.data_for(model)
        found = search(model.to(data.device), data.dataset, config.budget, seed=context.seed)
        record = {"top1": found["val_top1"], "trainable_params": found["params"], "budget": config.budget,
                  "supernet": config.supernet, "architecture": found["architecture"]}  # fmt: skip
        return StageOutput(record=record, files={"architecture.json": found})

    def inject(self, model: nn.Module, anatomy: Anatomy, config: NOAHConfig) -> None:
        if config.stage == "search":
            raise ConfigError("noah: stage=search trains nothing; run it through `vpeft train` or noah.search()")
        if config.stage == "retrain":
            architecture = load_architecture(config.architecture)
            if len(architecture) != anatomy.depth:
                raise ConfigError(f"noah: the architecture has {len(architecture)} blocks, the model {anatomy.depth}")
            config.architecture = json.dumps(architecture)  # saved inline with the adapter
        else:
            architecture = [config.maxima()] * anatomy.depth
        bound = prompt_init_bound(anatomy)
        for block, sizes in zip(anatomy.blocks, architecture, strict=True):
            wrapper = NOAHBlock(model.get_submodule(block.name), sizes, anatomy.num_prefix_tokens, bound)
            replace_module(model, block.name, wrapper)
        if config.stage == "supernet":
            rng = random.Random(0)
            choices, depth = config.choices(), anatomy.depth

            model.register_forward_pre_hook(
                sampling_hook(
                    lambda: set_architecture(model, sample(choices, depth, rng)),
                    lambda: set_architecture(model, None),
                )
            )


def evaluate_architecture(model: nn.Module, architecture: list[dict[str, int]], loader) -> float:
    set_architecture(model, architecture)
    return top1(model, loader)


def search(
    model: nn.Module,
    val_set: torch.utils.data.Dataset,
    budget: int,
    *,
    population: int = 12,
    generations: int = 5,
    mutation_prob: float = 0.2,
    seed: int = 0,
    batch_size: int = 200,
) -> dict[str, Any]:
    """Evolutionary search of per-block sizes on a validation set, under a parameter budget (no head).

    ``model`` carries a trained NOAH supernet. Returns the best architecture, its validation
    accuracy and parameter count, and the history of the search (:func:`vpeft.methods.evolution.evolve`).
    """
    state = get_state(model)
    if state is None or state.method != "noah" or state.config.stage != "supernet":
        raise ConfigError("noah search needs a model with a trained NOAH supernet (stage=supernet)")
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, shuffle=False)
    # the forward pre-hook samples only in training mode; evaluation uses set_architecture's sizes
    found = evolve(
        state.config.choices(),
        len(_blocks(model)),
        lambda arch: evaluate_architecture(model, arch, loader),
        lambda arch: count_architecture(model, arch),
        budget,
        population=population,
        generations=generations,
        mutation_prob=mutation_prob,
        rng=random.Random(seed),
        what="noah",
    )
    set_architecture(model, None)
    return {"architecture": found["best"], "val_top1": 100 * found["score"], "params": found["params"],
            "budget": budget, "history": found["history"], "evaluated": found["evaluated"]}  # fmt: skip
