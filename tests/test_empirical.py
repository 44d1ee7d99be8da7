"""Empirical init (gradxform.empirical): a hand-computed fixed point, the folded convention, the pillars on
a deep MLP, depth-independent pass counts, layer kinds, and input checks."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import gradxform as gx

F64 = torch.float64


def _batches(in_shape, n_classes, seed=0, dtype=torch.float32, ints=None):
    """An endless stream of fresh random batches with random labels (as the reference's
    get_input / get_loss)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        if ints is not None:
            x = torch.randint(0, ints, in_shape, generator=g)
        else:
            x = torch.randn(in_shape, generator=g, dtype=dtype)
        yield x, torch.randint(0, n_classes, (in_shape[0],), generator=g)


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- hand-computed -------------------------------------------------------------------------------


W1 = [[1.0, 2.0], [3.0, -1.0]]
W2 = [[1.0, -1.0]]
A1 = 1 / math.sqrt(3.75)
A2 = 1 / (A1 * math.sqrt(6.5))
C1 = 2 / (A1**2 * A2)
C2 = 6.5 / math.sqrt(12.125)


def _chain_54():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)).to(F64)
    params = {"0.weight": torch.tensor(W1, dtype=F64), "1.weight": torch.tensor(W2, dtype=F64)}
    return model, params


@pytest.mark.parametrize("iters", [(0, 0), (5, 20)])
def test_numerical_check_5_4(iters):
    model, params = _chain_54()
    x = torch.eye(2, dtype=F64)
    new, mult, rep = gx.empirical_init(model, params, itertools.repeat((x, None)), lambda o, y: o.mean(),
                                       reinit=False, act_iters=iters[0], upd_iters=iters[1])
    a, c = rep.extra["a"], rep.extra["c"]
    # hand values (the exact fixed point); the damped refinements leave them unchanged
    assert A1 == pytest.approx(0.5163977795, rel=1e-9) and A2 == pytest.approx(0.7595545253, rel=1e-9)
    assert C1 == pytest.approx(9.874208829, rel=1e-9) and C2 == pytest.approx(1.866691212, rel=1e-9)
    for got, want in [(a["0"], A1), (a["1"], A2), (c["0"], C1), (c["1"], C2)]:
        assert got == pytest.approx(want, rel=1e-9)
    # folded params and multipliers
    torch.testing.assert_close(new["0.weight"], A1 * params["0.weight"], rtol=1e-12, atol=0)
    torch.testing.assert_close(new["1.weight"], A2 * params["1.weight"], rtol=1e-12, atol=0)
    assert float(mult["0.weight"]) == pytest.approx(C1 * A1**2, rel=1e-9)
    assert float(mult["1.weight"]) == pytest.approx(C2 * A2**2, rel=1e-9)
    assert rep.extra["pillar1"] == pytest.approx({"0": 1.0, "1": 1.0}, rel=1e-9)
    assert rep.extra["pillar3"] == pytest.approx({"0": 1.0, "1": 1.0}, rel=1e-9)
    assert max(rep.objective[1:1 + iters[0]] + rep.objective[2 + iters[0]:], default=0.0) < 1e-12
    assert rep.iterations == 2 + sum(iters)


