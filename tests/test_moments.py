"""TrueGrad transforms (gradxform.moments), ``graft`` and ``multi_steps`` with accumulated extras:
against hand computations and the reference package ``truegrad``."""

from __future__ import annotations

import copy

import math

import pytest
import torch
from helpers import needs
from helpers import assert_trees_close, assert_unchanged, snapshot

import gradxform as gx

F64 = torch.float64


def T(*v):
    return torch.tensor(v, dtype=F64)


# Hand-computed: leaves a = (1, -2), b = (0.5,); two steps of (g, S).
P0 = {"a": (1.0, -2.0), "b": (0.5,)}
STEPS = [
    ({"a": (0.5, -1.0), "b": (2.0,)}, {"a": (1.0, 4.0), "b": (1.0,)}),
    ({"a": (0.1, 0.3), "b": (-1.0,)}, {"a": (0.05, 0.2), "b": (3.0,)}),
]
TABLE = {
    True: [{"a": (-0.1, 0.1), "b": (-0.1,)},
           {"a": (-0.07988025946, 0.04357105061), "b": (-0.02663370397,)}],
    False: [{"a": (-0.05, 0.05), "b": (-0.2,)},
            {"a": (-0.03996020813, 0.02179647716), "b": (-0.02976919432,)}],
}


def tree(d):
    return {k: T(*v) for k, v in d.items()}


def run_table(tx, steps=STEPS):
    params = tree(P0)
    state = tx.init(params)
    outs = []
    for g, s in steps:
        u, state = tx.update(tree(g), state, params, sum_grad_squared=tree(s))
        params = gx.apply_updates(params, u)
        outs.append(u)
    return outs, params, state


# --- hand-computed -----------------------------------------------------------------------------


@pytest.mark.parametrize("graft", [True, False])
def test_table_3_4_two_steps(graft):
    for tx in (gx.tg_adamw(lr=0.1, weight_decay=0.0, graft=graft),
               gx.chain(gx.scale_by_truegrad_adam(graft=graft), gx.scale(-0.1))):
        outs, _, _ = run_table(tx)
        for u, want in zip(outs, TABLE[graft]):
            # the table gives 10 significant digits
            assert_trees_close(u, tree(want), rtol=1e-9, atol=1e-11)


def test_table_3_4_weight_decay_uses_params_before_the_step_once():
    _, params, _ = run_table(gx.tg_adamw(lr=0.1, weight_decay=0.1), STEPS[:1])
    assert_trees_close(params, {"a": T(0.89, -1.88), "b": T(0.395)}, rtol=1e-9, atol=0)


def test_reference_tgadamw_decays_once_per_parameter():
    """The reference's quirk 1 (docs/second-moments.md, "What truegrad does"): its weight decay runs inside the per-parameter
    loop, so with two params the first is decayed twice: a = (0.8811, -1.8612), b = 0.39005."""
    pytest.importorskip("truegrad", reason="the reference package truegrad is not installed")
    from truegrad.optim import TGAdamW

    a = torch.nn.Parameter(T(1.0, -2.0))
    b = torch.nn.Parameter(T(0.5))
    opt = TGAdamW([a, b], lr=0.1, weight_decay=0.1)
    g, s = STEPS[0]
    for p, k in ((a, "a"), (b, "b")):
        p.grad = T(*g[k])
        p.sum_grad_squared = T(*s[k])
    opt.step()
    torch.testing.assert_close(a.detach(), T(0.8811, -1.8612), rtol=1e-9, atol=0)
    torch.testing.assert_close(b.detach(), T(0.39005), rtol=1e-9, atol=0)


# --- against the reference over a training run ------------------------------------------------


