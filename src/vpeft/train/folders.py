"""Run folders: what one holds, a per-run lock, and replacement that deletes nothing before success.

- The lock is an advisory ``flock`` on ``.<name>.lock`` beside the run folder. The kernel drops it
  when its holder dies (SIGKILL included), so a killed holder never leaves a stale lock; two sweeps,
  or a sweep and a Ray worker, never train one run twice.
- A run that replaces a folder trains in ``.<name>.staging`` beside it; the old folder is swapped out
  only after the new run has written its adapter, and ``result.json`` is written last, so a killed
  run leaves either the old folder or an unfinished one, never a half-written record.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from vpeft.errors import VPeftError

RESULT = "result.json"
#: files whose presence means a folder holds (part of) a run
RUN_FILES = ("result.json", "log.jsonl", "checkpoint.pt", "adapter.safetensors", "adapter_config.json", "config.yaml")


class RunBusyError(VPeftError, RuntimeError):
    """Another process holds the run's lock (it is running this run now)."""


class RunExistsError(VPeftError, FileExistsError):
    """The output folder already holds a run, and neither resume nor overwrite was asked for."""


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``result.json`` as a dict; None when missing, unreadable or not a JSON object."""
    try:
        record = json.loads((Path(run_dir) / RESULT).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def holds_run(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def staging_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.staging"


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Leftovers of a killed run: the staging folder, an old folder mid-swap, ``*.tmp`` files. Call under the lock."""
    run_dir = Path(run_dir)
    for leftover in (staging_dir(run_dir), run_dir.parent / f".{run_dir.name}.old"):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    if run_dir.is_dir():
        for tmp in run_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)


def commit_staged(staged: Path, run_dir: Path) -> None:
    """Swap a finished staging folder in place of ``run_dir`` (which may not exist)."""
    old = run_dir.parent / f".{run_dir.name}.old"
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(staged, run_dir)
    shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """An exclusive, non-blocking lock on one run folder (POSIX ``flock``; released when the holder dies)."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # held until release()
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: single-process use only
            self._file = f
            return self
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunBusyError(
                f"the run in '{self.run_dir}' is being trained by {holder} now; wait for it, or use another output folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (unlinking it would race)
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
