"""gradxform's torch.optim twins (gradxform.torch_optimizers) against torch.optim.

For every configuration that torch's optimizer database
(``torch.testing._internal.common_optimizers.optim_db``) lists on CPU for Adagrad, Adadelta,
Adamax, NAdam, RAdam, RMSprop, Rprop and ASGD: 200 steps (float32: 80) on a tiny model with a StepLR schedule,
torch.optim vs ``gx.Optimizer`` (generic and default paths) vs the functional API
(``tx.init`` / ``tx.update``, the scheduler's rate written into the state), float64 to 1e-10
relative and float32 to 1e-5; ``opt.state[p]`` holds torch's keys with torch's values. Then:
a gradxform checkpoint resumes bit for bit, a torch.optim state dict loaded mid-run into the
twin continues equal to the uninterrupted torch run (and the reverse), the averaged iterate of
ASGD, the block options that give optax's variants (against optax, when installed), and argument
validation.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

import gradxform as gx

try:
    from torch.testing._internal.common_optimizers import optim_db
except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"torch's optimizer database cannot be imported ({err}): it needs torch>=2.2 (absent from 2.1) and "
                "expecttest; the twins follow torch 2.13's optimizers, the reference of the main CI job",
                allow_module_level=True)

F64, F32 = torch.float64, torch.float32
STEPS = 200
STEPS_F32 = 80  # float32 runs: shorter (the module's CI time); the schedule still changes lr once
TOL = {F64: dict(rtol=1e-10, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5)}
TWINS = {
    "Adagrad": gx.adagrad, "Adadelta": gx.adadelta, "Adamax": gx.adamax, "NAdam": gx.nadam,
    "RAdam": gx.radam, "RMSprop": gx.rmsprop, "Rprop": gx.rprop, "ASGD": gx.asgd,
}
TORCH = {info.optim_cls.__name__: info.optim_cls for info in optim_db if info.optim_cls.__name__ in TWINS}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _db() -> list[Any]:
    out = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name in TWINS:
            for oi in info.optim_inputs_func(device="cpu"):
                assert oi.params is None
                out.append(pytest.param(name, oi.kwargs, id=f"{name}-{oi.desc.replace(' ', '_')}"))
    return out


DB = _db()


def test_database_lists_all_eight():
    assert {p.values[0] for p in DB} == set(TWINS)
    assert len(DB) >= 40


def fresh(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in kw.items()}


def make_model(dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return model


_G = torch.Generator().manual_seed(1)
_X = torch.randn(4, 5, 4, generator=_G, dtype=F64)
_Y = torch.randn(4, 5, 2, generator=_G, dtype=F64)


def loss_of(model: nn.Module, k: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return (model(_X[k % 4].to(dtype)) - _Y[k % 4].to(dtype)).pow(2).mean()


def step(model: nn.Module, opt: torch.optim.Optimizer, k: int, sched: Any = None) -> None:
    opt.zero_grad()
    loss_of(model, k).backward()
    opt.step()
    if sched is not None:
        sched.step()


def sched_of(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=60, gamma=0.5)  # lr changes at 60, 120, 180


def saved_and_loaded(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(model_g: nn.Module, opt_g: torch.optim.Optimizer, model_t: nn.Module, opt_t: torch.optim.Optimizer,
                exact: bool = False, **tol: Any) -> None:
    for (name, pt), pg in zip(model_t.named_parameters(), model_g.parameters()):
        if exact:
            assert torch.equal(pg, pt), f"{name}: param differs"
        else:
            torch.testing.assert_close(pg.detach(), pt.detach(), msg=lambda m, n=name: f"{n}: {m}", **tol)
        st, sg = opt_t.state[pt], opt_g.state[pg]
        assert set(sg) == set(st), f"{name}: opt.state[p] keys {sorted(sg)}, torch's {sorted(st)}"
        for key, want in st.items():
            got = sg[key]
            if key == "step":
                assert float(got) == float(want), f"{name}: step {float(got)} vs {float(want)}"
            elif exact:
                assert torch.equal(got, want), f"{name}: state {key} differs"
            else:
                torch.testing.assert_close(got.to(want.dtype), want, msg=lambda m, n=name, k=key: f"{n} {k}: {m}", **tol)


# --- every db configuration: torch.optim = gx.Optimizer (both paths) = the functional API -----------


def test_only_adagrad_declares_a_fast_path():
    """The adapter's two paths (``fused=False`` and the default) run the same generic update for
    every alias but Adagrad, which declares torch's fused kernel: the database test below runs the
    default path too for an alias that declares a lowering."""
    from gradxform.fastpath import lowering_of

    assert {name for name, alias in TWINS.items() if lowering_of(alias()) is not None} == {"Adagrad"}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,kw", DB)
def test_db_config_matches_torch(name, kw, dtype):
    """200 steps (float32: 80) with a StepLR schedule: torch.optim, gx.Optimizer and (float64) the functional API."""
    model_t = make_model(dtype)
    opt_t = TORCH[name](model_t.parameters(), **fresh(kw))
    sched_t = sched_of(opt_t)
    model_g = copy.deepcopy(model_t)
    opt_g = gx.Optimizer(model_g.parameters(), TWINS[name](**fresh(kw)), fused=False)
    sched_g = sched_of(opt_g)
    # an alias with a declared lowering (Adagrad): the default path as well
    from gradxform.fastpath import lowering_of

    lowered = lowering_of(TWINS[name]()) is not None
    model_d = copy.deepcopy(model_t)
    opt_d = gx.Optimizer(model_d.parameters(), TWINS[name](**fresh(kw))) if lowered else None
    sched_d = sched_of(opt_d) if lowered else None
    # the functional API on the same params, the scheduler's rate written into the state
    functional = dtype == F64
    model_f = copy.deepcopy(model_t)
    params_f = list(model_f.parameters())
    tx = TWINS[name](**fresh(kw))
    state = tx.init([p.detach() for p in params_f])
    for k in range(STEPS if dtype == F64 else STEPS_F32):
        lr_now = float(opt_t.param_groups[0]["lr"])  # (a tensor lr is updated in place by the scheduler)
        step(model_t, opt_t, k, sched_t)
        step(model_g, opt_g, k, sched_g)
        if lowered:
            step(model_d, opt_d, k, sched_d)
        if functional:
            model_f.zero_grad()
            loss_of(model_f, k).backward()
            gx.set_hyperparam(state, "lr", lr_now)
            with torch.no_grad():
                updates, state = tx.update([p.grad for p in params_f], state, [p.detach() for p in params_f])
                gx.apply_updates([p.detach() for p in params_f], updates, inplace=True)
        if k == 0:  # a wrong init shows here undamped
            assert_same(model_g, opt_g, model_t, opt_t, **TOL[dtype])
    assert opt_g.param_groups[0]["lr"] != fresh(kw).get("lr", opt_g.defaults["lr"]) or name == "Rprop"
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[dtype])
    if lowered:
        assert_same(model_d, opt_d, model_t, opt_t, **TOL[dtype])
    if functional:
        for pf, pt in zip(params_f, model_t.parameters()):
            torch.testing.assert_close(pf.detach(), pt.detach(), **TOL[dtype])


# --- checkpoints ------------------------------------------------------------------------------------

RESUME = 12


@pytest.mark.parametrize("name,kw", DB)
def test_checkpoint_resumes_bit_for_bit_and_torch_state_dicts_load(name, kw):
    """A gradxform checkpoint (torch.save / torch.load(weights_only=True)) resumes bit for bit; a
    torch.optim state dict saved mid-run loads into the twin, which continues equal to the
    uninterrupted torch run; and a gradxform state dict loads into torch.optim."""
    model_a, model_t = make_model(F64), make_model(F64)
    opt_a = gx.Optimizer(model_a.parameters(), TWINS[name](**fresh(kw)))
    opt_t = TORCH[name](model_t.parameters(), **fresh(kw))
    sched_a, sched_t = sched_of(opt_a), sched_of(opt_t)
    for k in range(RESUME // 2):
        step(model_a, opt_a, k, sched_a)
        step(model_t, opt_t, k, sched_t)
    sd_g = saved_and_loaded(opt_a.state_dict())
    sd_t = saved_and_loaded(opt_t.state_dict())
    # resume: a fresh gradxform twin from the gradxform checkpoint
    model_b = copy.deepcopy(model_a)
    opt_b = gx.Optimizer(model_b.parameters(), TWINS[name](**fresh(kw)))
    opt_b.load_state_dict(copy.deepcopy(sd_g))  # (loading may keep the dict's tensors: one copy each)
    sched_b = sched_of(opt_b)
    sched_b.load_state_dict(sched_a.state_dict())
    # torch -> gradxform: a fresh twin from torch's checkpoint
    model_c = copy.deepcopy(model_t)
    opt_c = gx.Optimizer(model_c.parameters(), TWINS[name](**fresh(kw)))
    opt_c.load_state_dict(copy.deepcopy(sd_t))
    sched_c = sched_of(opt_c)
    sched_c.load_state_dict(sched_t.state_dict())
    # gradxform -> torch (Rprop: see test_rprop_gradxform_state_dict_loads_into_torch)
    runs = [(model_a, opt_a, sched_a), (model_b, opt_b, sched_b), (model_t, opt_t, sched_t), (model_c, opt_c, sched_c)]
    if name != "Rprop":
        runs.append(_torch_from(name, kw, model_a, sd_g, sched_a))
    for k in range(RESUME // 2, RESUME):
        for model, opt, sched in runs:
            step(model, opt, k, sched)
    assert_same(model_b, opt_b, model_a, opt_a, exact=True)
    assert_same(model_c, opt_c, model_t, opt_t, **TOL[F64])
    # torch casts loaded scalar state (NAdam's mu_product, ASGD's eta, mu) to the param's dtype
    # and continues in float64; the uninterrupted runs round it to float32
    if name != "Rprop":
        model_d, opt_d, _ = runs[-1]
        loose = dict(rtol=1e-6, atol=1e-8) if name in ("NAdam", "ASGD") else TOL[F64]
        assert_same(model_a, opt_a, model_d, opt_d, **loose)


def _torch_from(name: str, kw: dict[str, Any], model: nn.Module, sd: dict[str, Any], sched: Any) -> tuple[Any, ...]:
    model_d = copy.deepcopy(model)
    opt_d = TORCH[name](model_d.parameters(), **fresh(kw))
    opt_d.load_state_dict(copy.deepcopy(sd))
    sched_d = sched_of(opt_d)
    sched_d.load_state_dict(sched.state_dict())
    return model_d, opt_d, sched_d


def test_rprop_gradxform_state_dict_loads_into_torch():
    model = make_model(F64)
    opt = gx.Optimizer(model.parameters(), gx.rprop())
    step(model, opt, 0)
    model_d = copy.deepcopy(model)
    opt_d = torch.optim.Rprop(model_d.parameters())
    opt_d.load_state_dict(saved_and_loaded(opt.state_dict()))
    step(model_d, opt_d, 1)


def test_state_dict_keys_and_group_keys_match_torch():
    for name, alias in TWINS.items():
        model_t, model_g = make_model(F64), make_model(F64)
        opt_t = TORCH[name](model_t.parameters())
        opt_g = gx.Optimizer(model_g.parameters(), alias())
        step(model_t, opt_t, 0)
        step(model_g, opt_g, 0)
        gt, gg = opt_t.param_groups[0], opt_g.param_groups[0]
        for key in ("lr", "maximize") + tuple(k for k in ("lr_decay", "initial_accumulator_value", "rho", "eps",
                                                           "weight_decay", "alpha", "momentum", "centered", "lambd",
                                                           "t0", "momentum_decay", "decoupled_weight_decay", "betas")
                                               if k in gt):
            assert key in gg, f"{name}: group key {key!r} missing"
            assert gg[key] == gt[key], f"{name}: group {key} = {gg[key]!r}, torch's {gt[key]!r}"


# --- ASGD's average ---------------------------------------------------------------------------------


def test_averaged_params_equal_torch_ax_functional_and_optimizer():
    model_t, model_g = make_model(F64), make_model(F64)
    opt_t = torch.optim.ASGD(model_t.parameters(), lr=0.05, t0=5)
    opt_g = gx.Optimizer(model_g.parameters(), gx.asgd(0.05, t0=5))
    assert [torch.equal(a, p) for a, p in zip(gx.averaged_params(opt_g), model_g.parameters())] == [True] * 4
    params = {n: p.detach().clone() for n, p in make_model(F64).named_parameters()}
    tx = gx.asgd(0.05, t0=5)
    state = tx.init(params)
    assert all(torch.equal(gx.averaged_params(state, params)[n], params[n]) for n in params)
    model_f = make_model(F64)
    for k in range(20):
        step(model_t, opt_t, k)
        step(model_g, opt_g, k)
        model_f.zero_grad()
        loss_of(model_f, k).backward()
        with torch.no_grad():
            grads = {n: p.grad for n, p in model_f.named_parameters()}
            ps = {n: p for n, p in model_f.named_parameters()}
            updates, state = tx.update(grads, state, ps)
            gx.apply_updates(ps, updates, inplace=True)
    want = [opt_t.state[p]["ax"] for p in model_t.parameters()]
    for got, w in zip(gx.averaged_params(opt_g), want):
        torch.testing.assert_close(got, w, **TOL[F64])
    avg = gx.averaged_params(state)
    for (n, _), w in zip(model_t.named_parameters(), want):
        torch.testing.assert_close(avg[n], w, **TOL[F64])
    # the average differs from the last iterate once averaging has started (step > t0)
    assert not torch.allclose(want[0], next(model_t.parameters()))
    with pytest.raises(ValueError, match="no ScaleByAsgdState"):
        gx.averaged_params(gx.adam(0.1).init(params))
    with pytest.raises(ValueError, match="no 'ax'"):
        m = make_model(F64)
        o = gx.Optimizer(m.parameters(), gx.adam(0.1))
        step(m, o, 0)
        gx.averaged_params(o)


# --- warm-up schedulers change lr before the first step (Rprop's and ASGD's first step read it) -----


@pytest.mark.parametrize("name", ["Rprop", "ASGD", "Adagrad"])
def test_lr_changed_before_the_first_step(name):
    model_t, model_g = make_model(F64), make_model(F64)
    opt_t = TORCH[name](model_t.parameters(), lr=0.01)
    opt_g = gx.Optimizer(model_g.parameters(), TWINS[name](lr=0.01))
    sched_t = torch.optim.lr_scheduler.LinearLR(opt_t, start_factor=0.1, total_iters=5)
    sched_g = torch.optim.lr_scheduler.LinearLR(opt_g, start_factor=0.1, total_iters=5)
    for k in range(12):
        step(model_t, opt_t, k, sched_t)
        step(model_g, opt_g, k, sched_g)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


def test_rprop_compiled_reads_lr_at_each_leafs_first_step():
    """Compiled (fullgraph, donated state), Rprop's step size starts at the lr of each leaf's
    own first step: lr changes after init and again before the second leaf's first step; equal
    to torch.optim.Rprop bit for bit (compile-once under a changing lr is the compile harness's)."""
    g = torch.Generator().manual_seed(5)
    shapes = [(6, 5), (5,)]
    start = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=F64) for s in shapes] for _ in range(6)]
    lrs = [0.03, 0.03, 0.07, 0.07, 0.07, 0.002]  # the lr read before each step
    late = 2  # the second leaf has no gradient before step 2
    ref = [p.clone().requires_grad_(True) for p in start]
    opt = torch.optim.Rprop(ref, lr=0.01)
    tx = gx.rprop(0.01)
    params = [p.clone() for p in start]
    state = tx.init(params)

    @torch.compile(fullgraph=True)
    def step(params, state, updates):
        u, state = gx.update_in_place(tx, updates, state, params)
        return gx.apply_updates(params, u, inplace=True), state

    for k, (gs, lr) in enumerate(zip(grads, lrs)):
        for p, x, live in zip(ref, gs, (True, k >= late)):
            p.grad = x.clone() if live else None
        opt.param_groups[0]["lr"] = lr
        opt.step()
        state.hyperparams["lr"].fill_(lr)
        params, state = step(params, state, [gs[0], gs[1] if k >= late else None])
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    sizes = state.inner_state[0].step_sizes
    for a, p in zip(sizes, ref):
        torch.testing.assert_close(a, opt.state[p]["step_size"], rtol=0, atol=0)


