"""Device-parametrised tests: the device comes from the ``device`` fixture (``GX_TEST_DEVICE``,
``cpu`` by default), so CI runs them on CPU and scripts/accelerator_check.sh on CUDA.

On an accelerator they compare every transform's steps with the same steps on CPU, check that a
plain update does not synchronise with the host, and run the per-example engine and a compiled
step there. On CPU the CPU reference is the same computation: there they check placement,
``apply_if_finite``'s counters and the engine against ``torch.func`` (the comparisons that matter
on CPU live in the other test files).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gradxform as gx
from helpers import assert_trees_close, needs
from test_purity import CASES, _grads, _params


def _to(tree, device):
    return gx.tree.tree_map(lambda x: x.to(device), tree)


def _run(name, device, steps=3):
    tx = CASES[name]()
    params = _to(_params(), device)
    state = tx.init(params)
    outs = []
    for seed in range(1, steps + 1):
        updates, state = tx.update(_to(_grads(seed), device), state, params)
        params = gx.apply_updates(params, updates)
        outs.append(updates)
    return params, state, outs


def _leaves(tree):
    return [x for x in gx.tree.tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_transform_on_device_equals_cpu(name, device):
    params, state, outs = _run(name, device)
    for x in _leaves(params) + _leaves(outs):
        assert x.device.type == device.type, name
    ref_params, ref_state, ref_outs = _run(name, torch.device("cpu"))
    assert_trees_close(_to(params, "cpu"), ref_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(_to(outs, "cpu"), ref_outs, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _no_host_sync(device):
    """On CUDA, any synchronising call (``.item()``, ``.cpu()``, a Python branch on a device
    value) raises inside the block."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["chain", "sgd", "adamw", "scale_by_adam", "clip_by_global_norm", "multi_steps"])
def test_update_does_not_sync_with_the_host(name, device):
    tx = CASES[name]()
    params = _to(_params(), device)
    state = tx.init(params)
    updates, state = tx.update(_to(_grads(1), device), state, params)  # first call: lazy setup allowed
    grads = _to(_grads(2), device)
    with _no_host_sync(device):
        updates, state = tx.update(grads, state, params)
    assert all(x.device.type == device.type for x in _leaves(updates))


def test_apply_if_finite_counts_and_skips_on_device(device):
    """A step with an inf is skipped (zero updates, inner state kept) and counted; a good step
    after it is applied and resets the consecutive count. Optax's counter semantics."""
    tx = gx.apply_if_finite(gx.adam(0.1))
    params = _to(_params(), device)
    state = tx.init(params)
    _, state = tx.update(_to(_grads(1), device), state, params)
    bad = _to(_grads(2), device)
    bad["w"][0, 0] = float("inf")
    before = [x.clone() for x in _leaves(state.inner_state)]
    updates, state = tx.update(bad, state, params)
    assert all(torch.count_nonzero(u) == 0 for u in _leaves(updates))
    for a, b in zip(_leaves(state.inner_state), before):
        assert torch.equal(a, b)
    assert (int(state.notfinite_count), bool(state.last_finite), int(state.total_notfinite)) == (1, False, 1)
    updates, state = tx.update(_to(_grads(3), device), state, params)
    assert all(torch.count_nonzero(u) > 0 for u in _leaves(updates))
    assert (int(state.notfinite_count), bool(state.last_finite), int(state.total_notfinite)) == (0, True, 1)


def test_per_example_engine_on_device(device):
    """Sum of squared per-example gradients of an MLP equals ``vmap(grad)``'s, on the device."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (10,), generator=g).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        return F.cross_entropy(functional_call(model, p, (b[0],)), b[1])

    res = gx.grad_and_sum_grad_squared(loss_fn)(params, (x, y))

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    for k, v in per.items():
        assert res.sum_grad_squared[k].device.type == device.type
        # mean reduction: each example's gradient of the batch loss is its own gradient / n
        torch.testing.assert_close(res.sum_grad_squared[k], (v / len(x)).pow(2).sum(0), rtol=1e-9, atol=1e-15)


@needs("fullgraph_compile")
def test_inductor_fullgraph_step_on_device(device):
    tx = CASES["chain"]()
    params = _to(_params(), device)

    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return gx.apply_updates(p, u), s

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    pe, se = params, tx.init(params)
    pc, sc = params, tx.init(params)
    for seed in range(1, 4):
        grads = _to(_grads(seed), device)
        pe, se = step(pe, grads, se)
        pc, sc = compiled(pc, grads, sc)
    assert_trees_close(pc, pe, rtol=1e-5, atol=1e-6)
