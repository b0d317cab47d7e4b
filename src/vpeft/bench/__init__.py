"""V-PEFT Bench: suites, resumable sweeps over (method x task x seed), executors."""

from vpeft.bench.suites import SUITES, Suite, load_suite, suite_defaults
from vpeft.bench.sweep import RunJob, SweepPlan, choose_lr_wd, run_jobs, write_manifest

__all__ = [
    "SUITES",
    "RunJob",
    "Suite",
    "SweepPlan",
    "choose_lr_wd",
    "load_suite",
    "run_jobs",
    "suite_defaults",
    "write_manifest",
]
