"""Generic building blocks: scaling, momentum, Adam and RMS moments, weight decay, norm clipping.

Each function returns a `gradxform.base.GradientTransformation`. Updates are added to
params, so an optimiser ends with a negative scale (``scale_by_learning_rate`` flips the sign).
Hyperparameters may be Python numbers or 0-d tensors (``inject_hyperparams`` passes tensors when
compiling, so a changed value does not recompile). All leaf arithmetic runs as
``torch._foreach_*`` kernels over the list of live (non-``None``) leaves.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import (PURE, GradientTransformation, Ownership, Params, Updates, call_update, declare, expect_state,
                   owned_transform, recorded, stateless)
from .fastpath import ClipFactor

__all__ = [
    "ScalarOrSchedule",
    "ScaleByScheduleState",
    "TraceState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "trace",
    "scale_by_adam",
    "scale_by_rms",
    "add_decayed_weights",
    "clip_by_global_norm",
]

ScalarOrSchedule = float | torch.Tensor | Callable[[Any], Any]


# --- helpers shared by the transforms ---------------------------------------------------------


class _Flat:
    """Updates flattened once: ``leaves`` (``None`` kept), ``idx`` of live leaves, ``live`` list."""

    __slots__ = ("tree", "leaves", "spec", "idx", "live")

    def __init__(self, updates: Updates) -> None:
        self.tree = updates
        self.leaves, self.spec = _tree.tree_flatten(updates)
        self.idx, self.live = _tree.live(self.leaves)

    def paths(self) -> list[str]:
        return _tree.tree_paths(self.tree)

    def state_live(self, state_tree: Any, what: str, check_shapes: bool = True) -> list[torch.Tensor]:
        """Leaves of a params-shaped state tree at the live positions, structure-checked."""
        leaves = _tree.check_structure(self.spec, state_tree, what, reference=self.tree)
        out = []
        for i in self.idx:
            if leaves[i] is None:
                raise ValueError(
                    f"updates has a tensor at '{self.paths()[i]}' but {what} holds None there: the "
                    "transform was initialised with that leaf frozen (None)"
                )
            out.append(leaves[i])
        if check_shapes:
            _tree.check_shapes(lambda: [self.paths()[i] for i in self.idx], self.live, out, what, dtypes=True)
        return out

    def params_live(self, params: Params, who: str) -> list[torch.Tensor]:
        if params is None:
            raise ValueError(f"{who} needs params: call update(updates, state, params)")
        return self.state_live(params, "params")

    def rebuild(self, new_live: Sequence[torch.Tensor], like: Any = None) -> Any:
        """Unflatten ``new_live`` into the updates' structure, ``None`` at frozen leaves.

        With ``like`` (a previous state tree), frozen positions keep ``like``'s leaves.
        """
        base = self.leaves if like is None else _tree.tree_flatten(like)[0]
        if like is None:
            base = [None] * len(self.leaves)
        return _tree.tree_unflatten(self.spec, _tree.scatter(base, self.idx, new_live))


_addcmul = _fe._op("addcmul", lambda x, a, b, value=1: torch.addcmul(x, a, b, value=value))
_sqrt_ = _fe._op("sqrt_", _fe._safe_sqrt)


_CHUNK = 1 << 18
"""Elements per slice of the eager paths that work through a leaf slice by slice (1 MiB in
float32): the few slices one step touches at once (3 to 5 arrays) stay in the cache, so their
intermediate results never travel to memory, while each kernel call is large enough that its
fixed cost stays small (measured at 25M params on one thread, 64K to 1M elements: 256K fastest)."""


def _plain(xs: Sequence[Any]) -> bool:
    """Whether every tensor is a plain, contiguous one (not a subclass such as a DTensor, which
    cannot be sliced through a flat view): the slice-by-slice eager paths take only those."""
    return all(type(x) in (torch.Tensor, torch.nn.Parameter) and x.layout is torch.strided and x.is_contiguous()
               for x in xs)


def _slices(n: int) -> range:
    """Start offsets of the `_CHUNK`-element slices of an ``n``-element leaf."""
    return range(0, n, _CHUNK)


def _scratch_for(xs: Sequence[torch.Tensor], count: int = 1) -> dict[tuple[torch.dtype, torch.device], list[torch.Tensor]]:
    """``count`` scratch buffers of ``min(numel, _CHUNK)`` elements per (dtype, device) of ``xs``."""
    out: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for x in xs:
        key = (x.dtype, x.device)
        sizes[key] = max(sizes.get(key, 0), min(x.numel(), _CHUNK))
    for key, size in sizes.items():
        out[key] = [torch.empty(size, dtype=key[0], device=key[1]) for _ in range(count)]
    return out


def _apply_params(flat: "_Flat", params: Params | None, xs: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The live leaves of ``params`` when an update may be added into them here
    (`gradxform.base.call_apply`): eager, each plain and contiguous, shaped, typed and placed as
    its update in ``xs``, on the CPU (an accelerator's foreach add takes every leaf in a few
    launches, which slicing would multiply); else ``None`` (the caller adds the update itself)."""
    if params is None or _tree.traced() or not _plain(xs) or any(x.device.type != "cpu" for x in xs):
        return None
    leaves = _tree.tree_flatten(params)[0]
    if len(leaves) != len(flat.leaves):
        return None
    ps = [leaves[i] for i in flat.idx]
    if any(not isinstance(p, torch.Tensor) or p.shape != x.shape or p.dtype != x.dtype or p.device != x.device
           for p, x in zip(ps, xs)) or not _plain(ps):
        return None
    return ps


