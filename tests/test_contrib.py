"""gradxform.contrib against optax 0.2.8's optax.contrib (float64, 120 steps of our own gradients),
through gx.Optimizer (LR scheduler, checkpoint round trip), SAM's two phases, Schedule-Free's
evaluation params, and bad arguments."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import gradxform as gx

STEPS = 120
SHAPES = {"w": (4, 3), "b": (3,), "v": (5,)}


def _init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


_RNG = np.random.default_rng(123)
_TARGET = {k: _RNG.standard_normal(s) for k, s in SHAPES.items()}
_CURV = {k: 0.5 + _RNG.random(s) * 2.0 for k, s in SHAPES.items()}
_NOISE = [{k: 0.3 * _RNG.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]


def _grad_np(params: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """Our gradient sequence: a noisy anisotropic quadratic, taken at the run's own params
    (so the whole trajectory must agree), with a sign flip of the noise every 7 steps."""
    sign = -1.0 if (t // 7) % 2 else 1.0
    return {k: _CURV[k] * (params[k] - _TARGET[k]) + sign * _NOISE[t][k] for k in SHAPES}


def _run_gx(tx: gx.GradientTransformation, steps: int = STEPS) -> tuple[dict[str, torch.Tensor], object]:
    params = {k: torch.from_numpy(v.copy()) for k, v in _init_params().items()}
    state = tx.init(params)
    for t in range(steps):
        g = {k: torch.from_numpy(v) for k, v in _grad_np({k: p.numpy() for k, p in params.items()}, t).items()}
        u, state = tx.update(g, state, params)
        params = gx.apply_updates(params, u)
    return params, state


def _run_optax(tx, steps: int = STEPS):
    import jax.numpy as jnp

    import jax

    params = {k: jnp.asarray(v) for k, v in _init_params().items()}
    # optax keeps its counts in int32, and jnp.sqrt(int32) or int32 / 10 is float32 even with x64:
    # int64 counts keep the reference in float64 throughout (the algorithm is unchanged)
    state = jax.tree.map(lambda x: x.astype(jnp.int64) if getattr(x, "dtype", None) == jnp.int32 else x,
                         tx.init(params))
    update = jax.jit(tx.update)
    for t in range(steps):
        g = {k: jnp.asarray(v) for k, v in _grad_np({k: np.asarray(p) for k, p in params.items()}, t).items()}
        u, state = update(g, state, params)
        params = {k: params[k] + u[k] for k in params}
    return params, state


@pytest.fixture(scope="module")
def optax_mod():
    pytest.importorskip("jax", reason="jax is a test-only extra: the optax comparison needs it")
    optax = pytest.importorskip("optax", reason="optax is a test-only extra: the reference implementation")
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    return optax


def _pairs(optax):
    import jax.numpy as jnp

    c = optax.contrib
    adv = lambda r: optax.chain(c.normalize(), optax.sgd(r))  # noqa: E731
    gadv = lambda r: gx.chain(gx.normalize(), gx.scale_by_learning_rate(r))  # noqa: E731
    return {
        "schedule_free_sgd": (lambda: gx.schedule_free_sgd(0.3, warmup_steps=10, b1=0.9, weight_decay=0.01),
                              lambda: c.schedule_free_sgd(0.3, warmup_steps=10, b1=0.9, weight_decay=0.01)),
        "schedule_free_sgd_plain": (lambda: gx.schedule_free_sgd(0.2), lambda: c.schedule_free_sgd(0.2)),
        "schedule_free_adamw": (lambda: gx.schedule_free_adamw(0.05, warmup_steps=5, b1=0.95, weight_decay=0.1),
                                lambda: c.schedule_free_adamw(0.05, warmup_steps=5, b1=0.95, weight_decay=0.1)),
        "schedule_free_adamw_plain": (lambda: gx.schedule_free_adamw(0.02), lambda: c.schedule_free_adamw(0.02)),
        "schedule_free_adam_base": (
            lambda: gx.schedule_free(gx.adam(0.05, betas=(0.0, 0.99)), 0.05, b1=0.8, weight_lr_power=1.0),
            lambda: c.schedule_free(optax.adam(0.05, b1=0.0, b2=0.99), 0.05, b1=0.8, weight_lr_power=1.0)),
        "prodigy": (lambda: gx.prodigy(), lambda: c.prodigy()),
        "prodigy_wd_safeguard": (
            lambda: gx.prodigy(0.7, betas=(0.8, 0.99), beta3=0.9, weight_decay=0.05, safeguard_warmup=True,
                               estim_lr_coef=0.5),
            lambda: c.prodigy(0.7, betas=(0.8, 0.99), beta3=0.9, weight_decay=0.05, safeguard_warmup=True,
                              estim_lr_coef=0.5)),
        "dadapt_adamw": (lambda: gx.dadapt_adamw(), lambda: c.dadapt_adamw()),
        "dadapt_adamw_wd": (lambda: gx.dadapt_adamw(0.5, betas=(0.85, 0.99), weight_decay=0.1, estim_lr0=1e-4),
                            lambda: c.dadapt_adamw(0.5, betas=(0.85, 0.99), weight_decay=0.1, estim_lr0=1e-4)),
        "ademamix": (lambda: gx.ademamix(0.01, b3=0.999, alpha=5.0, weight_decay=0.1),
                     lambda: c.ademamix(0.01, b3=0.999, alpha=5.0, weight_decay=0.1)),
        "scale_by_ademamix_sched": (
            lambda: gx.scale_by_ademamix(b3=lambda n: 0.9 + 0.09 * torch.clamp(torch.as_tensor(n, dtype=torch.float64) / 50.0, max=1.0),
                                         alpha=lambda n: 1.0 + 0.01 * torch.as_tensor(n, dtype=torch.float64), eps_root=1e-10),
            lambda: c.scale_by_ademamix(b3=lambda n: 0.9 + 0.09 * jnp.minimum(n / 50.0, 1.0),
                                        alpha=lambda n: 1.0 + 0.01 * n, eps_root=1e-10)),
        "adopt": (lambda: gx.adopt(0.01), lambda: c.adopt(0.01)),
        "adopt_nesterov_noclip": (lambda: gx.adopt(0.02, b2=0.99, nesterov=True, use_clipping=False),
                                  lambda: c.adopt(0.02, b2=0.99, nesterov=True, use_clipping=False)),
        "sam": (lambda: gx.sam(gx.sgd(0.1), gadv(0.05)), lambda: c.sam(optax.sgd(0.1), adv(0.05))),
        "sam_adam_3": (lambda: gx.sam(gx.adam(0.05), gadv(0.02), sync_period=3, reset_state=False),
                       lambda: c.sam(optax.adam(0.05), adv(0.02), sync_period=3, reset_state=False)),
        "madgrad": (lambda: gx.madgrad(0.01), lambda: c.madgrad(0.01)),
        "madgrad_wd": (lambda: gx.madgrad(0.02, momentum=0.5, weight_decay=0.01),
                       lambda: c.madgrad(0.02, momentum=0.5, weight_decay=0.01)),
        "cocob": (lambda: gx.cocob(), lambda: c.cocob()),
        "cocob_wd": (lambda: gx.cocob(0.5, alpha=50.0, weight_decay=0.01), lambda: c.cocob(0.5, alpha=50.0, weight_decay=0.01)),
        "dog": (lambda: gx.dog(), lambda: c.dog()),
        "dog_distance_wd": (lambda: gx.dog(0.5, init_step=("distance", 0.1), weight_decay=0.01),
                            lambda: c.dog(0.5, init_step=("distance", 0.1), weight_decay=0.01)),
        "dog_lr": (lambda: gx.dog(init_step=("learning_rate", 0.01)), lambda: c.dog(init_step=("learning_rate", 0.01))),
    }


PAIR_NAMES = ["schedule_free_sgd", "schedule_free_sgd_plain", "schedule_free_adamw", "schedule_free_adamw_plain",
              "schedule_free_adam_base", "prodigy", "prodigy_wd_safeguard", "dadapt_adamw", "dadapt_adamw_wd",
              "ademamix", "scale_by_ademamix_sched", "adopt", "adopt_nesterov_noclip", "sam", "sam_adam_3",
              "madgrad", "madgrad_wd", "cocob", "cocob_wd", "dog", "dog_distance_wd", "dog_lr"]


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_equals_optax_contrib(optax_mod, name):
    make_gx, make_ox = _pairs(optax_mod)[name]
    p_gx, s_gx = _run_gx(make_gx())
    p_ox, s_ox = _run_optax(make_ox())
    for k in SHAPES:
        np.testing.assert_allclose(p_gx[k].numpy(), np.asarray(p_ox[k]), rtol=1e-9, atol=1e-11, err_msg=f"{name}: {k}")
    moved = max(float(np.abs(p_gx[k].numpy() - _init_params()[k]).max()) for k in SHAPES)
    assert moved > 1e-3, f"{name}: the params barely moved ({moved}); the comparison would be weak"
    if name.startswith("schedule_free"):
        e_gx = gx.schedule_free_eval_params(s_gx, p_gx)
        e_ox = optax_mod.contrib.schedule_free_eval_params(s_ox, p_ox)
        for k in SHAPES:
            np.testing.assert_allclose(e_gx[k].numpy(), np.asarray(e_ox[k]), rtol=1e-9, atol=1e-11)


def _madgrad_reference(params: dict[str, np.ndarray], lr: float, momentum: float, eps: float, wd: float, steps: int):
    """MADGRAD written from the paper (Defazio & Jelassi, arXiv 2101.11075, Algorithm 1) as the
    authors' reference implementation runs it: lambda_k = (lr + eps) sqrt(k + 1), cube-root
    denominator plus eps, L2 decay added to the gradient, x <- (1 - c) x + c z with c = 1 - momentum."""
    x = {k: v.copy() for k, v in params.items()}
    x0 = {k: v.copy() for k, v in params.items()}
    s = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t in range(steps):
        g = _grad_np(x, t)
        lam = (lr + eps) * np.sqrt(t + 1)
        for k in x:
            gk = g[k] + wd * x[k]
            s[k] += lam * gk
            nu[k] += lam * gk * gk
            z = x0[k] - s[k] / (np.cbrt(nu[k]) + eps)
            x[k] = (1 - (1 - momentum)) * x[k] + (1 - momentum) * z
    return x


def test_madgrad_equals_paper_reference():
    p_gx, _ = _run_gx(gx.madgrad(0.02, momentum=0.7, weight_decay=0.01))
    ref = _madgrad_reference(_init_params(), 0.02, 0.7, 1e-6, 0.01, STEPS)
    for k in SHAPES:
        np.testing.assert_allclose(p_gx[k].numpy(), ref[k], rtol=1e-9, atol=1e-11)


# --- through gx.Optimizer: LR scheduler, checkpoint round trip, equal to the functional run ------

ADAPTER_CASES = {
    "schedule_free_sgd": lambda: gx.schedule_free_sgd(0.3, warmup_steps=3, weight_decay=0.01),
    "schedule_free_adamw": lambda: gx.schedule_free_adamw(0.05, warmup_steps=3, weight_decay=0.1),
    "prodigy": lambda: gx.prodigy(weight_decay=0.01),
    "dadapt_adamw": lambda: gx.dadapt_adamw(weight_decay=0.01),
    "ademamix": lambda: gx.ademamix(0.01, b3=0.999, weight_decay=0.1),
    "adopt": lambda: gx.adopt(0.01),
    "sam": lambda: gx.sam(gx.sgd(0.1, momentum=0.9), gx.chain(gx.normalize(), gx.scale_by_learning_rate(0.05))),
    "madgrad": lambda: gx.madgrad(0.01, weight_decay=0.01),
    "cocob": lambda: gx.cocob(weight_decay=0.01),
    "dog": lambda: gx.dog(weight_decay=0.01),
}
LR_FACTOR = lambda t: 1.0 / (1.0 + 0.3 * t)  # noqa: E731  (a LambdaLR multiplier)
ADAPTER_STEPS, CUT = 8, 4


def _torch_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in _init_params().values()]


def _closure_grads(ps: list[torch.Tensor], t: int) -> list[torch.Tensor]:
    g = _grad_np(dict(zip(SHAPES, [p.detach().numpy() for p in ps])), t)
    return [torch.from_numpy(g[k].copy()) for k in SHAPES]


def _adapter_run(make, fused, cut=None):
    ps = _torch_params()
    opt = gx.Optimizer(ps, make(), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LR_FACTOR)
    for t in range(ADAPTER_STEPS):
        if cut is not None and t == cut:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in ps]}, buf)
            buf.seek(0)
            ck = torch.load(buf, weights_only=True)
            ps = [torch.nn.Parameter(p.clone()) for p in ck["params"]]
            opt = gx.Optimizer(ps, make(), fused=fused)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, LR_FACTOR)
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])

        def closure(ps=ps, t=t):
            for p, g in zip(ps, _closure_grads(ps, t)):
                p.grad = g
            return torch.zeros(())

        opt.step(closure)
        sched.step()
    return [p.detach() for p in ps], opt


def _functional_run(make, lr0):
    tx = make()
    params = [torch.from_numpy(v.copy()) for v in _init_params().values()]
    state = tx.init(params)
    for t in range(ADAPTER_STEPS):
        gx.set_hyperparam(state, "lr", lr0 * LR_FACTOR(t))
        u, state = tx.update(_closure_grads(params, t), state, params)
        params = gx.apply_updates(params, u)
    return params


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("name", sorted(ADAPTER_CASES))
def test_optimizer_scheduler_and_checkpoint(name, fused):
    make = ADAPTER_CASES[name]
    straight, opt = _adapter_run(make, fused)
    resumed, _ = _adapter_run(make, fused, cut=CUT)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    lr0 = gx.get_hyperparam(make().init([]), "lr").item()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * LR_FACTOR(ADAPTER_STEPS))
    ref = _functional_run(make, lr0)
    for a, b in zip(straight, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lr_scheduler_changes_the_trajectory():
    make = ADAPTER_CASES["prodigy"]
    a, _ = _adapter_run(make, False)
    tx = make()
    params = [torch.from_numpy(v.copy()) for v in _init_params().values()]
    state = tx.init(params)
    for t in range(ADAPTER_STEPS):
        u, state = tx.update(_closure_grads(params, t), state, params)
        params = gx.apply_updates(params, u)
    assert any(not torch.allclose(x, y) for x, y in zip(a, params))


# --- SAM: the ascent needs the gradient at the perturbed point -----------------------------------


def _sam_loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_sam_two_phases_through_closure_equal_hand_written_sam():
    """opt.step(closure) twice per batch: the first step moves to w + rho g/||g|| (closure at w),
    the second evaluates the closure at the perturbed point and steps from w: SAM (Foret et al.)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    ref = [p.detach().clone() for p in model.parameters()]
    rho, lr = 0.05, 0.1
    opt = gx.Optimizer(model.parameters(),
                       gx.sam(gx.sgd(lr), gx.chain(gx.normalize(), gx.scale_by_learning_rate(rho))))
    for b in range(5):
        g = torch.Generator().manual_seed(b)
        x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = _sam_loss(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.step(closure)
        # hand-written SAM on the reference weights
        names = [n for n, _ in model.named_parameters()]

        def batch_loss(ps, x=x, y=y, names=names):
            return torch.nn.functional.mse_loss(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

        grads = torch.func.grad(batch_loss)(ref)
        norm = torch.sqrt(sum((gg * gg).sum() for gg in grads))
        adv = [w + rho * gg / norm for w, gg in zip(ref, grads)]
        g_adv = torch.func.grad(batch_loss)(adv)
        ref = [w - lr * gg for w, gg in zip(ref, g_adv)]
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_sam_functional_loop_matches_adapter_phase_flags():
    """In the functional loop the state says which phase comes next (steps_since_sync)."""
    tx = gx.sam(gx.sgd(0.1), gx.chain(gx.normalize(), gx.scale_by_learning_rate(0.05)), sync_period=3)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    state = tx.init(params)
    phases = []
    for t in range(6):
        phases.append(int(state.steps_since_sync))
        u, state = tx.update({"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (t + 1)}, state, params)
        params = gx.apply_updates(params, u)
    assert phases == [0, 1, 2, 0, 1, 2]


def test_schedule_free_eval_params_through_adapter():
    """``schedule_free_eval_params(opt.tx_state(), group params)`` is x = (y - (1 - b1) z) / b1."""
    ps = _torch_params()
    opt = gx.Optimizer(ps, gx.schedule_free_sgd(0.3, b1=0.8))
    for t in range(5):
        for p, g in zip(ps, _closure_grads(ps, t)):
            p.grad = g
        opt.step()
    x = gx.schedule_free_eval_params(opt.tx_state(), [p.detach() for p in ps])
    for p, xi in zip(ps, x):
        z = opt.state[p]["z"]
        torch.testing.assert_close(xi, (p.detach() - 0.2 * z) / 0.8)
    # against the functional run
    tx = gx.schedule_free_sgd(0.3, b1=0.8)
    params = [torch.from_numpy(v.copy()) for v in _init_params().values()]
    state = tx.init(params)
    for t in range(5):
        u, state = tx.update(_closure_grads(params, t), state, params)
        params = gx.apply_updates(params, u)
    for a, b in zip(x, gx.schedule_free_eval_params(state, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_schedule_free_eval_params_rejects_other_states():
    with pytest.raises(ValueError, match="needs the state of a schedule_free transform"):
        gx.schedule_free_eval_params(gx.adam(0.1).init({"w": torch.ones(2)}), {"w": torch.ones(2)})


@pytest.mark.parametrize("make,fragment", [
    (lambda: gx.prodigy(-1.0), "learning_rate must be >= 0.0"),
    (lambda: gx.prodigy(betas=(1.0, 0.9)), r"betas\[0\] must be < 1.0"),
    (lambda: gx.dadapt_adamw(estim_lr0=0.0), "estim_lr0 must be > 0.0"),
    (lambda: gx.schedule_free_sgd(b1=0.0), "b1 must be > 0.0"),
    (lambda: gx.schedule_free_adamw(warmup_steps=0), "warmup_steps must be None or an int >= 1"),
    (lambda: gx.scale_by_ademamix(b3=1.0), "b3 must be < 1.0"),
    (lambda: gx.adopt(0.1, b2=1.5), "b2 must be < 1.0"),
    (lambda: gx.sam(gx.sgd(0.1), gx.normalize(), sync_period=0), "sync_period must be an int >= 1"),
    (lambda: gx.sam(gx.sgd(0.1), "sgd"), "adv_optimizer must be a GradientTransformation"),
    (lambda: gx.madgrad(0.1, momentum=1.0), "momentum must be < 1.0"),
    (lambda: gx.cocob(alpha=0.0), "alpha must be > 0.0"),
    (lambda: gx.dog(init_step=("nope", 1.0)), "init_step must be"),
    (lambda: gx.scale_by_adopt(mu_dtype=torch.int32), "mu_dtype must be None or a floating torch.dtype"),
])
def test_bad_arguments_are_named(make, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        make()


@pytest.mark.parametrize("make", [lambda: gx.prodigy(), lambda: gx.madgrad(0.1), lambda: gx.cocob(), lambda: gx.dog(),
                                  lambda: gx.sam(gx.sgd(0.1), gx.normalize()), lambda: gx.schedule_free_sgd()])
def test_params_required(make):
    tx = make()
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": torch.ones(2)}, tx.init(params))


@pytest.mark.parametrize("name", sorted(ADAPTER_CASES))
def test_batched_equals_per_model_runs(name):
    """Under gx.batched (vmap over a model dimension) each model runs its own optimizer."""
    make = ADAPTER_CASES[name]
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, 2, generator=g, dtype=torch.float64), "b": torch.randn(3, 2, generator=g,
                                                                                          dtype=torch.float64)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()} for _ in range(4)]
    btx = gx.batched(make())
    bstate = btx.init(params)
    bp = params
    for gr in grads:
        u, bstate = btx.update(gr, bstate, bp)
        bp = gx.apply_updates(bp, u)
    tx = make()
    for m in range(3):
        p = {k: v[m].clone() for k, v in params.items()}
        s = tx.init(p)
        for gr in grads:
            u, s = tx.update({k: v[m] for k, v in gr.items()}, s, p)
            p = gx.apply_updates(p, u)
        for k in p:
            torch.testing.assert_close(bp[k][m], p[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: gx.prodigy(), lambda: gx.dadapt_adamw()])
def test_zero_gradient_keeps_the_distance_estimate(make):
    """With ||s||_1 = 0 (a zero or empty gradient) the estimate d stays at its value; optax 0.2.8
    divides 0 by 0 there and makes d (and every later step) NaN."""
    tx = make()
    params = {"w": torch.ones(3, dtype=torch.float64), "e": torch.ones(0, dtype=torch.float64)}
    state = tx.init(params)
    u, state = tx.update({"w": torch.zeros(3, dtype=torch.float64), "e": torch.ones(0, dtype=torch.float64)},
                         state, params)
    inner = state.inner_state
    assert float(inner.estim_lr) == 1e-6 and torch.equal(u["w"], torch.zeros(3, dtype=torch.float64))
    u, state = tx.update({"w": torch.ones(3, dtype=torch.float64), "e": torch.ones(0, dtype=torch.float64)},
                         state, params)
    assert torch.isfinite(u["w"]).all() and bool((u["w"] < 0).all())


def test_madgrad_equals_authors_package():
    """The authors' ``madgrad`` package (facebookresearch, MADGRAD 1.3) when it is installed (a test
    extra only, never a dependency)."""
    madgrad = pytest.importorskip("madgrad", reason="the authors' madgrad package is an optional test extra")
    ps = _torch_params()
    opt = madgrad.MADGRAD(ps, lr=0.02, momentum=0.7, weight_decay=0.01, eps=1e-6)
    for t in range(STEPS):
        for p, g in zip(ps, _closure_grads(ps, t)):
            p.grad = g
        opt.step()
    p_gx, _ = _run_gx(gx.madgrad(0.02, momentum=0.7, weight_decay=0.01))
    for p, k in zip(ps, SHAPES):
        torch.testing.assert_close(p_gx[k], p.detach(), rtol=1e-9, atol=1e-11)


# --- temporaries per step (regression: prodigy made 8, dadapt_adamw 9, cocob 9, dog 4, adopt 4,
# ademamix 5, schedule_free_adamw 5, schedule_free_sgd 3) -----------------------------------------


@pytest.mark.parametrize("name, make, limit, large", [
    ("prodigy", lambda: gx.prodigy(1.0), 1.2, False),
    ("dog", lambda: gx.dog(1.0), 1.2, False),
    ("dadapt_adamw", lambda: gx.dadapt_adamw(1.0), 1.2, False),
    # the decay's w p made slice by slice in a 256K-element scratch (was a second params-sized one)
    ("dadapt_adamw_wd", lambda: gx.dadapt_adamw(1.0, weight_decay=0.01), 1.2, True),
    ("madgrad", lambda: gx.madgrad(1e-2), 1.2, False),
    # sigma written into the decayed gradient add_decayed_weights made (was a second temporary)
    ("madgrad_wd", lambda: gx.madgrad(1e-2, weight_decay=0.01), 1.2, False),
    ("cocob", lambda: gx.cocob(), 2.2, False),  # |g| then the ratio; x - x0 then the output
    ("adopt", lambda: gx.adopt(1e-3), 1.2, False),
    ("adopt_nesterov", lambda: gx.adopt(1e-3, nesterov=True), 1.2, False),
    # these make a cache-sized chunk scratch (ademamix 128K elements; schedule_free a 256K-element
    # slice, 0.16 of these 1.6M params, 0.01 of 25M): measured on 1.6M params
    ("ademamix", lambda: gx.ademamix(1e-3), 1.15, True),
    ("schedule_free_adamw", lambda: gx.schedule_free_adamw(1e-3), 1.2, True),
    ("schedule_free_adamw_wd", lambda: gx.schedule_free_adamw(1e-3, warmup_steps=3, weight_decay=0.01), 1.2, True),
    ("schedule_free_sgd", lambda: gx.schedule_free_sgd(0.1), 1.2, True),
])
def test_an_adapter_step_makes_few_params_sized_temporaries(name, make, limit, large):
    """Bytes one `gx.Optimizer` step allocates, in units of the params (torch.profiler's memory
    accounting, not a timing): the update once, the state in place."""
    from test_optax_optimizers import LARGE, SMALL, temporaries_per_step

    assert temporaries_per_step(make, shapes=LARGE if large else SMALL) <= limit, name
