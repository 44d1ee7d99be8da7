"""Hypothesis property tests: random pytrees through every public transform.

The trees are nested dicts / lists / tuples / a NamedTuple, with leaves of mixed dtypes
(float32, float64, bfloat16), 0-d scalars and zero-size tensors; a gradient may be ``None``
where the param exists (a frozen leaf, on every step or only on some). Every transform of
``test_purity.CASES`` runs on them; the properties are listed with each test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import optree
import pytest
import torch

import gradxform as gx
from helpers import assert_unchanged, snapshot
from test_purity import CASES, CATALOG_MODULES, KNOWN_GAPS

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install hypothesis)")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
STEPS = 3


class Pair(NamedTuple):
    """A NamedTuple container (optree flattens it like a tuple, but it is its own node type)."""

    first: Any
    second: Any


@dataclasses.dataclass(frozen=True)
class Leaf:
    """What a generated leaf is: not a pytree node, so optree treats it as a leaf.

    ``mode``: ``"live"`` (a gradient every step), ``"frozen"`` (``None`` every step) or
    ``"gap"`` (``None`` on the second step only)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str


SHAPES = [(), (0,), (3, 0), (1,), (3,), (2, 3), (2, 1, 2)]
DTYPES = [F32, F64, BF16]

leaves = st.builds(
    Leaf,
    st.sampled_from(SHAPES),
    st.sampled_from(DTYPES),
    st.sampled_from(["live", "live", "live", "frozen", "gap"]),
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.tuples(children, children),
        st.builds(Pair, children, children),
    )


# The root is always a container (of at most 3 subtrees of at most 4 leaves: cheap examples).
specs = _containers(st.recursive(leaves, _containers, max_leaves=4))


@dataclasses.dataclass
class Problem:
    """A params tree and ``STEPS`` gradient trees of the same structure (``None`` at frozen leaves)."""

    params: Any
    grads: list[Any]


def _materialise(spec: Any, seed: int, scale: float) -> Problem:
    gen = torch.Generator().manual_seed(seed)

    def randn(leaf: Leaf, s: float) -> torch.Tensor:
        return (torch.randn(leaf.shape, generator=gen, dtype=F64) * s).to(leaf.dtype)

    params = optree.tree_map(lambda leaf: randn(leaf, 1.0), spec)
    grads = []
    for t in range(STEPS):
        def g(leaf: Leaf, t: int = t) -> torch.Tensor | None:
            if leaf.mode == "frozen" or (leaf.mode == "gap" and t == 1):
                return None
            return randn(leaf, scale)

        grads.append(optree.tree_map(g, spec))
    return Problem(params, grads)


problems = st.builds(_materialise, specs, st.integers(0, 2**16), st.sampled_from([0.01, 1.0, 30.0]))


# --- every public transform, made for any tree -------------------------------------------------


def _by_position(params: Any, values: list[Any]) -> Any:
    """A tree with ``params``' structure whose i-th leaf is ``values[i % len(values)]``."""
    flat, spec = gx.tree.tree_flatten(params)
    return gx.tree.tree_unflatten(spec, [values[i % len(values)] for i in range(len(flat))])


def _mask(params: Any) -> Any:
    return _by_position(params, [True, False])


def _labels(params: Any) -> Any:
    return _by_position(params, ["x", "y"])


def _same(name: str) -> Callable[[Any], gx.GradientTransformation]:
    """The CASES factory itself: it does not depend on the tree."""
    return lambda params: CASES[name]()


