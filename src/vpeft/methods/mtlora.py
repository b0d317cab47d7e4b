"""MTLoRA: a task-agnostic low-rank update shared by every task plus a task-specific one per task.

Agiza et al., "MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task Learning", CVPR 2024
(official code: scale-lab/MTLoRA). Each adapted Linear ``W`` of task ``t`` computes

    y = W x + s_shared B_shared A_shared x + s_task B_t A_t x,

with ``A`` Kaiming-uniform and ``B`` zero (identity at init). The official ``MTLoRALinear`` keeps the
shared update on the task-agnostic path and adds each task's update to it where task modules sit
(its ``matrixv2`` mode); the paper puts the task-specific modules (TS-LoRA) in the last block of each
stage and the shared ones (TA-LoRA) everywhere: ``task_blocks=last`` is that layout, ``all`` gives
every adapted layer a task part. The paper's multi-scale decoder heads for dense prediction are not
part of this (vpeft's tasks are classification: one head per task).

On one model this method is one task's view (shared + its own update: a LoRA of rank
``rank + task_rank`` with two scalings; mergeable). Shared across tasks it becomes MTLoRA:
:class:`vpeft.multi.MultiAdapterModel` ties the ``shared_A``/``shared_B`` tensors of every ``mtlora``
adapter on the backbone (see :meth:`MTLoRA.task_shared_parameters`), so the shared update trains on
every task's samples and each task's own update on its samples only (``vpeft.multi.multitask_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import Method, MethodConfig, RoutableUpdate, SlicedDeltaWrapper, register, replace_module
from vpeft.methods.lowrank import SlicedLoRAFunction
from vpeft.methods.targets import resolve_targets
from vpeft.modules import matmul_dtype


@dataclass
class MTLoRAConfig(MethodConfig):
    rank: int = option(8, "rank of the task-agnostic (shared) update B A")
    task_rank: int = option(8, "rank of each task's own update")
    shared_scale: float = option(1.0, "scaling of the shared update (the official lora_shared_scale)")
    task_scale: float = option(1.0, "scaling of the task's update (the official lora_task_scale)")
    dropout: float = option(0.0, "dropout on the low-rank branches' input")
    targets: list[str] | None = option(
        None,
        "layers to adapt: roles q, k, v (slices of a fused qkv), qkv, proj, fc1, fc2, or 're:<regex>'. "
        "Default: qkv, proj, fc1, fc2 (the official code adapts all four)",
    )
    task_blocks: str = option(
        "all",
        "blocks whose layers also get the task's update: all, or last (the last block of each stage, "
        "the paper's TS-LoRA placement; the other blocks get the shared update only)",
        choices=("all", "last"),
    )

    def validate(self) -> None:
        if self.rank < 1 or self.task_rank < 1:
            raise ConfigError(f"mtlora: rank and task_rank must be >= 1, got {self.rank} and {self.task_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"mtlora: dropout must be in [0, 1), got {self.dropout}")
        if self.task_blocks not in ("all", "last"):
            raise ConfigError(f"mtlora: task_blocks must be all or last, got '{self.task_blocks}'")
        if self.targets is not None and not self.targets:
            raise ConfigError("mtlora: targets is empty; give at least one of q, k, v, qkv, proj, fc1, fc2")

    def shared_signature(self) -> dict:
        """The options every task sharing the update must agree on."""
        return {"rank": self.rank, "shared_scale": self.shared_scale, "targets": self.targets}


def _kaiming(rows: int, cols: int, ref: torch.Tensor) -> nn.Parameter:
    a = torch.empty(rows, cols, device=ref.device, dtype=ref.dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a)


class MTLoRALinear(SlicedDeltaWrapper, RoutableUpdate):
    """A Linear plus a shared and (where ``task_rank`` > 0) a task-specific low-rank update on output slices."""

    def __init__(
        self,
        base_layer: nn.Linear,
        slices: list[tuple[int, int]],
        rank: int,
        task_rank: int,
        shared_scale: float,
        task_scale: float,
        dropout: float,
    ) -> None:
        super().__init__(base_layer)
        self.slices = [tuple(s) for s in slices]
        self.shared_scale, self.task_scale = shared_scale, task_scale
        ref, d_in = base_layer.weight, base_layer.in_features
        self.shared_A = nn.ParameterList([_kaiming(rank, d_in, ref) for _ in self.slices])
        self.shared_B = nn.ParameterList([nn.Parameter(ref.new_zeros(e - s, rank)) for s, e in self.slices])
        self.task_A = nn.ParameterList([_kaiming(task_rank, d_in, ref) for _ in self.slices] if task_rank else [])
        self.task_B = nn.ParameterList(
            [nn.Parameter(ref.new_zeros(e - s, task_rank)) for s, e in self.slices] if task_rank else []
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per slice, the scaled A (shared rows, then the task's) and B (shared columns, then the task's):
        one low-rank update of rank ``rank + task_rank`` per slice, built from small weights only."""
        a_list, b_list = [], []
        for i in range(len(self.slices)):
            a, b = self.shared_A[i] * self.shared_scale, self.shared_B[i]
            if len(self.task_A):
                a = torch.cat([a, self.task_A[i] * self.task_scale])
                b = torch.cat([b, self.task_B[i]], dim=1)
            a_list.append(a)
            b_list.append(b)
        return a_list, b_list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_list, b_list = self.factors()
        layer = self.base_layer
        if self.training and not isinstance(self.dropout, nn.Identity):
            out = layer(x)
            return self._add_update(out, self.dropout(x), a_list, b_list)
        flat = x.reshape(-1, x.shape[-1])
        out = SlicedLoRAFunction.apply(flat, layer.weight, layer.bias, matmul_dtype(x), 1.0, self.slices,
                                        *a_list, *b_list)  # fmt: skip
        return out.view(*x.shape[:-1], out.shape[-1])

    def _add_update(self, out: torch.Tensor, x: torch.Tensor, a_list, b_list) -> torch.Tensor:
        """``out`` plus the update on input ``x`` (one down- and one up-projection over all slices)."""
        low = F.linear(x, a_list[0] if len(a_list) == 1 else torch.cat(a_list))
        up = _block_rows(self.slices, b_list, self.base_layer.out_features)
        return out + F.linear(low, up)

    def add_update_span_(self, out: torch.Tensor, x: torch.Tensor, start: int, end: int) -> None:
        """Add the update of rows ``start:end`` of ``x`` into the same rows of ``out`` in place (views and
        in-place matmuls only: :mod:`vpeft.multi.single_pass`)."""
        a_list, b_list = self.factors()
        rows = self.dropout(x[start:end])
        low = F.linear(rows, a_list[0] if len(a_list) == 1 else torch.cat(a_list))
        low = low.reshape(-1, low.shape[-1])
        target = out[start:end].view(-1, out.shape[-1])
        lows = low.split([a.shape[0] for a in a_list], dim=1) if len(a_list) > 1 else [low]
        for (s, e), low_i, b in zip(self.slices, lows, b_list, strict=True):
            target[:, s:e].addmm_(low_i.to(out.dtype), b.t().to(out.dtype))

    def delta_weight(self, index: int) -> torch.Tensor:
        a_list, b_list = self.factors()
        return b_list[index] @ a_list[index]


