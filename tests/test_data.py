"""Datasets: VTAB-1k and FGVC layouts, ImageFolder trees, transforms, bad input."""

from __future__ import annotations

import pytest
import timm
import torch

from datagen import make_fgvc_task, make_vtab_task
from vpeft.data import (
    BadImageError,
    DataError,
    ImageDataset,
    build_transform,
    decode_image,
    input_config,
    load_folder,
    load_task,
)


def test_vtab_layout_split_sizes_and_labels(tmp_path) -> None:
    root = make_vtab_task(tmp_path / "mytask", num_classes=4, n_train=48, n_val=16, n_test=40)
    task = load_task(f"vtab1k:{root}")
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 48, "val": 16, "trainval": 64, "test": 40}
    assert task.num_classes == 4
    assert task.splits["train"][5] == (str(root / "images/train/0005.png"), 1)
    assert task.splits["trainval"] == task.splits["train"] + task.splits["val"]


def test_fgvc_layout(tmp_path) -> None:
    root = make_fgvc_task(tmp_path / "birds")
    task = load_task(f"fgvc:{root}")
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 30, "val": 9, "trainval": 39, "test": 21}
    assert task.num_classes == 3
    path, label = task.splits["test"][0]
    assert path.startswith(str(root / "images")) and decode_image(path).mode == "RGB"
    assert label == int(path.split("/")[-2][:3])


def test_folder_split_is_seeded_and_disjoint(tmp_path) -> None:
    from datagen import make_image

    rng = __import__("numpy").random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(20):
            (tmp_path / c).mkdir(exist_ok=True)
            make_image(0 if c == "cat" else 1, rng).save(tmp_path / c / f"{i}.png")
    a, b = load_folder(tmp_path, seed=3), load_folder(tmp_path, seed=3)
    assert a.splits == b.splits and a.class_names == ["cat", "dog"]
    train, val, test = ({p for p, _ in a.splits[s]} for s in ("train", "val", "test"))
    assert not (train & test) and not (val & test) and not (train & val)
    assert len(train) + len(val) + len(test) == 40


def test_grayscale_becomes_three_channels(tmp_path) -> None:
    root = make_vtab_task(tmp_path / "t")
    gray_path = load_task(f"vtab1k:{root}").splits["train"][0][0]  # every 7th image is grayscale
    assert decode_image(gray_path).mode == "RGB"


def test_transforms_follow_model_data_config() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False)
    cfg = input_config(model)
    assert cfg.size == (32, 32) and cfg.mean == (0.5, 0.5, 0.5)
    geometry, normalize = build_transform(cfg, "vtab", train=True)
    from PIL import Image

    x = normalize(geometry(Image.new("RGB", (50, 40), (255, 0, 0))))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0].mean(), torch.tensor(1.0))  # (1 - 0.5) / 0.5
    resnet_cfg = input_config(timm.create_model("resnet18", pretrained=False))
    assert resnet_cfg.mean == pytest.approx((0.485, 0.456, 0.406))


def test_fgvc_preset_augments_training_only() -> None:
    from PIL import Image

    cfg = input_config(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False))
    img = Image.fromarray((torch.rand(60, 60, 3) * 255).byte().numpy())
    train_geo, _ = build_transform(cfg, "fgvc", train=True)
    eval_geo, _ = build_transform(cfg, "fgvc", train=False)
    torch.manual_seed(0)
    assert not all(torch.equal(train_geo(img), train_geo(img)) for _ in range(3))
    assert torch.equal(eval_geo(img), eval_geo(img))


# ---------------------------------------------------------------- bad input