# name -> factory(params) -> transform. Every CASES name must be here (a test checks it): the
# cases built from test_purity's fixed keys get tree-agnostic versions (callable masks / labels,
# multipliers built from the generated tree).
FACTORIES: dict[str, Callable[[Any], gx.GradientTransformation]] = {
    "identity": _same("identity"),
    "stateless": _same("stateless"),
    "scale": _same("scale"),
    "scale_by_schedule": _same("scale_by_schedule"),
    "scale_by_learning_rate": _same("scale_by_learning_rate"),
    "trace": _same("trace"),
    "trace_dampening": _same("trace_dampening"),
    "scale_by_adam": _same("scale_by_adam"),
    "scale_by_rms": _same("scale_by_rms"),
    "add_decayed_weights": lambda params: gx.add_decayed_weights(0.1, mask=_mask),
    "clip_by_global_norm": _same("clip_by_global_norm"),
    "masked": lambda params: gx.masked(gx.trace(0.9), _mask),
    "partition": lambda params: gx.partition({"x": gx.adam(0.1), "y": gx.sgd(0.1, momentum=0.9)}, _labels),
    "inject_hyperparams": _same("inject_hyperparams"),
    "apply_if_finite": _same("apply_if_finite"),
    "multi_steps": _same("multi_steps"),
    "chain": _same("chain"),
    "sgd": _same("sgd"),
    "adam": _same("adam"),
    "adamw": _same("adamw"),
    "clip_by_leaf_norm": _same("clip_by_leaf_norm"),
    "clip": _same("clip"),
    "clip_by_block_rms": _same("clip_by_block_rms"),
    "adaptive_grad_clip": _same("adaptive_grad_clip"),
    "autoclip": _same("autoclip"),
    "autoclip_random": _same("autoclip_random"),
    "random_clip_by_global_norm": _same("random_clip_by_global_norm"),
    "monitor_norm": _same("monitor_norm"),
    "clipped_sgd": _same("clipped_sgd"),
    "clipped_sstm": _same("clipped_sstm"),
    "with_restarts": _same("with_restarts"),
    "scale_by_truegrad_adam": _same("scale_by_truegrad_adam"),
    "scale_by_truegrad_adam_fallback": _same("scale_by_truegrad_adam_fallback"),
    "scale_by_truegrad_laprop": _same("scale_by_truegrad_laprop"),
    "scale_by_truegrad_laprop_fallback": _same("scale_by_truegrad_laprop_fallback"),
    "scale_by_truegrad_rmsprop": _same("scale_by_truegrad_rmsprop"),
    "scale_by_truegrad_rmsprop_fallback": _same("scale_by_truegrad_rmsprop_fallback"),
    "tg_adamw": _same("tg_adamw"),
    "tg_laprop": _same("tg_laprop"),
    "tg_rmsprop": _same("tg_rmsprop"),
    "graft": _same("graft"),
    "graft_clip_truegrad": _same("graft_clip_truegrad"),
    "multi_steps_truegrad": _same("multi_steps_truegrad"),
    "gradnorm": _same("gradnorm"),
    "uncertainty_weighting": _same("uncertainty_weighting"),
    "dwa": _same("dwa"),
    "gradinit_scale_tx": _same("gradinit_scale_tx"),
    "scale_by_empirical_init": lambda params: gx.scale_by_empirical_init(
        _by_position(params, [2.0, torch.tensor(0.5), None, 3.0])),
    "project_lower_bound": _same("project_lower_bound"),
    "fixed_weights": _same("fixed_weights"),
    "upcast": _same("upcast"),
    # CASES' wrapper stacks every leaf along a new model dim of size 1: any tree works
    "batched": _same("batched"),
}

for _module in CATALOG_MODULES:  # catalog cases act on any tree unless they say otherwise
    FACTORIES.update({name: _same(name) for name in _module.CASES})
    FACTORIES.update(getattr(_module, "PYTREE_FACTORIES", {}))

NAMES = sorted(FACTORIES)
# names whose property checks a catalog module lists as a known gap (with the reason)
_GAPS = KNOWN_GAPS.get("properties", {})


def _gap(name: str) -> None:
    if name in _GAPS:
        pytest.skip(_GAPS[name])


def test_factories_cover_every_case():
    """A transform added to test_purity.CASES must get a factory here too."""
    assert set(FACTORIES) == set(CASES)


# --- helpers ----------------------------------------------------------------------------------

RTOL = {F64: 1e-9, F32: 1e-5, BF16: 2e-2}
ATOL = {F64: 1e-12, F32: 1e-6, BF16: 1e-2}


def _leaves(tree: Any) -> list[Any]:
    return gx.tree.tree_flatten(tree)[0]


def _spec(tree: Any) -> Any:
    return gx.tree.tree_flatten(tree)[1]


def _run(tx: gx.GradientTransformation, problem: Problem) -> list[tuple[Any, Any]]:
    """One update per gradient tree (params move by the updates); each step's ``(updates, state)``."""
    params = problem.params
    state = tx.init(params)
    out = []
    for grads in problem.grads:
        new_u, new_s = tx.update(grads, state, params)
        out.append((new_u, new_s))
        params = gx.apply_updates(params, new_u)
        state = new_s
    return out


