"""SPT-LoRA and SPT-Adapter: sensitivity-aware parameter-efficient fine-tuning.

He et al., "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023. Stage (reads the
training split): the sensitivity of every candidate parameter entry is the sum over ``batches``
batches of its squared cross-entropy gradient (the new head included in the forward). The ``tau``
most sensitive entries over the whole backbone are taken, with tau chosen so that the trainable
count comes closest to ``budget``. Then per weight matrix (the q, k and v slices of a fused qkv are
three matrices, as the official model has separate q, k, v layers): if its sensitive entries number
at least 1/alpha of a rank-r LoRA or Adapter's parameters, it gets that module, parallel to it on
its input; otherwise its sensitive entries train as a sparse delta. Per vector (biases, norm
weights and biases): whole when at least 1/beta of it is sensitive, else its sensitive entries.
The class token trains whole; the patch embedding, position embeddings and head do not count.

As the official code (ziplab/SPT: engine.py get_sensitivity, model/vision_transformer_timm.py):
LoRA without scaling (A Kaiming-uniform, B zero), Adapter down (with bias) -> GELU -> up (weights
and bias zero), dropout 0.1 on the branch input (not on the attention output projection's), drop-path
0.1 on the branch output, no gradient pass augmentation, batches read in order. Differences: the
stage runs in evaluation mode; tau is searched on a grid of 1% steps of the budget (the official
sweeps 0.02M steps); a structured module's count is its true count (the official formula
counts an Adapter as 2 r out + r + out, exact only for square matrices); sparse entries of norm
weights train (the official code counts them but leaves them frozen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, NotMergeableError
from vpeft.methods.base import (
    Method,
    SelectionConfig,
    SparseUpdate,
    Stage,
    StageData,
    accumulate_gradients,
    backbone_modules,
    register,
    replace_module,
)

STRUCTURED = ("lora", "adapter")


@dataclass
class SPTConfig(SelectionConfig):
    budget: int = option(400_000, "trainable parameters without head (the official runs sweep 0.2M-1.0M per task)")
    rank: int = option(8, "rank of each LoRA / bottleneck of each Adapter")
    alpha: float = option(10.0, "a matrix gets a LoRA/Adapter when its sensitive entries reach 1/alpha of its size")
    beta: float = option(5.0, "a vector trains whole when at least 1/beta of its entries are sensitive")
    batches: int = option(8, "batches of the sensitivity pass")
    batch_size: int = option(32, "images per batch of the sensitivity pass (the official scripts' 32)")
    dropout: float = option(0.1, "dropout on the input of each LoRA/Adapter (not on the attention output's)")
    drop_path: float = option(0.1, "drop-path on the output of each LoRA/Adapter")
    selection: dict[str, Any] | None = option(
        None,
        "decided by the sensitivity pass: structured matrices, whole vectors and sparse entries; saved with "
        "the adapter (set it only to reuse a saved selection)",
    )

    def validate(self) -> None:
        checks = [("budget", self.budget >= 1), ("rank", self.rank >= 1), ("alpha", self.alpha > 0),
                  ("beta", self.beta > 0), ("batches", self.batches >= 1), ("batch_size", self.batch_size >= 1),
                  ("dropout", 0 <= self.dropout < 1), ("drop_path", 0 <= self.drop_path < 1)]  # fmt: skip
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{self.method}: {name} is out of range, got {getattr(self, name)}")


@dataclass
class SPTLoRAConfig(SPTConfig):
    pass


@dataclass
class SPTAdapterConfig(SPTConfig):
    pass


@dataclass
class Unit:
    """One candidate of the budget: a weight matrix (or a row slice of a fused qkv) or a vector."""

    param: str
    module: str
    rows: tuple[int, int] | None  # a matrix's rows in its weight; None for a vector
    numel: int
    in_dim: int = 0

    def cost(self, structured: str, rank: int) -> int:
        """Parameters of the LoRA/Adapter that would replace this matrix's sparse entries."""
        out_dim = self.rows[1] - self.rows[0]
        lora = rank * (self.in_dim + out_dim)
        return lora if structured == "lora" else lora + rank + out_dim


