"""Tests for ``gradxform.Optimizer``, the torch.optim adapter.

Every test asserts values against ``torch.optim`` run side by side on an identical model: the same
MLP (10 -> 32 -> 32 -> 3, Tanh), the same fixed classification batches, the same schedulers. Runs in
float64 are compared to ``atol=1e-12`` (the two implementations order a few float operations
differently, so bit equality with torch is not expected); a resumed gradxform run is compared to
an uninterrupted gradxform run bit for bit.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as lrs

import gradxform as gx
from helpers import needs
from gradxform import tree as gxtree

STEPS = 200
ATOL = 1e-12
RTOL = 1e-10
N_BATCHES = 4
BATCH = 32


# --- fixtures: data, model, comparison helpers ----------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and are very slow on a
    loaded machine), so run this module single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_DATA: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


def data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """N_BATCHES fixed batches of a 3-class problem (labels from a noisy linear teacher)."""
    if dtype not in _DATA:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(N_BATCHES, BATCH, 10, generator=g, dtype=torch.float64)
        w = torch.randn(10, 3, generator=g, dtype=torch.float64)
        y = (x @ w + 0.5 * torch.randn(N_BATCHES, BATCH, 3, generator=g, dtype=torch.float64)).argmax(-1)
        _DATA[dtype] = (x.to(dtype), y)
    return _DATA[dtype]


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    return model.to(dtype)


def twins(dtype: torch.dtype = torch.float64) -> tuple[nn.Sequential, nn.Sequential]:
    """Two identical models: one for torch.optim, one for gradxform."""
    model = make_model(dtype)
    return model, copy.deepcopy(model)


def split(model: nn.Sequential) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """First layer / the rest: the two param groups used throughout."""
    return list(model[0].parameters()), list(model[2].parameters()) + list(model[4].parameters())


def loss_of(model: nn.Module, step: int, sign: float = 1.0) -> torch.Tensor:
    x, y = data(next(model.parameters()).dtype)
    return sign * F.cross_entropy(model(x[step % N_BATCHES]), y[step % N_BATCHES])


def assert_params_close(got: nn.Module, want: nn.Module, atol: float = ATOL, rtol: float = RTOL) -> None:
    for (name, g), w in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"param {name}: {m}")


def assert_params_equal(got: nn.Module, want: nn.Module) -> None:
    for (name, g), w in zip(got.named_parameters(), want.parameters()):
        assert torch.equal(g, w), f"param {name} differs (max abs diff {(g - w).abs().max().item():.3e})"


def assert_trees_equal(a, b) -> None:
    la, sa = gxtree.tree_flatten(a)
    lb, sb = gxtree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert isinstance(y, dict)
            assert_state_dicts_equal(x, y)
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            assert len(x) == len(y)
            for xi, yi in zip(x, y):
                assert_state_dicts_equal(xi, yi)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k
        else:
            assert x == y, k


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, sign: float = 1.0) -> float:
    opt.zero_grad()
    loss = loss_of(model, step, sign)
    loss.backward()
    opt.step()
    return loss.item()


def run_lockstep(model_t, opts_t, model_g, opt_g, steps=STEPS, scheds_t=(), scheds_g=(), sign=1.0, plateau=False,
                 keys=("lr",)):
    """Train both models side by side; after every optimizer step and every scheduler step the
    gradxform groups' ``keys`` must equal torch's (``opts_t`` may be several torch optimizers
    standing for the gradxform groups, in order)."""
    groups_t = lambda: [g for o in opts_t for g in o.param_groups]  # noqa: E731

    def check(step: int, when: str) -> None:
        assert len(opt_g.param_groups) == len(groups_t())
        for gi, (gg, gt) in enumerate(zip(opt_g.param_groups, groups_t())):
            for k in keys:
                assert gg[k] == gt[k], f"step {step} ({when}), group {gi}, {k!r}: gradxform {gg[k]!r} torch {gt[k]!r}"

    for step in range(steps):
        for o in opts_t:
            o.zero_grad()
        loss_t = loss_of(model_t, step, sign)
        loss_t.backward()
        for o in opts_t:
            o.step()
        loss_g = train_step(model_g, opt_g, step, sign)
        check(step, "after opt.step")
        for s in scheds_t:
            s.step(loss_t.item()) if plateau else s.step()
        for s in scheds_g:
            s.step(loss_g) if plateau else s.step()
        check(step, "after sched.step")


# --- the aliases through the adapter = torch.optim --------------------------------------------------


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=1e-2),
    "momentum_wd_nesterov": dict(lr=0.05, momentum=0.8, weight_decay=1e-2, nesterov=True),
    "maximize": dict(lr=0.1, maximize=True),
    "maximize_all": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, maximize=True),
}


@pytest.mark.parametrize("kw", SGD_CASES.values(), ids=SGD_CASES.keys())
def test_sgd_matches_torch(kw):
    model_t, model_g = twins()
    opt_t = torch.optim.SGD(model_t.parameters(), **kw)
    opt_g = gx.Optimizer(model_g.parameters(), gx.sgd(**kw))
    # maximize=True ascends; ascend -loss so that training behaves like descent on the loss
    sign = -1.0 if kw.get("maximize") else 1.0
    run_lockstep(model_t, [opt_t], model_g, opt_g, sign=sign, keys=("lr", "momentum", "dampening", "weight_decay"))
    assert_params_close(model_g, model_t)


ADAM_CASES = [
    dict(name=name, amsgrad=ams, weight_decay=wd, maximize=mx)
    for name, ams, wd, mx in itertools.product(["adam", "adamw"], [False, True], [0.0, 0.05], [False, True])
]


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs("cpu_fused_adam"))], ids=["generic", "fused"])
@pytest.mark.parametrize(
    "case", ADAM_CASES, ids=lambda c: f"{c['name']}-ams{int(c['amsgrad'])}-wd{c['weight_decay']}-max{int(c['maximize'])}"
)
def test_adam_adamw_match_torch(case, fused):
    """Each implementation of ours (the generic path, and the fused lowering, required with
    fused=True so that the test cannot silently land on the other) against torch.optim's
    single-tensor reference (foreach=False), not against the kernel the lowering calls."""
    kw = dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-7, weight_decay=case["weight_decay"], amsgrad=case["amsgrad"],
              maximize=case["maximize"])
    model_t, model_g = twins()
    torch_cls = torch.optim.Adam if case["name"] == "adam" else torch.optim.AdamW
    opt_t = torch_cls(model_t.parameters(), foreach=False, **kw)
    opt_g = gx.Optimizer(model_g.parameters(), getattr(gx, case["name"])(**kw), fused=fused)
    sign = -1.0 if case["maximize"] else 1.0
    run_lockstep(model_t, [opt_t], model_g, opt_g, sign=sign, keys=("lr", "betas", "eps", "weight_decay"))
    assert_params_close(model_g, model_t)


OPT_CASES = {
    "adamw_amsgrad": (lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05, amsgrad=True),
                      lambda p: gx.Optimizer(p, gx.adamw(3e-3, weight_decay=0.05, amsgrad=True))),
    "adam": (lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-3),
             lambda p: gx.Optimizer(p, gx.adam(3e-3, weight_decay=1e-3))),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
                     lambda p: gx.Optimizer(p, gx.sgd(0.05, momentum=0.9, weight_decay=1e-3))),
}


@pytest.mark.parametrize("opt_case", ["adamw_amsgrad", "sgd_momentum"])
def test_two_param_groups_with_different_lr(opt_case):
    make_t, make_g = OPT_CASES[opt_case]
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    opt_t = make_t([{"params": a_t}, {"params": b_t, "lr": 1e-2}])
    opt_g = make_g([{"params": a_g}, {"params": b_g, "lr": 1e-2}])
    assert opt_g.param_groups[1]["lr"] == 1e-2
    assert opt_g.param_groups[0]["lr"] == opt_t.param_groups[0]["lr"]
    run_lockstep(model_t, [opt_t], model_g, opt_g)
    assert_params_close(model_g, model_t)


GROUP_OVERRIDE_CASES = {
    # the usual decay / no-decay split, with the optimizer's default weight_decay=0
    "sgd_weight_decay": (lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9), lambda g: gx.Optimizer(g, gx.sgd(0.05, momentum=0.9)),
                         {"weight_decay": 0.1}),
    "adam_weight_decay": (lambda g: torch.optim.Adam(g, lr=3e-3), lambda g: gx.Optimizer(g, gx.adam(3e-3)),
                          {"weight_decay": 0.1}),
    # momentum for one group only, the optimizer's default momentum=0
    "sgd_momentum": (lambda g: torch.optim.SGD(g, lr=0.05), lambda g: gx.Optimizer(g, gx.sgd(0.05)), {"momentum": 0.9}),
}


@pytest.mark.parametrize("case", list(GROUP_OVERRIDE_CASES))
def test_group_override_of_a_zero_default_matches_torch(case):
    """A group turns on weight decay / momentum that the optimizer's defaults leave at 0.
    torch.optim applies the group's value; the adapter documents its group keys as live, accepts
    the key and reports it back in param_groups, so it must apply it too (or refuse it)."""
    make_t, make_g, override = GROUP_OVERRIDE_CASES[case]
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    opt_t = make_t([{"params": a_t, **override}, {"params": b_t}])
    opt_g = make_g([{"params": a_g, **override}, {"params": b_g}])
    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=50, keys=("lr", *override))
    assert_params_close(model_g, model_t)


# --- schedulers -------------------------------------------------------------------------------------


SCHED_OPTS = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True), lambda p: gx.Optimizer(p, gx.adamw(1e-2, amsgrad=True)),
              ("lr", "betas")),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: gx.Optimizer(p, gx.adam(1e-2)), ("lr", "betas")),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                     lambda p: gx.Optimizer(p, gx.sgd(0.1, momentum=0.9, nesterov=True)), ("lr", "momentum")),
}


def make_sched(kind: str, opt: torch.optim.Optimizer, steps: int = STEPS):
    if kind == "step":
        return lrs.StepLR(opt, step_size=30, gamma=0.5)
    if kind == "cosine":
        return lrs.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-4)
    if kind == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        return lrs.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, cycle_momentum=True)
    if kind == "plateau":
        return lrs.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=5e-2, cooldown=20)
    if kind == "sequential":
        warm = 20
        return lrs.SequentialLR(opt, [lrs.LinearLR(opt, start_factor=0.1, total_iters=warm),
                                      lrs.CosineAnnealingLR(opt, T_max=steps - warm, eta_min=1e-4)], milestones=[warm])
    raise AssertionError(kind)


@pytest.mark.parametrize("opt_case", list(SCHED_OPTS))
@pytest.mark.parametrize("sched", ["step", "cosine", "onecycle", "plateau", "sequential"])
def test_lr_schedulers_match_torch(sched, opt_case):
    make_t, make_g, keys = SCHED_OPTS[opt_case]
    model_t, model_g = twins()
    opt_t, opt_g = make_t(model_t.parameters()), make_g(model_g.parameters())
    sched_t, sched_g = make_sched(sched, opt_t), make_sched(sched, opt_g)
    lr0 = opt_t.param_groups[0]["lr"]
    run_lockstep(model_t, [opt_t], model_g, opt_g, scheds_t=[sched_t], scheds_g=[sched_g], plateau=sched == "plateau",
                 keys=keys)
    assert_params_close(model_g, model_t)
    assert opt_t.param_groups[0]["lr"] != lr0  # the schedule did change the lr
    if sched == "onecycle":  # and cycled the momentum (betas[0] / momentum)
        assert opt_g.param_groups[0][keys[1]] == opt_t.param_groups[0][keys[1]]
        first = opt_g.param_groups[0][keys[1]]
        assert (first[0] if isinstance(first, tuple) else first) != 0.9


def test_onecycle_two_groups_with_different_lr():
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    opt_t = torch.optim.AdamW([{"params": a_t}, {"params": b_t, "lr": 3e-3}], lr=1e-2)
    opt_g = gx.Optimizer([{"params": a_g}, {"params": b_g, "lr": 3e-3}], gx.adamw(1e-2))
    sched_t, sched_g = make_sched("onecycle", opt_t), make_sched("onecycle", opt_g)
    run_lockstep(model_t, [opt_t], model_g, opt_g, scheds_t=[sched_t], scheds_g=[sched_g], keys=("lr", "betas"))
    assert_params_close(model_g, model_t)


# --- a param group that brings its own transform ----------------------------------------------------


def test_group_with_own_tx_matches_separate_torch_optimizers():
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    sgd_t = torch.optim.SGD(a_t, lr=0.1, momentum=0.9)
    adamw_t = torch.optim.AdamW(b_t, lr=1e-3)
    opt_g = gx.Optimizer([{"params": a_g, "tx": gx.sgd(0.1, momentum=0.9)}, {"params": b_g}], gx.adamw(1e-3))
    assert opt_g.param_groups[0]["lr"] == 0.1 and opt_g.param_groups[0]["momentum"] == 0.9
    assert opt_g.param_groups[1]["lr"] == 1e-3 and opt_g.param_groups[1]["betas"] == (0.9, 0.999)
    assert opt_g.param_groups[1]["weight_decay"] == 1e-2
    # a StepLR on the gradxform optimizer drives both groups, as one on each torch optimizer does
    scheds_t = [lrs.StepLR(sgd_t, 40, 0.5), lrs.StepLR(adamw_t, 40, 0.5)]
    sched_g = lrs.StepLR(opt_g, 40, 0.5)
    run_lockstep(model_t, [sgd_t, adamw_t], model_g, opt_g, scheds_t=scheds_t, scheds_g=[sched_g])
    assert_params_close(model_g, model_t)


# --- state_dict / load_state_dict ------------------------------------------------------------------


def _resume_setup(case: str, model: nn.Module):
    p = model.parameters()
    if case == "adamw_amsgrad":
        return gx.Optimizer(p, gx.adamw(3e-3, weight_decay=0.05, amsgrad=True)), None
    if case == "sgd_momentum":
        return gx.Optimizer(p, gx.sgd(0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)), None
    if case == "adamw_onecycle":
        opt = gx.Optimizer(p, gx.adamw(1e-2, amsgrad=True))
        return opt, make_sched("onecycle", opt, steps=100)
    if case == "sgd_sequential":
        opt = gx.Optimizer(p, gx.sgd(0.1, momentum=0.9, nesterov=True))
        return opt, make_sched("sequential", opt, steps=100)
    if case == "own_tx_groups_plateau":
        a, b = split(model)
        opt = gx.Optimizer([{"params": a, "tx": gx.sgd(0.1, momentum=0.9)}, {"params": b, "lr": 3e-3}],
                           gx.adamw(1e-3, amsgrad=True))
        return opt, lrs.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=1e-2)
    raise AssertionError(case)


def _train(model, opt, sched, start, stop):
    for step in range(start, stop):
        loss = train_step(model, opt, step)
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(loss)
        elif sched is not None:
            sched.step()


@pytest.mark.parametrize("case", ["adamw_amsgrad", "sgd_momentum", "adamw_onecycle", "sgd_sequential",
                                  "own_tx_groups_plateau"])
def test_resume_is_bit_identical(case):
    ref_model = make_model()
    ref_opt, ref_sched = _resume_setup(case, ref_model)
    _train(ref_model, ref_opt, ref_sched, 0, 100)

    model = make_model()
    opt, sched = _resume_setup(case, model)
    _train(model, opt, sched, 0, 50)
    buf = io.BytesIO()
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
    if sched is not None:
        ckpt["sched"] = sched.state_dict()
    torch.save(ckpt, buf)
    del model, opt, sched
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True by default in torch >= 2.6: the checkpoint must be plain data

    model2 = make_model(seed=7)  # a different init: everything must come from the checkpoint
    model2.load_state_dict(loaded["model"])
    opt2, sched2 = _resume_setup(case, model2)
    opt2.load_state_dict(loaded["opt"])
    if sched2 is not None:
        sched2.load_state_dict(loaded["sched"])
    for gi, g in enumerate(opt2.param_groups):  # the loaded optimizer resumes where the saved one stopped
        assert g["lr"] == loaded["opt"]["param_groups"][gi]["lr"]
    _train(model2, opt2, sched2, 50, 100)

    assert_params_equal(model2, ref_model)
    for gi in range(len(ref_opt.param_groups)):
        assert_trees_equal(opt2.tx_state(gi), ref_opt.tx_state(gi))
    assert_state_dicts_equal(opt2.state_dict(), ref_opt.state_dict())


def test_state_dict_layout_is_torchs():
    """The per-param state sits in opt.state[p] under torch.optim's names and values, the group's
    own (the alias's count) in group["tx_state"]; no transform or closure in the groups."""
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    opt_t = torch.optim.AdamW([{"params": a_t}, {"params": b_t, "lr": 1e-2}], lr=3e-3, betas=(0.8, 0.99), eps=1e-7,
                              weight_decay=0.05, amsgrad=True)
    opt_g = gx.Optimizer([{"params": a_g}, {"params": b_g, "lr": 1e-2}],
                         gx.adamw(3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=True))
    empty = opt_g.state_dict()
    assert set(empty) == {"state", "param_groups"} and empty["state"] == {}
    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=10)
    sd_t, sd_g = opt_t.state_dict(), opt_g.state_dict()

    assert set(sd_g) == {"state", "param_groups"}
    assert list(sd_g["state"]) == list(sd_t["state"]) == list(range(6))
    assert [g["params"] for g in sd_g["param_groups"]] == [g["params"] for g in sd_t["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    for gg, gt in zip(sd_g["param_groups"], sd_t["param_groups"]):
        for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            assert gg[k] == gt[k], k
        assert all(isinstance(v, (int, float, bool, str, tuple, list, type(None))) for k, v in gg.items()
                   if k != "tx_state")
    params_g = [p for g in opt_g.param_groups for p in g["params"]]
    for gg in sd_g["param_groups"]:  # the group's own state: the alias's update count
        assert set(gg["tx_state"]) == {"count"} and int(gg["tx_state"]["count"]) == 10
    for idx, p in enumerate(params_g):
        st_g, st_t = sd_g["state"][idx], sd_t["state"][idx]
        assert set(st_g) == set(st_t) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert int(st_g["step"]) == int(st_t["step"]) == 10
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert st_g[k] is opt_g.state[p][k]
            torch.testing.assert_close(st_g[k], st_t[k], atol=ATOL, rtol=RTOL)


def test_load_state_dict_wrong_number_of_groups():
    model = make_model()
    a, b = split(model)
    two = gx.Optimizer([{"params": a}, {"params": b}], gx.adamw(1e-3))
    train_step(model, two, 0)
    one = gx.Optimizer(make_model().parameters(), gx.adamw(1e-3))
    with pytest.raises(ValueError, match=r"different number of parameter groups"):
        one.load_state_dict(two.state_dict())


def test_load_state_dict_wrong_number_of_params():
    model = make_model()
    opt = gx.Optimizer(model.parameters(), gx.adamw(1e-3))
    train_step(model, opt, 0)
    other = make_model()
    fewer = gx.Optimizer(list(other.parameters())[:4], gx.adamw(1e-3))
    with pytest.raises(ValueError, match=r"doesn't match the size"):
        fewer.load_state_dict(opt.state_dict())
    # nothing was half-loaded
    assert fewer.state_dict()["state"] == {}


def test_load_state_dict_wrong_shapes():
    model = make_model()
    opt = gx.Optimizer(model.parameters(), gx.adamw(1e-3))
    train_step(model, opt, 0)
    wide = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    opt2 = gx.Optimizer(wide.parameters(), gx.adamw(1e-3))
    with pytest.raises(ValueError, match=r"group 0: the loaded 'exp_avg' of param 0 has shape \(32, 10\).*\(16, 10\)"):
        opt2.load_state_dict(opt.state_dict())
    assert opt2.state_dict()["state"] == {}  # checked before anything was loaded


# --- GradScaler -------------------------------------------------------------------------------------


def _grad_scaler():
    amp = getattr(torch, "amp", None)
    if amp is None or not hasattr(amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available in this torch")
    try:
        return torch.amp.GradScaler("cpu")
    except Exception as e:  # pragma: no cover - old torch without a CPU scaler
        pytest.skip(f"torch.amp.GradScaler('cpu') is not available: {e}")


def _scaled_step(model, opt, scaler, step, poison=False):
    opt.zero_grad()
    scaler.scale(loss_of(model, step)).backward()
    if poison:
        with torch.no_grad():
            model[2].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_matches_unscaled_and_skips_inf_steps_like_torch():
    scaler_g, scaler_t = _grad_scaler(), _grad_scaler()
    model_g = make_model(torch.float32)
    model_plain = copy.deepcopy(model_g)
    model_t = copy.deepcopy(model_g)
    opt_g = gx.Optimizer(model_g.parameters(), gx.adamw(1e-2, amsgrad=True))
    opt_plain = gx.Optimizer(model_plain.parameters(), gx.adamw(1e-2, amsgrad=True))
    opt_t = torch.optim.AdamW(model_t.parameters(), lr=1e-2, amsgrad=True)

    for step in range(30):
        _scaled_step(model_g, opt_g, scaler_g, step)
        _scaled_step(model_t, opt_t, scaler_t, step)
        train_step(model_plain, opt_plain, step)
    assert scaler_g.get_scale() == scaler_t.get_scale() > 1
    assert_params_close(model_g, model_plain, atol=1e-7, rtol=1e-6)
    assert_params_close(model_g, model_t, atol=1e-6, rtol=1e-5)

    # an overflowing step is skipped: params and state untouched, scale backed off
    params_before = [p.detach().clone() for p in model_g.parameters()]
    state_before = gxtree.tree_clone(opt_g.tx_state(0))
    torch_before = [p.detach().clone() for p in model_t.parameters()]
    torch_state_before = copy.deepcopy(opt_t.state_dict()["state"])
    scale_before = scaler_g.get_scale()
    _scaled_step(model_g, opt_g, scaler_g, 30, poison=True)
    _scaled_step(model_t, opt_t, scaler_t, 30, poison=True)
    assert scaler_g.get_scale() == scaler_t.get_scale() == scale_before * 0.5
    for p, q in zip(model_g.parameters(), params_before):
        assert torch.equal(p, q)
    assert_trees_equal(opt_g.tx_state(0), state_before)
    for p, q in zip(model_t.parameters(), torch_before):  # torch does the same
        assert torch.equal(p, q)
    for k, v in opt_t.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(t, torch_state_before[k][name])

    # and training goes on in step with torch
    for step in range(31, 50):
        _scaled_step(model_g, opt_g, scaler_g, step)
        _scaled_step(model_t, opt_t, scaler_t, step)
    assert_params_close(model_g, model_t, atol=1e-6, rtol=1e-5)


# --- frozen params, zero_grad, add_param_group -----------------------------------------------------


@pytest.mark.parametrize("opt_case", ["adamw_amsgrad", "sgd_momentum"])
def test_frozen_param_is_left_alone(opt_case):
    make_t, make_g = OPT_CASES[opt_case]
    model_t, model_g = twins()
    for m in (model_t, model_g):
        m[2].weight.requires_grad_(False)  # in the optimizer, but its .grad stays None
    frozen_init = model_g[2].weight.detach().clone()
    opt_t, opt_g = make_t(model_t.parameters()), make_g(model_g.parameters())
    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=50)
    assert model_g[2].weight.grad is None
    assert torch.equal(model_g[2].weight, frozen_init)
    assert_params_close(model_g, model_t)
    # its buffers, if kept at all, are still their initial zeros
    frozen_idx = [i for i, p in enumerate(model_g.parameters()) if p is model_g[2].weight][0]
    for path, buf in opt_g.state_dict()["state"].get(frozen_idx, {}).items():
        assert torch.equal(buf, torch.zeros_like(buf)), path


@pytest.mark.parametrize("opt_case", ["adamw_amsgrad", "sgd_momentum"])
def test_param_unfrozen_later_matches_torch(opt_case):
    """A param without a grad for the first 20 steps (e.g. a frozen backbone) then trained:
    torch.optim starts its state (Adam's step count for the bias correction, SGD's momentum
    buffer) at its first gradient."""
    make_t, make_g = OPT_CASES[opt_case]
    if opt_case == "sgd_momentum":  # dampening makes SGD's first step special too
        make_t = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.5)  # noqa: E731
        make_g = lambda p: gx.Optimizer(p, gx.sgd(0.05, momentum=0.9, dampening=0.5))  # noqa: E731
    model_t, model_g = twins()
    for m in (model_t, model_g):
        m[0].requires_grad_(False)
    opt_t, opt_g = make_t(model_t.parameters()), make_g(model_g.parameters())
    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=20)
    for m in (model_t, model_g):
        m[0].requires_grad_(True)
    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=30)
    assert_params_close(model_g, model_t)


