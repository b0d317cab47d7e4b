"""Where a sweep's runs execute: worker processes on this machine, or Ray tasks across a cluster.

Every executor takes the unfinished jobs and calls ``on_done(job, record)`` as each finishes; the
records live in the run folders either way, so a sweep started with one executor can be finished
with another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vpeft.bench.sweep import RunJob, execute_job, write_failed
from vpeft.errors import ConfigError

OnDone = Callable[[RunJob, dict[str, Any]], None]


def _init_worker(threads: int, parent: int) -> None:
    """Worker set-up: torch threads, and exit when the sweep's process dies (even by SIGKILL)."""
    import threading
    import time

    import torch

    torch.set_num_threads(threads)
    try:  # Linux: the kernel sends SIGKILL to this worker when its parent dies
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # elsewhere (and as a second guard): poll the parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="vpeft-parent-watch").start()


def process_executor(jobs_in_parallel: int, threads_per_job: int | None = None):
    """Run up to ``jobs_in_parallel`` jobs at once in worker processes, each with its own torch threads.

    Small models use a CPU's cores better as several single-threaded runs than as one multi-threaded run.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs_in_parallel)

    def execute(jobs: list[RunJob], on_done: OnDone) -> None:
        if not jobs:
            return
        pool = ProcessPoolExecutor(jobs_in_parallel, mp_context=get_context("spawn"), initializer=_init_worker,
                                   initargs=(threads, os.getpid()))  # fmt: skip
        try:
            pending = {pool.submit(execute_job, job): job for job in jobs}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        record = future.result()
                    except Exception as exc:
                        record = write_failed(job, f"worker process failed: {exc!r}")
                    on_done(job, record)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    return execute


def _ray_run(job: RunJob) -> dict[str, Any]:
    """A Ray task: note the worker's pid in the run folder (to find or stop it), then run the job."""
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(job.run_dir) / "worker.pid").write_text(f"{os.getpid()}\n")
    try:
        return execute_job(job)
    finally:
        (Path(job.run_dir) / "worker.pid").unlink(missing_ok=True)


def ray_executor(address: str | None = None, cpus_per_job: float = 1.0, gpus_per_job: float | None = None):
    """Submit every job as a Ray task: one GPU each where the cluster has GPUs, else ``cpus_per_job`` CPUs.

    ``address``: ``auto`` or ``HOST:PORT`` of a running cluster; None starts a local Ray instance.
    The output folder must be on a filesystem that every node sees.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'vpeft[ray]'") from None

    def execute(jobs: list[RunJob], on_done: OnDone) -> None:
        if not jobs:
            return
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cpus_per_job)))}})  # fmt: skip
        gpus = gpus_per_job if gpus_per_job is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
        remote = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=0)(_ray_run)
        pending = {remote.remote(job): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    record = ray.get(done[0])
                except Exception as exc:
                    record = write_failed(job, f"Ray task failed: {type(exc).__name__}: {str(exc)[:300]}")
                on_done(job, record)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    return execute