def _add_scaled_(ps: Sequence[torch.Tensor], us: Sequence[torch.Tensor], k: Any, writable: bool = False) -> None:
    """``p <- p + (k u)`` with the rounding of the two kernels ``k * u`` then ``p + (k u)`` (a
    fused ``p.add_(u, alpha=k)`` rounds once, differently), slice by slice so that ``k u`` stays
    in cache: ``u`` is read once from memory (``k`` a number or a 0-d CPU tensor). ``k u`` is
    made in ``u``'s own slice when ``writable`` (the caller's private buffer), else in one
    scratch slice (eager only, plain contiguous leaves, see `_apply_params`)."""
    if k == 1:
        for p, u in zip(ps, us):
            p.add_(u)
        return
    from ._owned import by_slices  # _owned builds on this module

    def step(i: int, pf: torch.Tensor, uf: torch.Tensor, *scratch: torch.Tensor) -> None:
        d = uf if writable else scratch[0]
        torch.mul(uf, k, out=d)
        pf.add_(d)

    by_slices(list(zip(ps, us)), step, 0 if writable else 1)


def _mul(xs: list[torch.Tensor], s: Any, inplace: bool) -> list[torch.Tensor]:
    if inplace:
        _fe.mul_(xs, s)
        return xs
    return list(_fe.mul(xs, s))


def _ema(old: list[torch.Tensor], new: list[torch.Tensor], decay: Any, inplace: bool) -> list[torch.Tensor]:
    """decay * old + (1 - decay) * new (as torch.optim: ``old.lerp_(new, 1 - decay)``)."""
    if not isinstance(decay, torch.Tensor):
        if inplace:
            _fe.lerp_(old, new, 1.0 - decay)
            return old
        return list(_fe.lerp(old, new, 1.0 - decay))
    out = _mul(old, decay, inplace)
    _fe.add_(out, _fe.mul(new, 1.0 - decay))
    return out


def _ema_sq(old: list[torch.Tensor], new: list[torch.Tensor], decay: Any, inplace: bool) -> list[torch.Tensor]:
    """decay * old + (1 - decay) * new**2 (as torch.optim: ``mul_(decay).addcmul_(g, g, 1 - decay)``)."""
    out = _mul(old, decay, inplace)
    if isinstance(decay, torch.Tensor):
        _fe.add_(out, _fe.mul(_fe.mul(new, new), 1.0 - decay))
    else:
        _fe.addcmul_(out, new, new, 1.0 - decay)
    return out


def to_float(value: Any) -> float:
    """A number or a one-element tensor as a Python float (construction-time checks only)."""
    return float(value.detach().reshape(()).cpu()) if isinstance(value, torch.Tensor) else float(value)


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Validate a hyperparameter given as a number or a 0-d tensor (schedules are not checked).

    Called at construction time, so reading a tensor value here is not in any hot path.
    """
    if not isinstance(value, torch.Tensor) and callable(value):
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or _tree.traced():
            return
        v = to_float(value)
    else:
        if isinstance(value, (str, bytes)):  # float("0.1") would pass, then fail deep in a kernel
            raise TypeError(f"{name} must be a number, a 0-d tensor or a schedule; got {value!r}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, a 0-d tensor or a schedule; got {value!r}") from None
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (v < low or (low_open and v == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}; got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{name} must be {bound}; got {v}")


def _zero_count() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _schedule_value(schedule: Callable[[Any], Any], count: torch.Tensor) -> Any:
    return _tree.as_scalar(schedule(count))


# --- scaling ------------------------------------------------------------------------------------


@recorded
def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiply every update by a constant: ``u <- step_size * u``.

    Args:
        step_size: the factor (a number or a 0-d tensor; a negative one descends, as in
            ``gx.scale(-lr)``).

    Returns:
        A stateless `GradientTransformation` (``params`` not needed).

    Raises:
        TypeError: ``step_size`` is not a number or a 0-d tensor.
        ValueError: ``step_size`` is NaN.

    References:
        optax.scale (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.scale).

    Example:
        >>> tx = gx.scale(-0.5)
        >>> u, _ = tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([-0.5000,  1.0000])
    """
    check_float("step_size", step_size)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        s = _tree.as_scalar(step_size)
        return flat.rebuild(_mul(flat.live, s, own.may_write(flat.live)))

    return stateless(update_fn)