def _assert_trees_close(a: Any, b: Any, exact: bool = False, like: torch.dtype | None = None) -> None:
    """Same structure; tensor leaves equal (``exact``) or close with a tolerance for their dtype
    (for dtype ``like`` when given: values computed from leaves of that dtype)."""
    la, sa = gx.tree.tree_flatten(a)
    lb, sb = gx.tree.tree_flatten(b)
    assert sa == sb, f"structures differ: {sa} vs {sb}"
    for path, x, y in zip(gx.tree.tree_paths(a), la, lb):
        if not isinstance(x, torch.Tensor):
            assert x == y, f"differs at {path}: {x!r} vs {y!r}"
            continue
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, path
        if exact:
            assert torch.equal(x, y), f"differs at {path}: {x} vs {y}"
        elif x.is_floating_point():
            dt = x.dtype if like is None else like
            torch.testing.assert_close(x, y, rtol=RTOL.get(dt, 1e-5), atol=ATOL.get(dt, 1e-6),
                                       msg=lambda m: f"at {path}: {m}")  # noqa: B023 (called at once)
        else:
            assert torch.equal(x, y), f"differs at {path}"


def _settings(n: int) -> Callable[[Any], Any]:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


# --- 1-4: the update contract -----------------------------------------------------------------


# regressions: a 0-d bf16 leaf (alone, so the norms are float32), and a 0-d float32 leaf next to
# float64 ones (float64 norms), with a zero-size leaf and a gap; both once promoted 0-d updates
REGRESSIONS = [
    _materialise({"a": Leaf((), BF16, "live")}, 0, 30.0),
    _materialise(Pair(Leaf((), F32, "live"), [Leaf((3,), F64, "gap"), Leaf((0,), BF16, "live")]), 1, 1.0),
]


@pytest.mark.parametrize("name", NAMES)
@_settings(10)
@given(problem=problems)
@example(problem=REGRESSIONS[0])
@example(problem=REGRESSIONS[1])
def test_update_contract(name, problem):
    """For every transform, on every step:

    1. purity: ``update`` leaves its updates, state and params unchanged;
    2. structure: the output updates have the input updates' treedef and ``None`` exactly where
       the input has ``None``; the state keeps init's treedef and leaf dtypes on every step;
    3. dtype and shape: each output leaf has its input leaf's dtype (bf16 stays bf16) and shape;
    4. finite in, finite out: moderate finite gradients give finite updates and state.
    """
    _gap(name)
    tx = FACTORIES[name](problem.params)
    params = problem.params
    state = tx.init(params)
    init_spec = _spec(state)
    init_dtypes = [x.dtype if isinstance(x, torch.Tensor) else None for x in _leaves(state)]
    for grads in problem.grads:
        before = (snapshot(grads), snapshot(state), snapshot(params))
        new_u, new_s = tx.update(grads, state, params)
        # 1. purity
        assert_unchanged(before[0], grads, "updates")
        assert_unchanged(before[1], state, "state")
        assert_unchanged(before[2], params, "params")
        # 2. structure
        assert _spec(new_u) == _spec(grads), f"treedef changed: {_spec(grads)} -> {_spec(new_u)}"
        assert _spec(new_s) == init_spec, "state treedef changed across steps"
        assert [x.dtype if isinstance(x, torch.Tensor) else None for x in _leaves(new_s)] == init_dtypes, \
            "a state leaf changed dtype"
        for path, g, u in zip(gx.tree.tree_paths(grads), _leaves(grads), _leaves(new_u)):
            assert (g is None) == (u is None), f"None-ness changed at {path}"
            if g is None:
                continue
            # 3. dtype / shape
            assert u.dtype == g.dtype, f"dtype changed at {path}: {g.dtype} -> {u.dtype}"
            assert u.shape == g.shape, f"shape changed at {path}"
            # 4. finite
            assert torch.isfinite(u).all(), f"non-finite update at {path}"
        for path, x in zip(gx.tree.tree_paths(new_s), _leaves(new_s)):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                assert torch.isfinite(x).all(), f"non-finite state at {path}"
        params, state = gx.apply_updates(params, new_u), new_s


