"""A sweep in its own process, for the kill, concurrency and worker tests.

    python sweep_driver.py TASKS_ROOT OUT TRACE [JOBS [BARRIER_DIR PARTIES]]

Runs linear and bitfit x the tasks under TASKS_ROOT x seeds 0, 1 on a tiny random ViT, one torch
thread. Each run that really trains appends "<run folder> <pid>" to TRACE. With BARRIER_DIR, the sweep
starts only once PARTIES drivers have finished their imports (so concurrent sweeps really overlap).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import torch

from vpeft.bench import SweepPlan, run_jobs, write_manifest
from vpeft.bench.suites import Suite, SuiteTask

run_mod = importlib.import_module("vpeft.train.run")  # the module, not vpeft.train's run function

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
TRAIN = {"epochs": 2, "warmup_epochs": 0, "batch_size": 16, "lr": 3e-3, "weight_decay": 1e-4, "drop_path": 0.0}


def plan(tasks_root: Path, out: Path) -> SweepPlan:
    tasks = [SuiteTask(p.name, "natural", f"vtab1k:{p}") for p in sorted(tasks_root.iterdir()) if p.is_dir()]
    return SweepPlan(suite=Suite("custom", tasks, {"train": TRAIN}), model="vit_tiny_patch16_224",
                     methods=["linear", "bitfit"], seeds=[0, 1], mode="final", out=out, pretrained=False,
                     model_args=TINY_VIT)  # fmt: skip


def wait_for_parties(barrier: Path, parties: int, timeout: float = 240.0) -> None:
    """Announce this process under BARRIER and wait until PARTIES processes have announced themselves."""
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier {barrier}: fewer than {parties} drivers arrived in {timeout:.0f} s")
        time.sleep(0.05)


def main() -> None:
    tasks_root, out, trace = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    jobs_in_parallel = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(1)
    real = run_mod._train_and_record

    def traced(spec, task_type, options, task, model, identity, key, out_dir, work, **kw):
        with open(trace, "a") as f:
            f.write(f"{Path(out_dir).name} {os.getpid()}\n")
        return real(spec, task_type, options, task, model, identity, key, out_dir, work, **kw)

    run_mod._train_and_record = traced
    if len(sys.argv) > 6:
        wait_for_parties(Path(sys.argv[5]), int(sys.argv[6]))
    p = plan(tasks_root, out)
    jobs = p.final_jobs()
    write_manifest(p, jobs)
    executor = None
    if jobs_in_parallel > 1:
        from vpeft.bench.executors import process_executor

        executor = process_executor(jobs_in_parallel, threads_per_job=1)
    counts = run_jobs(jobs, executor, log=lambda line: print(line, flush=True))
    print(f"COUNTS {counts}", flush=True)


if __name__ == "__main__":
    main()
