"""Semantic segmentation data: ADE20K, PASCAL VOC 2012, a folder of image + mask PNGs, the mini dense suite.

Data specs:
- ``ade20k:<dir>``: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``;
  150 classes, 0 = "other" (ignored), labels 1..150 become 0..149 (mmseg's ``reduce_zero_label``).
- ``vocseg:<dir>``: VOC 2012 (``VOCdevkit/VOC2012`` or the folder itself): ``JPEGImages``, ``SegmentationClass``
  (palette PNGs whose indices are the classes), ``ImageSets/Segmentation/{train,val}.txt``; 21 classes
  (background + 20), 255 = ignored (object borders).
- ``masks:<dir>``: ``images/<split>/*.{jpg,png}``, ``masks/<split>/<same stem>.png`` (single-channel class
  indices, 255 = ignored) for splits train, val and optionally test, and ``classes.txt`` (one name per line).

Protocol splits (as for classification, nothing is chosen on the reported split): where the data has a
test split, ``tune`` trains on train and scores val, ``final`` trains on train + val and scores test.
ADE20K and VOC publish no test labels and report on their validation set: there, ``test`` is the
official validation set, ``trainval`` the official training set, and ``train`` / ``val`` split the
official training set 9:1 (every tenth image, in name order, is ``val``) for tuning.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F
from torch.utils.data import Dataset

from vpeft.data.datasets import DataError
from vpeft.data.mini_dense import mini_dense_root

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: ADE20K's SceneParsing classes (150)
ADE20K_CLASSES = 150
VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()

Pair = tuple[str, str]


@dataclass
class SegTask:
    """A segmentation task: splits of (image path, mask path)."""

    name: str
    kind: str
    root: str
    num_classes: int
    splits: dict[str, list[Pair]]
    class_names: list[str] = field(default_factory=list)
    #: mask value 0 means "ignore" and every other value v is class v - 1 (ADE20K)
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    #: inference mode and augmentation where the run's options say "auto"
    default_inference: str = "whole"
    default_augment: bool = False
    group: str = "segmentation"
    read_image: Callable[[str], np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]
    read_mask: Callable[[str], np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.read_image = self.read_image or read_image
        self.read_mask = self.read_mask or read_mask

    def split(self, name: str) -> list[Pair]:
        if name not in self.splits:
            raise DataError(f"task '{self.name}' has no '{name}' split; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def labels(self, mask: np.ndarray, where: str) -> np.ndarray:
        """A mask's values -> class indices 0..num_classes-1 or ignore_index; out-of-range values raise."""
        if self.reduce_zero_label:
            mask = mask.astype(np.int64) - 1
            mask[mask < 0] = self.ignore_index
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = sorted({int(v) for v in np.unique(mask[bad])})[:8]
            shift = " after subtracting 1 (0 = ignore)" if self.reduce_zero_label else ""
            raise DataError(
                f"mask '{where}' has values {values}{shift} outside the {self.num_classes} classes of task "
                f"'{self.name}' (valid: 0..{self.num_classes - 1}, {self.ignore_index} = ignore); fix the mask, or "
                "list every class (classes.txt for a masks: folder, --num-classes otherwise)"
            )
        return mask


def read_image(path: str) -> np.ndarray:
    """An image as an RGB uint8 array (H, W, 3)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image '{path}' cannot be decoded ({exc}); fix or remove it and its mask") from None


def read_mask(path: str) -> np.ndarray:
    """A mask PNG as its class indices (H, W): grayscale values, or a palette image's indices (VOC)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I;16", "I"):
                raise DataError(
                    f"mask '{path}' is a {img.mode} image; a mask is a single-channel PNG of class indices "
                    "(grayscale or palette), not a colour rendering"
                )
            return np.asarray(img).astype(np.int64)
    except FileNotFoundError:
        raise DataError(f"mask '{path}' does not exist; every image needs a mask of the same name") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"mask '{path}' cannot be decoded ({exc}); fix or remove it and its image") from None