class ScaleByScheduleState(NamedTuple):
    """``count``: number of updates so far (0-d int64)."""

    count: torch.Tensor


@recorded
def scale_by_schedule(step_size_fn: Callable[[Any], Any]) -> GradientTransformation:
    """Scale by a schedule of the step count: ``u <- step_size_fn(count) * u``, ``count`` 0-based.

    Args:
        step_size_fn: a function of the step count (a 0-d int64 tensor, 0 at the first update)
            returning a number or a 0-d tensor, e.g. a `gradxform.schedules` schedule.

    Returns:
        A `GradientTransformation` whose state is `ScaleByScheduleState` (``params`` not needed).

    Raises:
        TypeError: ``step_size_fn`` is not callable.

    References:
        optax.scale_by_schedule
        (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.scale_by_schedule).

    Example:
        >>> tx = gx.scale_by_schedule(lambda count: 1.0 / (count + 1))
        >>> g = {"w": torch.tensor([2.0])}
        >>> state = tx.init(g)
        >>> u1, state = tx.update(g, state)
        >>> u2, state = tx.update(g, state)
        >>> u1["w"], u2["w"]
        (tensor([2.]), tensor([1.]))
    """
    if not callable(step_size_fn):
        raise TypeError(f"step_size_fn must be callable count -> value; got {step_size_fn!r}")

    def init(params: Params) -> ScaleByScheduleState:
        del params
        return ScaleByScheduleState(_zero_count())

    def owned_update(updates: Updates, state: ScaleByScheduleState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByScheduleState]:
        del params
        expect_state(state, ScaleByScheduleState, "scale_by_schedule")
        flat = _Flat(updates)
        s = _schedule_value(step_size_fn, state.count)
        new = _mul(flat.live, s, own.may_write(flat.live)) if flat.live else []
        return flat.rebuild(new), ScaleByScheduleState(state.count + 1)

    return owned_transform(init, owned_update)


@recorded
def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """``u <- -lr * u`` (``+lr * u`` with ``flip_sign=False``); ``lr`` a number, tensor or schedule.

    A negative learning rate is rejected (use ``flip_sign`` to ascend). A schedule is read at the
    0-based step count, as `scale_by_schedule`. A constant rate (number or 0-d tensor) declares
    the add into the params (`gradxform.base.call_apply`): under `gradxform.Optimizer` a chain
    ending in it adds ``-lr u`` into CPU params itself, slice by slice, with the rounding of
    ``p + (-lr u)`` (one read of ``u`` instead of a scaling pass and an add pass); on an
    accelerator the adapter adds with its foreach kernels.

    Args:
        learning_rate: a number, a 0-d tensor or a schedule of the step count (>= 0).
        flip_sign: multiply by ``-lr`` (descent) rather than ``+lr``.

    Returns:
        A `GradientTransformation`: stateless for a constant, `ScaleByScheduleState` for a
        schedule (``params`` not needed).

    Raises:
        TypeError: the learning rate is not a number, a 0-d tensor or a schedule.
        ValueError: the learning rate is negative or NaN.

    References:
        optax.scale_by_learning_rate
        (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.scale_by_learning_rate).

    Example:
        >>> tx = gx.scale_by_learning_rate(0.1)
        >>> u, _ = tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([-0.1000,  0.2000])
    """
    check_float("learning rate", learning_rate, low=0.0)
    sign = -1.0 if flip_sign else 1.0
    if not isinstance(learning_rate, torch.Tensor) and callable(learning_rate):
        fn = learning_rate
        return scale_by_schedule(lambda count: sign * fn(count))
    tx = scale(sign * learning_rate)

    def owned_apply(updates: Updates, state: Any, params: Params, own: Ownership) -> tuple[Updates, Any]:
        # A caller that adds the updates into the params right after (gx.Optimizer): the scaled
        # update goes into the params slice by slice (bitwise p + (-lr u)), never written whole.
        flat = _Flat(updates)
        k = _tree.as_scalar(sign * learning_rate)
        ps = _apply_params(flat, params, flat.live) if flat.live and isinstance(k, (int, float)) else None
        if ps is None:
            return call_update(tx, updates, state, params, own)
        _add_scaled_(ps, flat.live, k, own.may_write(flat.live))
        return flat.rebuild([None] * len(flat.live)), state

    return declare(tx, owned_apply=owned_apply)


