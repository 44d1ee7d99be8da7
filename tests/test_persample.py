"""The per-example statistics engine: sum_grad_squared against vmap(grad), BackPACK and truegrad."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import gradxform as gx
from helpers import needs

warnings.filterwarnings("ignore", message=".*batching rule.*")


def reference(model, params, batch, loss, reduction="mean"):
    """sum_n (grad l_n / N)^2 (or sum_n (grad l_n)^2) by vmap(grad) over single examples."""
    x, y = batch

    def one(p, xi, yi):
        return loss(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    sgs = {k: ((v * scale) ** 2).sum(0) for k, v in g.items()}
    norms = torch.stack([(v * scale).flatten(1).square().sum(1) for v in g.values()]).sum(0).sqrt()
    return sgs, norms


def engine_run(model, batch, loss=F.cross_entropy, **kw):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        return loss(functional_call(model, p, (b[0],)), b[1])

    return params, gx.grad_and_sum_grad_squared(loss_fn, per_example_norms=True, **kw)(params, batch)


def assert_matches_reference(model, batch, loss=F.cross_entropy, rtol=1e-9, expect_fast=None, **kw):
    params, res = engine_run(model, batch, loss, **kw)
    ref, ref_norms = reference(model, params, batch, loss, kw.get("reduction", "mean"))
    for k, v in ref.items():
        torch.testing.assert_close(res.sum_grad_squared[k], v, rtol=rtol, atol=1e-12 * v.abs().max().item(),
                                   msg=lambda m, k=k: f"{k} ({res.methods[k]}): {m}")
    torch.testing.assert_close(res.per_example_norms, ref_norms, rtol=rtol, atol=0)
    plain = torch.func.grad(lambda p: loss(functional_call(model, p, (batch[0],)), batch[1]))(params)
    for k, v in plain.items():
        # atol: attention is re-expressed with the same math, so rounding may differ at ~1e-19
        # where the exact gradient is 0 (the key bias)
        torch.testing.assert_close(res.grads[k], v, rtol=1e-12, atol=1e-14 * v.abs().max().item())
    if expect_fast is not None:
        fast = {k for k, m in res.methods.items() if m.startswith("fast")}
        assert fast == set(expect_fast), res.methods
    return res


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype)


def cnn():
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    ).double()
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        m(torch.randn(16, 3, 8, 8, dtype=torch.float64))
    return m.eval()


class Block(nn.Module):
    """Embedding, LayerNorm, multi-head attention, Linear over the sequence dim, a layer scale."""

    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln1 = nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.emb(idx)
        a = self.ln1(h)
        h = h + self.att(a, a, a, need_weights=False)[0]
        h = h + self.gamma * self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h).mean(1)


def block():
    torch.manual_seed(2)
    return Block().double()


def test_mlp_matches_vmap_grad():
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 5, (10,))
    res = assert_matches_reference(mlp(), (x, y), expect_fast=[f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")])
    assert res.loss.shape == () and res.aux is None


def test_mlp_float32_to_1e5():
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    assert_matches_reference(mlp(torch.float32), (x, y), rtol=1e-5)


def test_cnn_with_pooling_and_eval_batchnorm_matches_vmap_grad():
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    res = assert_matches_reference(cnn(), (x, y))
    assert all(m.startswith("fast") for m in res.methods.values()), res.methods
    assert res.methods["0.weight"] == "fast:conv2d" and res.methods["1.weight"] == "fast:batch_norm"


@needs("func_sdpa")
def test_transformer_block_matches_vmap_grad():
    idx, y = torch.randint(0, 13, (5, 7)), torch.randint(0, 13, (5,))
    idx[0, :2] = 0  # the padding row gets no gradient
    res = assert_matches_reference(block(), (idx, y))
    assert res.methods["emb.weight"] == "fast:embedding"
    assert res.methods["fc1.weight"] == "fast:linear"  # over a sequence dim: sums over positions
    assert res.methods["gamma"] == "fast:mul"
    assert res.methods["ln1.weight"] == "fast:layer_norm"
    # unmasked self-attention is re-expressed as linear -> sdpa -> linear: its projections are fast
    assert res.methods["att.in_proj_weight"] == res.methods["att.out_proj.bias"] == "fast:linear"


def test_attention_outside_the_rewritten_case_takes_the_exact_fallback():
    class Masked(Block):
        def forward(self, idx):
            h = self.emb(idx)
            mask = torch.triu(torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool), 1)
            h = h + self.att(h, h, h, attn_mask=mask, need_weights=False)[0]
            return self.head(self.ln2(h)).mean(1)

    torch.manual_seed(9)
    res = assert_matches_reference(Masked().double(), (torch.randint(0, 13, (4, 6)), torch.randint(0, 13, (4,))))
    assert res.methods["att.in_proj_weight"].startswith("fallback: used by multi_head_attention_forward")


@needs("func_sdpa")
def test_torch_transformer_encoder_layer():
    torch.manual_seed(10)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 8, 3)).double()
    res = assert_matches_reference(model, (torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,))))
    assert all(m.startswith("fast") for m in res.methods.values()), res.methods


def test_linear_over_sequence_is_not_the_elementwise_shortcut():
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    params, res = engine_run(lin, (x, torch.zeros(5)), loss=lambda out, _: out.pow(2).sum((1, 2)).mean())
    # the per-example gradient sums over positions before squaring; squaring per position is wrong
    go = 2 * lin(x).detach() / 5
    per_example = torch.einsum("nto,nti->noi", go, x)
    torch.testing.assert_close(res.sum_grad_squared["weight"], per_example.square().sum(0))
    shortcut = torch.einsum("nto,nti->oi", go.square(), x.square())
    assert not torch.allclose(shortcut, per_example.square().sum(0), rtol=1e-3)


def test_conv1d_and_conv3d_and_dilation():
    torch.manual_seed(4)
    m1 = nn.Sequential(nn.Conv1d(3, 4, 3, dilation=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 2)).double()
    assert_matches_reference(m1, (torch.randn(4, 3, 10, dtype=torch.float64), torch.randint(0, 2, (4,))))
    m3 = nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), nn.Flatten(), nn.Linear(3 * 3 * 2 * 3, 2)).double()
    res = assert_matches_reference(m3, (torch.randn(3, 2, 4, 4, 4, dtype=torch.float64), torch.randint(0, 2, (3,))))
    assert res.methods["0.weight"] == "fast:conv3d"


def test_sum_reduction():
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    assert_matches_reference(mlp(), (x, y), loss=lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                             reduction="sum")


def test_tied_weights_take_the_exact_fallback():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6)
            self.mix = nn.Linear(6, 6)

        def forward(self, idx):
            h = torch.tanh(self.mix(self.emb(idx)))
            return F.linear(h, self.emb.weight).mean(1)  # the output projection reuses the embedding

    torch.manual_seed(5)
    res = assert_matches_reference(Tied().double(), (torch.randint(0, 9, (4, 3)), torch.randint(0, 9, (4,))))
    assert res.methods["emb.weight"] == "fallback: used more than once (e.g. tied weights)"
    assert res.methods["mix.weight"] == "fast:linear"


def test_a_tied_weight_does_not_void_the_statistic_of_its_layers_other_params():
    """Regression: a layer call whose weight takes the fallback (tied) installed no hook, so its
    own bias, marked fast, never fired and was reported "unused" with a zero statistic."""

    class TiedWithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6)
            self.b = nn.Parameter(torch.randn(9))

        def forward(self, idx):
            return F.linear(torch.tanh(self.emb(idx).mean(1)), self.emb.weight, self.b)

    torch.manual_seed(18)
    batch = (torch.randint(0, 9, (4, 3)), torch.randint(0, 9, (4,)))
    for check in (True, False):
        res = assert_matches_reference(TiedWithBias().double(), batch, check=check)
        assert res.methods == {"emb.weight": "fallback: used more than once (e.g. tied weights)", "b": "fast:linear"}


def test_unknown_ops_take_the_fallback_and_small_chunks_give_the_same_numbers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(torch.tanh(x @ self.w))  # matmul: no fast rule

    torch.manual_seed(6)
    m = Odd().double()
    batch = (torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,)))
    big = assert_matches_reference(m, batch)
    assert big.methods["w"].startswith("fallback: used by")
    small = assert_matches_reference(m, batch, chunk_bytes=1)  # one example per chunk
    torch.testing.assert_close(small.sum_grad_squared["w"], big.sum_grad_squared["w"], rtol=1e-12, atol=0)
    everything = assert_matches_reference(m, batch, fast=False)
    assert set(everything.methods.values()) == {"fallback: fast=False"}


def test_unused_and_frozen_params():
    torch.manual_seed(7)
    m = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}).double()
    params = {k: v.detach() for k, v in m.named_parameters()}
    params["a.bias"] = None  # frozen

    def loss_fn(p, b):
        return functional_call(m, p, (b,), strict=False) if False else F.linear(b, p["a.weight"]).pow(2).mean()

    res = gx.grad_and_sum_grad_squared(loss_fn)(params, torch.randn(4, 3, dtype=torch.float64))
    assert res.sum_grad_squared["a.bias"] is None and res.grads["a.bias"] is None
    assert res.methods["b.weight"] == "unused"
    assert torch.equal(res.sum_grad_squared["b.weight"], torch.zeros(2, 3, dtype=torch.float64))
    assert res.methods["a.weight"] == "fast:linear"


def test_has_aux_and_extra_args():
    m = mlp()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss_fn(p, b, temperature):
        out = functional_call(m, p, (b[0],)) / temperature
        return F.cross_entropy(out, b[1]), out.detach()

    batch = (torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 5, (5,)))
    res = gx.grad_and_sum_grad_squared(loss_fn, has_aux=True)(params, batch, 2.0)
    assert res.aux.shape == (5, 5)
    grads, sgs = gx.sum_grad_squared(lambda p, b: loss_fn(p, b, 2.0)[0], params, batch)
    for k in params:
        torch.testing.assert_close(sgs[k], res.sum_grad_squared[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(grads[k], res.grads[k], rtol=1e-12, atol=0)


def test_dropout_needs_randomness_for_the_fallback():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return F.dropout(x @ self.w, 0.5, training=True)

    m = Drop()
    params = {"w": m.w.detach()}
    batch = torch.randn(4, 4)
    fn = gx.grad_and_sum_grad_squared(lambda p, b: functional_call(m, p, (b,)).pow(2).mean())
    with pytest.raises(RuntimeError, match="randomness"):
        fn(params, batch)
    res = gx.grad_and_sum_grad_squared(lambda p, b: functional_call(m, p, (b,)).pow(2).mean(),
                                       randomness="different")(params, batch)
    assert res.sum_grad_squared["w"].shape == (4, 3)


# --- against BackPACK and truegrad ---------------------------------------------------------------


def test_equals_backpack_sum_grad_squared():
    backpack = pytest.importorskip("backpack", reason="BackPACK (backpack-for-pytorch) not installed")
    from backpack.extensions import SumGradSquared

    for make, batch in ((mlp, (torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,)))),
                        (cnn, (torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))))):
        model = make()
        params, res = engine_run(model, batch)
        if make is cnn:  # BackPACK has no GroupNorm / grouped-conv SumGradSquared: compare the rest
            model = nn.Sequential(*list(model)[:4], nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).double().eval()
            params, res = engine_run(model, batch)
        bp_model = backpack.extend(model)
        loss = backpack.extend(nn.CrossEntropyLoss())(bp_model(batch[0]), batch[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack.backpack(SumGradSquared()):
                loss.backward()
        for k, p in bp_model.named_parameters():
            torch.testing.assert_close(res.sum_grad_squared[k], p.sum_grad_squared, rtol=1e-9, atol=1e-15)


def test_equals_truegrad_nn_linear_weight_and_shows_its_bias_quirk():
    tg_nn = pytest.importorskip("truegrad.nn", reason="truegrad not installed")
    torch.manual_seed(8)
    lin = tg_nn.Linear(4, 2).double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    F.mse_loss(lin(x), y).backward()
    ref = nn.Linear(4, 2).double()
    ref.load_state_dict({"weight": lin.weight.detach(), "bias": lin.bias.detach()})
    params, res = engine_run(ref, (x, y), loss=F.mse_loss)
    torch.testing.assert_close(res.sum_grad_squared["weight"], lin.weight.sum_grad_squared, rtol=1e-9, atol=0)
    # truegrad's quirk (its nn.Linear bias statistic): N = 4 times BackPACK's convention
    torch.testing.assert_close(lin.bias.sum_grad_squared, 4 * res.sum_grad_squared["bias"], rtol=1e-9, atol=0)


# --- the torch.optim route -----------------------------------------------------------------------


def test_track_sum_grad_squared_with_backward_equals_the_engine():
    model = cnn()
    batch = (torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))
    params, res = engine_run(model, batch)
    with gx.track_sum_grad_squared(model, per_example_norms=True) as stats:
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    sgs = stats.sum_grad_squared
    assert isinstance(sgs, gx.PerParam) and len(sgs) == len(params)
    for k, p in model.named_parameters():
        torch.testing.assert_close(sgs[p], res.sum_grad_squared[k], rtol=1e-12, atol=0)
        assert not hasattr(p, "sum_grad_squared")  # nothing attached to the params
    torch.testing.assert_close(stats.per_example_norms, res.per_example_norms, rtol=1e-12, atol=0)


def test_track_reports_params_without_a_fast_rule():
    class WithMatmul(Block):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.eye(8))

        def forward(self, idx):
            return self.head(torch.matmul(self.fc2(F.gelu(self.fc1(self.emb(idx)))), self.w)).mean(1)

    torch.manual_seed(11)
    model = WithMatmul().double()
    idx = torch.randint(0, 13, (3, 4))
    with gx.track_sum_grad_squared(model) as stats:
        F.cross_entropy(model(idx), idx[:, 0]).backward()
    with pytest.raises(ValueError, match=r"'w' \(used by matmul, which has no fast rule\)"):
        _ = stats.sum_grad_squared
    assert stats.methods["w"] == "missing: used by matmul, which has no fast rule"
    with gx.track_sum_grad_squared(model, missing="none") as lenient:
        F.cross_entropy(model(idx), idx[:, 0]).backward()
    sgs = lenient.sum_grad_squared
    assert model.w not in sgs and model.fc1.weight in sgs


def test_track_before_backward_is_an_error():
    model = mlp()
    with gx.track_sum_grad_squared(model) as stats:
        model(torch.randn(3, 12, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backward"):
        _ = stats.sum_grad_squared


def test_optimizer_step_takes_per_param_statistics_per_group():
    """A PerParam extra is split into each group's list (two groups here)."""
    model = mlp()
    seen = []

    def spy(**kw):
        def update(updates, state, params=None, *, sum_grad_squared=None):
            seen.append(sum_grad_squared)
            return [None if u is None else torch.zeros_like(u) for u in updates], state
        return gx.GradientTransformation(lambda p: gx.EmptyState(), update)

    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = gx.Optimizer([{"params": first}, {"params": rest}], spy())
    batch = (torch.randn(4, 12, dtype=torch.float64), torch.randint(0, 5, (4,)))
    with gx.track_sum_grad_squared(model) as stats:
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step(sum_grad_squared=stats.sum_grad_squared)
    assert [len(s) for s in seen] == [2, 4]
    for s, ps in zip(seen, (first, rest)):
        for v, p in zip(s, ps):
            assert torch.equal(v, stats.sum_grad_squared[p])


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors():
    m = mlp()
    params = {k: v.detach() for k, v in m.named_parameters()}
    x, y = torch.randn(4, 12, dtype=torch.float64), torch.randint(0, 5, (4,))
    unreduced = gx.grad_and_sum_grad_squared(
        lambda p, b: F.cross_entropy(functional_call(m, p, (b[0],)), b[1], reduction="none"))
    with pytest.raises(ValueError, match=r"scalar loss reduced over the batch.*shape \(4,\)"):
        unreduced(params, (x, y))
    fn = gx.grad_and_sum_grad_squared(lambda p, b: F.cross_entropy(functional_call(m, p, (b[0],)), b[1]))
    with pytest.raises(ValueError, match="leading example dimension"):
        fn(params, (x, torch.tensor(3)))
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        fn(params, (x, y[:3]))
    with pytest.raises(ValueError, match="reduction must be"):
        gx.grad_and_sum_grad_squared(lambda p, b: 0, reduction="avg")
    with pytest.raises(TypeError, match="'0.weight' has dtype torch.int64"):
        fn({**params, "0.weight": torch.zeros(32, 12, dtype=torch.long)}, (x, y))
    bn = nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4)).double().train()
    bparams = {k: v.detach() for k, v in bn.named_parameters()}
    with pytest.raises(ValueError, match="batch_norm in training mode"):
        gx.grad_and_sum_grad_squared(lambda p, b: functional_call(bn, p, (b,)).pow(2).mean())(bparams, x)


