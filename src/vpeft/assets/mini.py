"""The embedded default: the mini suite (``mini:<task>``) and the mini ViT (``vpeft/vit-mini``).

Both are made by scripts under ``scripts/`` and committed; using them needs no network.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from vpeft.backbones import register_embedded
from vpeft.data.datasets import DataError, Task, register_loader

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
GROUPS = ("natural", "specialized", "structured")


def _asset(name: str):
    return resources.files("vpeft.assets").joinpath(name)


@lru_cache(maxsize=1)
def _suite_arrays() -> dict[str, np.ndarray]:
    with _asset("mini_suite.npz").open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@lru_cache(maxsize=1)
def suite_sheet() -> dict[str, Any]:
    """The mini suite's datasheet: tasks with group, classes, sizes, source and licence."""
    return json.loads(_asset("mini_suite.json").read_text())


def mini_task_names() -> list[str]:
    return list(suite_sheet()["tasks"])


def load_mini_task(name: str) -> Task:
    """A task of the mini suite, read from the package's compressed arrays."""
    sheet = suite_sheet()["tasks"]
    if name not in sheet:
        raise DataError(f"unknown mini task '{name}'; the mini suite has: {', '.join(sheet)}")
    arrays = _suite_arrays()
    images, labels, codes = arrays[f"{name}/images"], arrays[f"{name}/labels"], arrays[f"{name}/split"]
    splits = {
        s: [(f"mini:{name}/{i}", int(labels[i])) for i in np.flatnonzero(codes == c)] for s, c in SPLIT_CODES.items()
    }
    splits["trainval"] = splits["train"] + splits["val"]

    def read(path: str) -> Image.Image:
        index = int(path.rpartition("/")[2])
        return Image.fromarray(images[index], mode="L").convert("RGB")

    info = sheet[name]
    return Task(name, "mini", name, info["num_classes"], splits, read=read, group=info["group"])


register_loader("mini", load_mini_task)


# ---------------------------------------------------------------- the mini ViT


@lru_cache(maxsize=1)
def vit_mini_card() -> dict[str, Any]:
    """Recipe, pre-training accuracy and transfer report of the mini ViT."""
    return json.loads(_asset("vit_mini.json").read_text())


def create_vit_mini(num_classes: int, pretrained: bool = True, drop_path_rate: float = 0.0, **kwargs: Any):
    """The mini ViT (patch 4, width 192, depth 6, 28 px), pre-trained on Fashion-MNIST by vpeft."""
    import timm
    from safetensors.torch import load

    card = vit_mini_card()
    arch = {**card["recipe"]["architecture"], **kwargs}
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, **arch
    )
    mean, std = card["recipe"]["mean"], card["recipe"]["std"]
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "architecture": "vpeft/vit-mini",
        "tag": "fmnist" if pretrained else "",
        "input_size": (3, arch["img_size"], arch["img_size"]),
        "mean": (mean,) * 3,
        "std": (std,) * 3,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "num_classes": num_classes,
    }
    if pretrained:
        state = load(_asset("vit_mini.safetensors").read_bytes())
        result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or unexpected:
            raise RuntimeError(f"vit_mini.safetensors does not fit the mini ViT: {missing[:3]} {unexpected[:3]}")
    return model


register_embedded("vpeft/vit-mini", create_vit_mini)