def _reference_run(ref_cls, ref_kwargs, ours, steps=50):
    """Train a truegrad.nn model with the reference optimiser; feed ``ours`` the same grads and
    the same ``p.sum_grad_squared`` and return both final params."""
    tnn = pytest.importorskip("truegrad.nn", reason="the reference package truegrad is not installed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(tnn.Linear(4, 8), torch.nn.Tanh(), tnn.Linear(8, 3)).to(F64)
    params = [p.detach().clone() for p in model.parameters()]
    start = [p.clone() for p in params]
    opt = ref_cls(model.parameters(), **ref_kwargs)
    state = ours.init(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g, dtype=F64)
        y = torch.randn(16, 3, generator=g, dtype=F64)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        sgs = [p.sum_grad_squared.clone() for p in model.parameters()]
        opt.step()
        u, state = ours.update(grads, state, params, sum_grad_squared=sgs)
        params = gx.apply_updates(params, u)
    moved = min(float((p - q).abs().max()) for p, q in zip(params, start))
    assert moved > 1e-3, "the run did not move every param: the comparison would be vacuous"
    return params, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("graft", [True, False])
def test_tg_adamw_matches_reference_tgadamw(graft):
    from_ref = pytest.importorskip("truegrad.optim", reason="the reference package truegrad is not installed")
    ours, ref = _reference_run(from_ref.TGAdamW, {"lr": 1e-2, "weight_decay": 0.0, "graft": graft},
                               gx.tg_adamw(lr=1e-2, weight_decay=0.0, graft=graft))
    assert_trees_close(ours, ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("graft", [True, False])
def test_tg_laprop_matches_reference_tglaprop(graft):
    from_ref = pytest.importorskip("truegrad.optim", reason="the reference package truegrad is not installed")
    if not hasattr(from_ref, "TGLaProp"):
        pytest.skip("this truegrad version has no TGLaProp")
    ours, ref = _reference_run(from_ref.TGLaProp, {"lr": 1e-2, "weight_decay": 0.0, "graft": graft},
                               gx.tg_laprop(lr=1e-2, weight_decay=0.0, graft=graft))
    assert_trees_close(ours, ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("graft", [True, False])
def test_tg_rmsprop_matches_reference_tgrmsprop(graft):
    from_ref = pytest.importorskip("truegrad.optim", reason="the reference package truegrad is not installed")
    if not hasattr(from_ref, "TGRMSProp"):
        pytest.skip("this truegrad version has no TGRMSProp")
    ours, ref = _reference_run(from_ref.TGRMSProp, {"lr": 1e-3, "weight_decay": 0.0, "graft": graft},
                               gx.tg_rmsprop(lr=1e-3, weight_decay=0.0, graft=graft))
    assert_trees_close(ours, ref, rtol=1e-5, atol=1e-12)


def test_laprop_four_betas_and_rmsprop_two_betas_hand_values():
    """Step 1 and 2 of the no-graft variants against a direct float computation."""
    b1, b2, b3, b4, eps = 0.8, 0.95, 0.7, 0.9, 1e-12
    tx = gx.scale_by_truegrad_laprop(b1, b2, b3, b4, graft=False)
    st = tx.init({"x": T(0.0)})
    gs, ss = [2.0, -1.0], [3.0, 0.5]
    m = s = 0.0
    for t, (g, S) in enumerate(zip(gs, ss), start=1):
        s = b4 * s + (1 - b4) * S
        m = b3 * m + (1 - b3) * g / max(math.sqrt(s / (1 - b4 ** t)), eps)
        u, st = tx.update({"x": T(g)}, st, sum_grad_squared={"x": T(S)})
        torch.testing.assert_close(u["x"], T(m / (1 - b3 ** t)), rtol=1e-12, atol=0)
    tx = gx.scale_by_truegrad_rmsprop(0.8, 0.6, graft=False)
    st = tx.init({"x": T(0.0)})
    s = 0.0
    for t, (g, S) in enumerate(zip(gs, ss), start=1):
        s = 0.6 * s + 0.4 * S
        u, st = tx.update({"x": T(g)}, st, sum_grad_squared={"x": T(S)})
        torch.testing.assert_close(u["x"], T(g / math.sqrt(s / (1 - 0.6 ** t))), rtol=1e-12, atol=0)


# --- fallback, missing statistics, validation --------------------------------------------------


def _adam_hand(gs, b1=0.9, b2=0.999, eps=1e-12):
    m = v = 0.0
    out = []
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(m / max(math.sqrt(v / (1 - b2 ** t)), eps) / (1 - b1 ** t))
    return out


def test_fallback_adam_takes_adam_step_at_none_leaf():
    tx = gx.tg_adamw(lr=0.1, weight_decay=0.0, graft=False, fallback="adam")
    params = tree(P0)
    state = tx.init(params)
    adam_b = _adam_hand([g["b"][0] for g, _ in STEPS])
    for step, (g, s) in enumerate(STEPS):
        sgs = {"a": T(*s["a"]), "b": None}
        u, state = tx.update(tree(g), state, params, sum_grad_squared=sgs)
        torch.testing.assert_close(u["a"], T(*TABLE[False][step]["a"]), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(u["b"], T(-0.1 * adam_b[step]), rtol=1e-12, atol=0)
        params = gx.apply_updates(params, u)
    # with fallback="adam", a missing statistic means Adam everywhere
    tx = gx.scale_by_truegrad_adam(fallback="adam")
    u, _ = tx.update({"x": T(2.0, -0.5)}, tx.init({"x": T(0.0, 0.0)}))
    torch.testing.assert_close(u["x"], T(1.0, -1.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [gx.scale_by_truegrad_adam, gx.scale_by_truegrad_laprop,
                                  gx.scale_by_truegrad_rmsprop])
def test_none_statistic_raises_naming_the_path(make):
    tx = make()
    params = {"layer": {"w": T(1.0, 2.0), "b": T(0.0)}}
    state = tx.init(params)
    grads = {"layer": {"w": T(0.1, 0.2), "b": T(0.3)}}
    with pytest.raises(ValueError, match=r"'layer\.b'"):
        tx.update(grads, state, params, sum_grad_squared={"layer": {"w": T(1.0, 1.0), "b": None}})
    with pytest.raises(ValueError, match="fallback='adam'"):
        tx.update(grads, state, params, sum_grad_squared=None)
    with pytest.raises(TypeError, match="sum_grad_squared"):
        tx.update(grads, state, params)
    # a frozen update needs no statistic
    u, _ = tx.update({"layer": {"w": T(0.1, 0.2), "b": None}}, state, params,
                     sum_grad_squared={"layer": {"w": T(1.0, 1.0), "b": None}})
    assert u["layer"]["b"] is None


def test_missing_extra_through_chain_and_alias_is_a_clear_error():
    params = tree(P0)
    for tx in (gx.tg_adamw(), gx.tg_laprop(), gx.tg_rmsprop(), gx.chain(gx.clip_by_global_norm(1.0), gx.tg_adamw())):
        assert "sum_grad_squared" in gx.extra_args_of(tx).required
        with pytest.raises(TypeError, match="sum_grad_squared"):
            tx.update(tree(STEPS[0][0]), tx.init(params), params)
    assert gx.extra_args_of(gx.tg_adamw(fallback="adam")).required == frozenset()
    assert "sum_grad_squared" in gx.extra_args_of(gx.tg_adamw(fallback="adam")).optional


def test_state_holds_nu_only_when_needed():
    p = {"x": T(1.0)}
    assert gx.scale_by_truegrad_adam(graft=False).init(p).nu is None
    assert gx.scale_by_truegrad_adam(graft=True).init(p).nu is not None
    assert gx.scale_by_truegrad_adam(graft=False, fallback="adam").init(p).nu is not None
    st = gx.scale_by_truegrad_adam(enforce_baseline=True).init(p)
    assert st.nu is not None and st.s is None
    st = gx.scale_by_truegrad_laprop(graft=False).init(p)
    assert st.mu_base is None and st.nu is None
    assert gx.scale_by_truegrad_rmsprop(graft=False).init(p).nu is None


def test_enforce_baseline_is_adam_with_eps_floor():
    tx = gx.scale_by_truegrad_adam(enforce_baseline=True)
    st = tx.init({"x": T(0.0)})
    want = _adam_hand([2.0, -1.0, 0.5])
    for g, w in zip([2.0, -1.0, 0.5], want):
        u, st = tx.update({"x": T(g)}, st)
        torch.testing.assert_close(u["x"], T(w), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"), ({"b3": 1.5}, "b3"), ({"eps": -1.0}, "eps"),
    ({"fallback": "sgd"}, "fallback"),
])
def test_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gx.scale_by_truegrad_adam(**kwargs)


def test_alias_validation():
    with pytest.raises(ValueError, match="betas"):
        gx.tg_adamw(betas=(0.9,))
    with pytest.raises(ValueError, match=r"betas\[2\]"):
        gx.tg_adamw(betas=(0.9, 0.99, 1.0))
    with pytest.raises(ValueError, match="betas"):
        gx.tg_laprop(betas=(0.9, 0.99, 0.9))
    with pytest.raises(ValueError, match="lr"):
        gx.tg_rmsprop(lr=-1.0)
    with pytest.raises(ValueError, match="fallback"):
        gx.tg_adamw(fallback="nope")


def test_two_betas_mean_b3_equals_b2():
    outs2, _, _ = run_table(gx.tg_adamw(lr=0.1, betas=(0.8, 0.95), weight_decay=0.0))
    outs3, _, _ = run_table(gx.tg_adamw(lr=0.1, betas=(0.8, 0.95, 0.95), weight_decay=0.0))
    assert_trees_close(outs2[-1], outs3[-1], rtol=0, atol=0)
    assert gx.tg_adamw(betas=(0.8, 0.95)).init([]).hyperparams["betas"].tolist() == [0.8, 0.95, 0.95]


# --- graft ----------------------------------------------------------------------------------------


def test_graft_hand_value_adam_magnitude_sgd_direction():
    """Step 1 of Adam is g / (|g| + 1e-8) (norm sqrt(2) here); grafted onto g = (3, 4)."""
    tx = gx.graft(gx.scale_by_adam(), gx.identity())
    u, _ = tx.update({"a": T(3.0, 4.0)}, tx.init({"a": T(0.0, 0.0)}))
    torch.testing.assert_close(u["a"], T(3.0, 4.0) * math.sqrt(2.0) / 5.0, rtol=1e-7, atol=0)


def test_graft_equals_direct_formula_over_steps():
    mag, dirn = gx.scale_by_adam(), gx.trace(0.9)
    tx = gx.graft(gx.scale_by_adam(), gx.trace(0.9), eps=1e-12)
    params = {"w": torch.zeros(3, 2, dtype=F64), "b": torch.zeros(2, dtype=F64), "f": None}
    s, sm, sd = tx.init(params), mag.init(params), dirn.init(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = {"w": torch.randn(3, 2, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64), "f": None}
        u, s = tx.update(grads, s, params)
        m, sm = mag.update(grads, sm, params)
        d, sd = dirn.update(grads, sd, params)
        for k in ("w", "b"):
            torch.testing.assert_close(u[k], d[k] * m[k].norm() / (d[k].norm() + 1e-12), rtol=1e-12, atol=0)
        assert u["f"] is None
    assert isinstance(s, gx.GraftState)
    assert_trees_close(s.magnitude_state, sm, rtol=0, atol=0)


def test_graft_routes_extras_to_the_member_that_declares_them():
    """Adam#TrueGrad-Adam (no graft inside): the magnitude takes no extra, the direction takes S."""
    tx = gx.chain(gx.graft(gx.scale_by_adam(eps=0.0), gx.scale_by_truegrad_adam(graft=False)), gx.scale(-0.1))
    assert "sum_grad_squared" in gx.extra_args_of(tx).required
    outs, _, _ = run_table(tx)
    # it equals the built-in grafted TrueGrad-Adam up to eps placement (eps=1e-12 floor vs 0 additive)
    ref, _, _ = run_table(gx.chain(gx.scale_by_truegrad_adam(graft=True), gx.scale(-0.1)))
    assert_trees_close(outs[-1], ref[-1], rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="sum_grad_squared"):
        tx.update(tree(STEPS[0][0]), tx.init(tree(P0)), tree(P0))


def test_graft_validates_eps():
    with pytest.raises(ValueError, match="eps"):
        gx.graft(gx.identity(), gx.identity(), eps=-1.0)


# --- multi_steps with an accumulated statistic --------------------------------------------------


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_multi_steps_accumulates_sum_grad_squared(use_grad_mean):
    """K = 2 micro-steps with (g1, S1), (g2, S2) == one step with mean g and (S1 + S2) / 4
    (sum g and S1 + S2 with use_grad_mean=False)."""
    k = 2
    ms = gx.multi_steps(gx.tg_adamw(lr=0.1, weight_decay=0.1), every_k=k, use_grad_mean=use_grad_mean)
    one = gx.tg_adamw(lr=0.1, weight_decay=0.1)
    params = tree(P0)
    st_ms, st_one = ms.init(params), one.init(params)
    assert set(st_ms.acc_extras) == {"sum_grad_squared"}
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # three real steps
        micro = [({"a": torch.randn(2, generator=g, dtype=F64), "b": torch.randn(1, generator=g, dtype=F64)},
                  {"a": torch.rand(2, generator=g, dtype=F64), "b": torch.rand(1, generator=g, dtype=F64)})
                 for _ in range(k)]
        for i, (gr, s) in enumerate(micro):
            u, st_ms = ms.update(gr, st_ms, params, sum_grad_squared=s)
            if i < k - 1:
                assert all(float(x.abs().sum()) == 0 for x in u.values())
        gscale, sscale = (1 / k, 1 / k ** 2) if use_grad_mean else (1.0, 1.0)
        g_full = {n: sum(m[0][n] for m in micro) * gscale for n in ("a", "b")}
        s_full = {n: sum(m[1][n] for m in micro) * sscale for n in ("a", "b")}
        u_one, st_one = one.update(g_full, st_one, params, sum_grad_squared=s_full)
        assert_trees_close(u, u_one, rtol=1e-12, atol=1e-15)
        params = gx.apply_updates(params, u)
    assert all(float(x.abs().sum()) == 0 for x in st_ms.acc_extras["sum_grad_squared"].values())


def test_multi_steps_keeps_no_accumulator_for_undeclared_extras():
    st = gx.multi_steps(gx.adamw(0.1), every_k=2).init(tree(P0))
    assert st.acc_extras is None
    st = gx.multi_steps(gx.tg_adamw(), every_k=2, accumulate={}).init(tree(P0))
    assert st.acc_extras is None
    with pytest.raises(TypeError, match="accumulate"):
        gx.multi_steps(gx.tg_adamw(), every_k=2, accumulate={"sum_grad_squared": "two"})


def test_multi_steps_none_leaf_stays_none_for_fallback():
    ms = gx.multi_steps(gx.scale_by_truegrad_adam(graft=False, fallback="adam"), every_k=2)
    one = gx.scale_by_truegrad_adam(graft=False, fallback="adam")
    params = tree(P0)
    st_ms, st_one = ms.init(params), one.init(params)
    (g1, s1), (g2, s2) = STEPS
    _, st_ms = ms.update(tree(g1), st_ms, params, sum_grad_squared={"a": T(*s1["a"]), "b": None})
    u, st_ms = ms.update(tree(g2), st_ms, params, sum_grad_squared={"a": T(*s2["a"]), "b": None})
    g_mean = {n: (tree(g1)[n] + tree(g2)[n]) / 2 for n in ("a", "b")}
    u_one, _ = one.update(g_mean, st_one, params, sum_grad_squared={"a": (T(*s1["a"]) + T(*s2["a"])) / 4, "b": None})
    assert_trees_close(u, u_one, rtol=1e-12, atol=0)


# --- the torch.optim adapter ---------------------------------------------------------------------


@pytest.mark.parametrize("alias", [gx.tg_adamw, gx.tg_laprop, gx.tg_rmsprop])
def test_optimizer_with_sum_grad_squared_equals_functional(alias):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    steps = [([torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)],
              [torch.rand(4, 3, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64)]) for _ in range(6)]
    tx = alias(lr=0.05, weight_decay=0.1)
    params = [p.clone() for p in init]
    state = tx.init(params)
    for grads, sgs in steps:
        u, state = tx.update(grads, state, params, sum_grad_squared=sgs)
        params = gx.apply_updates(params, u)

    ps = [torch.nn.Parameter(p.clone()) for p in init]
    opt = gx.Optimizer(ps, alias(lr=0.05, weight_decay=0.1))
    assert opt.param_groups[0]["lr"] == 0.05
    for grads, sgs in steps:
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        before = [s.clone() for s in sgs]
        opt.step(sum_grad_squared=sgs)
        assert all(torch.equal(a, b) for a, b in zip(sgs, before)), "the adapter modified sum_grad_squared"
    for a, b in zip(ps, params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="sum_grad_squared"):
        opt.step()


def test_optimizer_live_lr():
    p = torch.nn.Parameter(T(1.0, -2.0))
    opt = gx.Optimizer([p], gx.tg_adamw(lr=0.1, weight_decay=0.0))
    opt.param_groups[0]["lr"] = 0.0
    p.grad = T(0.5, -1.0)
    opt.step(sum_grad_squared=[T(1.0, 4.0)])
    torch.testing.assert_close(p.detach(), T(1.0, -2.0))
    opt.param_groups[0]["lr"] = 0.1
    opt.step(sum_grad_squared=[T(1.0, 4.0)])
    assert not torch.equal(p.detach(), T(1.0, -2.0))


# --- purity, frozen leaves, compile ----------------------------------------------------------------

MAKERS = {
    "tg_adamw": lambda: gx.tg_adamw(0.1),
    "tg_adamw_nograft": lambda: gx.tg_adamw(0.1, graft=False, fallback="adam"),
    "tg_laprop": lambda: gx.tg_laprop(0.1),
    "tg_laprop_nograft": lambda: gx.tg_laprop(0.1, betas=(0.9, 0.99, 0.8, 0.9), graft=False),
    "tg_rmsprop": lambda: gx.tg_rmsprop(0.1),
    "tg_rmsprop_nograft": lambda: gx.tg_rmsprop(0.1, betas=(0.9, 0.8), graft=False),
    "graft": lambda: gx.chain(gx.graft(gx.scale_by_adam(), gx.scale_by_truegrad_rmsprop(graft=False)), gx.scale(-0.1)),
    "multi_steps": lambda: gx.multi_steps(gx.tg_adamw(0.1), every_k=2),
}


def _pt(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64),
            "frozen": torch.randn(2, generator=g, dtype=F64)}


def _gs(seed):
    g = torch.Generator().manual_seed(seed)
    grads = {"w": torch.randn(3, 2, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64), "frozen": None}
    sgs = {"w": torch.rand(3, 2, generator=g, dtype=F64), "b": torch.rand(2, generator=g, dtype=F64), "frozen": None}
    return grads, sgs


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_update_is_pure_including_the_statistic(name):
    tx = MAKERS[name]()
    params = _pt()
    state = tx.init(params)
    for step in range(4):
        grads, sgs = _gs(step)
        before = [snapshot(x) for x in (grads, sgs, state, params)]
        u, new_state = tx.update(grads, state, params, sum_grad_squared=sgs)
        for b, x, what in zip(before, (grads, sgs, state, params), ("updates", "sum_grad_squared", "state", "params")):
            assert_unchanged(b, x, what)
        held = [x for x in gx.tree.tree_flatten(params)[0] + gx.tree.tree_flatten(new_state)[0]
                if isinstance(x, torch.Tensor) and x.numel() > 1]
        for out in gx.tree.tree_flatten(u)[0]:
            if isinstance(out, torch.Tensor):
                assert all(out.data_ptr() != h.data_ptr() for h in held), "an output update aliases params or state"
        assert u["frozen"] is None
        params, state = gx.apply_updates(params, u), new_state


def test_frozen_leaf_keeps_its_own_count():
    tx = gx.scale_by_truegrad_adam(graft=False)
    st = tx.init({"a": T(0.0), "b": T(0.0)})
    _, st = tx.update({"a": T(1.0), "b": None}, st, sum_grad_squared={"a": T(1.0), "b": None})
    u, st = tx.update({"a": T(1.0), "b": T(2.0)}, st, sum_grad_squared={"a": T(1.0), "b": T(4.0)})
    assert int(st.count["a"]) == 2 and int(st.count["b"]) == 1
    # b's first step: m = 0.2, s = 0.004 -> u = 0.2 / sqrt(0.004 / 0.001) / 0.1 = 1
    torch.testing.assert_close(u["b"], T(1.0), rtol=1e-12, atol=0)


@needs("fullgraph_compile")
@pytest.mark.parametrize("name", ["tg_adamw", "tg_laprop_nograft", "tg_rmsprop", "graft", "multi_steps"])
def test_compiled_update_equals_eager_and_compiles_once(name):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tx = MAKERS[name]()

    def step(p, g, s, st):
        u, st = tx.update(g, st, p, sum_grad_squared=s)
        return gx.apply_updates(p, u), st

    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    results = []
    for fn in (step, compiled):
        p = _pt()
        st = tx.init(p)
        for i in range(6):
            grads, sgs = _gs(i)
            p, st = fn(p, grads, sgs, st)
        results.append((p, st))
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert_trees_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    assert_trees_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)


@needs("fullgraph_compile")
def test_inductor_compiled_tg_adamw_equals_eager():
    torch._dynamo.reset()
    tx = gx.tg_adamw(1e-2, weight_decay=0.1)

    def step(p, g, s, st):
        u, st = tx.update(g, st, p, sum_grad_squared=s)
        return gx.apply_updates(p, u), st

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        p = {k: v.float() for k, v in _pt().items()}
        st = tx.init(p)
        for i in range(3):
            grads, sgs = _gs(i)
            p, st = fn(p, gx.tree.tree_to(grads, dtype=torch.float32), gx.tree.tree_to(sgs, dtype=torch.float32), st)
        results.append(p)
    assert_trees_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_graft_inside_the_adapter_protects_the_shared_input():
    """In the adapter, the clip's output is owned and scale_by_adam may reuse an owned input in
    place; graft must keep it intact for the direction transform."""
    make = lambda: gx.chain(gx.clip_by_global_norm(0.5), gx.graft(gx.scale_by_adam(), gx.identity()),
                            gx.scale(-0.1))
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    steps = [[torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)] for _ in range(4)]
    tx = make()
    params = [p.clone() for p in init]
    state = tx.init(params)
    for grads in steps:
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
    ps = [torch.nn.Parameter(p.clone()) for p in init]
    opt = gx.Optimizer(ps, make())
    for grads in steps:
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()
    for a, b in zip(ps, params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: gx.tg_adamw(0.1), lambda: gx.multi_steps(gx.tg_laprop(0.1), every_k=3)])
def test_optimizer_state_dict_round_trip(make):
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=F64)), torch.nn.Parameter(torch.randn(2, generator=g, dtype=F64))]
    opt = gx.Optimizer(ps, make())
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=F64)
        opt.step(sum_grad_squared=[torch.rand(p.shape, generator=g, dtype=F64) for p in ps])
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = gx.Optimizer(ps2, make())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares the tensors it need not cast
    grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in ps]
    sgs = [torch.rand(p.shape, generator=g, dtype=F64) for p in ps]
    for o, params in ((opt, ps), (opt2, ps2)):
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        o.step(sum_grad_squared=sgs)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