def candidates(model: nn.Module, anatomy: Anatomy) -> list[Unit]:
    """Matrices and vectors that can train, in model order: not the patch embedding, head or root tokens."""
    fused = {b.qkv for b in anatomy.blocks if b.qkv}
    embed = anatomy.embed or "\0"
    units = []
    for name, module in backbone_modules(model, anatomy):
        if name == embed or name.startswith(embed + "."):
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if isinstance(module, nn.Linear) and pname == "weight":
                out_dim, in_dim = param.shape
                parts = 3 if name in fused else 1
                step = out_dim // parts
                units += [Unit(full, name, (i * step, (i + 1) * step), step * in_dim, in_dim) for i in range(parts)]
            elif param.ndim == 1:  # biases, norm weights and biases, layer scales
                units.append(Unit(full, name, None, param.numel()))
    return units


def _class_token(model: nn.Module, anatomy: Anatomy) -> nn.Parameter | None:
    return getattr(model, "cls_token", None) if anatomy.has_class_token else None


def _plan(counts: torch.Tensor, units: list[Unit], config: SPTConfig, structured: str) -> tuple[int, list[str]]:
    """(trainable count, decision per unit: 'structured', 'whole', 'sparse' or 'none') for these sensitive counts."""
    total, decisions = 0, []
    for unit, count in zip(units, counts.tolist(), strict=True):
        if count == 0:
            decisions.append("none")
        elif unit.rows is not None and count >= unit.cost(structured, config.rank) / config.alpha:
            decisions.append("structured")
            total += unit.cost(structured, config.rank)
        elif unit.rows is None and count >= unit.numel / config.beta:
            decisions.append("whole")
            total += unit.numel
        else:
            decisions.append("sparse")
            total += count
    return total, decisions