def _assert_runs_equal(a: list[tuple[Any, Any]], b: list[tuple[Any, Any]]) -> None:
    """Two runs gave bit-identical updates (and state leaves) on every step (NaN equals NaN)."""
    for step, ((ua, sa), (ub, sb)) in enumerate(zip(a, b)):
        for x, y in ((ua, ub), (sa, sb)):
            lx, ly = _leaves(x), _leaves(y)
            assert len(lx) == len(ly), f"step {step}: {len(lx)} vs {len(ly)} leaves"
            for i, (p, q) in enumerate(zip(lx, ly)):
                if isinstance(p, torch.Tensor):
                    assert isinstance(q, torch.Tensor) and p.dtype == q.dtype, f"step {step}, leaf {i}"
                    torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True,
                                               msg=lambda m: f"step {step}, leaf {i}: {m}")  # noqa: B023
                else:
                    assert p == q, f"step {step}, leaf {i}: {p!r} vs {q!r}"


# --- 5. chain is associative ------------------------------------------------------------------


@_settings(50)
@given(problem=problems, names=st.lists(st.sampled_from(NAMES), min_size=3, max_size=3))
def test_chain_is_associative(problem, names):
    """chain(a, chain(b, c)) == chain(chain(a, b), c) == chain(a, b, c): same updates and the
    same state, step by step, for any three transforms."""
    a, b, c = names

    def make(n: str) -> gx.GradientTransformation:
        return FACTORIES[n](problem.params)

    flat = _run(gx.chain(make(a), make(b), make(c)), problem)
    _assert_runs_equal(_run(gx.chain(make(a), gx.chain(make(b), make(c))), problem), flat)
    _assert_runs_equal(_run(gx.chain(gx.chain(make(a), make(b)), make(c)), problem), flat)
    # and the state is the flat tuple of the members' states
    state = gx.chain(gx.chain(make(a), make(b)), make(c)).init(problem.params)
    assert isinstance(state, tuple) and _spec(state) == _spec(gx.chain(make(a), make(b), make(c)).init(problem.params))


# --- 6. identity is neutral -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@_settings(4)
@given(problem=problems)
def test_identity_is_neutral(name, problem):
    """chain(identity(), t) == t == chain(t, identity()): same updates, same state leaves."""
    _gap(name)
    def make() -> gx.GradientTransformation:
        return FACTORIES[name](problem.params)

    alone = _run(make(), problem)
    _assert_runs_equal(_run(gx.chain(gx.identity(), make()), problem), alone)
    _assert_runs_equal(_run(gx.chain(make(), gx.identity()), problem), alone)


# --- 7. clipping never increases the norm -----------------------------------------------------

# relative slack of a bound on a norm computed from leaves of this dtype (rounding of the factor
# and of the product)
NORM_TOL = {F64: 1e-12, F32: 1e-5, BF16: 1e-2}


def _norm64(x: torch.Tensor, dim: Any = None) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(F64), dim=dim)


def _tol(xs: list[torch.Tensor]) -> float:
    return max([NORM_TOL[x.dtype] for x in xs], default=0.0)


def _unit_norms64(x: torch.Tensor) -> torch.Tensor:
    """AGC's default units (torch layout): one per index of dim 0 for ndim >= 2, the whole leaf otherwise."""
    if x.ndim <= 1:
        return _norm64(x)
    return _norm64(x, dim=tuple(range(1, x.ndim)))


def _bound_global(level):
    def check(g, u, p, state):
        assert _norm64(torch.cat([x.reshape(-1).to(F64) for x in u] or [torch.zeros(0, dtype=F64)])) \
            <= level * (1 + _tol(u)), "global norm above the level"
    return check


def _bound_leaf(level, rms=False):
    def check(g, u, p, state):
        for x in u:
            n = _norm64(x) / (max(x.numel(), 1) ** 0.5 if rms else 1.0)
            assert n <= level * (1 + NORM_TOL[x.dtype]), f"leaf {'rms' if rms else 'norm'} {n} above {level}"
    return check


def _bound_coordinate(level):
    def check(g, u, p, state):
        for x in u:
            assert (x.abs() <= level).all(), "an entry above the level"
    return check


def _bound_agc(clipping, eps):
    def check(g, u, p, state):
        for x, q in zip(u, p):
            cap = torch.clamp(_unit_norms64(q), min=eps) * clipping
            assert (_unit_norms64(x) <= cap * (1 + NORM_TOL[x.dtype])).all(), "a unit above clipping * ||p||"
    return check


def _bound_autoclip(random):
    def check(g, u, p, state):
        thr = float(state.threshold)
        # the threshold and the factor are in the state's dtype (from the first param leaf)
        tol = max(_tol(u), NORM_TOL[state.threshold.dtype])
        n_in, n_out = (_norm64(torch.cat([x.reshape(-1).to(F64) for x in t])) for t in (g, u))
        if random:  # either not clipped at all, or clipped to the threshold
            assert all(torch.equal(a, b) for a, b in zip(g, u)) or abs(float(n_out) - thr) <= thr * tol * 4
        else:
            assert float(n_out) <= max(thr, 0.0) * (1 + tol) or float(n_out) == float(n_in) == 0.0
    return check


