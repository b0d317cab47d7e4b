"""The README's shell blocks that name only embedded assets run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
#: a command that names any of these needs data, weights or a network the tests do not have
NOT_EMBEDDED = re.compile(r"/data/|\.\.\.|vit_base|augreg|configs/|--root|make ")


def shell_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block, continuation lines joined, comments dropped."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
        blocks.append(commands)
    return blocks


def embedded_blocks() -> list[list[str]]:
    return [b for b in shell_blocks(README.read_text()) if b and all(
        c.startswith("vpeft ") and not NOT_EMBEDDED.search(c) for c in b)]  # fmt: skip


def test_the_readme_has_an_offline_block() -> None:
    blocks = embedded_blocks()
    assert blocks, "no README block runs with embedded assets only"
    assert any(c.startswith("vpeft train") for b in blocks for c in b)


@pytest.mark.parametrize("block", embedded_blocks(), ids=lambda b: b[0][:40])
def test_readme_block_runs_as_written(block, tmp_path) -> None:
    vpeft = [sys.executable, "-m", "vpeft.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for command in block:
        argv = shlex.split(command)
        done = subprocess.run(vpeft + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{command}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr
