"""`gx.batched`: N models trained by one vmapped loop reach the same params as N separate loops.

The vmapped loop is ``vmap(grad(loss))`` for the gradients of ``N`` models stacked with
``torch.func.stack_module_state``, ``gx.batched(tx)`` for the update and ``gx.set_hyperparam``
for one learning rate per model; each separate loop runs the same alias with its own lr on the
same minibatches. float64 keeps the rounding differences (batched vs single kernels) far below
the tolerance over 20 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import gradxform as gx

N, STEPS, BATCH = 4, 20, 16
LRS = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2], dtype=torch.float64)


def _models() -> list[nn.Module]:
    out = []
    for i in range(N):
        torch.manual_seed(100 + i)
        out.append(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double())
    return out


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, N, BATCH, 8, generator=gen, dtype=torch.float64)  # each model its own batches
    y = torch.randint(0, 3, (STEPS, N, BATCH), generator=gen)
    return x, y


def _train_both(make_tx, lrs: torch.Tensor | None):
    models = _models()
    base = models[0]
    x, y = _data()

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(base, p, (xb,)), yb)

    stacked, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in stacked.items()}
    tx = gx.batched(make_tx(1e-2))
    state = tx.init(params)
    if lrs is not None:
        state = gx.set_hyperparam(state, "lr", lrs)
    grads_fn = vmap(grad(loss_fn))
    for t in range(STEPS):
        updates, state = tx.update(grads_fn(params, x[t], y[t]), state, params)
        params = gx.apply_updates(params, updates)

    separate = []
    for i, model in enumerate(models):
        p = {k: v.detach().clone() for k, v in model.named_parameters()}
        tx_i = make_tx(1e-2 if lrs is None else lrs[i].item())
        s = tx_i.init(p)
        for t in range(STEPS):
            u, s = tx_i.update(grad(loss_fn)(p, x[t, i], y[t, i]), s, p)
            p = gx.apply_updates(p, u)
        separate.append(p)
    return params, state, separate


TXS = {
    "adam": lambda lr: gx.adam(lr),
    "sgd_momentum": lambda lr: gx.sgd(lr, momentum=0.9),
    "adamw": lambda lr: gx.adamw(lr, weight_decay=0.1),
    "sgd_nesterov_wd": lambda lr: gx.sgd(lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.mark.parametrize("per_model_lr", [False, True], ids=["shared_lr", "per_model_lr"])
@pytest.mark.parametrize("name", list(TXS))
def test_vmapped_loop_matches_separate_loops(name, per_model_lr):
    lrs = LRS if per_model_lr else None
    vmapped, state, separate = _train_both(TXS[name], lrs)
    for i in range(N):
        for k, v in separate[i].items():
            torch.testing.assert_close(vmapped[k][i], v, rtol=1e-5, atol=1e-12, msg=lambda m, i=i, k=k: f"model {i} {k}: {m}")
    # The models really moved, and differently: the check is not vacuous.
    start, _ = stack_module_state(_models())
    moved = [(vmapped[k] - start[k].detach()).abs().amax(dim=tuple(range(1, v.ndim))) for k, v in vmapped.items()]
    assert all((m > 1e-4).all() for m in moved)
    lr = gx.get_hyperparam(state, "lr")
    assert lr.shape == (N,)
    torch.testing.assert_close(lr, LRS if per_model_lr else torch.full((N,), 1e-2, dtype=torch.float64))


def test_per_model_lr_changes_the_result():
    """Per-model lrs do reach the update: the model with lr 3e-2 moves farther than the one with 1e-3."""
    vmapped, _, _ = _train_both(TXS["sgd_momentum"], LRS)
    start, _ = stack_module_state(_models())
    dist = sum(((vmapped[k] - start[k].detach()) ** 2).flatten(1).sum(1) for k in vmapped).sqrt()
    assert (dist[1:] > dist[:-1]).all(), dist


def test_set_hyperparam_mid_training_matches_separate_loops():
    """Changing the per-model lrs between steps (a manual schedule) still matches separate loops."""
    models = _models()
    base = models[0]
    x, y = _data()

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(base, p, (xb,)), yb)

    def lr_at(t: int) -> torch.Tensor:
        return LRS * (0.5 if t >= STEPS // 2 else 1.0)

    stacked, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in stacked.items()}
    tx = gx.batched(gx.adam(1e-3))
    state = tx.init(params)
    for t in range(STEPS):
        state = gx.set_hyperparam(state, "lr", lr_at(t))
        u, state = tx.update(vmap(grad(loss_fn))(params, x[t], y[t]), state, params)
        params = gx.apply_updates(params, u)
    for i, model in enumerate(models):
        p = {k: v.detach().clone() for k, v in model.named_parameters()}
        tx_i = gx.adam(1e-3)
        s = tx_i.init(p)
        for t in range(STEPS):
            s = gx.set_hyperparam(s, "lr", lr_at(t)[i].item())
            u, s = tx_i.update(grad(loss_fn)(p, x[t, i], y[t, i]), s, p)
            p = gx.apply_updates(p, u)
        for k, v in p.items():
            torch.testing.assert_close(params[k][i], v, rtol=1e-5, atol=1e-12)
