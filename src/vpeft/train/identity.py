"""A run's identity: everything that can change its result, hashed into a short key.

Two runs share a key only when backbone, weights, method (every option, defaults resolved), recipe,
data (task, split files' fingerprint), seed, mode and the record version all match. A sweep reuses a
finished run only when the keys match; otherwise the run is another run, in another folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vpeft.api import make_config
from vpeft.backbones.create import local_dir_weights
from vpeft.tasks import DEFAULT_TASK_TYPE, get_task_type

#: RunSpec fields that only choose how a run executes, never its numbers (each path is exact)
EXECUTION_ONLY = ("cache_images", "feature_cache", "feature_cache_gb")
#: RunSpec fields in a run's identity only when they are not the default (old records keep their keys)
NON_DEFAULT_ONLY = ("task_type", "task_options")
KEY_LENGTH = 10


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file, cached per (path, size, mtime) so a sweep hashes a large checkpoint once."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def data_fingerprint(task: Any, splits: tuple[str, ...]) -> str:
    """sha256 of the splits' (path relative to the task root, label) lists: what the split files say."""
    root = str(task.root)
    digest = hashlib.sha256()
    for name in splits:
        digest.update(f"[{name}]\n".encode())
        for path, label in task.split(name):
            rel = os.path.relpath(path, root) if os.path.isabs(path) and os.path.isabs(root) else path
            if isinstance(label, str) and os.path.isabs(label) and os.path.isabs(root):  # a mask file (dense tasks)
                label = os.path.relpath(label, root)
            digest.update(f"{rel}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def run_identity(spec: Any, task: Any, record_version: int) -> dict[str, Any]:
    """The fields that define a run's result, with options resolved to the method's full config.

    ``spec`` is a :class:`vpeft.train.run.RunSpec`; ``task`` the task its task type loaded."""
    splits = ("train", "val") if spec.mode == "tune" else ("trainval", "test")
    identity = {
        "record_version": record_version,
        "model": spec.model,
        "model_args": spec.model_args,
        "pretrained": spec.pretrained,
        "pretrained_file": spec.pretrained_file,
        "pretrained_file_sha256": file_sha256(spec.pretrained_file) if spec.pretrained_file else None,
        "local_dir_sha256": _local_dir_digest(spec.model),
        "method": spec.method,
        "options": make_config(spec.method, **spec.options).to_dict(),
        "mode": spec.mode,
        "data": spec.data,
        "task": task.name,
        "data_fingerprint": data_fingerprint(task, splits),
        "num_classes": spec.num_classes,
        "preset": spec.preset or ("fgvc" if task.kind == "fgvc" else "vtab"),
        "skip_bad_images": spec.skip_bad_images,
        "train": dataclasses.asdict(spec.train),
    }
    if spec.task_type != DEFAULT_TASK_TYPE:  # runs of the default task type keep the keys they always had
        identity["task_type"] = spec.task_type
        identity["task_options"] = get_task_type(spec.task_type).options(spec.task_options).to_dict()
    return json.loads(json.dumps(identity, sort_keys=True, default=str))  # plain JSON types, tuples as lists


def _local_dir_digest(model: str) -> str | None:
    """A ``local-dir:`` backbone's weights and config are part of the run: their sha256."""
    weights = local_dir_weights(model)
    if weights is None:
        return None
    config = weights.parent / "config.json"
    return f"{file_sha256(weights)}:{file_sha256(config) if config.is_file() else ''}"


def run_key(identity: dict[str, Any]) -> str:
    """A short stable hash of an identity (shown in folder names, progress lines and records)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ, with both values: ``train.lr: 0.001 -> 0.0001``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
