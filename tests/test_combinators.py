"""gradxform.combinators against optax 0.2.8 (float64 in both, 100+ steps of our own gradients),
through gx.Optimizer (LR scheduler, checkpoint round trip, the EMA and slow params readable), and
the per-example gradients of an unmodified model (DP-SGD)."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from torch.func import functional_call

import gradxform as gx
from helpers import needs

STEPS = 120
SHAPES = {"w": (3, 4), "b": (4,), "c": (2, 2, 3)}


@pytest.fixture(scope="module")
def ox():
    """optax and jax in float64 (skipped when absent: they are test-only extras)."""
    optax = pytest.importorskip("optax", reason="optax (a test-only extra) is not installed")
    import jax

    jax.config.update("jax_enable_x64", True)
    return optax, jax


def _init_np(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _noise(rng, t, nan_steps=(), big_steps=()):
    out = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    if t in nan_steps:
        out["w"][1, 2] = np.nan
        out["c"][0, 1, 1] = np.inf
    if t in big_steps:
        out["b"] *= 100.0
    return out


def _close(torch_tree, jax_tree, what, t, rtol=1e-10, atol=1e-12):
    jl = {k: np.asarray(v) for k, v in jax_tree.items()}
    for k, v in torch_tree.items():
        np.testing.assert_allclose(v.numpy(), jl[k], rtol=rtol, atol=atol, err_msg=f"{what} '{k}' at step {t}")


def _run(ox, gx_tx, ox_tx, steps=STEPS, extra=None, nan_steps=(), big_steps=(), check=None, grad_scale=1.0):
    """Both transforms on the same gradient sequence ``g_t = noise_t + 0.1 * p_t``; the outputs and
    the params must agree at every step. ``extra(t)`` gives the extra arguments of step t."""
    optax, jax = ox
    p0 = _init_np()
    pt = {k: torch.tensor(v) for k, v in p0.items()}
    pj = {k: jax.numpy.asarray(v) for k, v in p0.items()}
    st, sj = gx_tx.init(pt), ox_tx.init(pj)
    upd = jax.jit(ox_tx.update)
    rng = np.random.default_rng(1)
    for t in range(steps):
        n = _noise(rng, t, nan_steps, big_steps)
        gt = {k: grad_scale * torch.tensor(n[k]) + 0.1 * pt[k] for k in n}
        gj = {k: grad_scale * jax.numpy.asarray(n[k]) + 0.1 * pj[k] for k in n}
        kw = extra(t) if extra else {}
        ut, st = gx_tx.update(gt, st, pt, **kw)
        uj, sj = upd(gj, sj, pj, **kw)
        _close(ut, uj, "update", t)
        pt, pj = gx.apply_updates(pt, ut), optax.apply_updates(pj, uj)
        _close(pt, pj, "params", t)
        if check:
            check(t, st, sj)
    return st, sj, pt


# --- one transform each ------------------------------------------------------------------------


@pytest.mark.parametrize("debias", [True, False])
def test_ema_equals_optax(ox, debias):
    optax, _ = ox
    _run(ox, gx.chain(gx.ema(0.9, debias=debias), gx.scale(-0.05)),
         optax.chain(optax.ema(0.9, debias=debias), optax.scale(-0.05)))


def test_apply_every_equals_optax(ox):
    optax, _ = ox
    _run(ox, gx.chain(gx.apply_every(3), gx.scale(-0.02)), optax.chain(optax.apply_every(3), optax.scale(-0.02)))


def test_centralize_equals_optax(ox):
    optax, _ = ox
    _run(ox, gx.chain(gx.centralize(), gx.scale(-0.05)), optax.chain(optax.centralize(), optax.scale(-0.05)))


def test_zero_nans_equals_optax(ox):
    optax, _ = ox
    nan_steps = set(range(3, STEPS, 7))

    def check(t, st, sj):
        for k in SHAPES:
            assert bool(st.found_nan[k]) == bool(sj[0].found_nan[k]), (t, k)

    # the injected inf would reach the params: clip it away after zero_nans (in both)
    _run(ox, gx.chain(gx.zero_nans(), gx.clip(1.0), gx.scale(-0.05)),
         optax.chain(optax.zero_nans(), optax.clip(1.0), optax.scale(-0.05)), nan_steps=nan_steps,
         check=lambda t, st, sj: check(t, st[0], (sj[0],)))


def test_keep_params_nonnegative_equals_optax(ox):
    optax, _ = ox
    *_, pt = _run(ox, gx.chain(gx.scale(-0.3), gx.keep_params_nonnegative()),
                  optax.chain(optax.scale(-0.3), optax.keep_params_nonnegative()))
    leaves = torch.cat([v.flatten() for v in pt.values()])
    assert bool((leaves >= 0).all()) and int((leaves == 0).sum()) > 3  # the constraint was active


def test_keep_params_nonnegative_lands_on_zero():
    tx = gx.keep_params_nonnegative()
    p = {"a": torch.tensor([1.0, 2.0, -1.0])}
    u, _ = tx.update({"a": torch.tensor([-3.0, 1.0, 0.5])}, tx.init(p), p)
    assert torch.equal(u["a"], torch.tensor([-1.0, 1.0, 1.0]))


@pytest.mark.parametrize("scale_factor", [1.0, -0.1])
def test_normalize_by_update_norm_equals_optax(ox, scale_factor):
    optax, _ = ox
    _run(ox, gx.chain(gx.normalize_by_update_norm(scale_factor), gx.scale(0.5)),
         optax.chain(optax.normalize_by_update_norm(scale_factor), optax.scale(0.5)))


@pytest.mark.parametrize("mask", [True, {"w": True, "b": False, "c": True}])
def test_freeze_equals_optax(ox, mask):
    optax, _ = ox
    _run(ox, gx.chain(gx.freeze(mask), gx.scale(-0.05)), optax.chain(optax.freeze(mask), optax.scale(-0.05)))


@needs("fullgraph_compile")
def test_freeze_with_a_dict_mask_compiles_in_one_graph():
    """Regression: a dict of Python bools as the mask failed to flatten under torch.compile."""
    tx = gx.freeze({"w": True, "b": False})
    p = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    step = lambda g, s: tx.update(g, s, p)[0]  # noqa: E731
    g = {"w": torch.full((2, 3), 2.0), "b": torch.full((3,), 2.0)}
    out = torch.compile(step, fullgraph=True, backend="eager")(g, tx.init(p))
    assert torch.equal(out["w"], torch.zeros(2, 3)) and torch.equal(out["b"], g["b"])


def test_named_chain_equals_optax(ox):
    optax, _ = ox
    gtx = gx.named_chain(("clip", gx.clip_by_global_norm(1.0)), ("adam", gx.scale_by_adam()), ("lr", gx.scale(-0.01)))
    otx = optax.named_chain(("clip", optax.clip_by_global_norm(1.0)), ("adam", optax.scale_by_adam()),
                            ("lr", optax.scale(-0.01)))

    def check(t, st, sj):
        assert list(st) == list(sj) == ["clip", "adam", "lr"]
        _close(st["adam"].mu, sj["adam"].mu, "adam mu", t)

    _run(ox, gtx, otx, check=check)


def test_named_chain_rejects_duplicates_and_unknown_extras():
    with pytest.raises(ValueError, match="unique"):
        gx.named_chain(("a", gx.scale(1.0)), ("a", gx.scale(2.0)))
    with pytest.raises(TypeError, match=r"\(name, transform\)"):
        gx.named_chain(gx.scale(1.0))
    tx = gx.named_chain(("a", gx.scale(1.0)))
    p = {"x": torch.ones(2)}
    with pytest.raises(TypeError, match="valu"):
        tx.update(p, tx.init(p), p, valu=1.0)


@pytest.mark.parametrize("which", ["transform", "mask"])
def test_conditionally_equals_optax(ox, which):
    optax, _ = ox
    g_f, o_f = (gx.conditionally_transform, optax.conditionally_transform) if which == "transform" else \
        (gx.conditionally_mask, optax.conditionally_mask)
    cond = lambda step: step % 3 != 1  # noqa: E731
    _run(ox, gx.chain(g_f(gx.scale_by_adam(), cond), gx.scale(-0.01)),
         optax.chain(o_f(optax.scale_by_adam(), cond), optax.scale(-0.01)))


def test_reduce_on_plateau_equals_optax(ox):
    optax, _ = ox
    values = np.concatenate([1.0 / (1.0 + np.arange(30)), 0.03 + 0.01 * np.random.default_rng(5).random(STEPS)])
    gtx = gx.chain(gx.scale(-0.01), gx.reduce_on_plateau(factor=0.5, patience=3, cooldown=2, accumulation_size=2,
                                                          min_scale=0.01))
    otx = optax.chain(optax.scale(-0.01), optax.contrib.reduce_on_plateau(factor=0.5, patience=3, cooldown=2,
                                                                         accumulation_size=2, min_scale=0.01))
    scales = []

    def check(t, st, sj):
        scales.append(float(st[1].scale))
        assert float(st[1].scale) == float(sj[1].scale), t
        assert int(st[1].plateau_count) == int(sj[1].plateau_count) and int(st[1].cooldown_count) == int(sj[1].cooldown_count)
        assert float(st[1].best_value) == pytest.approx(float(sj[1].best_value), rel=1e-14)

    _run(ox, gtx, otx, extra=lambda t: {"value": float(values[t])}, check=check)
    assert min(scales) < 0.1  # the plateau was reached (several reductions)


def test_reduce_on_plateau_needs_value():
    tx = gx.reduce_on_plateau()
    p = {"x": torch.ones(2)}
    with pytest.raises(TypeError, match="value"):
        tx.update(p, tx.init(p), p)
    chained = gx.chain(gx.sgd(0.1), tx)
    with pytest.raises(TypeError, match="value"):
        chained.update(p, chained.init(p), p)
    with pytest.raises(ValueError, match="factor"):
        gx.reduce_on_plateau(factor=1.5)


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_equals_optax(ox, reset_state):
    optax, jax = ox
    gtx = gx.lookahead(gx.chain(gx.scale_by_adam(), gx.scale(-0.02)), sync_period=5, slow_step_size=0.5,
                       reset_state=reset_state)
    otx = optax.lookahead(optax.chain(optax.scale_by_adam(), optax.scale(-0.02)), sync_period=5, slow_step_size=0.5,
                          reset_state=reset_state)
    p0 = _init_np()
    pt = {k: torch.tensor(v) for k, v in p0.items()}
    pj = optax.LookaheadParams.init_synced({k: jax.numpy.asarray(v) for k, v in p0.items()})
    st, sj = gtx.init(pt), otx.init(pj)
    upd = jax.jit(otx.update)
    rng = np.random.default_rng(1)
    for t in range(STEPS):
        n = _noise(rng, t)
        gt = {k: torch.tensor(n[k]) + 0.1 * pt[k] for k in n}
        gj = {k: jax.numpy.asarray(n[k]) + 0.1 * pj.fast[k] for k in n}  # gradients at the fast params
        ut, st = gtx.update(gt, st, pt)
        uj, sj = upd(gj, sj, pj)
        pt, pj = gx.apply_updates(pt, ut), optax.apply_updates(pj, uj)
        _close(pt, pj.fast, "fast params", t)
        _close(gx.lookahead_params(st, pt), pj.slow, "slow params", t)
    assert not torch.equal(gx.lookahead_params(st)["w"], pt["w"])  # last step was not a sync: they differ


def test_lookahead_rejects_bad_period_and_missing_params():
    with pytest.raises(ValueError, match="sync_period"):
        gx.lookahead(gx.sgd(0.1), 0, 0.5)
    tx = gx.lookahead(gx.sgd(0.1), 2, 0.5)
    p = {"x": torch.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
    with pytest.raises(ValueError, match="LookaheadState"):
        gx.lookahead_params(gx.sgd(0.1).init(p))


def _multi_steps(optax, inner, fn):
    return optax.MultiSteps(inner, every_k_schedule=1, should_skip_update_fn=fn).gradient_transformation()


def test_skip_not_finite_equals_optax(ox):
    optax, _ = ox
    nan_steps = set(range(2, STEPS, 9))

    def check(t, st, sj):
        assert int(st[0].gradient_step) == int(sj[0].gradient_step), t
        assert bool(st[0].skip_state["should_skip"]) == bool(sj[0].skip_state["should_skip"]) == (t in nan_steps)
        assert int(st[0].skip_state["num_not_finite"]) == int(sj[0].skip_state["num_not_finite"])

    _run(ox, gx.chain(gx.skip_if(gx.scale_by_adam(), gx.skip_not_finite), gx.scale(-0.01)),
         optax.chain(_multi_steps(optax, optax.scale_by_adam(), optax.skip_not_finite), optax.scale(-0.01)),
         nan_steps=nan_steps, check=check)


def test_skip_large_updates_equals_optax(ox):
    optax, _ = ox
    big = set(range(4, STEPS, 11))

    def check(t, st, sj):
        assert bool(st[0].skip_state["should_skip"]) == bool(sj[0].skip_state["should_skip"]) == (t in big), t
        assert float(st[0].skip_state["norm_squared"]) == pytest.approx(float(sj[0].skip_state["norm_squared"]), rel=1e-12)

    _run(ox, gx.chain(gx.skip_if(gx.scale_by_adam(), functools.partial(gx.skip_large_updates, max_squared_norm=200.0)),
                      gx.scale(-0.01)),
         optax.chain(_multi_steps(optax, optax.scale_by_adam(), functools.partial(optax.skip_large_updates,
                                                                                   max_squared_norm=200.0)),
                     optax.scale(-0.01)),
         big_steps=big, check=check)


def test_params_ema_is_the_ema_of_the_params():
    """By hand: e_0 = p_0, e_t = d e_{t-1} + (1 - d) p_t, p_t the params after update t."""
    tx = gx.chain(gx.sgd(0.1), gx.params_ema(0.9))
    p = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    state = tx.init(p)
    e = p["w"].clone()
    for t in range(STEPS):
        g = {"w": torch.tensor([0.5 * t % 3, -1.0], dtype=torch.float64)}
        u, state = tx.update(g, state, p)
        p = gx.apply_updates(p, u)
        e = 0.9 * e + 0.1 * p["w"]
        torch.testing.assert_close(gx.ema_params(state)["w"], e, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="params_ema"):
        gx.ema_params(gx.sgd(0.1).init(p))


# --- per-example gradients and clipping --------------------------------------------------------


def _per_example_cases(seed=0):
    rng = np.random.default_rng(seed)
    g = {"a": rng.standard_normal((6, 3, 2)), "b": rng.standard_normal((6, 4))}
    g["a"][2] = 0.0
    g["b"][2] = 0.0  # a zero example: 0/0 -> multiplier 1
    return g


@pytest.mark.parametrize("clip", [0.0, 0.7, 1.25, 3.0, float("inf")])
def test_per_example_clips_equal_optax(ox, clip):
    optax, jax = ox
    for seed in range(3):
        g = _per_example_cases(seed)
        gt = {k: torch.tensor(v) for k, v in g.items()}
        gj = {k: jax.numpy.asarray(v) for k, v in g.items()}
        st, nt = gx.per_example_global_norm_clip(gt, clip)
        sj, nj = optax.per_example_global_norm_clip(gj, clip)
        _close(st, sj, "global clip", seed)
        assert int(nt) == int(nj)
        for uniform in (True, False):
            st, nt = gx.per_example_layer_norm_clip(gt, clip, uniform=uniform)
            sj, nj = optax.per_example_layer_norm_clip(gj, clip, uniform=uniform)
            _close(st, sj, f"layer clip uniform={uniform}", seed)
            assert {k: int(v) for k, v in nt.items()} == {k: int(v) for k, v in nj.items()}


def test_per_example_clip_rejects_grads_without_a_batch_dim():
    with pytest.raises(ValueError, match="dim 0"):
        gx.per_example_global_norm_clip({"a": torch.ones(3, 2), "b": torch.ones(4)}, 1.0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _loss_fn(model):
    def loss_fn(params, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss_fn


def test_per_example_grads_equal_a_loop_of_backward_passes():
    model = _model()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    params = dict(model.named_parameters())
    per_ex = gx.per_example_grads(_loss_fn(model), chunk_size=4)(params, (x, y))
    for n in range(9):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_ex[name][n], p.grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="examples"):
        gx.per_example_grads(_loss_fn(model))(params, (x, y[:4]))


def test_dp_sgd_recipe_clips_each_example_then_adds_noise():
    """The documented DP-SGD step (Abadi et al. 2016): per-example grads, clip to C, sum, add
    N(0, (sigma C)^2), divide by the batch size, SGD. Without noise and with a huge C it is plain
    SGD on the mean loss; with a small C each example contributes at most C to the sum."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    per_ex = gx.per_example_grads(_loss_fn(model))(params, (x, y))
    full = torch.func.grad(_loss_fn(model))(params, (x, y))
    clipped_sum, n_clipped = gx.per_example_global_norm_clip(per_ex, 1e9)
    assert int(n_clipped) == 0
    for k in params:
        torch.testing.assert_close(clipped_sum[k] / 16, full[k], rtol=1e-12, atol=1e-14)
    C, sigma = 0.05, 1.1
    clipped_sum, n_clipped = gx.per_example_global_norm_clip(per_ex, C)
    assert int(n_clipped) == 16
    assert float(gx.tree_global_norm(clipped_sum)) <= 16 * C * (1 + 1e-12)
    noise_gen = torch.Generator().manual_seed(0)
    noisy = {k: (v + sigma * C * torch.randn(v.shape, generator=noise_gen, dtype=v.dtype)) / 16
             for k, v in clipped_sum.items()}
    tx = gx.sgd(0.1)
    updates, _ = tx.update(noisy, tx.init(params), params)
    torch.testing.assert_close(updates["0.weight"], -0.1 * noisy["0.weight"])