def _carve(pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(train, val): every tenth pair in name order is val."""
    ordered = sorted(pairs)
    return [p for i, p in enumerate(ordered) if i % 10 != 9], [p for i, p in enumerate(ordered) if i % 10 == 9]


def _official(train: list[Pair], val: list[Pair]) -> dict[str, list[Pair]]:
    """Protocol splits of a dataset that reports on its validation set (see the module's docstring)."""
    tune_train, tune_val = _carve(train)
    return {"train": tune_train, "val": tune_val, "trainval": sorted(train), "test": sorted(val)}


def _check_pairs(pairs: list[Pair], where: str) -> None:
    missing = [p for pair in pairs for p in pair if not Path(p).is_file()]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; every image needs its mask "
            "(same name, .png) and every listed name its image"
        )


def _paired(images_dir: Path, masks_dir: Path, where: str) -> list[Pair]:
    if not images_dir.is_dir():
        raise DataError(f"{where}: no folder '{images_dir}'")
    if not masks_dir.is_dir():
        raise DataError(f"{where}: no folder '{masks_dir}' (masks, one .png per image)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{where}: no images (.jpg, .png) in '{images_dir}'")
    pairs = [(str(p), str(masks_dir / (p.stem + ".png"))) for p in images]
    _check_pairs(pairs, where)
    stems = {p.stem for p in images}
    orphans = sorted(p.name for p in masks_dir.iterdir() if p.suffix.lower() == ".png" and p.stem not in stems)
    if orphans:
        raise DataError(f"{where}: masks without an image: {orphans[:3]}; remove them or add their images")
    return pairs


def load_ade20k(path: str, num_classes: int | None = None) -> SegTask:
    root = Path(path)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    where = f"ade20k:{path}"
    train = _paired(root / "images" / "training", root / "annotations" / "training", where)
    val = _paired(root / "images" / "validation", root / "annotations" / "validation", where)
    classes = num_classes or ADE20K_CLASSES
    return SegTask("ade20k", "ade20k", str(root), classes, _official(train, val), reduce_zero_label=True,
                   default_inference="slide", default_augment=True)  # fmt: skip


def load_vocseg(path: str, num_classes: int | None = None) -> SegTask:
    root = Path(path)
    for sub in ("VOCdevkit/VOC2012", "VOC2012"):
        if (root / sub / "JPEGImages").is_dir():
            root = root / sub
    where = f"vocseg:{path}"
    splits = {}
    for name in ("train", "val"):
        listing = root / "ImageSets" / "Segmentation" / f"{name}.txt"
        if not listing.is_file():
            raise DataError(f"{where}: no split file '{listing}' (VOC 2012 lists its segmentation images there)")
        stems = [s.strip() for s in listing.read_text().split() if s.strip()]
        if not stems:
            raise DataError(f"{where}: '{listing}' lists no images")
        pairs = [(str(root / "JPEGImages" / f"{s}.jpg"), str(root / "SegmentationClass" / f"{s}.png")) for s in stems]
        _check_pairs(pairs, where)
        splits[name] = pairs
    classes = num_classes or len(VOC_CLASSES)
    names = VOC_CLASSES if classes == len(VOC_CLASSES) else []
    return SegTask("voc2012", "vocseg", str(root), classes, _official(splits["train"], splits["val"]),
                   class_names=list(names), default_inference="slide", default_augment=True)  # fmt: skip


def load_mask_folder(path: str, num_classes: int | None = None, *, kind: str = "masks") -> SegTask:
    root = Path(path)
    where = f"{kind}:{path}"
    listing = root / "classes.txt"
    if not listing.is_file():
        raise DataError(f"{where}: no classes.txt (one class name per line, in label order, background first)")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DataError(f"{where}: classes.txt lists {len(names)} class(es); a segmentation task needs at least 2")
    if num_classes is not None and num_classes != len(names):
        raise DataError(f"{where}: classes.txt lists {len(names)} classes, but {num_classes} were asked for")
    found = {s: _paired(root / "images" / s, root / "masks" / s, where) for s in ("train", "val", "test")
             if (root / "images" / s).is_dir()}  # fmt: skip
    for s in ("train", "val"):
        if s not in found:
            raise DataError(f"{where}: no '{s}' split (images/{s}/ and masks/{s}/)")
    if "test" in found:
        splits = {**found, "trainval": found["train"] + found["val"]}
    else:
        splits = _official(found["train"], found["val"])
    return SegTask(root.name, kind, str(root), len(names), splits, class_names=names)


LOADERS: dict[str, Callable[..., SegTask]] = {"ade20k": load_ade20k, "vocseg": load_vocseg, "masks": load_mask_folder}


def load_mini_dense_segmentation(task: str, num_classes: int | None = None) -> SegTask:
    """``mini-dense:segmentation``: the mini dense suite's class maps (6 classes with background)."""
    if task != "segmentation":
        raise DataError(
            f"'mini-dense:{task}' is not a segmentation task; the mini dense suite has: "
            "mini-dense:segmentation (task type segmentation), mini-dense:detection (task type detection)"
        )
    seg = load_mask_folder(str(mini_dense_root()), num_classes, kind="mini-dense")
    seg.name = "mini-seg"
    return seg


def load_seg_task(spec: str, num_classes: int | None = None) -> SegTask:
    """A segmentation data spec ``kind:path`` -> its task."""
    kind, sep, path = spec.partition(":")
    if kind == "mini-dense":
        return load_mini_dense_segmentation(path, num_classes)
    if not sep or not path or kind not in LOADERS:
        raise DataError(
            f"segmentation data spec '{spec}' should be kind:path with kind one of "
            f"{', '.join([*LOADERS, 'mini-dense'])} (e.g. ade20k:/data/ADEChallengeData2016, mini-dense:segmentation)"
        )
    if not Path(path).is_dir():
        raise DataError(f"'{spec}': folder '{path}' does not exist")
    return LOADERS[kind](path, num_classes)


# ---------------------------------------------------------------- datasets


@dataclass
class SegTransform:
    """Geometry of training samples: plain resize to the crop, or mmseg's ADE20K pipeline (random rescale of
    the (4 * crop, crop) scale by 0.5-2.0, random crop, horizontal flip; padding is ignored in the loss)."""

    crop: tuple[int, int]
    augment: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ratio_range: tuple[float, float] = (0.5, 2.0)


def _to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1), torch.from_numpy(label.astype(np.int64))


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (3, H, W) image (bilinear) and (H, W) label (nearest) resized to ``size``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    img = F.interpolate(image[None].float(), size, mode="bilinear", align_corners=False, antialias=True)[0]
    lab = F.interpolate(label[None, None].float(), size, mode="nearest")[0, 0].long()
    return img.round().clamp(0, 255).to(torch.uint8), lab


