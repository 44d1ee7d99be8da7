"""Every optimizer-catalog case under `gx.batched`: B = 3 independent optimizer instances stepped by
one ``torch.func.vmap``-ed update equal three separate runs.

The cases are the ``CASES`` of every ``tests/cases_*.py`` (the torch.optim and optax catalogs,
Adafactor/Muon/L-BFGS/SparseAdam, the optax combinators and optax.contrib), on the tree of
``tests/test_purity.py`` (``w`` (3, 2), ``b`` (2,), a frozen ``frozen``) in float64. Each instance
has its own params, its own gradients and, where the transform injects a learning rate, its own
learning rate (a ``(B,)`` vector in the batched state, `gx.set_hyperparam`), so data-dependent
branches (skips, syncs, plateaus, sign changes) go different ways in different instances. Eight
steps pass the combinators' periods (lookahead syncs, apply_every, reduce_on_plateau's patience,
schedule-free warmup, RAdam's rectification threshold). The cases that cannot be batched are
skipped with the reason.

tests/test_func.py runs every public transform batched for three steps with shared
hyperparameters; this file adds the catalog's longer runs with per-instance hyperparameters and
the catalog-specific exclusions.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch

import gradxform as gx
from test_purity import CATALOG_MODULES

D = torch.float64
B = 3
STEPS = 8
LR_FACTORS = (1.0, 0.5, 2.0)  # instance i runs with lr * LR_FACTORS[i]

CATALOG = {name: make for m in CATALOG_MODULES for name, make in m.CASES.items()}

# Cases that cannot run under torch.func.vmap, with the reason.
NOT_BATCHABLE = {
    name: "L-BFGS branches on loss values in Python (its line search and stopping tests, as "
          "torch.optim.LBFGS): it runs eagerly only, not inside torch.func.vmap"
    for name in ("lbfgs", "lbfgs_strong_wolfe", "value_and_grad_from_closure")
}
# Cases that run batched but agree with separate runs only to bfloat16 rounding: their
# Newton-Schulz iteration runs in bfloat16 (as torch.optim.Muon's), where a vmapped and a single
# matmul round differently; after five iterations an entry moves by up to ~7e-2 (as much as either
# run differs from the float64 iteration). The ``*_float64`` variants below check the same code
# batched at float64 precision.
BFLOAT16 = {
    name: "Newton-Schulz in bfloat16 (as torch.optim.Muon): batched and separate runs differ at bfloat16 "
          "rounding (up to ~7e-2 per entry); checked at float64 as " + name + "_float64"
    for name in ("muon", "scale_by_muon")
}

# The Muon cases again with the Newton-Schulz iteration in the params' dtype (``ns_dtype=None``),
# so that the batched run is checked at float64 precision too.
_by_ndim = lambda params: gx.tree.tree_map(lambda p: "muon" if p.ndim == 2 else "adamw", params)  # noqa: E731
EXTRA = {
    "scale_by_muon_float64": lambda: gx.partition(
        {"muon": gx.scale_by_muon(ns_dtype=None), "adamw": gx.identity()}, _by_ndim),
    "muon_float64": lambda: gx.partition(
        {"muon": gx.chain(gx.scale_by_muon(ns_dtype=None), gx.scale(-0.02)), "adamw": gx.adamw(0.01)}, _by_ndim),
    # the catalog's freeze case freezes both live leaves of this tree (its mask takes every other
    # leaf): here one frozen and one trained by momentum SGD, so the batched run moves
    "freeze_b": lambda: gx.chain(gx.freeze({"w": False, "b": True, "frozen": True}), gx.sgd(0.1, momentum=0.9)),
}
# cases whose updates are all zero on this tree (the comparison still runs)
ALL_ZERO_HERE = {"freeze"}
ALL = {**CATALOG, **EXTRA}
# cases fed a NaN gradient in one instance at one step (they exist to handle it)
NAN_CASES = {"zero_nans", "skip_not_finite", "skip_if"}

def _params(i: int) -> dict:
    g = torch.Generator().manual_seed(10 + i)
    return {"w": torch.randn(3, 2, generator=g, dtype=D), "b": torch.randn(2, generator=g, dtype=D),
            "frozen": torch.randn(2, generator=g, dtype=D)}


def _grads(name: str, i: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + 17 * i + 1)
    # instance-dependent scale: clips, skips and trust ratios bind in some instances only
    scale = (0.3, 1.0, 3.0)[(i + step) % 3]
    w = scale * torch.randn(3, 2, generator=g, dtype=D)
    if name in NAN_CASES and i == 1 and step == 3:
        w[0, 1] = math.nan
    return {"w": w, "b": scale * torch.randn(2, generator=g, dtype=D), "frozen": None}


def _stack(trees: list) -> object:
    return optree.tree_map(lambda *xs: None if xs[0] is None else torch.stack(xs), *trees, none_is_leaf=True)


def _lr_name(state: object) -> str | None:
    for name in ("lr", "learning_rate"):
        try:
            gx.get_hyperparam(state, name)
            return name
        except KeyError:
            continue
    return None


def _assert_close(got: object, want: object, what: str, rtol: float) -> None:
    g_leaves, g_spec = gx.tree.tree_flatten(got)
    w_leaves, w_spec = gx.tree.tree_flatten(want)
    assert g_spec == w_spec, f"{what}: structures differ"
    for path, a, b in zip(gx.tree.tree_paths(want), g_leaves, w_leaves):
        if not isinstance(b, torch.Tensor):
            assert a == b, f"{what} at {path}"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} at {path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.is_floating_point():
            tol = rtol if a.dtype == D else max(rtol, 1e-5)
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2, equal_nan=True, msg=f"{what} at {path}")
        else:
            assert torch.equal(a, b), f"{what} at {path}: {a} vs {b}"


@pytest.mark.parametrize("name", sorted(ALL))
def test_batched_instances_equal_separate_runs(name):
    if name in NOT_BATCHABLE or name in BFLOAT16:
        pytest.skip(NOT_BATCHABLE.get(name) or BFLOAT16[name])
    rtol = 1e-10
    tx = ALL[name]()
    btx = gx.batched(tx)
    ps = [_params(i) for i in range(B)]
    states = [tx.init(p) for p in ps]
    bp = _stack(ps)
    bstate = btx.init(bp)
    _assert_close(bstate, _stack(states), "init state", rtol)

    lr = _lr_name(states[0])
    if lr is not None:  # each instance its own learning rate
        base = gx.get_hyperparam(states[0], lr)
        for s, f in zip(states, LR_FACTORS):
            gx.set_hyperparam(s, lr, base * f)
        gx.set_hyperparam(bstate, lr, gx.get_hyperparam(bstate, lr) * torch.tensor(LR_FACTORS, dtype=base.dtype))

    moved = False
    for step in range(STEPS):
        gs = [_grads(name, i, step) for i in range(B)]
        outs = [tx.update(g, s, p) for g, s, p in zip(gs, states, ps)]
        us, states = [o[0] for o in outs], [o[1] for o in outs]
        bu, bstate = btx.update(_stack(gs), bstate, bp)
        _assert_close(bu, _stack(us), f"updates at step {step}", rtol)
        _assert_close(bstate, _stack(states), f"state at step {step}", rtol)
        assert bu["frozen"] is None
        ps = [gx.apply_updates(p, u) for p, u in zip(ps, us)]
        bp = gx.apply_updates(bp, bu)
        moved = moved or any(torch.count_nonzero(x) > 0 for u in us for x in (u["w"], u["b"]) if x is not None)
    assert moved or name in ALL_ZERO_HERE, "no instance moved: the comparison would be vacuous"


def test_every_catalog_case_is_batched_or_skipped_with_a_reason():
    """The exclusions name catalog cases (a renamed case cannot leave a stale skip behind)."""
    assert set(NOT_BATCHABLE) <= set(CATALOG) and set(BFLOAT16) <= set(CATALOG)
    assert all(f"{name}_float64" in EXTRA for name in BFLOAT16)
    assert NAN_CASES <= set(CATALOG)
