"""Generate small image-classification tasks on disk in VTAB-1k's and FGVC's layouts.

Each class has its own colour and stripe orientation plus noise, so a linear head on random
features learns it: tests can check that training beats chance without pretrained weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40), (180, 60, 200), (40, 200, 200)]


def make_image(label: int, rng: np.random.Generator, size: int = 24, gray: bool = False) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if label % 2 else yy) * (0.6 + 0.3 * label)) > 0
    img = np.zeros((size, size, 3), dtype=np.float64)
    img[:] = COLOURS[label % len(COLOURS)]
    img *= np.where(stripes, 1.0, 0.5)[..., None]
    img += rng.normal(0, 25, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    return pil.convert("L") if gray else pil


def _write(root: Path, rel: str, label: int, rng: np.random.Generator, gray: bool = False) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(label, rng, gray=gray).save(path)


def make_vtab_task(
    root: Path, num_classes: int = 4, n_train: int = 48, n_val: int = 16, n_test: int = 40, seed: int = 0
) -> Path:
    """A task folder with train800.txt, val200.txt, train800val200.txt, test.txt (scaled down)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            label = i % num_classes
            rel = f"images/{split}/{i:04d}.png"
            _write(root, rel, label, rng, gray=(i % 7 == 0))
            lines[split].append(f"{rel} {label}")
    (root / "train800.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "val200.txt").write_text("\n".join(lines["val"]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines["train"] + lines["val"]) + "\n")
    (root / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


def make_fgvc_task(root: Path, num_classes: int = 3, n: tuple[int, int, int] = (30, 9, 21), seed: int = 1) -> Path:
    """VPT's layout: images under root/images, train.json / val.json / test.json map path -> label."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), n, strict=True):
        mapping = {}
        for i in range(count):
            label = i % num_classes
            rel = f"{label:03d}.class/{split}_{i:04d}.jpg"
            _write(root / "images", rel, label, rng)
            mapping[rel] = label
        (root / f"{split}.json").write_text(json.dumps(mapping))
    return root