# --- momentum -----------------------------------------------------------------------------------


class TraceState(NamedTuple):
    """``count``: per-leaf number of updates received (params-shaped 0-d int64 tensors, like
    torch.optim's per-param ``step``); ``trace``: the momentum buffer (params-shaped)."""

    count: Any
    trace: Any


# The names `gradxform.Optimizer` gives these per-param buffers in ``opt.state[p]``: torch.optim's,
# so that a torch.optim.SGD / Adam / AdamW state dict loads into the gradxform twin and back.
# TraceState's count only tells whether a leaf was stepped (its first step skips dampening), as
# torch.optim.SGD's buffer being None does: the adapter stores no count for it (torch's SGD state
# has none) and rebuilds it from whether the param has state.
TraceState.torch_state_keys = MappingProxyType({"trace": "momentum_buffer"})  # type: ignore[attr-defined]
TraceState.stepped_flags = frozenset({"count"})  # type: ignore[attr-defined]


def _leaf_counts(params: Params) -> Any:
    return _tree.tree_map(lambda p: _zero_count(), params)


def _step_counts(flat: "_Flat", counts_tree: Any, inplace: bool) -> list[torch.Tensor]:
    """The live leaves' counts after this update (``+1`` only where a leaf is live)."""
    old = flat.state_live(counts_tree, "state.count", check_shapes=False)
    if inplace:
        _fe.add_(old, 1)
        return old
    return list(_fe.add(old, 1))


@recorded
def trace(decay: float | torch.Tensor, nesterov: bool = False, dampening: float | torch.Tensor = 0.0) -> GradientTransformation:
    """Heavy-ball momentum with torch.optim.SGD's semantics.

    ``b_1 = g_1``; ``b_t = decay * b_{t-1} + (1 - dampening) * g_t``; output ``b_t``, or
    ``g_t + decay * b_t`` with ``nesterov=True`` (Sutskever et al., 2013, as torch.optim.SGD).
    Note the first step: the buffer starts at the gradient itself, without dampening. "First"
    is per leaf, as torch.optim's per-param buffer: a leaf frozen (``None``) for a while starts
    when it first receives an update.

    Declares the add into the params (`gradxform.base.call_apply`): under `gradxform.Optimizer`
    a chain that ends in ``trace`` (optax's LARS) adds the buffer into CPU params itself (the
    bits of ``p + b_t``) instead of returning a copy of it, and an update that the caller hands
    over (a temporary an earlier block made) receives the output instead of a new tensor.

    Args:
        decay: the momentum ``mu`` (>= 0; a number or a 0-d tensor).
        nesterov: output ``g_t + decay * b_t`` (Nesterov momentum) instead of ``b_t``.
        dampening: after the first step the gradient is added times ``1 - dampening``; in [0, 1].

    Returns:
        A `GradientTransformation` whose state is `TraceState` (``params`` not needed).

    Raises:
        TypeError: ``decay`` or ``dampening`` is not a number or a 0-d tensor.
        ValueError: a negative ``decay``, ``dampening`` outside [0, 1], or NaN.

    References:
        Sutskever, Martens, Dahl and Hinton, "On the importance of initialization and momentum in
        deep learning", ICML 2013, Section 2; torch.optim.SGD
        (https://pytorch.org/docs/stable/generated/torch.optim.SGD.html).

    Example:
        >>> tx = gx.trace(0.9, dampening=0.5)
        >>> g = {"w": torch.tensor([1.0])}
        >>> state = tx.init(g)
        >>> u1, state = tx.update(g, state)
        >>> u2, state = tx.update(g, state)
        >>> u1["w"], u2["w"]
        (tensor([1.]), tensor([1.4000]))
    """
    check_float("momentum (decay)", decay, low=0.0)
    check_float("dampening", dampening, low=0.0, high=1.0)

    def init(params: Params) -> TraceState:
        return TraceState(_leaf_counts(params), _tree.tree_zeros_like(params))

    def step(updates: Updates, state: TraceState, params: Params | None, own: Ownership,
             apply: bool) -> tuple[Updates, TraceState]:
        expect_state(state, TraceState, "trace")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        inplace = own.state
        after = _step_counts(flat, state.count, inplace)
        buf = flat.state_live(state.trace, "state.trace")
        mu, damp = _tree.as_scalar(decay), _tree.as_scalar(dampening)
        g = flat.live
        buf = _mul(buf, mu, inplace)
        if isinstance(damp, (int, float)) and damp == 0:
            _fe.add_(buf, g)
        elif not _tree.traced() and all(c.device.type == "cpu" for c in after):
            # b_t = mu * b_{t-1} + (1 - damp * [t > 1]) g_t; b_0 = 0, so step 1 gives b_1 = g_1.
            weights = [1.0 if int(c) == 1 else 1.0 - damp for c in after]  # CPU counters
            _fe.add_(buf, _fe.mul(g, weights))
        else:
            # the weights as tensors (no host read); in place where the buffers are owned (a
            # donating compiled step), out of place inside torch.func (see _foreach). The add
            # keeps the buffer's dtype (a 0-d leaf times a float64 weight would be float64).
            _fe.add_(buf, [x * (1.0 - damp * (c > 1).to(x.dtype)) for x, c in zip(g, after)])
        # The incoming updates may be reused for the output when the caller grants them (a
        # temporary an earlier block of the chain made): the same kernels, no new buffer.
        reuse = own.may_write(g) and not _tree.pure_ops()
        if nesterov:
            if isinstance(mu, torch.Tensor):
                out = list(_fe.add(g, _fe.mul(buf, mu)))
            elif reuse:
                _fe.add_(g, buf, alpha=mu)
                out = list(g)
            else:
                out = list(_fe.add(g, buf, alpha=mu))
            ps = _apply_params(flat, params, out) if apply and reuse else None
        else:
            # the output must not alias the state buffer, which the caller (or a later in-place
            # transform inside the adapter) may otherwise overwrite: a copy, or the buffer added
            # straight into the params (`call_apply`: p + b, the rounding of the apply)
            ps = _apply_params(flat, params, buf) if apply else None
            if ps is not None:
                out = buf
            elif reuse:
                for x, b in zip(g, buf):  # per leaf: DTensor has no sharding rule for _foreach_copy_
                    x.copy_(b)
                out = list(g)
            else:
                out = [b.clone() for b in buf]
        new_state = TraceState(flat.rebuild(after, like=state.count), flat.rebuild(buf, like=state.trace))
        if ps is not None:
            _fe.add_(ps, out)
            return flat.rebuild([None] * len(out)), new_state
        return flat.rebuild(out), new_state

    def owned_update(updates: Updates, state: TraceState, params: Params | None, own: Ownership) -> tuple[Updates, TraceState]:
        return step(updates, state, params, own, False)

    def owned_apply(updates: Updates, state: TraceState, params: Params, own: Ownership) -> tuple[Updates, TraceState]:
        return step(updates, state, params, own, True)

    return declare(owned_transform(init, owned_update), owned_apply=owned_apply)


# --- adaptive moments ---------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
    """``count``: per-leaf number of updates received (params-shaped 0-d int64 tensors, like
    torch.optim's per-param ``step``, so a leaf frozen for a while gets the bias correction of
    its own first step); ``mu``, ``nu``: first and second moments; ``nu_max``: the running
    maximum of ``nu`` (AMSGrad) or ``None``."""

    count: Any
    mu: Any
    nu: Any
    nu_max: Any


@recorded
def scale_by_adam(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.999,
    eps: float | torch.Tensor = 1e-8,
    amsgrad: bool = False,
) -> GradientTransformation:
    """Adam's preconditioning (Kingma & Ba, 2015, arXiv 1412.6980), eps placed as torch.optim.

    ``m_t = b1 m + (1-b1) g``; ``v_t = b2 v + (1-b2) g^2``; with AMSGrad (Reddi et al., 2018)
    ``vmax_t = max(vmax, v_t)`` replaces ``v_t`` below;
    ``u = (m_t / (1-b1^t)) / (sqrt(v_t) / sqrt(1-b2^t) + eps)``, with ``t`` the leaf's own step.

    Args:
        b1: the decay of the first moment, in [0, 1).
        b2: the decay of the second moment, in [0, 1).
        eps: added to the bias-corrected root of the second moment (>= 0).
        amsgrad: use the running maximum of ``v`` (AMSGrad).

    Returns:
        A `GradientTransformation` whose state is `ScaleByAdamState` (``params`` not needed).
        Chain a learning rate after it, e.g. ``gx.chain(gx.scale_by_adam(), gx.scale(-lr))``.

    Raises:
        TypeError: a hyperparameter is not a number or a 0-d tensor.
        ValueError: a beta outside [0, 1), a negative ``eps``, or NaN.

    References:
        Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980,
        Algorithm 1. AMSGrad: Reddi, Kale and Kumar, "On the Convergence of Adam and Beyond",
        ICLR 2018, arXiv:1904.09237, Algorithm 2.

    Example:
        >>> tx = gx.scale_by_adam()
        >>> u, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]  # the first step is sign(g), up to eps
        tensor([ 1.0000, -1.0000])
    """
    check_float("b1 (betas[0])", b1, low=0.0, high=1.0, high_open=True)
    check_float("b2 (betas[1])", b2, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)

    def init(params: Params) -> ScaleByAdamState:
        zeros = _tree.tree_zeros_like
        return ScaleByAdamState(_leaf_counts(params), zeros(params), zeros(params), zeros(params) if amsgrad else None)

    def owned_update(updates: Updates, state: ScaleByAdamState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByAdamState]:
        del params
        expect_state(state, ScaleByAdamState, "scale_by_adam")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        beta1, beta2, e = _tree.as_scalar(b1), _tree.as_scalar(b2), _tree.as_scalar(eps)
        inplace = own.state
        counts = _step_counts(flat, state.count, inplace)
        g = flat.live
        mu = _ema(flat.state_live(state.mu, "state.mu"), g, beta1, inplace)
        nu = _ema_sq(flat.state_live(state.nu, "state.nu"), g, beta2, inplace)
        nu_max = None
        if amsgrad:
            old_max = flat.state_live(state.nu_max, "state.nu_max")
            if inplace:
                _fe.maximum_(old_max, nu)
                nu_max = old_max
            else:
                nu_max = list(_fe.maximum(old_max, nu))
        second = nu_max if amsgrad else nu
        if own.may_write(g):
            # The incoming updates are ours (e.g. a clip's output inside the adapter) and mu, nu
            # have consumed them: their buffers take the denominator, saving an allocation.
            denom = g
            for d, v in zip(denom, second):
                torch.sqrt(v, out=d)
        else:
            denom = list(_fe.sqrt(second))
        if (_tree.traced() or isinstance(beta1, torch.Tensor) or isinstance(beta2, torch.Tensor)
                or any(c.device.type != "cpu" for c in counts)):
            # One small vector of bias corrections for all leaves: the compiler materialises it
            # once instead of recomputing pow() inside every element loop.
            t = torch.stack(counts).to(torch.float64)
            # A reduction is always materialised by inductor: the amax over a duplicated column
            # makes the n bias corrections one tiny kernel instead of a pow per element.
            both = torch.stack([1 - beta1**t, (1 - beta2**t) ** 0.5], dim=1)
            both = torch.stack([both, both], dim=2).amax(dim=2)
            bc1, bc2_sqrt = both[:, 0], both[:, 1]
            # out of place: inside torch.func an in-place write would break grad and vmap
            denom = [(d / bc2_sqrt[i] + e) * bc1[i] for i, d in enumerate(denom)]
        else:
            ts = [int(c) for c in counts]  # CPU counters: no device sync
            _fe.div_(denom, [(1 - beta2**t) ** 0.5 for t in ts])
            _fe.add_(denom, e)
            # u = (m / bc1) / denom; fold 1/bc1 into the denominator to save a pass.
            _fe.mul_(denom, [1 - beta1**t for t in ts])
        if _tree.traced():
            out = list(_fe.div(mu, denom))
        else:
            # the denominator is private to this call: write the quotient into it (no allocation)
            for m, d in zip(mu, denom):
                torch.div(m, d, out=d)
            out = denom
        new_state = ScaleByAdamState(
            flat.rebuild(counts, like=state.count),
            flat.rebuild(mu, like=state.mu),
            flat.rebuild(nu, like=state.nu),
            flat.rebuild(nu_max, like=state.nu_max) if amsgrad else None,
        )
        return flat.rebuild(out), new_state

    return owned_transform(init, owned_update)


ScaleByAdamState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"})


class ScaleByRmsState(NamedTuple):
    """``nu``: the running mean of squared updates (params-shaped); ``grad_avg``: the running
    mean of the updates (``centered=True``) or ``None``; ``count``: each leaf's step count
    (``count_steps=True``, as torch.optim.RMSprop's ``step``) or ``None``."""

    nu: Any
    grad_avg: Any = None
    count: Any = None


# torch.optim.RMSprop's names for these buffers in ``opt.state[p]``
ScaleByRmsState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"nu": "square_avg", "grad_avg": "grad_avg", "count": "step"})


@recorded
def scale_by_rms(decay: float | torch.Tensor = 0.99, eps: float | torch.Tensor = 1e-8,
                 initial_scale: float = 0.0, *, centered: bool = False, eps_in_sqrt: bool = False,
                 count_steps: bool = False) -> GradientTransformation:
    """RMSProp's preconditioning (Tieleman & Hinton, 2012), eps placed as torch.optim.RMSprop.

    ``v_t = decay v + (1 - decay) g^2``; ``u = g / (sqrt(v_t) + eps)``; ``v_0 = initial_scale``.
    With ``centered=True`` (Graves, 2013, arXiv 1308.0850, eq. 38) also
    ``m_t = decay m + (1 - decay) g`` and ``u = g / (sqrt(v_t - m_t^2) + eps)``.
    ``eps_in_sqrt=True`` gives optax's placement ``u = g / sqrt(v_t + eps)`` (optax's default;
    torch.optim.RMSprop adds eps outside the root, as this block does by default).

    Args:
        decay: the averaging constant (torch's ``alpha``), in [0, 1].
        eps: added to the denominator.
        initial_scale: the initial value of ``v``.
        centered: subtract the squared running mean of the updates (torch's ``centered``,
            optax's ``scale_by_stddev``).
        eps_in_sqrt: add eps inside the root (optax) instead of outside (torch).
        count_steps: keep each leaf's step count in the state (torch.optim.RMSprop's ``step``;
            the rule does not use it).

    Returns:
        The transform; its state is `ScaleByRmsState`.

    Raises:
        ValueError: decay outside [0, 1] or a negative eps.

    References:
        Tieleman & Hinton, Lecture 6.5 of "Neural Networks for Machine Learning" (2012);
        Graves, "Generating sequences with recurrent neural networks", arXiv 1308.0850;
        https://pytorch.org/docs/stable/generated/torch.optim.RMSprop.html

    Example:
        >>> tx = gx.chain(gx.scale_by_rms(0.99, centered=True), gx.scale_by_learning_rate(1e-2))
    """
    check_float("decay", decay, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0)

    def init(params: Params) -> ScaleByRmsState:
        nu = _tree.tree_map(lambda p: torch.full_like(p, initial_scale), params)
        return ScaleByRmsState(nu, _tree.tree_zeros_like(params) if centered else None,
                               _leaf_counts(params) if count_steps else None)

    def owned_update(updates: Updates, state: ScaleByRmsState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByRmsState]:
        del params
        expect_state(state, ScaleByRmsState, "scale_by_rms")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        d, e = _tree.as_scalar(decay), _tree.as_scalar(eps)
        g = flat.live
        counts = _step_counts(flat, state.count, own.state) if count_steps else None
        nu = _ema_sq(flat.state_live(state.nu, "state.nu"), g, d, own.state)
        grad_avg = None
        base = nu
        if centered:
            grad_avg = _ema(flat.state_live(state.grad_avg, "state.grad_avg"), g, d, own.state)
            base = list(_addcmul(nu, grad_avg, grad_avg, value=-1.0))  # v - m^2, as torch.optim
        # base is private when centered (a new v - m^2): the root and eps go into it
        if eps_in_sqrt:
            if centered:
                _fe.add_(base, e)
            else:
                base = list(_fe.add(base, e))
            _sqrt_(base)
            denom = base
        else:
            if centered:
                _sqrt_(base)
                denom = base
            else:
                denom = list(_fe.sqrt(base))
            _fe.add_(denom, e)
        if _tree.traced():
            out = list(_fe.div(g, denom))
        else:  # the denominator is private to this call: the quotient goes into it
            for x, dd in zip(g, denom):
                torch.div(x, dd, out=dd)
            out = denom
        new_state = ScaleByRmsState(
            flat.rebuild(nu, like=state.nu),
            flat.rebuild(grad_avg, like=state.grad_avg) if centered else None,
            flat.rebuild(counts, like=state.count) if count_steps else None)
        return flat.rebuild(out), new_state

    return owned_transform(init, owned_update)


# --- weight decay -------------------------------------------------------------------------------


@recorded
def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0, mask: Any = None) -> GradientTransformation:
    """``u <- u + weight_decay * params`` (L2 decay; decoupled when placed after the preconditioner,
    as AdamW, Loshchilov & Hutter 2019). ``mask``: a pytree of bools (or a function of params
    returning one) that selects the leaves to decay; the others pass through unchanged.

    Args:
        weight_decay: the decay rate (>= 0; a number or a 0-d tensor).
        mask: ``None`` (decay every leaf), a pytree of bools shaped like the params, or a function
            ``params -> mask``; the transform is then `masked`.

    Returns:
        A stateless `GradientTransformation` (`MaskedState` with a ``mask``); its ``update``
        needs ``params``.

    Raises:
        TypeError: ``weight_decay`` is not a number or a 0-d tensor.
        ValueError: ``weight_decay`` is negative or NaN; ``update`` called without ``params``.

    References:
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
        arXiv:1711.05101, Algorithm 2; optax.add_decayed_weights
        (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.add_decayed_weights).

    Example:
        >>> params = {"w": torch.tensor([2.0]), "b": torch.tensor([2.0])}
        >>> tx = gx.add_decayed_weights(0.1, mask={"w": True, "b": False})
        >>> u, _ = tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(params), params)
        >>> u["w"], u["b"]
        (tensor([0.2000]), tensor([0.]))
    """
    check_float("weight_decay", weight_decay, low=0.0)
    if mask is not None:
        from .combine import masked

        return masked(add_decayed_weights(weight_decay), mask)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        p = flat.params_live(params, "add_decayed_weights")
        wd = _tree.as_scalar(weight_decay)
        try:
            if isinstance(wd, torch.Tensor):
                out = list(_fe.add(flat.live, _fe.mul(p, wd)))
            elif own.may_write(flat.live):
                _fe.add_(flat.live, p, alpha=wd)
                out = flat.live
            else:
                out = list(_fe.add(flat.live, p, alpha=wd))
        except RuntimeError:  # torch's message for a sparse update names no leaf and no fix
            k = next((i for i, x in enumerate(flat.live) if x.layout is not torch.strided), None)
            if k is None:
                raise
            raise ValueError(
                f"add_decayed_weights: the update at '{flat.paths()[flat.idx[k]]}' is sparse ({flat.live[k].layout}); "
                "weight decay would make it dense (torch.optim refuses it too: 'weight_decay option is not "
                "compatible with sparse gradients'): put the params with sparse gradients in a param group with "
                "weight_decay=0, or use dense gradients") from None
        return flat.rebuild(out)

    return stateless(update_fn)