def test_reference_column_5_4(monkeypatch, capsys):
    ei = pytest.importorskip("empirical_init", reason="the reference package empirical_init is not installed")
    l1, l2 = nn.Linear(2, 2, bias=False).to(F64), nn.Linear(2, 1, bias=False).to(F64)
    fixed = {id(l1): torch.tensor(W1, dtype=F64), id(l2): torch.tensor(W2, dtype=F64)}

    def init_fixed(self):
        with torch.no_grad():
            self.module.weight.copy_(fixed[id(self.module)])

    monkeypatch.setattr(ei.Normed, "init_all_parameters", init_fixed)
    n1, n2 = ei.Normed(l1), ei.Normed(l2)
    for n in (n1, n2):
        for b in ("scale_actv_y", "scale_grad_x", "scale_grad_y"):
            setattr(n, b, torch.tensor(1.0, dtype=F64))
    net = nn.Sequential(n1, n2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ei.empirical_init([n1, n2], net, lambda bs: torch.eye(2, dtype=F64), lambda out: out.mean())
    capsys.readouterr()  # the reference prints (quirk 1)
    assert float(n1.scale_actv_y) == pytest.approx(0.52717354, rel=1e-6)
    assert float(n2.scale_actv_y) == pytest.approx(0.75093533, rel=1e-6)
    c1 = float(n1.scale_grad_y * n2.scale_grad_x * n2.scale_grad_y)
    assert c1 == pytest.approx(9.54365, rel=1e-5)
    assert float(n2.scale_grad_y) == pytest.approx(1.829, rel=1e-3)
    # ours is the fixed point: within ~3% of the reference's early-stopped values
    assert c1 / C1 == pytest.approx(1.0, abs=0.04) and float(n1.scale_actv_y) / A1 == pytest.approx(1.0, abs=0.03)


# --- the transform and the folded convention -----------------------------------------------------


def test_scale_by_empirical_init_multiplies():
    params = {"w": torch.ones(3, 2), "b": torch.ones(2), "frozen": torch.ones(2)}
    tx = gx.scale_by_empirical_init({"w": torch.tensor(2.5), "b": 0.5, "frozen": None})
    state = tx.init(params)
    assert isinstance(state, gx.ScaleByEmpiricalInitState)
    u = {"w": torch.arange(6.0).reshape(3, 2), "b": torch.tensor([1.0, -2.0]), "frozen": None}
    out, state2 = tx.update(u, state)
    torch.testing.assert_close(out["w"], 2.5 * u["w"], rtol=0, atol=0)
    torch.testing.assert_close(out["b"], torch.tensor([0.5, -1.0]), rtol=0, atol=0)
    assert out["frozen"] is None and state2 is state
    with pytest.raises(ValueError, match="scalar"):
        gx.scale_by_empirical_init({"w": torch.ones(2), "b": 1.0, "frozen": 1.0}).init(params)
    with pytest.raises(ValueError, match="structure"):
        gx.scale_by_empirical_init({"w": 1.0}).init(params)


def _ref_forward(x, thetas, a):
    """Reference-style chain: out_l = a_l * linear(h; theta_l), ReLU in between."""
    h = x
    for i, ((w, b), al) in enumerate(zip(thetas, a)):
        h = al * nn.functional.linear(h, w, b)
        if i < len(thetas) - 1:
            h = torch.relu(h)
    return h


def test_folded_sgd_step_equals_reference_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(F64)
    params = {k: torch.randn(v.shape, dtype=F64) for k, v in model.named_parameters()}
    batches = _batches((16, 4), 3, seed=1, dtype=F64)
    new, mult, rep = gx.empirical_init(model, params, batches, _ce, reinit=False, act_iters=2, upd_iters=3)
    a, c = rep.extra["a"], rep.extra["c"]
    names = ["0", "2", "4"]
    x, y = next(_batches((16, 4), 3, seed=7, dtype=F64))
    xt = torch.randn(5, 4, dtype=F64)
    lr = 0.05
    # reference style: theta with a in the forward, SGD step theta -= lr * c * grad
    thetas = [[params[f"{n}.weight"].clone().requires_grad_(), params[f"{n}.bias"].clone().requires_grad_()] for n in names]
    loss = _ce(_ref_forward(x, thetas, [a[n] for n in names]), y)
    grads = torch.autograd.grad(loss, [t for pair in thetas for t in pair])
    stepped = [[w - lr * c[n] * grads[2 * i], b - lr * c[n] * grads[2 * i + 1]] for i, (n, (w, b)) in enumerate(zip(names, thetas))]
    ref_out = _ref_forward(xt, stepped, [a[n] for n in names])
    # folded: plain params for the unmodified module, multipliers c * a^2, one gradxform SGD step
    g = torch.func.grad(lambda p: _ce(functional_call(model, p, (x,)), y))(new)
    tx = gx.chain(gx.scale_by_empirical_init(mult), gx.scale(-lr))
    upd, _ = tx.update(g, tx.init(new), new)
    ours = functional_call(model, gx.apply_updates(new, upd), (xt,))
    torch.testing.assert_close(ours, ref_out.detach(), rtol=1e-10, atol=1e-12)
    # and before the step the two parametrisations compute the same function
    torch.testing.assert_close(functional_call(model, new, (xt,)), _ref_forward(xt, thetas, [a[n] for n in names]).detach(),
                               rtol=1e-12, atol=1e-12)
    for n in names:
        assert float(mult[f"{n}.weight"]) == pytest.approx(c[n] * a[n] ** 2, rel=1e-12)


# --- pillars, pass counts ------------------------------------------------------------------------


def _mlp(depth, width=64, n_out=10, seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(depth - 1):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, n_out))


