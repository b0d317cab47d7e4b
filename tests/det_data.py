"""Synthetic detection folders for tests: COCO and VOC layouts with exact boxes and masks.

Each image is grey noise with 1-2 objects: class 1 a red square, class 2 a green disk. Squares carry
polygon segmentations, disks RLE ones, so both COCO mask encodings are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [(1, "square"), (2, "disk")]
COLORS = {1: (230, 40, 40), 2: (40, 220, 60)}


def _objects(rng: np.random.Generator, size: int) -> list[tuple[int, int, int, int]]:
    """(class, x, y, side) of 1-2 non-overlapping objects."""
    out = []
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(20):
            side = int(rng.integers(size // 4, size // 2))
            x, y = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            if all(x + side <= ox or ox + os <= x or y + side <= oy or oy + os <= y for _, ox, oy, os in out):
                out.append((int(rng.integers(1, 3)), x, y, side))
                break
    return out


def _mask(cls: int, x: int, y: int, side: int, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    if cls == 1:
        m[y : y + side, x : x + side] = 1
    else:
        yy, xx = np.mgrid[:size, :size]
        r = side / 2
        m[((xx + 0.5 - x - r) ** 2 + (yy + 0.5 - y - r) ** 2) <= r * r] = 1
    return m


def _image(rng: np.random.Generator, objs, size: int) -> tuple[Image.Image, list[np.ndarray]]:
    pixels = rng.integers(90, 150, (size, size, 3)).astype(np.uint8)
    masks = []
    for cls, x, y, side in objs:
        m = _mask(cls, x, y, side, size)
        pixels[m > 0] = COLORS[cls]
        masks.append(m)
    return Image.fromarray(pixels), masks


def _bbox(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def make_coco(
    root: Path, n_train: int = 6, n_val: int = 3, size: int = 48, seed: int = 0, split_dir: str = "{}", n_test: int = 0
) -> Path:
    """annotations/instances_{train,val}.json and images in ``split_dir.format(split)``."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if not n:
            continue
        folder = root / split_dir.format(split)
        folder.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            objs = _objects(rng, size)
            img, masks = _image(rng, objs, size)
            name = f"{split}_{i:03d}.png"
            img.save(folder / name)
            images.append({"id": 100 + i, "file_name": name, "width": size, "height": size})
            for (cls, x, y, side), m in zip(objs, masks, strict=True):
                if cls == 1:
                    seg = [[x, y, x + side, y, x + side, y + side, x, y + side]]
                else:
                    rle = mask_utils.encode(np.asfortranarray(m))
                    seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                box = _bbox(m)
                anns.append(
                    {"id": len(anns) + 1, "image_id": 100 + i, "category_id": cls * 10, "bbox": box,
                     "area": float(m.sum()), "iscrowd": 0, "segmentation": seg}
                )  # fmt: skip
        cats = [{"id": cid * 10, "name": name} for cid, name in CLASSES]
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def make_voc(
    root: Path, n_train: int = 4, n_val: int = 2, size: int = 40, seed: int = 0, difficult: bool = True, n_test: int = 0
) -> Path:
    """Annotations/*.xml (1-based inclusive boxes), ImageSets/Main/{train,val}.txt, JPEGImages/*.jpg."""
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if not n:
            continue
        ids = []
        for _ in range(n):
            image_id = f"2007_{k:06d}"
            k += 1
            objs = _objects(rng, size)
            img, masks = _image(rng, objs, size)
            img.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            lines = [f"<annotation><filename>{image_id}.jpg</filename>"]
            lines.append(f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>")
            for j, ((cls, *_), m) in enumerate(zip(objs, masks, strict=True)):
                x, y, w, h = _bbox(m)
                diff = int(difficult and j == 1)
                lines.append(
                    f"<object><name>{CLASSES[cls - 1][1]}</name><difficult>{diff}</difficult><bndbox>"
                    f"<xmin>{int(x) + 1}</xmin><ymin>{int(y) + 1}</ymin><xmax>{int(x + w)}</xmax><ymax>{int(y + h)}</ymax>"
                    "</bndbox></object>"
                )
            lines.append("</annotation>")
            (root / "Annotations" / f"{image_id}.xml").write_text("\n".join(lines))
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
