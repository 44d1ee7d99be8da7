"""Clipped SSTM and iterate-averaging restarts (Gorbunov, Danilova and Gasnikov, NeurIPS 2020, arXiv:2005.10785; hand-computed checks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.func import grad

import gradxform as gx
from gradxform.sstm import ClippedSSTMState, RestartsState, clipped_sstm, with_restarts
from helpers import needs
from helpers import assert_trees_close, assert_trees_equal, loss_of, make_data, make_mlp, snapshot, eager_and_compiled

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(x: torch.Tensor, *expected: float, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    torch.testing.assert_close(x, t(*expected), rtol=rtol, atol=atol)


# --- restarts: the numerical check of 4.4 ---------------------------------------------------------


def _restart_problem():
    params = {"a": t(1, 2), "b": t(10)}
    grads = {"a": t(1, 1), "b": t(2)}
    return params, grads


def test_restarts_numerical_check():
    """SGD lr 1, constant gradients, first_period 2, coeff 2: the restart after step 3 moves the
    params to the mean of the 3 iterates (not the reference's sum / 2 layers, quirk 3)."""
    params, grads = _restart_problem()
    tx = with_restarts(gx.sgd(1.0), first_period=2, coeff=2)
    state = tx.init(params)
    seen = []
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
        seen.append(params)
    assert torch.equal(seen[0]["a"], t(0, 1)) and torch.equal(seen[0]["b"], t(8))
    assert torch.equal(seen[1]["a"], t(-1, 0)) and torch.equal(seen[1]["b"], t(6))
    assert int(state.restarts) == 0 and int(state.n) == 2
    # Step 3: the iterate would be a = (-2, -1), b = 4; the restart returns the mean of
    # a (0, 1), (-1, 0), (-2, -1) and b 8, 6, 4.
    u, state = tx.update(grads, state, params)
    params = gx.apply_updates(params, u)
    assert torch.equal(params["a"], t(-1, 0)) and torch.equal(params["b"], t(6))
    assert int(state.restarts) == 1 and int(state.n) == 0 and int(state.period) == 4
    assert_trees_equal(state.running_sum, {"a": t(0, 0), "b": t(0)})
    # The next restart comes after period + 1 = 5 more steps, at the mean of those 5 iterates:
    # a (-2,-1), (-3,-2), (-4,-3), (-5,-4), (-6,-5) -> (-4, -3); b 4, 2, 0, -2, -4 -> 0.
    for step in range(5):
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
        if step < 4:
            assert int(state.restarts) == 1
    assert int(state.restarts) == 2 and int(state.period) == 8
    assert torch.equal(params["a"], t(-4, -3)) and torch.equal(params["b"], t(0))


def _restart_steps_ours(first_period: int, coeff: float, max_steps: int, steps: int) -> list[int]:
    params = {"w": torch.zeros(2, dtype=F64)}
    grads = {"w": t(1.0, -1.0)}
    tx = with_restarts(gx.sgd(0.01), first_period=first_period, coeff=coeff, max_steps=max_steps)
    state = tx.init(params)
    out = []
    for step in range(1, steps + 1):
        before = int(state.restarts)
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
        if int(state.restarts) > before:
            out.append(step)
    return out


def _restart_steps_torch_clip(first_period: int, coeff: float, max_steps: int, steps: int) -> list[int]:
    """Drive torch_clip's Restarter as its README does: step, add_coords, make_restart."""
    from torch_clip.optimizers_collector import OptimizerProperties
    from torch_clip.restarter import Restarter

    model = torch.nn.Linear(2, 1).to(F64)
    props = OptimizerProperties(torch.optim.SGD, lr=0.01)
    restarter = Restarter(props, first_restart_steps_cnt=first_period, restart_coeff=coeff, max_steps_cnt=max_steps)
    opt = props.optimizer_class(model.parameters(), **props.optimizer_kwargs)
    x = torch.ones(4, 2, dtype=F64)
    out = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        restarter.add_coords(model.parameters())
        new_opt = restarter.make_restart(model, opt)
        if new_opt is not opt:
            out.append(step)
        opt = new_opt
    return out


@pytest.mark.parametrize("first_period,coeff,max_steps", [(3, 1.5, 60), (2, 2.0, 5000), (5, 1.25, 30), (1, 1.0, 12)])
def test_restart_schedule_matches_torch_clip(first_period, coeff, max_steps):
    pytest.importorskip("torch_clip", reason="torch_clip is not installed (peer package for comparison tests)")
    steps = 200
    ours = _restart_steps_ours(first_period, coeff, max_steps, steps)
    ref = _restart_steps_torch_clip(first_period, coeff, max_steps, steps)
    assert ours == ref
    assert ours, "the configuration should restart at least once"


def test_restart_schedule_values():
    """Independent of torch_clip: restarts after period + 1 steps, period = floor(period * coeff),
    and none once period + 1 >= max_steps (3 -> 4 -> 6 -> 9 -> 13 -> 19 -> 28 -> 42 -> 63)."""
    assert _restart_steps_ours(3, 1.5, 60, 200) == [4, 9, 16, 26, 40, 60, 89, 132]


def test_no_restart_after_max_steps():
    params, grads = _restart_problem()
    tx = with_restarts(gx.sgd(1.0), first_period=2, coeff=2, max_steps=6)
    plain = gx.sgd(1.0)
    state = tx.init(params)
    for _ in range(8):  # restarts after steps 3 (n = 3 < 6) and 8 (n = 5 < 6); then period 8: n = 9 >= 6
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
    assert int(state.restarts) == 2 and int(state.period) == 8
    ref_params, ref_state = params, plain.init(params)
    for _ in range(30):
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
        ru, ref_state = plain.update(grads, ref_state, ref_params)
        ref_params = gx.apply_updates(ref_params, ru)
    assert int(state.restarts) == 2 and int(state.n) == 30
    assert_trees_equal(params, ref_params)  # from then on it is the inner optimiser alone


def test_inner_state_is_reinitialised_at_restart():
    params, grads = _restart_problem()
    inner = gx.chain(gx.trace(0.9), gx.scale(-1.0))
    tx = with_restarts(inner, first_period=2, coeff=2)
    state = tx.init(params)
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
    buf = state.inner_state[0].trace
    assert not torch.equal(buf["a"], torch.zeros(2, dtype=F64))
    u, state = tx.update(grads, state, params)
    params = gx.apply_updates(params, u)
    assert int(state.restarts) == 1
    trace_state = state.inner_state[0]
    assert_trees_equal(trace_state.trace, {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(1, dtype=F64)})
    assert_trees_equal(trace_state.count, {"a": torch.tensor(0), "b": torch.tensor(0)})
    assert_trees_equal(state.inner_state, inner.init(params))
    # The next step is a fresh first momentum step: b_1 = g, so the update is -g.
    u, state = tx.update(grads, state, params)
    assert_trees_equal(u, {"a": t(-1, -1), "b": t(-2)})


def test_restarts_sgd_momentum_alias_state_reset():
    """With the injected alias gx.sgd(momentum=...), the whole inner state (count included) restarts."""
    params, grads = _restart_problem()
    inner = gx.sgd(1.0, momentum=0.9)
    tx = with_restarts(inner, first_period=2, coeff=2)
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
    assert int(state.restarts) == 1
    assert_trees_equal(state.inner_state, inner.init(params))


def test_restarts_forward_extra_args():
    def init(params):
        return gx.EmptyState()

    def update(updates, state, params=None, *, factor):
        return gx.tree.tree_map(lambda u: -factor * u, updates), state

    tx = with_restarts(gx.GradientTransformation(init, update), first_period=1)
    assert gx.extra_args_of(tx).required == frozenset({"factor"})
    params, grads = _restart_problem()
    state = tx.init(params)
    u, state = tx.update(grads, state, params, factor=2.0)
    assert_trees_equal(u, {"a": t(-2, -2), "b": t(-4)})
    chained = gx.chain(tx)
    u, _ = chained.update(grads, chained.init(params), params, factor=1.0)
    assert_trees_equal(u, {"a": t(-1, -1), "b": t(-2)})
    with pytest.raises(TypeError, match="factor"):
        chained.update(grads, chained.init(params), params)


def test_restarts_frozen_leaf_passes_through():
    params = {"a": t(1, 2), "frozen": None}
    grads = {"a": t(1, 1), "frozen": None}
    tx = with_restarts(gx.sgd(1.0), first_period=1)
    state = tx.init(params)
    assert state.running_sum["frozen"] is None
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        assert u["frozen"] is None
        params = gx.apply_updates(params, u)
    assert torch.equal(params["a"], t(-0.5, 0.5))  # mean of (0, 1) and (-1, 0)


# --- clipped SSTM: the numerical check of 4.4 -----------------------------------------------------


EXPECTED_SSTM = [(2.4, -3.2), (1.9, -2.533333333333333), (1.44, -1.92), (1.0, -1.3333333333333333),
                 (0.5714285714285714, -0.7619047619047619)]


def test_clipped_sstm_numerical_check():
    """f(x) = 0.5 ||x||^2, x_0 = (3, -4), a = L = B = nu = 1, norm clip."""
    tx = clipped_sstm(1.0, 1.0, 1.0)
    params = t(3, -4)
    state = tx.init(params)
    assert int(state.k) == 0 and float(state.A_k) == 0.0
    assert torch.equal(state.y, params) and torch.equal(state.z, params)
    for i, expected in enumerate(EXPECTED_SSTM):
        u, state = tx.update(params.clone(), state, params)
        params = gx.apply_updates(params, u)
        close(params, *expected)
        if i == 0:
            # alpha_1 = 1/(2aL) = 0.5, lam_1 = B/alpha_1 = 2: the gradient (3, -4), norm 5, is
            # clipped to (1.2, -1.6); z_1 = y_1 = (3, -4) - 0.5 (1.2, -1.6) = (2.4, -3.2).
            assert int(state.k) == 1
            assert float(state.alpha) == 0.5 and float(state.lam) == 2.0
            close(state.z, 2.4, -3.2)
            close(state.y, 2.4, -3.2)
            # A_k is the weight that formed the current point: A_1 = 0.5, and the point uses
            # A_2 = A_1 + alpha_2 = 0.5 + 1 = 1.5.
            assert float(state.A_k) == 0.5
            alpha_2 = 2 / (2 * 1.0 * 1.0)
            assert float(state.A_k) + alpha_2 == 1.5
    # A_k after 5 updates: 0.5 + 1 + 1.5 + 2 + 2.5 = 7.5; alpha_5 = 2.5, lam_5 = 0.4.
    assert float(state.A_k) == 7.5 and float(state.alpha) == 2.5
    assert math.isclose(float(state.lam), 0.4, rel_tol=1e-12)


def _reference_sstm_step(g, params, y, z, k, A, a, L, B, nu, clip, r=1.0, offset=1):
    """A plain transcription of docs/clipping.md ("Clipped SSTM and restarts") for one leaf list (hand check helper)."""
    alpha = (k + offset) ** (2 * nu / (1 + nu)) / (2 * a * L)
    A1 = A + alpha
    lam = B / alpha
    c = clip(g, lam)
    z = [zi - alpha * ci for zi, ci in zip(z, c)]
    y = [(A * yi + alpha * zi) / A1 for yi, zi in zip(y, z)]
    alpha_n = (k + 1 + offset) ** (2 * nu / (1 + nu)) / (2 * a * L)
    if r < 1 and A1 > r / (1 - r) * alpha_n:
        A1 = r / (1 - r) * alpha_n
    x = [(A1 * yi + alpha_n * zi) / (A1 + alpha_n) for yi, zi in zip(y, z)]
    return [xi - pi for xi, pi in zip(x, params)], y, z, A1


def test_clipped_sstm_layer_wise_first_steps():
    """lam_1 = 2: leaf a = (3, 4) (norm 5) -> (1.2, 1.6), leaf b = (-1) kept; output = -alpha_1 c."""
    params = {"a": t(1, 2), "b": t(0.5)}
    tx = clipped_sstm(1.0, 1.0, 1.0, clip="layer_wise")
    state = tx.init(params)
    u, state = tx.update({"a": t(3, 4), "b": t(-1)}, state, params)
    close(u["a"], -0.6, -0.8)
    close(u["b"], 0.5)
    params = gx.apply_updates(params, u)
    # Step 2: alpha_2 = 1, lam_2 = 1, A_1 = 0.5, A_2 = 1.5, alpha_3 = 1.5.
    # g_2: a = (0, 0.5) (norm 0.5, kept), b = (3) -> (1).
    # z_2 = z_1 - c: a (0.4, 1.2) - (0, 0.5) = (0.4, 0.7); b 1.0 - 1 = 0.
    # y_2 = (0.5 y_1 + 1 z_2) / 1.5: a (0.4, 0.866667); b 0.333333.
    # x_3 = (1.5 y_2 + 1.5 z_2) / 3: a (0.4, 0.783333); b 0.166667.
    u, state = tx.update({"a": t(0, 0.5), "b": t(3)}, state, params)
    params = gx.apply_updates(params, u)
    close(state.z["a"], 0.4, 0.7)
    close(state.z["b"], 0.0)
    close(state.y["a"], 0.4, 0.8666666666666667)
    close(state.y["b"], 1 / 3)
    close(params["a"], 0.4, 0.7833333333333333)
    close(params["b"], 1 / 6)
    assert float(state.A_k) == 1.5 and float(state.alpha) == 1.0 and float(state.lam) == 1.0


def test_clipped_sstm_coordinate_wise_first_step():
    """lam_1 = 2: a = (3, -4) -> (2, -2) (exact clamp, not the reference's 1.99999999, quirk 10), b = (-1)."""
    params = {"a": t(1, 2), "b": t(0.5)}
    tx = clipped_sstm(1.0, 1.0, 1.0, clip="coordinate_wise")
    u, state = tx.update({"a": t(3, -4), "b": t(-1)}, tx.init(params), params)
    assert torch.equal(u["a"], t(-1, 1)) and torch.equal(u["b"], t(0.5))
    assert torch.equal(state.z["a"], t(0, 3)) and torch.equal(state.z["b"], t(1))


def test_clipped_sstm_norm_first_step_global():
    """The norm rule clips the global norm over all leaves: sqrt(26) > 2 -> factor 2/sqrt(26)."""
    params = {"a": t(1, 2), "b": t(0.5)}
    tx = clipped_sstm(1.0, 1.0, 1.0, clip="norm")
    u, _ = tx.update({"a": t(3, 4), "b": t(-1)}, tx.init(params), params)
    f = 0.5 * 2 / math.sqrt(26)
    close(u["a"], -3 * f, -4 * f)
    close(u["b"], f)


def test_ratio_upper_bound_clamp_binds():
    """r = 0.4 caps A_k at r/(1-r) alpha_{k+1} = 2/3 alpha_{k+1}. On f = 0.5 x^2, x_0 = (3, -4),
    a = L = B = nu = 1: update 1 leaves A_1 = 0.5 <= 2/3 alpha_2 = 2/3; update 2 gives
    A_2 = 1.5 > 2/3 alpha_3 = 1, so A_2 = 1 and x_3 = (1 y_2 + 1.5 z_2) / 2.5."""
    tx = clipped_sstm(1.0, 1.0, 1.0, ratio_upper_bound=0.4)
    params = t(3, -4)
    state = tx.init(params)
    u, state = tx.update(params.clone(), state, params)
    params = gx.apply_updates(params, u)
    assert float(state.A_k) == 0.5
    close(params, 2.4, -3.2)
    u, state = tx.update(params.clone(), state, params)
    params = gx.apply_updates(params, u)
    # Step 2: alpha_2 = 1, lam_2 = 1, g = (2.4, -3.2) (norm 4) -> (0.6, -0.8);
    # z_2 = (1.8, -2.4); y_2 = (0.5 (2.4, -3.2) + (1.8, -2.4)) / 1.5 = (2, -2.666667);
    # x_3 = (1 * y_2 + 1.5 * z_2) / 2.5 = (1.88, -2.506667) (unclamped: (1.9, -2.533333)).
    assert math.isclose(float(state.A_k), 1.0, rel_tol=1e-12)
    close(state.y, 2.0, -2.6666666666666665)
    close(params, 1.88, -2.506666666666667)
    # and a few more steps agree with the plain transcription of the spec
    y, z, A, k = [state.y], [state.z], float(state.A_k), 2
    def norm_clip(g, lam):
        n = math.sqrt(sum(float((x * x).sum()) for x in g))
        return [x * min(1.0, lam / n) for x in g]
    for _ in range(4):
        u_ref, y, z, A = _reference_sstm_step([params.clone()], [params], y, z, k, A, 1.0, 1.0, 1.0, 1.0, norm_clip, r=0.4)
        u, state = tx.update(params.clone(), state, params)
        torch.testing.assert_close(u, u_ref[0], rtol=1e-9, atol=1e-12)
        assert math.isclose(float(state.A_k), A, rel_tol=1e-12)
        params = gx.apply_updates(params, u)
        k += 1
    # The clamp keeps binding: A_k / (A_k + alpha_{k+1}) = r.
    alpha_next = (k + 1) / 2
    assert math.isclose(float(state.A_k) / (float(state.A_k) + alpha_next), 0.4, rel_tol=1e-12)


def test_index_offset_two():
    """index_offset = 2 (the paper as recalled): alpha_1 = 2/(2aL) = 1, alpha_2 = 1.5."""
    tx = clipped_sstm(1.0, 1.0, 1.0, index_offset=2)
    params = t(3, -4)
    state = tx.init(params)
    u, state = tx.update(params.clone(), state, params)
    params = gx.apply_updates(params, u)
    assert float(state.alpha) == 1.0 and float(state.lam) == 1.0 and float(state.A_k) == 1.0
    close(params, 2.4, -3.2)  # lam_1 alpha_1 = B: the first displacement is B g/||g||, as with offset 1
    u, state = tx.update(params.clone(), state, params)
    params = gx.apply_updates(params, u)
    # alpha_2 = 1.5, lam_2 = 2/3, g = (2.4, -3.2) -> (0.4, -0.533333); z_2 = (1.8, -2.4);
    # y_2 = (1 y_1 + 1.5 z_2) / 2.5 = (2.04, -2.72); x_3 = (2.5 y_2 + 2 z_2) / 4.5.
    assert float(state.alpha) == 1.5 and float(state.A_k) == 2.5
    close(state.y, 2.04, -2.72)
    close(params, (2.5 * 2.04 + 2 * 1.8) / 4.5, (2.5 * -2.72 + 2 * -2.4) / 4.5)


def test_clip_start_sets_B():
    """clip_start k_s: B = (k_s + 1)^(2nu/(1+nu)) / (2aL), so lam = 1 at update k_s + 1."""
    a, L, ks = 2.0, 3.0, 4
    tx = clipped_sstm(a, L, None, nu=1.0, clip_start=ks)
    params = t(3, -4)
    state = tx.init(params)
    lams = []
    for _ in range(ks + 2):
        u, state = tx.update(t(0.1, 0.1), state, params)
        params = gx.apply_updates(params, u)
        lams.append(float(state.lam))
    assert math.isclose(lams[ks], 1.0, rel_tol=1e-12)
    assert lams[ks - 1] > 1.0 > lams[ks + 1]
    expected_B = (ks + 1) / (2 * a * L)
    assert math.isclose(float(state.lam) * float(state.alpha), expected_B, rel_tol=1e-12)


def test_clipped_sstm_frozen_leaf():
    params = {"a": t(3, -4), "frozen": t(1.0), "dead": None}
    tx = clipped_sstm(1.0, 1.0, 1.0)
    state = tx.init(params)
    assert state.y["dead"] is None
    u, state = tx.update({"a": t(3, -4), "frozen": None, "dead": None}, state, params)
    assert u["frozen"] is None and u["dead"] is None
    close(u["a"], -0.6, 0.8)
    assert torch.equal(state.z["frozen"], t(1.0)) and torch.equal(state.y["frozen"], t(1.0))


# --- clipped SSTM against torch_clip ----------------------------------------------------------------


@pytest.mark.parametrize("nu,B", [(1.0, 0.5), (0.5, 0.2)])
def test_clipped_sstm_matches_torch_clip(nu, B):
    """50 steps of the MLP (a new batch every step), norm rule, a = 4 (lr = 0.25), L = 1; with these
    B the clipping binds in about half of the steps (26 and 24 of 50).

    Alignment (quirk 9): torch_clip's first ``step()`` only initialises (k = 0 -> 1) and leaves the
    params at x_0, discarding that call's gradient; its call j + 1 then does exactly what our call
    j does (same alpha_j, lam_j, A_j). Both start from x_0, so we feed the reference a throw-away
    first call (batch 0 at x_0), then, for j = 1..50, batch j-1 to our call j and to its call j+1.
    Each is evaluated at the current params, which are equal: our params after call j equal the
    reference's after call j + 1.
    """
    ClippedSSTM = pytest.importorskip("torch_clip.optimizers", reason="torch_clip is not installed").ClippedSSTM
    a, L = 4.0, 1.0
    model = make_mlp(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = clipped_sstm(a, L, B, nu=nu, clip="norm")
    state = tx.init(params)
    ref = make_mlp(0)
    opt = ClippedSSTM(ref.parameters(), lr=1 / a, L=L, clipping_type="norm", clipping_level=B, nu=nu)

    def ref_step(x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()

    x, y = make_data(seed=100)
    ref_step(x, y)  # discarded gradient
    assert_trees_equal({k: v.detach() for k, v in ref.named_parameters()}, params)
    clipped = 0
    for j in range(50):
        x, y = make_data(seed=100 + j)
        g = grad(loss_of(model, x, y))(params)
        u, state = tx.update(g, state, params)
        clipped += bool(gx.tree_global_norm(g) > state.lam)
        params = gx.apply_updates(params, u)
        ref_step(x, y)
        assert_trees_close(params, {k: v.detach() for k, v in ref.named_parameters()}, rtol=1e-9, atol=1e-12)
    assert 5 <= clipped <= 45, f"clipping should bind in some steps, not all: {clipped}/50"
    ref_state = opt.param_groups[0]["state"]
    assert math.isclose(float(state.A_k), ref_state["A_k"], rel_tol=1e-12)
    assert int(state.k) + 1 == ref_state["k"]


# --- adapter, compile, purity ---------------------------------------------------------------------


def test_adapter_equals_functional():
    """Through gx.Optimizer (state buffers updated in place) the run equals the functional one."""
    tx = with_restarts(clipped_sstm(4.0, 1.0, 0.5), first_period=3, coeff=2.0)
    model = make_mlp(0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    opt_model = make_mlp(0)
    opt = gx.Optimizer(opt_model.parameters(), tx)
    for j in range(12):
        x, y = make_data(seed=100 + j)
        g = grad(loss_of(model, x, y))(params)
        u, state = tx.update(g, state, params)
        params = gx.apply_updates(params, u)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(opt_model(x), y).backward()
        opt.step()
    assert int(state.restarts) == 2
    assert_trees_close({k: v.detach() for k, v in opt_model.named_parameters()}, params, rtol=1e-12, atol=1e-14)
    assert int(opt.tx_state(0).restarts) == 2


def test_adapter_checkpoint_resume_is_bit_identical():
    tx = with_restarts(clipped_sstm(4.0, 1.0, 0.5), first_period=3, coeff=2.0)

    def run(steps, resume_at=None):
        model = make_mlp(0)
        opt = gx.Optimizer(model.parameters(), tx)
        for j in range(steps):
            if j == resume_at:
                saved = opt.state_dict()
                fresh = make_mlp(0)
                fresh.load_state_dict(model.state_dict())
                model, opt = fresh, gx.Optimizer(fresh.parameters(), tx)
                opt.load_state_dict(saved)
            x, y = make_data(seed=100 + j)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return {k: v.detach() for k, v in model.named_parameters()}

    assert_trees_equal(run(12, resume_at=5), run(12))


def _compile_problem(steps):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}
    grads = [{"w": torch.randn(4, 3, generator=g, dtype=F64) * 3, "b": torch.randn(3, generator=g, dtype=F64)}
             for _ in range(steps)]
    return params, grads


COMPILE_CASES = {
    "sstm_norm": lambda: clipped_sstm(1.0, 1.0, 1.0),
    "sstm_layer_wise_ratio": lambda: clipped_sstm(2.0, 1.0, 0.5, nu=0.5, clip="layer_wise", ratio_upper_bound=0.6),
    "sstm_coordinate_wise_offset2": lambda: clipped_sstm(1.0, 2.0, 0.3, clip="coordinate_wise", index_offset=2),
    "restarts_sgd_momentum": lambda: with_restarts(gx.sgd(0.1, momentum=0.9), first_period=2, coeff=2.0),
    "restarts_sstm": lambda: with_restarts(clipped_sstm(1.0, 1.0, 1.0), first_period=2, coeff=1.5, max_steps=8),
}


@needs("fullgraph_compile")
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiles_once_and_equals_eager(name):
    params, grads = _compile_problem(10)
    eager, comp, frames = eager_and_compiled(COMPILE_CASES[name](), params, grads)
    for (eager_p, _), (comp_p, _) in zip(eager, comp):
        assert_trees_close(comp_p, eager_p, rtol=1e-10, atol=1e-12)
    assert frames == 1, f"recompiled: {frames} frames for 10 steps"
    eager_s, comp_s = eager[-1][1], comp[-1][1]
    assert_trees_close(comp_s, eager_s, rtol=1e-10, atol=1e-12)
    if isinstance(eager_s, RestartsState):
        assert int(eager_s.restarts) >= 2


@needs("fullgraph_compile")
def test_injected_hyperparams_compile_once():
    """Hyperparameters as injected tensors: equal to the plain transform, eager and compiled
    (the ratio clamp included), one frame."""
    torch._dynamo.reset()
    injected = gx.inject_hyperparams(clipped_sstm, static_args=("index_offset", "clip_start"))(
        a=1.0, L=1.0, B=1.0, ratio_upper_bound=0.4)
    plain = clipped_sstm(1.0, 1.0, 1.0, ratio_upper_bound=0.4)

    def step(params, state, tx):
        updates, state = tx.update(params.clone(), state, params)  # f = 0.5 ||x||^2
        return params + updates, state

    counter = CompileCounter()
    compiled = torch.compile(lambda p, s: step(p, s, injected), fullgraph=True, backend=counter)
    x0 = t(3, -4)
    pe, se, pc, sc, pr, sr = x0, injected.init(x0), x0, injected.init(x0), x0, plain.init(x0)
    for _ in range(6):
        pe, se = step(pe, se, injected)
        pc, sc = compiled(pc, sc)
        pr, sr = step(pr, sr, plain)
    torch.testing.assert_close(pe, pr, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pc, pr, rtol=1e-12, atol=1e-14)
    assert counter.frame_count == 1


PURITY_CASES = {
    "clipped_sstm": lambda: clipped_sstm(1.0, 1.0, 0.5, ratio_upper_bound=0.5),
    "with_restarts": lambda: with_restarts(gx.sgd(0.1, momentum=0.9), first_period=1),
    "with_restarts_sstm": lambda: with_restarts(clipped_sstm(1.0, 1.0, 0.5), first_period=1),
}


@pytest.mark.parametrize("name", sorted(PURITY_CASES))
def test_pure(name):
    tx = PURITY_CASES[name]()
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g), "frozen": torch.randn(2, generator=g)}
    state = tx.init(params)
    for _step in range(4):  # with first_period = 1, steps 2 and 4 restart
        grads = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g), "frozen": None}
        before = (snapshot(grads), snapshot(state), snapshot(params))
        updates, new_state = tx.update(grads, state, params)
        assert_trees_equal(grads, before[0])
        assert_trees_equal(state, before[1])
        assert_trees_equal(params, before[2])
        assert updates["frozen"] is None
        params, state = gx.apply_updates(params, updates), new_state
    if isinstance(state, RestartsState):
        assert int(state.restarts) == 2


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=0.0), r"^a must be > 0"),
    (dict(a=-1.0), r"^a must be > 0"),
    (dict(L=0.0), r"^L must be > 0"),
    (dict(B=-1.0), r"^B must be > 0"),
    (dict(B=0.0), r"^B must be > 0"),
    (dict(B=None), r"B \(the clipping parameter\) must be given"),
    (dict(nu=1.5), r"^nu must be <= 1"),
    (dict(nu=-0.1), r"^nu must be >= 0"),
    (dict(clip="auto_clip"), r"clip must be one of"),
    (dict(ratio_upper_bound=0.0), r"^ratio_upper_bound must be > 0"),
    (dict(ratio_upper_bound=1.5), r"^ratio_upper_bound must be <= 1"),
    (dict(index_offset=0), r"^index_offset must be 1 .* or 2"),
    (dict(index_offset=True), r"^index_offset must be 1"),
    (dict(clip_start=0, B=None), r"^clip_start must be an int >= 1"),
    (dict(clip_start=3), r"either B or clip_start"),
    (dict(clip_start=3, B=None, clip="layer_wise"), r"clip_start needs clip='norm'"),
    (dict(clip_start=3, B=None, nu=0.0), r"clip_start needs nu > 0"),
])
def test_clipped_sstm_bad_arguments(kwargs, match):
    args = dict(a=1.0, L=1.0, B=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        clipped_sstm(**args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(first_period=0), r"^first_period must be an int >= 1"),
    (dict(first_period=2.5), r"^first_period must be an int >= 1"),
    (dict(coeff=0.5), r"^coeff must be a number >= 1"),
    (dict(coeff=float("nan")), r"^coeff must be a number >= 1"),
    (dict(max_steps=0), r"^max_steps must be an int >= 1"),
])
def test_with_restarts_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with_restarts(gx.sgd(0.1), **kwargs)


def test_with_restarts_rejects_non_transform():
    with pytest.raises(TypeError, match="GradientTransformation"):
        with_restarts(lambda x: x)


def test_missing_params_and_state_errors():
    params, grads = _restart_problem()
    tx = with_restarts(gx.sgd(0.1))
    with pytest.raises(ValueError, match="with_restarts needs params"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ValueError, match="call init"):
        tx.update(grads, None, params)
    sstm = clipped_sstm(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="clipped_sstm needs params"):
        sstm.update(grads, sstm.init(params))
    with pytest.raises(TypeError, match="clipped_sstm.update\\(\\) got a state of type"):
        sstm.update(grads, tx.init(params), params)
    assert isinstance(sstm.init(params), ClippedSSTMState)
    with pytest.raises(ValueError, match="different tree structures"):
        sstm.update({"a": grads["a"]}, sstm.init(params), params)
