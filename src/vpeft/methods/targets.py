"""Which layers a low-rank method adapts: target names by block role (``q``, ``v``, ``fc1`` ...) or ``re:`` patterns,
resolved to module names and, on a fused ``qkv``, output slices. Shared by LoRA, DoRA and MTLoRA."""

from __future__ import annotations

import re

from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import backbone_modules, match_pattern


def default_targets(anatomy: Anatomy) -> list[str]:
    if anatomy.parts & {"qkv_fused", "qkv_separate"}:
        return ["q", "v"]
    if all(b.fc1 is not None for b in anatomy.blocks):
        return ["fc1", "fc2"]
    blocks = "|".join(re.escape(b.name) for b in anatomy.blocks)
    return [f"re:({blocks})\\..*"]


def resolve_targets(model: nn.Module, anatomy: Anatomy, targets: list[str]) -> dict[str, list[tuple[int, int]] | None]:
    """Map module name -> output slices to adapt (None: the whole layer)."""
    found: dict[str, list[tuple[int, int]] | None] = {}
    for target in targets:
        if target.startswith("re:"):
            names = [
                n
                for n, m in backbone_modules(model, anatomy)
                if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
            ]
            matched = match_pattern(names, target[3:])
            if not matched:
                raise ConfigError(
                    f"lora: pattern '{target}' matches no Linear or Conv2d layer of {anatomy.architecture}"
                )
            for name in matched:
                found[name] = None
            continue
        hits = 0
        for block in anatomy.blocks:
            if target in ("q", "k", "v") and getattr(block, target) is None and block.qkv is not None:
                qkv = model.get_submodule(block.qkv)
                width = qkv.out_features // 3
                index = "qkv".index(target)
                slices = found.setdefault(block.qkv, [])
                if slices is None:
                    continue  # whole qkv already targeted
                slices.append((index * width, (index + 1) * width))
                hits += 1
                continue
            name = getattr(block, target)
            if name is not None:
                found[name] = None
                hits += 1
        if hits == 0:
            raise UnsupportedBackboneError(
                f"lora: target '{target}' names no layer of {anatomy.architecture} (a {anatomy.family} backbone); "
                "pick layers with 're:<regex>' instead"
            )
    for name, slices in found.items():
        if slices is not None:
            found[name] = sorted(set(slices))
    return found
