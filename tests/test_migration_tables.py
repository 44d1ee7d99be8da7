"""The migration pages' name maps stay true to both libraries.

- docs/migration/optax.md: every gradxform name in its tables is public (``gx.__all__``); with
  optax installed, every optax name in the tables exists in optax / optax.contrib, every public
  function of optax and optax.contrib is either in a table or in the "Not implemented" list, a
  name in that list is not public in gradxform under the same name, and every gradxform name that
  optax also has is in a table. The page's two side-by-side snippets run and print what it says.
- docs/migration/torch-optim.md: the table of torch.optim optimizers names every optimizer class of
  the installed torch.optim, each with a public gradxform alias.
- docs/migration/torchopt.md: the names table uses public gradxform names and (with torchopt
  installed) existing torchopt names, and covers torchopt's functional optimizers.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradxform as gx

ROOT = Path(__file__).resolve().parent.parent
MIGRATION = ROOT / "docs" / "migration"
OPTAX_PAGE = (MIGRATION / "optax.md").read_text()


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a ``## `` line) up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _rows(text: str, first: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of every table row whose first cell starts with ``first``."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].startswith(first):
            out.append((cells[0], cells[1]))
    return out


def _gx_names(cell: str) -> list[str]:
    return re.findall(r"\bgx\.(\w+)", cell)


# --- optax ----------------------------------------------------------------------------------------

OPTAX_ROWS = _rows(_section(OPTAX_PAGE, "Name map"), "`optax.")
OPTAX_MAPPED = {re.fullmatch(r"`optax\.(?:contrib\.)?(\w+)`", a).group(1): b for a, b in OPTAX_ROWS}
NOT_IMPLEMENTED = set(re.findall(r"`optax\.(?:contrib\.)?(\w+)`", _section(OPTAX_PAGE, "Not implemented")))


def _optax():
    return pytest.importorskip("optax", reason="optax is a test-only extra (the optax half of the table check)")


def _public_functions(module) -> set[str]:
    """Lowercase public names of ``module`` that are not submodules (functions and factories)."""
    return {n for n in dir(module) if not n.startswith("_") and n[0].islower()
            and not inspect.ismodule(getattr(module, n))}


def test_optax_table_is_not_empty_and_every_row_names_a_public_gradxform_name():
    assert len(OPTAX_ROWS) > 100, "the optax name map lost its rows (or the parser its tables)"
    for optax_cell, gx_cell in OPTAX_ROWS:
        names = _gx_names(gx_cell)
        assert names, f"{optax_cell}: no gx name in {gx_cell!r}"
        for n in names:
            assert n in gx.__all__, f"docs/migration/optax.md maps {optax_cell} to gx.{n}, which is not public"


def test_optax_names_are_in_one_list_only():
    assert NOT_IMPLEMENTED, "the 'Not implemented' list is empty (or the parser lost it)"
    both = sorted(NOT_IMPLEMENTED & set(OPTAX_MAPPED))
    assert not both, f"listed as mapped and as not implemented: {both}"


def test_every_differences_cell_of_the_optax_table_uses_existing_gx_names():
    for optax_cell, _ in OPTAX_ROWS:
        line = next(x for x in OPTAX_PAGE.splitlines() if x.startswith(f"| {optax_cell} |"))
        for n in _gx_names(line.split("|")[3]):
            assert n in gx.__all__, f"the note of {optax_cell} names gx.{n}, which is not public"


def test_every_optax_name_in_the_tables_exists_in_optax():
    optax = _optax()
    import optax.contrib as contrib

    for optax_cell, _ in OPTAX_ROWS:
        where = contrib if optax_cell.startswith("`optax.contrib.") else optax
        name = optax_cell.strip("`").rsplit(".", 1)[1]
        assert hasattr(where, name), f"{optax_cell} is not a name of optax {optax.__version__}"
    for name in NOT_IMPLEMENTED:
        assert hasattr(contrib, name) or hasattr(optax, name), f"optax.{name} (not implemented) does not exist"


def test_every_public_optax_function_is_mapped_or_listed_as_not_implemented():
    optax = _optax()
    import optax.contrib as contrib

    public = _public_functions(optax) | _public_functions(contrib)
    missing = sorted(public - set(OPTAX_MAPPED) - NOT_IMPLEMENTED)
    assert not missing, f"optax {optax.__version__} names neither in docs/migration/optax.md's tables nor " \
                        f"in its 'Not implemented' list: {missing}"


def test_every_gradxform_name_with_an_optax_twin_is_in_the_table():
    optax = _optax()
    import optax.contrib as contrib

    twins = {n for n in gx.__all__ if n[0].islower() and (hasattr(optax, n) or hasattr(contrib, n))}
    missing = sorted(twins - set(OPTAX_MAPPED))
    assert not missing, f"gx names that optax has too, missing from docs/migration/optax.md: {missing}"
    wrongly = sorted(NOT_IMPLEMENTED & set(gx.__all__))
    assert not wrongly, f"listed as not implemented but public in gradxform: {wrongly}"


def _snippets() -> list[str]:
    """The python blocks before the first ``## `` heading (the side-by-side example)."""
    return re.findall(r"```python\n(.*?)```", OPTAX_PAGE.split("\n## ")[0], re.S)


