"""Image classification tasks on disk: VTAB-1k (NOAH's layout), FGVC (VPT's layout), ImageFolder trees.

A task is a :class:`Task`: a name, a class count and four splits of (image path, label) pairs.
``train``/``val`` serve the ``tune`` protocol, ``trainval``/``test`` the ``final`` one.
"""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vpeft.errors import VPeftError

SPLITS = ("train", "val", "trainval", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: class counts of the 19 VTAB-1k tasks, by NOAH's folder names (labels are checked against them)
VTAB_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip


class DataError(VPeftError, ValueError):
    """A dataset folder, split file, label or image is missing or wrong."""


class BadImageError(DataError):
    """An image file is missing or cannot be decoded."""


Sample = tuple[str, int]


@dataclass
class Task:
    """A classification task: splits of (absolute image path, label)."""

    name: str
    kind: str
    root: str
    num_classes: int
    splits: dict[str, list[Sample]]
    class_names: list[str] = field(default_factory=list)
    #: how to open a sample's image; in-memory tasks (the mini suite) supply their own
    read: Callable[[str], Image.Image] = field(default=None, repr=False)  # type: ignore[assignment]
    group: str = ""

    def __post_init__(self) -> None:
        if self.read is None:
            self.read = decode_image

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DataError(f"task '{self.name}' has no '{name}' split; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def spec(self) -> str:
        return f"{self.kind}:{self.root}"


def _check_labels(task: str, split: str, samples: list[Sample], num_classes: int, where: str) -> None:
    for path, label in samples:
        if not 0 <= label < num_classes:
            raise DataError(
                f"{where}: label {label} of '{path}' is outside the {num_classes} classes of task '{task}' "
                f"(split '{split}'; the class count comes from the training splits); fix the split file, or pass "
                "--num-classes with the task's true class count"
            )


def _class_count(splits: dict[str, list[Sample]], where: str) -> int:
    """Classes = 1 + the largest label of the training splits; test labels never size the head."""
    labels = [label for name in ("train", "val", "trainval") for _, label in splits.get(name, [])]
    if not labels:
        raise DataError(f"the training splits of '{where}' are empty; check its split files")
    return 1 + max(labels)


def _read_list(path: Path, root: Path) -> list[Sample]:
    samples = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first path
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); save the split file as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        rel, _, label = line.rpartition(" ")
        try:
            samples.append((str(root / rel), int(label)))
        except ValueError:
            raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}") from None
    return samples


