"""A resumable sweep over (method, task, seed): one independent run each, one result record each.

Layout of an output folder::

    bench.json                          what the folder holds: suite, model, protocol (refuses mixing)
    runs/<method>/<task>/seed<k>/       a run folder (adapter, config.yaml, log.jsonl, result.json)
    tune/<method>/<task>/lr<..>_wd<..>/ tune-mode runs of --tune, and choice.json per (method, task)

A run whose ``result.json`` says ``status: ok`` is finished and never redone; a failed or
interrupted run is run again by the next call.
"""

from __future__ import annotations

import itertools
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpeft.bench.suites import Suite
from vpeft.errors import ConfigError, VPeftError
from vpeft.train.run import RESULT, RunSpec, run, write_json_atomic
from vpeft.train.trainer import TrainConfig

MANIFEST = "bench.json"


class SweepMismatchError(VPeftError, ValueError):
    """The output folder holds results of another model or protocol."""


@dataclass
class RunJob:
    """One (method, task, seed) run: where it lives and the spec that defines it."""

    method: str
    task: str
    seed: int
    run_dir: Path
    spec: RunSpec

    @property
    def label(self) -> str:
        return f"{self.method} on {self.task} (seed {self.seed}, {self.spec.mode})"


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn file cannot happen with atomic writes, but treat it as unfinished


def is_finished(run_dir: Path) -> bool:
    record = read_result(run_dir)
    return record is not None and record.get("status") == "ok"


def execute_job(job: RunJob, progress: bool = False) -> dict[str, Any]:
    """Run one job; any error becomes a failed record (the sweep goes on). Ctrl-C propagates."""
    try:
        return run(job.spec, job.run_dir, progress=progress)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record = read_result(job.run_dir)
        if record is None or record.get("status") != "failed":  # a diverged run already wrote its own
            record = write_failed(job, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=6))
        return record


def write_failed(job: RunJob, error: str, trace: str | None = None) -> dict[str, Any]:
    """Record a run as failed, with its error, so the sweep goes on and the next call reruns it."""
    record = {"status": "failed", "method": job.method, "task": job.task, "seed": job.seed, "mode": job.spec.mode,
              "error": error}  # fmt: skip
    if trace:
        record["traceback"] = trace
    write_json_atomic(Path(job.run_dir) / RESULT, record)
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

    def identity(self) -> dict[str, Any]:
        """What must match for results to share a leaderboard."""
        recipe = self._train_dict("__any__", "__any__")
        for key in ("lr", "weight_decay", "device", "num_workers", "compile", "eval_every", "amp"):
            recipe.pop(key, None)
        return {
            "suite": self.suite.name,
            "model": self.model,
            "model_args": self.model_args,
            "pretrained": self.pretrained,
            "pretrained_file": self.pretrained_file,
            "mode": self.mode,
            "recipe": recipe,
        }

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
        data = next(t.data for t in self.suite.tasks if t.name == task)
        return RunSpec(
            model=self.model,
            model_args=self.model_args,
            data=data,
            method=method,
            options=self.options(method),
            mode=mode,
            pretrained=self.pretrained,
            pretrained_file=self.pretrained_file,
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
            jobs.append(RunJob(method, task, seed, self.out / "runs" / method / task / f"seed{seed}", spec))
        return jobs

    def tune_jobs(self) -> list[RunJob]:
        jobs = []
        for method, task in itertools.product(self.methods, [t.name for t in self.suite.tasks]):
            for lr, wd in self.tune_grid():
                spec = self.spec(method, task, self.seeds[0], "tune", (lr, wd))
                jobs.append(
                    RunJob(method, task, self.seeds[0], self.out / "tune" / method / task / f"lr{lr:g}_wd{wd:g}", spec)
                )
        return jobs


def check_manifest(plan: SweepPlan) -> None:
    """Write the folder's manifest, or refuse when it holds results of another model or protocol."""
    path = plan.out / MANIFEST
    identity = plan.identity()
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != identity:
            diff = sorted(k for k in identity if existing.get(k) != identity[k])
            raise SweepMismatchError(
                f"'{plan.out}' holds results of another {' / '.join(diff)} "
                f"({', '.join(f'{k}={existing.get(k)!r}' for k in diff)}); mixing them would make one leaderboard "
                f"of incomparable runs. Use another --out, or delete '{plan.out}' to start over"
            )
        return
    if plan.out.exists() and any((plan.out / "runs").glob("*/*/*/" + RESULT)):
        raise SweepMismatchError(f"'{plan.out}' holds runs but no {MANIFEST}; use another --out")
    write_json_atomic(path, identity)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_jobs(
    jobs: list[RunJob],
    executor: Callable[[list[RunJob], Callable[[RunJob, dict[str, Any]], None]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every unfinished job; finished ones are skipped. Returns counts of done/failed/skipped."""
    todo = [j for j in jobs if not is_finished(j.run_dir)]
    skipped = len(jobs) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(jobs)} runs already finished, {len(todo)} to go")
    counts = {"total": len(jobs), "skipped": skipped, "done": 0, "failed": 0}
    started = time.time()

    def on_done(job: RunJob, record: dict[str, Any]) -> None:
        ok = record.get("status") == "ok"
        counts["done" if ok else "failed"] += 1
        finished = counts["done"] + counts["failed"]
        elapsed = time.time() - started
        eta = elapsed / finished * (len(todo) - finished)
        result = f"top-1 {record['top1']:.2f}%" if ok else f"FAILED: {record.get('error', '?')[:160]}"
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
    for method, task in itertools.product(plan.methods, [t.name for t in plan.suite.tasks]):
        best, best_acc = None, -1.0
        for lr, wd in plan.tune_grid():
            record = read_result(plan.out / "tune" / method / task / f"lr{lr:g}_wd{wd:g}")
            if record and record.get("status") == "ok" and record["top1"] > best_acc:
                best, best_acc = (lr, wd), record["top1"]
        if best is None:
            raise VPeftError(
                f"--tune: every tune run of {method} on {task} failed; see {plan.out / 'tune' / method / task}"
            )
        chosen[(method, task)] = best
        write_json_atomic(
            plan.out / "tune" / method / task / "choice.json",
            {"lr": best[0], "weight_decay": best[1], "val_top1": best_acc},
        )
    return chosen


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
