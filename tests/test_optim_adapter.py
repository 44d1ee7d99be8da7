"""Regression tests for ``gx.Optimizer`` as a true ``torch.optim.Optimizer``: each defect found by
running torch's own tooling against the first adapter, with the snippet that showed it, checked
against torch.optim or a hand-computed value."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import gradxform as gx


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _same_params(a: nn.Module, b: nn.Module, exact: bool = False) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


PATHS = [False, None]  # the generic path, and the default (fused lowering where it applies)


@pytest.mark.parametrize("fused", PATHS, ids=["generic", "default"])
def test_non_contiguous_param_is_updated_and_memory_around_it_untouched(fused):
    """A view param (every other element of a buffer): the fused kernel would read it as
    contiguous and write the neighbouring elements; the lowering refuses it and the step equals
    torch's Adam with the buffer's other half untouched."""
    base = torch.zeros(4, 3, 2)
    w = nn.Parameter(base[..., 0])
    w.grad = torch.ones(4, 3)
    ref = nn.Parameter(torch.zeros(4, 3))
    ref.grad = torch.ones(4, 3)
    gx.Optimizer([w], gx.adam(0.1), fused=fused).step()
    torch.optim.Adam([ref], lr=0.1, foreach=False).step()
    assert torch.equal(w.detach(), ref.detach())
    assert torch.equal(base[..., 1], torch.zeros(4, 3))


@pytest.mark.parametrize("fused", PATHS, ids=["generic", "default"])
def test_state_follows_its_param_when_groups_are_reordered(fused):
    """State is keyed by param, as torch's: reversing param_groups (different param counts and
    shapes per group) keeps each param's moments, equal to torch.optim doing the same."""
    ma, mb = _model(), _model()
    groups = lambda m: [{"params": [m[0].weight, m[0].bias]}, {"params": [m[2].weight, m[2].bias], "lr": 0.02}]  # noqa: E731
    opt_g = gx.Optimizer(groups(ma), gx.adamw(0.01), fused=fused)
    opt_t = torch.optim.AdamW(groups(mb), lr=0.01, foreach=False)
    for k in range(3):
        _step(ma, opt_g, k)
        _step(mb, opt_t, k)
    opt_g.param_groups.reverse()
    opt_t.param_groups.reverse()
    for k in range(3, 6):
        _step(ma, opt_g, k)
        _step(mb, opt_t, k)
    _same_params(ma, mb)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(opt_g.state[p]["exp_avg_sq"], opt_t.state[q]["exp_avg_sq"], rtol=1e-10, atol=1e-14)
        assert int(opt_g.state[p]["step"]) == int(opt_t.state[q]["step"]) == 6


def test_dcp_state_dict_takes_no_hidden_step_and_round_trips():
    """torch.distributed.checkpoint's get_optimizer_state_dict steps an optimizer whose
    opt.state is empty; with the state in opt.state it reads it as it is, plain and flattened,
    and set_optimizer_state_dict restores it."""
    dcp_sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = _model()
    sched = gx.warmup_cosine_decay_schedule(0.0, 0.05, 2, 20)
    opt = gx.Optimizer(model.parameters(), gx.adamw(sched))
    for k in range(3):
        _step(model, opt, k)
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    before = copy.deepcopy(opt.state_dict())
    for flat in (False, True):
        options = dcp_sd.StateDictOptions(flatten_optimizer_state_dict=flat)
        saved = dcp_sd.get_optimizer_state_dict(model, opt, options=options)
        saved = copy.deepcopy(saved)
        for _ in range(2):
            dcp_sd.get_optimizer_state_dict(model, opt, options=options)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        now = opt.state_dict()
        for pid, entries in before["state"].items():
            for key, value in entries.items():
                assert torch.equal(now["state"][pid][key], value), (flat, pid, key)
        # restore into a fresh twin: it continues exactly as the original
        twin = copy.deepcopy(model)
        opt2 = gx.Optimizer(twin.parameters(), gx.adamw(sched))
        dcp_sd.set_optimizer_state_dict(twin, opt2, saved, options=options)
        ref = copy.deepcopy(model)
        opt_ref = copy.deepcopy(opt)
        opt_ref = gx.Optimizer(ref.parameters(), gx.adamw(sched))
        opt_ref.load_state_dict(copy.deepcopy(before))
        for k in range(3, 5):
            _step(twin, opt2, k)
            _step(ref, opt_ref, k)
        _same_params(twin, ref, exact=True)


