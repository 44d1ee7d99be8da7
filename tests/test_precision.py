"""Mixed precision: ``gx.upcast`` (float32 state for half-precision params), and
``apply_if_finite`` skipping exactly the steps an AMP ``GradScaler`` skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradxform as gx
from helpers import assert_trees_equal


def _adam_by_hand(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam's updates in float32 from the update formulas (independent of gradxform)."""
    m = v = torch.zeros_like(grads[0], dtype=torch.float32)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.float()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
    return out


def test_float16_state_underflows_and_upcast_keeps_it_in_float32():
    """g = 1e-4: g^2 = 1e-8 is below float16's smallest subnormal (6e-8), so Adam with its state in
    float16 has v = 0 (and eps = 1e-8 is 0 in float16): an infinite step; upcast keeps v in float32
    and steps by about lr."""
    g = [torch.full((4,), 1e-4, dtype=torch.float16) * (1 + 0.1 * k) for k in range(5)]
    p = torch.zeros(4, dtype=torch.float16)
    want = _adam_by_hand(g, 1e-3)

    plain = gx.adam(1e-3)
    state = plain.init(p)
    u, state = plain.update(g[0], state, p)
    assert state.inner_state[0].nu.dtype == torch.float16 and float(state.inner_state[0].nu.abs().max()) == 0.0
    assert torch.isinf(u).all()  # m / (0 + 0)

    tx = gx.upcast(gx.adam(1e-3))
    state = tx.init(p)
    for k in range(5):
        u, state = tx.update(g[k], state, p)
        assert u.dtype == torch.float16
        assert torch.equal(u, want[k].to(torch.float16))
    adam_state = state.inner_state[0]
    assert adam_state.mu.dtype == adam_state.nu.dtype == torch.float32
    assert float(adam_state.nu.min()) > 0


def test_upcast_through_the_adapter_with_a_scheduler():
    """bfloat16 model, float32 AdamW state, the group lr driven by a torch scheduler."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(torch.bfloat16)
    opt = gx.Optimizer(model.parameters(), gx.upcast(gx.adamw(1e-2, weight_decay=0.0)))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    w = model.weight.detach().clone()
    grads, lrs = [], []
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        model.weight.grad = torch.randn(3, 5, generator=g).to(torch.bfloat16)
        model.bias.grad = torch.randn(3, generator=g).to(torch.bfloat16)
        grads.append(model.weight.grad.clone())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3])
    state = opt.tx_state()
    moments = [t for t in gx.tree.tree_flatten(state)[0] if isinstance(t, torch.Tensor) and t.ndim > 0 and t.numel() > 2
               and t.is_floating_point()]
    assert len(moments) == 4 and {t.dtype for t in moments} == {torch.float32}  # mu, nu of weight and bias
    # the same steps by hand: float32 Adam, each update rounded to bfloat16 and added in bfloat16
    for k, step in enumerate(_adam_by_hand(grads, 1.0)):
        w = w + (lrs[k] * step).to(torch.bfloat16)
    assert model.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-2, atol=1e-3)
    assert not torch.equal(model.weight.detach(), w.new_zeros(w.shape))


def test_upcast_rejects_a_non_float_dtype():
    with pytest.raises(ValueError, match="upcast: dtype"):
        gx.upcast(gx.adam(1e-3), torch.int32)


def _grad_scaler(**kw):
    try:
        return torch.amp.GradScaler("cpu", **kw)
    except Exception as e:  # pragma: no cover - a torch without the CPU scaler
        pytest.skip(f"torch.amp.GradScaler('cpu') is not available: {e}")


def test_apply_if_finite_skips_exactly_what_grad_scaler_skips():
    """A functional loop with ``apply_if_finite(adamw)`` and a loop with ``GradScaler`` +
    ``gx.Optimizer(adamw)`` see the same gradients, one of them with an Inf: both skip that step
    (params and moments untouched) and end bit-identical. The scaler's power-of-two scale makes
    its unscaled gradients exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ref = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(8)]
    poisoned = 3

    scaler = _grad_scaler(init_scale=2.0**8, growth_interval=1000)
    opt = gx.Optimizer(model.parameters(), gx.adamw(1e-2))
    tx = gx.apply_if_finite(gx.adamw(1e-2))
    params, state = ref, tx.init(ref)
    for k, (x, y) in enumerate(batches):
        # scaler route
        opt.zero_grad()
        scaler.scale((model(x) - y).pow(2).mean()).backward()
        if k == poisoned:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        # functional route
        grads = torch.func.grad(lambda p, x=x, y=y: (torch.func.functional_call(model, p, (x,)) - y).pow(2).mean())(params)
        if k == poisoned:
            grads["0.weight"] = grads["0.weight"].clone()
            grads["0.weight"][0, 0] = float("inf")
            before = (params, state)
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
        if k == poisoned:
            assert_trees_equal(params, before[0])
            assert_trees_equal(state.inner_state, before[1].inner_state)
            assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    assert scaler.get_scale() == 2.0**7  # backed off once
    assert int(state.total_notfinite) == 1 and int(state.notfinite_count) == 0
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=1e-6, atol=1e-7)
    # 7 of 8 steps were taken by both: the adapter's Adam count says so too
    counts = [t for t in gx.tree.tree_flatten(opt.tx_state())[0]
              if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.ndim == 0]
    assert counts and all(int(c) == 7 for c in counts)