def _bound_random(level):
    def check(g, u, p, state):
        n_out = _norm64(torch.cat([x.reshape(-1).to(F64) for x in u]))
        unchanged = all(torch.equal(a, b) for a, b in zip(g, u))
        assert unchanged or abs(float(n_out) - level) <= level * _tol(u) * 4, "neither passed nor clipped to the level"
    return check


# name -> (factory(level), check(level)); every clipper of the library. A check gets the live
# input leaves, output leaves, param leaves and the new state.
CLIPPERS: dict[str, tuple[Callable[[float], gx.GradientTransformation], Callable[[float], Callable[..., None]]]] = {
    "clip_by_global_norm": (gx.clip_by_global_norm, _bound_global),
    "clip_by_leaf_norm": (gx.clip_by_leaf_norm, _bound_leaf),
    "clip": (gx.clip, _bound_coordinate),
    "clip_by_block_rms": (gx.clip_by_block_rms, lambda lv: _bound_leaf(lv, rms=True)),
    "adaptive_grad_clip": (lambda lv: gx.adaptive_grad_clip(lv, eps=1e-3), lambda lv: _bound_agc(lv, 1e-3)),
    "autoclip": (lambda q: gx.autoclip(min(q, 1.0), history=3), lambda q: _bound_autoclip(False)),
    "autoclip_random": (lambda q: gx.autoclip(min(q, 1.0), history=3, beta=0.5, power=2), lambda q: _bound_autoclip(True)),
    "random_clip_by_global_norm": (lambda lv: gx.random_clip_by_global_norm(lv, beta=0.9), _bound_random),
}


@pytest.mark.parametrize("name", sorted(CLIPPERS))
@_settings(25)
@given(problem=problems, level=st.sampled_from([1e-3, 0.1, 0.5, 1.0, 10.0]))
def test_clipping_never_increases_the_norm(name, problem, level):
    """Every clipper multiplies each entry by a factor in [0, 1] (or clamps it), so no entry grows
    in magnitude or changes sign, hence neither a leaf's nor the global norm grows; and the output
    respects the clipper's own bound (global / leaf / coordinate / block-RMS / unit-wise level,
    AutoClip's threshold, the random rule's all-or-level)."""
    make, bound = CLIPPERS[name]
    tx, check = make(level), bound(level)
    params = problem.params
    state = tx.init(params)
    clipped_any = False
    for grads in problem.grads:
        new_u, state = tx.update(grads, state, params)
        g_l, u_l, p_l = _leaves(grads), _leaves(new_u), _leaves(params)
        idx = [i for i, x in enumerate(g_l) if x is not None]
        g, u, p = [g_l[i] for i in idx], [u_l[i] for i in idx], [p_l[i] for i in idx]
        for a, b in zip(g, u):
            assert (b.abs() <= a.abs()).all(), "an entry grew"
            assert ((b == 0) | (torch.sign(b) == torch.sign(a))).all(), "an entry changed sign"
            assert _norm64(b) <= _norm64(a)
        if g:
            n_in = _norm64(torch.cat([x.reshape(-1).to(F64) for x in g]))
            n_out = _norm64(torch.cat([x.reshape(-1).to(F64) for x in u]))
            assert n_out <= n_in, "the global norm grew"
            clipped_any |= bool(n_out < n_in)
            check(g, u, p, state)
        params = gx.apply_updates(params, new_u)
    # a large gradient against a tiny level is clipped (the bound checks are not vacuous)
    if name in ("clip_by_global_norm", "clip_by_leaf_norm", "clip") and level == 1e-3:
        big = [x for x in _leaves(problem.grads[0]) if x is not None and x.numel() and (x.abs() > 0.01).any()]
        assert not big or clipped_any


# --- 8. stateless clippers are idempotent -----------------------------------------------------

IDEMPOTENT = {
    "clip_by_global_norm": gx.clip_by_global_norm,
    "clip_by_leaf_norm": gx.clip_by_leaf_norm,
    "clip": gx.clip,
    "clip_by_block_rms": gx.clip_by_block_rms,
    "adaptive_grad_clip": gx.adaptive_grad_clip,
}


