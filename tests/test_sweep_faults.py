"""Sweeps under faults: SIGKILL at random moments, two sweeps on one folder, a killed parent of workers,
a full disk, corrupt records. Each sweep runs in its own process (tests/sweep_driver.py)."""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from datagen import make_vtab_task
from vpeft.bench import run_jobs
from vpeft.bench import sweep as sweep_mod
from vpeft.report.leaderboard import collect_records

run_mod = importlib.import_module("vpeft.train.run")

DRIVER = Path(__file__).with_name("sweep_driver.py")
EXPECTED_RUNS = 8  # linear, bitfit x 2 tasks x seeds 0, 1


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    for i, name in enumerate(("t_a", "t_b")):
        make_vtab_task(root / name, n_train=32, n_val=8, n_test=16, seed=10 + i)
    return root


def _start(tasks: Path, out: Path, trace: Path, jobs: int = 1, barrier: tuple[Path, int] | None = None
           ) -> subprocess.Popen:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(DRIVER), str(tasks), str(out), str(trace), str(jobs)]
    if barrier is not None:
        cmd += [str(barrier[0]), str(barrier[1])]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


def _final_state(out: Path) -> dict[str, dict]:
    """folder name -> record, checking every record file is whole JSON and nothing half-written is left."""
    records = {}
    for path in out.glob("runs/*/*/*/result.json"):
        assert not path.parent.name.startswith("."), f"a staging folder holds a record: {path}"
        records[path.parent.name + "@" + path.parent.parent.name] = json.loads(path.read_text())
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".staging", ".old"))]
    assert not leftovers, leftovers
    return records


def _table(records: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["status"], r["method"], r["task"], r["seed"], r["run_key"], r["top1"], r["trainable_params"])
            for k, r in records.items()}  # fmt: skip


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tasks, tmp_path) -> None:
    reference = tmp_path / "reference"
    _finish(_start(tasks, reference, tmp_path / "ref.trace"))
    expected = _table(_final_state(reference))
    assert len(expected) == EXPECTED_RUNS and all(v[0] == "ok" for v in expected.values())

    out, trace, rng = tmp_path / "killed", tmp_path / "killed.trace", random.Random(7)
    kills = 0
    for _ in range(6):
        proc = _start(tasks, out, trace)
        time.sleep(rng.uniform(2.0, 9.0))  # imports take ~3 s: kills land before, during and between runs
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        for path in out.glob("runs/*/*/*/result.json"):  # every record on disk is whole at every moment
            json.loads(path.read_text())
    output = _finish(_start(tasks, out, trace))
    assert "COUNTS" in output and kills >= 3
    assert _table(_final_state(out)) == expected
    finished_runs = [line.split()[0] for line in trace.read_text().splitlines()]
    assert set(finished_runs) == {k.split("@")[0] for k in expected}


def test_two_sweeps_on_one_folder_train_each_run_once(tasks, tmp_path) -> None:
    out, trace = tmp_path / "shared", tmp_path / "shared.trace"
    barrier = (tmp_path / "barrier", 2)  # both sweeps start together, whatever their import times
    a, b = _start(tasks, out, trace, barrier=barrier), _start(tasks, out, trace, barrier=barrier)
    outputs = _finish(a) + _finish(b)
    trained = [line.split()[0] for line in trace.read_text().splitlines()]
    assert len(trained) == EXPECTED_RUNS and len(set(trained)) == EXPECTED_RUNS, trained
    assert len({line.split()[1] for line in trace.read_text().splitlines()}) == 2, "one sweep did everything"
    assert "another process" in outputs
    records = _final_state(out)
    assert len(records) == EXPECTED_RUNS and all(r["status"] == "ok" for r in records.values())


def test_workers_die_with_a_killed_sweep(tasks, tmp_path) -> None:
    proc = _start(tasks, tmp_path / "out", tmp_path / "trace", jobs=2)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 60
    workers: list[psutil.Process] = []
    while time.time() < deadline and len(workers) < 2:
        workers = [c for c in parent.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
        time.sleep(0.2)
    assert len(workers) >= 2, "the sweep did not start its workers"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    _gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived the killed sweep: {[p.pid for p in alive]}"


def test_full_disk_fails_runs_without_aborting_the_sweep(tasks, tmp_path, monkeypatch) -> None:
    from sweep_driver import plan

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(run_mod, "write_json_atomic", disk_full)
    monkeypatch.setattr(sweep_mod, "write_json_atomic", disk_full)
    p = plan(tasks, tmp_path / "out")
    p.methods = ["linear"]
    p.seeds = [0]
    log: list[str] = []
    counts = run_jobs(p.final_jobs(), log=log.append)
    assert counts["failed"] == 2 and counts["done"] == 0
    assert sum("No space left" in line for line in log if "FAILED" in line) == 2
    assert not [x for x in (tmp_path / "out").rglob("*") if x.name.endswith((".tmp", ".staging"))]


@pytest.mark.parametrize("content", ["{torn", "[1, 2]", '"ok"', '{"status": "ok"}', ""])
def test_corrupt_record_is_rerun_and_never_crashes_the_report(tasks, tmp_path, content) -> None:
    from sweep_driver import plan
    from vpeft.report import write_report

    p = plan(tasks, tmp_path / "out")
    p.methods, p.seeds = ["linear"], [0]
    jobs = p.final_jobs()
    assert run_jobs(jobs, log=lambda _: None)["done"] == 2
    (jobs[0].run_dir / "result.json").write_text(content)
    ignored: dict[str, int] = {}
    assert len(collect_records(tmp_path / "out", None, ignored)) == 1 and sum(ignored.values()) == 1
    write_report(tmp_path / "out")  # no crash on the damaged record
    counts = run_jobs(jobs, log=lambda _: None)
    assert counts["done"] == 1 and counts["skipped"] == 1  # the damaged run is run again


def test_json_write_failure_leaves_no_temporary_and_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "result.json"
    run_mod.write_json_atomic(target, {"status": "ok", "top1": 1.0})
    with pytest.raises(TypeError):
        run_mod.write_json_atomic(target, {"status": "ok", "bad": object()})
    assert json.loads(target.read_text()) == {"status": "ok", "top1": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
