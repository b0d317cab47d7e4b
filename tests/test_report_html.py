"""The HTML leaderboard in a real headless browser (Debian's Chromium; `.ci/run` installs it).

The page opened with ``#selftest`` clicks its own headers, types in its filter and switches the plot's
metric, then writes what it saw into ``<pre id="selftest-result">``; ``chromium --dump-dom`` returns the
DOM after the scripts ran. A second run takes a screenshot. Skips where no Chromium is installed.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from report_fixtures import METHODS, TASKS, make_bench, record
from vpeft.report import pareto_front, write_report
from vpeft.report.leaderboard import build_leaderboard

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")


def find_browser() -> str | None:
    """$VPEFT_CHROMIUM, else the first Chromium-like browser on PATH."""
    if os.environ.get("VPEFT_CHROMIUM"):
        return os.environ["VPEFT_CHROMIUM"]
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium to run the HTML leaderboard in: `apt-get install chromium` (.ci/run does; "
    "or set VPEFT_CHROMIUM to a Chromium binary)",
)


def headless(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    assert BROWSER is not None
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("bench")
    methods = {m: METHODS[m] for m in ("linear", "bitfit", "lora", "ssf", "fact_tt", "adapter", "vpt_deep",
                                        "partial_k", "lst", "full")}  # fmt: skip
    records = make_bench(out, methods, seeds=(0, 1), suite="vtab1k")
    # prefix ran one task only: incomplete, no average, sorts last on the averages
    extra = record("prefix", "cifar", 0, 55.0, 590_000)
    folder = out / "runs/prefix/cifar/seed0-x"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(extra))
    manifest = json.loads((out / "bench.json").read_text())
    manifest["runs"].append({"run_key": extra["run_key"], "method": "prefix", "task": "cifar", "seed": 0})
    (out / "bench.json").write_text(json.dumps(manifest))
    paths = write_report(out, TASKS, html=True, curves=False)
    return paths["html"], [*records, extra]


def test_table_sorts_filters_and_plot_renders(page, tmp_path) -> None:
    path, records = page
    done = headless(["--virtual-time-budget=10000", "--dump-dom", path.as_uri() + "#selftest"], tmp_path / "profile")
    match = re.search(r'<pre id="selftest-result"[^>]*data-done="1"[^>]*>(.*?)</pre>', done.stdout, re.S)
    assert match, "the page's self-test did not run:\n" + done.stdout[-1500:]
    result = json.loads(html.unescape(match.group(1)))
    assert result["ok"], result.get("error")
    board = build_leaderboard(records, TASKS)
    by_mean = [r.method for r in board.rows]  # best first; prefix (no mean) last
    complete = [r for r in board.rows if r.mean_tasks is not None]
    assert result["rows"] == by_mean, "the page opens sorted best first"
    ascending = [r.method for r in sorted(complete, key=lambda r: r.mean_tasks)] + ["prefix"]
    assert result["mean_first_click"] == ascending and result["mean_aria"] == "ascending"
    assert result["mean_second_click"] == by_mean
    by_params = sorted(board.rows, key=lambda r: -r.params)
    assert [m for m in result["params_first_click"]] == [r.method for r in by_params]
    assert result["method_first_click"] == sorted(r.method for r in board.rows)
    assert result["svg_points"] == len(complete) and result["svg_published_points"] == 16
    front = pareto_front([(r.method, r.params, r.mean_tasks) for r in complete])
    assert sorted(result["front"]) == sorted(front) and result["front_vertices"] == len(front) >= 2
    assert result["labels"] == len(complete) + 16 and result["label_overlaps"] == []
    assert result["filter_lora_rows"] == ["lora"] and result["filter_lora_points"] == 1
    group_front = pareto_front([(r.method, r.params, r.group_mean) for r in complete])
    assert sorted(result["front_group_mean"]) == sorted(group_front)


def test_screenshot_is_a_picture(page, tmp_path) -> None:
    path, _ = page
    shot = tmp_path / "page.png"
    headless(["--window-size=1280,1400", f"--screenshot={shot}", path.as_uri()], tmp_path / "profile")
    image = Image.open(shot)
    image.load()
    assert image.size == (1280, 1400)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour"
    # the plot drew coloured points: the family colours appear in the picture
    rgb = {c for _, c in colours} if colours else set(image.convert("RGB").getdata())
    assert (0xD5, 0x5E, 0x00) in rgb and (0x00, 0x9E, 0x73) in rgb  # partial/reparameterization, addition/adapter
