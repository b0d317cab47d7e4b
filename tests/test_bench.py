"""Sweeps (resume, failures, run identity), the leaderboard's arithmetic and the Pareto plot."""

from __future__ import annotations

import json
import math
import struct

import pytest

from datagen import make_vtab_task
from vpeft.bench import SweepPlan, load_suite, run_jobs, write_manifest
from vpeft.bench import sweep as sweep_mod
from vpeft.bench.suites import Suite, SuiteTask
from vpeft.cli import main
from vpeft.errors import ConfigError
from vpeft.report import build_leaderboard, pareto_front, write_report
from vpeft.report.leaderboard import collect_records

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
TRAIN = {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "drop_path": 0.0}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    root = tmp_path_factory.mktemp("suite")
    tasks = [SuiteTask(name, group, f"vtab1k:{make_vtab_task(root / name, n_train=32, n_val=8, n_test=16, seed=i)}")
             for i, (name, group) in enumerate([("t_nat", "natural"), ("t_struct", "structured")])]  # fmt: skip
    return Suite("custom", tasks, {"train": TRAIN, "method_overrides": {"lora": {"options": {"rank": 2}}},
                                   "tune_grid": {"lr": [1e-3, 3e-3], "weight_decay": [1e-4]}})  # fmt: skip


def _plan(suite: Suite, out, methods=("linear", "lora"), seeds=(0, 1)) -> SweepPlan:
    return SweepPlan(suite=suite, model="vit_tiny_patch16_224", methods=list(methods), seeds=list(seeds),
                     mode="final", out=out, pretrained=False, model_args=TINY_VIT)  # fmt: skip


