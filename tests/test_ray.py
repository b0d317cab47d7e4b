"""Sweeps through a local Ray instance: the same records as the local executor; a killed worker fails one run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from datagen import make_vtab_task
from vpeft.bench import SweepPlan, run_jobs
from vpeft.bench.suites import Suite, SuiteTask

ray = pytest.importorskip("ray")
from vpeft.bench.executors import ray_executor  # noqa: E402

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
TRAIN = {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "drop_path": 0.0}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("raysuite")
    tasks = [SuiteTask(n, "g", f"vtab1k:{make_vtab_task(root / n, n_train=32, n_val=8, n_test=16, seed=i)}")
             for i, n in enumerate(["t1", "t2"])]  # fmt: skip
    yield Suite("custom", tasks, {"train": TRAIN, "method_overrides": {"full": {"train": {"epochs": 100}}}})
    if ray.is_initialized():
        ray.shutdown()


def _plan(suite, out, methods) -> SweepPlan:
    return SweepPlan(suite=suite, model="vit_tiny_patch16_224", methods=list(methods), seeds=[0], mode="final",
                     out=out, pretrained=False, model_args=TINY_VIT)  # fmt: skip


def _records(out) -> dict:
    return {p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.glob("runs/*/*/*/result.json")}


def test_ray_sweep_matches_local(suite, tmp_path) -> None:
    local, remote = _plan(suite, tmp_path / "local", ["bitfit"]), _plan(suite, tmp_path / "ray", ["bitfit"])
    run_jobs(local.final_jobs(), log=lambda _: None)
    counts = run_jobs(remote.final_jobs(), executor=ray_executor(), log=lambda _: None)
    assert counts["done"] == 2 and counts["failed"] == 0
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert a.keys() == b.keys() and all(b[k]["status"] == "ok" for k in b)
    for k in a:
        assert abs(a[k]["final_train_loss"] - b[k]["final_train_loss"]) < 1e-3
    # a sweep started with Ray finishes with the local executor, and vice versa: nothing is redone
    assert run_jobs(remote.final_jobs(), log=lambda _: None)["skipped"] == 2


def test_killed_worker_fails_only_its_run(suite, tmp_path) -> None:
    plan = _plan(suite, tmp_path / "out", ["linear", "full"])
    victim_job = next(j for j in plan.final_jobs() if (j.method, j.task) == ("full", "t1"))
    victim = victim_job.run_dir / "worker.pid"
    victim_key = victim_job.run_dir.relative_to(tmp_path / "out").as_posix()
    killed = {}

    def kill_when_started() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            try:
                pid = victim.read_text().strip()
            except FileNotFoundError:
                pid = ""
            if pid:  # the worker writes its pid, then runs the job: kill it mid-run
                os.kill(int(pid), signal.SIGKILL)
                killed["pid"] = True
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_started, daemon=True)
    watcher.start()
    counts = run_jobs(plan.final_jobs(), executor=ray_executor(), log=lambda _: None)
    watcher.join(timeout=1)
    assert killed, "the victim run never started"
    assert counts == {"total": 4, "skipped": 0, "done": 3, "failed": 1}
    records = _records(tmp_path / "out")
    assert records[victim_key]["status"] == "failed"
    assert "Ray task failed" in records[victim_key]["error"]
    assert all(r["status"] == "ok" for k, r in records.items() if k != victim_key)
    counts = run_jobs(plan.final_jobs(), executor=ray_executor(), log=lambda _: None)
    assert counts == {"total": 4, "skipped": 3, "done": 1, "failed": 0}
