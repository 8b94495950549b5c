"""The README is where a user starts: its examples run as written, each on its own in a fresh interpreter on CPU
(nothing defined by an earlier block, no GPU), and it says how to install and test within its first screens."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[int, str]]:
    """(line number, source) of every ```python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_examples():
    assert len(_blocks()) >= 8  # the first example and one per family


@pytest.mark.timeout(120)
@pytest.mark.parametrize("line, source", _blocks(), ids=[f"line{line}" for line, _ in _blocks()])
def test_every_readme_example_runs_as_written(line, source):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, whatever the machine
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", source], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, f"README.md:{line} failed:\n{done.stderr[-3000:]}"


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move details into docs/"
    head = "\n".join(lines[:60])
    assert "pip install" in head and "```python" in head, "install and a runnable example in the first 60 lines"
    text = "\n".join(lines)
    assert "bash scripts/test.sh" in text and "bash scripts/bench.sh" in text


def test_every_link_into_docs_exists():
    for doc in [README, *sorted((ROOT / "docs").glob("**/*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).is_file(), f"{doc.relative_to(ROOT)} links to missing {target}"