def test_all_four_state_dict_hooks_run_and_float64_checkpoint_is_cast():
    calls = []
    model = _model()
    opt = gx.Optimizer(model.parameters(), gx.adam(0.01))
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("post", sorted(sd))))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _step(model, opt, 0)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == ["pre", ("post", ["param_groups", "state"]), "load_pre", "load_post"]
    # a float64 checkpoint into float32 params: floating state cast to the params' dtype (as
    # torch does), the step count kept an integer; the next step runs and equals torch's
    model32 = copy.deepcopy(model).float()
    opt32 = gx.Optimizer(model32.parameters(), gx.adam(0.01))
    opt32.load_state_dict(copy.deepcopy(sd))
    w = model32[0].weight
    assert opt32.state[w]["exp_avg"].dtype == torch.float32 and opt32.state[w]["step"].dtype == torch.int64
    ref32 = copy.deepcopy(model).float()
    opt_t = torch.optim.Adam(ref32.parameters(), lr=0.01, foreach=False)
    opt_t.load_state_dict(copy.deepcopy(sd))
    model32.zero_grad()
    ref32.zero_grad()
    x = torch.randn(3, 5)
    model32(x).sum().backward()
    ref32(x).sum().backward()
    opt32.step()
    opt_t.step()
    for p, q in zip(model32.parameters(), ref32.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _torch_sgd_takes_tensor_lr() -> bool:
    """Whether this torch's single-tensor SGD accepts a tensor lr of shape (1,) (torch 2.1's does
    not: ``add_(): argument 'alpha' must be Number, not Tensor``)."""
    p = nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    try:
        torch.optim.SGD([p], lr=torch.tensor([0.1]), momentum=0.9, foreach=False).step()
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("fused", PATHS, ids=["generic", "default"])
def test_group_maximize_and_tensor_lr_as_torch(fused):
    """A group's own maximize=True (not the transform's) and tensor learning rates of shape ()
    and (1,) give torch's numbers (torch's with the same rates as floats where its SGD takes no
    tensor lr of shape (1,), as on torch 2.1)."""
    ma, mb = _model(), _model()
    lr1 = torch.tensor([0.01])
    groups_g = [{"params": ma[0].parameters(), "maximize": True, "lr": lr1.clone()},
                {"params": ma[2].parameters(), "lr": torch.tensor(0.02)}]
    ref_lr = (lambda t: t.clone()) if _torch_sgd_takes_tensor_lr() else (lambda t: float(t))  # noqa: E731
    groups_t = [{"params": mb[0].parameters(), "maximize": True, "lr": ref_lr(lr1)},
                {"params": mb[2].parameters(), "lr": ref_lr(torch.tensor(0.02))}]
    opt_g = gx.Optimizer(groups_g, gx.sgd(0.1, momentum=0.9), fused=fused)
    opt_t = torch.optim.SGD(groups_t, lr=0.1, momentum=0.9, foreach=False)
    for k in range(4):
        _step(ma, opt_g, k)
        _step(mb, opt_t, k)
    _same_params(ma, mb)
    bad = gx.Optimizer([{"params": _model().parameters(), "lr": torch.tensor([0.1, 0.2])}], gx.sgd(0.1))
    for p in bad.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"group 0: 'lr' is a tensor of shape \(2,\)"):
        bad.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_takes_sparse_gradients_as_torch(momentum):
    emb_g = nn.Embedding(10, 3, sparse=True).double()
    emb_t = copy.deepcopy(emb_g)
    opt_g = gx.Optimizer(emb_g.parameters(), gx.sgd(0.1, momentum=momentum, maximize=True))
    opt_t = torch.optim.SGD(emb_t.parameters(), lr=0.1, momentum=momentum, maximize=True)
    for k in range(3):
        idx = torch.tensor([k, 2, 7])
        for emb, opt in ((emb_g, opt_g), (emb_t, opt_t)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
    _same_params(emb_g, emb_t)
    adam = gx.Optimizer(emb_g.parameters(), gx.adam(0.1))
    emb_g(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient: only gx.sgd"):
        adam.step()


def test_deepcopy_and_pickle_keep_the_state_and_continue_equal():
    """copy.deepcopy(opt) copies its params and their state together (torch's __getstate__
    alone would drop the transforms); the copy steps on its own copies and equals the original.
    Pickling rebuilds the aliases from their names and arguments."""
    model = _model()
    opt = gx.Optimizer(model.parameters(), gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.01)))
    for k in range(2):
        _step(model, opt, k)
    clone = copy.deepcopy(opt)
    assert clone.transforms[0] is opt.transforms[0]
    for p, q in zip(opt.param_groups[0]["params"], clone.param_groups[0]["params"]):
        q.grad = p.grad.clone()  # its params are copies (without grads)
    clone.step()
    opt.step()
    for p, q in zip(opt.param_groups[0]["params"], clone.param_groups[0]["params"]):
        assert p is not q and torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], clone.state[q]["exp_avg"])
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    for k in range(3, 5):
        _step(model, opt, k)
        _step(model2, opt2, k)
    _same_params(model, model2, exact=True)


