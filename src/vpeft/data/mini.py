"""The embedded mini suite (``mini:<task>``), read from the arrays shipped in ``vpeft.assets``.

Made by ``scripts/build_mini_suite.py`` and committed; using it needs no network.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from vpeft.data.datasets import DataError, Task, register_loader

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
GROUPS = ("natural", "specialized", "structured")


def _asset(name: str):
    return resources.files("vpeft.assets").joinpath(name)


@lru_cache(maxsize=1)
def suite_arrays() -> dict[str, np.ndarray]:
    """The mini suite's arrays: ``<task>/images``, ``<task>/labels``, ``<task>/split`` (codes of SPLIT_CODES)."""
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
    arrays = suite_arrays()
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
