"""The aliases through the functional API equal torch.optim over 200 steps of real gradients."""

from __future__ import annotations

import io

import pytest
import torch

import gradxform as gx
from helpers import assert_trees_close, assert_trees_equal, make_data, make_mlp, loss_of, run_functional, run_torch
from torch.func import grad

STEPS = 200

SGD_CASES = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.5, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
    dict(lr=0.05, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_matches_torch(kw):
    sign = -1.0 if kw.get("maximize") else 1.0
    ours = run_functional(gx.sgd(**kw), STEPS, sign=sign)
    ref = run_torch(lambda p: torch.optim.SGD(p, **kw), STEPS, sign=sign)
    assert_trees_close(ours, ref, rtol=1e-6, atol=1e-10)


ADAM_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
]


@pytest.mark.parametrize("kw", ADAM_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_matches_torch(name, kw):
    gx_fn, torch_cls = (gx.adam, torch.optim.Adam) if name == "adam" else (gx.adamw, torch.optim.AdamW)
    sign = -1.0 if kw.get("maximize") else 1.0
    ours = run_functional(gx_fn(**kw), STEPS, sign=sign)
    ref = run_torch(lambda p: torch_cls(p, **kw), STEPS, sign=sign)
    assert_trees_close(ours, ref, rtol=1e-6, atol=1e-10)


def test_adamw_default_weight_decay_is_torchs():
    ours = run_functional(gx.adamw(1e-2), 50)
    ref = run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2), 50)
    assert_trees_close(ours, ref, rtol=1e-6, atol=1e-10)
    # and differs from plain Adam, so the decay is really applied
    plain = run_torch(lambda p: torch.optim.Adam(p, lr=1e-2), 50)
    assert not torch.allclose(ours["0.weight"], plain["0.weight"], rtol=1e-9, atol=0)


def test_two_param_groups_via_partition():
    """Functional param groups: partition by label, each label its own lr, as torch's groups."""
    labels = {"0.weight": "a", "0.bias": "a", "2.weight": "b", "2.bias": "b", "4.weight": "b", "4.bias": "a"}
    tx = gx.partition({"a": gx.adamw(1e-3), "b": gx.adamw(1e-2)}, labels)
    ours = run_functional(tx, STEPS)

    def make(params):
        params = list(params)
        names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
        a = [p for n, p in zip(names, params) if labels[n] == "a"]
        b = [p for n, p in zip(names, params) if labels[n] == "b"]
        return torch.optim.AdamW([{"params": a}, {"params": b, "lr": 1e-2}], lr=1e-3)

    ref = run_torch(make, STEPS)
    assert_trees_close(ours, ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    "sched_name",
    ["cosine", "step"],
)
def test_schedule_as_lr_matches_torch_scheduler(sched_name):
    """An lr schedule of the step count equals the torch scheduler stepping once per step."""
    if sched_name == "cosine":
        lr = gx.cosine_decay_schedule(1e-2, STEPS)
        make_sched = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS)  # noqa: E731
    else:
        lr = gx.piecewise_constant_schedule(1e-2, {50: 0.5, 100: 0.5, 150: 0.5})
        make_sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5)  # noqa: E731
    ours = run_functional(gx.adamw(lr), STEPS)
    ref = run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2), STEPS, make_sched=make_sched)
    assert_trees_close(ours, ref, rtol=1e-6, atol=1e-10)


def test_functional_resume_is_bit_identical():
    """50 steps, torch.save of (params, state), restore, 50 more == 100 uninterrupted."""
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(gx.cosine_decay_schedule(1e-2, 100), amsgrad=True))
    model = make_mlp()

    def steps(params, state, start, n):
        for t in range(start, start + n):
            x, y = make_data(seed=100 + t)
            g = grad(loss_of(model, x, y))(params)
            u, state = tx.update(g, state, params)
            params = gx.apply_updates(params, u)
        return params, state

    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    full_p, full_s = steps(p0, tx.init(p0), 0, 100)

    half_p, half_s = steps(p0, tx.init(p0), 0, 50)
    buf = io.BytesIO()
    torch.save({"params": half_p, "state": half_s}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    res_p, res_s = steps(loaded["params"], loaded["state"], 50, 50)
    assert_trees_equal(res_p, full_p)
    assert_trees_equal(res_s, full_s)


def test_hyperparameter_validation():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        gx.adamw(lr=-1e-3)
    with pytest.raises(ValueError, match=r"betas\[0\] must be < 1"):
        gx.adam(betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be >= 0"):
        gx.adamw(betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="betas must be a pair"):
        gx.adam(betas=(0.9,))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        gx.sgd(0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        gx.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate must be >= 0"):
        gx.scale_by_learning_rate(-0.1)
    with pytest.raises(ValueError, match="b1 .* must be < 1"):
        gx.scale_by_adam(b1=1.5)
