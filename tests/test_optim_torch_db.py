"""``gradxform.Optimizer`` against ``torch.optim`` over torch's own optimizer database.

An OptimizerInfo-style harness: the configurations come from
``torch.testing._internal.common_optimizers.optim_db`` (shipped with torch), the entries for
``SGD``, ``Adam`` and ``AdamW`` on CPU. Each configuration's kwargs build the torch optimizer and
its gradxform twin (``gx.sgd`` / ``gx.adam`` / ``gx.adamw`` with the same kwargs; torch's
implementation switches ``foreach`` / ``fused`` / ``capturable`` / ``differentiable`` go to the
adapter as per-group keys), and every test runs each implementation of the adapter:

- ``generic``: ``gx.Optimizer(..., fused=False)``, the transform's own ``update``;
- ``fast``: ``gx.Optimizer(..., fused=None)`` (the default), which may take a fused kernel.

Values are compared with torch's: params and the per-param state ``opt.state[p]`` under torch's
key names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``).
float64 runs agree to ``atol=1e-12`` (the implementations order a few float operations
differently), float32 runs to ``atol=1e-5``; anything that only reloads or copies gradxform's
own state (resume, deepcopy, pickle, DCP round trips) must continue bit for bit.

Also here: state-dict round trips with torch's four state-dict hooks and both step hooks,
torch.optim <-> gradxform checkpoints in both directions, param-group add / reorder,
non-contiguous and complex params, tensor learning rates, per-group ``maximize``, closures,
``zero_grad``, ``copy.deepcopy``, pickling, sparse gradients (SGD), dtype casting on load, DCP's
``get/set_optimizer_state_dict`` (plain and flattened), and ``ZeroRedundancyOptimizer`` on two
gloo ranks with a checkpoint round trip.
"""

from __future__ import annotations

import copy
import inspect
import io
import multiprocessing
import pickle
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradxform as gx

try:  # torch.testing._internal imports expecttest, a test-only dependency of torch
    if multiprocessing.parent_process() is not None:
        optim_db = []  # a spawned gloo rank (ZeRO below) needs no database: skip the slow import
    else:
        from torch.testing._internal.common_optimizers import optim_db
except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"torch's optimizer database (torch.testing._internal.common_optimizers) cannot be imported ({err}); "
                "install the test extra 'expecttest' (pip install expecttest)", allow_module_level=True)

F64, F32 = torch.float64, torch.float32
STEPS = 20
TOL = {F64: dict(atol=1e-12, rtol=1e-10), F32: dict(atol=1e-5, rtol=1e-4)}
TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
ALIAS = {"SGD": gx.sgd, "Adam": gx.adam, "AdamW": gx.adamw}
# torch's implementation switches: not hyperparameters of the update rule, so not arguments of
# the alias; the adapter takes them as per-group keys, as torch does
IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")
PATHS = {"generic": False, "fast": None}
# one configuration per optimizer for the tests that are not about the configuration
REPRESENTATIVE = {
    "SGD": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "Adam": {"weight_decay": 0.1, "amsgrad": True},
    "AdamW": {"weight_decay": 0.1},
}
NAMES = list(TORCH)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: run single-threaded (intra-op threads only add overhead) and restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the database ----------------------------------------------------------------------------------


def _db_configs() -> list[Any]:
    out = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in TORCH:
            continue
        for oi in info.optim_inputs_func(device="cpu"):
            assert oi.params is None, f"{name} '{oi.desc}': params given by the database are not handled here"
            out.append(pytest.param(name, oi.kwargs, id=f"{name}-{oi.desc.replace(' ', '_')}"))
    return out


DB = _db_configs()


def test_database_lists_the_three_optimizers_with_a_tensor_lr():
    """The harness below must not silently run on nothing: torch's db holds all three, and the
    tensor-lr configuration (SGD on CPU) is among them."""
    names = {p.values[0] for p in DB}
    assert names == set(TORCH)
    assert any(isinstance(p.values[1].get("lr"), torch.Tensor) for p in DB)