@pytest.mark.parametrize("opt_case", ["adamw_amsgrad", "sgd_momentum"])
def test_zero_grad(opt_case):
    make_t, make_g = OPT_CASES[opt_case]
    model_t, model_g = twins()
    opt_t, opt_g = make_t(model_t.parameters()), make_g(model_g.parameters())
    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=10)

    # set_to_none=False: zero grads are real grads, the optimizers step on them (momentum moves)
    for opt in (opt_t, opt_g):
        opt.zero_grad(set_to_none=False)
    for p in model_g.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    before = [p.detach().clone() for p in model_g.parameters()]
    opt_t.step()
    opt_g.step()
    assert_params_close(model_g, model_t)
    assert any(not torch.equal(p, q) for p, q in zip(model_g.parameters(), before))

    # set_to_none=True: no grads, the step changes nothing, not even the step count
    for opt in (opt_t, opt_g):
        opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model_g.parameters())
    before = [p.detach().clone() for p in model_g.parameters()]
    state_before = gxtree.tree_clone(opt_g.tx_state(0))
    opt_t.step()
    opt_g.step()
    for p, q in zip(model_g.parameters(), before):
        assert torch.equal(p, q)
    assert_trees_equal(opt_g.tx_state(0), state_before)

    run_lockstep(model_t, [opt_t], model_g, opt_g, steps=10)
    assert_params_close(model_g, model_t)


