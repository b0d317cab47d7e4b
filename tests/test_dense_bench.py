"""The dense suites in the benchmark: suite loading, sweep specs and keys, choice on val, the dense leaderboard."""

from __future__ import annotations

import json

import pytest

from dense_data import make_ade_layout
from vpeft.bench import SweepPlan, load_suite
from vpeft.bench.sweep import score, score_text
from vpeft.errors import ConfigError
from vpeft.report import write_report


def _plan(suite, tmp_path, methods=("linear", "lora")) -> SweepPlan:
    return SweepPlan(suite=suite, model=suite.defaults["model"], methods=list(methods), seeds=[0], mode="final",
                     out=tmp_path / "bench", model_args=dict(suite.defaults.get("model_args") or {}))  # fmt: skip


def test_mini_dense_suite_runs_segmentation_with_its_recipe(tmp_path) -> None:
    suite = load_suite("mini-dense")
    assert next((t.name, t.task_type, t.data) for t in suite.tasks) == (
        "mini-seg",
        "segmentation",
        "mini-dense:segmentation",
    )
    plan = _plan(suite, tmp_path)
    spec = plan.spec("lora", "mini-seg", 0, "final")
    assert spec.task_type == "segmentation" and spec.task_options == suite.defaults["task_options"]["segmentation"]
    assert spec.train.epochs == suite.defaults["train"]["epochs"]
    det = plan.spec("lora", "mini-det", 0, "final")
    assert det.task_type == "detection" and det.task_options == suite.defaults["task_options"]["detection"]
    jobs = plan.final_jobs()
    assert len({j.key for j in jobs}) == 4  # 2 methods x (segmentation, detection)
    # another head width is another run
    suite.defaults["task_options"]["segmentation"]["channels"] = 8
    assert _plan(suite, tmp_path).final_jobs()[0].key != jobs[0].key


def test_classification_suite_specs_are_unchanged(tmp_path) -> None:
    suite = load_suite("mini", tasks=["mnist"])
    spec = _plan(suite, tmp_path).spec("lora", "mnist", 0, "final")
    assert spec.task_type == "classification" and spec.task_options == {}
    assert suite.defaults["suite"] == "mini"


