"""gradxform.structured against torch.optim 2.13: Adafactor, Muon, LBFGS and SparseAdam on every
CPU configuration of torch's optimizer database, through the functional API and gx.Optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

import gradxform as gx

try:
    from torch.testing._internal.common_optimizers import optim_db
except ImportError as err:  # pragma: no cover - torch 2.1 has none (nor torch.optim.Adafactor or Muon)
    pytest.skip(f"torch's optimizer database cannot be imported ({err}): it needs torch>=2.2 (absent from 2.1) and "
                "expecttest; the reference is torch 2.13's optimizers, in the main CI job", allow_module_level=True)

F64, F32 = torch.float64, torch.float32
TOL = {F64: {"rtol": 1e-10, "atol": 1e-12}, F32: {"rtol": 1e-5, "atol": 1e-6}}
PATHS = {"generic": False, "default": None}


def _db(name: str) -> list[dict]:
    info = next(i for i in optim_db if i.optim_cls.__name__ == name)
    return [oi.kwargs for oi in info.optim_inputs_func(device="cpu")]


def _ids(configs: list[dict]) -> list[str]:
    return [",".join(f"{k}={v}" for k, v in kw.items()) or "default" for kw in configs]


def _fresh(kw: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def make_model(dtype=F64, seed=0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return model


_G = torch.Generator().manual_seed(7)
_X = torch.randn(4, 8, 6, generator=_G, dtype=F64)
_Y = torch.randn(4, 8, 3, generator=_G, dtype=F64)


def loss_of(model: nn.Module, k: int, params: dict | None = None) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    x, y = _X[k % 4].to(dtype), _Y[k % 4].to(dtype)
    out = model(x) if params is None else functional_call(model, params, (x,))
    return (out - y).pow(2).mean()


def grads_at(model: nn.Module, names: list[str], params: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    leaves = [p.detach().requires_grad_() for p in params]
    full = {n: p.detach() for n, p in model.named_parameters()}
    full.update(dict(zip(names, leaves)))
    return list(torch.autograd.grad(loss_of(model, k, full), leaves))


def torch_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sched=None) -> None:
    for k in steps:
        opt.zero_grad()
        loss_of(model, k).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_params(actual: list[torch.Tensor], expected: list[torch.Tensor], dtype=F64, what="") -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach(), e.detach(), **TOL[dtype], msg=lambda m: f"{what} param {i}: {m}")


def run_functional(tx, model_gx: nn.Module, names: list[str], steps: int) -> list[torch.Tensor]:
    params = [dict(model_gx.named_parameters())[n].detach().clone() for n in names]
    state = tx.init(params)
    for k in range(steps):
        updates, state = tx.update(grads_at(model_gx, names, params, k), state, params)
        params = gx.apply_updates(params, updates)
    return params


def saved_and_loaded(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- Adafactor ----------------------------------------------------------------------------------


def _adapter_takes_optional_keys() -> bool:
    """Whether gx.Optimizer lets a param keep only some of a transform's per-param keys
    (Adafactor: row_var/col_var for a matrix, variance for a vector), as torch.optim does."""
    ps = [nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))]
    opt = gx.Optimizer(ps, gx.adafactor())
    try:
        for _ in range(2):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
    except KeyError:
        return False
    return True


OPTIONAL_KEYS = _adapter_takes_optional_keys()
needs_optional_keys = pytest.mark.xfail(
    not OPTIONAL_KEYS, strict=True, raises=KeyError,
    reason="gx.Optimizer._gather raises KeyError for a per-param key that the transform's init leaves None "
           "for that param (Adafactor keeps row_var/col_var for matrices, variance for vectors): every "
           "Adafactor param lacks one of its keys")

ADAFACTOR = _db("Adafactor")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kw", ADAFACTOR, ids=_ids(ADAFACTOR))
def test_adafactor_functional_equals_torch(kw, dtype):
    names = [n for n, _ in make_model().named_parameters()]
    model_t = make_model(dtype)
    opt_t = torch.optim.Adafactor(model_t.parameters(), **_fresh(kw))
    torch_steps(model_t, opt_t, range(50))
    got = run_functional(gx.adafactor(**_fresh(kw)), make_model(dtype), names, 50)
    assert_params(got, list(model_t.parameters()), dtype)


def _adapter_run(name, make_tx, make_torch, kw, path, params_of, steps=25, ckpt_at=12):
    """gx.Optimizer vs torch.optim with a StepLR on the way and a checkpoint round trip at
    ``ckpt_at`` (the resumed twin continues bit-exact with the uninterrupted one)."""
    model_t, model_g = make_model(), make_model()
    opt_t = make_torch(params_of(model_t), **_fresh(kw))
    opt_g = gx.Optimizer(params_of(model_g), make_tx(**_fresh(kw)), fused=PATHS[path])
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=10, gamma=0.5)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=10, gamma=0.5)
    torch_steps(model_t, opt_t, range(ckpt_at), sched_t)
    torch_steps(model_g, opt_g, range(ckpt_at), sched_g)
    assert set(opt_g.state[params_of(model_g)[0]]) == set(opt_t.state[params_of(model_t)[0]])
    assert all(set(opt_g.state[a]) == set(opt_t.state[b]) for a, b in zip(params_of(model_g), params_of(model_t)))
    sd, sched_sd = saved_and_loaded(opt_g.state_dict()), sched_g.state_dict()
    model_r = make_model()
    model_r.load_state_dict(model_g.state_dict())
    opt_r = gx.Optimizer(params_of(model_r), make_tx(**_fresh(kw)), fused=PATHS[path])
    opt_r.load_state_dict(sd)
    sched_r = torch.optim.lr_scheduler.StepLR(opt_r, step_size=10, gamma=0.5)
    sched_r.load_state_dict(sched_sd)
    rest = range(ckpt_at, steps)
    torch_steps(model_t, opt_t, rest, sched_t)
    torch_steps(model_g, opt_g, rest, sched_g)
    torch_steps(model_r, opt_r, rest, sched_r)
    assert_params(list(model_g.parameters()), list(model_t.parameters()), what=f"{name} vs torch")
    for a, b in zip(model_r.parameters(), model_g.parameters()):
        assert torch.equal(a, b), "the resumed twin differs from the uninterrupted one"


def _all(model):
    return list(model.parameters())


def _matrices(model):
    return [p for p in model.parameters() if p.ndim == 2]


@needs_optional_keys
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kw", ADAFACTOR, ids=_ids(ADAFACTOR))
def test_adafactor_adapter_equals_torch(kw, path):
    _adapter_run("adafactor", gx.adafactor, torch.optim.Adafactor, kw, path, _all)


def _torch_state_dict_into_twin(make_tx, make_torch, kw, params_of, steps=10):
    model_t, model_g = make_model(), make_model()
    opt_t = make_torch(params_of(model_t), **_fresh(kw))
    torch_steps(model_t, opt_t, range(steps))
    model_g.load_state_dict(model_t.state_dict())
    opt_g = gx.Optimizer(params_of(model_g), make_tx(**_fresh(kw)))
    opt_g.load_state_dict(saved_and_loaded(opt_t.state_dict()))
    torch_steps(model_t, opt_t, range(steps, 2 * steps))
    torch_steps(model_g, opt_g, range(steps, 2 * steps))
    assert_params(list(model_g.parameters()), list(model_t.parameters()), what="after loading torch's state dict")


@needs_optional_keys
def test_adafactor_torch_state_dict_loads_into_twin():
    _torch_state_dict_into_twin(gx.adafactor, torch.optim.Adafactor, {"weight_decay": 0.1}, _all)


ADAFACTOR_EPS = ADAFACTOR + [{"eps": (1e-30, 1e-2), "weight_decay": 0.1}, {"eps": (None, 0.0), "lr": 0.05}]


@needs_optional_keys
@pytest.mark.parametrize("kw", ADAFACTOR_EPS, ids=_ids(ADAFACTOR_EPS))
def test_adafactor_twin_state_dict_loads_into_torch(kw):
    """gx.Optimizer's Adafactor group keeps torch's ``eps`` pair (torch's step reads
    ``eps1, eps2 = group["eps"]``): its state dict, saved and loaded mid-run, loads into
    torch.optim.Adafactor (built with torch's defaults, so every value comes from the state dict)
    and continues equal to the twin it came from (float64); the group has every key of torch's."""
    model_g, model_t = make_model(), make_model()
    opt_g = gx.Optimizer(_all(model_g), gx.adafactor(**_fresh(kw)))
    torch_steps(model_g, opt_g, range(10))
    ref = torch.optim.Adafactor(_all(make_model()), **_fresh(kw))
    assert set(ref.param_groups[0]) <= set(opt_g.param_groups[0])  # every key torch's step reads
    assert opt_g.param_groups[0]["eps"] == tuple(kw.get("eps", (None, 1e-3)))
    model_t.load_state_dict(model_g.state_dict())
    opt_t = torch.optim.Adafactor(_all(model_t))
    opt_t.load_state_dict(saved_and_loaded(opt_g.state_dict()))
    assert opt_t.param_groups[0]["eps"] == tuple(kw.get("eps", (None, 1e-3)))
    torch_steps(model_g, opt_g, range(10, 20))
    torch_steps(model_t, opt_t, range(10, 20))
    assert_params(list(model_t.parameters()), list(model_g.parameters()), what="torch after loading gx's state dict")


@needs_optional_keys
def test_adafactor_group_eps_change_rebuilds_the_twin_as_torch():
    """Setting ``group["eps"]`` mid-run changes the rule as it does in torch.optim.Adafactor."""
    model_g, model_t = make_model(), make_model()
    opt_g = gx.Optimizer(_all(model_g), gx.adafactor(weight_decay=0.1))
    opt_t = torch.optim.Adafactor(_all(model_t), weight_decay=0.1)
    torch_steps(model_g, opt_g, range(5))
    torch_steps(model_t, opt_t, range(5))
    for opt in (opt_g, opt_t):
        opt.param_groups[0]["eps"] = (1e-20, 2.0)  # eps2 above rms(p): the relative step changes
    torch_steps(model_g, opt_g, range(5, 10))
    torch_steps(model_t, opt_t, range(5, 10))
    assert_params(list(model_g.parameters()), list(model_t.parameters()), what="after changing group eps")


def test_factored_rms_keeps_row_and_column_statistics_only():
    """A (300, 200) leaf keeps 300 + 200 numbers, and the block's output is Adafactor's
    preconditioned gradient (checked against the formula on the first step: v_hat = g^2 row/col
    means outer product over the mean row)."""
    g = torch.randn(300, 200, dtype=F64)
    tx = gx.scale_by_factored_rms()
    state = tx.init([g])
    u, state = tx.update([g], state)
    assert state.row_var[0].shape == (300, 1) and state.col_var[0].shape == (1, 200) and state.variance[0] is None
    r, c = (g * g).mean(1, keepdim=True), (g * g).mean(0, keepdim=True)
    torch.testing.assert_close(u[0], g / torch.sqrt(r @ c / r.mean()), rtol=1e-12, atol=0)


# --- Adafactor in optax's flavour ------------------------------------------------------------------


def _optax():
    jax = pytest.importorskip("jax", reason="the optax flavour is checked against optax (test-only extra)")
    jax.config.update("jax_enable_x64", True)
    return pytest.importorskip("optax", reason="the optax flavour is checked against optax 0.2.x (test-only extra)")


def _to_jax(tree: dict) -> dict:
    """torch layouts to JAX's: a Linear weight (out, in) is JAX's (in, out)."""
    import jax.numpy as jnp

    return {k: jnp.asarray((v.detach().T if k.endswith("weight") else v.detach()).numpy()) for k, v in tree.items()}


def _from_jax(tree: dict) -> dict:
    import numpy as np

    return {k: torch.from_numpy(np.array(v).T.copy() if k.endswith("weight") else np.array(v)) for k, v in tree.items()}


_OAF_SHAPES = {"big.weight": (130, 140), "big.bias": (130,), "head.weight": (3, 130), "conv": (4, 3, 5)}
OPTAX_ADAFACTOR = [
    {},
    {"learning_rate": 0.01, "momentum": 0.9, "weight_decay_rate": 1e-3, "dtype_momentum": None},
    {"min_dim_size_to_factor": 2, "decay_rate": 0.7, "clipping_threshold": 1.5, "eps": 1e-20, "learning_rate": 0.3},
    {"factored": False, "clipping_threshold": None, "multiply_by_parameter_scale": False, "learning_rate": 0.1},
]


def _optax_kwargs(kw: dict) -> dict:
    import jax.numpy as jnp

    out = dict(kw)
    if "dtype_momentum" in out:
        out["dtype_momentum"] = jnp.float64 if out["dtype_momentum"] is None else out["dtype_momentum"]
    return out


@pytest.mark.parametrize("kw", OPTAX_ADAFACTOR, ids=_ids(OPTAX_ADAFACTOR))
def test_optax_adafactor_equals_optax_over_100_float64_steps(kw):
    """gx.optax_adafactor vs optax.adafactor (0.2.8) on torch layouts mapped to JAX's: a factored
    (130, 140) weight and a (3, 130) one (factored only when min_dim_size_to_factor allows), a
    bias and a 3-D tensor; 100 steps of our own gradients, float64."""
    optax = _optax()
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g, dtype=F64) for k, s in _OAF_SHAPES.items()}
    tx, ox = gx.optax_adafactor(**kw), optax.adafactor(**_optax_kwargs(kw))
    pj = _to_jax(params)
    state, state_j = tx.init(params), ox.init(pj)
    for k in range(100):
        grads = {n: torch.randn(v.shape, generator=g, dtype=F64) * (1 + k % 3) for n, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
        updates_j, state_j = ox.update(_to_jax(grads), state_j, pj)
        pj = optax.apply_updates(pj, updates_j)
    want = _from_jax(pj)
    for n in params:
        torch.testing.assert_close(params[n], want[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_optax_scale_by_factored_rms_block_equals_optax():
    """The block alone (optax.scale_by_factored_rms): the preconditioned updates, step by step,
    with a step offset; a factored matrix keeps only its row and column statistics."""
    optax = _optax()
    g = torch.Generator().manual_seed(2)
    params = {"w.weight": torch.randn(5, 7, generator=g, dtype=F64), "b": torch.randn(7, generator=g, dtype=F64)}
    tx = gx.optax_scale_by_factored_rms(decay_rate=0.6, step_offset=0, min_dim_size_to_factor=3, epsilon=1e-12)
    ox = optax.scale_by_factored_rms(decay_rate=0.6, step_offset=0, min_dim_size_to_factor=3, epsilon=1e-12)
    state, state_j = tx.init(params), ox.init(_to_jax(params))
    assert state.v_row["w.weight"].numel() + state.v_col["w.weight"].numel() == 5 + 7 and state.v["w.weight"] is None
    for _ in range(100):
        grads = {n: torch.randn(v.shape, generator=g, dtype=F64) for n, v in params.items()}
        updates, state = tx.update(grads, state, params)
        updates_j, state_j = ox.update(_to_jax(grads), state_j, _to_jax(params))
        want = _from_jax(updates_j)
        for n in params:
            torch.testing.assert_close(updates[n], want[n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("path", PATHS)
def test_optax_adafactor_adapter_with_scheduler_and_checkpoint_equals_optax(path):
    """Through gx.Optimizer with a StepLR (optax: the same schedule of its count) over 100 steps,
    with a checkpoint round trip mid-run that continues bit-exact."""
    optax = _optax()
    kw = {"learning_rate": 0.05, "min_dim_size_to_factor": 2, "momentum": 0.5, "dtype_momentum": None}
    model_g = make_model()
    names = [n for n, _ in model_g.named_parameters()]
    pj = _to_jax(dict(make_model().named_parameters()))
    ox = optax.adafactor(**_optax_kwargs({**kw, "learning_rate": lambda c: 0.05 * 0.5 ** (c // 10)}))
    state_j = ox.init(pj)
    opt_g = gx.Optimizer(model_g.parameters(), gx.optax_adafactor(**kw), fused=PATHS[path])
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=10, gamma=0.5)
    model_r = opt_r = sched_r = None
    for k in range(100):
        current = _from_jax(pj)
        grads = grads_at(model_g, names, [current[n] for n in names], k)
        updates_j, state_j = ox.update(_to_jax(dict(zip(names, grads))), state_j, pj)
        pj = optax.apply_updates(pj, updates_j)
        runs = [(model_g, opt_g, sched_g)] + ([(model_r, opt_r, sched_r)] if model_r is not None else [])
        for model, opt, sched in runs:
            torch_steps(model, opt, range(k, k + 1), sched)
        if k == 39:
            model_r = make_model()
            model_r.load_state_dict(model_g.state_dict())
            opt_r = gx.Optimizer(model_r.parameters(), gx.optax_adafactor(**kw), fused=PATHS[path])
            opt_r.load_state_dict(saved_and_loaded(opt_g.state_dict()))
            sched_r = torch.optim.lr_scheduler.StepLR(opt_r, step_size=10, gamma=0.5)
            sched_r.load_state_dict(sched_g.state_dict())
    want = _from_jax(pj)
    assert_params(list(model_g.parameters()), [want[n] for n in names], what="optax_adafactor vs optax")
    for a, b in zip(model_r.parameters(), model_g.parameters()):
        assert torch.equal(a, b), "the resumed twin differs from the uninterrupted one"


# --- Muon ---------------------------------------------------------------------------------------

MUON = _db("Muon")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kw", MUON, ids=_ids(MUON))
def test_muon_functional_equals_torch(kw, dtype):
    names = [n for n, p in make_model().named_parameters() if p.ndim == 2]
    model_t = make_model(dtype)
    opt_t = torch.optim.Muon(_matrices(model_t), **_fresh(kw))
    torch_steps(model_t, opt_t, range(40))
    got = run_functional(gx.muon(**_fresh(kw)), make_model(dtype), names, 40)
    assert_params(got, _matrices(model_t), dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kw", MUON, ids=_ids(MUON))
def test_muon_adapter_equals_torch(kw, path):
    _adapter_run("muon", gx.muon, torch.optim.Muon, kw, path, _matrices)


def test_muon_torch_state_dict_loads_into_twin():
    _torch_state_dict_into_twin(gx.muon, torch.optim.Muon, {"momentum": 0.8}, _matrices)


def _muon_recipe_torch(model):
    return [torch.optim.Muon(_matrices(model), lr=0.02),
            torch.optim.AdamW([p for p in model.parameters() if p.ndim != 2], lr=3e-3)]


def test_muon_partition_recipe_equals_torch_muon_plus_adamw():
    """The documented recipe: 2-D params to Muon, the rest to AdamW, functionally with
    gx.partition and through gx.Optimizer param groups with their own "tx"."""
    model_t = make_model()
    opts = _muon_recipe_torch(model_t)
    for k in range(30):
        for o in opts:
            o.zero_grad()
        loss_of(model_t, k).backward()
        for o in opts:
            o.step()
    names = [n for n, _ in make_model().named_parameters()]
    labels = lambda params: gx.tree.tree_map(lambda p: "muon" if p.ndim == 2 else "adamw", params)  # noqa: E731
    tx = gx.partition({"muon": gx.muon(0.02), "adamw": gx.adamw(3e-3)}, labels)
    assert_params(run_functional(tx, make_model(), names, 30), list(model_t.parameters()), what="partition")
    model_g = make_model()
    opt_g = gx.Optimizer([{"params": _matrices(model_g), "tx": gx.muon(0.02)},
                          {"params": [p for p in model_g.parameters() if p.ndim != 2], "tx": gx.adamw(3e-3)}],
                         gx.identity())
    torch_steps(model_g, opt_g, range(30))
    assert_params(list(model_g.parameters()), list(model_t.parameters()), what="param groups")


def test_orthogonalize_via_newton_schulz_orthogonalises():
    """In float64 with more steps the singular values land in torch's documented band
    (about [0.5, 1.5]) and the singular vectors are those of the input."""
    x = torch.randn(8, 5, dtype=F64)
    o = gx.orthogonalize_via_newton_schulz(x, ns_steps=10, dtype=None)
    s = torch.linalg.svdvals(o)
    assert o.shape == x.shape and bool((s > 0.5).all() and (s < 1.5).all())
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(u.T @ o @ vh.T, torch.diag(torch.diagonal(u.T @ o @ vh.T)), atol=1e-8, rtol=0)


def test_muon_rejects_non_matrix_params_with_the_recipe():
    with pytest.raises(ValueError, match=r"2-D params only; '1' has shape \(3,\).*partition"):
        gx.muon().init([torch.zeros(2, 2), torch.zeros(3)])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        gx.muon(adjust_lr_fn="sqrt")


# --- L-BFGS -------------------------------------------------------------------------------------

LBFGS = _db("LBFGS") + [{"history_size": 3, "max_iter": 7, "line_search_fn": "strong_wolfe"},
                        {"max_iter": 1}, {"max_eval": 4, "line_search_fn": "strong_wolfe"}]

_gen = torch.Generator().manual_seed(3)
_XL = torch.randn(40, 6, generator=_gen, dtype=F64)
_YL = (torch.rand(40, generator=_gen, dtype=F64) > 0.5).to(F64)
_A = torch.randn(6, 6, generator=_gen, dtype=F64)
_Q = _A @ _A.T + 0.5 * torch.eye(6, dtype=F64)
_B = torch.randn(6, generator=_gen, dtype=F64)


def _logistic(w, b):
    return nn.functional.binary_cross_entropy_with_logits(_XL @ w + b, _YL) + 1e-2 * (w * w).sum()


def _quadratic(w, b):
    return 0.5 * w @ _Q @ w - _B @ w + ((b - 1.0) ** 2).sum()


@pytest.mark.parametrize("objective", [_quadratic, _logistic], ids=["quadratic", "logistic"])
@pytest.mark.parametrize("kw", LBFGS, ids=_ids(LBFGS))
def test_lbfgs_equals_torch_functional_and_adapter(kw, objective):
    init = [torch.full((6,), 0.1, dtype=F64), torch.full((1,), 0.3, dtype=F64)]
    pt = [p.clone().requires_grad_() for p in init]
    opt_t = torch.optim.LBFGS(pt, **_fresh(kw))

    def closure_t():
        opt_t.zero_grad()
        loss = objective(*pt)
        loss.backward()
        return loss

    def value_and_grad(ps):
        leaves = [p.detach().requires_grad_() for p in ps]
        loss = objective(*leaves)
        return loss.detach(), list(torch.autograd.grad(loss, leaves))

    tx = gx.lbfgs(**_fresh(kw))
    params = [p.clone() for p in init]
    state = tx.init(params)
    pa = [p.clone().requires_grad_() for p in init]
    opt_a = gx.Optimizer(pa, gx.lbfgs(**_fresh(kw)))

    def closure_a():
        opt_a.zero_grad()
        loss = objective(*pa)
        loss.backward()
        return loss

    for _ in range(3):
        opt_t.step(closure_t)
        value, grads = value_and_grad(params)
        updates, state = tx.update(grads, state, params, value=value, value_and_grad_fn=value_and_grad)
        params = gx.apply_updates(params, updates)
        opt_a.step(closure_a, value_and_grad_fn=gx.value_and_grad_from_closure(pa, closure_a))
        # 1e-10 of the largest entry: the functional path adds x_new - x to x, which rounds where
        # torch moves its params in place; near the optimum L-BFGS amplifies such an ulp
        scale = max(float(p.abs().max()) for p in pt)
        for got in (params, pa):
            for a, b in zip(got, pt):
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-10 * scale)
    inner = state.inner_state
    assert int(inner.func_evals) == opt_t.state[pt[0]]["func_evals"]
    assert int(inner.n_iter) == opt_t.state[pt[0]]["n_iter"]


LBFGS_RESUME = [{"history_size": 3, "max_iter": 4}, {"history_size": 3, "max_iter": 5, "line_search_fn": "strong_wolfe"},
                {"history_size": 2, "max_iter": 1}]


def _lbfgs_opt(kind, params, kw):
    """(optimizer, step()) for torch.optim.LBFGS or its gx twin on `_logistic` over ``params``."""
    opt = torch.optim.LBFGS(params, **kw) if kind == "torch" else gx.Optimizer(params, gx.lbfgs(**kw))

    def closure():
        opt.zero_grad()
        loss = _logistic(*params)
        loss.backward()
        return loss

    if kind == "torch":
        return opt, lambda: opt.step(closure)
    return opt, lambda: opt.step(closure, value_and_grad_fn=gx.value_and_grad_from_closure(params, closure))


@pytest.mark.parametrize("kw", LBFGS_RESUME, ids=_ids(LBFGS_RESUME))
def test_lbfgs_state_dicts_load_both_ways_mid_run_and_continue_equal(kw):
    """gx.Optimizer keeps L-BFGS's state as torch does (opt.state[params[0]], torch's keys, the
    history as lists): mid-run (the history wrapped past history_size), a torch.optim.LBFGS state
    dict loads into the gx twin and gx's into torch.optim.LBFGS, each continuing equal to the
    optimizer it came from (float64); gx's own checkpoint resumes bit-exact."""
    init = [torch.full((6,), 0.1, dtype=F64), torch.full((1,), 0.3, dtype=F64)]
    pt, pg = ([p.clone().requires_grad_() for p in init] for _ in range(2))
    opt_t, step_t = _lbfgs_opt("torch", pt, kw)
    opt_g, step_g = _lbfgs_opt("gx", pg, kw)
    for _ in range(4):
        step_t()
        step_g()
        assert set(opt_g.state[pg[0]]) == set(opt_t.state[pt[0]])
        assert pg[1] not in opt_g.state and pt[1] not in opt_t.state
    st, sg = opt_t.state[pt[0]], opt_g.state[pg[0]]
    assert len(st["old_dirs"]) == kw["history_size"] and st["n_iter"] > kw["history_size"] + 1  # wrapped
    assert (sg["func_evals"], sg["n_iter"], len(sg["old_dirs"])) == (st["func_evals"], st["n_iter"], len(st["old_dirs"]))
    assert isinstance(sg["old_dirs"], list) and isinstance(sg["n_iter"], int)
    twins = {}
    for name, kind, src in (("gx<-torch", "gx", (pt, opt_t)), ("torch<-gx", "torch", (pg, opt_g)),
                            ("gx<-gx", "gx", (pg, opt_g))):
        ps = [p.detach().clone().requires_grad_() for p in src[0]]
        opt, step = _lbfgs_opt(kind, ps, kw)
        opt.load_state_dict(saved_and_loaded(src[1].state_dict()))
        twins[name] = (ps, step)
    for _ in range(3):
        for step in (step_t, step_g, *(s for _, s in twins.values())):
            step()
    scale = max(float(p.detach().abs().max()) for p in pt)
    for got, want in ((twins["gx<-torch"][0], pt), (twins["torch<-gx"][0], pg), (pg, pt)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-10 * scale)
    for a, b in zip(twins["gx<-gx"][0], pg):
        assert torch.equal(a, b), "the resumed gx twin differs from the uninterrupted one"


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_moves_a_param_without_a_gradient_as_torch(line_search_fn):
    """torch.optim.LBFGS reads a missing ``.grad`` as zeros and moves every param along the flat
    direction: a param that gets a gradient on even steps only (none on odd ones) moves on the
    odd steps too (the history carries its curvature), and one that never gets a gradient stays.
    The gx twin through gx.Optimizer equals torch to 1e-10 over 20 steps (float64)."""
    kw = dict(max_iter=5, history_size=4, line_search_fn=line_search_fn)

    def run(kind):
        w = torch.full((6,), 0.1, dtype=F64, requires_grad=True)
        b = torch.full((2,), 0.3, dtype=F64, requires_grad=True)  # a gradient on even steps only
        c = torch.full((3,), 0.7, dtype=F64, requires_grad=True)  # never a gradient
        ps = [b, w, c]  # params[0] (where the state lives) without a gradient on odd steps
        opt = torch.optim.LBFGS(ps, **kw) if kind == "torch" else gx.Optimizer(ps, gx.lbfgs(**kw))
        moved_without_grad = []
        for k in range(20):
            def closure(k=k):
                opt.zero_grad()
                loss = _quadratic(w, b[:1]) if k % 2 == 0 else 0.5 * w @ _Q @ w - _B @ w
                loss.backward()
                return loss

            before = b.detach().clone()
            if kind == "torch":
                opt.step(closure)
            else:
                opt.step(closure, value_and_grad_fn=gx.value_and_grad_from_closure(ps, closure))
            if k % 2 == 1:
                assert b.grad is None
                moved_without_grad.append(not torch.equal(before, b.detach()))
        return [p.detach() for p in ps], moved_without_grad, opt.state[ps[0]]

    (pt, moved_t, st), (pg, moved_g, sg) = run("torch"), run("gx")
    assert any(moved_t), "the case must exercise torch moving a param without a gradient"
    assert moved_g == moved_t
    for a, b in zip(pg, pt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(pg[2], torch.full((3,), 0.7, dtype=F64))
    assert (sg["func_evals"], sg["n_iter"]) == (st["func_evals"], st["n_iter"])


def test_lbfgs_counts_a_step_without_any_gradient_as_torch():
    """No param has a gradient: torch still evaluates the closure and counts it (func_evals) and
    leaves the params; so does the twin."""
    states = []
    for kind in ("torch", "gx"):
        w = torch.ones(3, dtype=F64, requires_grad=True)
        opt = torch.optim.LBFGS([w]) if kind == "torch" else gx.Optimizer([w], gx.lbfgs())

        def closure(opt=opt):
            opt.zero_grad()
            return torch.tensor(1.0, dtype=F64)

        for _ in range(2):
            if kind == "torch":
                opt.step(closure)
            else:
                opt.step(closure, value_and_grad_fn=gx.value_and_grad_from_closure([w], closure))
        assert torch.equal(w.detach(), torch.ones(3, dtype=F64))
        states.append((opt.state[w]["func_evals"], opt.state[w]["n_iter"]))
    assert states[0] == states[1] == (2, 0)


def test_lbfgs_refuses_a_longer_history_than_it_keeps():
    p = [torch.full((6,), 0.5, dtype=F64, requires_grad=True)]
    opt_t, step_t = _lbfgs_opt("torch", [p[0], torch.zeros(1, dtype=F64, requires_grad=True)], {"history_size": 5})
    step_t()
    step_t()
    q = [p[0].detach().clone().requires_grad_(), torch.zeros(1, dtype=F64, requires_grad=True)]
    opt_g, _ = _lbfgs_opt("gx", q, {"history_size": 1})
    with pytest.raises(ValueError, match="history_size=1"):
        opt_g.load_state_dict(opt_t.state_dict())


def test_lbfgs_asks_for_the_loss_function_where_it_needs_it():
    tx = gx.lbfgs()
    params = [torch.zeros(3)]
    with pytest.raises(TypeError, match="value_and_grad_fn"):
        tx.update([torch.ones(3)], tx.init(params), params, value=1.0)
    with pytest.raises(ValueError, match="line_search_fn"):
        gx.lbfgs(line_search_fn="armijo")
    # max_iter=1 without a line search needs only the gradient (one step, as torch's first)
    one = gx.lbfgs(lr=0.5, max_iter=1)
    u, _ = one.update([torch.ones(3)], one.init(params), params)
    torch.testing.assert_close(u[0], torch.full((3,), -0.5 / 3))


# --- SparseAdam ---------------------------------------------------------------------------------

SPARSE_ADAM = _db("SparseAdam")


@pytest.mark.parametrize("kw", SPARSE_ADAM, ids=_ids(SPARSE_ADAM))
def test_sparse_adam_functional_equals_torch_on_embedding_grads(kw):
    g = torch.Generator().manual_seed(1)
    emb_t = nn.Embedding(12, 3, sparse=True).to(F64)
    weight = emb_t.weight.detach().clone()
    opt_t = torch.optim.SparseAdam(emb_t.parameters(), **_fresh(kw))
    tx = gx.sparse_adam(**_fresh(kw))
    state = tx.init([weight])
    for k in range(30):
        idx = torch.randint(0, 12, (5,), generator=g)
        opt_t.zero_grad()
        (emb_t(idx) ** 2).sum().mul(k % 3 + 1).backward()
        grad = emb_t.weight.grad.clone()
        opt_t.step()
        updates, state = tx.update([grad], state, [weight])
        assert updates[0].is_sparse
        weight = gx.apply_updates([weight], updates)[0]
    torch.testing.assert_close(weight, emb_t.weight.detach(), rtol=1e-10, atol=1e-12)
    assert int(state.inner_state.count[0]) == opt_t.state[emb_t.weight]["step"]


def test_sparse_adam_dense_gradient_is_every_entry_present():
    """A dense gradient (no zero entries) gives torch's SparseAdam step on its sparse copy."""
    w = torch.randn(4, 3, dtype=F64)
    p = nn.Parameter(w.clone())
    opt_t = torch.optim.SparseAdam([p], lr=0.1)
    tx = gx.sparse_adam(0.1)
    state = tx.init([w])
    for _ in range(5):
        grad = torch.randn(4, 3, dtype=F64)
        p.grad = grad.to_sparse()
        opt_t.step()
        u, state = tx.update([grad], state, [w])
        w = w + u[0]
    torch.testing.assert_close(w, p.detach(), rtol=1e-12, atol=1e-14)


class _Bag(nn.Module):
    """Two sparse embedding tables (SparseAdam's use: rows touched by a batch)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Embedding(12, 3, sparse=True).to(F64)
        self.b = nn.Embedding(7, 2, sparse=True).to(F64)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(12, 3, generator=g, dtype=F64))
            self.b.weight.copy_(torch.randn(7, 2, generator=g, dtype=F64))

    def loss(self, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + k)
        ia, ib = torch.randint(0, 12, (5,), generator=g), torch.randint(0, 7, (3,), generator=g)
        return (self.a(ia) ** 2).sum() * (k % 3 + 1) + (self.b(ib) - 0.5).pow(2).sum()


def _bag_steps(bag: _Bag, opt, steps: range, sched=None) -> None:
    for k in steps:
        opt.zero_grad()
        bag.loss(k).backward()
        assert bag.a.weight.grad.is_sparse
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("kw", SPARSE_ADAM, ids=_ids(SPARSE_ADAM))
def test_sparse_adam_adapter_equals_torch_with_scheduler_and_checkpoint(kw):
    """gx.Optimizer takes the COO gradients of nn.Embedding(sparse=True) without densifying them:
    equal to torch.optim.SparseAdam over 30 steps with a StepLR, torch's state keys, and a
    checkpoint round trip mid-run that continues bit-exact."""
    bag_t, bag_g = _Bag(), _Bag()
    opt_t = torch.optim.SparseAdam(bag_t.parameters(), **_fresh(kw))
    opt_g = gx.Optimizer(bag_g.parameters(), gx.sparse_adam(**_fresh(kw)))
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=10, gamma=0.5)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=10, gamma=0.5)
    _bag_steps(bag_t, opt_t, range(15), sched_t)
    _bag_steps(bag_g, opt_g, range(15), sched_g)
    for pg, pt in zip(bag_g.parameters(), bag_t.parameters()):
        assert set(opt_g.state[pg]) == set(opt_t.state[pt]) == {"step", "exp_avg", "exp_avg_sq"}
        assert isinstance(opt_g.state[pg]["step"], int)  # as torch.optim.SparseAdam
        assert int(opt_g.state[pg]["step"]) == opt_t.state[pt]["step"] == 15
    sd, sched_sd = saved_and_loaded(opt_g.state_dict()), sched_g.state_dict()
    bag_r = _Bag()
    bag_r.load_state_dict(bag_g.state_dict())
    opt_r = gx.Optimizer(bag_r.parameters(), gx.sparse_adam(**_fresh(kw)))
    opt_r.load_state_dict(sd)
    sched_r = torch.optim.lr_scheduler.StepLR(opt_r, step_size=10, gamma=0.5)
    sched_r.load_state_dict(sched_sd)
    for bag, opt, sched in ((bag_t, opt_t, sched_t), (bag_g, opt_g, sched_g), (bag_r, opt_r, sched_r)):
        _bag_steps(bag, opt, range(15, 30), sched)
    for pg, pt, pr in zip(bag_g.parameters(), bag_t.parameters(), bag_r.parameters()):
        torch.testing.assert_close(pg.detach(), pt.detach(), rtol=1e-10, atol=1e-12)
        assert torch.equal(pr, pg), "the resumed twin differs from the uninterrupted one"


def test_sparse_adam_state_dicts_load_both_ways_and_continue_equal():
    """A torch.optim.SparseAdam state dict loads into the gx twin and the gx twin's into
    torch.optim.SparseAdam; each continues equal to the optimizer it came from."""
    bag_t, bag_g = _Bag(), _Bag()
    opt_t = torch.optim.SparseAdam(bag_t.parameters(), lr=0.05, betas=(0.8, 0.99))
    opt_g = gx.Optimizer(bag_g.parameters(), gx.sparse_adam(0.05, betas=(0.8, 0.99)))
    _bag_steps(bag_t, opt_t, range(10))
    _bag_steps(bag_g, opt_g, range(10))
    bag_gt, bag_tg = _Bag(), _Bag()  # gx twin from torch's dict, torch from gx's
    bag_gt.load_state_dict(bag_t.state_dict())
    bag_tg.load_state_dict(bag_g.state_dict())
    opt_gt = gx.Optimizer(bag_gt.parameters(), gx.sparse_adam(0.05, betas=(0.8, 0.99)))
    opt_gt.load_state_dict(saved_and_loaded(opt_t.state_dict()))
    opt_tg = torch.optim.SparseAdam(bag_tg.parameters(), lr=0.05, betas=(0.8, 0.99))
    opt_tg.load_state_dict(saved_and_loaded(opt_g.state_dict()))
    for bag, opt in ((bag_t, opt_t), (bag_g, opt_g), (bag_gt, opt_gt), (bag_tg, opt_tg)):
        _bag_steps(bag, opt, range(10, 20))
    for a, b in ((bag_gt, bag_t), (bag_tg, bag_g), (bag_g, bag_t)):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-10, atol=1e-12)


def test_sparse_gradients_inside_a_chain_raise_pointing_to_the_alternatives():
    """Only the whole group transform may take COO gradients: a clip before gx.sparse_adam would
    receive them, so the adapter raises naming the alternatives."""
    emb = nn.Embedding(5, 2, sparse=True)
    opt = gx.Optimizer(emb.parameters(), gx.chain(gx.clip_by_global_norm(1.0), gx.sparse_adam()))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradient.*gx.sparse_adam.*nn.Embedding\(sparse=False\)"):
        opt.step()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: gx.adafactor(d=0.5), "d"),
    (lambda: gx.adafactor(beta2_decay=0.5), "beta2_decay"),
    (lambda: gx.adafactor(eps=1e-3), "eps"),
    (lambda: gx.adafactor(lr=-1.0), "lr"),
    (lambda: gx.muon(momentum=-0.1), "momentum"),
    (lambda: gx.scale_by_muon(ns_steps=100), "ns_steps"),
    (lambda: gx.lbfgs(max_iter=0), "max_iter"),
    (lambda: gx.sparse_adam(eps=0.0), "eps"),
    (lambda: gx.sparse_adam(betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda: gx.optax_adafactor(clipping_threshold=0.5), "clipping_threshold"),
    (lambda: gx.optax_adafactor(min_dim_size_to_factor=0), "min_dim_size_to_factor"),
    (lambda: gx.optax_adafactor(momentum=1.5), "momentum"),
    (lambda: gx.optax_scale_by_factored_rms(decay_rate=-0.8), "decay_rate"),
])
def test_bad_arguments_name_the_culprit(make, match):
    with pytest.raises(ValueError, match=match):
        make()