def _lockstep_model_zero_grad(model_t, opts_t, model_g, opt_g, start, stop):
    """Like run_lockstep, but zeroes the whole model's grads (some params are in no optimizer yet)."""
    for step in range(start, stop):
        for model, opts in ((model_t, opts_t), (model_g, [opt_g])):
            model.zero_grad()
            loss_of(model, step).backward()
            for o in opts:
                o.step()
        for gg, gt in zip(opt_g.param_groups, [g for o in opts_t for g in o.param_groups]):
            assert gg["lr"] == gt["lr"]


def test_add_param_group_after_construction():
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    opt_t = torch.optim.AdamW(a_t, lr=3e-3, amsgrad=True)
    opt_g = gx.Optimizer(a_g, gx.adamw(3e-3, amsgrad=True))
    _lockstep_model_zero_grad(model_t, [opt_t], model_g, opt_g, 0, 20)
    opt_t.add_param_group({"params": b_t, "lr": 1e-2, "weight_decay": 0.1})
    opt_g.add_param_group({"params": b_g, "lr": 1e-2, "weight_decay": 0.1})
    assert opt_g.param_groups[1]["lr"] == 1e-2 and opt_g.param_groups[1]["betas"] == (0.9, 0.999)
    _lockstep_model_zero_grad(model_t, [opt_t], model_g, opt_g, 20, 80)
    assert_params_close(model_g, model_t)
    assert not torch.equal(b_g[0], split(make_model())[1][0])  # the new group did train


