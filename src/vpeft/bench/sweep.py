"""A resumable sweep over (method, task, seed): one independent run each, one result record each.

Layout of an output folder::

    bench.json                                  the latest sweep: suite, model, protocol, its run keys
    runs/<method>/<task>/seed<k>-<key>/         a run folder (adapter, config.yaml, log.jsonl, result.json)
    tune/<method>/<task>/lr<..>_wd<..>-<key>/   tune-mode runs of --tune, and choice.json per (method, task)

``<key>`` hashes the run's whole spec (:mod:`vpeft.train.identity`): backbone and weights, method and
every option, recipe, data fingerprint, seed, mode, record version. A run whose ``result.json`` says
``status: ok`` with the same key is finished and never redone; a sweep with other options, another lr
or another seed gets other keys, so it runs anew in other folders and never reuses a stale record.
A failed or interrupted run is run again by the next call. Each run holds a lock on its folder while
it trains, so two sweeps on one folder never train the same run twice.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpeft.bench.suites import Suite
from vpeft.data import Task
from vpeft.errors import ConfigError, VPeftError
from vpeft.files import write_json_atomic
from vpeft.tasks import get_task_type
from vpeft.train.folders import RESULT, RunBusyError, read_record
from vpeft.train.identity import run_identity, run_key
from vpeft.train.run import RECORD_VERSION, RunSpec, run
from vpeft.train.trainer import TrainConfig

MANIFEST = "bench.json"


@dataclass
class RunJob:
    """One (method, task, seed) run: where it lives, the spec that defines it and the spec's key."""

    method: str
    task: str
    seed: int
    run_dir: Path
    spec: RunSpec
    key: str = ""

    @property
    def label(self) -> str:
        return f"{self.method} on {self.task} (seed {self.seed}, {self.spec.mode}, run {self.key})"


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None when it is missing, torn, or not a JSON object (treated as unfinished)."""
    return read_record(run_dir)


def is_finished(run_dir: Path, key: str | None = None) -> bool:
    """A finished record, of the run with this key when one is given."""
    record = read_result(run_dir)
    return record is not None and record.get("status") == "ok" and (key is None or record.get("run_key") == key)


def execute_job(job: RunJob, progress: bool = False, progress_lines: bool = True) -> dict[str, Any]:
    """Run one job; any error becomes a failed record (the sweep goes on). Ctrl-C propagates.

    A job another process is running returns ``status: busy`` and writes nothing. ``progress_lines``
    prints one line per epoch of the run (with the run's ETA).
    """
    epochs = job.spec.train.epochs
    started = time.time()

    def on_epoch(stats: Any) -> None:
        if not progress_lines:
            return
        eta = (time.time() - started) / stats.epoch * (epochs - stats.epoch)
        val = f", val {100 * stats.val_acc:.2f}%" if stats.val_acc is not None else ""
        print(f"    {job.method} on {job.task} (seed {job.seed}): epoch {stats.epoch}/{epochs}, "
              f"loss {stats.train_loss:.3f}{val}, {stats.images_per_s:.0f} img/s, run ETA {_fmt(eta)}", flush=True)  # fmt: skip

    try:
        return run(job.spec, job.run_dir, overwrite=True, reuse_finished=True, progress=progress, on_epoch=on_epoch)
    except KeyboardInterrupt:
        raise
    except RunBusyError as exc:
        return {"status": "busy", "method": job.method, "task": job.task, "seed": job.seed, "error": str(exc)}
    except Exception as exc:
        record = read_result(job.run_dir)
        if record is not None and record.get("status") == "ok":
            return {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}  # keep the finished one
        return write_failed(job, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=6))


def write_failed(job: RunJob, error: str, trace: str | None = None) -> dict[str, Any]:
    """Record a run as failed, with its error, so the sweep goes on and the next call reruns it.

    When even that record cannot be written (a full disk), the failure is returned, not raised.
    """
    record = {"status": "failed", "method": job.method, "task": job.task, "seed": job.seed, "mode": job.spec.mode,
              "run_key": job.key, "error": error}  # fmt: skip
    if trace:
        record["traceback"] = trace
    try:
        write_json_atomic(Path(job.run_dir) / RESULT, record)
    except OSError as exc:
        record["error"] += f" (and the failure record could not be written: {exc})"
    return record


@dataclass
class SweepPlan:
    """The resolved runs of a sweep, from a suite's defaults and the user's overrides."""

    suite: Suite
    model: str
    methods: list[str]
    seeds: list[int]
    mode: str
    out: Path
    train_overrides: dict[str, Any] = field(default_factory=dict)
    option_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    pretrained: bool = True
    pretrained_file: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    skip_bad_images: bool = False

    _tasks: dict[str, Task] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.methods = list(dict.fromkeys(self.methods))  # --methods a,a runs a once
        self.seeds = list(dict.fromkeys(self.seeds))

    def describe(self) -> dict[str, Any]:
        """What the sweep is (written to bench.json beside its run keys)."""
        return {
            "suite": self.suite.name,
            "model": self.model,
            "model_args": self.model_args,
            "pretrained": self.pretrained,
            "pretrained_file": self.pretrained_file,
            "mode": self.mode,
            "skip_bad_images": self.skip_bad_images,
            "methods": self.methods,
            "seeds": self.seeds,
            "train_overrides": self.train_overrides,
            "option_overrides": self.option_overrides,
        }

    def task(self, name: str) -> Task:
        if name not in self._tasks:
            entry = next(t for t in self.suite.tasks if t.name == name)
            self._tasks[name] = get_task_type(entry.task_type).load_task(entry.data)
        return self._tasks[name]

    def key(self, spec: RunSpec, task: str) -> str:
        return run_key(run_identity(spec, self.task(task), RECORD_VERSION))

    def _train_dict(self, method: str, task: str) -> dict[str, Any]:
        d = self.suite.defaults
        train = dict(d.get("train", {}))
        train.update((d.get("method_overrides", {}).get(method) or {}).get("train", {}))
        train.update((((d.get("task_overrides", {}) or {}).get(task) or {}).get(method) or {}).get("train", {}))
        train.update(self.train_overrides)
        return train

    def options(self, method: str) -> dict[str, Any]:
        opts = dict((self.suite.defaults.get("method_overrides", {}).get(method) or {}).get("options", {}))
        opts.update(self.option_overrides.get(method, {}))
        return opts

    def spec(self, method: str, task: str, seed: int, mode: str, lr_wd: tuple[float, float] | None = None) -> RunSpec:
        train = self._train_dict(method, task)
        train["seed"] = seed
        if lr_wd is not None:
            train["lr"], train["weight_decay"] = lr_wd
        entry = next(t for t in self.suite.tasks if t.name == task)
        options = dict((self.suite.defaults.get("task_options") or {}).get(entry.task_type) or {})
        options.update(((self.suite.defaults.get("task_overrides") or {}).get(task) or {}).get("task_options", {}))
        return RunSpec(
            model=self.model,
            model_args=self.model_args,
            data=entry.data,
            task_type=entry.task_type,
            task_options=options,
            method=method,
            options=self.options(method),
            mode=mode,
            pretrained=self.pretrained,
            pretrained_file=self.pretrained_file,
            skip_bad_images=self.skip_bad_images,
            train=TrainConfig(**train),
        )

    def tune_grid(self) -> list[tuple[float, float]]:
        grid = self.suite.defaults.get("tune_grid") or {}
        lrs, wds = grid.get("lr") or [None], grid.get("weight_decay") or [None]
        return list(itertools.product(lrs, wds))

    def final_jobs(self, chosen: dict[tuple[str, str], tuple[float, float]] | None = None) -> list[RunJob]:
        jobs = []
        for method, task, seed in itertools.product(self.methods, [t.name for t in self.suite.tasks], self.seeds):
            spec = self.spec(method, task, seed, self.mode, (chosen or {}).get((method, task)))
            key = self.key(spec, task)
            jobs.append(RunJob(method, task, seed, self.out / "runs" / method / task / f"seed{seed}-{key}", spec, key))
        return jobs

    def tune_jobs(self) -> list[RunJob]:
        jobs = []
        for method, task in itertools.product(self.methods, [t.name for t in self.suite.tasks]):
            for lr, wd in self.tune_grid():
                spec = self.spec(method, task, self.seeds[0], "tune", (lr, wd))
                key = self.key(spec, task)
                folder = self.out / "tune" / method / task / f"lr{lr:g}_wd{wd:g}-{key}"
                jobs.append(RunJob(method, task, self.seeds[0], folder, spec, key))
        return jobs


def write_manifest(plan: SweepPlan, jobs: list[RunJob]) -> None:
    """Record the sweep and its runs' keys in bench.json: `vpeft report` aggregates exactly these runs."""
    runs = [{"method": j.method, "task": j.task, "seed": j.seed, "run_key": j.key,
             "folder": str(j.run_dir.relative_to(plan.out))} for j in jobs]  # fmt: skip
    write_json_atomic(plan.out / MANIFEST, {**plan.describe(), "runs": runs})


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_jobs(
    jobs: list[RunJob],
    executor: Callable[[list[RunJob], Callable[[RunJob, dict[str, Any]], None]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every job without a finished record of its own key. Returns counts of done/failed/skipped/busy.

    ``skipped``: finished before this call; ``busy``: being run by another process now (not waited for).
    """
    todo = [j for j in jobs if not is_finished(j.run_dir, j.key)]
    skipped = len(jobs) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(jobs)} runs already finished (same spec), {len(todo)} to go")
    counts = {"total": len(jobs), "skipped": skipped, "done": 0, "failed": 0}
    started = time.time()

    def on_done(job: RunJob, record: dict[str, Any]) -> None:
        status = record.get("status")
        if status == "busy":
            counts["busy"] = counts.get("busy", 0) + 1
        elif status == "ok" and record.get("reused"):
            counts["skipped"] += 1  # another process finished it after this sweep started
        else:
            counts["done" if status == "ok" else "failed"] += 1
        finished = counts["done"] + counts["failed"] + counts.get("busy", 0) + counts["skipped"] - skipped
        elapsed = time.time() - started
        eta = elapsed / max(1, finished) * (len(todo) - finished)
        if status == "busy":
            result = "running in another process; skipped here"
        elif status == "ok":
            result = score_text(record) + (" (finished by another process)" if record.get("reused") else "")
        else:
            result = f"FAILED: {record.get('error', '?')[:160]}"
        log(f"[{skipped + finished}/{len(jobs)}] {job.label}: {result} | elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}")

    (executor or local_executor)(todo, on_done)
    return counts


def local_executor(jobs: list[RunJob], on_done: Callable[[RunJob, dict[str, Any]], None]) -> None:
    """Run jobs one after another in this process."""
    for job in jobs:
        on_done(job, execute_job(job))


def choose_lr_wd(plan: SweepPlan) -> dict[tuple[str, str], tuple[float, float]]:
    """Best (lr, wd) per (method, task) by validation accuracy of the tune runs (ties: first in the grid)."""
    chosen = {}
    jobs = plan.tune_jobs()
    for method, task in itertools.product(plan.methods, [t.name for t in plan.suite.tasks]):
        best, best_acc = None, -1.0
        for job in (j for j in jobs if (j.method, j.task) == (method, task)):  # grid order
            record = read_result(job.run_dir)
            if (
                record
                and record.get("status") == "ok"
                and record.get("run_key") == job.key
                and score(record) > best_acc
            ):
                best, best_acc = (job.spec.train.lr, job.spec.train.weight_decay), score(record)
        if best is None:
            raise VPeftError(
                f"--tune: every tune run of {method} on {task} failed; see {plan.out / 'tune' / method / task}"
            )
        chosen[(method, task)] = best
        write_json_atomic(
            plan.out / "tune" / method / task / "choice.json",
            {"lr": best[0], "weight_decay": best[1], f"val_{_metric(plan, task)}": best_acc},
        )
    return chosen


def score(record: dict[str, Any]) -> float:
    """A record's primary metric (top-1 for classification, mIoU for segmentation, ...)."""
    return float(record[record.get("primary_metric", "top1")])


def score_text(record: dict[str, Any]) -> str:
    metric = record.get("primary_metric", "top1")
    return f"top-1 {record[metric]:.2f}%" if metric == "top1" else f"{metric} {record[metric]:.2f}"


def _metric(plan: SweepPlan, task: str) -> str:
    entry = next(t for t in plan.suite.tasks if t.name == task)
    return get_task_type(entry.task_type).primary_metric


def parse_method_options(pairs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--opt lora.rank=4`` -> {"lora": {"rank": "4"}}; options without a method prefix are refused."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"bench --opt expects method.key=value (e.g. lora.rank=4), got '{pair}'")
        if method not in methods:
            raise ConfigError(
                f"--opt '{pair}' names method '{method}', which is not in this sweep ({', '.join(methods)})"
            )
        out.setdefault(method, {})[name] = value
    return out