def test_missing_folder_and_split_file(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_task(f"vtab1k:{tmp_path / 'nope'}")
    root = make_vtab_task(tmp_path / "t")
    (root / "val200.txt").unlink()
    with pytest.raises(DataError, match=r"lacks val200\.txt"):
        load_task(f"vtab1k:{root}")
    with pytest.raises(DataError, match="lacks train.json"):
        load_task(f"fgvc:{root}")


def test_bad_spec_string(tmp_path) -> None:
    with pytest.raises(DataError, match="should be kind:path"):
        load_task("cifar")
    with pytest.raises(DataError, match="unknown dataset kind 'imagenet'"):
        load_task("imagenet:/x")


def test_label_outside_class_range(tmp_path) -> None:
    root = make_vtab_task(tmp_path / "t", num_classes=4)
    with pytest.raises(DataError, match="label 3 .* outside the 3 classes"):
        load_task(f"vtab1k:{root}", num_classes=3)
    cifar = make_vtab_task(tmp_path / "cifar", num_classes=4)  # a known VTAB task name: 100 classes
    with open(cifar / "test.txt", "a") as f:
        f.write("images/test/0000.png 100\n")
    with pytest.raises(DataError, match="label 100 .* outside the 100 classes of task 'cifar'"):
        load_task(f"vtab1k:{cifar}")


def test_corrupt_and_missing_images(tmp_path) -> None:
    root = make_vtab_task(tmp_path / "t")
    task = load_task(f"vtab1k:{root}")
    bad = task.splits["train"][2][0]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    missing = task.splits["train"][3][0]
    (root / missing).unlink()
    geometry = lambda img: img
    ds = ImageDataset(task.splits["train"], geometry)
    with pytest.raises(BadImageError, match=r"0002\.png' cannot be decoded.*--skip-bad-images"):
        ds[2]
    with pytest.raises(BadImageError, match=r"0003\.png' does not exist"):
        ds[3]
    with pytest.raises(BadImageError, match="0002.png"):
        ImageDataset(task.splits["train"], geometry, cache=True)
    skipping = ImageDataset(task.splits["train"], geometry, skip_bad_images=True)
    assert len(skipping) == 46 and sorted(skipping.skipped) == sorted([bad, missing])


def test_decoded_images_shared_across_runs_of_a_process(tmp_path, monkeypatch) -> None:
    """A second dataset over the same images (another seed, the trainval split) decodes nothing again."""
    from vpeft.data import datasets
    from vpeft.data.transforms import InputConfig

    store = datasets.DecodedImageStore(max_bytes=1e9)
    monkeypatch.setattr(datasets, "DECODED_IMAGES", store)
    task = load_task(f"vtab1k:{make_vtab_task(tmp_path / 't', n_train=8, n_val=4, n_test=4)}")
    geometry, normalize = build_transform(InputConfig((32, 32), (0.5,) * 3, (0.5,) * 3), "vtab", train=True)
    reads: list[str] = []

    def counting_read(path: str):
        reads.append(path)
        return decode_image(path)

    first = ImageDataset(task.splits["train"], geometry, normalize=normalize, cache=True, read=counting_read)
    trainval = ImageDataset(task.splits["trainval"], geometry, normalize=normalize, cache=True, read=counting_read)
    assert len(reads) == 12 and store.hits == 8  # only the 4 val images were new
    torch.testing.assert_close(first[3][0], trainval[3][0], rtol=0, atol=0)
    changed = task.splits["train"][0][0]
    decode_image(task.splits["train"][1][0]).save(changed)  # a file rewritten on disk is read again
    ImageDataset(task.splits["train"][:2], geometry, normalize=normalize, cache=True, read=counting_read)
    assert reads[12:] == [changed]
    other_size, _ = build_transform(InputConfig((16, 16), (0.5,) * 3, (0.5,) * 3), "vtab", train=True)
    ImageDataset(task.splits["train"][:2], other_size, normalize=normalize, cache=True, read=counting_read)
    assert len(reads) == 15  # another transform is another image
    small = datasets.DecodedImageStore(max_bytes=2 * 3 * 32 * 32)
    for i in range(4):
        small.put(("k", i), torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert small.bytes <= small.max_bytes and small.get(("k", 0)) is None and small.get(("k", 3)) is not None
