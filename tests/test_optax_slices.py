"""The optax catalog's eager steps slice by slice, and the learning rate added into the params.

Under ``gx.Optimizer`` (which owns the state and adds the update into the params right after):

- a chain ending in ``scale_by_learning_rate`` adds ``-lr u`` into the params itself, slice by
  slice (`gradxform.base.call_apply`), with the rounding of ``p + (-lr u)`` computed the pure
  way (a fused ``p.add_(u, alpha=-lr)`` rounds once and would differ);
- a chain ending in ``trace`` (optax's LARS) adds the momentum buffer into the params (the
  bits of ``p + b``) rather than a copy of it; fromage adds ``u + (c - 1) p`` into the params
  slice by slice;
- yogi, adabelief, optax's Adam (nadamw, lamb), optax's Rprop, schedule-free's debiased RMS and
  schedule-free's own step work through each leaf one cache-sized slice at a time, so that a
  state buffer is read and written once per step and no intermediate result is params-sized.

Checked here: the numbers are bit for bit those of the pure update followed by ``apply_updates``
(and of the owned update followed by the add), on leaves of several slices with a partial last
one, in float32 and float64; non-contiguous gradients give the same numbers as contiguous ones;
every one of these aliases declares and takes the add into the params; and a step runs no
whole-leaf kernel beyond the ones named per alias (before: 14 to 68 per step).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gradxform as gx
from gradxform import _compat
from gradxform.base import Ownership, call_apply, info_of
from gradxform.transforms import _CHUNK

ALIASES: dict[str, Callable[[], gx.GradientTransformation]] = {
    "yogi": lambda: gx.yogi(1e-2),
    "adabelief": lambda: gx.adabelief(1e-3),
    "adabelief_eps_root0": lambda: gx.adabelief(1e-3, eps_root=0.0),
    "adabelief_nesterov": lambda: gx.adabelief(1e-3, nesterov=True),  # the chain's path (a whole-leaf block)
    "nadamw": lambda: gx.nadamw(1e-3),
    "nadamw_no_wd_eps_root": lambda: gx.nadamw(1e-3, weight_decay=0.0, eps_root=1e-9),
    "lamb": lambda: gx.lamb(1e-3, weight_decay=0.01),
    "optax_rprop": lambda: gx.optax_rprop(1e-2),  # the whole chain slice by slice into the params
    "optax_rprop_etas": lambda: gx.optax_rprop(1e-2, eta_minus=0.3, eta_plus=1.5, min_step_size=1e-4, max_step_size=0.05),
    "schedule_free_sgd": lambda: gx.schedule_free_sgd(0.1),
    "schedule_free_sgd_wd_warmup": lambda: gx.schedule_free_sgd(0.1, weight_decay=1e-2, warmup_steps=3),
    "schedule_free_adamw": lambda: gx.schedule_free_adamw(1e-3),
    "schedule_free_adamw_warmup": lambda: gx.schedule_free_adamw(1e-3, warmup_steps=3),  # the rate folded
    "schedule_free_adamw_wd_warmup": lambda: gx.schedule_free_adamw(1e-3, weight_decay=0.1, warmup_steps=3),
    "lion": lambda: gx.lion(1e-4),  # the whole chain slice by slice (sign, moment, decay, rate)
    "lion_no_wd_schedule": lambda: gx.lion(lambda c: 1e-3 * 0.9 ** c, b1=0.8, weight_decay=0.0),
    "lion_mask": lambda: gx.lion(1e-3, weight_decay=0.1, mask=lambda ps: [p.ndim > 1 for p in ps]),  # chain's path
    "signum": lambda: gx.signum(1e-2, beta=0.8),  # the EMA, its sign and the rate slice by slice
    "amsgrad": lambda: gx.amsgrad(1e-3),
    # trace last (optax's LARS): the momentum buffer is added into the params (it was cloned
    # into a new params-sized output, then added by the adapter); Nesterov's output is made in
    # the incoming temporary
    "lars": lambda: gx.lars(0.5, weight_decay=1e-3),
    "lars_nesterov": lambda: gx.lars(0.5, trust_coefficient=0.01, eps=1e-6, nesterov=True),
    "trace": lambda: gx.trace(0.9),  # straight on the gradients, which the adapter never writes
    "lr_then_trace_dampened": lambda: gx.chain(gx.scale_by_learning_rate(0.1), gx.trace(0.8, dampening=0.3)),
    # fromage's shrink u + (c - 1) p, last: made slice by slice and added into the params
    "fromage": lambda: gx.fromage(1e-2),
    # the optimistic step writes into the Adam output it receives, slice by slice
    "optimistic_adam": lambda: gx.optimistic_adam(1e-2),
    "optimistic_adam_optimism": lambda: gx.optimistic_adam(1e-2, optimism=0.3, nesterov=False),
    "optimistic_gradient_descent": lambda: gx.optimistic_gradient_descent(1e-2, alpha=0.7, beta=0.4),
    # optax's Adamax moments and ratio slice by slice
    "adamaxw": lambda: gx.adamaxw(1e-3),
    "adamaxw_no_wd": lambda: gx.adamaxw(1e-2, b1=0.8, eps=1e-6, weight_decay=0.0),
    "adamaxw_mask": lambda: gx.adamaxw(1e-2, mask=lambda ps: [p.ndim > 1 for p in ps]),  # the chain's path
    "nadamw_b1_zero": lambda: gx.nadamw(1e-3, b1=0.0),  # Nesterov at b1 = 0: declined, the chain's path
}
# steps that reuse their input or slice a term but leave the add into the params to the adapter:
# checked bit for bit only
BITS_ONLY: dict[str, Callable[[], gx.GradientTransformation]] = {
    "madgrad_wd": lambda: gx.madgrad(1e-2, weight_decay=0.01),  # sigma written into the decayed gradient
    "dadapt_adamw_wd": lambda: gx.dadapt_adamw(1.0, weight_decay=0.05),  # the decay's term slice by slice
}
# a leaf of 4 full slices and a partial one, one of exactly one slice, small ones
SHAPES = [(4 * _CHUNK + 123,), (_CHUNK,), (300, 7), (17,), (1,)]


def _params(dtype: torch.dtype, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(s, generator=g, dtype=dtype) * 0.1).requires_grad_() for s in shapes]


def _grads(ps: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2 for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(ALIASES) + sorted(BITS_ONLY))
def test_optimizer_equals_pure_update_then_add_bit_for_bit(name, dtype):
    """gx.Optimizer (sliced, the lr added into the params) against the pure ``tx.update`` +
    ``apply_updates`` and against ``update_in_place`` + ``apply_updates(inplace=True)``: equal
    bits over 6 steps (schedule-free's and rprop's steps included), params and float state."""
    make = {**ALIASES, **BITS_ONLY}[name]
    ps = _params(dtype)
    ref = [p.detach().clone() for p in ps]
    pure = [p.detach().clone() for p in ps]
    opt = gx.Optimizer(ps, make())
    tx, tx_pure = make(), make()
    state, state_pure = tx.init(ref), tx_pure.init(pure)
    for k in range(6):
        grads = _grads(ps, k)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        with torch.no_grad():
            u, state = gx.update_in_place(tx, [g.clone() for g in grads], state, ref)
            gx.apply_updates(ref, u, inplace=True)
            u, state_pure = tx_pure.update(grads, state_pure, pure)
            pure = gx.apply_updates(pure, u)
        for i, (p, r, q) in enumerate(zip(ps, ref, pure)):
            assert torch.equal(p.detach(), r), f"{name} step {k + 1} leaf {i}: adapter != owned update + add"
            assert torch.equal(r, q), f"{name} step {k + 1} leaf {i}: owned != pure"
    for a, b in zip(tree_flatten(opt.tx_state())[0], tree_flatten(state_pure)[0]):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.equal(a, b), f"{name}: state differs"


@pytest.mark.parametrize("name", ["yogi", "adabelief", "nadamw", "optax_rprop", "schedule_free_adamw", "adamaxw_no_wd"])
def test_non_contiguous_gradients_give_the_same_numbers(name):
    """A transposed (non-contiguous) gradient takes the whole-leaf form of the sliced step: the
    same numbers as its contiguous copy."""
    make = ALIASES[name]
    shapes = [(_CHUNK // 64 + 5, 130), (9, 4)]
    p0 = [p.detach() for p in _params(torch.float64, shapes)]
    ta, tb = make(), make()
    pa, pb = [p.clone() for p in p0], [p.clone() for p in p0]
    sa, sb = ta.init(pa), tb.init(pb)
    for k in range(4):
        grads = _grads(p0, k)
        strided = [g.t().contiguous().t() for g in grads]  # same values, transposed layout
        assert not strided[0].is_contiguous()
        ua, sa = ta.update(grads, sa, pa)
        ub, sb = tb.update(strided, sb, pb)
        pa, pb = gx.apply_updates(pa, ua), gx.apply_updates(pb, ub)
        for x, y in zip(pa, pb):
            assert torch.equal(x, y), f"{name} step {k + 1}"


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_declared_and_taken(name):
    """Each alias declares ``owned_apply`` (through inject_hyperparams and chain) and an owned
    step returns ``None`` for every leaf: the update went into the params."""
    tx = ALIASES[name]()
    assert info_of(tx).owned_apply is not None
    ps = [p.detach() for p in _params(torch.float32, [(40, 30), (30,)])]
    state = tx.init(ps)
    before = [p.clone() for p in ps]
    for k in range(3):
        updates, state = call_apply(tx, _grads(ps, k), state, ps, Ownership(state=True, updates=True))
    assert updates == [None] * len(ps)
    assert not any(torch.equal(p, b) for p, b in zip(ps, before))


def test_a_learning_rate_schedule_or_a_tensor_rate_still_adds_correctly():
    """``scale_by_learning_rate`` with a schedule declares nothing (the adapter adds); with a
    0-d tensor rate it adds into the params exactly as ``p + (-lr u)``."""
    assert info_of(gx.scale_by_learning_rate(lambda c: 0.1)).owned_apply is None
    tx = gx.scale_by_learning_rate(torch.tensor(0.3))
    ps = [p.detach() for p in _params(torch.float32, [(2 * _CHUNK + 1,)])]
    u = _grads(ps, 0)
    expected = [p + u[0] * -0.3 for p in ps]
    out, _ = call_apply(tx, [x.clone() for x in u], tx.init(ps), ps, Ownership(state=True, updates=True))
    assert out == [None]
    assert torch.equal(ps[0], expected[0])


class _WholeLeafKernels(TorchDispatchMode):
    """Names of the computing kernels that touch a tensor of more than one slice's elements
    (views, slices and allocations do not move memory and are not counted)."""

    FREE = ("view", "slice", "empty", "_unsafe_view", "detach", "alias", "as_strided")

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.__name__
        if not name.startswith(self.FREE):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(t.numel() > _CHUNK for t in tensors):
                self.kernels.append(name)
        return func(*args, **kwargs)


# the whole-leaf kernels left in a step, each a separate block the alias chains
WHOLE_LEAF = {
    "yogi": [],
    "adabelief": [],
    "nadamw_no_wd_eps_root": [],
    "nadamw": [],  # the whole chain slice by slice, the decay's u + wd p included (was one whole-leaf add)
    "optax_rprop": [],
    "adamaxw_no_wd": [],
    "lion": [],
    "signum": [],
    "optimistic_gradient_descent": [],
    # with a decay mask the three blocks run as a chain (the update made whole, then sliced into the params)
    "lion_mask": ["_foreach_lerp.Scalar", "_foreach_sign_.default", "_foreach_lerp_.Scalar", "_foreach_add_.List"],
    "adamaxw": [],
    "schedule_free_sgd": ["_foreach_mul.Scalar"],  # the base update -lr g
    "schedule_free_adamw": [],  # the base's learning rate on each cached slice (was a whole-leaf multiply)
    "schedule_free_adamw_wd_warmup": [],  # the decay and the rate on each cached slice (were two whole-leaf kernels)
}


@pytest.mark.parametrize("name", sorted(WHOLE_LEAF))
def test_a_step_runs_no_whole_leaf_kernel_but_the_named_ones(name):
    """Every kernel of the sliced step runs on a cache-sized slice; what is left whole is the
    work of another block of the chain. Before: yogi 16, adabelief 14, nadamw 57 (without
    weight decay, with eps_root: 68), optax_rprop 28, schedule_free_sgd 40, schedule_free_adamw
    47 (counting the kernels of the former helpers that chunked the denominator or the
    difference in 128K-element chunks, which are larger than a slice here)."""
    ps = _params(torch.float32, [(1024, 1024), (1024,), (512, 1024), (512,)])
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt = gx.Optimizer(ps, ALIASES[name]())
    opt.step()
    opt.step()
    mode = _WholeLeafKernels()
    with mode:
        opt.step()
    assert mode.kernels == WHOLE_LEAF[name]


@pytest.mark.parametrize("name", ["yogi", "adabelief", "nadamw", "nadamw_no_wd_eps_root", "schedule_free_adamw",
                                  "optimistic_gradient_descent", "trace", "adamaxw_no_wd"])
def test_donated_updates_take_the_output_and_keep_the_numbers(name):
    """With the incoming updates donated (``update_in_place(..., donate_updates=True)``) the
    sliced step writes its output into them (each slice after its last read, the
    intermediate results in a scratch slice): the same numbers as the pure update."""
    make = ALIASES[name]
    p0 = [p.detach() for p in _params(torch.float64)]
    ta, tb = make(), make()
    pa, pb = [p.clone() for p in p0], [p.clone() for p in p0]
    sa, sb = ta.init(pa), tb.init(pb)
    for k in range(4):
        grads = _grads(p0, k)
        donated = [g.clone() for g in grads]
        ua, sa = gx.update_in_place(ta, donated, sa, pa, donate_updates=True)
        ub, sb = tb.update(grads, sb, pb)
        gx.apply_updates(pa, ua, inplace=True)
        pb = gx.apply_updates(pb, ub)
        for x, y in zip(pa, pb):
            assert torch.equal(x, y), f"{name} step {k + 1}"


def test_a_sparse_update_is_left_to_the_caller():
    """A sparse update (gx.sgd on an nn.Embedding(sparse=True)) is not sliced: the rate is
    applied and the update returned for the adapter to add, as before."""
    tx = gx.scale_by_learning_rate(0.5)
    p = [torch.zeros(5, 3)]
    g = [torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (5, 3))]
    expected = -0.5 * g[0].to_dense()
    u, _ = call_apply(tx, g, tx.init(p), p, Ownership(state=True, updates=True))
    assert u[0].layout is torch.sparse_coo
    assert torch.equal(u[0].to_dense(), expected)
    assert torch.equal(p[0], torch.zeros(5, 3))
    # the pure update too (torch 2.1's foreach kernels take no sparse tensor: run leaf by leaf there)
    fresh = [torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (5, 3))]  # (g was owned above, and scaled)
    u, _ = tx.update(fresh, tx.init(p))
    assert u[0].layout is torch.sparse_coo and torch.equal(u[0].to_dense(), expected)


@pytest.mark.skipif(not _compat._at_least(2, 13), reason="the meta device stands in for an accelerator here, and "
                    "torch 2.1's meta backend has no foreach kernels (aten::_foreach_div.ScalarList, measured on 2.1.2); "
                    "the check is the same code on any torch and runs on 2.13")
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_an_accelerator_keeps_the_foreach_kernels(name, monkeypatch):
    """Leaves off the CPU (here the ``meta`` device, which runs every kernel without data) are
    never sliced and never added into the params by the step: slicing a leaf into cache-sized
    pieces would multiply an accelerator's kernel launches. The caller gets every update back."""
    from gradxform import _owned

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sliced a leaf that is not on the CPU")

    monkeypatch.setattr(_owned, "by_slices", refuse)
    tx = ALIASES[name]()
    ps = [torch.zeros(s, device="meta") for s in [(2 * _CHUNK + 5,), (30,)]]
    state = tx.init(ps)
    for _ in range(2):
        updates, state = call_apply(tx, [torch.ones_like(p) for p in ps], state, ps, Ownership(state=True, updates=True))
        assert [u.shape for u in updates] == [p.shape for p in ps]


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_trace_writes_its_output_into_a_donated_update_never_into_its_buffer(nesterov):
    """With the updates donated, trace's output is the donated tensor (no new buffer), equal to
    the pure update's; without, a new tensor; never the state's buffer, which a later in-place
    block of the chain would otherwise overwrite."""
    params = [torch.zeros(5, dtype=torch.float64)]
    ta, tb = gx.trace(0.9, nesterov=nesterov), gx.trace(0.9, nesterov=nesterov)
    sa, sb = ta.init(params), tb.init(params)
    for k in range(3):
        g = [torch.linspace(-1, 1, 5, dtype=torch.float64) * (k + 1)]
        donated = [x.clone() for x in g]
        ua, sa = gx.update_in_place(ta, donated, sa, params, donate_updates=True)
        ub, sb = tb.update(g, sb, params)
        assert torch.equal(ua[0], ub[0]) and torch.equal(sa.trace[0], sb.trace[0]), k
        assert ua[0] is donated[0] and ub[0] is not g[0], k
        assert ua[0].data_ptr() != sa.trace[0].data_ptr() and ub[0].data_ptr() != sb.trace[0].data_ptr(), k
