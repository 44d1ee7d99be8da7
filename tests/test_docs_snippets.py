"""The docs' self-contained snippets run: every ```python block that starts with an import (a
block meant to be copied and run as it is) is executed in a fresh interpreter. Fragments (blocks
that continue a previous one, or need a process group or a GPU) do not start with an import and
are not run; the few that do and cannot run here are listed with the reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# (page, index among the page's runnable blocks) -> why it is not run here
NOT_HERE = {
    ("distributed.md", 0): "needs an initialised process group and a model (examples/distributed_digits.py runs it)",
    ("distributed.md", 1): "needs an initialised process group and a model (examples/distributed_digits.py runs it)",
    ("quickstart.md", 1): "continues the page's previous block (its model, opt and sched)",
}


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in sorted(DOCS.glob("*.md")):
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
        runnable = [b for b in blocks if re.match(r"(import|from) ", b)]
        out += [(page.name, i, code) for i, code in enumerate(runnable)]
    return out


BLOCKS = _blocks()


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_snippet_runs(page, index, code, tmp_path):
    if (page, index) in NOT_HERE:
        pytest.skip(NOT_HERE[(page, index)])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{page} snippet {index} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"


def test_there_are_snippets_to_run():
    assert len(BLOCKS) >= 30
