"""The mini dense suite: canvases of digits, animal silhouettes and geometric shapes with exact masks.

Made offline and deterministically from the arrays the package ships (``mini_suite.npz``: MNIST digits
and Animal-MNIST silhouettes); no download. Each canvas is 56 x 56 RGB with 1-3 non-overlapping objects
on a dark noisy background; an object is a digit, an animal silhouette, a square, a disk or a triangle,
15-28 px, in a random bright colour (the colour never tells the class). Masks are exact: a shape's
pixels are those whose centre lies inside it, a digit's or silhouette's those where the source glyph
is brighter than half its range.

The suite is written once to a cache folder (``$VPEFT_CACHE_DIR``, else ``~/.cache/vpeft``) as:

- ``classes.txt``, ``images/<split>/<i>.png``, ``masks/<split>/<i>.png``: semantic segmentation (0 = background),
  read by the ``masks`` loader (``mini-dense:segmentation``);
- ``annotations/instances_<split>.json``: the same canvases as COCO instances (category ids 1-5, boxes
  ``[x, y, w, h]`` tight around the mask, masks as uncompressed RLE), for detection (``mini-dense:detection``).

Splits train / val / test draw their glyphs from the mini suite's train / val / test images, so no
glyph of a test canvas was seen in training. See ``DENSE_DATASHEET.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpeft.data.mini import SPLIT_CODES, suite_arrays

VERSION = 1
SEED = 20261126
CANVAS = 56
SIZES = {"train": 400, "val": 100, "test": 200}
CLASSES = ("background", "digit", "animal", "square", "disk", "triangle")
#: glyph sources of the glyph classes (mini suite task names)
GLYPHS = {"digit": "mnist", "animal": "animals"}
TASKS = ("segmentation", "detection")


def cache_root() -> Path:
    return Path(os.environ.get("VPEFT_CACHE_DIR") or Path.home() / ".cache" / "vpeft")


def _shape_mask(kind: str, size: int) -> np.ndarray:
    """Exact mask of a shape in a size x size box: pixel centres inside it."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    if kind == "square":
        return np.ones((size, size), bool)
    if kind == "disk":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    # triangle: apex at top centre, base along the bottom
    return (y >= 2 * np.abs(x - 0.5)) & (y <= 1.0)


def _glyph_mask(glyph: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(glyph).resize((size, size), Image.BILINEAR)
    return np.asarray(img) > 127


def _canvas(rng: np.random.Generator, glyphs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One canvas: RGB image, class map and its instances (class index, mask)."""
    base = rng.integers(0, 60)
    image = np.clip(base + rng.normal(0, 10, (CANVAS, CANVAS, 3)), 0, 255)
    label = np.zeros((CANVAS, CANVAS), np.uint8)
    instances: list[dict] = []
    occupied = np.zeros((CANVAS, CANVAS), bool)
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            cls = int(rng.integers(1, len(CLASSES)))
            size = int(rng.integers(15, 29))
            y, x = (int(v) for v in rng.integers(0, CANVAS - size + 1, 2))
            name = CLASSES[cls]
            if name in GLYPHS:
                pool = glyphs[name]
                mask = _glyph_mask(pool[int(rng.integers(0, len(pool)))], size)
            else:
                mask = _shape_mask(name, size)
            region = occupied[y : y + size, x : x + size]
            grown = np.zeros_like(occupied)
            grown[max(0, y - 1) : y + size + 1, max(0, x - 1) : x + size + 1] = True
            if (grown & occupied).any() or not mask.any():
                continue  # objects never touch: every instance mask is exactly its visible pixels
            full = np.zeros((CANVAS, CANVAS), bool)
            full[y : y + size, x : x + size] = mask
            colour = rng.integers(120, 256, 3)
            image[full] = colour
            label[full] = cls
            region |= mask
            instances.append({"class": cls, "mask": full})
            break
    return image.astype(np.uint8), label, instances


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major flattened mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def generate(root: Path) -> None:
    """Write the suite into ``root`` (which must not exist)."""
    arrays = suite_arrays()
    rng = np.random.default_rng(SEED)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES) if i > 0]
    for split, count in SIZES.items():
        code = SPLIT_CODES[split]
        glyphs = {cls: arrays[f"{task}/images"][arrays[f"{task}/split"] == code] for cls, task in GLYPHS.items()}
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            image, label, instances = _canvas(rng, glyphs)
            name = f"{i:04d}.png"
            Image.fromarray(image).save(root / "images" / split / name)
            Image.fromarray(label, mode="L").save(root / "masks" / split / name)
            images.append({"id": i + 1, "file_name": name, "height": CANVAS, "width": CANVAS})
            for inst in instances:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": inst["class"],
                    "bbox": _box(inst["mask"]), "area": float(inst["mask"].sum()), "iscrowd": 0,
                    "segmentation": _rle(inst["mask"]),
                })  # fmt: skip
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"info": {"description": f"vpeft mini-dense v{VERSION}, {split}"}, "images": images,
                "annotations": annotations, "categories": categories}  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    manifest = {"version": VERSION, "seed": SEED, "canvas": CANVAS, "sizes": SIZES, "classes": list(CLASSES)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def mini_dense_root() -> Path:
    """The folder holding the generated suite, made on first use (atomically: concurrent callers are safe)."""
    root = cache_root() / f"mini-dense-v{VERSION}"
    if (root / "manifest.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        generate(tmp / "suite")
        try:
            os.rename(tmp / "suite", root)
        except OSError:  # another process finished first
            if not (root / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