def load_vtab1k(root: str | Path, num_classes: int | None = None) -> Task:
    """A VTAB-1k task folder with train800.txt, val200.txt, train800val200.txt and test.txt."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VTAB-1k task folder '{root}' does not exist; pass vtab1k:<path to e.g. vtab-1k/cifar>")
    files = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
    missing = [f for f in files.values() if not (root / f).is_file()]
    if missing:
        raise DataError(f"VTAB-1k task folder '{root}' lacks {', '.join(missing)} (NOAH's layout has all four)")
    splits = {s: _read_list(root / f, root) for s, f in files.items()}
    if num_classes is None:
        num_classes = VTAB_CLASSES.get(root.name) or _class_count(splits, str(root))
    for s, samples in splits.items():
        _check_labels(root.name, s, samples, num_classes, str(root / files[s]))
    return Task(root.name, "vtab1k", str(root), num_classes, splits)


def load_fgvc(root: str | Path, num_classes: int | None = None) -> Task:
    """An FGVC dataset folder with VPT's train.json, val.json, test.json (image path -> label)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"FGVC dataset folder '{root}' does not exist; pass fgvc:<path to e.g. CUB_200_2011>")
    missing = [f"{s}.json" for s in ("train", "val", "test") if not (root / f"{s}.json").is_file()]
    if missing:
        raise DataError(f"FGVC dataset folder '{root}' lacks {', '.join(missing)} (VPT's layout)")
    raw = {}
    for s in ("train", "val", "test"):
        try:
            raw[s] = json.loads((root / f"{s}.json").read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{root / f'{s}.json'} is not valid JSON: {exc}") from exc
    image_dir = _fgvc_image_dir(root, next(iter(raw["train"]), ""))
    splits = {s: [(str(image_dir / k), int(v)) for k, v in sorted(d.items())] for s, d in raw.items()}
    splits["trainval"] = splits["train"] + splits["val"]
    if num_classes is None:
        num_classes = _class_count(splits, str(root))
    for s, samples in splits.items():
        _check_labels(root.name, s, samples, num_classes, str(root / f"{s}.json"))
    return Task(root.name, "fgvc", str(root), num_classes, {s: splits[s] for s in SPLITS})


def _fgvc_image_dir(root: Path, first: str) -> Path:
    """VPT's datasets keep images in root, root/images or root/Images, depending on the dataset."""
    for sub in ("", "images", "Images"):
        if (root / sub / first).exists():
            return root / sub
    return root


def load_folder(root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> Task:
    """An ImageFolder tree (one sub-folder per class), with a seeded split.

    With ``train/`` and ``test/`` (or ``val/``) sub-trees, those are the train+val and test
    splits; otherwise the whole tree is split into train, val and test by the given fractions.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist; pass folder:<path with one sub-folder per class>")
    rng = random.Random(seed)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None:
        classes = _classes(train_dir)
        trainval, test = _scan(train_dir, classes), _scan(test_dir, classes)
        rng.shuffle(trainval)
        n_val = max(1, round(len(trainval) * val_fraction))
        val, train = trainval[:n_val], trainval[n_val:]
    else:
        classes = _classes(root)
        everything = _scan(root, classes)
        rng.shuffle(everything)
        n_test = max(1, round(len(everything) * test_fraction))
        n_val = max(1, round(len(everything) * val_fraction))
        test, val, train = everything[:n_test], everything[n_test : n_test + n_val], everything[n_test + n_val :]
    splits = {"train": sorted(train), "val": sorted(val), "trainval": sorted(train + val), "test": sorted(test)}
    return Task(root.name, "folder", str(root), len(classes), splits, class_names=classes)


def _classes(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder '{root}' has no class sub-folders")
    return classes


def _scan(root: Path, classes: list[str]) -> list[Sample]:
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(path), label))
    return samples


#: dataset kinds accepted in a spec string, e.g. ``vtab1k:/data/vtab-1k/cifar``
LOADERS: dict[str, Callable[..., Task]] = {"vtab1k": load_vtab1k, "fgvc": load_fgvc, "folder": load_folder}


def load_task(spec: str, num_classes: int | None = None) -> Task:
    """Parse a dataset spec ``kind:path`` and load the task."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise DataError(f"dataset spec '{spec}' should be kind:path, with kind one of {', '.join(LOADERS)}")
    if kind in _EXTRA_LOADERS:
        return _EXTRA_LOADERS[kind](path)
    if kind not in LOADERS:
        raise DataError(
            f"unknown dataset kind '{kind}' in '{spec}'; use one of {', '.join([*LOADERS, *_EXTRA_LOADERS])}"
        )
    if kind == "folder":
        task = load_folder(path)
        if num_classes is not None and num_classes != task.num_classes:
            raise DataError(f"'{path}' has {task.num_classes} class folders, but {num_classes} classes were asked for")
        return task
    return LOADERS[kind](path, num_classes)


#: loaders registered by other modules (the embedded mini suite adds ``mini``)
_EXTRA_LOADERS: dict[str, Callable[[str], Task]] = {}


def register_loader(kind: str, loader: Callable[[str], Task]) -> None:
    _EXTRA_LOADERS[kind] = loader


def decode_image(path: str) -> Image.Image:
    """Open an image as 3-channel RGB (grayscale and palette images included), or raise BadImageError."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"image '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(
            f"image '{path}' cannot be decoded ({exc}); fix or remove it, or pass --skip-bad-images"
        ) from None


class DecodedImageStore:
    """Decoded and resized images kept for the whole process, least recently used dropped first.

    Runs of one sweep in one process (methods, seeds, the tune and final splits) decode each image
    once. Keyed by the reader, the path, the file's size and modification time (a changed file is
    read again) and the transform's description. The budget is ``VPEFT_IMAGE_CACHE_GB`` (default
    4 GB; 0 switches the store off, each dataset still caches its own images).
    """

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._images: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(read: Callable, path: str, transform: Callable | None) -> tuple:
        try:
            stat = os.stat(path)
            version: tuple | None = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            version = None  # not a file: an in-memory task's sample id
        return (getattr(read, "__module__", ""), getattr(read, "__qualname__", ""), path, version, repr(transform))

    def get(self, key: tuple) -> torch.Tensor | None:
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            self.hits += 1
        return image

    def put(self, key: tuple, image: torch.Tensor) -> None:
        size = image.numel() * image.element_size()
        if size > self.max_bytes or key in self._images:
            return
        self._images[key] = image
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._images.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


DECODED_IMAGES = DecodedImageStore(float(os.environ.get("VPEFT_IMAGE_CACHE_GB", "4")) * 1e9)


class ImageDataset(Dataset):
    """(image, label) pairs read from paths, with optional in-memory caching of decoded inputs.

    ``cache=True`` (for deterministic transforms only) keeps each transformed image as uint8 so it
    is decoded and resized once for every epoch, and through :data:`DECODED_IMAGES` once for every
    run of the process; ``normalize`` then turns it into a float tensor.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable | None,
        *,
        skip_bad_images: bool = False,
        cache: bool = False,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        read: Callable[[str], Image.Image] | None = None,
    ):
        self.transform = transform
        self.read = read or decode_image
        self.normalize = normalize
        self.skipped: list[str] = []
        self.samples = samples
        self._cache: list[torch.Tensor] | None = None
        if skip_bad_images:
            self.samples = self._drop_bad(samples)
        if cache:
            self._cache = [self._load_shared(path) for path, _ in self.samples]

    def _drop_bad(self, samples: list[Sample]) -> list[Sample]:
        kept = []
        for path, label in samples:
            try:
                self.read(path)
            except BadImageError:
                self.skipped.append(path)
                continue
            kept.append((path, label))
        return kept

    def _load(self, path: str) -> torch.Tensor:
        img = self.read(path)
        return self.transform(img) if self.transform is not None else img

    def _load_shared(self, path: str) -> torch.Tensor:
        key = DecodedImageStore.key(self.read, path, self.transform)
        image = DECODED_IMAGES.get(key)
        if image is None:
            image = self._load(path)
            if isinstance(image, torch.Tensor):
                DECODED_IMAGES.put(key, image)
        return image

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached inputs stacked (N, ...) with their labels, or None when they are not held in memory."""
        if self._cache is None or not self._cache:
            return None
        first = self._cache[0]
        if not isinstance(first, torch.Tensor) or any(x.shape != first.shape for x in self._cache):
            return None
        return torch.stack(self._cache), torch.tensor([label for _, label in self.samples], dtype=torch.long)

    @property
    def cached(self) -> bool:
        """Whether decoded inputs are held in memory (the transform is deterministic)."""
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        x = self._cache[index] if self._cache is not None else self._load(path)
        if self.normalize is not None:
            x = self.normalize(x)
        return x, label