# --- the blocks' optax variants -----------------------------------------------------------------------


def _optax_pair():
    optax = pytest.importorskip("optax", reason="optax (and jax) compare the blocks' optax variants")
    import jax

    jax.config.update("jax_enable_x64", True)
    return optax, jax.numpy


def _grads_seq(n=12):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(7, generator=g, dtype=F64) * (1 + k % 3) for k in range(n)]


@pytest.mark.parametrize("case", ["rss", "rms", "stddev", "adadelta", "adamax", "radam", "rms_torch"])
def test_blocks_equal_optax(case):
    optax, jnp = _optax_pair()
    ours, theirs = {
        "rss": (gx.scale_by_rss(0.1, 1e-7, eps_in_sqrt=True), optax.scale_by_rss(0.1, 1e-7)),
        "rms": (gx.scale_by_rms(0.9, 1e-8, eps_in_sqrt=True), optax.scale_by_rms(0.9, 1e-8)),
        "stddev": (gx.scale_by_rms(0.9, 1e-8, centered=True, eps_in_sqrt=True), optax.scale_by_stddev(0.9, 1e-8)),
        "adadelta": (gx.scale_by_adadelta(0.9, 1e-6), optax.scale_by_adadelta(0.9, 1e-6)),
        "adamax": (gx.scale_by_adamax(0.9, 0.999, 1e-8), optax.scale_by_adamax(0.9, 0.999, 1e-8)),
        "radam": (gx.scale_by_radam(0.9, 0.999, 1e-3, eps_on_debiased=True), optax.scale_by_radam(0.9, 0.999, 1e-3)),
        "rms_torch": (gx.scale_by_rms(0.9, 1e-3), optax.scale_by_rms(0.9, 1e-3, eps_in_sqrt=False)),
    }[case]
    s_g, s_o = ours.init(torch.zeros(7, dtype=F64)), theirs.init(jnp.zeros(7))
    for g in _grads_seq():
        u_g, s_g = ours.update(g, s_g)
        u_o, s_o = theirs.update(jnp.asarray(g.numpy()), s_o)
        torch.testing.assert_close(u_g, torch.from_numpy(jnp.asarray(u_o).__array__().copy()), rtol=1e-10, atol=1e-12)