def fresh(kw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config's kwargs (tensor values cloned: they are shared between tests)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in kw.items()}


def split_kwargs(name: str, kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(alias kwargs, per-group implementation keys); an unknown key fails loudly."""
    accepted = set(inspect.signature(ALIAS[name]).parameters)
    tx_kw, group_kw = {}, {}
    for k, v in kw.items():
        if k in IMPL_KEYS:
            group_kw[k] = v
        elif k in accepted:
            tx_kw[k] = v
        else:
            raise AssertionError(f"torch's db passes {k}={v!r} to {name}; gx.{ALIAS[name].__name__} takes no such argument")
    return tx_kw, group_kw


def make_gx(name: str, params: Any, kw: dict[str, Any], path: str) -> gx.Optimizer:
    tx_kw, group_kw = split_kwargs(name, kw)
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, **group_kw} for g in params]
    else:
        groups = [{"params": params, **group_kw}]
    return gx.Optimizer(groups, ALIAS[name](**tx_kw), fused=PATHS[path])


def make_torch(name: str, params: Any, kw: dict[str, Any]) -> torch.optim.Optimizer:
    return TORCH[name](params, **kw)


# --- model, data, comparisons --------------------------------------------------------------------------


def make_model(dtype: torch.dtype = F64, seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return model


_G = torch.Generator().manual_seed(7)
_X = torch.randn(4, 8, 6, generator=_G, dtype=F64)
_Y = torch.randn(4, 8, 3, generator=_G, dtype=F64)


def loss_of(model: nn.Module, k: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    x, y = _X[k % 4].to(dtype), _Y[k % 4].to(dtype)
    return (model(x) - y).pow(2).mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for k in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, k).backward()
        opt.step()


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, exact: bool = False, **tol: Any) -> None:
    if actual.is_sparse or expected.is_sparse:
        actual, expected = actual.to_dense(), expected.to_dense()
    if exact:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), f"{what} differs"
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


def assert_param_state(pg: torch.Tensor, pt: torch.Tensor, opt_g: torch.optim.Optimizer, opt_t: torch.optim.Optimizer,
                       what: str, exact: bool = False, **tol: Any) -> None:
    """One param and its ``opt.state[p]`` equal (same keys as torch, values compared)."""
    close(pg.detach(), pt.detach(), f"{what}: param", exact, **tol)
    st, sg = opt_t.state.get(pt, {}), opt_g.state.get(pg, {})
    assert set(sg) == set(st), f"{what}: opt.state[p] has keys {sorted(sg)}; torch's has {sorted(st)}"
    for key, want in st.items():
        got = sg[key]
        if want is None or got is None:
            assert got is None and want is None, f"{what}: state '{key}' is {got!r}, torch's {want!r}"
        elif key == "step":
            assert float(got) == float(want), f"{what}: step {float(got)} != torch's {float(want)}"
        else:
            close(got, want, f"{what}: state '{key}'", exact, **tol)


def assert_same(model_g: nn.Module, opt_g: torch.optim.Optimizer, model_t: nn.Module, opt_t: torch.optim.Optimizer,
                exact: bool = False, **tol: Any) -> None:
    for (name, pt), pg in zip(model_t.named_parameters(), model_g.parameters()):
        assert_param_state(pg, pt, opt_g, opt_t, name, exact, **tol)


def assert_tree_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors equal bit for bit (tensors: dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def saved_and_loaded(sd: dict[str, Any]) -> dict[str, Any]:
    """Through ``torch.save`` / ``torch.load(weights_only=True)``: a checkpoint holds data only."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- every db configuration, each implementation, against torch.optim ---------------------------------


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,kw", DB)
def test_db_config_matches_torch(name, kw, path, dtype):
    model_t = make_model(dtype)
    model_g = copy.deepcopy(model_t)
    opt_t = make_torch(name, model_t.parameters(), fresh(kw))
    opt_g = make_gx(name, model_g.parameters(), fresh(kw), path)
    for k in range(STEPS):
        for model, opt in ((model_t, opt_t), (model_g, opt_g)):
            opt.zero_grad()
            loss_of(model, k).backward()
            opt.step()
        if k == 0:  # the first step separately: a wrong init shows here undamped
            assert_same(model_g, opt_g, model_t, opt_t, **TOL[dtype])
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[dtype])


def _impl_cases() -> list[Any]:
    out = []
    for name in NAMES:
        accepted = set(inspect.signature(TORCH[name]).parameters)
        for impl in ({"foreach": False}, {"foreach": True}, {"fused": True}, {"differentiable": False},
                     {"capturable": False}):
            if set(impl) <= accepted:
                out.append(pytest.param(name, impl, id=f"{name}-" + "-".join(f"{k}={v}" for k, v in impl.items())))
    return out


@pytest.mark.parametrize("name,impl", _impl_cases())
def test_torch_impl_switches_are_accepted_per_group(name, impl):
    """``foreach`` / ``fused`` / ``capturable`` / ``differentiable`` as torch's group keys (the
    constructor left at its default, so the group key is what selects): the adapter accepts them
    (same kwargs as the torch twin) and the values stay torch's."""
    path = "fast"
    kw = {**REPRESENTATIVE[name], **impl}
    model_t = make_model()
    model_g = copy.deepcopy(model_t)
    opt_t = make_torch(name, model_t.parameters(), dict(kw))
    opt_g = make_gx(name, model_g.parameters(), dict(kw), path)
    train(model_t, opt_t, 8)
    train(model_g, opt_g, 8)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


# --- state dicts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,kw", DB)
def test_state_dict_round_trip_resumes_bit_for_bit(name, kw, path):
    """Save mid-run (through torch.save / torch.load(weights_only=True)), load into a fresh
    optimizer on equal but distinct params, continue: bit for bit the uninterrupted run. The
    state dict is deterministic (the reloaded optimizer's equals the saved one) and loading it
    does not change it."""
    model_a = make_model()
    model_b = copy.deepcopy(model_a)
    opt_a = make_gx(name, model_a.parameters(), fresh(kw), path)
    train(model_a, opt_a, STEPS)  # uninterrupted
    opt_b = make_gx(name, model_b.parameters(), fresh(kw), path)
    train(model_b, opt_b, STEPS // 2)
    sd = saved_and_loaded(opt_b.state_dict())
    sd_copy = copy.deepcopy(sd)
    model_c = copy.deepcopy(model_b)
    opt_c = make_gx(name, model_c.parameters(), fresh(kw), path)
    opt_c.load_state_dict(sd)
    assert_tree_equal(sd, sd_copy, "the loaded state dict (changed by load_state_dict)")
    assert_tree_equal(opt_c.state_dict(), opt_b.state_dict(), "state_dict after load")
    train(model_c, opt_c, STEPS - STEPS // 2, start=STEPS // 2)
    assert_same(model_c, opt_c, model_a, opt_a, exact=True)
    assert_tree_equal(opt_c.state_dict(), opt_a.state_dict(), "state_dict at the end")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_torch_state_dict_loads_into_gradxform_and_continues(name, path):
    kw = REPRESENTATIVE[name]
    model_t = make_model()
    opt_t = make_torch(name, model_t.parameters(), dict(kw))
    train(model_t, opt_t, 10)
    model_g = copy.deepcopy(model_t)
    opt_g = make_gx(name, model_g.parameters(), dict(kw), path)
    opt_g.load_state_dict(saved_and_loaded(opt_t.state_dict()))
    assert_same(model_g, opt_g, model_t, opt_t, exact=True)  # loaded as is
    train(model_t, opt_t, 10, start=10)
    train(model_g, opt_g, 10, start=10)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_gradxform_state_dict_loads_into_torch_and_continues(name, path):
    kw = REPRESENTATIVE[name]
    model_g = make_model()
    opt_g = make_gx(name, model_g.parameters(), dict(kw), path)
    train(model_g, opt_g, 10)
    model_t = copy.deepcopy(model_g)
    opt_t = make_torch(name, model_t.parameters(), dict(kw))
    opt_t.load_state_dict(saved_and_loaded(opt_g.state_dict()))
    assert_same(model_g, opt_g, model_t, opt_t, exact=True)
    train(model_t, opt_t, 10, start=10)
    train(model_g, opt_g, 10, start=10)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_fire_with_torchs_arguments(name, path):
    """torch's four state-dict hooks: ``state_dict`` pre ``(opt)`` / post ``(opt, sd)`` (may
    return a new dict), ``load_state_dict`` pre ``(opt, sd)`` (may return the dict to load) /
    post ``(opt)`` (runs after the state is in place)."""
    kw = REPRESENTATIVE[name]
    model = make_model()
    opt = make_gx(name, model.parameters(), dict(kw), path)
    train(model, opt, 3)
    calls: list[tuple] = []

    def sd_pre(o):
        calls.append(("sd_pre", o))

    def sd_post(o, sd):
        calls.append(("sd_post", o, sd))
        sd = dict(sd)
        sd["marker"] = 17
        return sd

    opt.register_state_dict_pre_hook(sd_pre)
    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert [c[0] for c in calls] == ["sd_pre", "sd_post"]
    assert calls[0][1] is opt and calls[1][1] is opt
    assert isinstance(calls[1][2], dict) and set(calls[1][2]) >= {"state", "param_groups"}
    assert sd["marker"] == 17, "the post hook's returned dict is what state_dict() returns"

    model2 = copy.deepcopy(model)
    opt2 = make_gx(name, model2.parameters(), dict(kw), path)
    seen_in_post: list[Any] = []

    def load_pre(o, d):
        calls.append(("load_pre", o, d))
        d = copy.deepcopy(d)
        d.pop("marker")
        d["param_groups"][0]["lr"] = 0.0123
        return d

    def load_post(o):
        calls.append(("load_post", o))
        seen_in_post.append({k: float(v["step"]) if "step" in v else len(v) for k, v in o.state.items()})

    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(load_post)
    opt2.load_state_dict(sd)
    assert [c[0] for c in calls] == ["sd_pre", "sd_post", "load_pre", "load_post"]
    assert calls[2][1] is opt2 and calls[3][1] is opt2
    assert calls[2][2].get("marker") == 17 and calls[2][2]["state"] is sd["state"], "the load pre hook gets the dict given"

    assert opt2.param_groups[0]["lr"] == 0.0123, "the dict returned by the load pre hook is the one loaded"
    assert seen_in_post and len(seen_in_post[0]) == len(list(model.parameters())), \
        "opt.state is filled when the load post hook runs"


@pytest.mark.parametrize("path", list(PATHS))
def test_step_pre_and_post_hooks(path):
    model = make_model()
    opt = make_gx("Adam", model.parameters(), {}, path)
    w = model[0].weight
    seen: list[tuple] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o, args, kwargs, w.detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o, args, kwargs, w.detach().clone())))
    before = w.detach().clone()
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    assert [s[0] for s in seen] == ["pre", "post"]
    assert all(s[1] is opt for s in seen)
    assert torch.equal(seen[0][4], before), "the pre hook runs before the update"
    assert torch.equal(seen[1][4], w.detach()) and not torch.equal(seen[1][4], before), "the post hook runs after it"


