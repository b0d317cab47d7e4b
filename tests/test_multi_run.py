"""vpeft train-multi: one adapter per task trained jointly, one record per task, delta-m in the report."""

from __future__ import annotations

import json

import pytest

from report_fixtures import record
from vpeft.cli import main
from vpeft.errors import ConfigError
from vpeft.multi import delta_m
from vpeft.multi.run import MULTITASK_MANIFEST, MultiTaskSpec
from vpeft.report.leaderboard import build_leaderboard, to_csv, to_markdown

TASKS = ("sklearn_digits", "count")
COMMON = ["--model", "vpeft/vit-mini", "--mode", "tune", "--epochs", "1", "--warmup-epochs", "0",
          "--batch-size", "64"]  # fmt: skip


def multitask(record_: dict, key: str, tasks: list[str]) -> dict:
    return {**record_, "multitask": {"run_key": key, "tasks": tasks, "trainable_params_total": 1}}


def test_delta_m_rows_by_hand() -> None:
    records = [
        record("lora", "a", 0, 80.0, 100), record("lora", "b", 0, 50.0, 100), record("lora", "c", 0, 40.0, 100),
        record("full", "a", 0, 70.0, 10**6), record("full", "b", 0, 60.0, 10**6),
        multitask(record("lora", "a", 0, 84.0, 150), "m1", ["a", "b"]),
        multitask(record("lora", "b", 0, 45.0, 150), "m1", ["a", "b"]),
        multitask(record("mtlora", "a", 0, 77.0, 150), "m2", ["a", "c"]),  # no single-task mtlora: no delta-m
        multitask(record("mtlora", "c", 0, 41.0, 150), "m2", ["a", "c"]),
    ]  # fmt: skip
    board = build_leaderboard(records)
    rows = {r.method: r for r in board.rows}
    assert set(rows) == {"lora", "full", "lora (multi-task)", "mtlora (multi-task)"}
    assert rows["lora (multi-task)"].delta_m == pytest.approx((4 / 80 - 5 / 50) / 2 * 100)  # -2.5 %
    assert rows["lora (multi-task)"].delta_m_baseline == "lora" and rows["lora (multi-task)"].multitask
    assert rows["mtlora (multi-task)"].delta_m is None and rows["lora"].delta_m is None
    md = to_markdown(board)
    assert "Δm (%)" in md and "| -2.50 |" in md and "mean relative gain" in md
    assert "delta_m" in to_csv(board).splitlines()[0]
    # another baseline: full fine-tuning; mtlora's task c has no full run -> none
    board = build_leaderboard(records, delta_m_baseline="full")
    rows = {r.method: r for r in board.rows}
    assert rows["lora (multi-task)"].delta_m == pytest.approx(delta_m({"a": 84, "b": 45}, {"a": 70, "b": 60}))
    assert rows["mtlora (multi-task)"].delta_m is None
    # no multi-task run: the table is as before, without the column
    assert "Δm" not in to_markdown(build_leaderboard(records[:5]))


def test_spec_refusals() -> None:
    with pytest.raises(ConfigError, match="two or more tasks"):
        MultiTaskSpec(data=["mini:mnist"])
    with pytest.raises(ConfigError, match="given twice"):
        MultiTaskSpec(data=["mini:mnist", "mini:mnist"])
    assert main(["train-multi", "--data", "mini:mnist", "--data", "mini:count", "--method", "full", "--out", "x"]) == 2
    assert main(["train-multi", "--data", "mini:mnist", "--data", "mini:count", "--method", "gps", "--out", "x"]) == 2


def test_train_multi_records_each_task_and_the_report_shows_delta_m(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    bench = ["bench", "--suite", "mini", "--tasks", ",".join(TASKS), "--methods", "lora", "--mode", "tune",
             "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "64", "--out", str(out)]  # fmt: skip
    assert main(bench) == 0
    train = ["train-multi", *COMMON, "--method", "mtlora", "--opt", "rank=2", "--opt", "task_rank=2",
             "--out", str(out), "--quiet", *(a for t in TASKS for a in ("--data", f"mini:{t}"))]  # fmt: skip
    assert main(train) == 0
    printed = capsys.readouterr().out
    assert "mtlora multi-task run" in printed and all(t in printed for t in TASKS)
    paths = sorted(out.glob("runs/mtlora+multitask/*/*/result.json"))
    assert [p.parent.parent.name for p in paths] == sorted(TASKS)
    records = [json.loads(p.read_text()) for p in paths]
    shared = {r["multitask"]["run_key"] for r in records}
    assert len(shared) == 1 and len({r["run_key"] for r in records}) == 2
    assert all(p.parent.name.endswith(shared.pop()) for p in paths[:1])
    for r in records:
        assert r["status"] == "ok" and r["method"] == "mtlora" and r["eval_split"] == "val"
        assert [t["task"] for t in r["identity"]["tasks"]] == list(TASKS)
        assert r["multitask"]["trainable_params_total"] > r["trainable_params"] > 0
    manifest = json.loads((out / MULTITASK_MANIFEST).read_text())
    assert manifest["runs"][0]["task_run_keys"] == [r["run_key"] for r in sorted(records, key=lambda r: TASKS.index(r["task"]))]  # fmt: skip
    # each task's adapter folder stands alone: vpeft eval scores it as the run did
    for path, r in zip(paths, records, strict=True):
        assert (path.parent / "README.md").is_file()
        argv = ["eval", "--model", "vpeft/vit-mini", "--adapter", str(path.parent), "--data", f"mini:{r['task']}",
                "--split", "val"]  # fmt: skip
        assert main(argv) == 0
        assert f"top-1 {r['top1']:.2f}%" in capsys.readouterr().out
    # the same command again reuses the finished run
    assert main(train) == 0
    assert "already finished" in capsys.readouterr().out
    # the report of the bench folder takes the multi-task runs in, with delta-m over the single-task LoRA runs
    assert main(["report", str(out), "--no-curves", "--delta-m-baseline", "lora"]) == 0
    md = (out / "leaderboard.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| mtlora (multi-task)"))
    single = {json.loads(p.read_text())["task"]: json.loads(p.read_text())["top1"] for p in out.glob("runs/lora/*/*/result.json")}  # fmt: skip
    expected = delta_m({r["task"]: r["top1"] for r in records}, single)
    assert line.rstrip(" |").endswith(f"{expected:+.2f}") and "Not in this table" not in md


def test_manifest_keeps_the_latest_run_per_method_task_set_and_seed(tmp_path) -> None:
    from vpeft.multi.run import _add_to_manifest, multitask_keys

    spec = MultiTaskSpec(data=["mini:mnist", "mini:count"], method="lora")
    _add_to_manifest(tmp_path, "old", spec, ["mnist", "count"], ["o1", "o2"])
    _add_to_manifest(tmp_path, "new", spec, ["mnist", "count"], ["n1", "n2"])  # another recipe: replaces
    other = MultiTaskSpec(data=["mini:mnist", "mini:count"], method="mtlora")
    _add_to_manifest(tmp_path, "mt", other, ["mnist", "count"], ["m1", "m2"])  # another method: kept beside
    assert multitask_keys(tmp_path) == {"n1", "n2", "m1", "m2"}
