"""The support matrix (docs/support.md), the capability table (``gradxform._compat.FEATURES``) and
the tests' skip reasons (``helpers.needs``) agree, and the table is true of the torch this runs on:
in CI, of torch 2.13 in the main job and of torch 2.1.2 in the floor job."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from gradxform import _compat

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "support.md"


def _doc_rows() -> dict[str, tuple[str, str, str]]:
    """key -> (feature, minimum torch, fallback) from the page's table."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        m = re.match(r"^\| (.+?) \| `(\w+)` \| ([\d.]+) \| (.+?) \|$", line)
        if m:
            rows[m.group(2)] = (m.group(1), m.group(3), m.group(4))
    return rows


def _needs_used() -> dict[str, list[str]]:
    """Feature keys passed to ``needs(...)`` in the tests, with the files using them."""
    used: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "needs"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                used.setdefault(node.args[0].value, []).append(path.name)
    return used


def test_docs_matrix_is_the_feature_table():
    rows = _doc_rows()
    assert set(rows) == set(_compat.FEATURES), "docs/support.md's table and gradxform._compat.FEATURES differ"
    for key, (what, minimum, fallback) in rows.items():
        f = _compat.FEATURES[key]
        assert (what, minimum, fallback) == (f.what, f.min_torch, f.fallback), key


def test_every_skip_reason_is_a_row_of_the_matrix():
    used = _needs_used()
    assert used, "no test uses helpers.needs"
    unknown = sorted(set(used) - set(_doc_rows()))
    assert not unknown, f"tests skip for features not in docs/support.md: {unknown}"
    for key in used:
        reason = _compat.requirement(key)
        assert reason.startswith(f"needs torch>={_doc_rows()[key][1]}: "), reason


def test_unknown_feature_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown feature 'fsdp3'.*fsdp2"):
        _compat.requirement("fsdp3")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


@pytest.mark.parametrize("key", sorted(_compat.FEATURES))
def test_matrix_is_true_of_this_torch(key):
    """A feature is available exactly when this torch is at least the matrix's minimum, so each
    CI job skips what the page says it lacks."""
    f = _compat.FEATURES[key]
    expected = _compat.torch_version() >= _version(f.min_torch)
    if key == "fsdp2" and expected and not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not in this torch build")
    assert f.available() == expected, f"{key}: torch {torch.__version__}, matrix says >= {f.min_torch}"


def test_capability_helpers_on_this_torch():
    """The checks follow torch's own answers."""
    assert _compat.fused_adam_supported("cpu") == ("cpu" in _compat.fused_devices() and hasattr(torch, "_fused_adamw_"))
    assert _compat.fused_sgd_supported(torch.zeros(1)) == _compat.fused_sgd_supported("cpu")
    assert _compat.has_amp_gradscaler_cpu() == hasattr(torch.amp, "GradScaler")
    if _compat.fused_adam_supported("cpu"):  # the kernel really runs on CPU tensors
        p, g = torch.ones(2), torch.full((2,), 0.5)
        m, v, step = torch.zeros(2), torch.zeros(2), torch.ones(())
        torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0,
                            eps=1e-8, amsgrad=False, maximize=False)
        torch.testing.assert_close(p, torch.full((2,), 0.9), rtol=1e-5, atol=1e-6)  # bias-corrected: one lr step
    else:
        with pytest.raises((NotImplementedError, RuntimeError, AttributeError)):
            p, g = torch.ones(2), torch.full((2,), 0.5)
            m, v, step = torch.zeros(2), torch.zeros(2), torch.ones(())
            torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0,
                                eps=1e-8, amsgrad=False, maximize=False)


def test_torch_version_parses_local_builds():
    assert _compat._parse_version("2.1.2+cu121") == (2, 1)
    assert _compat._parse_version("2.13.0a0+git1234") == (2, 13)
    assert _compat._parse_version(torch.__version__) == _compat.torch_version()


def test_dtensor_leaves_before_2_13_get_an_error_naming_the_torch(monkeypatch):
    """On torch < 2.13 a foreach op on FSDP2's DTensor leaves raises an error naming torch 2.13
    (measured on 2.8: DTensor's own "found no DeviceMesh" assertion, or a missing strategy for
    clamp_min, deep inside Adam's update). Simulated here: a plain tensor taken for a DTensor."""
    from gradxform import _foreach as fe
    from gradxform import tree

    monkeypatch.setattr(_compat, "dtensor_foreach_complete", lambda: False)
    monkeypatch.setattr(tree, "is_dtensor", lambda x: True)
    with pytest.raises(RuntimeError, match=r"FSDP2 \(DTensor\) leaves needs torch>=2\.13"):
        fe.lerp([torch.zeros(2)], [torch.ones(2)], 0.1)