# --- param groups --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_matches_torch(name, path):
    kw = REPRESENTATIVE[name]
    model_t = make_model()
    model_g = copy.deepcopy(model_t)
    opt_t = make_torch(name, model_t[0].parameters(), dict(kw))
    opt_g = make_gx(name, model_g[0].parameters(), dict(kw), path)
    train(model_t, opt_t, 5)
    train(model_g, opt_g, 5)
    opt_t.add_param_group({"params": list(model_t[2].parameters()), "lr": 3e-3})
    opt_g.add_param_group({"params": list(model_g[2].parameters()), "lr": 3e-3})
    assert opt_g.param_groups[1]["lr"] == 3e-3
    train(model_t, opt_t, 5, start=5)
    train(model_g, opt_g, 5, start=5)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_reordered_param_groups_keep_their_state(name, path):
    """State belongs to the param, not to the group's position: reversing ``param_groups`` and
    stepping on equals torch doing the same (the two groups' params have different shapes)."""
    kw = REPRESENTATIVE[name]
    model_t = make_model()
    model_g = copy.deepcopy(model_t)

    def groups(m):
        return [{"params": list(m[0].parameters()), "lr": 2e-2}, {"params": list(m[2].parameters())}]

    opt_t = make_torch(name, groups(model_t), dict(kw))
    opt_g = make_gx(name, groups(model_g), dict(kw), path)
    train(model_t, opt_t, 5)
    train(model_g, opt_g, 5)
    # first the state must be where torch keeps it (else the reorder below can read another
    # group's buffers out of bounds and crash the process instead of failing)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])
    opt_t.param_groups.reverse()
    opt_g.param_groups.reverse()
    train(model_t, opt_t, 5, start=5)
    train(model_g, opt_g, 5, start=5)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])
    sd = saved_and_loaded(opt_g.state_dict())  # and a checkpoint of the reordered optimizer resumes
    model_c = copy.deepcopy(model_g)
    opt_c = make_gx(name, groups(model_c)[::-1], dict(kw), path)
    opt_c.load_state_dict(sd)
    train(model_g, opt_g, 3, start=10)
    train(model_c, opt_c, 3, start=10)
    assert_same(model_c, opt_c, model_g, opt_g, exact=True)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_per_group_maximize(name, path):
    """``maximize=True`` in one group's dict (the alias built without it) flips that group only."""
    kw = {k: v for k, v in REPRESENTATIVE[name].items()}
    model_t = make_model()
    model_g = copy.deepcopy(model_t)

    def groups(m):
        return [{"params": list(m[0].parameters()), "maximize": True}, {"params": list(m[2].parameters())}]

    opt_t = make_torch(name, groups(model_t), dict(kw))
    opt_g = make_gx(name, groups(model_g), dict(kw), path)
    train(model_t, opt_t, 8)
    train(model_g, opt_g, 8)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


