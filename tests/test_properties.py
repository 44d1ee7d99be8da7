"""Property tests: any chain of blocks gives the same result through the pure functional API and
through the adapter, where transforms update buffers in place (their owned update, `gx.update_in_place`)."""

from __future__ import annotations

import pytest
import torch

import gradxform as gx

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install hypothesis)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F64 = torch.float64

# Blocks that take any updates tree (the adapter passes a list of tensors).
BLOCKS = {
    "clip_by_global_norm": lambda: gx.clip_by_global_norm(0.5),
    "clip_by_leaf_norm": lambda: gx.clip_by_leaf_norm(0.3),
    "clip": lambda: gx.clip(0.05),
    "clip_by_block_rms": lambda: gx.clip_by_block_rms(0.1),
    "adaptive_grad_clip": lambda: gx.adaptive_grad_clip(0.05),
    "autoclip": lambda: gx.autoclip(0.5, history=4),
    "random_clip": lambda: gx.random_clip_by_global_norm(0.3, beta=0.5, seed=1),
    "monitor_norm": lambda: gx.monitor_norm(4),
    "trace": lambda: gx.trace(0.9),
    "trace_nesterov": lambda: gx.trace(0.8, nesterov=True),
    "trace_dampening": lambda: gx.trace(0.9, dampening=0.5),
    "scale_by_adam": lambda: gx.scale_by_adam(amsgrad=True),
    "scale_by_rms": lambda: gx.scale_by_rms(0.9),
    "add_decayed_weights": lambda: gx.add_decayed_weights(0.1),
    "scale": lambda: gx.scale(0.7),
    "apply_if_finite_adam": lambda: gx.apply_if_finite(gx.scale_by_adam()),
    "multi_steps_trace": lambda: gx.multi_steps(gx.trace(0.5), every_k=2),
    # TrueGrad transforms without a statistic take their fallback (plain) step everywhere
    "truegrad_adam_fallback": lambda: gx.scale_by_truegrad_adam(fallback="adam"),
    "truegrad_laprop_fallback": lambda: gx.scale_by_truegrad_laprop(fallback="adam"),
    "truegrad_rmsprop_baseline": lambda: gx.scale_by_truegrad_rmsprop(enforce_baseline=True),
    "graft_adam_trace": lambda: gx.graft(gx.scale_by_adam(), gx.trace(0.9)),
    "graft_clip_adam": lambda: gx.graft(gx.clip_by_global_norm(0.5), gx.scale_by_adam()),
}


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(3, dtype=F64, generator=g),
            torch.randn(2, 2, 2, generator=g, dtype=F64)]


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4),
    frozen=st.lists(st.booleans(), min_size=5, max_size=5),
    alias=st.sampled_from([None, "sgd", "adamw"]),
)
def test_adapter_in_place_equals_functional(names, frozen, alias):
    """Functional loop (pure) == gx.Optimizer (in place, fused=False) == gx.Optimizer (default)."""
    if alias == "sgd":
        tail = [gx.sgd(0.1, momentum=0.9)]
    elif alias == "adamw":
        tail = [gx.adamw(0.05)]
    else:
        tail = [gx.scale(-0.1)]
    make = lambda: gx.chain(*[BLOCKS[n]() for n in names], *tail)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    steps = [[torch.randn(p.shape, generator=g, dtype=F64) * 3 for p in _params()] for _ in range(5)]
    # the middle param has no gradient on some steps (a frozen leaf)
    for t, f in enumerate(frozen):
        if f:
            steps[t][1] = None

    tx = make()
    params = _params()
    state = tx.init(params)
    for grads in steps:
        before = [None if x is None else x.clone() for x in grads]
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, before))

    for fused in (False, None):
        ps = [torch.nn.Parameter(p) for p in _params()]
        opt = gx.Optimizer(ps, make(), fused=fused)
        for grads in steps:
            for p, gr in zip(ps, grads):
                p.grad = None if gr is None else gr.clone()
            opt.step()
        for a, b in zip(ps, params):
            torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)
