"""Clippers (gradxform.clipping): hand-computed numerical checks, torch-clip equivalence,
AGC / block-RMS hand values, random-rule statistics, compile, purity and input validation."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from torch.func import grad

import gradxform as gx
from gradxform.clipping import (
    AutoClipState,
    ClipStats,
    MonitorNormState,
    RandomClipState,
    adaptive_grad_clip,
    autoclip,
    clip,
    clip_by_block_rms,
    clip_by_leaf_norm,
    clip_fraction,
    clip_leaves,
    clipped_sgd,
    monitor_norm,
    norm_history,
    random_clip_by_global_norm,
    uniform_from_hash,
)
from helpers import needs
from helpers import assert_trees_close, loss_of, make_data, make_mlp, run_functional, run_torch, assert_unchanged, snapshot, eager_and_compiled

F64 = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=F64)


def close(x, expected, rtol=1e-9, atol=0.0):
    torch.testing.assert_close(x, torch.as_tensor(expected, dtype=x.dtype), rtol=rtol, atol=atol)


def apply_once(tx, g, params=None):
    return tx.update(g, tx.init(g if params is None else params), params)[0]


def run_steps(tx, grads, params=None):
    """Feed a list of gradient trees through ``tx``; return the outputs and the final state."""
    state = tx.init(grads[0] if params is None else params)
    outs = []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs, state


def along(direction, norms):
    """One-leaf gradients ``n * direction`` with the given norms."""
    return [{"w": n * t(*direction)} for n in norms]


# --- hand-computed: static rules at lam = 2, g = {a: (3, 4), b: (-1)} ----------------------------


def spec_g():
    return {"a": t(3.0, 4.0), "b": t(-1.0)}


def test_spec_norm_rule_at_level_2():
    for out in (apply_once(gx.clip_by_global_norm(2.0), spec_g()), dict(zip("ab", clip_leaves("norm", list(spec_g().values()), 2.0)))):
        close(out["a"], [1.176696811, 1.568929081], rtol=0, atol=1e-9)
        close(out["b"], [-0.392232270], rtol=0, atol=1e-9)


def test_spec_layer_wise_rule_at_level_2():
    for out in (apply_once(clip_by_leaf_norm(2.0), spec_g()), dict(zip("ab", clip_leaves("layer_wise", list(spec_g().values()), 2.0)))):
        close(out["a"], [1.2, 1.6])
        close(out["b"], [-1.0])


def test_spec_coordinate_wise_rule_at_level_2_is_exact():
    # torch-clip gives 1.9999999933, 1.999999995 (quirk 10: lam / (|g| + 1e-8)); the clamp is exact
    for out in (apply_once(clip(2.0), spec_g()), dict(zip("ab", clip_leaves("coordinate_wise", list(spec_g().values()), 2.0)))):
        assert torch.equal(out["a"], t(2.0, 2.0))
        assert torch.equal(out["b"], t(-1.0))


def test_clip_leaves_accepts_tensor_level_and_rejects_unknown_rule():
    leaves = list(spec_g().values())
    for rule in ("norm", "layer_wise", "coordinate_wise"):
        a = clip_leaves(rule, leaves, 2.0)
        b = clip_leaves(rule, leaves, torch.tensor(2.0, dtype=F64))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="unknown clipping rule 'auto'"):
        clip_leaves("auto", leaves, 1.0)


# --- hand-computed: clipped SGD with momentum -----------------------------------------------------------


def test_spec_clipped_sgd_momentum_clips_before_the_buffer():
    tx = clipped_sgd(1.0, momentum=0.9, rule="norm", level=1.0)
    outs, _ = run_steps(tx, [{"w": t(3.0, 4.0)}, {"w": t(0.0, 0.1)}], params={"w": t(0.0, 0.0)})
    close(outs[0]["w"], [-0.6, -0.8])
    close(outs[1]["w"], [-0.54, -0.82])
    # the same as the explicit chain chain(clip, trace(mu), scale(-lr))
    chain = gx.chain(gx.clip_by_global_norm(1.0), gx.trace(0.9), gx.scale(-1.0))
    outs2, _ = run_steps(chain, [{"w": t(3.0, 4.0)}, {"w": t(0.0, 0.1)}])
    for a, b in zip(outs, outs2):
        torch.testing.assert_close(a["w"], b["w"], rtol=1e-15, atol=0)


def test_torch_clip_reference_applies_the_raw_factor_to_the_buffer():
    """Quirk 7, documented: the reference's second step is (-2.7, -3.7), not (-0.54, -0.82)."""
    tc = pytest.importorskip("torch_clip.optimizers")
    p = torch.nn.Parameter(t(0.0, 0.0))
    opt = tc.ClippedSGD([p], 1.0, momentum=0.9, clipping_type="norm", clipping_level=1.0)
    steps = []
    for g in (t(3.0, 4.0), t(0.0, 0.1)):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        steps.append(p.detach() - before)
    close(steps[0], [-0.6, -0.8])
    close(steps[1], [-2.7, -3.7])


# --- hand-computed: AutoClip -------------------------------------------------------------------------------

AUTOCLIP_NORMS = [5.0, 1.0, 10.0, 0.5, 2.0, 8.0]