# --- params and hyperparameters --------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_params(name, path):
    """Params that are strided views (``base[..., 0]``): the update equals torch's and the memory
    of the base outside the view is not touched."""
    kw = REPRESENTATIVE[name]
    g = torch.Generator().manual_seed(3)
    bases = [torch.randn(5, 6, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)]
    x = torch.randn(6, generator=g, dtype=F64)

    def run(make):
        base = [b.clone() for b in bases]
        w, b = nn.Parameter(base[0][..., 0]), nn.Parameter(base[1][..., 0])
        assert not w.is_contiguous() and w.data_ptr() == base[0].data_ptr()
        opt = make([w, b])
        for _ in range(6):
            opt.zero_grad()
            (w @ x + b).pow(2).sum().backward()
            opt.step()
        return base, (w, b), opt

    base_t, (wt, bt), opt_t = run(lambda ps: make_torch(name, ps, dict(kw)))
    base_g, (wg, bg), opt_g = run(lambda ps: make_gx(name, ps, dict(kw), path))
    for i in range(2):
        assert torch.equal(base_g[i][..., 1], bases[i][..., 1]), f"base {i}: memory outside the view was written"
    assert_param_state(wg, wt, opt_g, opt_t, "w", **TOL[F64])
    assert_param_state(bg, bt, opt_g, opt_t, "b", **TOL[F64])
    assert torch.equal(base_g[0][..., 0], wg.detach()), "the update reached the view"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_complex_params_with_state(name, path):
    """A complex param next to a real one: params and state (torch keeps complex moments) equal
    torch's."""
    kw = REPRESENTATIVE[name]
    g = torch.Generator().manual_seed(4)
    wc0 = torch.randn(4, 3, generator=g, dtype=torch.complex128)
    b0 = torch.randn(4, generator=g, dtype=F64)
    xs = torch.randn(6, 3, generator=g, dtype=torch.complex128)

    def run(make):
        w, b = nn.Parameter(wc0.clone()), nn.Parameter(b0.clone())
        opt = make([w, b])
        for k in range(6):
            opt.zero_grad()
            ((w @ xs[k]).abs().pow(2) + b).pow(2).sum().backward()
            opt.step()
        return (w, b), opt

    (wt, bt), opt_t = run(lambda ps: make_torch(name, ps, dict(kw)))
    (wg, bg), opt_g = run(lambda ps: make_gx(name, ps, dict(kw), path))
    assert_param_state(wg, wt, opt_g, opt_t, "complex w", **TOL[F64])
    assert_param_state(bg, bt, opt_g, opt_t, "real b", **TOL[F64])


