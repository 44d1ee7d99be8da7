"""Bad-input battery: what every transform does with inputs a training loop should not produce.

Each case is a row of docs/bad-input.md. Non-finite gradients propagate through bare transforms
(as in torch.optim and optax); ``gx.apply_if_finite`` skips such a step exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradxform as gx
from test_purity import CASES, _grads, _params
from helpers import needs

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _burst(seed, value):
    g = _grads(seed)
    g["w"] = g["w"].clone()
    g["w"][1, 0] = value
    return g


def _leaves(tree):
    return [x for x in gx.tree.tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _assert_same(a, b, what):
    la, sa = gx.tree.tree_flatten(a)
    lb, sb = gx.tree.tree_flatten(b)
    assert sa == sb, what
    for path, x, y in zip(gx.tree.tree_paths(a), la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what} differs at {path}"
        else:
            assert x == y, f"{what} differs at {path}"


def _all_finite(tree):
    return all(bool(torch.isfinite(x).all()) for x in _leaves(tree) if x.is_floating_point())


# --- 1. non-finite gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_if_finite_skips_burst_exactly(name, kind):
    tx = gx.apply_if_finite(CASES[name]())
    params = _params()
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return gx.apply_updates(p, u), s

    params, state = step(params, state, _grads(0))
    ref_p, ref_s = params, state
    for seed in (2, 3):  # the run in which the bad step never happened
        ref_p, ref_s = step(ref_p, ref_s, _grads(seed))

    p_bad, s_bad = step(params, state, _burst(1, NONFINITE[kind]))
    _assert_same(params, p_bad, "params after the skipped step")
    _assert_same(state.inner_state, s_bad.inner_state, "inner state after the skipped step")
    assert _all_finite(s_bad) and _all_finite(p_bad)
    assert (int(s_bad.notfinite_count), bool(s_bad.last_finite), int(s_bad.total_notfinite)) == (1, False, 1)

    for seed in (2, 3):
        p_bad, s_bad = step(p_bad, s_bad, _grads(seed))
    _assert_same(ref_p, p_bad, "params after the burst")
    _assert_same(ref_s.inner_state, s_bad.inner_state, "inner state after the burst")
    assert (int(s_bad.notfinite_count), bool(s_bad.last_finite), int(s_bad.total_notfinite)) == (0, True, 1)


@pytest.mark.parametrize("name", ["adam", "sgd", "chain", "clip_by_global_norm"])
def test_bare_transform_propagates_nan_like_torch(name):
    """The documented policy: no hidden check, a NaN gradient reaches the update (as torch.optim)."""
    tx = CASES[name]()
    params = _params()
    u, _ = tx.update(_burst(0, float("nan")), tx.init(params), params)
    assert torch.isnan(u["w"]).any()


def test_torch_adam_propagates_nan_too():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    assert torch.isnan(p).any()


def _model_grads(model, bad):
    for i, prm in enumerate(model.parameters()):
        prm.grad = torch.full_like(prm, 0.5 + i)
        if bad and i == 0:
            prm.grad.view(-1)[0] = bad


@pytest.mark.parametrize("alias", ["adam", "adamw", "sgd", "tg_adamw_fallback"])
def test_optimizer_adapter_with_apply_if_finite(alias):
    make = {
        "adam": lambda: gx.adam(0.1),
        "adamw": lambda: gx.adamw(0.1, weight_decay=0.1),
        "sgd": lambda: gx.sgd(0.1, momentum=0.9),
        "tg_adamw_fallback": lambda: gx.chain(gx.scale_by_truegrad_adam(fallback="adam"), gx.scale(-0.1)),
    }[alias]
    runs = []
    for bad in (None, float("nan"), float("inf")):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = gx.Optimizer(model.parameters(), gx.apply_if_finite(make()))
        _model_grads(model, None)
        opt.step()
        if bad is not None:
            before = [prm.detach().clone() for prm in model.parameters()]
            _model_grads(model, bad)
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert int(opt.tx_state().total_notfinite) == 1
        _model_grads(model, None)
        opt.step()
        runs.append([prm.detach().clone() for prm in model.parameters()])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@needs("amp_gradscaler_cpu")
def test_grad_scaler_skips_inf_step_through_adapter():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = gx.Optimizer(model.parameters(), gx.adam(0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=4.0)
    x = torch.randn(5, 3)
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    state_before = gx.tree.tree_clone(opt.tx_state())
    params_before = [prm.detach().clone() for prm in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0  # the scaler saw the inf and backed off
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    _assert_same(state_before, opt.tx_state(), "adapter state after a scaler-skipped step")


# --- 2. huge values ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e30, 3e38])
def test_clip_by_global_norm_survives_float32_overflow(value):
    g = {"w": torch.full((3, 2), value), "b": torch.full((2,), -value)}
    assert torch.isinf(gx.tree_global_norm(g))  # the float32 sum of squares overflows
    tx = gx.clip_by_global_norm(2.0)
    u, _ = tx.update(g, tx.init(g))
    expected = 2.0 / 8**0.5  # eight equal entries, clipped to norm 2
    torch.testing.assert_close(u["w"], torch.full((3, 2), expected))
    torch.testing.assert_close(u["b"], torch.full((2,), -expected))
    # traced (torch.func here; torch.compile, accelerators): no extra float64 pass, so the
    # overflowing norm gives a zero factor, as torch.nn.utils.clip_grad_norm_ does
    u2 = torch.func.vmap(lambda x: tx.update({"x": x}, tx.init({"x": x}))[0]["x"])(g["w"].reshape(1, 6))
    assert torch.equal(u2, torch.zeros(1, 6))
    ref = g["w"].clone().requires_grad_(True)
    ref.grad = g["w"].clone()
    torch.nn.utils.clip_grad_norm_([ref], 2.0)
    assert torch.equal(ref.grad, torch.zeros(3, 2))


@pytest.mark.parametrize("value", [1e30, 3e38])
@pytest.mark.parametrize("name", ["clip", "adaptive_grad_clip", "clip_by_global_norm", "clipped_sstm"])
def test_clippers_keep_finite_state_on_huge_values(name, value):
    tx = CASES[name]()
    params = _params()
    g = {"w": torch.full((3, 2), value), "b": torch.full((2,), -value), "frozen": None}
    u, s = tx.update(g, tx.init(params), params)
    assert _all_finite(u) and _all_finite(s)
    assert float(gx.tree_global_norm(u)) > 0  # clipped, not zeroed


def test_adam_on_huge_gradient_matches_torch():
    """1e30**2 overflows float32: the second moment is inf and the step is 0, as in torch.optim.Adam."""
    g = torch.full((4,), 1e30)
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p], lr=0.1, foreach=True)
    p.grad = g.clone()
    opt.step()
    tx = gx.adam(0.1)
    params = {"p": torch.ones(4)}
    u, s = tx.update({"p": g}, tx.init(params), params)
    torch.testing.assert_close(gx.apply_updates(params, u)["p"], p.detach(), rtol=0, atol=0)
    assert torch.equal(u["p"], torch.zeros(4))
    adam_state = s.inner_state[0]
    assert torch.isinf(adam_state.nu["p"]).all() and torch.equal(adam_state.nu["p"], opt.state[p]["exp_avg_sq"])


# --- 3. integer, bool, complex leaves ------------------------------------------------------------


@pytest.mark.parametrize("dtype,fragment", [(torch.int64, "non-floating leaf at 'w'"),
                                            (torch.bool, "non-floating leaf at 'w'"),
                                            (torch.complex64, "complex leaf at 'w'")])
@pytest.mark.parametrize("where", ["grads", "params"])
@pytest.mark.parametrize("name", ["adam", "sgd", "scale_by_rms", "chain"])
def test_non_real_float_leaves_are_rejected(name, where, dtype, fragment):
    tx = CASES[name]()
    params = _params()
    grads = _grads(0)
    (grads if where == "grads" else params)["w"] = torch.ones(3, 2).to(dtype)
    if where == "params":
        grads["w"] = torch.ones(3, 2).to(dtype)
    with pytest.raises(TypeError, match=fragment):
        tx.update(grads, tx.init(params), params)


def test_torch_adam_handles_complex_as_real_pairs():
    """The recipe in the complex error: optimise view_as_real(p); it matches torch.optim.Adam."""
    z = torch.tensor([1 + 2j, 3 - 1j])
    gz = torch.tensor([0.5 + 1j, -1 + 0.2j])
    p = torch.nn.Parameter(z.clone())
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = gz.clone()
    opt.step()
    tx = gx.adam(0.1)
    params = {"z": torch.view_as_real(z)}
    u, _ = tx.update({"z": torch.view_as_real(gz)}, tx.init(params), params)
    torch.testing.assert_close(torch.view_as_complex(gx.apply_updates(params, u)["z"]), p.detach())


# --- 4. dtype / device mismatch ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "sgd", "chain", "scale_by_rms", "trace"])
def test_dtype_mismatch_names_the_path(name):
    tx = CASES[name]()
    params = _params()
    grads = _grads(0)
    grads["w"] = grads["w"].double()
    with pytest.raises(TypeError, match=r"dtype mismatch at 'w': updates leaf is torch.float64 but (state\.\w+|params) "
                                        r"leaf is torch.float32"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("name", ["adam", "sgd", "trace", "scale_by_rms"])
@pytest.mark.parametrize("where", ["grads", "params"])
def test_device_mismatch_names_the_path(name, where):
    tx = CASES[name]()
    params, grads = _params(), _grads(0)
    (grads if where == "grads" else params)["b"] = torch.empty(2, device="meta")
    with pytest.raises(TypeError, match="device mismatch at 'b'"):
        tx.update(grads, tx.init(params), params)


def test_apply_updates_casts_to_param_dtype():
    """Documented promotion (as optax): an update is cast to its param's dtype."""
    out = gx.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), 0.5, dtype=torch.float64)})
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], torch.full((2,), 1.5))