def test_add_param_group_with_own_tx():
    model_t, model_g = twins()
    a_t, b_t = split(model_t)
    a_g, b_g = split(model_g)
    adamw_t = torch.optim.AdamW(a_t, lr=3e-3)
    opt_g = gx.Optimizer(a_g, gx.adamw(3e-3))
    _lockstep_model_zero_grad(model_t, [adamw_t], model_g, opt_g, 0, 20)
    sgd_t = torch.optim.SGD(b_t, lr=0.05, momentum=0.9, nesterov=True)
    opt_g.add_param_group({"params": b_g, "tx": gx.sgd(0.05, momentum=0.9, nesterov=True)})
    assert opt_g.param_groups[1]["lr"] == 0.05 and opt_g.param_groups[1]["momentum"] == 0.9
    _lockstep_model_zero_grad(model_t, [adamw_t, sgd_t], model_g, opt_g, 20, 80)
    assert_params_close(model_g, model_t)


# --- complex params ---------------------------------------------------------------------------------


def _complex_problem():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 4, generator=g, dtype=torch.complex128)
    w_true = torch.randn(4, 3, generator=g, dtype=torch.complex128)
    y = x @ w_true + 0.1 * torch.randn(64, 3, generator=g, dtype=torch.complex128)
    w0 = torch.randn(4, 3, generator=g, dtype=torch.complex128)
    b0 = torch.randn(3, generator=g, dtype=torch.complex128)
    return x, y, w0, b0