def test_ade20k_suite_reads_its_root(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--root"):
        load_suite("ade20k")
    root = make_ade_layout(tmp_path / "ADEChallengeData2016")
    suite = load_suite("ade20k", str(root))
    plan = _plan(suite, tmp_path)
    spec = plan.spec("lora", "ade20k", 0, "final")
    assert spec.data == f"ade20k:{root}" and spec.model_args == {"img_size": 512}
    assert spec.train.lr == 3e-4 and spec.train.weight_decay == 0.01 and spec.train.min_lr == 0.0
    assert spec.task_options["warmup_iters"] == 1500 and spec.task_options["schedule"] == "poly"
    assert plan.task("ade20k").num_classes == 150


def _record(method: str, miou: float, seed: int = 0, task: str = "mini-seg") -> dict:
    return {"status": "ok", "method": method, "task": task, "seed": seed, "mode": "final", "eval_split": "test",
            "task_type": "segmentation", "primary_metric": "mIoU", "mIoU": miou, "pixel_acc": 90.0,
            "metrics": {"mIoU": miou, "pixel_acc": 90.0, "mean_acc": 50.0}, "trainable_params": 1000 * len(method),
            "head_params": 5000, "train_seconds": 12.0, "images_per_s": 40.0, "peak_memory_mb": 300.0,
            "memory_kind": "cpu_process_max_rss", "model": "vpeft/vit-mini", "run_key": f"k{method}{seed}"}  # fmt: skip


def test_dense_leaderboard_ranks_by_miou_with_seeds(tmp_path) -> None:
    records = [_record("lora", 40.0), _record("lora", 42.0, seed=1), _record("linear", 30.0), _record("full", 45.0)]
    for r in records:
        folder = tmp_path / "runs" / r["method"] / r["task"] / f"seed{r['seed']}-{r['run_key']}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(r))
    (tmp_path / "bench.json").write_text(json.dumps({"suite": "mini-dense", "model": "vpeft/vit-mini",
                                                     "runs": [{"run_key": r["run_key"]} for r in records]}))  # fmt: skip
    paths = write_report(tmp_path)
    text = paths["markdown"].read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | mIoU | pixel_acc | mean_acc | trainable (M)")
    assert [line.split(" | ")[0][2:] for line in lines[1:]] == ["full", "lora", "linear"]
    assert "41.00 ± 1.41" in text and "mini-seg (segmentation)" in text
    assert "task,task_type,method,mIoU_mean" in paths["csv"].read_text()


def test_published_ade20k_numbers_sit_beside_ours_only_on_ade20k(tmp_path) -> None:
    from vpeft.report.dense import dense_markdown

    ours = [_record("lora", 10.0, task="ade20k")]
    assert "V-PETL mIoU" in dense_markdown(ours, suite="ade20k") and "50.34" in dense_markdown(ours, suite="ade20k")
    assert "V-PETL" not in dense_markdown([_record("lora", 10.0)], suite="mini-dense")


def test_scores_follow_the_primary_metric() -> None:
    assert score(_record("lora", 33.0)) == 33.0 and score_text(_record("lora", 33.0)) == "mIoU 33.00"
    assert score({"top1": 71.5}) == 71.5 and score_text({"top1": 71.5}) == "top-1 71.50%"


def test_poly_and_cosine_schedules_after_linear_warmup() -> None:
    from vpeft.tasks import get_task_type
    from vpeft.train import TrainConfig
    from vpeft.train.trainer import lr_at

    cfg = TrainConfig(epochs=1, warmup_epochs=0, lr=1.0, warmup_lr=0.0, min_lr=0.0)
    seg = get_task_type("segmentation")

    def schedule(**options):
        return seg.lr_schedule(seg.options(options))

    poly = schedule(schedule="poly", poly_power=1.0)
    assert [lr_at(s, 110, 10, cfg, poly) for s in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    square = schedule(schedule="poly", poly_power=2.0)
    assert lr_at(60, 110, 10, cfg, square) == pytest.approx(0.25)
    cosine = schedule(schedule="cosine")
    assert lr_at(60, 110, 10, cfg, cosine) == pytest.approx(0.5) and lr_at(35, 110, 10, cfg, cosine) > 0.5


def test_vpeft_tasks_lists_the_mini_dense_suite(capsys) -> None:
    from vpeft.cli import main

    assert main(["tasks", "mini-dense"]) == 0
    out = capsys.readouterr().out
    assert "mini-seg" in out and "| 6 " in out and "mini-dense:segmentation" in out


def _write_runs(tmp_path, records: list[dict]) -> None:
    for r in records:
        folder = tmp_path / "runs" / r["method"] / r["task"] / f"seed{r['seed']}-{r['run_key']}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(r))


def test_report_takes_metric_columns_from_the_task_type_registry(tmp_path) -> None:
    """result.json stores its metrics with sorted keys: the columns follow the task type's metric_names."""
    record = _record("lora", 40.0)
    record["metrics"] = dict(sorted(record["metrics"].items()))
    _write_runs(tmp_path, [record])
    text = write_report(tmp_path)["markdown"].read_text()
    assert "| method | mIoU | pixel_acc | mean_acc | trainable (M)" in text


def test_a_task_type_the_report_does_not_know_gets_its_own_table(tmp_path) -> None:
    """A new task type's runs are tabled with their own metrics beside classification's leaderboard."""
    depth = {**_record("lora", 0.0, task="nyu"), "task_type": "depth", "primary_metric": "delta1", "delta1": 80.0,
             "metrics": {"delta1": 80.0, "abs_rel": 0.2}, "run_key": "kdepth"}  # fmt: skip
    depth.pop("mIoU")
    classification = {"status": "ok", "method": "lora", "task": "cifar", "seed": 0, "mode": "final", "top1": 70.0,
                      "trainable_params": 1000, "train_seconds": 1.0, "model": "vpeft/vit-mini",
                      "run_key": "kcls"}  # fmt: skip
    _write_runs(tmp_path, [depth, classification])
    try:
        write_report(tmp_path, curves=False)
    except ImportError:  # no matplotlib (MissingDependencyError): the tables are written before the plots
        pass
    board = (tmp_path / "leaderboard.md").read_text()
    assert "cifar" in board and "nyu" not in board
    other = (tmp_path / "leaderboard-dense.md").read_text()
    assert "## nyu (depth)" in other and "| method | delta1 | abs_rel |" in other