def _block_rows(slices: list[tuple[int, int]], b_list: list[torch.Tensor], width: int) -> torch.Tensor:
    """(width, sum of ranks): slice i's B in its output rows and its own columns, zeros elsewhere."""
    blocks, cursor = [], 0
    for (start, end), b in zip(slices, b_list, strict=True):
        if start > cursor:
            blocks.append(b.new_zeros(start - cursor, 0))
        blocks.append(b)
        cursor = end
    if cursor < width:
        blocks.append(blocks[-1].new_zeros(width - cursor, 0))
    return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)


def task_block_names(anatomy: Anatomy, where: str) -> set[str]:
    """The blocks that hold task updates: every block, or the last block of each stage."""
    names = [b.name for b in anatomy.blocks]
    if where == "all":
        return set(names)
    last: dict[str, str] = {}
    for name in names:  # "blocks.11" -> stage "blocks"; "layers.2.blocks.5" -> stage "layers.2.blocks"
        last[name.rpartition(".")[0]] = name
    return set(last.values())


@register
class MTLoRA(Method):
    name = "mtlora"
    family = "partial/reparameterization"
    paper = "Agiza et al., MTLoRA, CVPR 2024 (arXiv 2403.20320)"
    requires = frozenset({"qkv_fused", "attn_proj", "mlp"})
    mergeable = True
    config_class = MTLoRAConfig

    def inject(self, model: nn.Module, anatomy: Anatomy, config: MTLoRAConfig) -> None:
        targets = config.targets if config.targets is not None else ["qkv", "proj", "fc1", "fc2"]
        with_task = task_block_names(anatomy, config.task_blocks)
        for name, slices in resolve_targets(model, anatomy, targets).items():
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise UnsupportedBackboneError(f"mtlora: '{name}' is a {type(layer).__name__}, not a Linear")
            task_rank = config.task_rank if any(name.startswith(b + ".") for b in with_task) else 0
            wrapper = MTLoRALinear(layer, slices or [(0, layer.out_features)], config.rank, task_rank,
                                   config.shared_scale, config.task_scale, config.dropout)  # fmt: skip
            replace_module(model, name, wrapper)

    def task_shared_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters every task's copy shares (the task-agnostic update), by name in ``model``."""
        out = {}
        for mname, module in model.named_modules():
            if isinstance(module, MTLoRALinear):
                for pname, p in module.named_parameters():
                    if pname.startswith("shared_"):
                        out[f"{mname}.{pname}"] = p
        return out