def _force_conv_rule(monkeypatch, rule):
    """Make every conv layer that can take ``rule`` take it (the others keep the only rule they have)."""
    import gradxform.persample as ps

    natural = ps._conv_rule

    def forced(d, in_channels, out_channels, kernel, positions, groups, padding, device):
        if d <= 2 and groups == 1 and not isinstance(padding, str):
            return rule
        return natural(d, in_channels, out_channels, kernel, positions, groups, padding, device)

    monkeypatch.setattr(ps, "_conv_rule", forced)


@pytest.mark.parametrize("rule", ["unfold", "vjp"])
def test_both_per_example_conv_rules_are_exact(monkeypatch, rule):
    """The engine picks one of two conv rules by shape and device: test each one on every layer."""
    _force_conv_rule(monkeypatch, rule)
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    assert_matches_reference(cnn(), (x, y))
    torch.manual_seed(12)
    m1 = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=2), nn.Flatten(), nn.Linear(4 * 6, 2)).double()
    assert_matches_reference(m1, (torch.randn(4, 3, 10, dtype=torch.float64), torch.randint(0, 2, (4,))),
                             chunk_bytes=1500)  # several chunks
    model, params, batch = _two_convs()
    _, res = engine_run(model, batch, reduction="sum",
                        loss=lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    ref, _ = reference(model, params, batch, lambda o, t: F.cross_entropy(o, t, reduction="sum"), "sum")
    for k, v in ref.items():  # float32: both rules round, each close to the reference
        torch.testing.assert_close(res.sum_grad_squared[k], v, rtol=1e-5, atol=1e-6 * v.abs().max().item())


def test_conv_rule_is_a_function_of_shape_and_device():
    """The documented rule, shape by shape (no timing, no cache: the same layer always takes the same rule)."""
    from gradxform.persample import _conv_rule

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # (d, in, out, kernel taps, positions, groups, padding) -> CPU rule; 3-d, grouped and
    # string-padded convs have only vjp
    cases = {(2, 3, 32, 9, 1024, 1, 1): "unfold", (2, 16, 16, 9, 1024, 1, 1): "vjp",
             (2, 32, 64, 9, 256, 1, 1): "unfold", (2, 64, 16, 9, 64, 1, 1): "vjp", (2, 8, 8, 9, 4, 1, 1): "unfold",
             (1, 3, 16, 3, 128, 1, 1): "unfold", (1, 16, 16, 9, 128, 1, 1): "unfold",
             (2, 512, 512, 1, 16, 1, 0): "unfold", (2, 16, 16, 1, 1024, 1, 0): "unfold",
             (2, 16, 16, 8, 1024, 1, 0): "unfold", (2, 3, 16, 25, 1024, 1, 2): "unfold",
             (3, 2, 3, 8, 18, 1, 0): "vjp", (2, 16, 16, 9, 1024, 2, 1): "vjp", (2, 16, 16, 9, 1024, 1, "same"): "vjp",
             (2, 7, 32, 9, 1024, 1, 1): "unfold", (2, 8, 33, 9, 1024, 1, 1): "unfold",
             (2, 8, 32, 9, 63, 1, 1): "unfold", (2, 8, 32, 9, 64, 1, 1): "vjp"}
    for (d, cin, cout, kernel, pos, groups, pad), want in cases.items():
        assert _conv_rule(d, cin, cout, kernel, pos, groups, pad, cpu) == want, (d, cin, cout, kernel, pos, groups, pad)
        on_gpu = "vjp" if d == 3 or groups != 1 or isinstance(pad, str) else "unfold"
        assert _conv_rule(d, cin, cout, kernel, pos, groups, pad, cuda) == on_gpu


def _two_convs():
    """float32, two conv layers whose rules differ (3->8: unfold, 8->16: vjp on the CPU); the
    first layer's statistic differs in the last bits between the two rules."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(),
                      nn.Linear(16 * 8 * 8, 3))
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    return m, {k: v.detach() for k, v in m.named_parameters()}, batch


_FRESH_PROCESS = """
import itertools, math, sys, time
import torch, torch.nn.functional as F
from torch.func import functional_call
import gradxform as gx
sys.path.insert(0, sys.argv[3])
from test_persample import _two_convs
torch.set_num_threads(int(sys.argv[2]))
ticks = itertools.count(1)
# a clock whose rate rises (later calls look slower) or falls (later calls look faster)
time.perf_counter = (lambda: next(ticks) ** 2) if sys.argv[1] == "rising" else (lambda: math.sqrt(next(ticks)))
m, params, batch = _two_convs()
res = gx.grad_and_sum_grad_squared(
    lambda p, b: F.cross_entropy(functional_call(m, p, (b[0],)), b[1], reduction="sum"), reduction="sum")(params, batch)
torch.save({k: v for k, v in res.sum_grad_squared.items()}, sys.argv[4])
"""


def test_conv_statistic_is_bit_identical_across_calls_and_fresh_processes_whatever_the_clock(monkeypatch, tmp_path):
    """Regression: the conv rule was picked by timing both rules once per shape and cached
    process-wide; the two rules round differently, so the statistic depended on which ran faster."""
    import os
    import pathlib
    import subprocess
    import sys

    m, params, batch = _two_convs()

    def run():
        return gx.grad_and_sum_grad_squared(
            lambda p, b: F.cross_entropy(functional_call(m, p, (b[0],)), b[1], reduction="sum"),
            reduction="sum")(params, batch).sum_grad_squared

    first, again = run(), run()
    by_rule = {}
    for rule in ("unfold", "vjp"):
        with monkeypatch.context() as mp:
            _force_conv_rule(mp, rule)
            by_rule[rule] = run()
    # the test has power: the two rules give different bits for this layer
    assert not torch.equal(by_rule["unfold"]["0.weight"], by_rule["vjp"]["0.weight"])
    here = pathlib.Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    # a fresh process whose clock runs slower and slower: a rule timed later looks faster
    out = tmp_path / "fresh.pt"
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS, "falling", str(torch.get_num_threads()), str(here), str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    fresh = torch.load(out)
    for k in params:
        for other in (again, fresh):
            assert torch.equal(other[k], first[k]), k
    assert torch.equal(first["0.weight"], by_rule["unfold"]["0.weight"])  # the documented CPU rule for 3 -> 8
    assert torch.equal(first["2.weight"], by_rule["vjp"]["2.weight"])  # and for 8 -> 16


# --- recurrent models: vmap cannot batch their kernels --------------------------------------------


def hand_loop(loss_of_one, params, batch, reduction="mean"):
    """The definition: one torch.autograd.grad per example; returns (grads, S, per-example norms)."""
    n = batch[0].shape[0]
    scale = 1.0 / n if reduction == "mean" else 1.0
    contribs = []
    for i in range(n):
        q = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss_of_one(q, tuple(t[i:i + 1] for t in batch)), list(q.values()), allow_unused=True)
        contribs.append({k: (torch.zeros_like(v) if g is None else g) * scale for (k, v), g in zip(q.items(), gs)})
    grads = {k: sum(c[k] for c in contribs) for k in params}
    sgs = {k: sum(c[k].square() for c in contribs) for k in params}
    norms = torch.stack([sum(c[k].square().sum() for k in params) for c in contribs]).sqrt()
    return grads, sgs, norms


class GRUCellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 7)

    def forward(self, x):
        h = None  # the cell makes its own zero state
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


class Recurrent(nn.Module):
    """A recurrent core (its params have no fast rule) and a linear head (fast)."""

    def __init__(self, core):
        super().__init__()
        self.core = core
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        h = self.core(x)
        return self.head(h[0][:, -1] if isinstance(h, tuple) else h)


@pytest.mark.parametrize("core", ["GRU", "LSTM", "RNN", "GRUCell loop"])
def test_recurrent_models_take_an_exact_per_example_loop(core):
    """Regression: vmap has no batching rule for the recurrent kernels, so the exact fallback
    raised; it now loops over the examples, says so in ``methods``, and equals the definition."""
    torch.manual_seed(14)
    make = {"GRU": lambda: nn.GRU(3, 7, batch_first=True), "LSTM": lambda: nn.LSTM(3, 7, batch_first=True),
            "RNN": lambda: nn.RNN(3, 7, batch_first=True), "GRUCell loop": GRUCellLoop}[core]
    model = Recurrent(make()).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def loss_fn(p, b):
        return F.mse_loss(functional_call(model, p, (b[0],)), b[1])

    grads, sgs, norms = hand_loop(loss_fn, params, batch)
    for options in ({}, {"chunk_bytes": 1}, {"fast": False}):
        engine = gx.grad_and_sum_grad_squared(loss_fn, per_example_norms=True, **options)
        for _ in range(2):  # the second call knows vmap fails and loops at once: same numbers
            res = engine(params, batch)
            for k in params:
                torch.testing.assert_close(res.sum_grad_squared[k], sgs[k], rtol=1e-10, atol=1e-14)
                torch.testing.assert_close(res.grads[k], grads[k], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(res.per_example_norms, norms, rtol=1e-10, atol=0)
            for k, m in res.methods.items():
                if k.startswith("core.") or options.get("fast") is False:  # fast=False: all in one loop
                    assert m.startswith("fallback: ") and "exact per-example loop (vmap cannot batch this model" in m, m
                else:
                    assert m == "fast:linear", m


def test_the_per_example_loop_follows_vmaps_randomness_modes():
    """Where vmap lacks a rule the loop takes over with vmap's randomness semantics: 'error'
    refuses dropout (a GRU's inter-layer dropout), 'different' draws per example, 'same' replays
    one generator state for every example."""
    gru = nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True).double().train()
    params = {k: v.detach() for k, v in gru.named_parameters()}
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    engine = gx.grad_and_sum_grad_squared(lambda p, b: functional_call(gru, p, (b,))[0].pow(2).mean())
    with pytest.raises(RuntimeError, match="randomness"):
        engine(params, x)
    res = gx.grad_and_sum_grad_squared(lambda p, b: functional_call(gru, p, (b,))[0].pow(2).mean(),
                                       randomness="different")(params, x)
    assert "exact per-example loop" in res.methods["weight_ih_l0"] and res.sum_grad_squared["weight_ih_l0"].shape == (12, 3)
    # "same": every example sees the same generator state, as a hand loop that re-seeds before each
    torch.manual_seed(17)
    res = gx.grad_and_sum_grad_squared(lambda p, b: functional_call(gru, p, (b,))[0].pow(2).mean(),
                                       randomness="same", fast=False)(params, x)
    state = torch.get_rng_state()
    torch.manual_seed(17)
    functional_call(gru, params, (x,))  # the main pass draws first
    start = torch.get_rng_state()
    contribs = []
    for i in range(3):
        torch.set_rng_state(start)
        q = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        contribs.append(torch.autograd.grad(functional_call(gru, q, (x[i:i + 1],))[0].pow(2).mean(), q["weight_hh_l1"])[0])
    torch.set_rng_state(state)
    torch.testing.assert_close(res.sum_grad_squared["weight_hh_l1"], sum((c / 3).square() for c in contribs),
                               rtol=1e-10, atol=0)


# --- end to end with the TrueGrad transforms -----------------------------------------------------


def _data(step, n=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def test_adapter_with_tracker_equals_the_functional_engine_over_steps():
    model = mlp()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = gx.tg_adamw(1e-2, weight_decay=1e-2)
    state = tx.init(params)
    engine = gx.grad_and_sum_grad_squared(lambda p, b: F.cross_entropy(functional_call(model, p, (b[0],)), b[1]))
    for step in range(10):
        res = engine(params, _data(step))
        updates, state = tx.update(res.grads, state, params, sum_grad_squared=res.sum_grad_squared)
        params = gx.apply_updates(params, updates)

    opt = gx.Optimizer(model.parameters(), gx.tg_adamw(1e-2, weight_decay=1e-2))
    for step in range(10):
        x, y = _data(step)
        opt.zero_grad()
        with gx.track_sum_grad_squared(model) as stats:
            F.cross_entropy(model(x), y).backward()
        opt.step(sum_grad_squared=stats.sum_grad_squared)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=1e-10, atol=1e-13)


def test_micro_batches_through_multi_steps_equal_the_full_batch():
    """Two half batches accumulated by multi_steps give the full batch's gradient and S."""
    model = mlp()
    engine = gx.grad_and_sum_grad_squared(lambda p, b: F.cross_entropy(functional_call(model, p, (b[0],)), b[1]))
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    micro = {k: v.clone() for k, v in full.items()}
    tx_full, tx_micro = gx.tg_adamw(1e-2, graft=False), gx.multi_steps(gx.tg_adamw(1e-2, graft=False), every_k=2)
    s_full, s_micro = tx_full.init(full), tx_micro.init(micro)
    for step in range(4):
        x, y = _data(step)
        res = engine(full, (x, y))
        u, s_full = tx_full.update(res.grads, s_full, full, sum_grad_squared=res.sum_grad_squared)
        full = gx.apply_updates(full, u)
        for half in (slice(0, 8), slice(8, 16)):
            r = engine(micro, (x[half], y[half]))
            u, s_micro = tx_micro.update(r.grads, s_micro, micro, sum_grad_squared=r.sum_grad_squared)
            micro = gx.apply_updates(micro, u)
    for k in full:
        torch.testing.assert_close(micro[k], full[k], rtol=1e-10, atol=1e-13)


def test_autocast_bf16_forward_gives_the_float32_statistic_to_bf16_accuracy():
    model = mlp(torch.float32)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    params, ref = engine_run(model, (x, y))
    with gx.track_sum_grad_squared(model) as stats:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    assert all(m.startswith("fast") for m in stats.methods.values()), stats.methods
    for k, p in model.named_parameters():
        got = stats.sum_grad_squared[p]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref.sum_grad_squared[k], rtol=0.1, atol=1e-3 * ref.sum_grad_squared[k].max().item())


def test_first_call_check_catches_a_layer_that_sees_the_batch_outside_dim_0():
    """A seq-first linear whose sequence length equals the batch size passes the size check; the
    first-call check against the exact gradient catches it and sends the param to the fallback."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # x: (N, L, 3) with L == N
            h = torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1)
            return self.head(h.mean(1))

    torch.manual_seed(13)
    m = SeqFirst().double()
    batch = (torch.randn(4, 4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    res = assert_matches_reference(m, batch)
    assert res.methods["lin.weight"].startswith("fallback: not verified by the first-call check")
    assert res.methods["head.weight"] == "fast:linear"
    params, unchecked = engine_run(m, batch, check=False)
    ref, _ = reference(m, params, batch, F.cross_entropy)
    assert not torch.allclose(unchecked.sum_grad_squared["lin.weight"], ref["lin.weight"], rtol=1e-3)


def test_first_call_check_is_not_fooled_when_every_fast_layer_is_sequence_first():
    """Regression (the only fast layer is sequence-first with as many positions as examples): the
    check returned early because nothing took the fast path on the sub-batch, so the full batch
    took fast:linear and the statistic was 33-91% off."""
    torch.manual_seed(15)
    lin = torch.nn.Linear(4, 3)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def f(p, b):
        return F.cross_entropy(functional_call(lin, p, (b[0].transpose(0, 1),)).transpose(0, 1).mean(1), b[1])

    batch = (torch.randn(5, 5, 4), torch.randint(0, 3, (5,)))
    res = gx.grad_and_sum_grad_squared(f)(params, batch)
    grads, sgs, _ = hand_loop(f, params, batch)
    for k in params:
        assert res.methods[k].startswith("fallback: not verified by the first-call check (on a 2-example "
                                         "sub-batch: linear input has 5 rows in dim 0"), res.methods[k]
        torch.testing.assert_close(res.sum_grad_squared[k], sgs[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res.grads[k], grads[k], rtol=1e-5, atol=1e-7)
    again = gx.grad_and_sum_grad_squared(f)(params, batch)  # a fresh engine: the same verdict
    assert again.methods == res.methods


def test_first_call_check_still_guards_the_batch_dim_when_the_exact_check_cannot_run():
    """With dropout and randomness='error' the exact half of the check cannot run; the batch-dim
    half still sends a sequence-first layer to the fallback, which then refuses dropout loudly
    instead of returning a wrong number."""
    torch.manual_seed(16)
    lin = torch.nn.Linear(4, 3)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def f(p, b):
        h = functional_call(lin, p, (F.dropout(b[0], 0.1).transpose(0, 1),)).transpose(0, 1)
        return F.cross_entropy(h.mean(1), b[1])

    batch = (torch.randn(5, 5, 4), torch.randint(0, 3, (5,)))
    with pytest.raises(RuntimeError, match="randomness"):
        gx.grad_and_sum_grad_squared(f)(params, batch)
    res = gx.grad_and_sum_grad_squared(f, randomness="different")(params, batch)
    assert res.methods["weight"].startswith("fallback: not verified by the first-call check")
