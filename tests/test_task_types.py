"""The task-type seam: a new task type, written here and nowhere else in vpeft, trains and evaluates through
the one run (``vpeft.train.run``), the one Trainer and the one record writer, and a saved task model of it
reloads. Also: records and run keys written before the one-trainer change stay valid.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vpeft.tasks import TaskOptions, TaskType, base, get_task_type, load_task_model, register_task_type
from vpeft.train import TrainConfig
from vpeft.train.run import RunSpec, run

VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
FIXTURES = Path(__file__).parent / "fixtures" / "records_v2"


@dataclass
class BrightnessTask:
    """Images whose target is their mean brightness in [0, 1]; splits of (image seed, target) string pairs."""

    name: str = "brightness"
    kind: str = "toy"
    root: str = "toy"
    num_classes: int = 1
    splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def split(self, name: str) -> list[tuple[str, str]]:
        return self.splits[name]


class BrightnessData(Dataset):
    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed, target = self.pairs[i]
        g = torch.Generator().manual_seed(int(seed))
        image = float(target) + 0.05 * torch.randn(3, 32, 32, generator=g)
        return image, torch.tensor(float(target))


@dataclass
class BrightnessOptions(TaskOptions):
    hidden: int = 8


class BrightnessModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(backbone.num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(-1)


class Brightness(TaskType):
    """A regression task type: predict an image's mean brightness; the metric is 100 * R^2."""

    name = "toy-brightness"
    primary_metric = "r2"
    metric_names = ("r2",)
    options_class = BrightnessOptions
    data_kinds = ("toy",)

    def load_task(self, spec: str, num_classes: int | None = None) -> BrightnessTask:
        n = int(spec.partition(":")[2] or 16)
        pairs = [(str(i), f"{(i * 7 % n) / n:.4f}") for i in range(n)]
        half = n // 2
        return BrightnessTask(splits={"train": pairs[:half], "val": pairs[half:], "trainval": pairs[: n - 4],
                                      "test": pairs[n - 4 :]})  # fmt: skip

    def dataset(self, task, split, model, options, *, train, data=None) -> Dataset:
        return BrightnessData(task.split(split))

    def batch_size(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def build(self, backbone_model: nn.Module, num_classes: int, options: TaskOptions) -> nn.Module:
        return BrightnessModel(backbone_model, options.hidden)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], **kwargs: Any) -> dict[str, float]:
        predictions, targets = [], []
        for x, y in batches:
            predictions.append(model(x).float())
            targets.append(y)
        p, t = torch.cat(predictions), torch.cat(targets)
        return {"r2": 100.0 * float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum().clamp_min(1e-12))}


@pytest.fixture
def brightness():
    register_task_type(Brightness)
    yield get_task_type(Brightness.name)
    base._TASK_TYPES.pop(Brightness.name)


def test_a_new_task_type_runs_through_the_one_run(brightness, tmp_path) -> None:
    train = TrainConfig(epochs=3, warmup_epochs=0, batch_size=4, lr=3e-3, drop_path=0.0, device="cpu")
    spec = RunSpec(model="vit_tiny_patch16_224", model_args=VIT_ARGS, pretrained=False, data="toy:16", method="lora",
                   task_type=Brightness.name, task_options={"hidden": 4}, mode="tune", train=train)  # fmt: skip
    record = run(spec, tmp_path / "run", progress=False)
    assert record["status"] == "ok" and record["task_type"] == Brightness.name and record["eval_split"] == "val"
    assert record["primary_metric"] == "r2" and record["score"] == record["r2"] == record["metrics"]["r2"]
    assert record["head_params"] == (48 * 4 + 4) + (4 * 1 + 1)  # Linear(48, 4) + Linear(4, 1)
    assert record["identity"]["task_type"] == Brightness.name and record["task_options"] == {"hidden": 4}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3] and log[0]["train_acc"] is None
    assert log[-1]["val_acc"] == pytest.approx(record["r2"] / 100)
    # the saved task model reloads onto a fresh backbone and scores the same
    import timm

    torch.manual_seed(0)  # the run's seed: its --no-pretrained backbone's random weights
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    model = load_task_model(fresh, tmp_path / "run")
    task = brightness.load_task("toy:16")
    batches = torch.utils.data.DataLoader(BrightnessData(task.split("val")), batch_size=4)
    model.eval()
    assert brightness.evaluate(model, batches)["r2"] == pytest.approx(record["r2"], abs=1e-4)
    # a second run of the same spec is reused, another option is another run
    assert run(spec, tmp_path / "run", reuse_finished=True, progress=False)["reused"]
    other = RunSpec(**{**spec.to_dict(), "task_options": {"hidden": 6}})
    assert run(other, tmp_path / "other", progress=False)["run_key"] != record["run_key"]


def test_an_unknown_task_type_names_the_registered_ones() -> None:
    from vpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="classification.*segmentation"):
        RunSpec(data="mini:mnist", task_type="toy-brightness")


@pytest.mark.parametrize("folder", sorted(p.name for p in FIXTURES.iterdir()) if FIXTURES.is_dir() else [])
def test_records_written_before_the_one_trainer_keep_their_run_keys(folder: str, tmp_path) -> None:
    """A run folder written by the previous version (classification and dense): the same spec today has the same
    run key, so a sweep reuses it instead of training it again."""
    shutil.copytree(FIXTURES / folder, tmp_path / folder)
    saved = json.loads((tmp_path / folder / "result.json").read_text())
    import yaml

    spec = RunSpec(**yaml.safe_load((tmp_path / folder / "config.yaml").read_text()))
    record = run(spec, tmp_path / folder, reuse_finished=True, progress=False)
    assert record.get("reused") and record["run_key"] == saved["run_key"]