def _records(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/*/result.json"))]


def test_interrupted_sweep_resumes_without_redoing(suite, tmp_path, monkeypatch) -> None:
    plan = _plan(suite, tmp_path / "out")
    calls = []
    real_run = sweep_mod.run
    interrupt = {"armed": True}

    def flaky(spec, run_dir, **kw):
        calls.append(str(run_dir))
        if len(calls) == 4 and interrupt["armed"]:
            interrupt["armed"] = False
            raise KeyboardInterrupt  # Ctrl-C in the middle of the 4th run
        return real_run(spec, run_dir, **kw)

    monkeypatch.setattr(sweep_mod, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(plan.final_jobs(), log=lambda _: None)
    assert len(_records(tmp_path / "out")) == 3
    first = list(calls)
    calls.clear()
    counts = run_jobs(plan.final_jobs(), log=lambda _: None)
    assert counts == {"total": 8, "skipped": 3, "done": 5, "failed": 0}
    assert not set(calls) & set(first[:3]), "a finished run was redone"
    records = _records(tmp_path / "out")
    keys = [(r["method"], r["task"], r["seed"]) for r in records]
    assert len(keys) == 8 and len(set(keys)) == 8 and all(r["status"] == "ok" for r in records)
    calls.clear()
    assert run_jobs(plan.final_jobs(), log=lambda _: None)["skipped"] == 8 and not calls


def test_failed_run_is_recorded_and_rerun(suite, tmp_path, monkeypatch) -> None:
    plan = _plan(suite, tmp_path / "out", methods=("linear", "bitfit"), seeds=(0,))
    real_run = sweep_mod.run
    broken = {"on": True}

    def sometimes_broken(spec, run_dir, **kw):
        if broken["on"] and spec.method == "bitfit" and "t_nat" in spec.data:
            raise RuntimeError("simulated worker crash")
        return real_run(spec, run_dir, **kw)

    monkeypatch.setattr(sweep_mod, "run", sometimes_broken)
    log = []
    counts = run_jobs(plan.final_jobs(), log=log.append)
    assert counts["failed"] == 1 and counts["done"] == 3
    [failed_path] = (tmp_path / "out/runs/bitfit/t_nat").glob("seed0-*/result.json")
    failed = json.loads(failed_path.read_text())
    assert failed["status"] == "failed" and "simulated worker crash" in failed["error"]
    assert any("FAILED" in line for line in log) and all("ETA" in line for line in log)
    broken["on"] = False
    counts = run_jobs(plan.final_jobs(), log=lambda _: None)
    assert counts == {"total": 4, "skipped": 3, "done": 1, "failed": 0}


#: (what changes, how) -> a sweep with that change must get other run keys for every run
SPEC_CHANGES = {
    "method option": lambda p: p.option_overrides.update({"lora": {"rank": 4}}),
    "option spelled as a string": lambda p: p.option_overrides.update({"lora": {"rank": "4"}}),
    "lr": lambda p: p.train_overrides.update({"lr": 1e-5}),
    "weight decay": lambda p: p.train_overrides.update({"weight_decay": 0.0}),
    "epochs": lambda p: p.train_overrides.update({"epochs": 2}),
    "drop path": lambda p: p.train_overrides.update({"drop_path": 0.1}),
    "model": lambda p: setattr(p, "model", "deit_tiny_patch16_224"),
    "model args": lambda p: p.model_args.update({"depth": 1}),
    "pretrained": lambda p: setattr(p, "pretrained", True),
}


@pytest.mark.parametrize("change", list(SPEC_CHANGES))
def test_any_spec_change_gives_other_runs(suite, tmp_path, change) -> None:
    base = {j.run_dir.name: j for j in _plan(suite, tmp_path, methods=("lora",), seeds=(0,)).final_jobs()}
    other = _plan(suite, tmp_path, methods=("lora",), seeds=(0,))
    other.model_args = dict(TINY_VIT)
    SPEC_CHANGES[change](other)
    jobs = other.final_jobs()
    assert not {j.run_dir.name for j in jobs} & set(base), f"{change}: a run folder would be reused"
    assert all(j.key in j.run_dir.name and j.key in j.label for j in jobs)


def test_same_spec_same_keys_and_defaults_resolved(suite, tmp_path) -> None:
    a = _plan(suite, tmp_path, methods=("lora",), seeds=(0, 1)).final_jobs()
    b = _plan(suite, tmp_path, methods=("lora", "lora"), seeds=(0, 1, 1)).final_jobs()  # duplicates run once
    assert [j.run_dir for j in a] == [j.run_dir for j in b] and len(b) == 4
    explicit = _plan(suite, tmp_path, methods=("lora",), seeds=(0, 1))
    explicit.option_overrides = {"lora": {"rank": "2", "dropout": "0"}}  # the suite's value and the default
    assert [j.key for j in explicit.final_jobs()] == [j.key for j in a]
    assert len({j.run_dir.name.split("-")[0] for j in a if j.task == "t_nat"}) == 2  # seed0-..., seed1-...


def test_split_file_change_gives_other_runs(tmp_path) -> None:
    root = make_vtab_task(tmp_path / "t", n_train=16, n_val=4, n_test=8)
    suite = Suite("custom", [SuiteTask("t", "natural", f"vtab1k:{root}")], {"train": TRAIN})
    before = _plan(suite, tmp_path / "o", methods=("linear",), seeds=(0,)).final_jobs()[0].key
    lines = (root / "train800val200.txt").read_text().splitlines()
    (root / "train800val200.txt").write_text("\n".join(lines[:-1]) + "\n")  # one training image fewer
    assert _plan(suite, tmp_path / "o", methods=("linear",), seeds=(0,)).final_jobs()[0].key != before


def test_rerun_with_other_options_runs_anew_and_report_shows_only_it(suite, tmp_path) -> None:
    out = tmp_path / "out"
    first = _plan(suite, out, methods=("lora",), seeds=(0,))
    write_manifest(first, first.final_jobs())
    assert run_jobs(first.final_jobs(), log=lambda _: None)["done"] == 2
    old = {p: p.read_bytes() for p in out.glob("runs/*/*/*/result.json")}
    second = _plan(suite, out, methods=("lora",), seeds=(0,))
    second.option_overrides = {"lora": {"rank": "1"}}
    log = []
    write_manifest(second, second.final_jobs())
    counts = run_jobs(second.final_jobs(), log=log.append)
    assert counts["done"] == 2 and counts["skipped"] == 0 and not any("resuming" in line for line in log)
    assert all(p.read_bytes() == b for p, b in old.items()), "the first sweep's records changed"
    records = _records(out)
    assert sorted(r["options"]["rank"] for r in records) == [1, 1, 2, 2]
    md = write_report(out)["markdown"].read_text()
    assert "2 runs of another spec" in md
    shown = collect_records(out, {j.key for j in second.final_jobs()})
    assert len(shown) == 2 and all(r["options"]["rank"] == 1 for r in shown)
    assert run_jobs(second.final_jobs(), log=lambda _: None)["skipped"] == 2  # same spec: resumes, nothing redone


def test_tune_picks_on_val_then_final(suite, tmp_path) -> None:
    from vpeft.bench import choose_lr_wd

    plan = _plan(suite, tmp_path / "out", methods=("linear",), seeds=(0,))
    run_jobs(plan.tune_jobs(), log=lambda _: None)
    chosen = choose_lr_wd(plan)
    assert set(chosen) == {("linear", "t_nat"), ("linear", "t_struct")}
    for (method, task), (lr, _wd) in chosen.items():
        choice = json.loads((tmp_path / f"out/tune/{method}/{task}/choice.json").read_text())
        vals = {r: json.loads(next((tmp_path / f"out/tune/{method}/{task}").glob(f"lr{r:g}_wd0.0001-*/result.json"))
                              .read_text())["top1"] for r in (1e-3, 3e-3)}  # fmt: skip
        assert choice["val_top1"] == max(vals.values()) and lr == choice["lr"]
        assert all(r["eval_split"] == "val" for r in [json.loads(p.read_text())
                   for p in (tmp_path / f"out/tune/{method}/{task}").glob("*/result.json")])  # fmt: skip
    jobs = plan.final_jobs(chosen)
    assert all(j.spec.train.lr == chosen[(j.method, j.task)][0] for j in jobs)


# ---------------------------------------------------------------- report arithmetic


def _fake(method, task, seed, top1, params, group=None):
    return {"status": "ok", "method": method, "task": task, "seed": seed, "top1": top1, "trainable_params": params,
            "mode": "final", "model": "m", "train_seconds": 2.0 + seed, "peak_memory_mb": 100.0 + seed}  # fmt: skip


FAKE = [
    _fake("lora", "a", 0, 80.0, 1000), _fake("lora", "a", 1, 82.0, 1000),
    _fake("lora", "b", 0, 60.0, 1000), _fake("lora", "b", 1, 60.0, 1000),
    _fake("lora", "c", 0, 40.0, 1000), _fake("lora", "c", 1, 44.0, 1000),
    _fake("linear", "a", 0, 70.0, 0), _fake("linear", "b", 0, 50.0, 0), _fake("linear", "c", 0, 30.0, 0),
    _fake("full", "a", 0, 79.0, 5_000_000), _fake("full", "b", 0, 65.0, 5_000_000),
]  # fmt: skip
GROUPS = {"natural": ["a", "b"], "structured": ["c"]}


def test_leaderboard_averages_and_ppt_by_hand() -> None:
    board = build_leaderboard(FAKE, GROUPS)
    lora = next(r for r in board.rows if r.method == "lora")
    assert lora.per_task["a"][0] == 81.0 and lora.per_task["a"][1] == pytest.approx(math.sqrt(2.0))
    assert lora.per_task["c"] == (42.0, pytest.approx(math.sqrt(8.0)), 2)
    assert lora.mean_tasks == pytest.approx((81 + 60 + 42) / 3)  # 61.0
    assert lora.group_mean == pytest.approx(((81 + 60) / 2 + 42) / 2)  # 56.25
    assert lora.ppt == pytest.approx(0.61 * math.exp(-math.log10(1000 / 1e7 + 1)))
    linear = next(r for r in board.rows if r.method == "linear")
    assert linear.ppt == pytest.approx(0.50) and linear.group_mean == pytest.approx(((70 + 50) / 2 + 30) / 2)
    full = next(r for r in board.rows if r.method == "full")
    assert not full.complete and full.mean_tasks is None and full.ppt is None  # missing task c
    assert [r.method for r in board.rows] == ["lora", "linear", "full"]
    assert lora.train_seconds == 2.5 and lora.peak_memory_mb == 101.0


def test_report_files_and_plot(tmp_path) -> None:
    for r in FAKE:
        d = tmp_path / "runs" / r["method"] / r["task"] / f"seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
    (tmp_path / "runs/lora/a/seed9").mkdir()
    (tmp_path / "runs/lora/a/seed9/result.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert len(collect_records(tmp_path)) == len(FAKE)
    paths = write_report(tmp_path, GROUPS)
    md = paths["markdown"].read_text()
    assert "| lora | 81.00 ± 1.41 | 60.00 ± 0.00 | 42.00 ± 2.83 | 61.00 | 56.25 | 0.001 |" in md
    assert "mean of 3 tasks" in md and "mean of 2 group means" in md
    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0].startswith("method,a_mean,a_std,a_seeds") and len(csv_lines) == 4
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    points = json.loads(paths["plot"].with_suffix(".json").read_text())
    assert len(points["points"]) == 2  # lora and linear are complete; full lacks a task
    assert set(points["front"]) == {"lora", "linear"}


def test_pareto_front() -> None:
    pts = [("a", 0, 50.0), ("b", 10, 60.0), ("c", 20, 55.0), ("d", 30, 70.0), ("e", 10, 60.0)]
    assert pareto_front(pts) == ["a", "b", "d", "e"]


def test_published_numbers_beside_vtab(tmp_path) -> None:
    from vpeft.report.leaderboard import published_markdown, published_vtab1k

    pub = {p["method"]: p for p in published_vtab1k()}
    assert pub["lora"] == {"method": "lora", "mean19": 72.25, "group": 74.60, "params_m": 0.29}
    assert len(pub) == 16
    board = build_leaderboard(FAKE, GROUPS, suite="vtab1k")
    assert "| lora | 72.25 | 61.00 | 74.60 | 56.25 | 0.29 | 0.00 |" in published_markdown(board)


# ---------------------------------------------------------------- bad input


def test_bad_suite_task_method_root(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="unknown suite 'vtab'"):
        load_suite("vtab")
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['nope'\].*mnist"):
        load_suite("mini", tasks=["nope"])
    (tmp_path / "vtab/cifar").mkdir(parents=True)
    (tmp_path / "vtab/dtd").mkdir()
    from vpeft.data import DataError

    with pytest.raises(DataError, match=r"lacks 17 of the suite's task folders: caltech101, oxford_flowers102"):
        load_suite("vtab1k", str(tmp_path / "vtab"))
    assert load_suite("vtab1k", str(tmp_path / "vtab"), ["cifar", "dtd"]).groups == {"natural": ["cifar", "dtd"]}
    with pytest.raises(ConfigError, match="pass --root"):
        load_suite("fgvc")
    assert main(["bench", "--methods", "lora,nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--methods", "lora", "--opt", "rank=2", "--out", str(tmp_path / "o")]) == 2
    assert "method.key=value" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_process_executor_gives_the_same_records(suite, tmp_path) -> None:
    from vpeft.bench.executors import process_executor

    local = _plan(suite, tmp_path / "local", methods=("bitfit",), seeds=(0,))
    parallel = _plan(suite, tmp_path / "parallel", methods=("bitfit",), seeds=(0,))
    run_jobs(local.final_jobs(), log=lambda _: None)
    counts = run_jobs(parallel.final_jobs(), executor=process_executor(2, threads_per_job=1), log=lambda _: None)
    assert counts["done"] == 2 and counts["failed"] == 0
    a, b = _records(tmp_path / "local"), _records(tmp_path / "parallel")
    assert [(r["method"], r["task"], r["seed"], r["status"]) for r in a] == [
        (r["method"], r["task"], r["seed"], r["status"]) for r in b
    ]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["final_train_loss"] - rb["final_train_loss"]) < 1e-3