def _measure_pillars(model, params, mult, x, y):
    """Independent of the report: each Linear's output RMS (pillar 1) and the RMS of the jvp of its
    output along its scale_by_empirical_init-multiplied gradient (pillar 3), plain module."""
    inputs, outs = {}, {}
    lin = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def keep(name):
        def hook(m, i, o):
            inputs[name], outs[name] = i[0].detach(), o.detach()
        return hook

    hs = [m.register_forward_hook(keep(n)) for n, m in lin.items()]
    try:
        g = torch.func.grad(lambda p: _ce(functional_call(model, p, (x,)), y))(params)
    finally:
        for h in hs:
            h.remove()
    tx = gx.scale_by_empirical_init(mult)
    direction, _ = tx.update(g, tx.init(params))
    p1, p3 = {}, {}
    for n, m in lin.items():
        p1[n] = float(outs[n].square().mean().sqrt())
        prim = {"weight": params[f"{n}.weight"], "bias": params[f"{n}.bias"]}
        tang = {"weight": direction[f"{n}.weight"], "bias": direction[f"{n}.bias"]}
        _, d = torch.func.jvp(lambda p, m=m, xin=inputs[n]: functional_call(m, p, (xin,)), (prim,), (tang,))
        p3[n] = float(d.square().mean().sqrt())
    return p1, p3


def test_pillars_deep_relu_mlp():
    model = _mlp(50)
    params = _params(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    new, mult, rep = gx.empirical_init(model, params, _batches((64, 64), 10, seed=1), _ce,
                                       generator=torch.Generator().manual_seed(0))
    assert len(rep.extra["layers"]) == 50
    # PyTorch's default init: the output RMS falls to ~0.06 (the biases keep it from vanishing)
    assert min(rep.act_rms_before.values()) < 0.1
    for seed in (11, 12):
        x, y = next(_batches((64, 64), 10, seed=seed))
        p1, p3 = _measure_pillars(model, new, mult, x, y)
        assert len(p1) == 50
        assert all(0.5 <= v <= 2.0 for v in p1.values()), p1
        assert all(0.5 <= v <= 2.0 for v in p3.values()), p3
    assert all(0.5 <= v <= 2.0 for v in rep.extra["pillar1"].values())
    assert all(0.5 <= v <= 2.0 for v in rep.extra["pillar3"].values())
    assert all(0.5 <= v <= 2.0 for v in rep.act_rms_after.values())
    # objective = max over the 50 layers of |log RMS error| on each iteration's fresh batch:
    # stage A starts far off (N(0, 1) weights), its refinements stay at the batch-noise floor;
    # stage C starts far off (c = 1), its refinements stay at the (larger) gradient-noise floor
    obj = rep.objective
    assert len(obj) == 27 and obj[0] > 1.0 and max(obj[1:6]) < 0.1
    assert obj[6] > 2.0 and max(obj[7:]) < 1.2
    assert (rep.forward_passes, rep.backward_passes) == (30, 22)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_pass_count_does_not_grow_with_depth():
    counts = {}
    for depth in (10, 50):
        model = _mlp(depth, width=16)
        _, _, rep = gx.empirical_init(model, _params(model), _batches((8, 16), 10), _ce, act_iters=2, upd_iters=3)
        counts[depth] = (rep.forward_passes, rep.backward_passes)
        assert rep.extra["layer_jvps"] == depth * (1 + 3 + 1)
    # 5 + act_iters + upd_iters forwards (2 of them measure act_rms_before/after), 2 + upd_iters backwards
    assert counts[10] == counts[50] == (5 + 2 + 3, 2 + 3)


# --- layer kinds ---------------------------------------------------------------------------------


def _assert_ok(rep, new, model, n_layers):
    assert len(rep.extra["layers"]) == n_layers
    assert all(0.5 <= v <= 2.0 for v in rep.extra["pillar1"].values()), rep.extra["pillar1"]
    assert all(0.5 <= v <= 2.0 for v in rep.extra["pillar3"].values()), rep.extra["pillar3"]
    assert all(torch.isfinite(v).all() for v in new.values() if v is not None)


def test_conv2d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    params = _params(model)
    new, mult, rep = gx.empirical_init(model, params, _batches((16, 3, 6, 6), 5), _ce, reinit=False)
    _assert_ok(rep, new, model, 3)
    torch.testing.assert_close(new["0.weight"], rep.extra["a"]["0"] * params["0.weight"])
    assert all(0.5 <= v <= 2.0 for v in rep.act_rms_after.values())


def test_layernorm_reinit_gain_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    new, mult, rep = gx.empirical_init(model, _params(model), _batches((32, 8), 4), _ce,
                                       generator=torch.Generator().manual_seed(3))
    _assert_ok(rep, new, model, 3)
    a_ln = rep.extra["a"]["1"]
    torch.testing.assert_close(new["1.weight"], torch.full((16,), a_ln))  # gain re-drawn as 1, then folded
    assert torch.count_nonzero(new["1.bias"]) == 0 and torch.count_nonzero(new["0.bias"]) == 0
    assert a_ln == pytest.approx(1.0, abs=0.05)  # a LayerNorm output already has RMS 1


class _EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.head = nn.Linear(16, 4)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def test_embedding():
    torch.manual_seed(0)
    model = _EmbedNet()
    new, mult, rep = gx.empirical_init(model, _params(model), _batches((32, 7), 4, ints=50), _ce)
    _assert_ok(rep, new, model, 2)
    assert torch.count_nonzero(new["emb.weight"][0]) == 0  # padding row stays zero
    with pytest.raises(ValueError, match="max_norm"):
        bad = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(4, 2))
        gx.empirical_init(bad, _params(bad), _batches((8, 1), 2, ints=10), _ce)