def test_scale_by_rms_default_unchanged_and_centered_by_hand():
    g1, g2 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([3.0, 0.5], dtype=F64)
    tx = gx.scale_by_rms(0.5, 0.0)
    s = tx.init(torch.zeros(2, dtype=F64))
    assert s.grad_avg is None and s.count is None
    _, s = tx.update(g1, s)
    u, s = tx.update(g2, s)
    v = 0.25 * g1**2 + 0.5 * g2**2
    torch.testing.assert_close(u, g2 / v.sqrt())
    tc = gx.scale_by_rms(0.5, 0.0, centered=True, count_steps=True)
    s = tc.init(torch.zeros(2, dtype=F64))
    _, s = tc.update(g1, s)
    u, s = tc.update(g2, s)
    m = 0.25 * g1 + 0.5 * g2
    torch.testing.assert_close(u, g2 / (v - m**2).sqrt())
    assert int(s.count) == 2


def test_radam_rectification_switches_on_strictly_above_five():
    """torch rectifies while rho_t > 5: with b2 = 0.9 that is from step 7 on (rho_6 = 4.4, rho_7 = 5.2...)."""
    tx = gx.scale_by_radam(0.9, 0.9, 0.0)
    g = torch.tensor([1.0], dtype=F64)
    s = tx.init(g)
    rho_inf = 2 / (1 - 0.9) - 1
    for t in range(1, 12):
        u, s = tx.update(g, s)
        rho = rho_inf - 2 * t * 0.9**t / (1 - 0.9**t)
        # constant g: m_hat = 1, v_hat = 1
        want = 1.0
        if rho > 5:
            want = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
        torch.testing.assert_close(u, torch.tensor([want], dtype=F64), rtol=1e-12, atol=0)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: gx.adagrad(-1.0), "lr must be >= 0"),
    (lambda: gx.adagrad(lr_decay=-1.0), "lr_decay"),
    (lambda: gx.adagrad(initial_accumulator_value=-0.1), "initial_accumulator_value"),
    (lambda: gx.adadelta(rho=1.5), "rho"),
    (lambda: gx.adamax(betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda: gx.nadam(momentum_decay=-1.0), "momentum_decay"),
    (lambda: gx.radam(eps=-1.0), "eps"),
    (lambda: gx.rmsprop(momentum=-0.1), "momentum"),
    (lambda: gx.rmsprop(alpha="0.9"), "alpha must be a number"),
    (lambda: gx.rprop(etas=(1.5, 1.2)), "etas"),
    (lambda: gx.rprop(etas=0.5), "etas must be a pair"),
    (lambda: gx.rprop(step_sizes=(1.0, 0.1)), "step_sizes"),
    (lambda: gx.asgd(lambd=-1.0), "lambd"),
    (lambda: gx.asgd(weight_decay=-1.0), "weight_decay"),
])
def test_bad_arguments_raise_early(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# --- Adagrad with sparse gradients (nn.Embedding(sparse=True)), as torch.optim.Adagrad ---------------

SPARSE_ADAGRAD = [{}, {"lr_decay": 0.01}, {"initial_accumulator_value": 0.1}, {"maximize": True}, {"eps": 1e-3}]


def _embedding_model(dtype: torch.dtype) -> tuple[torch.nn.Embedding, torch.nn.Linear]:
    torch.manual_seed(11)
    return torch.nn.Embedding(40, 4, sparse=True, dtype=dtype), torch.nn.Linear(4, 1, dtype=dtype)


def _embedding_steps(emb: torch.nn.Embedding, lin: torch.nn.Linear, opt: Any, steps: range,
                     sched: Any = None) -> None:
    for k in steps:
        opt.zero_grad()
        rows = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(k))  # repeats: coalesced
        lin(emb(rows)).pow(2).sum().backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kw", SPARSE_ADAGRAD, ids=lambda kw: ",".join(kw) or "default")