@pytest.mark.parametrize("method,factors", [
    ("linear", [1, 1, 0.5, 1, 1, 0.4375]),
    ("inverted_cdf", [1, 1, 0.5, 1, 1, 0.25]),
])
def test_spec_autoclip_factor_table(method, factors):
    tx = autoclip(0.5, method=method)
    grads = along((0.6, 0.8), AUTOCLIP_NORMS)
    state = tx.init(grads[0])
    for g, n, f in zip(grads, AUTOCLIP_NORMS, factors):
        u, state = tx.update(g, state)
        close(u["w"], g["w"] * f, rtol=1e-12)
        close(state.stats.last_factor, f, rtol=1e-12)
        close(state.stats.last_norm, n, rtol=1e-12)
    assert int(state.stats.count) == 6 and int(state.stats.clipped) == 2
    close(clip_fraction(state.stats), 2 / 6)


def test_spec_autoclip_q01_thresholds():
    tx = autoclip(0.1)  # the paper's default: 10th percentile, np.percentile interpolation
    grads = along((0.6, 0.8), AUTOCLIP_NORMS)
    state = tx.init(grads[0])
    thresholds = []
    for g in grads:
        _, state = tx.update(g, state)
        thresholds.append(state.threshold)
    close(torch.stack(thresholds), [5, 1.4, 1.8, 0.65, 0.7, 0.75], rtol=1e-12)


def test_autoclip_thresholds_equal_numpy_quantiles_through_the_ring_buffer():
    """Exact history while count < H, then a sliding window of the last H norms."""
    rng = np.random.default_rng(0)
    norms = rng.lognormal(size=23)
    for method in ("linear", "inverted_cdf"):
        for q in (0.1, 0.3, 0.5, 0.7, 1.0):
            tx = autoclip(q, history=8, method=method)
            state = tx.init({"w": t(0.0, 0.0)})
            for i, n in enumerate(norms):
                _, state = tx.update({"w": float(n) * t(0.6, 0.8)}, state)
                window = norms[max(0, i + 1 - 8): i + 1]
                expected = np.quantile(window, q, method=method)
                close(state.threshold, expected, rtol=1e-12)
            assert torch.allclose(norm_history(state), torch.as_tensor(norms[-8:]), rtol=1e-12)


def test_torch_clip_heap_quirk_and_our_inverted_cdf_value():
    """Quirk 2: q = 0.5, norms 1, 10, 2, 0.5, 3: the reference reports 3, inverted_cdf gives 2."""
    tx = autoclip(0.5, method="inverted_cdf")
    _, state = run_steps(tx, along((0.6, 0.8), [1, 10, 2, 0.5, 3]))
    close(state.threshold, 2.0)
    tc = pytest.importorskip("torch_clip.utils")
    hist = tc.GradHistory("auto_clip", 0.5)
    for n in [1, 10, 2, 0.5, 3]:
        hist.add_grad_len(n)
    assert hist.get_grad_len() == 3


def test_torch_clip_autoclip_factor_row_of_the_table():
    """The reference row of the 4.4 table, 1 1 **1** 1 1 0.25: its heap misses the clip at step 3."""
    tc = pytest.importorskip("torch_clip.optimizers")
    p = torch.nn.Parameter(t(0.0, 0.0))
    opt = tc.ClippedSGD([p], 1.0, clipping_type="auto_clip", clipping_level=1.0, p_autoclip=0.5)
    factors = []
    for g in along((0.6, 0.8), AUTOCLIP_NORMS):
        before = p.detach().clone()
        p.grad = g["w"]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Here!" (quirk 1)
            opt.step()
        factors.append(float((before - p.detach()).norm() / g["w"].norm()))
    np.testing.assert_allclose(factors, [1, 1, 1, 1, 1, 0.25], rtol=1e-12)


# --- hand-computed: random rules --------------------------------------------------------------------------


def test_hash_values_of_section_0():
    u = uniform_from_hash(0, torch.arange(4))
    close(u, [0.5793412523, 0.4042372010, 0.5280684268, 0.0667256543], rtol=0, atol=1e-10)


@pytest.mark.parametrize("power,expected_clips", [(1, [False, False, False, True]), (2, [True] * 4)])
def test_spec_pinned_random_decisions_seed0(power, expected_clips):
    # P_linear = 0.1 ** 0.4 = 0.398..., P_quadratic = 0.1 ** 0.16 = 0.691...; u = 0.579, 0.404, 0.528, 0.067
    for tx in (random_clip_by_global_norm(2.0, beta=0.1, power=power, seed=0),
               clipped_sgd(1.0, rule=("linear" if power == 1 else "quadratic") + "_rand_norm", level=2.0,
                           beta=0.1)):
        outs, state = run_steps(tx, [{"w": t(3.0, 4.0)}] * 4, params={"w": t(0.0, 0.0)})
        sign = 1.0 if isinstance(state, RandomClipState) else -1.0  # clipped_sgd returns -lr * c
        for out, clipped in zip(outs, expected_clips):
            close(sign * out["w"], [1.2, 1.6] if clipped else [3.0, 4.0], rtol=1e-12)
    assert int(state.inner_state[0].stats.clipped) == sum(expected_clips)