# --- 5. mismatched trees -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "chain", "trace", "scale_by_rms", "multi_steps", "partition", "masked"])
@pytest.mark.parametrize("variant,fragment", [
    ("missing", "different tree structures: path 'frozen' exists only in the (first|second)"),
    ("extra", "different tree structures: path 'c' exists only in the (first|second)"),
    ("nested", r"different tree structures: path 'b\.x' exists only in the first; path 'b' exists only in the second"),
    ("shape", "shape mismatch at 'w'"),
])
def test_tree_mismatch_names_the_path(name, variant, fragment):
    tx = CASES[name]()
    params = _params()
    state = tx.init(params)
    g = _grads(0)
    if variant == "missing":
        del g["frozen"]
    elif variant == "extra":
        g["c"] = torch.ones(1)
    elif variant == "nested":
        g["b"] = {"x": g["b"]}
    else:
        g["w"] = g["w"].T.contiguous()
    with pytest.raises(ValueError, match=fragment):
        tx.update(g, state, params)


# --- 6. extra arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("make,arg", [
    (lambda: gx.chain(gx.gradnorm(3), gx.adam(0.1)), "losses"),
    (lambda: gx.tg_adamw(0.1), "sum_grad_squared"),
    (lambda: gx.chain(gx.dwa(3), gx.sgd(0.1)), "losses"),
    (lambda: gx.gradnorm(3), "losses"),
])
def test_missing_extra_argument_is_named(make, arg):
    tx = make()
    params = _params()
    with pytest.raises(TypeError, match=f"'{arg}'"):
        tx.update(_grads(0), tx.init(params), params)


