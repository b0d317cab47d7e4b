"""Semantic segmentation: metrics against hand-computed cases, the head, inference, dataset layouts and
their errors, save/load of the head, and `vpeft train --task-type segmentation` end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import vpeft
from dense_data import IMG, make_ade_layout, make_dense_backbone, make_mask_folder, make_voc_layout
from vpeft.data import DataError
from vpeft.data.segmentation import IGNORE_INDEX, SegmentationDataset, SegTransform, slide_windows
from vpeft.dense.heads import UPerHead
from vpeft.dense.metrics import confusion_matrix, per_class_iou, segmentation_scores
from vpeft.errors import AdapterMismatchError, ConfigError
from vpeft.tasks import get_task_type, load_task_model, save_task_model, task_type_names
from vpeft.train import RunSpec, TrainConfig, run
from vpeft.train.folders import RunExistsError
from vpeft.train.identity import run_identity

SEG = get_task_type("segmentation")
VIT_ARGS = dict(img_size=IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)


# ---------------------------------------------------------------- metrics


def test_confusion_and_scores_by_hand() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, 3, IGNORE_INDEX)
    # rows: truth, columns: prediction; the ignored pixel is not counted
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    scores = segmentation_scores(cm)
    # IoU: class 0: 1 / (2 + 3 - 1) = 1/4; class 1: 2 / (3 + 3 - 2) = 1/2; class 2: 1 / (2 + 1 - 1) = 1/2
    assert scores["mIoU"] == pytest.approx(100 * (0.25 + 0.5 + 0.5) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 7)
    assert scores["mean_acc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert per_class_iou(cm) == pytest.approx([25.0, 50.0, 50.0])


def test_a_class_absent_from_truth_and_prediction_is_not_averaged() -> None:
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    cm = confusion_matrix(pred, target, 4, IGNORE_INDEX)  # classes 2 and 3 never appear
    assert segmentation_scores(cm)["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert per_class_iou(cm)[2:] == [None, None]
    # a class predicted but absent from the truth counts with IoU 0
    cm = confusion_matrix(torch.tensor([0, 0, 1, 3]), target, 4, IGNORE_INDEX)
    assert segmentation_scores(cm)["mIoU"] == pytest.approx(100 * (1.0 + 0.5 + 0.0) / 3)


def test_perfect_and_all_ignored() -> None:
    t = torch.randint(0, 5, (3, 7, 9))
    assert segmentation_scores(confusion_matrix(t, t, 5, IGNORE_INDEX))["mIoU"] == pytest.approx(100.0)
    empty = confusion_matrix(t, torch.full_like(t, IGNORE_INDEX), 5, IGNORE_INDEX)
    assert empty.sum() == 0 and segmentation_scores(empty) == {"mIoU": 0.0, "pixel_acc": 0.0, "mean_acc": 0.0}


# ---------------------------------------------------------------- model and inference


@pytest.mark.parametrize("backbone", ["vit", "swin", "convnext", "resnet"])
def test_model_gives_logits_at_input_size(backbone: str) -> None:
    model = SEG.build(vpeft.apply(make_dense_backbone(backbone), "bitfit"), 7, SEG.options({"channels": 16}))
    assert isinstance(model.head, UPerHead)
    logits = model(torch.randn(2, 3, IMG, IMG))
    assert logits.shape == (2, 7, IMG, IMG)
    loss = SEG.loss(model, {"image": torch.randint(0, 255, (2, 3, IMG, IMG), dtype=torch.uint8),
                            "label": torch.randint(0, 7, (2, IMG, IMG))})  # fmt: skip
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_slide_windows_cover_every_pixel() -> None:
    for h, w in [(32, 32), (40, 75), (100, 33)]:
        cover = np.zeros((h, w), int)
        for y, x in slide_windows(h, w, (32, 32), (21, 21)):
            assert 0 <= y <= max(h - 32, 0) and 0 <= x <= max(w - 32, 0)
            cover[y : y + 32, x : x + 32] += 1
        assert cover.min() >= 1


def test_slide_equals_whole_when_the_image_is_one_crop() -> None:
    model = SEG.build(vpeft.apply(make_dense_backbone("vit"), "lora"), 3, SEG.options({"channels": 8})).eval()
    image = torch.randint(0, 255, (3, IMG, IMG), dtype=torch.uint8)
    torch.testing.assert_close(model.predict(image, "slide"), model.predict(image, "whole"))
    wide = torch.randint(0, 255, (3, 40, 90), dtype=torch.uint8)
    assert model.predict(wide, "slide").shape == (3, 40, 90)
    assert model.predict(wide, "whole").shape == (3, 40, 90)


def test_evaluate_scores_a_model_against_labels() -> None:
    """A stand-in model that predicts the label exactly scores 100; evaluate reads lists of sizes too."""

    class Oracle(torch.nn.Module):
        num_classes, crop = 3, (8, 8)

        def __init__(self, label: torch.Tensor):
            super().__init__()
            self.label = label

        def normalize(self, x):
            return x.float()

        def forward(self, x):
            return torch.nn.functional.one_hot(self.label, 3).permute(0, 3, 1, 2).float()[:, :, ::2, ::2][: x.shape[0]]

    label = torch.randint(0, 3, (2, 16, 16))
    label[:, :, :] = label[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2)
    scores = SEG.evaluate(Oracle(label), [{"image": torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "label": label}])
    assert scores["mIoU"] == pytest.approx(100.0) and scores["pixel_acc"] == pytest.approx(100.0)


# ---------------------------------------------------------------- dataset layouts


def test_ade20k_layout(tmp_path) -> None:
    make_ade_layout(tmp_path / "ade")
    task = SEG.load_task(f"ade20k:{tmp_path / 'ade'}")
    assert task.num_classes == 150 and task.reduce_zero_label
    assert len(task.split("trainval")) == 6 and len(task.split("test")) == 3  # official training / validation
    assert sorted(task.split("train") + task.split("val")) == sorted(task.split("trainval"))
    assert task.default_inference == "slide" and task.default_augment
    image, label = SegmentationDataset(task, "test", SegTransform((IMG, IMG), False, (0,) * 3, (1,) * 3),
                                       train=False)[0]  # fmt: skip
    raw = np.asarray(Image.open(task.split("test")[0][1]))
    assert image.shape == (3, 40, 40) and label.shape == (40, 40)
    assert (label[torch.from_numpy(raw == 0)] == IGNORE_INDEX).all()  # 0 = other: ignored
    assert (label[torch.from_numpy(raw == 101)] == 100).all()  # ADE class 101 is index 100


def test_voc_layout_reads_palette_indices(tmp_path) -> None:
    make_voc_layout(tmp_path / "voc")
    task = SEG.load_task(f"vocseg:{tmp_path / 'voc'}")
    assert task.num_classes == 21 and task.class_names[0] == "background"
    _, label = SegmentationDataset(task, "test", SegTransform((IMG, IMG), False, (0,) * 3, (1,) * 3), train=False)[0]
    assert (label[-1] == IGNORE_INDEX).all() and int(label[label != IGNORE_INDEX].max()) < 21


def test_mask_folder_and_training_crops(tmp_path) -> None:
    make_mask_folder(tmp_path / "m")
    (tmp_path / "m" / "classes.txt").write_text("bg\na\nb\nc\n")
    task = SEG.load_task(f"masks:{tmp_path / 'm'}")
    assert task.num_classes == 4 and set(task.splits) == {"train", "val", "trainval", "test"}
    for augment in (False, True):
        ds = SegmentationDataset(task, "train", SegTransform((IMG, IMG), augment, (0,) * 3, (1,) * 3), train=True)
        torch.manual_seed(0)
        image, label = ds[0]
        assert image.shape == (3, IMG, IMG) and image.dtype == torch.uint8 and label.shape == (IMG, IMG)
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}


@pytest.mark.parametrize(
    "damage,message",
    [
        ("value", r"values \[7\] .*outside the 4 classes"),
        ("size", "is 10x10 px but its image"),
        ("missing_mask", "do not exist"),
        ("rgb", "is a RGB image"),
        ("classes", "no classes.txt"),
    ],
)
def test_bad_annotations_are_named(tmp_path, damage: str, message: str) -> None:
    root = make_mask_folder(tmp_path / "m")
    (root / "classes.txt").write_text("bg\na\nb\nc\n")
    mask = root / "masks" / "train" / "s0.png"
    if damage == "value":
        Image.fromarray(np.full((24, 24), 7, np.uint8)).save(mask)
    elif damage == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    elif damage == "missing_mask":
        mask.unlink()
    elif damage == "rgb":
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(mask)
    else:
        (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=message):
        task = SEG.load_task(f"masks:{root}")
        SegmentationDataset(task, "train", SegTransform((IMG, IMG), False, (0,) * 3, (1,) * 3), train=False)[0]


def test_ade_mask_values_above_150_are_refused(tmp_path) -> None:
    root = make_ade_layout(tmp_path / "ade")
    mask = sorted((root / "annotations" / "validation").iterdir())[0]
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(mask)
    task = SEG.load_task(f"ade20k:{root}")
    with pytest.raises(DataError, match=r"values \[199\] after subtracting 1"):
        SegmentationDataset(task, "test", SegTransform((IMG, IMG), False, (0,) * 3, (1,) * 3), train=False)[0]


def test_unknown_spec_and_options_are_refused(tmp_path) -> None:
    with pytest.raises(DataError, match="ade20k, vocseg, masks, mini-dense"):
        SEG.load_task("coco:/nowhere")
    with pytest.raises(ConfigError, match="unknown segmentation option"):
        SEG.options({"chanels": 3})
    with pytest.raises(ConfigError, match="must be one of auto, whole, slide"):
        SEG.options({"inference": "tile"})
    with pytest.raises(ConfigError, match="unknown task type"):
        get_task_type("depth")
    assert {"classification", "segmentation"} <= set(task_type_names())


# ---------------------------------------------------------------- the mini dense suite


def test_mini_dense_segmentation_masks_match_the_coco_instances() -> None:
    import json

    from vpeft.data.mini_dense import CLASSES, mini_dense_root

    task = SEG.load_task("mini-dense:segmentation")
    assert task.num_classes == len(CLASSES) == 6 and task.class_names == list(CLASSES)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 400, "val": 100, "test": 200, "trainval": 500}
    coco = json.loads((mini_dense_root() / "annotations" / "instances_val.json").read_text())
    for image in coco["images"][:10]:
        label = np.asarray(Image.open(mini_dense_root() / "masks" / "val" / image["file_name"]))
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert 1 <= len(anns) <= 3
        assert sum(a["area"] for a in anns) == (label > 0).sum()  # instances never touch: masks are exact
        for a in anns:
            x, y, w, h = (int(v) for v in a["bbox"])
            inside = label[y : y + h, x : x + w] == a["category_id"]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight box


# ---------------------------------------------------------------- save / load


def test_head_is_saved_with_the_adapter_and_reloads_exactly(tmp_path) -> None:
    options = SEG.options({"channels": 8})
    model = SEG.build(vpeft.apply(make_dense_backbone("vit"), "lora"), 5, options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randn(4, 3, IMG, IMG))  # moves the head's BatchNorm statistics
    model.eval()
    save_task_model(model, tmp_path, "segmentation", 5, options)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter.safetensors", "task_head.safetensors", "task_config.json"}
    loaded = load_task_model(make_dense_backbone("vit"), tmp_path).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(AdapterMismatchError, match="no task_config.json"):
        load_task_model(make_dense_backbone("vit"), tmp_path / "elsewhere")


# ---------------------------------------------------------------- train end to end


def _spec(data: str, **changes) -> RunSpec:
    train = dict(epochs=2, warmup_epochs=0, batch_size=32, lr=3e-3, weight_decay=1e-4, drop_path=0.0, device="cpu")
    train.update(changes.pop("train", {}))
    fields = {"mode": "tune", "task_options": {"channels": 16}, **changes}
    return RunSpec(model="vit_tiny_patch16_224", model_args=VIT_ARGS, pretrained=False, data=data, method="lora",
                   task_type="segmentation", train=TrainConfig(**train), **fields)  # fmt: skip


def test_train_on_the_mini_dense_task_beats_predicting_background(tmp_path) -> None:
    record = run(_spec("mini-dense:segmentation"), tmp_path / "run", progress=False)
    assert record["status"] == "ok" and record["task_type"] == "segmentation" and record["eval_split"] == "val"
    task = SEG.load_task("mini-dense:segmentation")
    labels = torch.cat([torch.from_numpy(task.read_mask(m)).flatten() for _, m in task.split("val")])
    background = segmentation_scores(confusion_matrix(torch.zeros_like(labels), labels, 6, IGNORE_INDEX))
    assert record["mIoU"] > background["mIoU"] + 5, (record["mIoU"], background["mIoU"])
    assert record["score"] == record["mIoU"] and record["primary_metric"] == "mIoU"
    assert record["trainable_params"] == vpeft.count_trainable(
        vpeft.apply(make_dense_backbone("vit"), "lora"), include_head=False
    )
    assert record["head_params"] > 0 and "top1" not in record and record["memory_estimate_mb"] > 0
    assert (tmp_path / "run" / "task_head.safetensors").is_file() and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert record["identity"]["task_type"] == "segmentation"


def test_resume_continues_to_the_same_result_and_identity_guards_the_folder(tmp_path) -> None:
    root = make_mask_folder(tmp_path / "m", n=6, size=IMG)
    (root / "classes.txt").write_text("bg\na\nb\nc\n")
    spec = _spec(f"masks:{root}", mode="final", train={"epochs": 3, "batch_size": 4})  # no test split: val is test
    whole = run(spec, tmp_path / "whole", progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(stats) -> None:
        if stats.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run(spec, tmp_path / "cut", progress=False, on_epoch=stop_after_first)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = run(spec, tmp_path / "cut", resume=True, progress=False)
    for key in ("mIoU", "pixel_acc", "final_train_loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    assert resumed["run_key"] == whole["run_key"]
    # the same spec again is the finished run; another task option is another run
    assert run(spec, tmp_path / "whole", resume=True, progress=False)["reused"]
    other = _spec(f"masks:{root}", mode="final", train={"epochs": 3, "batch_size": 4}, task_options={"channels": 8})
    with pytest.raises(RunExistsError, match="another spec"):
        run(other, tmp_path / "whole", resume=True, progress=False)


def test_task_type_is_part_of_the_identity_only_beyond_classification(tmp_path) -> None:
    root = make_mask_folder(tmp_path / "m")
    (root / "classes.txt").write_text("bg\na\nb\nc\n")
    spec = _spec(f"masks:{root}")
    identity = run_identity(spec, SEG.load_task(spec.data), 2)
    assert identity["task_type"] == "segmentation" and identity["task_options"]["channels"] == 16
    moved = make_mask_folder(tmp_path / "elsewhere" / "m")  # the same data in another folder: the same fingerprint
    assert (
        run_identity(_spec(f"masks:{moved}"), SEG.load_task(f"masks:{moved}"), 2)["data_fingerprint"]
        == (identity["data_fingerprint"])
    )
    from vpeft.data import load_task

    classification = RunSpec(data="mini:mnist", method="lora")
    assert "task_type" not in run_identity(classification, load_task("mini:mnist"), 2)


def test_cli_trains_segmentation(tmp_path, capsys) -> None:
    from vpeft.cli import main

    root = make_mask_folder(tmp_path / "m", size=IMG)
    (root / "classes.txt").write_text("bg\na\nb\nc\n")
    code = main(["train", "--task-type", "segmentation", "--data", f"masks:{root}", "--model", "vit_tiny_patch16_224",
                 *[f"--model-arg={k}={v}" for k, v in VIT_ARGS.items()], "--no-pretrained", "--method", "bitfit",
                 "--task-opt", "channels=8", "--task-opt", "inference=slide", "--epochs", "1", "--warmup-epochs", "0",
                 "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "segmentation" in out and "mIoU" in out and "pixel_acc" in out
    record = __import__("json").loads((tmp_path / "run" / "result.json").read_text())
    assert record["inference"] == "slide" and record["task_options"]["channels"] == 8
    assert not math.isnan(record["mIoU"])