def test_adagrad_sparse_gradients_equal_torch_bit_for_bit(kw, dtype):
    """A sparse embedding and a dense linear layer in one group through gx.Optimizer: 12 steps
    with a StepLR, a checkpoint round trip at step 6 and a torch.optim.Adagrad state dict loaded
    into the twin, all bit for bit torch.optim.Adagrad (its per-tensor path, which torch takes
    for a group with a sparse gradient: the sum updated at the gradient's rows, the step added
    with ``add_(..., alpha=-clr)``)."""
    ref_emb, ref_lin = _embedding_model(dtype)
    ref = torch.optim.Adagrad([ref_emb.weight, *ref_lin.parameters()], lr=0.1, **kw)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=4, gamma=0.5)
    _embedding_steps(ref_emb, ref_lin, ref, range(6), ref_sched)
    emb, lin = _embedding_model(dtype)
    opt = gx.Optimizer([emb.weight, *lin.parameters()], gx.adagrad(0.1, **kw))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    _embedding_steps(emb, lin, opt, range(6), sched)
    assert set(opt.state[emb.weight]) == set(ref.state[ref_emb.weight]) == {"step", "sum"}
    for a, b in [(emb.weight, ref_emb.weight), (lin.weight, ref_lin.weight)]:
        assert torch.equal(a, b) and torch.equal(opt.state[a]["sum"], ref.state[b]["sum"])
    # resume: a gx checkpoint into a fresh gx twin, a torch checkpoint into another one
    twins = []
    for source in (opt, ref):
        buf = io.BytesIO()
        torch.save(source.state_dict(), buf)
        buf.seek(0)
        emb2, lin2 = _embedding_model(dtype)
        with torch.no_grad():
            for p, q in zip([emb2.weight, *lin2.parameters()], [emb.weight, *lin.parameters()]):
                p.copy_(q)
        twin = gx.Optimizer([emb2.weight, *lin2.parameters()], gx.adagrad(0.1, **kw))
        twin.load_state_dict(torch.load(buf, weights_only=True))
        twins.append((emb2, lin2, twin))
    for e, m, o in [(emb, lin, opt), (ref_emb, ref_lin, ref), *twins]:
        _embedding_steps(e, m, o, range(6, 12))
    for e, m, _ in [(emb, lin, opt), *twins]:
        assert torch.equal(e.weight, ref_emb.weight) and torch.equal(m.weight, ref_lin.weight)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_adagrad_functional_update_with_sparse_gradients():
    """The functional API: a COO gradient gives a COO update at the gradient's (coalesced) rows,
    ``u = -clr g / (sqrt(s) + eps)``, the sum grows only there, and the update added with
    ``apply_updates`` equals torch.optim.Adagrad to rounding (torch adds with a multiply-add)."""
    emb, _ = _embedding_model(torch.float64)
    ref = torch.nn.Embedding(40, 4, sparse=True, dtype=torch.float64)
    ref.load_state_dict(emb.state_dict())
    torch_opt = torch.optim.Adagrad(ref.parameters(), lr=0.1, lr_decay=0.05)
    tx = gx.adagrad(0.1, lr_decay=0.05)
    params = {"emb": emb.weight.detach().clone()}
    state = tx.init(params)
    for k in range(5):
        rows = torch.tensor([1, 7, 1, k])
        ref.zero_grad()
        ref(rows).sum().backward()
        torch_opt.step()
        g = ref.weight.grad.clone()
        updates, state = tx.update({"emb": g}, state, params)
        assert updates["emb"].layout is torch.sparse_coo
        assert set(updates["emb"].coalesce().indices()[0].tolist()) == {1, 7, k}
        params = gx.apply_updates(params, updates)
        torch.testing.assert_close(params["emb"], ref.weight.detach(), rtol=1e-14, atol=1e-15)
    assert torch.equal(state.inner_state[-1].sum_of_squares["emb"], torch_opt.state[ref.weight]["sum"])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_sparse_gradients_with_weight_decay_or_optax_eps_get_clear_errors():
    """Weight decay would make a sparse gradient dense (torch.optim.Adagrad refuses it too), and
    optax's ``eps_in_sqrt`` form takes dense updates only: each error names the leaf and the fix.
    Before: torch's "add(sparse, dense) is not supported" from inside the step."""
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([0, 2])).sum().backward()
    params = {"emb": emb.weight.detach()}
    tx = gx.adagrad(0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"'emb' is sparse .*weight_decay=0"):
        tx.update({"emb": emb.weight.grad}, tx.init(params), params)
    tx = gx.scale_by_rss(eps_in_sqrt=True)
    with pytest.raises(ValueError, match=r"'emb' is sparse .*eps_in_sqrt=False"):
        tx.update({"emb": emb.weight.grad}, tx.init(params), params)
    opt = gx.Optimizer(emb.parameters(), gx.adagrad(0.1, weight_decay=0.01))
    with pytest.raises(ValueError, match=r"is sparse .*weight_decay=0"):
        opt.step()


def test_asgd_block_needs_params():
    tx = gx.scale_by_asgd(0.1)
    s = tx.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="scale_by_asgd needs params"):
        tx.update({"w": torch.ones(2)}, s)