@pytest.mark.parametrize("name", ["adam", "chain", "apply_if_finite", "masked", "inject_hyperparams",
                                  "multi_steps", "partition", "tg_adamw", "gradnorm", "with_restarts", "trace"])
def test_unknown_extra_argument_is_named(name):
    if name in {"tg_adamw", "gradnorm"}:  # the registry wraps these to feed their extras
        tx = gx.tg_adamw(0.1) if name == "tg_adamw" else gx.chain(gx.gradnorm(3), gx.adam(0.1))
    else:
        tx = CASES[name]()
    params = _params()
    state = tx.init(params)
    if name in {"trace", "masked", "inject_hyperparams"}:  # a bare update function inside: Python's own error
        fragment = "got an unexpected keyword argument 'loses'"
    else:  # combinators and aliases: the name and the accepted ones
        fragment = "unknown extra argument 'loses': no transform in it declares it .declared extra arguments: "
    with pytest.raises(TypeError, match=fragment):
        tx.update(_grads(0), state, params, loses=torch.ones(3))


def test_unknown_extra_argument_lists_the_accepted_ones():
    tx = gx.chain(gx.gradnorm(3), gx.adam(0.1))
    params = _params()
    with pytest.raises(TypeError, match=r"'loses'.*\(declared extra arguments: losses, task_grad_norms\)"):
        tx.update(_grads(0), tx.init(params), params, loses=torch.ones(3), task_grad_norms=torch.ones(3))


