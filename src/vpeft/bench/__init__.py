"""V-PEFT Bench: suites, resumable sweeps over (method x task x seed), executors."""

from vpeft.bench.suites import SUITES, Suite, load_suite, suite_defaults
from vpeft.bench.sweep import RunJob, SweepMismatchError, SweepPlan, check_manifest, choose_lr_wd, run_jobs

__all__ = [
    "SUITES",
    "RunJob",
    "Suite",
    "SweepMismatchError",
    "SweepPlan",
    "check_manifest",
    "choose_lr_wd",
    "load_suite",
    "run_jobs",
    "suite_defaults",
]