COMPLEX_CASES = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05), lambda: gx.adamw(1e-2, weight_decay=0.05)),
    "adamw_amsgrad": (lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True), lambda: gx.adamw(1e-2, amsgrad=True)),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3),
                     lambda: gx.sgd(1e-2, momentum=0.9, weight_decay=1e-3)),
}


@pytest.mark.parametrize("case", list(COMPLEX_CASES))
def test_complex_params_match_torch(case):
    make_t, make_tx = COMPLEX_CASES[case]
    x, y, w0, b0 = _complex_problem()
    pt = [nn.Parameter(w0.clone()), nn.Parameter(b0.clone())]
    pg = [nn.Parameter(w0.clone()), nn.Parameter(b0.clone())]
    opt_t, opt_g = make_t(pt), gx.Optimizer(pg, make_tx())
    for _ in range(STEPS):
        for (w, b), opt in ((pt, opt_t), (pg, opt_g)):
            opt.zero_grad()
            (x @ w + b - y).abs().pow(2).mean().backward()
            opt.step()
    for a, b in zip(pg, pt):
        assert a.dtype == torch.complex128
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert not torch.equal(pg[0], w0)


# --- closures and extra arguments -------------------------------------------------------------------


@pytest.mark.parametrize("opt_case", ["adamw_amsgrad", "sgd_momentum"])
def test_step_with_closure(opt_case):
    make_t, make_g = OPT_CASES[opt_case]
    model_t, model_g = twins()
    opt_t, opt_g = make_t(model_t.parameters()), make_g(model_g.parameters())
    calls = []
    for step in range(50):
        def closure_t(step=step):
            opt_t.zero_grad()
            loss = loss_of(model_t, step)
            loss.backward()
            return loss

        returned = []

        def closure_g(step=step):
            calls.append(step)
            opt_g.zero_grad()
            loss = loss_of(model_g, step)
            loss.backward()
            returned.append(loss)  # noqa: B023 (called at once)
            return loss

        loss_t = opt_t.step(closure_t)
        loss_g = opt_g.step(closure_g)
        assert loss_g is returned[0]  # the closure's own return value
        assert loss_g.item() == pytest.approx(loss_t.item(), rel=1e-12, abs=1e-12)
    assert calls == list(range(50))  # once per step
    assert_params_close(model_g, model_t)


def _scale_by_factor() -> gx.GradientTransformation:
    """A transform with a required extra argument ``factor``."""

    def init(params):
        return gx.EmptyState()

    def update(updates, state, params=None, *, factor):
        return [None if u is None else u * factor for u in updates], state

    return gx.GradientTransformation(init, update)


def test_unknown_extra_arg_raises_type_error_and_changes_nothing():
    model = make_model()
    opt = gx.Optimizer(model.parameters(), gx.adamw(1e-2))
    train_step(model, opt, 0)
    loss_of(model, 1).backward()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = gxtree.tree_clone(opt.tx_state(0))
    with pytest.raises(TypeError, match="foo"):
        opt.step(foo=1)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert_trees_equal(opt.tx_state(0), state_before)


def test_declared_extra_arg_is_forwarded():
    model_t, model_g = twins()
    opt_t = torch.optim.SGD(model_t.parameters(), lr=0.05, momentum=0.9)
    # scaling the grads by 0.5 before SGD = SGD on the halved loss
    opt_g = gx.Optimizer(model_g.parameters(), gx.chain(_scale_by_factor(), gx.sgd(0.1, momentum=0.9)))
    assert opt_g.param_groups[0]["lr"] == 0.1
    for step in range(50):
        train_step(model_t, opt_t, step)
        opt_g.zero_grad()
        loss_of(model_g, step).backward()
        opt_g.step(factor=0.5)
    # lr 0.05 on g vs lr 0.1 on g/2: equal up to rounding
    assert_params_close(model_g, model_t, atol=1e-12, rtol=1e-10)
    loss_of(model_g, 0).backward()
    with pytest.raises(TypeError, match="factor"):
        opt_g.step()
    with pytest.raises(TypeError, match="foo"):
        opt_g.step(factor=0.5, foo=1)


# --- the user's grads are never written ---------------------------------------------------------------


GRAD_CASES = {
    "sgd": lambda: gx.sgd(0.1),
    "sgd_maximize": lambda: gx.sgd(0.1, maximize=True),
    "sgd_weight_decay": lambda: gx.sgd(0.1, weight_decay=0.1),
    "sgd_momentum": lambda: gx.sgd(0.1, momentum=0.9),
    "sgd_nesterov_wd_maximize": lambda: gx.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
    "sgd_dampening": lambda: gx.sgd(0.1, momentum=0.9, dampening=0.5),
    "adam_wd": lambda: gx.adam(1e-2, weight_decay=0.1),
    "adamw_amsgrad_maximize": lambda: gx.adamw(1e-2, amsgrad=True, maximize=True),
    "clip_then_sgd": lambda: gx.chain(gx.clip_by_global_norm(1e-3), gx.sgd(0.1)),
    "bare_scale": lambda: gx.scale(-0.1),
    "identity": lambda: gx.identity(),
}