class _Attn(nn.Module):
    """Pre-norm single-head attention block from Linear layers, residual, mean-pooled head."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln(x)
        w = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1]), -1)
        return self.head((x + self.o(w @ self.v(h))).mean(1))


def test_attention_block_from_linears():
    torch.manual_seed(0)
    model = _Attn()
    new, mult, rep = gx.empirical_init(model, _params(model), _batches((16, 5, 16), 3), _ce)
    _assert_ok(rep, new, model, 6)


class _MHA(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))


def test_multihead_attention_excluded_by_default_and_rejected_when_chosen():
    torch.manual_seed(0)
    model = _MHA()
    params = _params(model)
    new, mult, rep = gx.empirical_init(model, params, _batches((16, 5, 8), 3), _ce)
    assert rep.extra["layers"] == ["inp", "head"]
    for k in ("mha.in_proj_weight", "mha.in_proj_bias", "mha.out_proj.weight", "mha.out_proj.bias"):
        assert torch.equal(new[k], params[k]) and float(mult[k]) == 1.0
    assert sorted(rep.extra["uncovered_params"]) == sorted(k for k in params if k.startswith("mha."))
    with pytest.raises(ValueError, match=r"'mha' \(MultiheadAttention\).*not known to be homogeneous"):
        gx.empirical_init(model, params, _batches((16, 5, 8), 3), _ce, layers=lambda n, m: n == "mha")
    with pytest.raises(ValueError, match="mha.out_proj.*not called"):
        gx.empirical_init(model, params, _batches((16, 5, 8), 3), _ce, layers=lambda n, m: n == "mha.out_proj")


# --- the module is not modified; bad input -------------------------------------------------------


def test_module_unchanged_with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    new, mult, rep = gx.empirical_init(model, _params(model), _batches((32, 8), 4), _ce, act_iters=1, upd_iters=2)
    _assert_ok(rep, new, model, 3)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_input():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="empty"):
        gx.empirical_init(model, _params(model), [], _ce)
    with pytest.raises(ValueError, match="scalar"):
        gx.empirical_init(model, _params(model), _batches((8, 4), 3),
                          lambda o, y: nn.functional.cross_entropy(o, y, reduction="none"))
    with pytest.raises(ValueError, match="no parameters"):
        gx.empirical_init(nn.ReLU(), {}, _batches((8, 4), 3), _ce)
    with pytest.raises(TypeError, match="nn.Module"):
        gx.empirical_init(lambda p, x: x, _params(model), _batches((8, 4), 3), _ce)
    with pytest.raises(ValueError, match="no layer chosen"):
        gx.empirical_init(model, _params(model), _batches((8, 4), 3), _ce, layers=lambda n, m: False)
    with pytest.raises(ValueError, match="PReLU"):
        bad = nn.Sequential(nn.Linear(4, 3), nn.PReLU())
        gx.empirical_init(bad, _params(bad), _batches((8, 4), 3), _ce)


def test_short_iterable_is_cycled(caplog):
    model = nn.Sequential(nn.Linear(4, 3))
    batches = list(itertools.islice(_batches((8, 4), 3), 3))
    with caplog.at_level("WARNING", logger="gradxform.empirical"):
        _, _, rep = gx.empirical_init(model, _params(model), batches, _ce)
    assert "ran out after 3 batches" in caplog.text
    assert rep.iterations == 27


def test_empirical_init_params_rule():
    g = torch.Generator().manual_seed(0)
    params = {"lin.weight": torch.zeros(64, 32), "lin.bias": torch.ones(64), "ln.weight": torch.zeros(64),
              "unbiased_x": torch.zeros(8), "in_proj_bias": torch.ones(3), "frozen": None}
    out = gx.empirical_init_params(params, generator=g)
    w = out["lin.weight"]
    assert abs(float(w.mean())) < 0.05 and float(w.std()) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(out["lin.bias"], torch.zeros(64)) and torch.equal(out["in_proj_bias"], torch.zeros(3))
    assert torch.equal(out["ln.weight"], torch.ones(64)) and torch.equal(out["unbiased_x"], torch.ones(8))
    assert out["frozen"] is None
    again = gx.empirical_init_params(params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["lin.weight"], w)
    assert torch.equal(params["lin.weight"], torch.zeros(64, 32))  # pure
