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
from helpers import needs

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


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-rank gloo process group and CPU mesh in this process, destroyed afterwards."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@needs("fsdp2")
def test_foreach_ops_on_dtensor_leaves_run_on_the_local_shards_before_2_13(monkeypatch, one_rank_mesh):
    """Before torch 2.13 DTensor has no sharding strategy for some foreach ops the transforms use
    (``aten._foreach_lerp.Scalar``, ``aten._foreach_maximum.List``: measured on 2.8), so
    gradxform's foreach ops run them on each rank's local shards and wrap the results back. Forced
    here on any torch: each result equals the op on plain tensors, keeps the leaf's placements,
    and an in-place op writes the DTensor's own storage."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from gradxform import _foreach as fe

    monkeypatch.setattr(_compat, "dtensor_foreach_complete", lambda: False)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    ys = [torch.randn_like(x) for x in xs]
    dx = [distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)]) for x in xs]
    dy = [distribute_tensor(y.clone(), one_rank_mesh, [Shard(0)]) for y in ys]
    for op, args, want in [
        (fe.lerp, (dy, 0.25), [torch.lerp(x, y, 0.25) for x, y in zip(xs, ys)]),
        (fe.maximum, (dy,), [torch.maximum(x, y) for x, y in zip(xs, ys)]),
        (fe.add, (dy,), [x + y for x, y in zip(xs, ys)]),
        (fe.clamp_min, (0.1,), [x.clamp_min(0.1) for x in xs]),
    ]:
        out = op(dx, *args)
        for o, w, d in zip(out, want, dx):
            assert gx_is_dtensor(o) and o.placements == d.placements and o.shape == d.shape, op.__name__
            torch.testing.assert_close(o.full_tensor(), w, rtol=0, atol=0, msg=op.__name__)
    fe.lerp_(dx, dy, 0.5)
    for d, x, y in zip(dx, xs, ys):
        torch.testing.assert_close(d.full_tensor(), torch.lerp(x, y, 0.5), rtol=0, atol=0)


@needs("fsdp2")
def test_batched_over_dtensor_leaves_before_2_13_names_the_torch(monkeypatch, one_rank_mesh):
    """vmap over DTensor leaves stops in a functorch internal assert on torch 2.8; gx.batched
    says which torch it needs instead (forced here on any torch)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import gradxform as gx

    monkeypatch.setattr(_compat, "dtensor_foreach_complete", lambda: False)
    p = {"w": distribute_tensor(torch.randn(3, 4, 2), one_rank_mesh, [Shard(0)])}
    tx = gx.batched(gx.sgd(0.1))
    with pytest.raises(RuntimeError, match=r"gx\.batched over FSDP2 \(DTensor\) leaves needs torch>=2\.13"):
        tx.update(p, tx.init({"w": torch.zeros(3, 4, 2)}), p)


def gx_is_dtensor(x):
    from gradxform import tree

    return tree.is_dtensor(x)