def test_pickling_a_user_transform_says_what_to_do():
    tx = gx.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))
    opt = gx.Optimizer(_model().parameters(), tx)
    with pytest.raises(pickle.PicklingError, match="not by a gradxform factory.*state_dict"):
        pickle.dumps(opt)
    assert "GradientTransformation(" in repr(tx)


def test_torch_state_dict_loads_into_the_twin_and_back():
    """A torch.optim.AdamW state dict (float32 step tensors, no shared entries) continues equal
    in gx.adamw, and gx.adamw's state dict continues equal in torch.optim.AdamW."""
    m_t, m_g = _model(), _model()
    opt_t = torch.optim.AdamW(m_t.parameters(), lr=0.01, foreach=False)
    for k in range(3):
        _step(m_t, opt_t, k)
    m_g.load_state_dict(m_t.state_dict())
    opt_g = gx.Optimizer(m_g.parameters(), gx.adamw(0.01))
    opt_g.load_state_dict(copy.deepcopy(opt_t.state_dict()))
    for k in range(3, 6):
        _step(m_t, opt_t, k)
        _step(m_g, opt_g, k)
    _same_params(m_g, m_t)
    back = _model(1)
    back.load_state_dict(m_g.state_dict())
    opt_back = torch.optim.AdamW(back.parameters(), lr=0.01, foreach=False)
    opt_back.load_state_dict(copy.deepcopy(opt_g.state_dict()))
    for k in range(6, 8):
        _step(m_g, opt_g, k)
        _step(back, opt_back, k)
    _same_params(m_g, back)


def test_old_checkpoint_is_refused_with_a_clear_message():
    """A state dict that names buffers neither as torch nor as this adapter does."""
    model = _model()
    opt = gx.Optimizer(model.parameters(), gx.adamw(0.01))
    _step(model, opt, 0)
    sd = opt.state_dict()
    sd["state"][1] = {"1.inner_state.0.mu": sd["state"][1]["exp_avg"]}
    fresh = gx.Optimizer(_model().parameters(), gx.adamw(0.01))
    with pytest.raises(ValueError, match=r"param 1 has \['1.inner_state.0.mu'\].*unknown.*missing \['exp_avg'"):
        fresh.load_state_dict(sd)
    assert fresh.state_dict()["state"] == {}


def test_save_load_through_torch_save_weights_only():
    model = _model()
    opt = gx.Optimizer(model.parameters(), gx.chain(gx.autoclip(0.9, history=4), gx.adamw(0.01)))
    for k in range(3):
        _step(model, opt, k)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    m2 = copy.deepcopy(model)
    opt2 = gx.Optimizer(m2.parameters(), gx.chain(gx.autoclip(0.9, history=4), gx.adamw(0.01)))
    opt2.load_state_dict(loaded)
    for k in range(3, 6):
        _step(model, opt, k)
        _step(m2, opt2, k)
    _same_params(model, m2, exact=True)