@pytest.mark.parametrize("make_tx", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_step_never_modifies_grads(make_tx):
    model = make_model()
    opt = gx.Optimizer(model.parameters(), make_tx())
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        grads = [p.grad for p in model.parameters()]
        saved = [g.clone() for g in grads]
        opt.step()
        for p, g, s in zip(model.parameters(), grads, saved):
            assert p.grad is g
            assert torch.equal(g, s)
        # a second step on the same grads (gradient accumulation without zero_grad) reads the same values
        opt.step()
        for g, s in zip(grads, saved):
            assert torch.equal(g, s)


def test_step_never_modifies_complex_grads():
    x, y, w0, b0 = _complex_problem()
    ps = [nn.Parameter(w0.clone()), nn.Parameter(b0.clone())]
    opt = gx.Optimizer(ps, gx.sgd(0.1, weight_decay=0.1, maximize=True))
    for _ in range(3):
        opt.zero_grad()
        (x @ ps[0] + ps[1] - y).abs().pow(2).mean().backward()
        saved = [p.grad.clone() for p in ps]
        opt.step()
        for p, s in zip(ps, saved):
            assert torch.equal(p.grad, s)


def test_param_groups_given_as_generators_keep_their_params():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = gx.Optimizer([{"params": model[0].parameters()}, {"params": model[1].parameters(), "tx": gx.sgd(0.1)}],
                       gx.adamw(1e-3))
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    # a group with its own transform shows its own hyperparameters, not the default's
    assert "betas" not in opt.param_groups[1] and opt.param_groups[1]["lr"] == 0.1
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


# --- the fused lowering ------------------------------------------------------------------------

FUSED_CASES = {
    "adamw": (dict(lr=1e-2, weight_decay=0.05), gx.adamw, torch.optim.AdamW),
    "adamw_amsgrad_maximize": (dict(lr=1e-2, amsgrad=True, maximize=True), gx.adamw, torch.optim.AdamW),
    "adam_wd": (dict(lr=1e-2, weight_decay=0.05), gx.adam, torch.optim.Adam),
}


@needs("cpu_fused_adam")
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_lowering_is_bit_identical_to_torch_fused(case):
    """gx.adam/adamw in the adapter run torch's fused kernel: bitwise torch.optim(fused=True)."""
    kw, gx_fn, torch_cls = FUSED_CASES[case]
    torch.manual_seed(0)
    model_t = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model_g = copy.deepcopy(model_t)
    opt_t = torch_cls(model_t.parameters(), fused=True, **kw)
    opt_g = gx.Optimizer(model_g.parameters(), gx_fn(**kw), fused=True)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, 10, 0.5)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, 10, 0.5)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        for m, o in ((model_t, opt_t), (model_g, opt_g)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        sched_t.step()
        sched_g.step()
    for a, b in zip(model_t.parameters(), model_g.parameters()):
        assert torch.equal(a, b)


@needs("cpu_fused_adam")
def test_fused_and_generic_paths_agree_and_share_the_state_layout():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = [gx.Optimizer(models[0].parameters(), gx.adamw(1e-2, amsgrad=True), fused=True),
            gx.Optimizer(models[1].parameters(), gx.adamw(1e-2, amsgrad=True), fused=False)]
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)) for _ in range(40)]

    def run(model, opt, data):
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    for m, o in zip(models, opts):
        run(m, o, batches)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint of the fused run resumes on the generic path (same state layout)
    half = gx.Optimizer(models[2].parameters(), gx.adamw(1e-2, amsgrad=True), fused=True)
    run(models[2], half, batches[:20])
    resumed = gx.Optimizer(models[2].parameters(), gx.adamw(1e-2, amsgrad=True), fused=False)
    resumed.load_state_dict(half.state_dict())
    run(models[2], resumed, batches[20:])
    for a, b in zip(models[2].parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_true_rejects_what_it_cannot_lower():
    p = [torch.nn.Parameter(torch.ones(2))]
    opt = gx.Optimizer(p, gx.adamw(gx.cosine_decay_schedule(1e-2, 10)), fused=True)
    p[0].grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="`fused=True` requires .*this step cannot take one: no fused lowering"):
        opt.step()
    # a declared lowering whose preconditions fail on this step: named
    base = torch.zeros(4, 3, 2)
    w = torch.nn.Parameter(base[..., 0])
    w.grad = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match="not contiguous"):
        gx.Optimizer([w], gx.adamw(1e-2), fused=True).step()


def _lowered_and_generic(make, steps, lowered_fused=None):
    """Train twin MLPs on the same batches, one with ``gx.Optimizer(..., make(), fused=lowered_fused)``
    (the lowered path) and one with ``fused=False`` (the generic path), checking at every step that
    ``.grad`` is left untouched by both. Returns the two models and the two optimizers."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [gx.Optimizer(models[0].parameters(), make(), fused=lowered_fused),
            gx.Optimizer(models[1].parameters(), make(), fused=False)]
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        for m, o in zip(models, opts):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            before = [p.grad.clone() for p in m.parameters()]
            o.step()
            assert all(torch.equal(p.grad, b) for p, b in zip(m.parameters(), before))
    return models, opts


def _assert_same_params_and_state(models, opts):
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(gx.tree.tree_flatten(opts[0].tx_state(0))[0], gx.tree.tree_flatten(opts[1].tx_state(0))[0]):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs("cpu_fused_adam")
@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clipping", "not-clipping"])
def test_fused_clip_adamw_matches_generic_path(max_norm):
    """chain(clip_by_global_norm, adamw) is lowered too (fused=True: it must be): the clipped
    gradients go to scratch buffers, .grad stays untouched, and the result equals the generic
    path, state included."""
    make = lambda: gx.chain(gx.clip_by_global_norm(max_norm), gx.adamw(1e-2))  # noqa: E731
    assert gx.fastpath.lowering_of(make()) is not None
    _assert_same_params_and_state(*_lowered_and_generic(make, 30, lowered_fused=True))


CLIPPED_SGD_LOWERING = [
    ("norm", dict(level=0.05)),
    ("layer_wise", dict(level=0.02)),
    ("coordinate_wise", dict(level=0.01)),
    ("auto", dict(q=0.5, history=8)),
    ("linear_rand_norm", dict(level=0.05, beta=0.5)),
    ("quadratic_rand_autoclip", dict(q=0.5, beta=0.5)),
]


CHAIN_RULES = {
    "norm": lambda: gx.clip_by_global_norm(0.05),
    "layer_wise": lambda: gx.clip_by_leaf_norm(0.02),
    "coordinate_wise": lambda: gx.clip(0.01),
    "auto": lambda: gx.autoclip(0.5, history=8),
    "random": lambda: gx.random_clip_by_global_norm(0.05, beta=0.5),
}


@needs("cpu_fused_sgd")
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("rule", list(CHAIN_RULES))
def test_chain_rule_sgd_lowering_matches_generic_path(rule, momentum):
    """gx.chain(<global-factor clip rule>, gx.sgd(lr, momentum)) runs on torch's fused SGD kernel
    and equals the generic path; per-leaf and elementwise rules are not lowered (fused=True
    raises) and run the generic path."""
    make = lambda: gx.chain(CHAIN_RULES[rule](), gx.sgd(0.1, momentum=momentum))  # noqa: E731
    lowered = rule in ("norm", "auto", "random")
    assert (gx.fastpath.lowering_of(make()) is not None) == lowered
    if not lowered:
        with pytest.raises(RuntimeError, match="no fused lowering"):
            _lowered_and_generic(make, 1, lowered_fused=True)
    _assert_same_params_and_state(*_lowered_and_generic(make, 25, lowered_fused=True if lowered else None))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("rule,kw", CLIPPED_SGD_LOWERING, ids=[r for r, _ in CLIPPED_SGD_LOWERING])
def test_clipped_sgd_lowering_matches_generic_path(rule, kw, momentum):
    """The adapter folds the clip factor into the momentum step for clipped_sgd: same params and
    the same state (AutoClip history, seeded counter, stats, momentum) as the generic path, and
    the user's .grad untouched."""
    make = lambda: gx.clipped_sgd(0.1, momentum=momentum, rule=rule, **kw)  # noqa: E731
    _assert_same_params_and_state(*_lowered_and_generic(make, 25))