def test_optimizer_step_rejects_unknown_extra():
    model = torch.nn.Linear(2, 2)
    opt = gx.Optimizer(model.parameters(), gx.adam(0.1))
    model(torch.ones(1, 2)).sum().backward()
    before = [prm.detach().clone() for prm in model.parameters()]
    with pytest.raises(TypeError, match="unknown extra argument 'loses'"):
        opt.step(loses=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- 7. empty inputs -----------------------------------------------------------------------------


def test_optimizer_rejects_empty_param_list_like_torch():
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam([], lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        gx.Optimizer([], gx.adam(0.1))


@pytest.mark.parametrize("empty", [{}, [], ()], ids=["dict", "list", "tuple"])
@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in {"add_decayed_weights", "masked", "partition",
                                                                       "scale_by_empirical_init", "batched"}))
def test_empty_tree(name, empty):
    tx = CASES[name]()
    state = tx.init(empty)
    u, _ = tx.update(empty, state, empty)
    assert u == empty and type(u) is type(empty)


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_none_grads_leave_state_alone(name):
    tx = CASES[name]()
    params = _params()
    state = tx.init(params)
    u, s = tx.update({"w": None, "b": None, "frozen": None}, state, params)
    assert u == {"w": None, "b": None, "frozen": None}
    assert _all_finite(s)


# --- 8. hyperparameters out of range -------------------------------------------------------------


@pytest.mark.parametrize("make,fragment", [
    (lambda: gx.adam(-1e-3), "lr must be >= 0.0"),
    (lambda: gx.adamw(float("nan")), "lr must not be NaN"),
    (lambda: gx.sgd(-0.1), "lr must be >= 0.0"),
    (lambda: gx.adam(0.1, betas=(1.0, 0.999)), r"betas\[0\] must be < 1.0"),
    (lambda: gx.adam(0.1, betas=(0.9, -0.1)), r"betas\[1\] must be >= 0.0"),
    (lambda: gx.scale_by_adam(b2=1.0), r"b2 \(betas\[1\]\) must be < 1.0"),
    (lambda: gx.adam(0.1, eps=-1e-8), "eps must be >= 0.0"),
    (lambda: gx.adamw(0.1, weight_decay=-0.1), "weight_decay must be >= 0.0"),
    (lambda: gx.sgd(0.1, momentum=-0.5), "momentum must be >= 0.0"),
    (lambda: gx.sgd(0.1, nesterov=True), "Nesterov momentum requires a momentum"),
    (lambda: gx.scale_by_rms(decay=1.5), "decay must be <= 1.0"),
    (lambda: gx.trace(0.9, dampening=2.0), "dampening must be <= 1.0"),
    (lambda: gx.clip_by_global_norm(0.0), "max_norm must be > 0.0"),
    (lambda: gx.clip_by_global_norm(-1.0), "max_norm must be > 0.0"),
    (lambda: gx.clip_by_leaf_norm(0.0), "max_norm must be > 0.0"),
    (lambda: gx.clip(-1.0), "max_delta must be > 0.0"),
    (lambda: gx.clip_by_block_rms(0.0), "threshold must be > 0.0"),
    (lambda: gx.adaptive_grad_clip(0.0), "clipping must be > 0.0"),
    (lambda: gx.autoclip(1.5), r"q \(the quantile level\) must be <= 1.0"),
    (lambda: gx.random_clip_by_global_norm(0.5, beta=1.5), "beta must be < 1.0"),
    (lambda: gx.monitor_norm(0), "size must be an int >= 1"),
    (lambda: gx.multi_steps(gx.sgd(0.1), 0), "every_k must be an int >= 1"),
    (lambda: gx.clipped_sstm(-1.0, 1.0, 0.5), "a must be > 0.0"),
    (lambda: gx.tg_adamw(-0.1), "lr must be >= 0.0"),
    (lambda: gx.gradnorm(3, alpha=-1.0), "alpha must be a finite number >= 0"),
])
def test_hyperparameter_out_of_range(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


def test_hyperparameter_of_wrong_type():
    with pytest.raises(TypeError, match="lr must be a number, a 0-d tensor or a schedule; got '0.1'"):
        gx.adam("0.1")


# --- 9. state of another transform ---------------------------------------------------------------


@pytest.mark.parametrize("tx_name,state_name,exc,fragment", [
    ("scale_by_adam", "trace", TypeError, "scale_by_adam.update.. got a state of type TraceState"),
    ("apply_if_finite", "adam", TypeError, "apply_if_finite.update.. got a state of type InjectHyperparamsState"),
    ("multi_steps", "sgd", TypeError, "multi_steps.update.. got a state of type InjectHyperparamsState"),
    ("chain", "clip_by_global_norm", ValueError, "chain.update.. expects the tuple of 2 member states"),
    ("adam", "sgd", KeyError, "state.hyperparams lacks"),
    ("autoclip", "monitor_norm", TypeError, "autoclip.update.. got a state of type MonitorNormState"),
])
def test_state_of_another_transform(tx_name, state_name, exc, fragment):
    params = _params()
    other_state = CASES[state_name]().init(params)
    with pytest.raises(exc, match=fragment):
        CASES[tx_name]().update(_grads(0), other_state, params)


def test_state_none_says_call_init():
    with pytest.raises(ValueError, match="got state=None: call init"):
        gx.scale_by_adam().update(_grads(0), None, _params())


def test_state_from_other_params_names_the_path():
    with pytest.raises(ValueError, match="different tree structures"):
        gx.adam(0.1).update(_grads(0), gx.adam(0.1).init({"x": torch.ones(2)}), _params())


# --- all_finite's fast path and apply_if_finite's output check -----------------------------------

_FINITE_CASES = {
    "mixed dtypes": ([torch.randn(3, dtype=torch.float16), torch.randn((), dtype=torch.bfloat16),
                      torch.randn(4, dtype=torch.float64)], True),
    "float32 squares overflow": ([torch.full((3,), 1e30), torch.randn(2)], True),
    "float16 squares overflow": ([torch.full((3,), 6e4, dtype=torch.float16)], True),
    "float64 squares overflow": ([torch.full((2,), 1e300, dtype=torch.float64)], True),
    "nan": ([torch.tensor([1.0, float("nan")])], False),
    "-inf in bfloat16": ([torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16), torch.randn(2)], False),
    "0-d inf": ([torch.tensor(float("inf"), dtype=torch.float64)], False),
    "empty leaf": ([torch.empty(0), torch.randn(2)], True),
    "only empty": ([torch.empty(0)], True),
}


