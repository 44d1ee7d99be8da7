"""The docs' self-contained snippets run and print what the page says: every ```python block that
starts with an import (a block meant to be copied and run as it is) is executed as in a fresh
interpreter (a child forked from a server that has imported only torch and gradxform:
tests/snippet_runner.py), and each ``print(...)  # output`` line's comment is compared with what it printed. Fragments (blocks
that continue a previous one, or need a process group or a GPU) do not start with an import and
are not run; the few that do and cannot run here are listed with the reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from snippet_runner import run_fresh

DOCS = Path(__file__).resolve().parent.parent / "docs"

# (page, index among the page's runnable blocks) -> why it is not run here
NOT_HERE = {
    ("distributed.md", 0): "needs an initialised process group and a model (examples/distributed_digits.py runs it)",
    ("distributed.md", 1): "needs an initialised process group and a model (examples/distributed_digits.py runs it)",
    ("quickstart.md", 1): "continues the page's previous block (its model, opt and sched)",
}


# comments that describe an output rather than quote it
_PROSE = ("about", "close", "equal", "the ", "{")


def _claimed(print_line: str) -> str | None:
    """The output a ``print(...)  # comment`` line claims: the comment up to ``": "`` (what follows
    is prose), whitespace-normalised; ``None`` without a comment or for a descriptive one."""
    m = re.match(r"\s*print\(.*\)\s*#\s*(.+)$", print_line)
    if not m or m.group(1).startswith(_PROSE):
        return None
    return " ".join(m.group(1).split(": ")[0].split())


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
    proc = run_fresh(code, tmp_path, timeout=300)
    assert proc.returncode == 0, f"{page} snippet {index} failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
    # what the page says each print shows: `print(...)  # <output>[: prose]` against the output line
    prints = [line for line in code.splitlines() if re.match(r"\s*print\(", line)]
    lines = proc.stdout.splitlines()
    claims = [(i, _claimed(line)) for i, line in enumerate(prints)]
    claims = [(i, c) for i, c in claims if c is not None]
    if len(lines) == len(prints):  # one line per print: each claim against its own line
        for i, claim in claims:
            assert " ".join(lines[i].split()).startswith(claim), (
                f"{page} snippet {index}: the page says {prints[i].strip()!r} prints {claim!r}; it printed {lines[i]!r}")
    else:  # a print in a loop: the claims in order among the output lines
        rest = [" ".join(line.split()) for line in lines]
        for i, claim in claims:
            hit = next((k for k, line in enumerate(rest) if line.startswith(claim)), None)
            assert hit is not None, f"{page} snippet {index}: {prints[i].strip()!r} should print {claim!r}:\n{proc.stdout}"
            rest = rest[hit + 1:]


def test_there_are_snippets_to_run():
    assert len(BLOCKS) >= 30
