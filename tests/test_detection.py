"""Detection: COCO AP against hand-computed cases, detectors over a dense encoder, training and save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpeft.dense.coco_eval import coco_metrics, metric_names
from vpeft.errors import VPeftError


def _t(boxes, labels, masks=None, iscrowd=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    if masks is not None:
        out["masks"] = torch.as_tensor(np.asarray(masks), dtype=torch.uint8)
    if iscrowd is not None:
        out["iscrowd"] = torch.tensor(iscrowd)
    return out


def _p(boxes, labels, scores, masks=None):
    out = _t(boxes, labels)
    if masks is not None:  # torchvision's Mask R-CNN returns N x 1 x H x W probabilities
        out["masks"] = torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]
    out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


def _box_mask(box, size=(40, 40)):
    m = np.zeros(size, dtype=np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    return m


SIZE = (40, 40)
A, B = [0, 0, 10, 10], [20, 20, 30, 30]
FAR = [30, 0, 38, 8]


# ---------------------------------------------------------------- AP against hand-computed values

# (case, targets per image, predictions per image, expected box_ap, box_ap50, box_ap75)
# ranked TP (0.9), FP (0.8), TP (0.7) over 2 objects: the interpolated precision is 1 up to recall 0.5
# (51 of the 101 recall points) and 2/3 above it (50 points): AP = (51 + 50 * 2/3) / 101 at every IoU
ONE_FP = (51 + 50 * 2 / 3) / 101
AP_CASES = [
    ("perfect", [_t([A, B], [1, 1])], [_p([A, B], [1, 1], [0.9, 0.8])], 1.0, 1.0, 1.0),
    ("one_fp_between_tps", [_t([A, B], [1, 1])], [_p([A, FAR, B], [1, 1, 1], [0.9, 0.8, 0.7])], ONE_FP, ONE_FP, ONE_FP),
    # FP ranked last does not lower precision at any recall reached before it
    ("fp_ranked_last", [_t([A, B], [1, 1])], [_p([A, B, FAR], [1, 1, 1], [0.9, 0.8, 0.1])], 1.0, 1.0, 1.0),
    # IoU 0.49 misses every threshold; IoU 0.51 passes only 0.50 (1 of 10 thresholds)
    ("iou_0.49", [_t([A], [1])], [_p([[0, 0, 10, 4.9]], [1], [0.9])], 0.0, 0.0, 0.0),
    ("iou_0.51", [_t([A], [1])], [_p([[0, 0, 10, 5.1]], [1], [0.9])], 0.1, 1.0, 0.0),
    # IoU 0.8 passes 0.50..0.80 (7 of 10 thresholds)
    ("iou_0.80", [_t([A], [1])], [_p([[0, 0, 10, 8.0]], [1], [0.9])], 0.7, 1.0, 1.0),
    # the right box with the wrong class is a miss for class 1 and a false positive for class 2
    ("wrong_class", [_t([A], [1])], [_p([A], [2], [0.9])], 0.0, 0.0, 0.0),
    # one of two objects found, no false positive: precision 1 up to recall 0.5 -> 51 / 101
    ("half_recall", [_t([A, B], [1, 1])], [_p([A], [1], [0.9])], 51 / 101, 51 / 101, 51 / 101),
    # two classes averaged: class 1 perfect, class 2 missed -> 0.5
    ("two_classes", [_t([A, B], [1, 2])], [_p([A], [1], [0.9])], 0.5, 0.5, 0.5),
    # a detection on a crowd region is ignored, not a false positive
    ("crowd_ignored", [_t([A, B], [1, 1], iscrowd=[0, 1])], [_p([B, A], [1, 1], [0.95, 0.9])], 1.0, 1.0, 1.0),
    ("no_detections", [_t([A], [1])], [_p(np.zeros((0, 4)), [], [])], 0.0, 0.0, 0.0),
    # over two images: image 1 perfect, image 2's object missed while a FP scores highest
    (
        "two_images",
        [_t([A], [1]), _t([B], [1])],
        [_p([A], [1], [0.8]), _p([FAR], [1], [0.9])],
        # ranked FP (0.9), TP (0.8): recall 0.5 reached at precision 0.5 -> 51 points at 0.5
        51 * 0.5 / 101,
        51 * 0.5 / 101,
        51 * 0.5 / 101,
    ),
]


@pytest.mark.parametrize("case,targets,preds,ap,ap50,ap75", AP_CASES, ids=[c[0] for c in AP_CASES])
def test_box_ap_hand_computed(case, targets, preds, ap, ap50, ap75):
    m = coco_metrics(targets, preds, [SIZE] * len(targets), categories=[1, 2])
    assert m["box_AP"] == pytest.approx(ap, abs=1e-6)
    assert m["box_AP50"] == pytest.approx(ap50, abs=1e-6)
    assert m["box_AP75"] == pytest.approx(ap75, abs=1e-6)


def test_mask_ap_perfect_and_half():
    ma, mb = _box_mask(A), _box_mask(B)
    targets = [_t([A, B], [1, 1], masks=[ma, mb])]
    # perfect masks (probabilities above the threshold) score 1.0
    perfect = [_p([A, B], [1, 1], [0.9, 0.8], masks=[ma * 0.9, mb * 0.7])]
    m = coco_metrics(targets, perfect, [SIZE], categories=[1], masks=True)
    assert set(m) == set(metric_names(masks=True))
    assert m["mask_AP"] == pytest.approx(1.0) and m["box_AP"] == pytest.approx(1.0)
    # right boxes, but the second mask covers only 40% of its object: mask IoU 0.4 fails every threshold
    partial = mb.copy()
    partial[24:30] = 0
    half = [_p([A, B], [1, 1], [0.9, 0.8], masks=[ma, partial])]
    m = coco_metrics(targets, half, [SIZE], categories=[1], masks=True)
    assert m["box_AP"] == pytest.approx(1.0)
    assert m["mask_AP"] == pytest.approx(51 / 101)
    # probabilities below the threshold are background: an empty mask matches nothing
    empty = [_p([A, B], [1, 1], [0.9, 0.8], masks=[ma * 0.4, mb * 0.4])]
    assert coco_metrics(targets, empty, [SIZE], categories=[1], masks=True)["mask_AP"] == 0.0


@pytest.mark.parametrize(
    "targets,preds,kwargs,match",
    [
        ([_t([A], [7])], [_p([A], [1], [0.9])], {}, "label 7 is not one of the categories"),
        ([_t([], [])], [_p([A], [1], [0.9])], {}, "no ground-truth objects"),
        ([_t([A], [1])], [_p([A], [1], [0.9])], {"masks": True}, "needs target\\['masks'\\]"),
        ([_t([A], [1]), _t([A], [1])], [_p([A], [1], [0.9])], {}, "pass one of each per image"),
    ],
)
def test_ap_bad_input(targets, preds, kwargs, match):
    with pytest.raises(VPeftError, match=match):
        coco_metrics(targets, preds, [SIZE] * len(targets), categories=[1], **kwargs)


# ---------------------------------------------------------------- detectors over the dense encoder

import timm  # noqa: E402

import vpeft  # noqa: E402
from vpeft.dense.detection import ARCHITECTURES, build_detector  # noqa: E402
from vpeft.dense.encoder import dense_encoder  # noqa: E402
from vpeft.errors import ConfigError  # noqa: E402

DET_IMG = 64
#: tiny backbones at 64 px, without a classifier (a dense encoder refuses one)
DET_BACKBONES = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=DET_IMG, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=0),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=DET_IMG, window_size=2, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), embed_dim=16, num_classes=0),
    ),
}
SMALL = dict(fpn_channels=32, representation_size=64)


def _backbone(key: str, method: str | None, seed: int = 0) -> torch.nn.Module:
    name, kwargs = DET_BACKBONES[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # no parameter at exactly zero: a test cannot pass on an all-zero tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if method is not None:
        vpeft.apply(model, method)
    return model


def _batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, DET_IMG, DET_IMG, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        masks = torch.zeros(2, DET_IMG, DET_IMG, dtype=torch.uint8)
        masks[0, 8:30, 4:26] = 1
        masks[1, 36 + i : 60, 30:62] = 1
        boxes = torch.tensor([[4.0, 8, 26, 30], [30, 36 + i, 62, 60]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


#: (backbone, detector, method): every detector with the frozen backbone ("linear") and LoRA on both
#: backbones; the issue's other methods with FCOS (the fastest) on Swin, Mona (ViT only) on the ViT
GRAD_CASES = [
    *[(b, a, m) for b in DET_BACKBONES for a in ARCHITECTURES for m in ("linear", "lora")],
    *[(b, "fcos", m) for b in DET_BACKBONES for m in ("adapter", "bitfit", "full")],
    *[("swin", "fcos", m) for m in ("adaptformer", "ssf", "ln_tune", "partial_k")],
    ("vit", "fcos", "mona"),
]


@pytest.mark.parametrize("backbone,arch,method", GRAD_CASES)
def test_detector_gradients_only_where_they_belong(backbone, arch, method):
    model = _backbone(backbone, method)
    method_params = set(vpeft.trainable_parameters(model))
    detector = build_detector(dense_encoder(model), arch, num_classes=3, **SMALL)
    detector.train()
    images, targets = _batch()
    losses = detector(images, targets)
    expected_terms = {"maskrcnn": "loss_mask", "fcos": "bbox_ctrness", "retinanet": "bbox_regression"}[arch]
    assert expected_terms in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    prefix = "backbone.encoder.backbone."
    for name, p in detector.named_parameters():
        if name.startswith(prefix):
            # the backbone trains exactly what the method trains; frozen weights get no gradient at all
            assert p.requires_grad == (name[len(prefix) :] in method_params), name
            if not p.requires_grad:
                assert p.grad is None, name
        else:  # neck, heads (and the ViT's pyramid) all train
            assert p.requires_grad, name
    got = {n for n, p in detector.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("backbone.fpn.") for n in got)
    backbone_got = {n[len(prefix) :] for n in got if n.startswith(prefix)}
    if method == "linear":  # the frozen row: nothing in the timm backbone trains
        assert not method_params and not backbone_got
    else:
        assert backbone_got and backbone_got <= method_params
    if method == "lora":  # LoRA's B starts at zero, so only B gets a gradient on the first step
        assert all(".lora_B." in n for n in backbone_got), backbone_got
    # inference returns torchvision's predictions at the input size
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4
    if arch == "maskrcnn":
        assert out[0]["masks"].shape[-2:] == (DET_IMG, DET_IMG)


def test_detector_levels_and_anchors_follow_the_strides():
    encoder = dense_encoder(_backbone("swin", "linear"))
    assert encoder.strides == [4, 8, 16, 32]
    fcos = build_detector(encoder, "fcos", 3, **SMALL)
    assert fcos.backbone.strides == [8, 16, 32, 64, 128]  # P3-P7, as torchvision's FCOS / RetinaNet
    assert [s[0] for s in fcos.anchor_generator.sizes] == [8, 16, 32, 64, 128]  # one point per location
    retina = build_detector(encoder, "retinanet", 3, **SMALL)
    assert retina.anchor_generator.sizes[0] == pytest.approx((32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    mask = build_detector(encoder, "maskrcnn", 3, **SMALL)
    assert mask.backbone.strides == [4, 8, 16, 32, 64]  # P2-P6
    assert [s[0] for s in mask.rpn.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    # images are normalised with the backbone's statistics and never resized
    assert mask.transform.min_size == (DET_IMG,) and mask.transform.max_size == DET_IMG
    x = torch.rand(3, DET_IMG, DET_IMG)
    batched, _ = mask.transform([x])
    assert batched.tensors.shape[-2:] == (DET_IMG, DET_IMG)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(architecture="yolo", num_classes=3), "unknown detector 'yolo'"),
        (dict(architecture="fcos", num_classes=1), "K object classes need K \\+ 1"),
        (dict(architecture="fcos", num_classes=3, fpn_channels=40), "multiple of 32"),
    ],
)
def test_detector_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_detector(dense_encoder(_backbone("swin", "linear")), **kwargs)


@pytest.mark.parametrize("backbone,arch,method", [("vit", "maskrcnn", "lora"), ("swin", "retinanet", "adapter")])
def test_head_saved_with_the_adapter_and_reloaded_exactly(tmp_path, backbone, arch, method):
    from vpeft.tasks import get_task_type, load_task_model, save_task_model

    task = get_task_type("detection")
    options = task.options({"detector": arch, **SMALL})
    detector = task.build(_backbone(backbone, method), 3, options)
    opt = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.05)
    detector.train()
    for _ in range(2):  # move every trainable tensor (LoRA's B included) away from its init
        opt.zero_grad()
        sum(detector(*_batch()).values()).backward()
        opt.step()
    save_task_model(detector, tmp_path / "det", "detection", 3, options)
    saved = {p.name for p in (tmp_path / "det").iterdir()}
    assert {"adapter.safetensors", "task_head.safetensors", "task_config.json"} <= saved
    reloaded = load_task_model(_backbone(backbone, None, seed=0), tmp_path / "det")
    before, after = detector.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(k.startswith("backbone.fpn.") for k in before) and any(
        k.startswith("roi_heads.") or k.startswith("head.") for k in before
    )
    detector.eval()
    reloaded.eval()
    images, _ = _batch()
    with torch.no_grad():
        a, b = detector(images), reloaded(images)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])


# ---------------------------------------------------------------- the task type, end to end on synthetic data


def _train(task, model, loader, steps: int, lr: float) -> list[float]:
    from vpeft.train.trainer import set_train_mode

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            set_train_mode(model)
            loss = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


@pytest.mark.parametrize(
    "detector,method,steps,lr,min_ap50",
    [("fcos", "lora", 40, 3e-3, 50.0), ("fcos", "linear", 40, 3e-3, 50.0), ("maskrcnn", "full", 8, 2e-3, None)],
)
def test_task_trains_on_a_coco_folder(tmp_path, detector, method, steps, lr, min_ap50):
    from det_data import make_coco
    from vpeft.tasks.detection import Detection

    task = Detection()
    data = task.load_task(str(make_coco(tmp_path / "coco", n_train=8, n_val=4, size=DET_IMG)))
    assert data.num_classes == 2 and data.has_masks
    options = task.options({"detector": detector, **SMALL})
    torch.manual_seed(0)
    model = task.build(_backbone("swin", method), data.num_classes, options)
    assert model.image_size == (DET_IMG, DET_IMG) and model.predicts_masks == (detector == "maskrcnn")
    train = task.dataset(data, "train", model, options, train=True)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=task.collate)
    seen = task.dataset(data, "train", model, options, train=False)
    eval_batches = list(torch.utils.data.DataLoader(seen, batch_size=4, collate_fn=task.collate))
    assert task.batch_size(eval_batches[0]) == 4
    before = task.evaluate(model, eval_batches)
    losses = _train(task, model, loader, steps, lr)
    after = task.evaluate(model, eval_batches)
    assert set(after) == set(task.metric_names[: 6 if detector == "maskrcnn" else 3])
    assert all(0.0 <= v <= 100.0 for v in after.values())
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    if min_ap50 is not None:  # boxes learned on the training images: far above a random detector's ~0
        assert before["box_AP50"] < 5.0 and after["box_AP50"] > min_ap50, (before, after)
    model.train()  # evaluate restores the mode it found
    task.evaluate(model, eval_batches[:1])
    assert model.training
    with pytest.raises(VPeftError, match="needs the model in training mode"):
        model.eval()
        task.loss(model, eval_batches[0])


def test_task_on_voc_and_its_option_errors(tmp_path):
    from det_data import make_voc
    from vpeft.tasks.detection import Detection

    task = Detection()
    data = task.load_task(f"voc:{make_voc(tmp_path / 'voc', size=DET_IMG)}")
    model = task.build(_backbone("swin", "bitfit"), data.num_classes, task.options({"detector": "fcos", **SMALL}))
    with pytest.raises(ConfigError, match="needs instance masks"):
        mask_model = task.build(_backbone("swin", "bitfit"), 2, task.options({"detector": "maskrcnn", **SMALL}))
        task.dataset(data, "train", mask_model, task.options({"detector": "maskrcnn"}), train=True)
    assert data.records("val") == [] and len(data.records("test")) == 2  # no test split: test = VOC's val
    ds = task.dataset(data, "test", model, task.options({"detector": "fcos"}), train=False)
    metrics = task.evaluate(model, [task.collate([ds[i] for i in range(len(ds))])])
    assert set(metrics) == {"box_AP", "box_AP50", "box_AP75"}
    with pytest.raises(ConfigError, match="has 2 categories, not 5"):
        task.load_task(f"voc:{tmp_path / 'voc'}", num_classes=5)
    for bad, match in [
        ({"detector": "ssd"}, "must be one of"),
        ({"detector": "fcos", "fpn_channels": 48}, "multiple of 32"),
    ]:
        with pytest.raises(ConfigError, match=match):
            task.options(bad)


def test_vpeft_run_trains_and_records_a_detection_task(tmp_path):
    from det_data import make_coco
    from vpeft.tasks import load_task_model
    from vpeft.train import RunSpec, TrainConfig, run

    root = make_coco(tmp_path / "coco", n_train=8, n_val=4, size=DET_IMG, n_test=4)
    name, args = DET_BACKBONES["swin"]
    args = {k: v for k, v in args.items() if k != "num_classes"}  # the run creates the backbone without a head
    train = TrainConfig(
        epochs=10, warmup_epochs=0, batch_size=4, lr=3e-3, weight_decay=1e-4, drop_path=0.0, device="cpu"
    )
    spec = RunSpec(model=name, model_args=args, pretrained=False, data=f"coco:{root}", method="lora", mode="final",
                   task_type="detection", task_options={"detector": "fcos", **SMALL}, train=train)  # fmt: skip
    record = run(spec, tmp_path / "run", progress=False)
    assert record["status"] == "ok" and record["task_type"] == "detection" and record["primary_metric"] == "box_AP"
    assert record["eval_split"] == "test"
    assert record["score"] == record["box_AP"] and 0.0 <= record["box_AP"] <= 100.0 and "mask_AP" not in record
    assert record["head_params"] > 0 and record["trainable_params"] > 0
    with pytest.warns(UserWarning, match="weights differ"):  # _backbone perturbs the random init
        reloaded = load_task_model(_backbone("swin", None), tmp_path / "run")
    assert reloaded.image_size == (DET_IMG, DET_IMG)


def test_an_input_size_off_the_coarsest_stride_is_not_padded():
    # the mini ViT takes 28 px (patch 4): a batch padded to a multiple of 8 would not fit its patch embedding
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, num_classes=0)  # fmt: skip
    vpeft.apply(model, "lora")
    detector = build_detector(dense_encoder(model), "fcos", 3, **SMALL)
    assert detector.transform.size_divisible == 4
    detector.train()
    box = {"boxes": torch.tensor([[2.0, 3, 20, 25]]), "labels": torch.tensor([1])}
    # two images: P7 is 1 x 1 here, and FCOS's GroupNorm needs more than one value per group in training
    losses = detector([torch.rand(3, 28, 28), torch.rand(3, 28, 28)], [box, box])
    assert all(torch.isfinite(v) for v in losses.values())