def rescale_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: fit (long, short) = scale, times ``ratio``."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width)) * ratio
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def train_sample(image: torch.Tensor, label: torch.Tensor, t: SegTransform,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One training sample: geometry per ``t``, then padding to the crop (label padding = ignore)."""
    ch, cw = t.crop
    if not t.augment:
        return resize_pair(image, label, t.crop)
    ratio = rng.uniform(*t.ratio_range)
    size = rescale_size(image.shape[-2], image.shape[-1], (4 * max(ch, cw), min(ch, cw)), ratio)
    image, label = resize_pair(image, label, size)
    h, w = size
    top, left = rng.randint(0, max(0, h - ch)), rng.randint(0, max(0, w - cw))
    image, label = image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    ph, pw = ch - image.shape[-2], cw - image.shape[-1]
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, label


class SegmentationDataset(Dataset):
    """(image uint8 (3, H, W), label int64 (H, W)) pairs of a split. Training items are cropped per the
    transform; evaluation items keep the image's own size (inference resizes and scores at full size)."""

    def __init__(self, task: SegTask, split: str, transform: SegTransform, *, train: bool, cache: bool = False):
        self.task, self.pairs, self.transform, self.train = task, task.split(split), transform, train
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self.rng = random.Random()

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded, checked pair (image and mask must have the same size; mask values in range)."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image_path, mask_path = self.pairs[index]
        image = self.task.read_image(image_path)
        mask = self.task.read_mask(mask_path)
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(
                f"mask '{mask_path}' is {mask.shape[1]}x{mask.shape[0]} px but its image '{image_path}' is "
                f"{image.shape[1]}x{image.shape[0]} px; a mask must label every pixel of its image"
            )
        pair = _to_tensors(image, self.task.labels(mask, mask_path))
        if self.cache is not None:
            self.cache[index] = pair
        return pair

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.train:
            # a per-sample generator drawn from torch's seeded RNG: augmentation follows the run's seed
            self.rng.seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            return train_sample(image, label, self.transform, self.rng)
        return image, label


def collate_segmentation(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, object]:
    """Stack same-sized items into (B, 3, H, W) uint8 and (B, H, W); keep lists where sizes differ."""
    images, labels = [i for i, _ in items], [label for _, label in items]
    if all(i.shape == images[0].shape for i in images):
        return {"image": torch.stack(images), "label": torch.stack(labels)}
    return {"image": images, "label": labels}


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of crop windows covering an image (mmseg's slide inference grid)."""
    ch, cw = crop
    sh, sw = stride
    rows = max(math.ceil((height - ch) / sh), 0) + 1
    cols = max(math.ceil((width - cw) / sw), 0) + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y, x = min(r * sh, max(height - ch, 0)), min(c * sw, max(width - cw, 0))
            out.append((y, x))
    return out
