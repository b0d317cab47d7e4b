"""Reports: rounded CSV, std only with seeds, labelled memory, the Pareto plot's colours / front / labels /
error bars, per-task curves, `vpeft compare`, `vpeft report --html` (page content; the browser test is
test_report_html.py) and the report without matplotlib."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sys

import pytest
from PIL import Image

from report_fixtures import METHODS, TASKS, make_bench, record
from vpeft.cli import main
from vpeft.report import build_leaderboard, compare_runs, format_comparison, pareto_front, read_log, write_report
from vpeft.report.leaderboard import to_csv, to_markdown

SOME = {m: METHODS[m] for m in ("linear", "lora", "ssf", "partial_k", "adapter", "full")}


def _png(path) -> Image.Image:
    image = Image.open(path)
    image.load()  # decodes: a truncated or damaged file raises
    return image


def _several_colours(image: Image.Image) -> bool:
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return colours is None or len(colours) > 8  # None: more than 65536 colours


def test_csv_rounded_std_only_with_two_seeds(tmp_path) -> None:
    make_bench(tmp_path / "two", SOME, seeds=(0, 1))
    make_bench(tmp_path / "one", SOME, seeds=(0,))
    raw = build_leaderboard([json.loads(p.read_text()) for p in (tmp_path / "two").glob("runs/*/*/*/result.json")],
                            TASKS)  # fmt: skip
    assert any(len(repr(r.mean_tasks).split(".")[1]) > 2 for r in raw.rows), "the fixture should need rounding"
    for folder, seeds in (("two", 2), ("one", 1)):
        paths = write_report(tmp_path / folder, TASKS, curves=False)
        rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
        assert len(rows) == len(SOME)
        for row in rows:
            for key, value in row.items():
                if key.endswith(("_mean", "_std", "mean_tasks", "group_mean")) or key.startswith("group_"):
                    assert re.fullmatch(r"(-?\d+(\.\d{1,2})?)?", value), f"{key}={value} not rounded to 2 decimals"
            assert re.fullmatch(r"\d+(\.\d{1,4})?", row["ppt"]) and re.fullmatch(r"\d+(\.\d)?", row["train_seconds"])
            stds = [v for k, v in row.items() if k.endswith("_std")]
            assert all(v != "" for v in stds) if seeds == 2 else all(v == "" for v in stds), row
            assert row["family"] and row["memory_kind"] == "cpu_process_max_rss"
        md = paths["markdown"].read_text()
        table = [line for line in md.splitlines() if line.startswith("| ") and "method" not in line]
        assert len(table) == len(SOME) and all(("±" in line) == (seeds == 2) for line in table)


def test_std_of_one_seed_is_none_not_zero() -> None:
    board = build_leaderboard([record("lora", "a", 0, 50.0, 10), record("lora", "b", 0, 60.0, 10)])
    (row,) = board.rows
    assert row.per_task["a"] == (50.0, None, 1) and row.mean_tasks_std is None and row.seeds == 1
    two = build_leaderboard([record("lora", "a", s, 50.0 + 2 * s, 10) for s in (0, 1)])
    assert two.rows[0].mean_tasks_std == pytest.approx(2**0.5)


@pytest.mark.parametrize(
    ("kind", "label"),
    [("cpu_process_max_rss", "peak MB (CPU: process RSS)"), ("cuda_max_allocated", "peak MB (CUDA allocated)")],
)
def test_memory_column_says_its_kind(tmp_path, kind, label) -> None:
    make_bench(tmp_path / "plain", SOME, seeds=(0,), memory_kind=kind)
    md = write_report(tmp_path / "plain", TASKS, curves=False)["markdown"].read_text()
    assert f"| {label} |" in md and "est. MB" not in md
    make_bench(tmp_path / "est", SOME, seeds=(0,), memory_kind=kind, memory_estimate_mb=123.456,
               memory_estimate_kind="cpu_activations_estimate")  # fmt: skip
    paths = write_report(tmp_path / "est", TASKS, curves=False)
    md = paths["markdown"].read_text()
    assert f"| {label} | est. MB (per method) |" in md and md.count(" | 123 |") == len(SOME)
    assert "est. MB (per method): cpu_activations_estimate;" in md
    row = next(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert row["memory_estimate_mb"] == "123.5" and row["memory_estimate_kind"] == "cpu_activations_estimate"


def test_pareto_plot_colours_front_line_error_bars_labels(tmp_path) -> None:
    methods = dict(METHODS)
    make_bench(tmp_path, methods, seeds=(0, 1))
    paths = write_report(tmp_path, TASKS, curves=False)
    image = _png(paths["plot"])
    assert image.size[0] > 600 and _several_colours(image)
    data = json.loads(paths["plot"].with_suffix(".json").read_text())
    points = {p["method"]: p for p in data["points"]}
    assert set(points) == set(methods)
    by_family: dict[str, set[str]] = {}
    for p in points.values():
        by_family.setdefault(p["family"], set()).add(p["colour"])
    assert all(len(c) == 1 for c in by_family.values()), "one colour per family"
    colours = [next(iter(c)) for c in by_family.values()]
    assert len(set(colours)) == len(colours) == len(by_family) >= 6, "families share a colour"
    assert points["ssf"]["colour"] != points["partial_k"]["colour"]  # both were red once
    assert len({(p["family"], p["marker"]) for p in points.values()}) == len(points)  # a marker per method in a family
    front = pareto_front([(m, p["params"], p["accuracy"]) for m, p in points.items()])
    assert set(data["front"]) == set(front) and len(data["front_line"]) == len(front) >= 2
    xs = [x for x, _ in data["front_line"]]
    assert xs == sorted(xs)
    assert all(p["yerr"] is not None and p["yerr"] > 0 for p in points.values())
    boxes = {label["method"]: label["box_px"] for label in data["labels"]}
    assert set(boxes) == set(methods)
    for (a, ba), (b, bb) in itertools.combinations(boxes.items(), 2):
        apart = ba[2] <= bb[0] or bb[2] <= ba[0] or ba[3] <= bb[1] or bb[3] <= ba[1]
        assert apart, f"labels {a} and {b} overlap: {ba} {bb}"
    one = tmp_path / "one"
    make_bench(one, SOME, seeds=(0,))
    data = json.loads(write_report(one, TASKS, curves=False)["plot"].with_suffix(".json").read_text())
    assert all(p["yerr"] is None for p in data["points"])  # no error bar from one seed


def test_curves_png_per_task(tmp_path) -> None:
    make_bench(tmp_path, {m: SOME[m] for m in ("linear", "lora")}, seeds=(0, 1), epochs=4)
    paths = write_report(tmp_path, TASKS)
    tasks = [t for ts in TASKS.values() for t in ts]
    assert sorted(p.name for p in paths["curves"].glob("*.png")) == sorted(f"{t}.png" for t in tasks)
    image = _png(paths["curves"] / "cifar.png")
    assert image.size[0] > 800 and _several_colours(image)
    folder = next(tmp_path.glob("runs/lora/cifar/seed0-*"))
    log = read_log(folder)
    assert [e["epoch"] for e in log] == [1, 2, 3, 4] and set(log[0]) >= {"train_loss", "train_acc", "val_acc", "lr"}
    with open(folder / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_loss": 9.0}\n{not json\n')  # a resumed epoch logged again, a torn line
    log = read_log(folder)
    assert [e["epoch"] for e in log] == [1, 2, 3, 4] and log[1]["train_loss"] == 9.0
    assert read_log(tmp_path / "nowhere") == []


def _run(folder, rank: int, lr: float, top1: float, epochs: int = 3) -> None:
    r = record("lora", "cifar", 0, top1, 1000 * rank)
    r["identity"] = {"method": "lora", "options": {"rank": rank, "alpha": None}, "task": "cifar",
                     "train": {"lr": lr, "epochs": epochs, "seed": 0}}  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(r))
    (folder / "log.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e, "lr": lr, "train_loss": 1.0 / e, "train_acc": 0.2 * e, "val_acc": None}) + "\n"
            for e in range(1, epochs + 1)
        )
    )


def test_compare_absent_option_is_not_none(tmp_path) -> None:
    from vpeft.report.compare import MISSING

    _run(tmp_path / "a", rank=8, lr=1e-3, top1=70.0)
    _run(tmp_path / "b", rank=8, lr=1e-3, top1=70.0)
    record_b = json.loads((tmp_path / "b/result.json").read_text())
    record_b["identity"]["options"] = {"rank": 8}  # another method's options: no alpha at all
    (tmp_path / "b/result.json").write_text(json.dumps(record_b))
    cmp = compare_runs(tmp_path / "a", tmp_path / "b")
    assert cmp.differing == [("options.alpha", None, MISSING)]
    assert re.search(r"\| options\.alpha \| None \| \(absent\) \|", format_comparison(cmp))


def test_compare_lists_differing_options_metrics_and_curves(tmp_path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, rank=8, lr=1e-3, top1=70.0)
    _run(b, rank=4, lr=3e-3, top1=72.5, epochs=4)
    cmp = compare_runs(a, b)
    assert [(k, va, vb) for k, va, vb in cmp.differing] == [
        ("options.rank", 8, 4), ("train.epochs", 3, 4), ("train.lr", 1e-3, 3e-3)
    ]  # fmt: skip
    assert ("method", "lora") in cmp.same and ("options.alpha", None) in cmp.same
    text = format_comparison(cmp)
    assert "Options that differ (3 of 7)" in text
    assert re.search(r"\| options\.rank +\| 8 +\| 4 +\|", text) and "train.lr" in text
    assert "| method" not in text.split("## Metrics")[0], "options in common are listed only with --all-options"
    assert re.search(r"\| top-1 \(%\) +\| 70\.00 +\| 72\.50 +\| \+2\.50 +\|", text)
    assert re.search(r"\| trainable params \(no head\) +\| 8,000 +\| 4,000 +\| -4,000 +\|", text)
    curves = text.split("## Curves")[1]
    assert re.search(r"\| 4 +\| - +\| 0\.2500 ", curves), "epoch 4 exists in B only"
    assert main(["compare", str(a), str(b / "result.json"), "--all-options", "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "## Options in common" in out and "options.rank" in out and "curves side by side" in out
    assert _several_colours(_png(tmp_path / "c.png"))
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(a), str(tmp_path / "empty")]) == 2
    assert "not a vpeft run folder" in capsys.readouterr().err


def test_compare_real_run_folder(tmp_path, capsys) -> None:
    """Two real (tiny) training runs: compare reads what `vpeft train` writes."""
    from datagen import make_vtab_task

    task = make_vtab_task(tmp_path / "task", num_classes=2, n_train=8, n_val=4, n_test=4)
    common = ["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--data", f"vtab1k:{task}",
              "--method", "lora", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4", "--quiet",
              "--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=48",
              "--model-arg", "depth=1", "--model-arg", "num_heads=3"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "r2"), "--opt", "rank=2"]) == 0
    assert main([*common, "--out", str(tmp_path / "r4"), "--opt", "rank=4"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "r2"), str(tmp_path / "r4")]) == 0
    out = capsys.readouterr().out
    differing = out.split("## Options that differ")[1].split("##")[0]
    assert "options.rank" in differing and "| 2 " in differing and "| 4 " in differing
    assert "train.lr" not in differing and "top-1 (%)" in out and re.search(r"\| 2 +\| \d", out.split("## Curves")[1])


def test_report_html_page(tmp_path, capsys) -> None:
    make_bench(tmp_path, SOME, seeds=(0, 1), suite="vtab1k")
    assert main(["report", str(tmp_path), "--html", "--no-curves"]) == 0
    assert "HTML leaderboard (self-contained)" in capsys.readouterr().out
    page = (tmp_path / "leaderboard.html").read_text()
    assert not (tmp_path / "curves").exists()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page), "the page loads nothing"
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page), "the page names no URL but SVG's namespace"
    data = json.loads(re.search(r'<script type="application/json" id="leaderboard-data">(.*?)</script>', page,
                                re.S).group(1))  # fmt: skip
    keys = [c["key"] for c in data["columns"]]
    assert keys[:2] == ["method", "family"] and {"mean_tasks", "group_mean", "params_m", "ppt", "train_s"} <= set(keys)
    assert {"pub_mean19", "pub_group", "pub_params", "protocol"} <= set(keys)
    assert next(c for c in data["columns"] if c["key"] == "peak_mb")["label"] == "peak MB (CPU: process RSS)"
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    assert (
        lora["cells"]["pub_mean19"] == [72.25, "72.25"] and "published: best test epoch" in lora["cells"]["protocol"][1]
    )
    assert " ± " in lora["cells"]["task:cifar"][1] and len(data["points"]) == len(SOME)
    assert len(data["published_points"]) == 16
    plain = tmp_path / "plain"
    make_bench(plain, SOME, seeds=(0,), suite="mini")
    write_report(plain, TASKS, html=True, curves=False)
    data = json.loads(re.search(r'id="leaderboard-data">(.*?)</script>', (plain / "leaderboard.html").read_text(),
                                re.S).group(1))  # fmt: skip
    assert not any(c["key"].startswith("pub_") for c in data["columns"]) and data["published_points"] == []
    assert all("±" not in cell[1] for r in data["rows"] for cell in r["cells"].values())  # one seed: no std


def test_report_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch) -> None:
    make_bench(tmp_path, SOME, seeds=(0,))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", str(tmp_path), "--html"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'vpeft[report]'" in err and "matplotlib" in err
    assert (tmp_path / "leaderboard.md").is_file() and (tmp_path / "leaderboard.html").is_file()
    assert not (tmp_path / "pareto.png").exists()


def test_markdown_unchanged_for_the_readme_table() -> None:
    board = build_leaderboard([record("lora", "a", 0, 46.4, 37_000), record("linear", "a", 0, 42.1, 0)])
    md = to_markdown(board)
    assert "| lora | 46.40 | 46.40 | 46.40 | 0.037 |" in md and "peak MB (CPU: process RSS)" in md
    assert to_csv(board).splitlines()[1].startswith("lora,46.4,,1,46.4,,46.4,,")