@pytest.mark.parametrize("where", ["group", "alias"])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0d", "1d"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name, path, shape, where):
    """A tensor lr of shape ``()`` or ``(1,)``, given in the group dict or to the alias, equals
    torch's; in the group dict it stays live (written in place mid-run, as torch's schedulers
    do for a tensor lr)."""
    kw = {**REPRESENTATIVE[name]}
    model_t = make_model()
    model_g = copy.deepcopy(model_t)
    opt_t = make_torch(name, [{"params": list(model_t.parameters()), "lr": torch.full(shape, 0.02, dtype=F64)}],
                       dict(kw))
    if where == "group":
        opt_g = make_gx(name, [{"params": list(model_g.parameters()), "lr": torch.full(shape, 0.02, dtype=F64)}],
                        dict(kw), path)
    else:
        opt_g = make_gx(name, model_g.parameters(), {**kw, "lr": torch.full(shape, 0.02, dtype=F64)}, path)
    train(model_t, opt_t, 5)
    train(model_g, opt_g, 5)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])
    if where == "group":
        opt_t.param_groups[0]["lr"].fill_(0.005)
        opt_g.param_groups[0]["lr"].fill_(0.005)
        train(model_t, opt_t, 5, start=5)
        train(model_g, opt_g, 5, start=5)
        assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


# --- the torch.optim.Optimizer protocol --------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_returns_the_loss(name, path):
    kw = REPRESENTATIVE[name]
    model_t = make_model()
    model_g = copy.deepcopy(model_t)
    opt_t = make_torch(name, model_t.parameters(), dict(kw))
    opt_g = make_gx(name, model_g.parameters(), dict(kw), path)
    for k in range(5):
        losses = []
        for model, opt in ((model_t, opt_t), (model_g, opt_g)):
            def closure(model=model, opt=opt, k=k):
                opt.zero_grad()
                loss = loss_of(model, k)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
        assert isinstance(losses[1], torch.Tensor), "step(closure) returns the closure's loss"
        close(losses[1].detach(), losses[0].detach(), f"loss at step {k}", **TOL[F64])
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])
    assert opt_g.step() is None


@pytest.mark.parametrize("path", list(PATHS))
def test_zero_grad(path):
    model = make_model()
    opt = make_gx("Adam", model.parameters(), {}, path)
    loss_of(model, 0).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    opt.step()  # no grads: nothing moves and no state advances
    assert_tree_equal(model.state_dict(), before, "params after a step without grads")
    assert_tree_equal(opt.state_dict(), sd, "state after a step without grads")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_then_both_step_equal(name, path):
    kw = REPRESENTATIVE[name]
    model = make_model()
    opt = make_gx(name, model.parameters(), dict(kw), path)
    train(model, opt, 5)
    model2, opt2 = copy.deepcopy((model, opt))
    assert all(p2 is not p for p2, p in zip(model2.parameters(), model.parameters()))
    assert {id(p) for p in opt2.state} <= {id(p) for p in model2.parameters()}, "the copy's state is keyed by its params"
    train(model, opt, 5, start=5)
    train(model2, opt2, 5, start=5)
    assert_same(model2, opt2, model, opt, exact=True)
    assert opt.state, "the original still has its state"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_pickle_round_trip_of_an_alias(name, path):
    kw = REPRESENTATIVE[name]
    model = make_model()
    opt = make_gx(name, model.parameters(), dict(kw), path)
    train(model, opt, 5)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, 5, start=5)
    train(model2, opt2, 5, start=5)
    assert_same(model2, opt2, model, opt, exact=True)