@pytest.mark.parametrize("power,prob,freq_200k", [(1, 0.5**0.2, 0.8725), (2, 0.5**0.04, 0.9725)])
def test_spec_random_clip_frequency(power, prob, freq_200k):
    """g = (3, 4), lam = 1, beta = 0.5: P = 0.5 ** (0.2 ** power)."""
    close(torch.tensor(prob, dtype=F64), 0.8705505633 if power == 1 else 0.9726549474, rtol=0, atol=1e-10)
    # frequencies measured over 200k steps (the decision is u(seed 0, t0) < P)
    u = uniform_from_hash(0, torch.arange(200_000))
    assert round(float((u < prob).double().mean()), 4) == freq_200k
    # 10,000 steps through the transform: within the binomial 99% interval around P
    n = 10_000
    tx = random_clip_by_global_norm(1.0, beta=0.5, power=power, seed=0)
    g = {"w": t(3.0, 4.0)}
    state = tx.init(g)
    clipped_outputs = 0
    for _ in range(n):
        out, state = tx.update(g, state)
        clipped_outputs += int(out["w"][0] != 3.0)
    freq = int(state.stats.clipped) / n
    assert clipped_outputs == int(state.stats.clipped) and int(state.stats.count) == n
    half_width = 2.5758 * math.sqrt(prob * (1 - prob) / n)
    assert abs(freq - prob) <= half_width, (freq, prob, half_width)


def _varied_grads(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64)} for _ in range(n)]


def _decisions(tx, grads):
    outs, state = run_steps(tx, grads)
    return [not torch.equal(o["w"], g["w"]) for o, g in zip(outs, grads)], outs, state


@pytest.mark.parametrize("make", [
    lambda seed: random_clip_by_global_norm(1.5, beta=0.5, seed=seed),
    lambda seed: autoclip(0.5, beta=0.5, power=2, seed=seed),
], ids=["rand_norm", "rand_autoclip"])
def test_same_seed_same_decisions(make):
    grads = _varied_grads(60)
    d1, o1, s1 = _decisions(make(7), grads)
    d2, o2, s2 = _decisions(make(7), grads)
    d3, _, _ = _decisions(make(8), grads)
    assert d1 == d2 and 5 < sum(d1) < 55  # a real mix of clipped and unclipped steps
    for a, b in zip(o1, o2):
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"])
    assert d1 != d3
    assert int(s1.stats.clipped) == sum(d1)


