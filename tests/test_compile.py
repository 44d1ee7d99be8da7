"""``torch.compile(fullgraph=True)`` of a chain's update equals eager and compiles once."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import gradxform as gx
from helpers import needs
from helpers import assert_trees_close, eager_and_compiled, state_buffers

# fullgraph compile; with graph breaks on every torch: tests/test_compile_graph_breaks.py
pytestmark = needs("fullgraph_compile")


def _params_and_grads(steps):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}
    grads = [{"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)} for _ in range(steps)]
    return params, grads


def _run(step, params, grads, state):
    for g in grads:
        params, state = step(params, g, state)
    return params, state


TXS = {
    "clip+adamw(cosine)": lambda: gx.chain(
        gx.clip_by_global_norm(1.0), gx.adamw(gx.cosine_decay_schedule(1e-2, 10), weight_decay=0.1, amsgrad=True)
    ),
    "sgd(nesterov,warmup)": lambda: gx.sgd(gx.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10), momentum=0.9,
                                           nesterov=True, weight_decay=1e-3),
    "apply_if_finite(adam)": lambda: gx.apply_if_finite(gx.adam(1e-2)),
    "multi_steps(rms)": lambda: gx.multi_steps(gx.chain(gx.scale_by_rms(), gx.scale(-1e-2)), every_k=2),
    # with sum_grad_squared: tests/test_moments.py::test_compiled_update_equals_eager_and_compiles_once
    "tg_adamw(fallback)": lambda: gx.tg_adamw(1e-2, fallback="adam"),
    "graft(adam, trace)": lambda: gx.chain(gx.graft(gx.scale_by_adam(), gx.trace(0.9)), gx.scale(-1e-2)),
}


@pytest.mark.parametrize("name", sorted(TXS))
def test_compiled_update_equals_eager_and_compiles_once(name):
    params, grads = _params_and_grads(10)
    eager, comp, frames = eager_and_compiled(TXS[name](), params, grads)
    assert frames == 1, f"recompiled: {frames} frames for 10 steps"
    assert_trees_close(comp[-1][0], eager[-1][0], rtol=1e-5, atol=1e-6)
    assert_trees_close(comp[-1][1], eager[-1][1], rtol=1e-5, atol=1e-6)


def test_inductor_compiled_step_equals_eager():
    """The real backend (C++ codegen on CPU) too, for the chain the issue names."""
    torch._dynamo.reset()
    tx = TXS["clip+adamw(cosine)"]()

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return gx.apply_updates(params, updates), state

    params, grads = _params_and_grads(5)
    eager_p, _ = _run(step, params, grads, tx.init(params))
    comp_p, _ = _run(torch.compile(step, fullgraph=True), params, grads, tx.init(params))
    assert_trees_close(comp_p, eager_p, rtol=1e-5, atol=1e-6)


def test_changing_injected_lr_does_not_recompile():
    torch._dynamo.reset()
    tx = gx.adamw(1e-3)

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return gx.apply_updates(params, updates), state

    params, grads = _params_and_grads(4)
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    state = tx.init(params)
    eager_state = tx.init(params)
    eager_params = params
    for i, g in enumerate(grads):
        lr = 1e-3 * (i + 1)
        state.hyperparams["lr"].fill_(lr)
        eager_state.hyperparams["lr"].fill_(lr)
        params, state = compiled(params, g, state)
        eager_params, eager_state = step(eager_params, g, eager_state)
    assert counter.frame_count == 1
    assert_trees_close(params, eager_params, rtol=1e-5, atol=1e-7)


def test_compiled_step_with_update_in_place_equals_pure_eager():
    """A compiled step that donates its buffers (update_in_place + apply_updates(inplace=True))
    computes the same as the pure eager step, and still compiles once."""
    torch._dynamo.reset()
    tx = TXS["clip+adamw(cosine)"]()

    def pure(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return gx.apply_updates(params, updates), state

    def donating(params, grads, state):
        updates, state = gx.update_in_place(tx, grads, state, params)
        return gx.apply_updates(params, updates, inplace=True), state

    params, grads = _params_and_grads(6)
    eager_p, eager_s = _run(pure, params, grads, tx.init(params))
    counter = CompileCounter()
    compiled = torch.compile(donating, fullgraph=True, backend=counter)
    p = {k: v.clone() for k, v in params.items()}
    s = tx.init(p)
    for g in grads:
        buffers = state_buffers(s, p)  # mu, nu, nu_max of w and b
        p_new, s = compiled(p, g, s)
        assert p_new["w"] is p["w"] or torch.equal(p_new["w"], p["w"])  # updated in place
        # the state is donated too: the same moment buffers come back, written in place (a
        # compiled step that allocated new moments every call ran 2-3x torch's fused AdamW)
        assert len(buffers) == 6
        assert all(a is b for a, b in zip(buffers, state_buffers(s, p_new)))
        p = p_new
    assert counter.frame_count == 1
    assert_trees_close(p, eager_p, rtol=1e-5, atol=1e-6)
    assert_trees_close(s, eager_s, rtol=1e-5, atol=1e-6)


def test_functorch_active_is_false_in_a_plain_compiled_step_and_true_under_vmap_and_grad():
    """``gx.tree.functorch_active`` drives the per-leaf out-of-place fallback of the foreach ops.
    Under torch.compile it must see the real transform stack: False for a plain step (dynamo's
    stand-in for ``peek_interpreter_stack()`` is never None), True inside vmap, grad and jvp."""
    seen = []

    def probe(x):
        seen.append(gx.tree.functorch_active())
        return x * 2

    cases = {
        "plain": (lambda x: probe(x), torch.ones(3)),
        "vmap": (lambda x: torch.func.vmap(probe)(x), torch.ones(2, 3)),
        "grad": (lambda x: torch.func.grad(lambda y: probe(y).sum())(x), torch.ones(3)),
        "jvp": (lambda x: torch.func.jvp(probe, (x,), (x,))[1], torch.ones(3)),
    }
    for name, (fn, x) in cases.items():
        torch._dynamo.reset()
        seen.clear()
        fn(x)
        torch.compile(fn, fullgraph=True, backend="eager")(x)
        assert seen == [name != "plain"] * 2, (name, seen)


def test_compiled_batched_adam_step_equals_eager():
    """``torch.compile`` of a `gx.batched` Adam step (the ensemble recipe: ``vmap`` of the update
    inside the compiled function) takes the per-leaf fallback inside the traced vmap, equals the
    eager step and compiles once."""
    torch._dynamo.reset()
    tx = gx.batched(gx.adam(1e-2))
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 5, 3, generator=g), "b": torch.randn(4, 3, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(3)]

    def step(p, gr, st):
        u, st = tx.update(gr, st, p)
        return gx.apply_updates(p, u), st

    eager_p, eager_s = _run(step, params, grads, tx.init(params))
    counter = CompileCounter()
    comp_p, comp_s = _run(torch.compile(step, fullgraph=True, backend=counter), params, grads, tx.init(params))
    assert counter.frame_count == 1
    assert_trees_close(comp_p, eager_p, rtol=1e-6, atol=1e-7)
    assert_trees_close(comp_s, eager_s, rtol=1e-6, atol=1e-7)
    assert not torch.equal(comp_p["w"], params["w"])


def test_import_does_not_load_dynamo():
    """The compile-time helpers (the functorch probe, the adapter's eager-only sync) are set up
    without importing torch._dynamo: ``import gradxform`` stays ~0.1 s instead of ~1.3 s."""
    import subprocess
    import sys

    code = "import sys, gradxform; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