def _user_rule(scale_by: float) -> gx.GradientTransformation:
    """A user-written rule made of closures (module level: its qualname names no test)."""

    def init(params):
        return ()

    def update(updates, state, params=None):
        return [None if u is None else -scale_by * u for u in updates], state

    return gx.GradientTransformation(init, update)


def test_pickling_a_user_closure_transform_fails_clearly():
    """Pickling an optimizer over closures cannot work; the error must say so in gradxform's
    words and point to ``state_dict()`` (Python's own message names only the local function)."""
    model = make_model()
    opt = gx.Optimizer(model.parameters(), _user_rule(0.1))
    train(model, opt, 1)
    with pytest.raises(Exception) as info:
        pickle.dumps(opt)
    msg = str(info.value)
    assert "gradxform" in msg or "state_dict" in msg, \
        f"the error should say that a user-written transform cannot be pickled and what to do; got: {msg}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.5}, {"maximize": True},
                                {"momentum": 0.9, "nesterov": True}], ids=lambda d: "-".join(d) or "plain")
def test_sgd_sparse_gradients_match_torch(kw, path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(12, 4, sparse=True), nn.Linear(4, 2)).double()

    model_t = make()
    model_g = copy.deepcopy(model_t)
    opt_t = torch.optim.SGD(model_t.parameters(), lr=0.05, **kw)
    opt_g = make_gx("SGD", model_g.parameters(), {"lr": 0.05, **kw}, path)
    idx = torch.tensor([[1, 3, 3, 7], [0, 3, 11, 2], [7, 7, 5, 1]])
    for k in range(6):
        for model, opt in ((model_t, opt_t), (model_g, opt_g)):
            opt.zero_grad()
            model(idx[k % 3]).pow(2).sum().backward()
            assert model[0].weight.grad.is_sparse
            opt.step()
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F64])


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_float64_checkpoint_into_float32_params_is_cast(name, path):
    """As torch.optim: floating state loaded into an optimizer over float32 params becomes
    float32 (``step`` is left alone) and the next steps work and match torch doing the same."""
    kw = REPRESENTATIVE[name]
    model64, ref64 = make_model(F64), make_model(F64)
    opt64 = make_gx(name, model64.parameters(), dict(kw), path)
    train(model64, opt64, 5)
    ref_opt64 = make_torch(name, ref64.parameters(), dict(kw))
    train(ref64, ref_opt64, 5)

    model_g, model_t = copy.deepcopy(model64).float(), copy.deepcopy(ref64).float()
    opt_g = make_gx(name, model_g.parameters(), dict(kw), path)
    opt_t = make_torch(name, model_t.parameters(), dict(kw))
    opt_g.load_state_dict(opt64.state_dict())
    opt_t.load_state_dict(ref_opt64.state_dict())
    for p in model_g.parameters():
        for key, v in opt_g.state[p].items():
            if isinstance(v, torch.Tensor) and key != "step":
                assert v.dtype == F32, f"state '{key}' kept dtype {v.dtype} after loading into float32 params"
    train(model_g, opt_g, 3, start=5)
    train(model_t, opt_t, 3, start=5)
    assert_same(model_g, opt_g, model_t, opt_t, **TOL[F32])


def _average(a: gx.GradientTransformation, b: gx.GradientTransformation) -> gx.GradientTransformation:
    """A user-written combinator that hands the same updates to two transforms."""

    def init(params):
        return (a.init(params), b.init(params))

    def update(updates, state, params=None):
        ua, sa = a.update(updates, state[0], params)
        ub, sb = b.update(updates, state[1], params)
        return gx.tree.tree_map(lambda x, y: (x + y) / 2, ua, ub), (sa, sb)

    return gx.GradientTransformation(init, update)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_user_written_transform_is_called_purely(path):
    """Inside the adapter a transform must not overwrite inputs that a user-written combinator
    shares: clip (a no-op at this norm), the average of 2g and 3g, negated, is -2.5 g (by hand),
    as the functional update gives."""
    tx = gx.chain(gx.clip_by_global_norm(100.0), _average(gx.scale(2.0), gx.scale(3.0)), gx.scale(-1.0))
    g = torch.ones(3, dtype=F64)
    functional, _ = tx.update([g.clone()], tx.init([torch.zeros(3, dtype=F64)]), [torch.zeros(3, dtype=F64)])
    assert torch.equal(functional[0], torch.full((3,), -2.5, dtype=F64))
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    w.grad = g.clone()
    opt = gx.Optimizer([w], tx, fused=PATHS[path])
    opt.step()
    assert torch.equal(w.detach(), torch.full((3,), -2.5, dtype=F64)), f"adapter step gave {w.detach().tolist()}"
    assert torch.equal(w.grad, g), "the user's .grad was written"