class SPTLinear(SparseUpdate):
    """A Linear layer with sparse entries and LoRA/Adapter branches on row slices of its output."""

    def __init__(
        self,
        base_layer: nn.Linear,
        entries: dict[str, torch.Tensor],
        slices: list[tuple[int, int]],
        structured: str,
        rank: int,
        dropout: float,
        drop_path: float,
    ):
        super().__init__(base_layer, entries)
        from timm.layers import DropPath

        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.slices, self.structured = [tuple(s) for s in slices], structured
        self.branches = nn.ModuleList()
        for start, end in self.slices:
            down = nn.Linear(base_layer.in_features, rank, bias=structured == "adapter", **kw)  # Kaiming-uniform
            up = nn.Linear(rank, end - start, bias=structured == "adapter", **kw)
            nn.init.zeros_(up.weight)
            if up.bias is not None:
                nn.init.zeros_(up.bias)
            self.branches.append(
                nn.Sequential(down, nn.GELU(), up) if structured == "adapter" else nn.Sequential(down, up)
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.branches:
            return out
        h, width = self.dropout(x), out.shape[-1]
        for (start, end), branch in zip(self.slices, self.branches, strict=True):
            out = out + F.pad(self.drop_path(branch(h)), (start, width - end))
        return out

    def _lora_delta(self, branch: nn.Sequential) -> torch.Tensor:
        if self.structured != "lora":
            raise NotMergeableError("SPT-Adapter's branches are not linear; they cannot be merged")
        return branch[1].weight @ branch[0].weight

    @torch.no_grad()
    def merge_into_base(self) -> None:
        super().merge_into_base()
        for (start, end), branch in zip(self.slices, self.branches, strict=True):
            self.base_layer.weight[start:end] += self._lora_delta(branch)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        super().unmerge_from_base()
        for (start, end), branch in zip(self.slices, self.branches, strict=True):
            self.base_layer.weight[start:end] -= self._lora_delta(branch)


class SPT(Method):
    """Shared by SPT-LoRA and SPT-Adapter; ``structured`` names the module a sensitive matrix gets."""

    family = "unified"
    requires = frozenset({"qkv_fused", "attn_proj", "mlp"})
    structured = "lora"
    stage = Stage("sensitivity", "train", "squared cross-entropy gradients of every entry over a few batches")

    def prepare(self, model: nn.Module, anatomy: Anatomy, config: SPTConfig, data: StageData) -> SPTConfig:
        units = candidates(model, anatomy)
        params = {u.param: model.get_parameter(u.param) for u in units}

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x).float(), y)

        sensitivity = accumulate_gradients(
            model, params, data.batches(config.batch_size, limit=config.batches), loss, square=True
        )
        flat = torch.cat([
            (sensitivity[u.param][u.rows[0] : u.rows[1]] if u.rows else sensitivity[u.param]).flatten() for u in units
        ]).cpu()  # fmt: skip
        offsets = torch.tensor([0] + [u.numel for u in units]).cumsum(0)
        cls = _class_token(model, anatomy)
        fixed = cls.numel() if cls is not None else 0
        taus = sorted({min(len(flat), math.ceil(config.budget * j / 100)) for j in range(1, 301)})
        order = _ranked(flat, taus[-1])
        unit_of = torch.searchsorted(offsets, order, right=True) - 1
        counts = torch.zeros(len(units), dtype=torch.long)
        best, done = None, 0
        for tau in taus:
            counts += torch.bincount(unit_of[done:tau], minlength=len(units))
            done = tau
            total, _ = _plan(counts, units, config, self.structured)
            if best is None or abs(total + fixed - config.budget) < abs(best[1] - config.budget):
                best = (tau, total + fixed)
        tau = best[0]
        counts = torch.bincount(unit_of[:tau], minlength=len(units))
        _, decisions = _plan(counts, units, config, self.structured)
        chosen = order[:tau]
        selection: dict[str, Any] = {"tau": tau, "structured": [], "whole": [], "entries": {}}
        for i, (unit, decision) in enumerate(zip(units, decisions, strict=True)):
            if decision == "structured":
                selection["structured"].append([unit.param, *unit.rows])
            elif decision == "whole":
                selection["whole"].append(unit.param)
            elif decision == "sparse":
                local = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
                if unit.rows is not None:
                    local = local + unit.rows[0] * unit.in_dim
                entries = selection["entries"].setdefault(unit.param, [])
                selection["entries"][unit.param] = sorted(entries + local.tolist())
        return replace(config, selection=selection)

    def inject(self, model: nn.Module, anatomy: Anatomy, config: SPTConfig) -> None:
        sel = config.selection
        if sel is None:
            raise ConfigError(f"{self.name}: no selection; apply it with data=<training set> or load an adapter")
        names = {u.param for u in candidates(model, anatomy)}
        used = {p for p, *_ in sel["structured"]} | set(sel["whole"]) | set(sel["entries"])
        if used - names:
            raise ConfigError(
                f"{self.name}: the selection names parameters this model lacks ({sorted(used - names)[:3]}); "
                "it was made for another backbone"
            )
        for name in sel["whole"]:
            model.get_parameter(name).requires_grad_(True)
        cls = _class_token(model, anatomy)
        if cls is not None:
            cls.requires_grad_(True)
        modules: dict[str, dict[str, Any]] = {}
        for param, start, end in sel["structured"]:
            modules.setdefault(param.rpartition(".")[0], {"entries": {}, "slices": []})["slices"].append((start, end))
        for param, index in sel["entries"].items():
            module, _, pname = param.rpartition(".")
            modules.setdefault(module, {"entries": {}, "slices": []})["entries"][pname] = torch.tensor(index)
        projections = {b.proj for b in anatomy.blocks if b.proj}
        for name, parts in modules.items():
            base = model.get_submodule(name)
            if isinstance(base, nn.Linear):
                dropout = 0.0 if name in projections else config.dropout
                wrapper = SPTLinear(base, parts["entries"], sorted(parts["slices"]), self.structured, config.rank,
                                    dropout, config.drop_path)  # fmt: skip
            else:
                wrapper = SparseUpdate(base, parts["entries"])
            replace_module(model, name, wrapper)


def _ranked(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest values, largest first, equal values by index (deterministic)."""
    values, index = flat.topk(count)
    index, order = index.sort(stable=True)
    values = values[order]
    return index[values.sort(descending=True, stable=True).indices]


@register
class SPTLoRA(SPT):
    name = "spt_lora"
    paper = "He et al., Sensitivity-Aware Visual PEFT (SPT-LoRA), ICCV 2023 (arXiv 2303.08566)"
    mergeable = True
    config_class = SPTLoRAConfig
    structured = "lora"


@register
class SPTAdapter(SPT):
    name = "spt_adapter"
    paper = "He et al., Sensitivity-Aware Visual PEFT (SPT-Adapter), ICCV 2023 (arXiv 2303.08566)"
    config_class = SPTAdapterConfig
    structured = "adapter"
