"""The docs cover the public API: every name in ``gradxform.__all__`` has a docstring and is
rendered by an API page (``docs/api/<module>.md`` with ``::: gradxform.<module>``, listed in
mkdocs.yml's nav), and every docs page is reachable from the nav."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import gradxform as gx

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))


def _home_module(name: str) -> str:
    obj = getattr(gx, name)
    mod = getattr(obj, "__module__", None) or ""
    if not mod.startswith("gradxform.") and inspect.ismodule(obj):
        return obj.__name__
    return mod


@pytest.mark.parametrize("name", sorted(gx.__all__))
def test_public_name_is_documented(name):
    obj = getattr(gx, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc.split()) >= 3, f"gx.{name} has no docstring"
    module = _home_module(name)
    assert module.startswith("gradxform."), f"gx.{name} comes from {module!r}"
    short = module.split(".", 1)[1]
    page = DOCS / "api" / f"{short}.md"
    assert page.exists(), f"no API page docs/api/{short}.md for gx.{name}"
    assert f"::: {module}" in page.read_text()
    assert f"api/{short}.md" in _nav_pages(), f"docs/api/{short}.md is not in mkdocs.yml's nav"
    if not inspect.ismodule(obj):
        mod_all = getattr(__import__(module, fromlist=["_"]), "__all__", None)
        assert mod_all is None or name in mod_all, f"{module}.__all__ lacks {name} (mkdocstrings renders __all__)"


def test_every_docs_page_is_in_the_nav():
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    missing = sorted(pages - _nav_pages())
    assert not missing, f"docs pages not reachable from mkdocs.yml's nav: {missing}"