_COMPILED_STEP_TXS = {
    # lowered eagerly onto torch's fused Adam / SGD kernels: the generic path runs when compiled
    "adamw": (lambda: gx.adamw(1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
    "clip+adamw": (lambda: gx.chain(gx.clip_by_global_norm(0.1), gx.adamw(1e-2)), None),
    "sgd": (lambda: gx.sgd(1e-2, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)),
    "autoclip+sgd": (lambda: gx.chain(gx.autoclip(0.5, history=4), gx.sgd(1e-2, momentum=0.9)), None),
}


@needs("compiled_adapter_step")
@pytest.mark.parametrize("name", sorted(_COMPILED_STEP_TXS))
def test_compiled_optimizer_step_equals_eager(name):
    """``torch.compile(opt.step)``, the torch.optim recipe, through the adapter: the same params
    and state as the eager adapter (and as torch.optim where it has the rule), with the lr
    changed by a scheduler between steps. (The eager lowering onto torch's fused kernels is
    skipped under the compiler: AOTAutograd rejected the tensors it hands them.)"""
    make_tx, make_torch = _COMPILED_STEP_TXS[name]
    torch.manual_seed(0)
    X, Y = torch.randn(16, 4), torch.randn(16, 2)

    def run(kind):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = make_torch(list(model.parameters())) if kind == "torch" else gx.Optimizer(model.parameters(), make_tx())
        sched = lrs.StepLR(opt, step_size=2, gamma=0.5)
        torch._dynamo.reset()
        step = torch.compile(opt.step, backend="aot_eager") if kind == "compiled" else opt.step
        for _ in range(5):
            opt.zero_grad()
            F.mse_loss(model(X), Y).backward()
            step()
            sched.step()
        return [p.detach().clone() for p in model.parameters()], opt

    eager, eager_opt = run("eager")
    compiled, compiled_opt = run("compiled")
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sd_e, sd_c = eager_opt.state_dict()["state"], compiled_opt.state_dict()["state"]
    assert sd_e.keys() == sd_c.keys() and len(sd_e) == 4
    for i in sd_e:
        for k in sd_e[i]:
            torch.testing.assert_close(sd_c[i][k], sd_e[i][k], rtol=1e-5, atol=1e-6)
    if make_torch is not None:
        ref, _ = run("torch")
        for a, b in zip(compiled, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the fused Adagrad lowering ----------------------------------------------------------------

ADAGRAD_CASES = {
    "default": dict(lr=5e-2),
    "all_options": dict(lr=5e-2, lr_decay=1e-2, weight_decay=5e-2, initial_accumulator_value=0.1, eps=1e-8),
    "maximize": dict(lr=5e-2, lr_decay=1e-3, maximize=True),
}


def _adagrad_batches(dtype, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 2, generator=g).to(dtype)) for _ in range(n)]


def _adagrad_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _adagrad_train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@needs("cpu_fused_adagrad")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(ADAGRAD_CASES))
def test_fused_adagrad_equals_torch_fused_and_the_generic_path(case, dtype):
    """gx.adagrad in the adapter with fused=True (the lowering must be taken: otherwise the step
    raises) over 60 steps with a StepLR scheduler and a checkpoint round trip at step 30: bitwise
    torch.optim.Adagrad(fused=True) (the same kernel), equal to torch's foreach Adagrad and to our
    generic path to rounding; the resumed run is bitwise the uninterrupted one; the state keys
    are torch's."""
    kw = ADAGRAD_CASES[case]
    batches = _adagrad_batches(dtype, 60)
    base = _adagrad_model(dtype)
    models = {k: copy.deepcopy(base) for k in ("torch_fused", "torch_foreach", "gx_fused", "gx_generic", "resumed")}
    opts = {
        "torch_fused": torch.optim.Adagrad(models["torch_fused"].parameters(), fused=True, **kw),
        "torch_foreach": torch.optim.Adagrad(models["torch_foreach"].parameters(), foreach=True, **kw),
        "gx_fused": gx.Optimizer(models["gx_fused"].parameters(), gx.adagrad(**kw), fused=True),
        "gx_generic": gx.Optimizer(models["gx_generic"].parameters(), gx.adagrad(**kw), fused=False),
    }
    lowering = gx.fastpath.lowering_of(gx.adagrad(**kw))
    assert lowering is not None and lowering.kernel == gx.fastpath.AdagradKernel(kw.get("maximize", False))
    scheds = {k: lrs.StepLR(o, 10, 0.5) for k, o in opts.items()}
    for k in opts:
        _adagrad_train(models[k], opts[k], batches, scheds[k])
    ref = list(models["torch_fused"].parameters())
    for a, b in zip(ref, models["gx_fused"].parameters()):
        assert torch.equal(a, b)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for k in ("torch_foreach", "gx_generic"):
        for a, b in zip(ref, models[k].parameters()):
            torch.testing.assert_close(b, a, **tol)
    p0 = next(models["gx_fused"].parameters())
    assert set(opts["gx_fused"].state[p0]) == set(opts["torch_fused"].state[next(models["torch_fused"].parameters())])
    for a, b in zip(opts["torch_fused"].state.values(), opts["gx_fused"].state.values()):
        assert torch.equal(a["sum"], b["sum"]) and float(a["step"]) == float(b["step"]) == 60.0

    # checkpoint round trip mid-run: fused before and after, bitwise the uninterrupted run
    m = models["resumed"]
    first = gx.Optimizer(m.parameters(), gx.adagrad(**kw), fused=True)
    sched = lrs.StepLR(first, 10, 0.5)
    _adagrad_train(m, first, batches[:30], sched)
    buf = io.BytesIO()
    torch.save({"opt": first.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    second = gx.Optimizer(m.parameters(), gx.adagrad(**kw), fused=True)
    second.load_state_dict(ck["opt"])
    sched = lrs.StepLR(second, 10, 0.5)
    sched.load_state_dict(ck["sched"])
    _adagrad_train(m, second, batches[30:], sched)
    for a, b in zip(models["gx_fused"].parameters(), m.parameters()):
        assert torch.equal(a, b)


@needs("cpu_fused_adagrad")
def test_default_path_takes_the_fused_adagrad_kernel(monkeypatch):
    """The default (fused=None) runs torch's kernel on every step: counted through a wrapper of
    ``torch._fused_adagrad_`` (the capability check probes the wrapper once), and fused=False
    never calls it."""
    calls = []
    kernel = torch._fused_adagrad_

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adagrad_", counting)
    batches = _adagrad_batches(torch.float32, 12)
    m = _adagrad_model(torch.float32)
    _adagrad_train(m, gx.Optimizer(m.parameters(), gx.adagrad(0.05, lr_decay=0.01)), batches)
    assert calls[-12:] == [4] * 12 and len(calls) <= 13  # 12 steps over the 4 params (+ one probe)
    calls.clear()
    _adagrad_train(m, gx.Optimizer(m.parameters(), gx.adagrad(0.05), fused=False), batches)
    assert calls == []


@needs("cpu_fused_adagrad")
def test_torch_fused_adagrad_state_dict_continues_on_the_fused_lowering():
    """A torch.optim.Adagrad(fused=True) checkpoint (float32 ``step``) loads into the twin, whose
    next steps run on the kernel and stay bitwise equal to torch's."""
    kw = ADAGRAD_CASES["all_options"]
    batches = _adagrad_batches(torch.float32, 20)
    m_t, m_g = _adagrad_model(torch.float32), _adagrad_model(torch.float32)
    opt_t = torch.optim.Adagrad(m_t.parameters(), fused=True, **kw)
    _adagrad_train(m_t, opt_t, batches[:10])
    m_g.load_state_dict(m_t.state_dict())
    opt_g = gx.Optimizer(m_g.parameters(), gx.adagrad(**kw), fused=True)
    opt_g.load_state_dict(copy.deepcopy(opt_t.state_dict()))  # a checkpoint: torch's own buffers stay torch's
    _adagrad_train(m_t, opt_t, batches[10:])
    _adagrad_train(m_g, opt_g, batches[10:])
    for a, b in zip(m_t.parameters(), m_g.parameters()):
        assert torch.equal(a, b)


@needs("cpu_fused_adagrad")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_adagrad_low_precision_is_lowered_as_torch(dtype):
    """torch's CPU kernel takes float16/bfloat16 (computing in float32): the lowering takes them
    (fused=True) and equals torch.optim.Adagrad(fused=True) bitwise."""
    batches = _adagrad_batches(dtype, 10)
    m_t, m_g = _adagrad_model(dtype), _adagrad_model(dtype)
    opt_t = torch.optim.Adagrad(m_t.parameters(), fused=True, lr=1e-2, lr_decay=1e-2, weight_decay=1e-2)
    opt_g = gx.Optimizer(m_g.parameters(), gx.adagrad(1e-2, lr_decay=1e-2, weight_decay=1e-2), fused=True)
    _adagrad_train(m_t, opt_t, batches)
    _adagrad_train(m_g, opt_g, batches)
    for a, b in zip(m_t.parameters(), m_g.parameters()):
        assert torch.equal(a, b)


@needs("cpu_fused_adagrad")
def test_fused_adagrad_lowering_is_refused_for_non_contiguous_params():
    """A strided view param: the lowering names it (fused=True raises) and the default path runs
    the generic update, equal to torch's single-tensor Adagrad, the buffer's other half intact."""
    base = torch.zeros(4, 3, 2)
    w = nn.Parameter(base[..., 0])
    ref = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="not contiguous"):
        w.grad = torch.ones(4, 3)
        gx.Optimizer([w], gx.adagrad(0.1, lr_decay=0.1), fused=True).step()
    opt = gx.Optimizer([w], gx.adagrad(0.1, lr_decay=0.1))
    opt_t = torch.optim.Adagrad([ref], lr=0.1, lr_decay=0.1, foreach=False)
    for k in range(3):
        w.grad = torch.full((4, 3), 1.0 + k)
        ref.grad = torch.full((4, 3), 1.0 + k)
        opt.step()
        opt_t.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(base[..., 1], torch.zeros(4, 3))


@needs("cpu_fused_adagrad")
def test_fused_adagrad_lowering_is_refused_for_sparse_gradients():
    """torch's fused Adagrad rejects sparse gradients; so does the lowering: the default path
    runs gx.adagrad's generic update (torch's per-tensor sparse Adagrad, bit for bit), and
    ``fused=True`` raises, as torch's does."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3, sparse=True)
    ref = nn.Embedding(5, 3, sparse=True)
    ref.load_state_dict(emb.state_dict())
    for m in (emb, ref):
        m(torch.tensor([0, 2, 0])).sum().backward()
    lowering = gx.fastpath.lowering_of(gx.adagrad(0.1))
    state = gx.adagrad(0.1).init([emb.weight.detach()])
    assert "sparse" in lowering.unsupported([emb.weight], [emb.weight.grad], state)
    gx.Optimizer(emb.parameters(), gx.adagrad(0.1)).step()
    torch.optim.Adagrad(ref.parameters(), lr=0.1).step()
    assert torch.equal(emb.weight, ref.weight)
    with pytest.raises(RuntimeError, match="fused=True"):
        gx.Optimizer(emb.parameters(), gx.adagrad(0.1), fused=True).step()


@needs("cpu_fused_adagrad")
@pytest.mark.parametrize("rule", ["leaf_norm", "coordinate", "global_norm"])
def test_clipped_adagrad_is_lowered_only_with_a_global_factor(rule):
    """chain(clip, adagrad): a per-leaf or elementwise clip is not covered by the lowering
    (fused=True raises; the default path runs the generic update, bitwise equal to fused=False);
    a global-norm clip is (its factor scales the gradients the kernel reads): fused=True runs,
    equal to the generic path to rounding, state included."""
    clip = {"leaf_norm": lambda: gx.clip_by_leaf_norm(0.02), "coordinate": lambda: gx.clip(0.01),
            "global_norm": lambda: gx.clip_by_global_norm(0.05)}[rule]
    make = lambda: gx.chain(clip(), gx.adagrad(5e-2, lr_decay=1e-2, weight_decay=1e-2))  # noqa: E731
    lowered = rule == "global_norm"
    assert (gx.fastpath.lowering_of(make()) is not None) == lowered
    if not lowered:
        with pytest.raises(RuntimeError, match="no fused lowering"):
            _lowered_and_generic(make, 1, lowered_fused=True)
        models, opts = _lowered_and_generic(make, 25)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
    else:
        _assert_same_params_and_state(*_lowered_and_generic(make, 25, lowered_fused=True))


def test_adagrad_without_the_kernel_in_torch_takes_the_generic_path(monkeypatch):
    """A torch without ``torch._fused_adagrad_`` (torch 2.1): the capability check, given a torch
    namespace that lacks it, says so; with the op removed from ``torch`` the adapter's default
    path runs the generic update (the op cannot be called: it is gone), equal to torch.optim's
    foreach Adagrad, and fused=True names the reason."""
    import types

    assert not gx.fastpath.kernel_supported("_fused_adagrad_", "cpu", ops=types.SimpleNamespace())
    lowering = gx.fastpath.lowering_of(gx.adagrad(0.1))
    w = torch.zeros(3)
    why = lowering.unsupported([w], [torch.ones(3)], gx.adagrad(0.1).init([w]), ops=types.SimpleNamespace())
    assert why is not None and "_fused_adagrad_ does not run on cpu" in why
    if hasattr(torch, "_fused_adagrad_"):
        monkeypatch.delattr(torch, "_fused_adagrad_")
    kw = ADAGRAD_CASES["all_options"]
    batches = _adagrad_batches(torch.float64, 20)
    m_t, m_g = _adagrad_model(torch.float64), _adagrad_model(torch.float64)
    opt_t = torch.optim.Adagrad(m_t.parameters(), foreach=True, **kw)
    opt_g = gx.Optimizer(m_g.parameters(), gx.adagrad(**kw))
    _adagrad_train(m_t, opt_t, batches)
    _adagrad_train(m_g, opt_g, batches)
    for a, b in zip(m_t.parameters(), m_g.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="_fused_adagrad_ does not run on cpu"):
        gx.Optimizer(m_g.parameters(), gx.adagrad(**kw), fused=True).step()