# --- torch.distributed.checkpoint's optimizer state dict ----------------------------------------------------


@pytest.mark.parametrize("flatten", [False, True], ids=["plain", "flattened"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_dcp_get_and_set_optimizer_state_dict(name, path, flatten):
    """``get_optimizer_state_dict`` after ``zero_grad`` leaves the optimizer as it was (no hidden
    step: step counts, moments and params identical); its result holds torch's twin's keys and
    values; ``set_optimizer_state_dict`` into a fresh optimizer resumes bit for bit."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    kw = REPRESENTATIVE[name]
    model = make_model()
    opt = make_gx(name, model.parameters(), dict(kw), path)
    model_t = copy.deepcopy(model)
    opt_t = make_torch(name, model_t.parameters(), dict(kw))
    train(model, opt, 5)
    train(model_t, opt_t, 5)
    opt.zero_grad()
    opt_t.zero_grad()
    sd_before = copy.deepcopy(opt.state_dict())
    params_before = copy.deepcopy(model.state_dict())
    osd = get_optimizer_state_dict(model, opt, options=options)
    osd_again = get_optimizer_state_dict(model, opt, options=options)
    assert_tree_equal(opt.state_dict(), sd_before, "the optimizer's state after get_optimizer_state_dict")
    assert_tree_equal(model.state_dict(), params_before, "the params after get_optimizer_state_dict")
    assert_tree_equal(osd_again, osd, "two get_optimizer_state_dict calls")

    osd_t = get_optimizer_state_dict(model_t, opt_t, options=options)
    state_g, state_t = (osd, osd_t) if flatten else (osd["state"], osd_t["state"])
    tensors_g = {k: v for k, v in state_g.items() if isinstance(v, torch.Tensor) or isinstance(v, dict)}
    tensors_t = {k: v for k, v in state_t.items() if isinstance(v, torch.Tensor) or isinstance(v, dict)}
    if not flatten:
        assert set(tensors_g) == set(tensors_t), f"fqn keys {sorted(tensors_g)} vs torch's {sorted(tensors_t)}"
        for fqn in tensors_t:
            assert set(tensors_g[fqn]) == set(tensors_t[fqn]), f"{fqn}: {sorted(tensors_g[fqn])} vs {sorted(tensors_t[fqn])}"
    else:
        state_keys_t = {k for k in state_t if k.startswith("state.")}
        assert {k for k in state_g if k.startswith("state.")} == state_keys_t

    model2 = copy.deepcopy(model)
    opt2 = make_gx(name, model2.parameters(), dict(kw), path)
    set_optimizer_state_dict(model2, opt2, copy.deepcopy(osd), options=options)
    assert_tree_equal(opt2.state_dict(), sd_before, "state_dict after set_optimizer_state_dict")
    train(model, opt, 5, start=5)
    train(model2, opt2, 5, start=5)
    assert_same(model2, opt2, model, opt, exact=True)


@pytest.mark.parametrize("flatten", [False, True], ids=["plain", "flattened"])
@pytest.mark.parametrize("path", list(PATHS))
def test_dcp_state_dict_of_a_chain_without_torch_twin(path, flatten):
    """The same DCP invariants for ``chain(clip_by_global_norm, adamw)`` (shared non-per-param
    state: the clip has none, the alias keeps a count): no hidden step, bit-for-bit resume."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    def make(model):
        tx = gx.chain(gx.clip_by_global_norm(0.5), gx.adamw(2e-2, weight_decay=0.1))
        return gx.Optimizer(model.parameters(), tx, fused=PATHS[path])

    model = make_model()
    opt = make(model)
    train(model, opt, 4)
    opt.zero_grad()
    before = copy.deepcopy(opt.state_dict())
    params_before = copy.deepcopy(model.state_dict())
    osd = get_optimizer_state_dict(model, opt, options=options)
    assert_tree_equal(opt.state_dict(), before, "the optimizer's state after get_optimizer_state_dict")
    assert_tree_equal(model.state_dict(), params_before, "the params after get_optimizer_state_dict")
    assert all(opt.state.get(p) for p in model.parameters()), "opt.state holds each param's state after a step"
    model2 = copy.deepcopy(model)
    opt2 = make(model2)
    set_optimizer_state_dict(model2, opt2, copy.deepcopy(osd), options=options)
    train(model, opt, 4, start=4)
    train(model2, opt2, 4, start=4)
    for a, b in zip(model2.parameters(), model.parameters()):
        close(a.detach(), b.detach(), "resumed vs uninterrupted", exact=True)
    assert_tree_equal(opt2.state_dict(), opt.state_dict(), "state_dict at the end")


# --- ZeroRedundancyOptimizer on two gloo ranks -------------------------------------------------------------

_ZERO_STEPS = 4


def _zero_rank(rank: int, world: int) -> dict[str, Any]:
    """On each rank: ZeRO over gx.Optimizer (both paths) and over torch.optim.AdamW, the same
    full batch on both ranks; then a consolidated checkpoint saved by rank 0, reloaded by both
    ranks into fresh ZeRO optimizers, continued. Returns params and rank 0's consolidated state.

    The ranks agree after each phase (``all_gather_object`` of the errors), so a failure on one
    rank ends the case on both instead of leaving the other waiting in a collective."""
    import os

    from torch.distributed.optim import ZeroRedundancyOptimizer

    out: dict[str, Any] = {}
    kw = {"lr": 0.02, "weight_decay": 0.1, "betas": (0.8, 0.95)}
    ckpt_dir = os.environ["GX_ZERO_DIR"]

    def build(which, model):
        if which == "torch":
            return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **kw)
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=gx.Optimizer, tx=gx.adamw(**kw),
                                       fused=PATHS[which])

    def agreed(fn) -> bool:
        """Run ``fn`` on every rank; False on all ranks (error recorded) if it failed on any."""
        try:
            fn()
            err = None
        except Exception as e:  # noqa: BLE001 - reported to the test process, which fails with it
            err = f"rank {rank}: {type(e).__name__}: {e}"
        errs: list[Any] = [None] * world
        dist.all_gather_object(errs, err)
        errs = [e for e in errs if e]
        if errs:
            out[f"{which}/error"] = "; ".join(errs)
        return not errs

    for which in ("torch", "generic", "fast"):
        model = make_model()
        opt = build(which, model)
        train(model, opt, _ZERO_STEPS)
        out[f"{which}/mid"] = [p.detach().clone() for p in model.parameters()]
        path = os.path.join(ckpt_dir, f"zero_{which}.pt")
        # what consolidate_state_dict sends between ranks must serialise: checked locally first
        if not agreed(lambda: torch.save(opt.optim.state_dict(), io.BytesIO())):
            continue
        opt.consolidate_state_dict(to=0)

        def save():
            if rank == 0:
                sd = opt.state_dict()
                torch.save(sd, path)
                out[f"{which}/state"] = sd

        if not agreed(save):
            continue
        model2 = copy.deepcopy(model)
        opt2 = build(which, model2)
        # weights_only=False: ZeRO's own param groups carry every constructor default, ``tx`` too
        if not agreed(lambda: opt2.load_state_dict(torch.load(path, weights_only=False))):
            continue
        train(model, opt, _ZERO_STEPS, start=_ZERO_STEPS)
        train(model2, opt2, _ZERO_STEPS, start=_ZERO_STEPS)
        out[f"{which}/end"] = [p.detach().clone() for p in model.parameters()]
        out[f"{which}/resumed"] = [p.detach().clone() for p in model2.parameters()]
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_zero_redundancy_optimizer_on_two_gloo_ranks(tmp_path, monkeypatch):
    from helpers import run_on_ranks

    monkeypatch.setenv("GX_ZERO_DIR", str(tmp_path))
    results = run_on_ranks(_zero_rank, 2, tmp_path)
    errors = {k: v for r in results for k, v in r.items() if k.endswith("/error")}
    # the single-process reference: torch.optim.AdamW on the same batches
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.02, weight_decay=0.1, betas=(0.8, 0.95))
    train(ref, ref_opt, _ZERO_STEPS)
    ref_mid = [p.detach().clone() for p in ref.parameters()]
    train(ref, ref_opt, _ZERO_STEPS, start=_ZERO_STEPS)
    ref_end = [p.detach().clone() for p in ref.parameters()]
    for r, res in enumerate(results):
        for which in ("torch", "generic", "fast"):
            for a, b in zip(res[f"{which}/mid"], ref_mid):
                close(a, b, f"rank {r} ZeRO[{which}] after {_ZERO_STEPS} steps", **TOL[F64])
    assert not errors, f"ZeRO checkpoint round trip failed: {errors}"
    for r, res in enumerate(results):
        for which in ("torch", "generic", "fast"):
            for a, b in zip(res[f"{which}/end"], ref_end):
                close(a, b, f"rank {r} ZeRO[{which}] uninterrupted", **TOL[F64])
            for a, b in zip(res[f"{which}/resumed"], res[f"{which}/end"]):
                close(a, b, f"rank {r} ZeRO[{which}] resumed vs uninterrupted", exact=True)
    # the consolidated checkpoint of ZeRO over gx.Optimizer holds torch's per-param state
    sd_t, sd_g = results[0]["torch/state"], results[0]["generic/state"]
    assert set(sd_g["state"]) == set(sd_t["state"])
    for i in sd_t["state"]:
        assert set(sd_g["state"][i]) == set(sd_t["state"][i]), f"param {i}: {sorted(sd_g['state'][i])}"