@pytest.mark.parametrize("make", [
    lambda: random_clip_by_global_norm(1.5, beta=0.5, seed=11),
    lambda: autoclip(0.5, history=16, beta=0.5, seed=11),
    lambda: clipped_sgd(0.1, momentum=0.9, rule="quadratic_rand_autoclip", q=0.5, beta=0.7, seed=11),
], ids=["rand_norm", "rand_autoclip", "clipped_sgd"])
def test_save_restore_mid_run_continues_the_same_stream(make):
    grads = _varied_grads(40)
    params = {"w": torch.zeros(3, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    tx = make()
    full, _ = run_steps(tx, grads, params)
    state = tx.init(params)
    for g in grads[:17]:
        _, state = tx.update(g, state, params)
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    restored = torch.load(blob)  # weights_only=True (the states are registered safe globals)
    tx2 = make()  # a fresh process would rebuild the transform
    for i, g in enumerate(grads[17:], start=17):
        out, restored = tx2.update(g, restored, params)
        assert torch.equal(out["w"], full[i]["w"]) and torch.equal(out["b"], full[i]["b"]), f"step {i}"


@pytest.mark.parametrize("power", [1, 2])
def test_random_rules_never_clip_at_or_below_the_level(power):
    # beta close to 1 makes P ~ 1: only the ||g|| > lam condition can stop a clip
    tx = random_clip_by_global_norm(1.0, beta=0.999, power=power, seed=0)
    grads = [{"w": s * t(0.6, 0.8)} for s in (1.0, 0.5, 0.999, 0.0)] * 50
    outs, state = run_steps(tx, grads)
    for o, g in zip(outs, grads):
        assert torch.equal(o["w"], g["w"])
    assert int(state.stats.clipped) == 0 and int(state.stats.count) == 200
    # random AutoClip: a norm at or below its threshold (here each new norm is the running max)
    tx = autoclip(1.0, beta=0.999, power=power, seed=0)
    grads = along((0.6, 0.8), np.linspace(0.1, 3.0, 100))
    outs, state = run_steps(tx, grads)
    assert all(torch.equal(o["w"], g["w"]) for o, g in zip(outs, grads))
    assert int(state.stats.clipped) == 0


# --- equivalence with torch_clip.optimizers.ClippedSGD over 50 steps ---------------------------------------

LR = 0.1
STEPS = 50
LEVELS = {"norm": 0.19, "layer_wise": 0.1, "coordinate_wise": 0.02}  # all clip on a good share of steps
TORCH_CLIP_NAME = {"auto": "auto_clip"}
Q = 0.75  # torch-clip's documented p_autoclip


def torch_clip_run(rule, momentum, level=None, q=None, steps=STEPS):
    tc = pytest.importorskip("torch_clip.optimizers")
    kwargs = dict(momentum=momentum, clipping_type=TORCH_CLIP_NAME.get(rule, rule))
    if level is not None:
        kwargs["clipping_level"] = float(level)  # an int would be replaced by the default (quirk 4)
    if q is not None:
        kwargs["p_autoclip"] = q
    with contextlib.redirect_stdout(io.StringIO()):  # AutoClip prints "Here!" (quirk 1)
        return run_torch(lambda ps: tc.ClippedSGD(ps, LR, **kwargs), steps)


def hand_clipped_sgd(rule, momentum, level=None, q=None, steps=STEPS):
    """Independent reference: clip the gradient, then b_t = mu b_{t-1} + c_t (b_1 = c_1), p -= lr b_t.

    Plain tensor arithmetic and np.quantile; the same model, batches and gradients as
    helpers.run_functional."""
    model = make_mlp(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs, history = {}, []
    for step in range(steps):
        x, y = make_data(seed=100 + step)
        g = grad(loss_of(model, x, y))(params)
        norm = math.sqrt(sum(float((v * v).sum()) for v in g.values()))
        if rule == "norm":
            c = {k: v * min(1.0, level / norm) for k, v in g.items()}
        elif rule == "layer_wise":
            c = {k: v * min(1.0, level / math.sqrt(float((v * v).sum()))) for k, v in g.items()}
        elif rule == "coordinate_wise":
            c = {k: v.clamp(-level, level) for k, v in g.items()}
        elif rule == "auto":
            history.append(norm)
            thr = float(np.quantile(history, q, method="inverted_cdf"))
            c = {k: v * min(1.0, thr / norm) for k, v in g.items()}
        for k in params:
            bufs[k] = c[k] if step == 0 or momentum == 0 else momentum * bufs[k] + c[k]
            params[k] = params[k] - LR * bufs[k]
    return params


def ours(rule, momentum, level=None, q=None, steps=STEPS):
    kwargs = dict(q=q) if q is not None else {}
    return run_functional(clipped_sgd(LR, momentum=momentum, rule=rule, level=level, **kwargs), steps)


@pytest.mark.parametrize("rule", ["norm", "layer_wise"])
def test_matches_torch_clip_without_momentum(rule):
    assert_trees_close(ours(rule, 0.0, LEVELS[rule]), torch_clip_run(rule, 0.0, LEVELS[rule]), rtol=1e-10, atol=1e-12)


def test_coordinate_wise_matches_torch_clip_without_momentum_up_to_its_eps():
    # quirk 10: torch-clip multiplies by lam / (|g| + 1e-8), so a clipped entry comes out short by
    # lam * 1e-8 / (|g| + 1e-8) < 1e-8 (|g| > lam): at most lr * 1e-8 = 1e-9 per step and entry,
    # < 5e-8 after 50 steps. Compare at atol 1e-7 (and check that the difference is really there).
    ref = torch_clip_run("coordinate_wise", 0.0, LEVELS["coordinate_wise"])
    got = ours("coordinate_wise", 0.0, LEVELS["coordinate_wise"])
    assert_trees_close(got, ref, rtol=0, atol=1e-7)
    assert max(float((got[k] - ref[k]).abs().max()) for k in got) > 1e-10
    assert_trees_close(got, hand_clipped_sgd("coordinate_wise", 0.0, LEVELS["coordinate_wise"]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule", ["layer_wise", "coordinate_wise"])
def test_with_momentum_torch_clip_clips_its_buffer(rule):
    """Quirk 7 for layer_wise / coordinate_wise: torch-clip clips the momentum buffer, i.e. it is
    chain(trace, clip, -lr). clipped_sgd clips the gradient before the buffer: hand reference."""
    level = LEVELS[rule]
    block = clip_by_leaf_norm(level) if rule == "layer_wise" else clip(level)
    reference_order = run_functional(gx.chain(gx.trace(0.9), block, gx.scale_by_learning_rate(LR)), STEPS)
    tol = dict(rtol=1e-10, atol=1e-12) if rule == "layer_wise" else dict(rtol=0, atol=1e-7)  # quirk 10, see above
    assert_trees_close(reference_order, torch_clip_run(rule, 0.9, level), **tol)
    assert_trees_close(ours(rule, 0.9, level), hand_clipped_sgd(rule, 0.9, level), rtol=1e-10, atol=1e-12)


def test_norm_with_momentum_against_hand_value_not_torch_clip():
    """Quirk 7 for norm: torch-clip scales its unclipped buffer by the raw gradient's factor."""
    level = LEVELS["norm"]
    got = ours("norm", 0.9, level)
    assert_trees_close(got, hand_clipped_sgd("norm", 0.9, level), rtol=1e-10, atol=1e-12)
    ref = torch_clip_run("norm", 0.9, level)
    assert not torch.allclose(got["0.weight"], ref["0.weight"], rtol=1e-3), "quirk 7 did not show: revisit the test"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_auto_against_hand_value(momentum):
    """Quirk 2 (the reference's heap) and, with momentum, quirk 7: compare with np.quantile's
    inverted_cdf instead of torch-clip."""
    assert_trees_close(ours("auto", momentum, q=Q), hand_clipped_sgd("auto", momentum, q=Q), rtol=1e-10, atol=1e-12)


def test_auto_matches_torch_clip_until_its_heap_goes_wrong():
    """Without momentum the reference agrees with us up to the first step where its heap differs
    from the true inverted_cdf quantile (quirk 2); after 50 steps they differ."""
    tc_utils = pytest.importorskip("torch_clip.utils")
    # the norms our run sees
    tx = gx.chain(monitor_norm(size=STEPS), clipped_sgd(LR, rule="auto", q=Q))
    model = make_mlp(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for step in range(STEPS):
        x, y = make_data(seed=100 + step)
        u, state = tx.update(grad(loss_of(model, x, y))(params), state, params)
        params = gx.apply_updates(params, u)
    norms = norm_history(state[0]).tolist()
    heap = tc_utils.GradHistory("auto_clip", Q)
    first_bad = None
    for i, n in enumerate(norms):
        heap.add_grad_len(n)
        if heap.get_grad_len() != np.quantile(norms[: i + 1], Q, method="inverted_cdf"):
            first_bad = i
            break
    assert first_bad is not None and first_bad >= 5, first_bad
    assert_trees_close(ours("auto", 0.0, q=Q, steps=first_bad), torch_clip_run("auto", 0.0, q=Q, steps=first_bad),
                       rtol=1e-10, atol=1e-12)
    assert not torch.allclose(params["0.weight"], torch_clip_run("auto", 0.0, q=Q)["0.weight"], rtol=1e-9)


# --- AGC and block RMS: hand values ------------------------------------------------------------------------


def test_agc_literal_values():
    params = {"w": t(3.0, 4.0, 0.0, 0.0).reshape(2, 2), "b": t(2.0, 0.0)}
    grads = {"w": t(6.0, 8.0, 1.0, 0.0).reshape(2, 2), "b": t(-0.5, 3.0)}
    out = apply_once(adaptive_grad_clip(0.5, eps=1e-3), grads, params)
    # row 0: ||p|| = 5 -> max 2.5, ||g|| = 10 -> x0.25; row 1: ||p|| = 0 -> max 0.5 * 1e-3, ||g|| = 1
    close(out["w"], [[1.5, 2.0], [5e-4, 0.0]], rtol=1e-12)
    # the bias is one unit by default (the NFNets code, optax, timm): ||p_b|| = 2 -> max 1,
    # ||g_b|| = sqrt(9.25) -> x 1 / sqrt(9.25)
    close(out["b"], [-0.5 / math.sqrt(9.25), 3.0 / math.sqrt(9.25)], rtol=1e-12)
    # vector_unit="element": each bias element is a unit: |p| = 2 -> max 1 >= 0.5 passes;
    # |p| = 0 -> max 5e-4, |g| = 3 -> 5e-4
    out = apply_once(adaptive_grad_clip(0.5, eps=1e-3, vector_unit="element"), grads, params)
    close(out["b"], [-0.5, 5e-4], rtol=1e-12)
    close(out["w"], [[1.5, 2.0], [5e-4, 0.0]], rtol=1e-12)


def test_agc_default_takes_a_vector_as_one_unit():
    # regression: the default used to clip each element of a 1-D leaf separately, which the
    # authors' code, optax and timm do not; a bias at zero init clipped every element to eps * c
    p = {"b": torch.zeros(3, dtype=F64), "g": t(1.0, 1.0, 1.0, 1.0)}
    g = {"b": t(1e-4, -2e-4, 0.0), "g": t(0.5, 0.0, 0.0, 0.0)}
    out = apply_once(adaptive_grad_clip(0.1, eps=1e-3), g, p)
    # b: ||p|| = 0 -> max 1e-4, ||g|| = sqrt(5) 1e-4 -> x 1/sqrt(5); g: ||p|| = 2 -> max 0.2 < 0.5
    close(out["b"], [1e-4 / math.sqrt(5), -2e-4 / math.sqrt(5), 0.0], rtol=1e-12)
    close(out["g"], [0.2, 0.0, 0.0, 0.0], rtol=1e-12)


def test_agc_matches_optax_with_layouts_mapped():
    """optax's adaptive_grad_clip on the same Linear, Conv2d, bias, gain and scalar leaves, mapped
    to JAX's input-first layouts: Linear (out, in) -> (in, out), Conv2d (out, in, kh, kw) -> (kh,
    kw, in, out) (HWIO); 1-D and 0-d leaves as they are."""
    optax = pytest.importorskip("optax", reason="optax (with jax) is the AGC reference: pip install optax jax")
    jax = pytest.importorskip("jax", reason="optax needs jax")
    jnp = jax.numpy
    gen = torch.Generator().manual_seed(0)
    f32 = torch.float32
    shapes = {"lin.weight": (6, 5), "lin.bias": (6,), "conv.weight": (4, 3, 3, 2), "conv.bias": (4,),
              "norm.weight": (5,), "scale": ()}
    to_jax = {"lin.weight": lambda x: x.T, "conv.weight": lambda x: x.permute(2, 3, 1, 0)}
    from_jax = {"lin.weight": lambda x: x.T, "conv.weight": lambda x: x.permute(3, 2, 0, 1)}
    for clipping, eps in ((0.05, 1e-3), (0.5, 0.3)):
        params = {k: torch.randn(s, generator=gen, dtype=f32) for k, s in shapes.items()}
        params["conv.bias"] = torch.zeros(4, dtype=f32)  # a zero-init bias: its norm is eps
        # per-unit gradient scales from 1e-3 to 10, so that some units clip and some do not
        grads = {k: torch.randn(s, generator=gen, dtype=f32)
                 * (torch.logspace(-3, 1, s[0]).reshape(-1, *([1] * (len(s) - 1))) if len(s) > 1 else 1.0)
                 for k, s in shapes.items()}
        ours = apply_once(adaptive_grad_clip(clipping, eps=eps), grads, params)
        jp = {k: jnp.asarray(to_jax.get(k, lambda x: x)(v).numpy()) for k, v in params.items()}
        jg = {k: jnp.asarray(to_jax.get(k, lambda x: x)(v).numpy()) for k, v in grads.items()}
        ref_tx = optax.adaptive_grad_clip(clipping, eps=eps)
        ref = jax.jit(ref_tx.update)(jg, ref_tx.init(jp), jp)[0]
        changed = 0
        for k in shapes:
            expected = from_jax.get(k, lambda x: x)(torch.from_numpy(np.array(ref[k])))
            torch.testing.assert_close(ours[k], expected, rtol=1e-5, atol=1e-7, msg=k)
            changed += not torch.equal(ours[k], grads[k])
        assert 0 < changed  # some leaves clipped


def _layers():
    torch.manual_seed(0)
    return {
        "linear": torch.nn.Linear(5, 4).double(),
        "conv2d": torch.nn.Conv2d(3, 4, kernel_size=3).double(),
        "conv3d": torch.nn.Conv3d(2, 3, kernel_size=(2, 3, 2)).double(),
    }


def _layer_trees():
    params, grads = {}, {}
    g = torch.Generator().manual_seed(1)
    for name, layer in _layers().items():
        for pname, p in layer.named_parameters():
            key = f"{name}.{pname}"
            params[key] = p.detach().clone()
            # per-unit scales from 1e-3 to 1e1, so some units clip and some do not
            scales = torch.logspace(-3, 1, p.shape[0], dtype=F64).reshape(-1, *([1] * (p.ndim - 1)))
            grads[key] = torch.randn(p.shape, generator=g, dtype=F64) * scales
    return params, grads


@pytest.mark.parametrize("clipping,eps,vector_unit", [(0.01, 1e-3, "whole"), (0.1, 0.5, "whole"),
                                                       (0.01, 1e-3, "element")])
def test_agc_linear_conv2d_conv3d_weights_and_biases(clipping, eps, vector_unit):
    params, grads = _layer_trees()
    out = apply_once(adaptive_grad_clip(clipping, eps=eps, vector_unit=vector_unit), grads, params)
    n_clipped = n_kept = 0
    for key, g in grads.items():
        p = params[key]
        expected = torch.empty_like(g)
        # one output unit (dim 0) at a time; a 1-D bias: one element, or the whole vector
        units = [slice(None)] if (g.ndim == 1 and vector_unit == "whole") else range(g.shape[0])
        for i in units:
            g_unit, p_unit = g[i], p[i]
            g_norm = math.sqrt(float((g_unit**2).sum()))
            max_norm = clipping * max(math.sqrt(float((p_unit**2).sum())), eps)
            if g_norm > max_norm:
                expected[i] = g_unit * (max_norm / g_norm)
                n_clipped += 1
            else:
                expected[i] = g_unit
                n_kept += 1
        close(out[key], expected, rtol=1e-12, atol=1e-15)
    assert n_clipped >= 3 and n_kept >= 3


def test_block_rms_literal_and_layers():
    out = apply_once(clip_by_block_rms(1.0), {"a": t(3.0, 4.0), "b": t(0.5, -0.5), "z": t(0.0, 0.0)})
    close(out["a"], [3 / math.sqrt(12.5), 4 / math.sqrt(12.5)])  # rms = sqrt((9 + 16) / 2)
    close(out["b"], [0.5, -0.5])  # rms 0.5 <= 1 passes
    close(out["z"], [0.0, 0.0])  # a zero block passes
    params, grads = _layer_trees()
    threshold = 1.0  # the weights and one bias clip, the conv2d bias (rms 0.75) passes
    out = apply_once(clip_by_block_rms(threshold), grads)
    kinds = set()
    for key, g in grads.items():
        rms = math.sqrt(float((g**2).sum()) / g.numel())
        kinds.add(rms > threshold)
        close(out[key], g / max(1.0, rms / threshold), rtol=1e-12)
    assert kinds == {True, False}


# --- monitoring --------------------------------------------------------------------------------------------


def test_monitor_norm_records_norms_in_a_ring_buffer():
    tx = monitor_norm(size=4)
    grads = along((0.6, 0.8), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    outs, state = run_steps(tx, grads)
    assert all(o is g for o, g in zip(outs, grads))  # identity
    assert isinstance(state, MonitorNormState) and int(state.count) == 6
    close(state.last_norm, 6.0, rtol=1e-12)
    close(state.history, [5.0, 6.0, 3.0, 4.0], rtol=1e-12)  # history[t % 4]
    close(norm_history(state), [3.0, 4.0, 5.0, 6.0], rtol=1e-12)
    _, state = run_steps(tx, grads[:2])
    close(norm_history(state), [1.0, 2.0], rtol=1e-12)


def test_stats_of_random_clip():
    tx = random_clip_by_global_norm(2.0, beta=0.1, power=1, seed=0)
    _, state = run_steps(tx, [{"w": t(3.0, 4.0)}] * 4)
    assert isinstance(state.stats, ClipStats)
    assert state.stats.count.dtype == torch.int64 and state.stats.clipped.dtype == torch.int64
    assert int(state.stats.count) == 4 and int(state.stats.clipped) == 1
    close(state.stats.last_norm, 5.0)
    close(state.stats.last_factor, 0.4)
    close(clip_fraction(state.stats), 0.25)


# --- compile and purity ------------------------------------------------------------------------------------

CLIPPERS = {
    "clip_by_leaf_norm": lambda: clip_by_leaf_norm(0.5),
    "clip": lambda: clip(0.3),
    "clip_by_block_rms": lambda: clip_by_block_rms(0.2),
    "adaptive_grad_clip": lambda: adaptive_grad_clip(0.05),
    "autoclip": lambda: autoclip(0.3, history=4),
    "autoclip_inverted_cdf": lambda: autoclip(0.6, history=4, method="inverted_cdf"),
    "random_autoclip": lambda: autoclip(0.5, history=4, beta=0.5, power=2, seed=3),
    "random_clip_by_global_norm": lambda: random_clip_by_global_norm(1.0, beta=0.5, seed=1),
    "monitor_norm": lambda: monitor_norm(size=4),
    "clipped_sgd_norm": lambda: clipped_sgd(0.1, momentum=0.9, rule="norm", level=0.5),
    "clipped_sgd_auto": lambda: clipped_sgd(0.1, momentum=0.9, rule="auto", q=0.5, history=4),
    "clipped_sgd_rand_autoclip": lambda: clipped_sgd(0.1, rule="linear_rand_autoclip", q=0.5, beta=0.5),
}


def _compile_problem(steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 4, generator=g, dtype=dtype), "b": torch.randn(6, generator=g, dtype=dtype)}
    grads = [{"w": torch.randn(6, 4, generator=g, dtype=dtype) * s, "b": torch.randn(6, generator=g, dtype=dtype) * s}
             for s in np.geomspace(0.05, 2.0, steps)[np.random.default_rng(0).permutation(steps)]]
    return params, grads


@needs("fullgraph_compile")
@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_compiles_once_and_equals_eager(name):
    params, grads = _compile_problem(7)
    eager, comp, frames = eager_and_compiled(CLIPPERS[name](), params, grads)
    assert frames == 1, f"{frames} frames for {len(grads)} steps"
    (p_e, s_e), (p_c, s_c) = eager[-1], comp[-1]
    assert_trees_close(p_c, p_e, rtol=1e-5, atol=1e-6)
    assert_trees_close(s_c, s_e, rtol=1e-5, atol=1e-6)






@needs("meta_foreach")
@pytest.mark.parametrize("name", sorted(CLIPPERS) + ["clip_by_global_norm"])
def test_update_reads_no_device_value_and_keeps_counts_on_cpu(name):
    """The meta device stands in for an accelerator: its tensors have no data, so any host read of
    a device value (``.item()``, ``.cpu()``, ``bool()``, ``int()``) raises. The step counts stay
    0-d int64 CPU tensors (they advance on every update); what depends on the gradients
    (``ClipStats.clipped``, norms, factors, the norm history) stays on the params' device."""
    tx = CLIPPERS[name]() if name in CLIPPERS else gx.clip_by_global_norm(0.5)
    params = {"w": torch.empty(6, 4, device="meta"), "b": torch.empty(6, device="meta")}
    state = tx.init(params)
    for _ in range(3):
        out, state = tx.update({"w": torch.empty(6, 4, device="meta"), "b": torch.empty(6, device="meta")}, state, params)
    assert {x.device.type for x in out.values()} == {"meta"}
    leaves = [x for x in gx.tree.tree_flatten(state)[0] if isinstance(x, torch.Tensor)]
    counts = [x for x in leaves if x.dtype == torch.int64]
    on_cpu = [x for x in leaves if x.device.type == "cpu"]
    # CPU: the step counts and seeds, and the float64 hyperparameters clipped_sgd injects
    assert all(x.ndim == 0 and (x.dtype == torch.int64 or x.dtype == torch.float64) for x in on_cpu)
    stats = _find(state, ClipStats)
    for st in stats:
        assert st.count.device.type == "cpu" and int(st.count) == 3
        assert {st.clipped.device.type, st.last_norm.device.type, st.last_factor.device.type} == {"meta"}
    stateful = "autoclip" in name or "random" in name or name in ("clipped_sgd_auto", "clipped_sgd_rand_autoclip")
    assert bool(stats) == stateful, name
    if stateful or name == "monitor_norm":
        assert counts, "a stateful clipper keeps a count"


def _find(node, cls):
    """Every ``cls`` node in a state tree."""
    if isinstance(node, cls):
        return [node]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, (tuple, list)) else ()
    return [x for c in children for x in _find(c, cls)]


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_update_is_pure(name):
    tx = CLIPPERS[name]()
    params, grads = _compile_problem(4, dtype=F64)
    params = {**params, "frozen": torch.ones(2, dtype=F64)}
    state = tx.init(params)
    for g in grads:
        g = {**g, "frozen": None}
        before = (snapshot(g), snapshot(state), snapshot(params))
        out, new_state = tx.update(g, state, params)
        assert_unchanged(before[0], g, "updates")
        assert_unchanged(before[1], state, "state")
        assert_unchanged(before[2], params, "params")
        held = [x for x in gx.tree.tree_flatten(params)[0] + gx.tree.tree_flatten(new_state)[0]
                if isinstance(x, torch.Tensor) and x.numel() > 1]
        for leaf in gx.tree.tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                assert all(leaf.data_ptr() != h.data_ptr() for h in held), "an output aliases params or state"
        assert out["frozen"] is None
        params, state = gx.apply_updates(params, out), new_state


ADAPTER_TXS = {
    "clipped_sgd_auto": lambda: clipped_sgd(LR, momentum=0.9, rule="auto", q=0.5),
    "clipped_sgd_rand_norm": lambda: clipped_sgd(LR, momentum=0.9, rule="quadratic_rand_norm", level=0.19, beta=0.5),
    # after trace, the clips get updates the adapter owns: their in-place paths run
    "trace_clip": lambda: gx.chain(gx.trace(0.9), clip(0.02), gx.scale_by_learning_rate(LR)),
    "trace_leaf_norm": lambda: gx.chain(gx.trace(0.9), clip_by_leaf_norm(0.1), gx.scale_by_learning_rate(LR)),
    "trace_block_rms": lambda: gx.chain(gx.trace(0.9), clip_by_block_rms(0.01), gx.scale_by_learning_rate(LR)),
    "trace_autoclip": lambda: gx.chain(gx.trace(0.9), autoclip(0.3), gx.scale_by_learning_rate(LR)),
}


@pytest.mark.parametrize("name", sorted(ADAPTER_TXS))
def test_through_the_torch_optim_adapter(name):
    """gx.Optimizer runs the clippers like the functional API (in-place buffer reuse included)."""
    functional = run_functional(ADAPTER_TXS[name](), 10)
    adapter = run_torch(lambda ps: gx.Optimizer(ps, ADAPTER_TXS[name]()), 10)
    assert_trees_close(adapter, functional, rtol=1e-12, atol=1e-14)


def test_clipped_sgd_hyperparameters_are_group_keys():
    opt = gx.Optimizer(make_mlp(0).parameters(), clipped_sgd(LR, momentum=0.9, rule="layer_wise"))
    group = opt.param_groups[0]
    assert group["lr"] == LR and group["momentum"] == 0.9 and group["level"] == 0.3
    # the level is live, as torch-clip's group["clipping_level"]: the step's norm is lr * level
    model = make_mlp(0)
    opt = gx.Optimizer(model.parameters(), clipped_sgd(LR, rule="norm", level=1.0))
    opt.param_groups[0]["level"] = 1e-6
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_data(seed=100)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    step = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(model.parameters(), before)))
    assert step == pytest.approx(LR * 1e-6, rel=1e-9)


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: autoclip(q=0.0), r"q \(the quantile level\) must be > 0"),
    (lambda: autoclip(q=1.5), r"q \(the quantile level\) must be <= 1"),
    (lambda: autoclip(q=-0.1), r"q \(the quantile level\)"),
    (lambda: autoclip(0.5, method="nearest"), "method must be one of"),
    (lambda: autoclip(0.5, history=0), "history must be an int >= 1"),
    (lambda: autoclip(0.5, beta=1.0), "beta must be < 1"),
    (lambda: autoclip(0.5, beta=0.0), "beta must be > 0"),
    (lambda: random_clip_by_global_norm(1.0, beta=1.5), "beta must be < 1"),
    (lambda: random_clip_by_global_norm(1.0, beta=-0.5), "beta must be > 0"),
    (lambda: random_clip_by_global_norm(1.0, None), "beta is required"),
    (lambda: random_clip_by_global_norm(-1.0, beta=0.5), "max_norm must be > 0"),
    (lambda: clip_by_leaf_norm(-1.0), "max_norm must be > 0"),
    (lambda: clip_by_leaf_norm(0.0), "max_norm must be > 0"),
    (lambda: clip(-0.1), "max_delta must be > 0"),
    (lambda: clip_by_block_rms(-2.0), "threshold must be > 0"),
    (lambda: adaptive_grad_clip(-0.01), "clipping must be > 0"),
    (lambda: adaptive_grad_clip(0.01, eps=0.0), "eps must be > 0"),
    (lambda: adaptive_grad_clip(0.01, vector_unit="row"), "vector_unit must be one of"),
    (lambda: monitor_norm(size=0), "size must be an int >= 1"),
    (lambda: clipped_sgd(0.1, rule="norm", level=-1.0), "level must be > 0"),
    (lambda: clipped_sgd(0.1, rule="auto"), "needs q"),
    (lambda: clipped_sgd(0.1, rule="auto", q=1.2), r"q \(the quantile level\) must be <= 1"),
    (lambda: clipped_sgd(0.1, rule="auto", q=0.5, level=1.0), "give q, not level"),
    (lambda: clipped_sgd(0.1, rule="linear_rand_norm"), "beta is required"),
    (lambda: clipped_sgd(0.1, rule="linear_rand_norm", beta=2.0), "beta must be < 1"),
    (lambda: clipped_sgd(0.1, rule="quadratic_rand_norm", beta=0.5, power=1), "has power 2"),
    (lambda: clipped_sgd(0.1, rule="norm", beta=0.5), "beta is only used by the random rules"),
    (lambda: clipped_sgd(0.1, rule="nope"), "unknown clipping rule 'nope'"),
    (lambda: clipped_sgd(-0.1), "lr must be >= 0"),
])
def test_bad_input_raises_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_update_before_init_and_missing_params():
    with pytest.raises(ValueError, match="call init"):
        autoclip().update({"w": t(1.0)}, None)
    with pytest.raises(TypeError, match="expected the state"):
        random_clip_by_global_norm(1.0, beta=0.5).update({"w": t(1.0)}, AutoClipState(*([None] * 5)))
    with pytest.raises(ValueError, match="adaptive_grad_clip needs params"):
        apply_once(adaptive_grad_clip(0.01), {"w": t(1.0)})
