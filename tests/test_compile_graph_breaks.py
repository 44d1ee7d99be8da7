"""``torch.compile`` of a training step *with* graph breaks (no ``fullgraph``) runs and equals eager
on every supported torch, the 2.1 floor included. Fullgraph compile needs a newer torch
(tests/test_compile.py, docs/support.md).

Regression tests for two defects seen on torch 2.1.2: a scheduled ``sgd`` kept its step-0
learning rate when compiled (dynamo dropped a local dict mutation at a graph break in
``inject_hyperparams``), and inductor crashed on Adam (no meta kernel for the foreach
``ScalarList`` overloads).
"""

from __future__ import annotations

import pytest
import torch

import gradxform as gx
from helpers import assert_trees_close

TXS = {
    "sgd(warmup_cosine,nesterov)": lambda: gx.sgd(gx.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10), momentum=0.9,
                                                  nesterov=True, weight_decay=1e-3),
    "clip+adamw(cosine,amsgrad)": lambda: gx.chain(
        gx.clip_by_global_norm(1.0), gx.adamw(gx.cosine_decay_schedule(1e-2, 10), weight_decay=0.1, amsgrad=True)),
    "apply_if_finite(adam)": lambda: gx.apply_if_finite(gx.adam(1e-2)),
    "multi_steps(rms)": lambda: gx.multi_steps(gx.chain(gx.scale_by_rms(), gx.scale(-1e-2)), every_k=2),
    "inject(scale_by_learning_rate(linear))": lambda: gx.inject_hyperparams(gx.scale_by_learning_rate)(
        gx.linear_schedule(0.0, 0.1, 3)),
}


def _data(steps: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}
    grads = [{"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)} for _ in range(steps)]
    to = lambda t: {k: v.to(device) for k, v in t.items()}  # noqa: E731
    return to(params), [to(g) for g in grads]


def _eager_and_compiled(tx, params, grads, backend):
    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return gx.apply_updates(p, u), s

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend)
    pe, se = params, tx.init(params)
    pc, sc = params, tx.init(params)
    for g in grads:
        pe, se = step(pe, g, se)
        pc, sc = compiled(pc, g, sc)
    return (pe, se), (pc, sc)


@pytest.mark.parametrize("name", sorted(TXS))
def test_compiled_with_graph_breaks_equals_eager(name, device):
    params, grads = _data(6, device)
    (pe, se), (pc, sc) = _eager_and_compiled(TXS[name](), params, grads, "eager")
    assert_trees_close(pc, pe, rtol=1e-6, atol=1e-7)
    assert_trees_close(sc, se, rtol=1e-6, atol=1e-7)
    assert not torch.equal(pe["w"], params["w"])  # the params moved


def test_scheduled_lr_changes_under_compile_with_graph_breaks(device):
    """The step-k update of a linear warmup is -lr_k * g with lr_k = 0.1 * k / 3 (not lr_0 = 0)."""
    tx = gx.sgd(gx.linear_schedule(0.0, 0.1, 3))
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), backend="eager")
    torch._dynamo.reset()
    params = {"w": torch.ones(3, device=device)}
    state = tx.init(params)
    got = []
    for _ in range(4):
        u, state = compiled({"w": torch.ones(3, device=device)}, state, params)
        got.append(float(u["w"][0]))
    want = [-0.0, -0.1 / 3, -0.2 / 3, -0.1]
    assert got == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("name", ["apply_if_finite(adam)"])
def test_inductor_with_graph_breaks_equals_eager(name, device):
    # two steps: on torch 2.1 each step recompiles the small frames that take Python-number lists
    # (Adam's bias corrections); with C++ codegen that is minutes on a busy 2-core CI machine
    params, grads = _data(2, device)
    (pe, se), (pc, sc) = _eager_and_compiled(TXS[name](), params, grads, "inductor")
    assert_trees_close(pc, pe, rtol=1e-5, atol=1e-6)
    assert_trees_close(sc, se, rtol=1e-5, atol=1e-6)
