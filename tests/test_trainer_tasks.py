"""The one Trainer, the same checks for every task type: classification, segmentation, detection, multi-task.

Each row builds a small model of its kind (seeded), a training set and the task type; the checks are the
trainer's: resume equals an uninterrupted run, two torchrun-style processes (gloo, CPU) give one process's
weights, bf16 autocast on the CPU trains, and a loss that turns NaN stops training within the step range
the message names.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Subset, TensorDataset

import vpeft
from vpeft.multi import MultiAdapterModel
from vpeft.multi.run import MixedBatches, MixedTasks
from vpeft.tasks import get_task_type
from vpeft.train.trainer import TrainConfig, Trainer, TrainingDivergedError, trainable

from conftest import make_backbone


@dataclass
class Case:
    """A task kind: how to build its model (seeded), its training set and its task type."""

    model: Any
    train_set: Any
    task_type: Any
    options: Any
    #: whether 2 processes give 1 process's weights (False: the loss is normalised per rank; see the test)
    ddp_exact: bool = True


def _images(n: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % classes)


def _no_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm layers replaced by Identity: per-rank batch statistics differ from the global batch's on the CPU
    (SyncBatchNorm needs CUDA), which is a property of BatchNorm, not of the trainer under test."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    return model


def classification(seed: int = 0, ddp: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return vpeft.apply(make_backbone("vit", seed), "lora", rank=2)


def _dense(kind: str, num_classes: int, options: dict, seed: int) -> nn.Module:
    """A dense task model: the ViT without its classifier, LoRA, the task type's head (seeded)."""
    task_type = get_task_type(kind)
    backbone = make_backbone("vit", seed)
    backbone.reset_classifier(0)
    vpeft.apply(backbone, "lora", rank=2)
    torch.manual_seed(seed)
    return task_type.build(backbone, num_classes, task_type.options(options))


def segmentation(seed: int = 0, ddp: bool = False) -> nn.Module:
    model = _dense("segmentation", 6, SEG_OPTIONS, seed)
    return _no_batchnorm(model) if ddp else model


def detection(seed: int = 0, ddp: bool = False) -> nn.Module:
    return _dense("detection", 5, DET_OPTIONS, seed)


def multitask(seed: int = 0, ddp: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    mm = MultiAdapterModel(make_backbone("vit", seed))
    mm.add_adapter("a", "lora", num_classes=3, rank=2)
    mm.add_adapter("b", "lora", num_classes=4, rank=2)
    return mm


SEG_OPTIONS = {"channels": 8, "dropout": 0.0}  # no dropout: each rank would draw its own masks
DET_OPTIONS = {"detector": "fcos", "fpn_channels": 32, "flip": False, "image_size": 32}
BUILDERS = {"classification": classification, "segmentation": segmentation, "detection": detection,
            "multitask": multitask}  # fmt: skip


def case(kind: str) -> Case:
    if kind == "classification":
        task_type = get_task_type("classification")
        return Case(classification, _images(24, 5, 1), task_type, task_type.options())
    if kind == "multitask":
        sets = [_images(16, 3, 2), _images(12, 4, 3)]
        return Case(multitask, MixedBatches(sets, ["a", "b"]), MixedTasks(), MixedTasks().options())
    task_type = get_task_type(kind)
    options = task_type.options(SEG_OPTIONS if kind == "segmentation" else DET_OPTIONS)
    task = task_type.load_task(f"mini-dense:{kind}")
    model = BUILDERS[kind]()
    data = task_type.dataset(task, "train", model, options, train=True)
    return Case(BUILDERS[kind], Subset(data, range(8)), task_type, options, ddp_exact=kind != "detection")


KINDS = ["classification", "segmentation", "detection", "multitask"]


def _cfg(**changes) -> TrainConfig:
    base = dict(epochs=2, warmup_epochs=1, batch_size=4, lr=3e-3, weight_decay=1e-4, drop_path=0.0, device="cpu",
                label_smoothing=0.0)  # fmt: skip
    return TrainConfig(**{**base, **changes})


def _trainer(c: Case, model: nn.Module, cfg: TrainConfig, **kwargs) -> Trainer:
    return Trainer(model, cfg, progress=False, task_type=c.task_type, options=c.options, **kwargs)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(model).items()}


@pytest.mark.parametrize("kind", KINDS)
def test_resume_equals_uninterrupted(kind: str, tmp_path) -> None:
    c = case(kind)
    whole = c.model()
    _trainer(c, whole, _cfg(), out_dir=tmp_path / "whole").fit(c.train_set)

    class Stop(Exception):
        pass

    def stop(stats) -> None:
        if stats.epoch == 1:
            raise Stop

    cut = c.model()
    with pytest.raises(Stop):
        _trainer(c, cut, _cfg(), out_dir=tmp_path / "cut", on_epoch=stop).fit(c.train_set)
    resumed = c.model()
    trainer = _trainer(c, resumed, _cfg(), out_dir=tmp_path / "cut")
    history = trainer.fit(c.train_set, resume=True)
    assert [h.epoch for h in history] == [1, 2]
    expected, got = _weights(whole), _weights(resumed)
    assert set(expected) == set(got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(c.model()).values(), got.values(), strict=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, kind: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    c = case(kind)
    model = BUILDERS[kind](ddp=True)
    try:
        _trainer(c, model, _cfg()).fit(c.train_set)
        torch.save(_weights(model), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one(kind: str, tmp_path) -> None:
    c = case(kind)
    mp.start_processes(_rank_main, args=(kind, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ranks[0]:  # DDP keeps the replicas equal
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0, msg=name)
    if not c.ddp_exact:
        # FCOS normalises its loss by the foreground count of each rank's half batch, so the averaged gradient
        # of two ranks is not the whole batch's; the replicas still train and agree (checked above)
        return
    single = BUILDERS[kind](ddp=True)
    _trainer(c, single, _cfg()).fit(c.train_set)
    for name, value in _weights(single).items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_on_the_cpu(kind: str) -> None:
    c = case(kind)
    model = c.model()
    before = _weights(model)
    dtypes: set[torch.dtype] = set()
    handles = [m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype)) for m in model.modules()
               if isinstance(m, nn.Linear)]  # fmt: skip
    history = _trainer(c, model, _cfg(epochs=1, amp="bf16")).fit(c.train_set)
    for h in handles:
        h.remove()
    assert torch.bfloat16 in dtypes  # the matmuls ran in bf16
    assert torch.isfinite(torch.tensor(history[-1].train_loss))
    assert any(not torch.equal(before[n], p) for n, p in _weights(model).items())
    assert all(p.dtype == torch.float32 for p in trainable(model).values())  # the weights stay fp32


@pytest.mark.parametrize("kind", KINDS)
def test_nan_loss_stops_within_the_named_step_range(kind: str, monkeypatch) -> None:
    c = case(kind)
    model = c.model()
    calls = {"n": 0}
    poisoned = 1  # the loss of the second training step is NaN
    step = c.task_type.training_step

    def poison(*args, **kwargs):
        loss, hits = step(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == poisoned + 1 else loss), hits

    monkeypatch.setattr(c.task_type, "training_step", poison)
    trainer = _trainer(c, model, _cfg(epochs=3))
    steps_per_epoch = trainer.steps_per_epoch(c.train_set)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.fit(c.train_set)
    message = str(err.value)
    assert "epoch 1" in message, message
    first, _, last = message.split("step")[-1].strip(" s").split(";")[0].partition("-")
    first, last = int(first), int(last or first)
    assert first <= poisoned + 1 <= last <= steps_per_epoch
    assert calls["n"] == last  # no step ran after the check that saw the NaN