@pytest.mark.parametrize("case", sorted(_FINITE_CASES))
def test_all_finite_fast_path_agrees_with_the_exact_test(case):
    """Eager CPU ``all_finite`` answers from the L2 norms when they are finite and falls back to
    the per-entry test otherwise: overflowing squares of finite entries must not read as Inf.
    Traced (``torch.func``), it takes the exact test directly: same answer."""
    tensors, expected = _FINITE_CASES[case]
    assert bool(gx.tree.all_finite(tensors)) is expected
    assert all(bool(torch.isfinite(t).all()) for t in tensors) is expected  # the case is what it says
    traced = torch.func.vmap(lambda x: gx.tree.all_finite(tensors) & torch.isfinite(x).all())(torch.ones(2, 1))
    assert traced.tolist() == [expected, expected]


def test_apply_if_finite_skips_a_non_finite_output_of_a_finite_input():
    """A finite gradient whose inner step overflows (Adam's output times 1e30 twice) is skipped:
    zero updates, the inner state (Adam's moments, which did see the gradient) as before."""
    tx = gx.apply_if_finite(gx.chain(gx.adam(0.1), gx.scale(1e30), gx.scale(1e30)))
    params = _params()
    state = tx.init(params)
    before = copy.deepcopy(state.inner_state)
    updates, state = tx.update(_grads(0), state, params)
    assert all(bool((u == 0).all()) for u in _leaves(updates))
    _assert_same(before, state.inner_state, "inner state after the skipped step")
    assert (int(state.notfinite_count), bool(state.last_finite), int(state.total_notfinite)) == (1, False, 1)
    ok = gx.apply_if_finite(gx.adam(0.1))
    u_ok, s_ok = ok.update(_grads(0), ok.init(params), params)
    u_ref, _ = gx.adam(0.1).update(_grads(0), gx.adam(0.1).init(params), params)
    _assert_same(u_ref, u_ok, "a good step's updates")
    assert (int(s_ok.notfinite_count), bool(s_ok.last_finite), int(s_ok.total_notfinite)) == (0, True, 0)
