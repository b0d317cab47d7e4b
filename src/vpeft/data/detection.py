"""Object detection data on disk: COCO-format json and PASCAL VOC XML, checked when loaded.

A :class:`DetectionData` holds the categories and, per split, one :class:`DetectionRecord` per image
(boxes as ``x1, y1, x2, y2`` pixels, labels 1..K in the order of ``categories``, crowd / difficult
flags, COCO segmentations). :class:`DetectionDataset` serves ``(image, target)`` pairs in
torchvision's detection format, resized to a square and flipped for training; :func:`detection_collate`
batches them as lists.

Layouts:

- COCO: ``annotations/instances_{split}.json`` (or ``instances_{split}2017.json``) with images in
  ``{split}/``, ``{split}2017/``, ``images/{split}/``, ``images/`` or the root.
- VOC: ``Annotations/{id}.xml``, ``ImageSets/Main/{split}.txt``, ``JPEGImages/{id}.jpg``; "difficult"
  objects are left out of training and ignored by the evaluation (as crowd regions are).

Bad annotations raise :class:`DetectionDataError` naming the file, the object and the fix.
"""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vpeft.data.datasets import DataError, decode_image

#: the 20 PASCAL VOC classes in their usual order
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: how far (pixels) a box or polygon may stick out of its image before it is an error (it is clipped)
TOLERANCE = 1.0


class DetectionDataError(DataError):
    """A detection annotation file, object or image is missing or wrong."""


@dataclass
class DetectionRecord:
    """One image and its objects."""

    path: str
    width: int
    height: int
    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2 in pixels
    labels: np.ndarray  # N int64, 1..K
    iscrowd: np.ndarray  # N uint8: crowd regions and VOC "difficult" objects
    segmentations: list[Any] | None = None  # COCO polygons / RLE per object, None without masks
    image_id: int | str = 0


