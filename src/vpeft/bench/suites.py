"""Benchmark suites: which tasks, in which groups, found where; and the suite's default protocol."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vpeft.data.datasets import DataError
from vpeft.data.mini import suite_sheet
from vpeft.errors import ConfigError
from vpeft.tasks import DEFAULT_TASK_TYPE, task_type_names

#: VTAB-1k's 19 tasks by NOAH's folder names, in the three groups
VTAB1K_GROUPS = {
    "natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"],
}  # fmt: skip
#: FGVC's 5 datasets by VPT's folder names
FGVC_TASKS = ["CUB_200_2011", "nabirds", "OxfordFlower", "Stanford-dogs", "Stanford-cars"]
SUITES = ("mini", "vtab1k", "fgvc", "mini-dense", "ade20k")
#: suites whose YAML lists its tasks (each with a task type); "{root}" in a data spec is the --root folder
LISTED_SUITES = ("mini-dense", "ade20k")


@dataclass
class SuiteTask:
    name: str
    group: str
    data: str  # dataset spec for load_task
    task_type: str = DEFAULT_TASK_TYPE


@dataclass
class Suite:
    name: str
    tasks: list[SuiteTask]
    defaults: dict[str, Any]

    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.tasks:
            out.setdefault(t.group, []).append(t.name)
        return out


def suite_defaults(name: str) -> dict[str, Any]:
    """The suite's shipped YAML: model, methods, training recipe, per-method and per-task overrides."""
    if name not in SUITES:
        raise ConfigError(f"unknown suite '{name}'; use one of {', '.join(SUITES)}")
    text = resources.files("vpeft.bench").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def load_suite(name: str, root: str | None = None, tasks: list[str] | None = None) -> Suite:
    """Resolve a suite's tasks; for on-disk suites check that every task folder exists under ``root``."""
    defaults = suite_defaults(name)
    if name in LISTED_SUITES:
        return _listed_suite(name, defaults, root, tasks)
    if name == "mini":
        sheet = suite_sheet()["tasks"]
        all_tasks = [SuiteTask(t, info["group"], f"mini:{t}") for t, info in sheet.items()]
    else:
        if not root:
            raise ConfigError(f"suite '{name}' reads its data from disk: pass --root <folder holding its tasks>")
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"--root '{root}' does not exist")
        if name == "vtab1k":
            all_tasks = [SuiteTask(t, g, f"vtab1k:{base / t}") for g, ts in VTAB1K_GROUPS.items() for t in ts]
        else:
            all_tasks = [SuiteTask(t, "fgvc", f"fgvc:{base / t}") for t in FGVC_TASKS]
    known = [t.name for t in all_tasks]
    if tasks:
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown} in suite '{name}'; its tasks: {', '.join(known)}")
        all_tasks = [t for t in all_tasks if t.name in tasks]
    if name != "mini":
        missing = [t.name for t in all_tasks if not Path(t.data.partition(":")[2]).is_dir()]
        if missing:
            raise DataError(
                f"--root '{root}' lacks {len(missing)} of the suite's task folders: {', '.join(missing)}; "
                f"add them, or run a subset with --tasks"
            )
    return Suite(name, all_tasks, defaults)


def _listed_suite(name: str, defaults: dict[str, Any], root: str | None, tasks: list[str] | None) -> Suite:
    """A suite whose YAML lists its tasks; a task whose task type is not available (detection without its
    module) is left out."""
    available = task_type_names()
    listed = [t for t in defaults.get("tasks") or [] if t.get("task_type", DEFAULT_TASK_TYPE) in available]
    needs_root = any("{root}" in t["data"] for t in listed)
    if needs_root:
        if not root:
            raise ConfigError(f"suite '{name}' reads its data from disk: pass --root <folder holding its data>")
        if not Path(root).is_dir():
            raise DataError(f"--root '{root}' does not exist")
    all_tasks = [SuiteTask(t["name"], t.get("group", t["name"]), t["data"].replace("{root}", str(root)),
                           t.get("task_type", DEFAULT_TASK_TYPE)) for t in listed]  # fmt: skip
    known = [t.name for t in all_tasks]
    if tasks:
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown} in suite '{name}'; its tasks: {', '.join(known)}")
        all_tasks = [t for t in all_tasks if t.name in tasks]
    return Suite(name, all_tasks, defaults)
