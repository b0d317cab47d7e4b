"""The shell blocks of the README and the docs pages that name only embedded assets run as written,
and every relative link between the pages resolves.

Which blocks run: every fenced ```bash block of README.md and docs/**/*.md whose commands (continuation
lines joined, comments dropped) all start with `vpeft ` and none names data, weights or a network the
tests do not have (`NOT_EMBEDDED`: a data path, `...`, a hub backbone, a config file, `--root`, `make`).
A block that would qualify but must not run (a GPU, hub weights, a long run) carries the marker
comment `<!-- no-test -->` on the line before its opening fence. Examples that need data are written
as ```text blocks, which never run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
#: a command that names any of these needs data, weights or a network the tests do not have
NOT_EMBEDDED = re.compile(r"/data/|\.\.\.|vit_base|augreg|configs/|--root|make ")
#: on the line before a block's opening fence: never run it
NO_TEST = "<!-- no-test -->"


def _build_docs():
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_pages() -> list[Path]:
    """The README and every page under docs/."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def shell_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block not marked `NO_TEST`, continuation lines joined, comments dropped."""
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        if text[: match.start()].rstrip().endswith(NO_TEST):
            continue
        commands = []
        for line in match.group(1).replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
        blocks.append(commands)
    return blocks


def runnable(blocks: list[list[str]]) -> list[list[str]]:
    return [b for b in blocks if b and all(c.startswith("vpeft ") and not NOT_EMBEDDED.search(c) for c in b)]


def embedded_blocks() -> list[tuple[str, list[str]]]:
    """(page, commands) of every block that runs with embedded assets only."""
    return [(str(p.relative_to(ROOT)), b) for p in doc_pages() for b in runnable(shell_blocks(p.read_text()))]


def test_the_readme_has_an_offline_block() -> None:
    blocks = runnable(shell_blocks(README.read_text()))
    assert blocks, "no README block runs with embedded assets only"
    assert any(c.startswith("vpeft train") for b in blocks for c in b)


def test_block_selection() -> None:
    text = (
        "```bash\nvpeft tasks mini\n```\n"
        "<!-- no-test -->\n```bash\nvpeft tasks mini\n```\n"
        "```bash\nvpeft train --data vtab1k:/data/x \\\n  --out y   # a comment\n```\n"
        "```text\nvpeft tasks mini\n```\n"
    )
    blocks = shell_blocks(text)
    assert [[" ".join(c.split()) for c in b] for b in blocks] == [
        ["vpeft tasks mini"],
        ["vpeft train --data vtab1k:/data/x --out y"],
    ]
    assert runnable(blocks) == [["vpeft tasks mini"]]


def test_the_pages_links_resolve() -> None:
    assert _build_docs().check_links(ROOT) == []


def test_the_site_builds_with_working_links(tmp_path) -> None:
    """make docs' pages: every page rendered, every relative href and src of the site resolves."""
    pytest.importorskip("markdown")
    _build_docs().build(tmp_path, ROOT)
    assert (tmp_path / "index.html").is_file()
    for page in doc_pages():
        assert (tmp_path / page.relative_to(ROOT)).with_suffix(".html").is_file(), page
    for html_file in tmp_path.rglob("*.html"):
        for target in re.findall(r'(?:href|src)="([^"#:]+)(?:#[^"]*)?"', html_file.read_text()):
            if target.startswith("api/") or target.endswith("api/index.html"):
                continue  # written by pdoc in make docs
            assert (html_file.parent / target).exists(), f"{html_file.relative_to(tmp_path)}: {target}"


@pytest.mark.parametrize(("page", "block"), embedded_blocks(), ids=lambda x: x if isinstance(x, str) else x[0][:40])
def test_doc_block_runs_as_written(page, block, tmp_path) -> None:
    vpeft = [sys.executable, "-m", "vpeft.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for command in block:
        argv = shlex.split(command)
        done = subprocess.run(vpeft + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{page}: `{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr
