"""The adapter's last term into the params (``gradxform.base.call_apply``): RMSprop, Adamax, NAdam
and RAdam add their final ``k a / b`` into the params with one ``addcdiv_``, as torch.optim's
``foreach`` steps do, instead of writing an update that ``gx.Optimizer`` adds in a second pass.

Checked here: the numbers are bit for bit those of the owned update followed by the add (the
adapter's path before), on leaves below and above NAdam's chunk, in float32 and float64, with two
threads; only transforms that declare it take it (a chain ending in another block, a masked
alias); the params-sized tensors a step writes are at most torch.optim's; NAdam's numerator is
no params-sized temporary. And Adagrad's all-tensor (compiled) path scales the gradient once.
RMSprop, Adamax and NAdam on a leaf above one chunk take the whole step chunk by chunk (RMSprop
and Adamax bit for bit torch.optim's ``foreach`` step, NAdam bit for bit its own update path),
no params-sized temporary.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gradxform as gx
from gradxform.base import Ownership, call_apply, info_of

APPLIED: dict[str, Callable[[], gx.GradientTransformation]] = {
    "rmsprop": lambda: gx.rmsprop(1e-2),
    "rmsprop_centered_wd_maximize": lambda: gx.rmsprop(1e-2, centered=True, weight_decay=0.1, maximize=True),
    "adamax": lambda: gx.adamax(2e-3),
    "adamax_wd": lambda: gx.adamax(2e-3, weight_decay=0.1),
    "nadam": lambda: gx.nadam(2e-3),
    "nadam_l2": lambda: gx.nadam(2e-3, weight_decay=0.1),
    "radam": lambda: gx.radam(1e-3),
    "radam_l2_maximize": lambda: gx.radam(1e-3, weight_decay=0.1, maximize=True),
}
# the same aliases where the last term is not added into the params by one kernel (its rounding
# would change); RMSprop with momentum adds ``-lr b`` as formed on a streamed (large) leaf
NOT_APPLIED = {
    "rmsprop_momentum": lambda: gx.rmsprop(1e-2, momentum=0.9),
    "nadamw": lambda: gx.nadam(2e-3, weight_decay=0.1, decoupled_weight_decay=True),
    "radamw": lambda: gx.radam(1e-3, weight_decay=0.1, decoupled_weight_decay=True),
}
BIG = (600, 500)  # 300_000 elements: above NAdam's 2**18-element chunk (a partial last chunk)


def _params(dtype: torch.dtype, big: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = [BIG, (500,), (17, 5), (1,)] if big else [(40, 30), (30,)]
    return [(torch.randn(s, generator=g, dtype=dtype) * 0.1).requires_grad_() for s in shapes]


def _grads(ps: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2 for p in ps]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted({**APPLIED, **NOT_APPLIED}))
def test_optimizer_equals_owned_update_then_add_bit_for_bit(name, dtype, two_threads):
    """gx.Optimizer (its last term added into the params) against ``update_in_place`` followed
    by ``apply_updates(inplace=True)`` (the adapter's former path): equal bits, params and state,
    over 8 steps (RAdam rectifies from its 6th)."""
    make = {**APPLIED, **NOT_APPLIED}[name]
    ps = _params(dtype)
    ref = [p.detach().clone() for p in ps]
    opt = gx.Optimizer(ps, make())
    tx = make()
    state = tx.init(ref)
    for k in range(8):
        grads = _grads(ps, k)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        with torch.no_grad():
            updates, state = gx.update_in_place(tx, [g.clone() for g in grads], state, ref)
            gx.apply_updates(ref, updates, inplace=True)
        for p, r in zip(ps, ref):
            assert torch.equal(p.detach(), r), f"{name} step {k + 1}: params differ"
    got = opt.tx_state()  # (integer counts aside: a stepped flag is stored as whether p has state)
    for a, b in zip(tree_flatten(got)[0], tree_flatten(state)[0]):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.equal(a, b), f"{name}: state differs"


@pytest.mark.parametrize("name", sorted(APPLIED))
def test_declared_and_taken(name):
    """The alias declares ``owned_apply`` (through inject_hyperparams and chain) and a step
    returns ``None`` for every leaf: nothing is left for the adapter to add."""
    tx = APPLIED[name]()
    assert info_of(tx).owned_apply is not None
    ps = [p.detach() for p in _params(torch.float32, big=False)]
    state = tx.init(ps)
    before = [p.clone() for p in ps]
    own = Ownership(state=True, updates=True)
    for k in range(7):  # RAdam's last term is the rectified one from step 6
        updates, state = call_apply(tx, _grads(ps, k), state, ps, own)
    assert updates == [None] * len(ps)
    assert not any(torch.equal(p, b) for p, b in zip(ps, before))


def test_only_transforms_that_declare_it_take_it():
    """A chain whose last member is not a declaring block, and a masked alias, declare nothing:
    their updates come back whole (the adapter adds them)."""
    assert info_of(gx.chain(gx.rmsprop(1e-2), gx.scale(0.5))).owned_apply is None
    masked = gx.masked(gx.rmsprop(1e-2), [True, False])
    assert info_of(masked).owned_apply is None
    ps = [p.detach() for p in _params(torch.float32, big=False)]
    for tx in (gx.chain(gx.rmsprop(1e-2), gx.scale(0.5)), masked):
        before = [p.clone() for p in ps]
        updates, _ = call_apply(tx, _grads(ps, 0), tx.init(ps), ps, Ownership(state=True, updates=True))
        assert all(isinstance(u, torch.Tensor) for u in updates)
        assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_call_apply_needs_owned_state():
    tx = gx.rmsprop(1e-2)
    ps = [torch.zeros(3)]
    with pytest.raises(ValueError, match="owns the state"):
        call_apply(tx, [torch.ones(3)], tx.init(ps), ps, Ownership())


# --- passes and temporaries (counted, not timed) ----------------------------------------------------


class _ParamsSizedWrites(TorchDispatchMode):
    """Counts the params-sized tensors each op writes (its mutated arguments, or its new outputs;
    a view, e.g. the flat view or a slice of a leaf, writes nothing)."""

    def __init__(self, numels: set[int]) -> None:
        super().__init__()
        self.numels = numels
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
        written = [v for a, v in zip(func._schema.arguments, given) if a.alias_info is not None and a.alias_info.is_write]
        if not written:  # the outputs that are new tensors, not views of an argument
            outs = out if isinstance(out, (tuple, list)) else (out,)
            written = [o for r, o in zip(func._schema.returns, outs) if r.alias_info is None]
        tensors = tree_flatten(written)[0]
        self.count += sum(1 for t in tensors if isinstance(t, torch.Tensor) and t.numel() in self.numels)
        return out


def _writes_per_step(opt: torch.optim.Optimizer, ps: list[torch.Tensor]) -> float:
    for _ in range(7):  # past RAdam's first rectified step
        opt.step()
    mode = _ParamsSizedWrites({p.numel() for p in ps})
    with mode:
        opt.step()
    return mode.count / len(ps)


TORCH_TWIN = {"rmsprop": (gx.rmsprop, torch.optim.RMSprop, {}), "adamax": (gx.adamax, torch.optim.Adamax, {}),
              "nadam": (gx.nadam, torch.optim.NAdam, {}), "radam": (gx.radam, torch.optim.RAdam, {}),
              "rmsprop_centered": (gx.rmsprop, torch.optim.RMSprop, {"centered": True})}


@pytest.mark.parametrize("name", sorted(TORCH_TWIN))
def test_a_step_writes_no_more_params_sized_tensors_than_torch_foreach(name):
    """Passes over memory, counted as params-sized tensors written per param and step: at most
    torch.optim's ``foreach=True`` (before: RMSprop 6 against 5, Adamax 7 against 6: the
    update was written, then added to the params in a pass of its own)."""
    make_gx, cls, kw = TORCH_TWIN[name]
    ps = _params(torch.float32, big=False)
    tps = [p.detach().clone().requires_grad_() for p in ps]
    for p, q, g in zip(ps, tps, _grads(ps, 0)):
        p.grad, q.grad = g.clone(), g.clone()
    gx_writes = _writes_per_step(gx.Optimizer(ps, make_gx(**kw)), ps)
    torch_writes = _writes_per_step(cls(tps, foreach=True, **kw), tps)
    assert gx_writes <= torch_writes, (gx_writes, torch_writes)


def test_nadam_makes_no_params_sized_temporary():
    """A leaf above one chunk takes the whole step streamed: no params-sized temporary (before:
    the denominator, 1.0, as torch.optim.NAdam's ``foreach``; before that a numerator too, 2.0)."""
    temporaries = _temporaries_per_step(gx.nadam(2e-3), [(2048, 1024), (1024,)])
    assert temporaries <= 0.3, temporaries


def _temporaries_per_step(tx: gx.GradientTransformation, shapes: list[tuple[int, ...]]) -> float:
    """The bytes a ``gx.Optimizer`` step allocates, in units of the params' bytes (profiled)."""
    import torch.profiler as tp

    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    opt = gx.Optimizer(ps, tx)
    for _ in range(2):
        opt.step()
    allocated = []
    for _ in range(3):  # the least of three (torch 2.1's profiler may book an outside allocation)
        with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        allocated.append(sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()))
    return min(allocated) / sum(p.numel() * p.element_size() for p in ps)


class _ParamsSizedOps(TorchDispatchMode):
    """The names of the ops that make or write a params-sized tensor, in call order."""

    def __init__(self, numels: set[int]) -> None:
        super().__init__()
        self.numels = numels
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.numel() in self.numels for t in tree_flatten(out)[0]):
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("lr_decay", [0.0, 1e-3])
def test_traced_adagrad_scales_the_gradient_once_as_torch(lr_decay):
    """The all-tensor path (torch.compile, torch.func) forms torch's ``(-clr g) / denom``: one
    product and one quotient per element. Before, the denominator was multiplied by the lr-decay
    factor (a 0-d tensor under inject_hyperparams even at 0) and the quotient by ``-lr``: one
    product more in every compiled element loop. Checked under ``differentiable`` (the same
    path as a trace), values against the eager step."""
    from gradxform import tree as _tree

    ps = [torch.randn(40, 30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in ps] for _ in range(2)]
    tx = gx.adagrad(1e-2, lr_decay=lr_decay)
    state = tx.init(ps)
    _, state = tx.update(grads[0], state, ps)
    eager, _ = tx.update(grads[1], state, ps)
    mode = _ParamsSizedOps({p.numel() for p in ps})
    with _tree.differentiable(), mode:
        traced, _ = tx.update(grads[1], state, ps)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    per_leaf = {op: mode.ops.count(op) / len(ps) for op in set(mode.ops)}
    assert per_leaf.get("mul", 0) == 1 and per_leaf.get("div", 0) == 1, per_leaf


# --- large leaves: the whole step streamed chunk by chunk ---------------------------------------------

STREAMED = {  # name: (kwargs, torch class, alias, params bit for bit)
    "rmsprop": ({}, torch.optim.RMSprop, gx.rmsprop, True),
    "rmsprop_centered_wd_maximize": ({"centered": True, "weight_decay": 0.1, "maximize": True},
                                     torch.optim.RMSprop, gx.rmsprop, True),
    "rmsprop_momentum": ({"momentum": 0.9}, torch.optim.RMSprop, gx.rmsprop, False),
    "rmsprop_momentum_centered": ({"momentum": 0.9, "centered": True}, torch.optim.RMSprop, gx.rmsprop, False),
    "adamax": ({}, torch.optim.Adamax, gx.adamax, True),
    "adamax_wd_maximize": ({"weight_decay": 0.1, "maximize": True}, torch.optim.Adamax, gx.adamax, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(STREAMED))
def test_streamed_step_equals_torch_foreach(name, dtype, two_threads):
    """RMSprop and Adamax on a leaf above one chunk (300_000 elements: two whole chunks and a
    partial one) take the step chunk by chunk: state bit for bit that of torch.optim's
    ``foreach=True`` over 8 steps (its kernels in its order on each chunk), the small leaves on
    the foreach kernels beside them; params bit for bit too, except with RMSprop's momentum,
    where torch ends in ``p.add_(b, alpha=-lr)`` and gradxform adds ``-lr b`` as formed (the
    rounding of ``p + u``, as the functional path): equal to rounding there."""
    kw, cls, alias, exact = STREAMED[name]
    ps = _params(dtype)
    tps = [p.detach().clone().requires_grad_() for p in ps]
    opt = gx.Optimizer(ps, alias(**kw))
    topt = cls(tps, foreach=True, **kw)
    for k in range(8):
        for p, q, g in zip(ps, tps, _grads(ps, k)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        for p, q in zip(ps, tps):
            if exact:
                assert torch.equal(p, q), f"{name} step {k + 1}: params differ"
            else:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(ps, tps):
        for key, value in topt.state[q].items():
            if key != "step":
                assert torch.equal(opt.state[p][key], value), f"{name}: {key} differs"


@pytest.mark.parametrize("make", [lambda: gx.rmsprop(1e-2), lambda: gx.rmsprop(1e-2, momentum=0.9, centered=True),
                                  lambda: gx.adamax(2e-3),
                                  lambda: gx.nadam(2e-3, weight_decay=0.01, decoupled_weight_decay=True)],
                         ids=["rmsprop", "rmsprop_momentum_centered", "adamax", "nadamw"])
def test_streamed_step_makes_no_params_sized_temporary(make):
    """A step on a large leaf allocates one chunk of scratch, not a params-sized denominator
    (before: ``sqrt(v) + eps``, or Adamax's ``|g| + eps``, one params-sized temporary each: 1.0)."""
    temporaries = _temporaries_per_step(make(), [(2048, 1024), (1024,)])
    assert temporaries <= 0.3, temporaries


def test_only_large_contiguous_cpu_leaves_are_streamed():
    """Streaming pays on the CPU only (an accelerator's foreach kernels take all leaves in a few
    launches; 2^18-element chunks would be hundreds): a leaf elsewhere (here ``meta``), a small
    one or a non-contiguous one stays on the foreach kernels."""
    from gradxform.torch_optimizers import _CHUNK, _streamed

    big = _CHUNK + 1
    cpu = [torch.empty(big), torch.empty(big)]
    assert _streamed([cpu, cpu]) == [0, 1]
    assert _streamed([[torch.empty(big, device="meta")]] * 2) == []
    assert _streamed([[torch.empty(_CHUNK)]] * 2) == []
    assert _streamed([[torch.empty(2, big).t()]] * 2) == []
