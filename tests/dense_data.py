"""Fixtures for the dense-prediction tests: tiny backbones with four stages, and dataset folders in the
ADE20K, PASCAL VOC and image + mask layouts, generated on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

IMG = 32

#: name -> (timm model name, kwargs), every one without a classifier (num_classes=0)
DENSE_BACKBONES: dict[str, tuple[str, dict]] = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=0),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=IMG, window_size=2, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), embed_dim=16, num_classes=0),
    ),
    "convnext": ("test_convnext", dict(num_classes=0)),
    "resnet": ("test_resnet", dict(num_classes=0)),
}


def make_dense_backbone(key: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = DENSE_BACKBONES[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _scene(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image whose colour tells each pixel's class, and its label map (0..num_classes-1)."""
    label = np.zeros((size, size), np.uint8)
    for _ in range(3):
        c = int(rng.integers(1, num_classes))
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(4, 9, 2)
        label[y : y + h, x : x + w] = c
    palette = rng.integers(0, 255, (num_classes, 3), dtype=np.uint8)
    image = palette[label]
    return image, label


def make_ade_layout(root: Path, n_train: int = 6, n_val: int = 3, size: int = 40, seed: int = 0) -> Path:
    """ADE20K layout: images/{training,validation}/*.jpg, annotations/{...}/*.png, 0 = ignore, 1..150 classes."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = _scene(rng, size, 6)
            label = np.where(label == 0, 1, label + 100)  # classes 1 and 101..105 of ADE's 150
            label[:2] = 0  # a strip of "other" (ignored)
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")
    return root


def make_voc_layout(root: Path, n_train: int = 6, n_val: int = 3, size: int = 40, seed: int = 0) -> Path:
    """VOC 2012 layout: JPEGImages, SegmentationClass (palette PNGs, 255 = ignore), ImageSets/Segmentation."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = {"train": [], "val": []}
    palette = [v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i * 53 % 256)]
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image, label = _scene(rng, size, 21)
            label[-1] = 255  # VOC's object borders are 255
            name = f"2007_{split}{i:04d}"
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg")
            mask = Image.fromarray(label, mode="P")
            mask.putpalette(palette)
            mask.save(root / "SegmentationClass" / f"{name}.png")
            names[split].append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names[split]) + "\n")
    return root


def make_mask_folder(root: Path, num_classes: int = 4, n: int = 4, size: int = 24, seed: int = 0) -> Path:
    """The generic layout: images/{train,val}/*.png, masks/{train,val}/*.png (same stem), classes.txt."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = _scene(rng, size, num_classes)
            Image.fromarray(image).save(root / "images" / split / f"s{i}.png")
            Image.fromarray(label).save(root / "masks" / split / f"s{i}.png")
    (root / "classes.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)))
    return root