# --- clipping (the rest of the family lives in clipping.py) -------------------------------------


def _overflow_safe_factor(factor: torch.Tensor, norm: torch.Tensor, leaves: list[torch.Tensor], max_norm: Any) -> torch.Tensor:
    """The clip factor when the float32 sum of squares overflowed (finite leaves, ``norm`` inf):
    recomputed from norms accumulated in float64, which cannot overflow for float32 or narrower
    leaves. Only in eager mode on CPU, where the check is a free read and the float64 pass runs
    only on overflow (accumulating in float64 on every step costs about 15x the float32 norm on
    CPU). On an accelerator or under torch.compile the factor stays as computed: an overflowing
    norm gives a zero factor, as ``torch.nn.utils.clip_grad_norm_`` does (no host sync, no extra
    pass); wrap the chain in ``apply_if_finite`` to skip such steps instead. A genuinely
    non-finite leaf still gives inf or NaN."""
    if norm.dtype == torch.float64 or _tree.traced() or norm.device.type != "cpu" or not bool(torch.isinf(norm)):
        return factor
    norms = _tree.reduced_all([torch.linalg.vector_norm(x, dtype=torch.float64) for x in leaves])
    n = torch.linalg.vector_norm(torch.stack([x.to(norm.device) for x in norms]))
    level = torch.as_tensor(max_norm, dtype=torch.float64, device=n.device)
    return (level / torch.maximum(n, level)).to(factor.dtype)


@recorded
def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Rescale all updates together so that their global L2 norm is at most ``max_norm``:
    ``u <- u * max_norm / max(||u||, max_norm)`` (Pascanu et al., 2013). A zero update passes.

    Args:
        max_norm: the largest global L2 norm let through (> 0).

    Returns:
        A stateless `GradientTransformation` (``params`` not needed).

    Raises:
        TypeError: the level is not a number or a 0-d tensor; ``update`` on a non-floating leaf.
        ValueError: the level is not > 0 (or is NaN).

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks",
        ICML 2013, arXiv:1211.5063, Section 3.2. docs/clipping.md.

    Example:
        >>> g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([-1.0])}
        >>> tx = gx.clip_by_global_norm(2.0)
        >>> u, _ = tx.update(g, tx.init(g))
        >>> torch.cat([u["a"], u["b"]])
        tensor([ 1.1767,  1.5689, -0.3922])
    """
    check_float("max_norm", max_norm, low=0.0, low_open=True)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        for i, x in zip(flat.idx, flat.live):
            if not (x.is_floating_point() or x.is_complex()):
                raise TypeError(f"non-floating leaf at '{flat.paths()[i]}' ({x.dtype} update): "
                                "clip_by_global_norm takes floating-point updates")
        norm = _tree.global_norm(flat.live)
        factor = max_norm / torch.maximum(norm, torch.as_tensor(max_norm, dtype=norm.dtype))
        factor = _overflow_safe_factor(factor, norm, flat.live, max_norm)
        return flat.rebuild(_mul(flat.live, factor, own.may_write(flat.live)))

    return declare(stateless(update_fn), fast_path=ClipFactor("global"))