@dataclass
class DetectionData:
    """A detection task: categories ``(dataset id, name)`` (label i+1 is ``categories[i]``) and splits."""

    name: str
    kind: str
    root: str
    categories: list[tuple[int, str]]
    splits: dict[str, list[DetectionRecord]]
    has_masks: bool = False
    group: str = "detection"

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def records(self, name: str) -> list[DetectionRecord]:
        """The images of a split with their objects."""
        if name not in self.splits:
            raise DetectionDataError(f"task '{self.name}' has no '{name}' split; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def split(self, name: str) -> list[tuple[str, str]]:
        """(image path, its objects as text) per image: what a run's data fingerprint reads."""
        return [
            (r.path, f"{r.boxes.round(2).tolist()}{r.labels.tolist()}{r.iscrowd.tolist()}") for r in self.records(name)
        ]

    def spec(self) -> str:
        return "mini-dense:detection" if self.kind == "mini-dense" else f"{self.kind}:{self.root}"


# ---------------------------------------------------------------- the dataset


def _decode_masks(record: DetectionRecord) -> np.ndarray:
    from pycocotools import mask as mask_utils

    h, w = record.height, record.width
    out = np.zeros((len(record.segmentations or []), h, w), dtype=np.uint8)
    for i, seg in enumerate(record.segmentations or []):
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            out[i] = mask_utils.decode(rle)
    return out


class DetectionDataset(Dataset):
    """``(image, target)`` pairs: the image a 3 x S x S float tensor in [0, 1] (S = ``size``), the target a
    dict with ``boxes`` (N x 4, resized pixels), ``labels`` (N), ``iscrowd`` (N), ``masks`` (N x S x S uint8,
    when ``masks``) and ``image_id``.

    ``train`` drops crowd / difficult objects, which torchvision's detectors cannot ignore (evaluation keeps
    them flagged in ``iscrowd``), and with ``flip`` (default: on in training) flips half the images
    horizontally, boxes and masks with them.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        size: int | tuple[int, int],
        train: bool = False,
        masks: bool = False,
        read: Callable[[str], Image.Image] = decode_image,
        seed: int = 0,
        flip: bool | None = None,
    ):
        self.records = list(records)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.train, self.masks, self.read = train, masks, read
        self.flip = train if flip is None else flip
        if masks and any(r.segmentations is None for r in self.records):
            raise DetectionDataError("masks were asked for, but the annotations have no segmentations")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        image = self.read(record.path)
        if image.size != (record.width, record.height):
            raise DetectionDataError(
                f"image '{record.path}' is {image.size[0]}x{image.size[1]} px, its annotation says "
                f"{record.width}x{record.height}; fix the width/height in the annotation file"
            )
        out_h, out_w = self.size
        image = image.resize((out_w, out_h), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        scale = np.array([out_w / record.width, out_h / record.height] * 2, dtype=np.float32)
        boxes = torch.from_numpy(record.boxes.reshape(-1, 4) * scale)
        keep = torch.ones(len(boxes), dtype=torch.bool)
        if self.train:
            keep = torch.from_numpy(record.iscrowd == 0)
        target = {
            "boxes": boxes[keep],
            "labels": torch.from_numpy(record.labels.astype(np.int64))[keep],
            "iscrowd": torch.from_numpy(record.iscrowd.astype(np.int64))[keep],
            "image_id": torch.tensor(index),
        }
        if self.masks:
            masks = torch.from_numpy(_decode_masks(record))[keep]
            if len(masks):
                masks = torch.nn.functional.interpolate(masks[:, None].float(), size=(out_h, out_w), mode="nearest")
                masks = masks[:, 0].to(torch.uint8)
            else:
                masks = torch.zeros((0, out_h, out_w), dtype=torch.uint8)
            target["masks"] = masks
        if self.flip and torch.rand((), generator=self.generator) < 0.5:
            pixels = pixels.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([out_w - b[:, 2], b[:, 1], out_w - b[:, 0], b[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return pixels, target


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Batch detection samples as torchvision's detectors take them: a list of images, a list of targets."""
    return [image for image, _ in batch], [target for _, target in batch]


# ---------------------------------------------------------------- checks shared by both formats


def _check_box(box: Sequence[float], width: int, height: int, where: str) -> list[float]:
    """Clip a box within TOLERANCE of its image, or raise for a degenerate box or one outside it."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise DetectionDataError(f"{where}: box {list(box)} has a non-finite coordinate; fix the annotation")
    if x2 <= x1 or y2 <= y1:
        raise DetectionDataError(
            f"{where}: box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is degenerate (zero or negative "
            "width or height); fix or delete the annotation"
        )
    if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > width + TOLERANCE or y2 > height + TOLERANCE:
        raise DetectionDataError(
            f"{where}: box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} "
            "image; fix the box or the image's width/height"
        )
    return [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]


def _check_segmentation(seg: Any, width: int, height: int, where: str) -> None:
    if isinstance(seg, list):
        if not seg:
            raise DetectionDataError(f"{where}: segmentation is an empty polygon list; delete it or fix it")
        for poly in seg:
            coords = np.asarray(poly, dtype=np.float64)
            if coords.ndim != 1 or len(coords) < 6 or len(coords) % 2:
                raise DetectionDataError(
                    f"{where}: a segmentation polygon must be a flat list of at least 3 x, y pairs, got "
                    f"{len(coords)} numbers"
                )
            xs, ys = coords[0::2], coords[1::2]
            if (
                xs.min() < -TOLERANCE
                or ys.min() < -TOLERANCE
                or xs.max() > width + TOLERANCE
                or ys.max() > height + TOLERANCE
            ):
                raise DetectionDataError(
                    f"{where}: segmentation polygon spans x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}, "
                    f"outside the {width}x{height} image (mask out of range); fix the polygon or the image size"
                )
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise DetectionDataError(
                f"{where}: RLE mask size {list(seg['size'])} does not match the image's [height, width] = "
                f"[{height}, {width}] (mask out of range); encode the mask at the image's size"
            )
        if isinstance(seg["counts"], list) and sum(seg["counts"]) != height * width:
            raise DetectionDataError(
                f"{where}: uncompressed RLE counts sum to {sum(seg['counts'])}, not height x width = {height * width}"
            )
    else:
        raise DetectionDataError(f"{where}: segmentation must be a polygon list or an RLE dict with counts and size")


def _check_files(records: list[DetectionRecord], where: str) -> None:
    missing = [r.path for r in records if not Path(r.path).is_file()]
    if missing:
        raise DetectionDataError(
            f"{where}: {len(missing)} image file(s) do not exist, e.g. {missing[:3]}; put the images where the "
            "annotations say (file_name is relative to the split's image folder) or fix the annotations"
        )


# ---------------------------------------------------------------- COCO


def _coco_json(root: Path, split: str) -> Path | None:
    for name in (f"instances_{split}.json", f"instances_{split}2017.json"):
        path = root / "annotations" / name
        if path.is_file():
            return path
    return None


def _coco_image_dir(root: Path, split: str) -> Path:
    for sub in (split, f"{split}2017", f"images/{split}", "images"):
        if (root / sub).is_dir():
            return root / sub
    return root


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DetectionDataError(f"{path} is not valid JSON ({exc}); fix or regenerate the annotation file") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if not isinstance(data, dict) or missing:
        raise DetectionDataError(f"{path} lacks the COCO keys {missing}; it must hold images, annotations, categories")
    return data


def _coco_split(
    path: Path, data: dict[str, Any], image_dir: Path, label_of: dict[int, int], masks: bool
) -> list[DetectionRecord]:
    images: dict[Any, dict] = {}
    for img in data["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise DetectionDataError(f"{path}: image entry {img} lacks '{key}'")
        if img["id"] in images:
            raise DetectionDataError(
                f"{path}: image id {img['id']} appears twice in 'images'; image ids must be unique"
            )
        images[img["id"]] = img
    objects: dict[Any, list[dict]] = {k: [] for k in images}
    for ann in data["annotations"]:
        where = f"{path}: annotation {ann.get('id', '?')}"
        if ann.get("image_id") not in images:
            raise DetectionDataError(f"{where} refers to image_id {ann.get('image_id')}, which is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise DetectionDataError(
                f"{where} has category_id {ann.get('category_id')}, which is not among the categories "
                f"{sorted(label_of)}; add the category or fix the annotation (unknown category id)"
            )
        if not isinstance(ann.get("bbox"), (list, tuple)) or len(ann["bbox"]) != 4:
            raise DetectionDataError(f"{where}: bbox must be [x, y, width, height], got {ann.get('bbox')}")
        objects[ann["image_id"]].append(ann)
    records = []
    for image_id, img in images.items():
        w, h = int(img["width"]), int(img["height"])
        boxes, labels, crowd, segs = [], [], [], []
        for ann in objects[image_id]:
            where = f"{path}: annotation {ann.get('id', '?')} (image '{img['file_name']}')"
            x, y, bw, bh = ann["bbox"]
            boxes.append(_check_box([x, y, x + bw, y + bh], w, h, where))
            labels.append(label_of[ann["category_id"]])
            crowd.append(int(bool(ann.get("iscrowd", 0))))
            if masks:
                if not ann.get("segmentation"):
                    raise DetectionDataError(f"{where} has no segmentation, but masks were asked for")
                _check_segmentation(ann["segmentation"], w, h, where)
                segs.append(ann["segmentation"])
        records.append(
            DetectionRecord(
                path=str(image_dir / img["file_name"]),
                width=w,
                height=h,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels, dtype=np.int64),
                iscrowd=np.asarray(crowd, dtype=np.uint8),
                segmentations=segs if masks else None,
                image_id=image_id,
            )
        )
    _check_files(records, str(path))
    return records


def _protocol(found: dict[str, list[DetectionRecord]], where: str) -> dict[str, list[DetectionRecord]]:
    """The protocol splits, as for segmentation: with a test split, ``tune`` trains on train and scores val,
    ``final`` trains on trainval (train + val unless the folder has its own) and scores test. Without one
    (COCO, VOC 2012: results are reported on the official validation set), ``test`` is the official val,
    ``trainval`` the official train, and train / val split the official train 9:1 (every tenth image in
    file order is val)."""
    for split in ("train", "val"):
        if split not in found:
            raise DetectionDataError(f"{where}: no '{split}' split; a detection folder needs train and val annotations")
    if "test" in found:
        return {**found, "trainval": found.get("trainval") or found["train"] + found["val"]}
    ordered = sorted(found["train"], key=lambda r: r.path)
    tune_train = [r for i, r in enumerate(ordered) if i % 10 != 9]
    tune_val = [r for i, r in enumerate(ordered) if i % 10 == 9]
    return {"train": tune_train, "val": tune_val, "trainval": found["train"], "test": found["val"]}


SPLITS = ("train", "val", "trainval", "test")


def load_coco(root: str | Path, splits: Sequence[str] = SPLITS, masks: bool | None = None) -> DetectionData:
    """A COCO-layout folder (its train, val and optional test annotations, in the protocol splits of
    :func:`_protocol`); ``masks`` None loads segmentations when every annotation has one."""
    root = Path(root)
    paths = {split: _coco_json(root, split) for split in splits}
    if paths.get("train") is None:
        raise DetectionDataError(
            f"no annotations/instances_train.json (or instances_train2017.json) under '{root}'; "
            "a COCO-layout folder needs one per split"
        )
    data = {split: _load_json(path) for split, path in paths.items() if path is not None}
    categories = [(int(c["id"]), str(c.get("name", c["id"]))) for c in data["train"]["categories"]]
    if not categories:
        raise DetectionDataError(f"{paths['train']} lists no categories")
    label_of = {cid: i + 1 for i, (cid, _) in enumerate(categories)}
    if len(label_of) != len(categories):
        raise DetectionDataError(f"{paths['train']}: category ids repeat; each category needs its own id")
    if masks is None:  # load segmentations when every annotation has one
        anns = [a for d in data.values() for a in d["annotations"]]
        masks = bool(anns) and all(a.get("segmentation") for a in anns)
    out: dict[str, list[DetectionRecord]] = {}
    for split, split_data in data.items():
        path = paths[split]
        if [(int(c["id"]), str(c.get("name", c["id"]))) for c in split_data["categories"]] != categories:
            raise DetectionDataError(f"{path} lists other categories than {paths['train']}; use one category list")
        out[split] = _coco_split(path, split_data, _coco_image_dir(root, split), label_of, masks=masks)
    return DetectionData(root.name, "coco", str(root), categories, _protocol(out, str(root)), has_masks=masks)


# ---------------------------------------------------------------- PASCAL VOC


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DetectionDataError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    value = _text(node, tag, where)
    try:
        return float(value)
    except ValueError:
        raise DetectionDataError(f"{where}: <{tag}> is {value!r}, not a number") from None


def _voc_objects(xml_path: Path) -> tuple[ET.Element, list[ET.Element]]:
    if not xml_path.is_file():
        raise DetectionDataError(f"annotation file '{xml_path}' does not exist; every listed id needs one")
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DetectionDataError(f"{xml_path} is not valid XML ({exc}); fix or regenerate it") from None
    return tree, tree.findall("object")


def _voc_ids(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_voc(root: str | Path, splits: Sequence[str] = SPLITS, classes: Sequence[str] | None = None) -> DetectionData:
    """A PASCAL VOC-layout folder. Classes: ``classes``, else the 20 VOC classes when every object is one of
    them, else the sorted object names of the listed splits."""
    root = Path(root)
    if not (root / "ImageSets" / "Main" / "train.txt").is_file():
        raise DetectionDataError(f"no ImageSets/Main/train.txt under '{root}'; a VOC-layout folder needs one per split")
    present = [s for s in splits if (root / "ImageSets" / "Main" / f"{s}.txt").is_file()]
    parsed = {s: [(i, *_voc_objects(root / "Annotations" / f"{i}.xml")) for i in _voc_ids(root, s)] for s in present}
    names = {_text(o, "name", str(root)) for items in parsed.values() for _, _, objs in items for o in objs}
    if classes is None:
        classes = list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)
    label_of = {name: i + 1 for i, name in enumerate(classes)}
    out: dict[str, list[DetectionRecord]] = {}
    for split, items in parsed.items():
        records = []
        for image_id, tree, objs in items:
            xml_path = root / "Annotations" / f"{image_id}.xml"
            image_path = root / "JPEGImages" / f"{image_id}.jpg"
            size = tree.find("size")
            if size is not None and size.find("width") is not None:
                w, h = int(_number(size, "width", str(xml_path))), int(_number(size, "height", str(xml_path)))
            elif image_path.is_file():
                with Image.open(image_path) as img:
                    w, h = img.size
            else:
                w = h = 0  # reported as a missing image below
            boxes, labels, crowd = [], [], []
            for k, obj in enumerate(objs):
                where = f"{xml_path}: object {k}"
                name = _text(obj, "name", where)
                if name not in label_of:
                    raise DetectionDataError(
                        f"{where} is a '{name}', which is not among the classes {list(classes)} (unknown category); "
                        "fix the name or pass classes= with every class"
                    )
                bb = obj.find("bndbox")
                if bb is None:
                    raise DetectionDataError(f"{where}: missing <bndbox>")
                # VOC boxes are 1-based and inclusive: pixel columns xmin..xmax cover [xmin - 1, xmax)
                box = [_number(bb, t, where) for t in ("xmin", "ymin", "xmax", "ymax")]
                boxes.append(_check_box([box[0] - 1, box[1] - 1, box[2], box[3]], w, h, where))
                labels.append(label_of[name])
                difficult = obj.find("difficult")
                crowd.append(int(difficult is not None and (difficult.text or "0").strip() == "1"))
            records.append(
                DetectionRecord(
                    path=str(image_path),
                    width=w,
                    height=h,
                    boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64),
                    iscrowd=np.asarray(crowd, dtype=np.uint8),
                    image_id=image_id,
                )
            )
        _check_files(records, str(root / "ImageSets" / "Main" / f"{split}.txt"))
        out[split] = records
    categories = [(i + 1, n) for i, n in enumerate(classes)]
    return DetectionData(root.name, "voc", str(root), categories, _protocol(out, str(root)))


def load_detection(spec: str, splits: Sequence[str] = SPLITS, masks: bool | None = None) -> DetectionData:
    """``coco:ROOT``, ``voc:ROOT`` or a folder in either layout (told apart by its files)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("coco", "voc"):
        root = Path(rest)
    else:
        root = Path(spec)
        kind = "coco" if (root / "annotations").is_dir() else "voc" if (root / "Annotations").is_dir() else ""
        if not kind:
            raise DetectionDataError(
                f"'{spec}' is neither a COCO-layout folder (annotations/instances_train.json) nor a VOC-layout one "
                "(Annotations/, ImageSets/Main/, JPEGImages/); pass coco:PATH or voc:PATH"
            )
    if not root.is_dir():
        raise DetectionDataError(f"detection data folder '{root}' does not exist")
    if kind == "coco":
        return load_coco(root, splits, masks=masks)
    if masks:
        raise DetectionDataError("VOC detection annotations have no instance masks; use a box detector or COCO data")
    return load_voc(root, splits)


__all__ = [
    "VOC_CLASSES",
    "DetectionData",
    "DetectionDataError",
    "DetectionDataset",
    "DetectionRecord",
    "detection_collate",
    "load_coco",
    "load_detection",
    "load_voc",
]
