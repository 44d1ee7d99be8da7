"""``gradxform.Optimizer`` through Hugging Face ``accelerate`` (CPU): prepare, train, save, resume.

A smoke test of the adapter inside a trainer loop that is not ours: ``Accelerator.prepare`` wraps
the model, the optimizer and an lr scheduler; ``save_state`` / ``load_state`` write and read the
optimizer's ``state_dict`` with ``torch.save`` / ``torch.load``. A run resumed from the
checkpoint must continue bit for bit as the uninterrupted run, and that run must equal
``torch.optim.AdamW`` driven through the same loop (float64, ``atol=1e-12``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradxform as gx

accelerate = pytest.importorskip("accelerate")

STEPS = 6
F64 = torch.float64
KW = {"lr": 2e-2, "betas": (0.85, 0.99), "weight_decay": 0.1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return model


_G = torch.Generator().manual_seed(11)
_X = torch.randn(4, 8, 6, generator=_G, dtype=F64)
_Y = torch.randn(4, 8, 3, generator=_G, dtype=F64)


def make_opt(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "torch":
        return torch.optim.AdamW(model.parameters(), **KW)
    return gx.Optimizer(model.parameters(), gx.adamw(**KW), fused={"generic": False, "fast": None}[kind])


def prepared(kind: str):
    acc = accelerate.Accelerator(cpu=True)
    model = make_model()
    opt = make_opt(kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def train(acc, model, opt, sched, start: int, steps: int) -> None:
    for k in range(start, start + steps):
        opt.zero_grad()
        loss = (model(_X[k % 4]) - _Y[k % 4]).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["generic", "fast"])
def test_accelerate_save_state_and_resume(kind, tmp_path):
    acc, model, opt, sched = prepared(kind)
    train(acc, model, opt, sched, 0, STEPS)
    acc.save_state(str(tmp_path / "ckpt"))
    saved_sd = copy.deepcopy(opt.state_dict())
    train(acc, model, opt, sched, STEPS, STEPS)
    uninterrupted = params(model)

    # a fresh process-like start: new model (other values), new optimizer, state loaded from disk
    acc2, model2, opt2, sched2 = prepared(kind)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    acc2.load_state(str(tmp_path / "ckpt"))
    assert sched2.scheduler.last_epoch == STEPS
    assert opt2.param_groups[0]["lr"] == pytest.approx(saved_sd["param_groups"][0]["lr"])
    train(acc2, model2, opt2, sched2, STEPS, STEPS)
    for a, b in zip(params(model2), uninterrupted):
        assert torch.equal(a, b), "the resumed run differs from the uninterrupted one"

    # the uninterrupted run equals torch.optim.AdamW through the same loop
    acc_t, model_t, opt_t, sched_t = prepared("torch")
    train(acc_t, model_t, opt_t, sched_t, 0, 2 * STEPS)
    for a, b in zip(uninterrupted, params(model_t)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
