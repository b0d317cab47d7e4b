"""Detection data: COCO and VOC layouts parse exactly; bad annotations give clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from det_data import make_coco, make_voc
from vpeft.data.detection import (
    DetectionDataError,
    DetectionDataset,
    detection_collate,
    load_coco,
    load_detection,
    load_voc,
)
from vpeft.errors import ConfigError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"), n_test=2)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_coco_layout_parses(coco_root):
    data = load_detection(str(coco_root))
    assert data.kind == "coco" and data.has_masks
    assert data.categories == [(10, "square"), (20, "disk")] and data.num_classes == 2
    # with a test split: tune = train -> val, final = train + val -> test
    assert len(data.records("train")) == 6 and len(data.records("val")) == 3 and len(data.records("test")) == 2
    assert data.records("trainval") == data.records("train") + data.records("val")
    assert data.spec() == f"coco:{coco_root}"
    raw = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    first = [a for a in raw["annotations"] if a["image_id"] == 100]
    rec = data.records("train")[0]
    x, y, w, h = first[0]["bbox"]
    np.testing.assert_allclose(rec.boxes[0], [x, y, x + w, y + h])
    assert list(rec.labels) == [a["category_id"] // 10 for a in first]  # ids 10, 20 -> labels 1, 2
    # decoded masks (polygons and RLE) fit their boxes exactly, in the dataset's resized frame too
    ds = DetectionDataset(data.records("train"), size=48, masks=True)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 48, 48) and 0.0 <= image.min() and image.max() <= 1.0
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            assert _mask_box(mask) == pytest.approx(box.tolist())
    with pytest.raises(DetectionDataError, match="no 'extra' split"):
        data.records("extra")
    pairs = data.split("train")  # (image, objects) strings: what a run's data fingerprint reads
    assert pairs[0][0] == rec.path and str(rec.labels.tolist()) in pairs[0][1]


def test_coco_2017_names_and_no_masks(tmp_path):
    root = make_coco(tmp_path / "c", split_dir="{}2017")
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").rename(root / "annotations" / f"instances_{split}2017.json")
    data = load_coco(root, masks=False)
    assert not data.has_masks and data.records("test")[0].segmentations is None
    # no test split (COCO 2017): test = the official val, trainval = the official train, carved 9:1 for tuning
    assert data.records("test")[0].path.endswith("val2017/val_000.png") and len(data.records("test")) == 3
    assert len(data.records("trainval")) == 6 and len(data.records("train")) == 6 and data.records("val") == []
    big = load_coco(make_coco(tmp_path / "big", n_train=20, n_val=2))
    assert len(big.records("train")) == 18 and [r.path[-7:] for r in big.records("val")] == ["009.png", "019.png"]
    with pytest.raises(DetectionDataError, match="no segmentations"):
        DetectionDataset(data.records("test"), size=32, masks=True)


def test_resize_and_flip_move_boxes_with_the_pixels(coco_root):
    data = load_coco(coco_root)
    rec = data.records("train")[0]
    plain = DetectionDataset([rec], size=(24, 36), masks=True)
    image, target = plain[0]
    assert image.shape == (3, 24, 36)
    np.testing.assert_allclose(target["boxes"][0], rec.boxes[0] * np.array([36 / 48, 24 / 48] * 2), rtol=1e-6)
    flipped = [DetectionDataset([rec], size=(24, 36), train=True, masks=True, seed=s)[0] for s in range(8)]
    flips = [t for img, t in flipped if torch.equal(img, image.flip(-1))]
    assert 0 < len(flips) < 8  # some seeds flip, some do not
    t = flips[0]
    assert torch.equal(t["masks"], target["masks"].flip(-1))
    np.testing.assert_allclose(t["boxes"][:, 0], 36 - target["boxes"][:, 2])
    np.testing.assert_allclose(t["boxes"][:, 2], 36 - target["boxes"][:, 0])
    no_flip = [DetectionDataset([rec], size=(24, 36), train=True, masks=True, seed=s, flip=False)[0] for s in range(8)]
    assert all(torch.equal(img, image) for img, _ in no_flip)
    images, targets = detection_collate([plain[0], plain[0]])
    assert len(images) == len(targets) == 2


def test_voc_layout_parses(voc_root):
    data = load_detection(str(voc_root))
    assert data.kind == "voc" and not data.has_masks
    assert [name for _, name in data.categories] == ["disk", "square"]  # not VOC names: sorted
    rec = data.records("train")[0]
    xml = (voc_root / "Annotations" / "2007_000000.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    xmax = int(xml.split("<xmax>")[1].split("<")[0])
    assert rec.boxes[0][0] == xmin - 1 and rec.boxes[0][2] == xmax  # 1-based inclusive -> 0-based
    # the second object of each image is "difficult": flagged for evaluation, dropped for training
    multi = next(r for r in data.records("train") if len(r.labels) == 2)
    assert list(multi.iscrowd) == [0, 1]
    _, train_target = DetectionDataset([multi], size=40, train=True)[0]
    _, eval_target = DetectionDataset([multi], size=40)[0]
    assert len(train_target["boxes"]) == 1 and len(eval_target["boxes"]) == 2
    assert load_voc(voc_root, classes=["square", "disk", "cat"]).categories[2] == (3, "cat")


def test_voc_uses_the_20_classes_when_names_are_voc(tmp_path):
    root = make_voc(tmp_path / "v", n_train=2, n_val=1)
    for xml in (root / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace(">square<", ">cat<").replace(">disk<", ">dog<"))
    data = load_voc(root)
    assert data.num_classes == 20 and data.categories[7] == (8, "cat")


# ---------------------------------------------------------------- bad annotations


def _edit_coco(root, edit, split="train"):
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(key, value, index=0, where="annotations"):
    def edit(data):
        data[where][index][key] = value

    return edit


COCO_ERRORS = [
    ("box_outside", _set("bbox", [40, 40, 20, 20]), "lies outside the 48x48 image"),
    ("box_negative", _set("bbox", [-5, 0, 10, 10]), "lies outside"),
    ("box_degenerate", _set("bbox", [5, 5, 0, 10]), "is degenerate"),
    ("box_not_four", _set("bbox", [5, 5, 10]), "bbox must be \\[x, y, width, height\\]"),
    ("unknown_category", _set("category_id", 99), "category_id 99, which is not among the categories"),
    ("unknown_image", _set("image_id", 12345), "image_id 12345, which is not in 'images'"),
    ("polygon_outside", _set("segmentation", [[0, 0, 60, 0, 60, 10]]), "mask out of range"),
    ("polygon_short", _set("segmentation", [[0, 0, 5, 5]]), "at least 3 x, y pairs"),
    ("rle_wrong_size", _set("segmentation", {"size": [10, 10], "counts": [100]}), "mask out of range"),
    ("rle_bad_counts", _set("segmentation", {"size": [48, 48], "counts": [5, 7]}), "counts sum to 12"),
    ("missing_image_file", _set("file_name", "nope.png", where="images"), "image file\\(s\\) do not exist"),
    ("duplicate_image_id", lambda d: d["images"].append(dict(d["images"][0])), "appears twice"),
    ("no_keys", lambda d: d.pop("categories"), "lacks the COCO keys \\['categories'\\]"),
]


@pytest.mark.parametrize("case,edit,match", COCO_ERRORS, ids=[c[0] for c in COCO_ERRORS])
def test_coco_bad_annotations(tmp_path, coco_root, case, edit, match):
    root = tmp_path / "c"
    shutil.copytree(coco_root, root)
    _edit_coco(root, edit)
    with pytest.raises(DetectionDataError, match=match):
        load_coco(root, masks=True)


def test_coco_other_errors(tmp_path, coco_root):
    root = tmp_path / "c"
    shutil.copytree(coco_root, root)
    (root / "annotations" / "instances_val.json").write_text("{not json")
    with pytest.raises(DetectionDataError, match="is not valid JSON"):
        load_coco(root)
    _edit_coco(root, lambda d: None, split="train")
    (root / "annotations" / "instances_val.json").write_text(
        (root / "annotations" / "instances_train.json").read_text().replace('"disk"', '"ball"')
    )
    with pytest.raises(DetectionDataError, match="other categories"):
        load_coco(root)
    with pytest.raises(DetectionDataError, match="neither a COCO-layout"):
        load_detection(str(tmp_path))
    with pytest.raises(DetectionDataError, match="no annotations/instances_train.json"):
        load_coco(tmp_path)
    # an image whose real size differs from its annotation is caught when it is read
    _edit_coco(root, _set("width", 50, where="images"))
    shutil.copy(coco_root / "annotations" / "instances_val.json", root / "annotations" / "instances_val.json")
    data = load_coco(root, masks=False)
    with pytest.raises(DetectionDataError, match="its annotation says 50x48"):
        DetectionDataset(data.records("train"), size=32)[0]


def _edit_voc(root, old, new, file="2007_000000.xml"):
    path = root / "Annotations" / file
    path.write_text(path.read_text().replace(old, new, 1))


VOC_ERRORS = [
    ("box_outside", lambda r: _edit_voc(r, "<xmax>", "<xmax>9"), "lies outside the 40x40 image"),
    ("box_degenerate", lambda r: _edit_voc(r, "<xmin>", "<xmin>9"), "is degenerate"),
    ("not_a_number", lambda r: _edit_voc(r, "<ymin>", "<ymin>x"), "<ymin> is 'x"),
    (
        "missing_bndbox",
        lambda r: [_edit_voc(r, "<bndbox>", "<bbox>"), _edit_voc(r, "</bndbox>", "</bbox>")],
        "missing <bndbox>",
    ),
    ("missing_image", lambda r: (r / "JPEGImages" / "2007_000001.jpg").unlink(), "image file\\(s\\) do not exist"),
    ("missing_xml", lambda r: (r / "Annotations" / "2007_000001.xml").unlink(), "does not exist; every listed id"),
    ("bad_xml", lambda r: _edit_voc(r, "</annotation>", ""), "is not valid XML"),
]


@pytest.mark.parametrize("case,edit,match", VOC_ERRORS, ids=[c[0] for c in VOC_ERRORS])
def test_voc_bad_annotations(tmp_path, voc_root, case, edit, match):
    root = tmp_path / "v"
    shutil.copytree(voc_root, root)
    edit(root)
    with pytest.raises(DetectionDataError, match=match):
        load_voc(root)


def test_voc_unknown_class_with_fixed_classes(voc_root):
    with pytest.raises(DetectionDataError, match="not among the classes \\['square'\\]"):
        load_voc(voc_root, classes=["square"])
    with pytest.raises(DetectionDataError, match="no instance masks"):
        load_detection(f"voc:{voc_root}", masks=True)


def test_mini_dense_detection_task():
    from vpeft.tasks import get_task_type

    task = get_task_type("detection")
    data = task.load_task("mini-dense:detection")  # generated once into the cache, shared with segmentation
    assert data.spec() == "mini-dense:detection" and data.name == "mini-det" and data.has_masks
    assert [name for _, name in data.categories] == ["digit", "animal", "square", "disk", "triangle"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 400, "val": 100, "test": 200, "trainval": 500}
    _, target = DetectionDataset(data.records("test")[:1], size=56, masks=True)[0]
    for box, mask in zip(target["boxes"], target["masks"], strict=True):  # boxes are tight around the masks
        assert _mask_box(mask) == pytest.approx(box.tolist())
    with pytest.raises(ConfigError, match="is not a detection task"):
        task.load_task("mini-dense:segmentation")