@pytest.mark.parametrize("index", [0, 1], ids=["optax", "gradxform"])
def test_the_side_by_side_snippets_print_what_the_page_says(index, tmp_path):
    code = _snippets()[index]
    if index == 0:
        _optax()
    claimed = [m.group(1) for m in re.finditer(r"print\(.*\)\s*#\s*(\S+)", code)]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == claimed


# --- torch.optim ----------------------------------------------------------------------------------

TORCH_ROWS = _rows(_section((MIGRATION / "torch-optim.md").read_text(), "Every torch.optim optimizer"),
                   "`torch.optim.")


def test_torch_optim_table_names_every_optimizer_class_with_a_public_alias():
    classes = {n for n, c in vars(torch.optim).items() if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer)
               and c is not torch.optim.Optimizer}
    table = {re.fullmatch(r"`torch\.optim\.(\w+)`", a).group(1): b for a, b in TORCH_ROWS}
    missing = sorted(classes - set(table))
    assert not missing, f"torch.optim classes missing from docs/migration/torch-optim.md: {missing}"
    assert len(table) >= 15
    for cls, cell in table.items():
        names = _gx_names(cell)
        assert len(names) == 1 and names[0] in gx.__all__, f"torch.optim.{cls}: {cell!r}"
        assert names[0] == cls.lower() or (cls, names[0]) == ("SparseAdam", "sparse_adam")


# --- torchopt -------------------------------------------------------------------------------------

TORCHOPT_ROWS = _rows(_section((MIGRATION / "torchopt.md").read_text(), "Names and arguments"), "`torchopt.")


def test_torchopt_table_uses_public_names():
    assert len(TORCHOPT_ROWS) >= 10
    for cell, gx_cell in TORCHOPT_ROWS:
        for n in _gx_names(gx_cell):
            assert n in gx.__all__, f"docs/migration/torchopt.md maps {cell} to gx.{n}, which is not public"


def test_torchopt_table_covers_torchopt_and_names_what_exists():
    torchopt = pytest.importorskip("torchopt", reason="torchopt is a test-only extra")
    named = set()
    for cell, _ in TORCHOPT_ROWS:
        for name in re.findall(r"`torchopt\.([\w.]+)", cell):
            obj = torchopt
            for part in name.split("."):
                assert hasattr(obj, part), f"torchopt.{name} does not exist in torchopt {torchopt.__version__}"
                obj = getattr(obj, part)
            named.add(name)
    missing = sorted(set(torchopt.alias.__all__) - named)
    assert not missing, f"torchopt's functional optimizers missing from docs/migration/torchopt.md: {missing}"
