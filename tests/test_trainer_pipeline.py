"""The trainer's device-side input pipeline: same batches as the DataLoader, no host sync per step,
and a compiled model that compiles once (fixed shapes: the last short batch padded and masked)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import vpeft
from vpeft.train import TrainConfig
from vpeft.train import trainer as trainer_mod
from vpeft.train.trainer import Trainer

from conftest import make_backbone

N, CLASSES = 40, 5  # 40 = 2 full batches of 16 + a short one of 8


class Streamed(Dataset):
    """The same samples as a plain Dataset: the trainer must fall back to a DataLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _data(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def _trainer(**cfg) -> Trainer:
    torch.manual_seed(0)
    model = vpeft.apply(make_backbone("vit"), "lora", rank=2)
    config = dict(epochs=2, warmup_epochs=0, batch_size=16, lr=1e-2, drop_path=0.0, device="cpu")
    return Trainer(model, TrainConfig(**{**config, **cfg}), progress=False)


def test_device_batches_train_exactly_like_the_dataloader() -> None:
    x, y = _data()
    held, streamed = _trainer(), _trainer()
    held.fit(TensorDataset(x, y))
    streamed.fit(Streamed(x, y))
    assert held._device_sets and next(iter(held._device_sets.values()))[1] is not None
    assert next(iter(streamed._device_sets.values()))[1] is None  # it really took the DataLoader path
    for (name, a), b in zip(held.params.items(), streamed.params.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h.train_loss for h in held.history] == pytest.approx([h.train_loss for h in streamed.history], abs=1e-6)
    assert held.evaluate(TensorDataset(x, y)) == streamed.evaluate(Streamed(x, y))


def test_no_host_sync_per_step(monkeypatch) -> None:
    monkeypatch.setattr(trainer_mod, "NAN_CHECK_EVERY", 2)
    x, y = _data()
    big = TensorDataset(x.repeat(4, 1, 1, 1), y.repeat(4))  # 160 samples: 10 steps per epoch
    trainer = _trainer(epochs=1)
    calls = {"sync": 0}

    def counting(real):
        def wrapper(self):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(("trainer.py", "batches.py")):  # the optimizer's CPU step counters are no sync
                calls["sync"] += 1
            return real(self)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counting(torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting(torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "__bool__", counting(torch.Tensor.__bool__))
    trainer.fit(big)
    # the shuffle's permutation (a CPU tensor), checks after steps 1, 2, 4, 6, 8, 10, the epoch's totals:
    # a fixed few per check, never one per step
    assert calls["sync"] <= 9, calls


def test_nan_is_caught_between_checks_with_the_step_range(monkeypatch) -> None:
    monkeypatch.setattr(trainer_mod, "NAN_CHECK_EVERY", 3)
    x, y = _data()
    trainer = _trainer(epochs=1, lr=1e30)
    with pytest.raises(trainer_mod.TrainingDivergedError, match=r"loss became nan at epoch 1, steps 2-3"):
        trainer.fit(TensorDataset(x.repeat(2, 1, 1, 1), y.repeat(2)))


def test_compiled_model_compiles_once(monkeypatch) -> None:
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(trainer_mod.torch, "compile", functools.partial(torch.compile, backend="eager"))
    x, y = _data()
    trainer = _trainer(epochs=1, compile=True)
    trainer.fit(TensorDataset(x, y))
    trainer.evaluate(TensorDataset(x[:10], y[:10]))  # a split shorter than one batch: padded too
    graphs = counters["stats"]["unique_graphs"]
    trainer.cfg.epochs = 3
    trainer.fit(TensorDataset(x, y), resume=False)
    trainer.evaluate(TensorDataset(x[:10], y[:10]))
    assert counters["stats"]["unique_graphs"] == graphs, "a later epoch recompiled"
    assert trainer.compile_seconds is not None and trainer.compile_seconds > 0
    padded = trainer.history[-1]
    assert padded.images_per_s > 0 and padded.train_acc <= 1.0


def test_padded_batch_gives_the_unpadded_gradient() -> None:
    x, y = _data()
    a, b = _trainer(epochs=1), _trainer(epochs=1)
    a.fit(TensorDataset(x, y))
    b.cfg.compile = True  # only padding, no compiler: the masked loss must equal the plain one
    b.forward = b.train_forward = b.model
    b.fit(TensorDataset(x, y))
    for (name, pa), pb in zip(a.params.items(), b.params.values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