# --- through gx.Optimizer ------------------------------------------------------------------------


def _opt_cases():
    return {
        "lookahead": lambda: gx.lookahead(gx.adam(0.05), sync_period=3, slow_step_size=0.5),
        "params_ema": lambda: gx.chain(gx.adamw(0.05), gx.params_ema(0.9)),
        "named_chain": lambda: gx.named_chain(("clip", gx.clip_by_global_norm(1.0)), ("adam", gx.adam(0.05))),
        "skip_if": lambda: gx.skip_if(gx.adam(0.05), gx.skip_not_finite),
        "conditionally_mask": lambda: gx.conditionally_mask(gx.adam(0.05), lambda step: step % 2 == 0),
        "ema": lambda: gx.chain(gx.ema(0.9), gx.sgd(0.05)),
        "apply_every": lambda: gx.chain(gx.apply_every(2), gx.sgd(0.05)),
        "reduce_on_plateau": lambda: gx.chain(gx.adam(0.05), gx.reduce_on_plateau(patience=2)),
    }


def _train(model, opt, sched, start, stop, extra):
    for t in range(start, stop):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(**({"value": loss.detach()} if extra else {}))
        sched.step()


def _fresh(name, fused):
    model = _model()
    opt = gx.Optimizer(model.parameters(), _opt_cases()[name](), fused=fused)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, sched


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("name", sorted(_opt_cases()))
def test_through_optimizer_equals_functional_and_resumes_bit_exact(name, fused):
    extra = name == "reduce_on_plateau"
    model, opt, sched = _fresh(name, fused)
    _train(model, opt, sched, 0, 12, extra)
    # the functional loop with the same lr schedule: the same params
    ref = _model()
    tx = _opt_cases()[name]()
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    state = tx.init(params)
    for t in range(12):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        loss, grads = torch.func.grad_and_value(_loss_fn(ref))(params, (x, y)) [::-1]
        gx.set_hyperparam(state, "lr", 0.05 * 0.5 ** (t // 4))
        updates, state = tx.update(grads, state, params, **({"value": loss} if extra else {}))
        params = gx.apply_updates(params, updates)
    for (k, p) in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=1e-12, atol=1e-14)
    if name == "params_ema":
        names = [k for k, _ in model.named_parameters()]
        for k, e in zip(names, gx.ema_params(opt)):
            torch.testing.assert_close(e, gx.ema_params(state)[k], rtol=1e-12, atol=1e-14)
    if name == "lookahead":
        names = [k for k, _ in model.named_parameters()]
        for k, e in zip(names, gx.lookahead_params(opt)):
            torch.testing.assert_close(e, gx.lookahead_params(state)[k], rtol=1e-12, atol=1e-14)
    # checkpoint at step 12, continue to 20: bit-exact against uninterrupted
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()}, buf)
    _train(model, opt, sched, 12, 20, extra)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = _fresh(name, fused)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    _train(model2, opt2, sched2, 12, 20, extra)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b), name


def test_lookahead_reset_keeps_frozen_params_without_state_in_the_optimizer():
    """Regression: the reset re-initialised the fast state from every param, so a param without a
    gradient got adam's buffers in opt.state but no slow copy, and the next step raised KeyError."""
    w, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = gx.Optimizer([w, frozen], gx.lookahead(gx.adam(0.1), sync_period=2, slow_step_size=0.5, reset_state=True))
    for _ in range(5):
        w.grad = torch.ones(3)
        opt.step()
    assert frozen not in opt.state or not opt.state[frozen]
    assert torch.equal(frozen.detach(), torch.ones(2))
    assert sorted(opt.state[w]) == ["exp_avg", "exp_avg_sq", "slow", "step"]