@pytest.mark.parametrize("name", sorted(IDEMPOTENT))
@_settings(25)
@given(problem=problems, level=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
def test_stateless_clipping_is_idempotent(name, problem, level):
    """clip(clip(g)) == clip(g): exactly for the coordinate clamp; up to the rounding of the
    re-computed factor (which is 1 up to a few ulps of the leaves' dtype) for the norm rules."""
    tx = IDEMPOTENT[name](level)
    state = tx.init(problem.params)
    for grads in problem.grads:
        once, _ = tx.update(grads, state, problem.params)
        twice, _ = tx.update(once, state, problem.params)
        # a global-norm factor mixes all leaves: its rounding is that of the narrowest dtype
        live = [x for x in _leaves(grads) if x is not None]
        narrowest = max(live, key=lambda x: RTOL[x.dtype]).dtype if live else None
        _assert_trees_close(twice, once, exact=(name == "clip"),
                            like=narrowest if name == "clip_by_global_norm" else None)


# --- 9. inject_hyperparams changes nothing but where the values live --------------------------

unit = st.floats(0.0, 0.99)
INJECTABLE: dict[str, tuple[Callable[..., gx.GradientTransformation], st.SearchStrategy]] = {
    "scale": (gx.scale, st.fixed_dictionaries({"step_size": st.floats(-2.0, 2.0)})),
    "trace": (gx.trace, st.fixed_dictionaries({"decay": unit, "nesterov": st.booleans(), "dampening": unit})),
    "scale_by_adam": (gx.scale_by_adam, st.fixed_dictionaries({
        "b1": unit, "b2": st.floats(0.5, 0.9999), "eps": st.sampled_from([1e-8, 1e-3]), "amsgrad": st.booleans()})),
    "scale_by_rms": (gx.scale_by_rms, st.fixed_dictionaries({"decay": unit, "eps": st.sampled_from([1e-8, 1e-3])})),
    "add_decayed_weights": (gx.add_decayed_weights, st.fixed_dictionaries({"weight_decay": st.floats(0.0, 1.0)})),
    "clip_by_global_norm": (gx.clip_by_global_norm, st.fixed_dictionaries({"max_norm": st.floats(1e-2, 10.0)})),
    "clip_by_leaf_norm": (gx.clip_by_leaf_norm, st.fixed_dictionaries({"max_norm": st.floats(1e-2, 10.0)})),
    "clip": (gx.clip, st.fixed_dictionaries({"max_delta": st.floats(1e-2, 10.0)})),
    "sgd": (gx.sgd, st.fixed_dictionaries({
        "lr": st.floats(1e-4, 1.0), "momentum": unit, "weight_decay": st.floats(0.0, 0.5), "nesterov": st.booleans()})),
    "adam": (gx.adam, st.fixed_dictionaries({
        "lr": st.floats(1e-4, 1.0), "betas": st.tuples(unit, st.floats(0.5, 0.9999)), "weight_decay": st.floats(0.0, 0.5)})),
    "adamw": (gx.adamw, st.fixed_dictionaries({
        "lr": st.floats(1e-4, 1.0), "weight_decay": st.floats(0.0, 0.5), "amsgrad": st.booleans()})),
}


@pytest.mark.parametrize("name", sorted(INJECTABLE))
@_settings(15)
@given(problem=problems, data=st.data())
def test_inject_hyperparams_is_transparent(name, problem, data):
    """inject_hyperparams(f)(**h) gives f(**h)'s updates and inner state on every step, and its
    state holds the values of h."""
    factory, hparams = INJECTABLE[name]
    h = data.draw(hparams, label="hyperparams")
    if h.get("nesterov") and "dampening" in h:
        h["dampening"] = 0.0
    if name == "sgd" and h.get("nesterov") and not h["momentum"]:  # gx.sgd, as torch's SGD, refuses it
        h["momentum"] = 0.5
    plain = _run(factory(**h), problem)
    injected = _run(gx.inject_hyperparams(factory)(**h), problem)
    for (u0, s0), (u1, s1) in zip(plain, injected):
        assert isinstance(s1, gx.InjectHyperparamsState)
        _assert_trees_close(u1, u0, exact=True)
        _assert_trees_close(s1.inner_state, s0, exact=True)
        for k, v in h.items():
            if isinstance(v, float):
                assert float(s1.hyperparams[k]) == v
            elif isinstance(v, tuple):
                assert tuple(s1.hyperparams[k].tolist()) == v