def test_a_checkpoint_of_the_first_adapter_still_loads():
    """gradxform 0.1's adapter saved buffers by dotted path and the group's other tensors under
    param_groups[i]["tx_state"]: such a checkpoint loads and continues bit for bit."""
    model = _model()
    opt = gx.Optimizer(model.parameters(), gx.chain(gx.autoclip(0.9, history=4), gx.adamw(0.01)))
    for k in range(3):
        _step(model, opt, k)
    sd = opt.state_dict()
    old = {"state": {}, "param_groups": []}
    layout = opt._layout_for(opt.transforms[0], list(model.parameters()))
    group = {k: v for k, v in sd["param_groups"][0].items() if k not in ("tx_index", "fused", "foreach", "capturable",
                                                                              "differentiable", "tx_state")}
    group["gradxform_format"], group["tx_state"] = 1, {}
    for (i, key), path in zip(layout.records, layout.paths):
        if i is None and key in sd["param_groups"][0]["tx_state"]:
            group["tx_state"][path] = sd["param_groups"][0]["tx_state"][key]
        elif i is not None and i >= 0 and key in sd["state"][i]:
            old["state"].setdefault(i, {})[path] = sd["state"][i][key]
    old["param_groups"].append(group)
    assert "1.inner_state.0.mu" in old["state"][0] and "0.buf" in group["tx_state"]
    m2 = copy.deepcopy(model)
    opt2 = gx.Optimizer(m2.parameters(), gx.chain(gx.autoclip(0.9, history=4), gx.adamw(0.01)))
    opt2.load_state_dict(copy.deepcopy(old))  # (torch shares uncast tensors with the dict it loads)
    for k in range(3, 5):
        _step(model, opt, k)
        _step(m2, opt2, k)
    _same_params(model, m2, exact=True)


@pytest.mark.parametrize("fused", PATHS, ids=["generic", "default"])
def test_momentum_switched_on_mid_run_starts_its_buffer_as_torch(fused):
    """A group's momentum set from 0 to 0.9 after some steps: the alias is rebuilt with its
    momentum block and the buffer starts at the next gradient, as torch.optim.SGD creates it."""
    ma, mb = _model(), _model()
    opt_g = gx.Optimizer(ma.parameters(), gx.sgd(0.05), fused=fused)
    opt_t = torch.optim.SGD(mb.parameters(), lr=0.05, foreach=False)
    for k in range(6):
        if k == 3:
            opt_g.param_groups[0]["momentum"] = opt_t.param_groups[0]["momentum"] = 0.9
        _step(ma, opt_g, k)
        _step(mb, opt_t, k)
    _same_params(ma, mb)
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(opt_g.state[p]["momentum_buffer"], opt_t.state[q]["momentum_buffer"])


def test_a_missing_extra_argument_is_named_as_opt_step_takes_it():
    w = nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    with pytest.raises(TypeError, match=r"not given to opt.step\(\); pass it as opt.step\(sum_grad_squared=\.\.\.\)"):
        gx.Optimizer([w], gx.tg_adamw(0.1)).step()


def test_transform_repr_names_the_factory_and_its_arguments():
    assert repr(gx.adamw(0.1)) == "adamw(lr=0.1, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, amsgrad=False, maximize=False)"
    assert repr(gx.chain(gx.clip_by_global_norm(1.0), gx.scale(-0.1))).startswith("chain(clip_by_global_norm(max_norm=1.0), scale(")


def test_fused_clip_with_an_overflowing_norm_takes_the_generic_rescue():
    """Finite float32 gradients whose norm overflows: the generic clip recomputes the norm in
    float64 (eager CPU); the fused path hands such a step to it, so both give the same step."""
    ws = [nn.Parameter(torch.zeros(4)) for _ in range(2)]
    for w in ws:
        w.grad = torch.full((4,), 3e38)
    for fused in (None, False):
        for w in ws:
            w.data.zero_()
        gx.Optimizer([ws[0]], gx.chain(gx.clip_by_global_norm(1.0), gx.sgd(0.1)), fused=fused).step()
        assert torch.isfinite(ws[0]).all()
        torch.testing.assert_close(ws[0].detach(), torch.full((4,), -0.1 * 0.5))
