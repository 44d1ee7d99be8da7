"""optax's combinators and utilities: lookahead, EMAs, gradient accumulation, conditional and
named chains, update constraints, plateau scaling, step skipping and per-example clipping.

Names, arguments and semantics follow optax 0.2.8 (``optax.lookahead``, ``optax.ema``,
``optax.apply_every``, ``optax.centralize``, ``optax.zero_nans``, ``optax.keep_params_nonnegative``,
``optax.normalize_by_update_norm``, ``optax.skip_not_finite``, ``optax.skip_large_updates``,
``optax.conditionally_transform``, ``optax.conditionally_mask``, ``optax.freeze``,
``optax.named_chain``, ``optax.contrib.reduce_on_plateau``, ``optax.per_example_global_norm_clip``,
``optax.per_example_layer_norm_clip``). Where a JAX idiom has no PyTorch counterpart the
difference is stated in the docstring: lookahead keeps its slow params in its state (read them with
`lookahead_params`) instead of asking for a ``LookaheadParams`` pair as params, so it also runs in
`gradxform.Optimizer`; `params_ema` and `ema_params` give the "EMA of weights" used for evaluation;
`skip_if` applies optax's ``should_skip_update_fn`` predicates (what ``optax.MultiSteps`` does with
them); `per_example_grads` makes the stacked per-example gradients the clipping functions take.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import (
    PURE,
    EmptyState,
    ExtraArgs,
    union_of,
    GradientTransformation,
    Ownership,
    Params,
    Updates,
    call_update,
    check_extra,
    expect_state,
    extra_args_of,
    owned_transform,
    recorded,
    select_extra,
    stateless,
    transform_name,
)
from .transforms import _ema, _Flat, _leaf_counts, _step_counts, check_float

__all__ = [
    "ApplyEveryState",
    "ConditionallyMaskState",
    "ConditionallyTransformState",
    "EmaState",
    "LookaheadState",
    "ParamsEmaState",
    "ReduceLROnPlateauState",
    "SkipIfState",
    "ZeroNansState",
    "apply_every",
    "centralize",
    "conditionally_mask",
    "conditionally_transform",
    "ema",
    "ema_params",
    "freeze",
    "keep_params_nonnegative",
    "lookahead",
    "lookahead_params",
    "named_chain",
    "normalize_by_update_norm",
    "params_ema",
    "per_example_global_norm_clip",
    "per_example_grads",
    "per_example_layer_norm_clip",
    "reduce_on_plateau",
    "skip_if",
    "skip_large_updates",
    "skip_not_finite",
    "zero_nans",
]


def _eager_cpu(*tensors: Any) -> bool:
    """Whether a 0-d flag or counter may be read on the host: eager, and every tensor on the CPU."""
    return not _tree.traced() and all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in tensors)


def _select(flag: torch.Tensor, new: Any, old: Any, inplace: bool = False) -> Any:
    """``new`` where ``flag`` else ``old``, leaf by leaf (a ``None`` leaf stays ``None``).

    With ``inplace`` (the caller owns ``old``), a selected leaf is written back into ``old``'s
    buffer where both live on the flag's device: a donating compiled step then returns its state
    in the buffers it was given."""
    write = inplace and not _tree.pure_ops()

    def pick(a: Any, b: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        if a.device == flag.device or (a.ndim == 0 and a.device.type == "cpu"):
            picked = torch.where(flag, a, b)  # a 0-d CPU tensor mixes with a device flag as a scalar
        else:
            picked = torch.where(flag.to(a.device), a, b)
        if (write and isinstance(b, torch.Tensor) and b.device == picked.device and b.shape == picked.shape
                and b.dtype == picked.dtype and b.ndim > 0):
            b.copy_(picked)
            return b
        return picked

    return _tree.map_new_over_old(pick, new, old)


def _mul_(xs: list[torch.Tensor], s: Any, inplace: bool) -> list[torch.Tensor]:
    if inplace:
        _fe.mul_(xs, s)
        return xs
    return list(_fe.mul(xs, s))


def _keep_frozen(fresh: Any, old: Any) -> Any:
    """``fresh`` with ``old``'s leaf wherever ``fresh`` has ``None`` (a state re-initialised from
    the live leaves only keeps the slots of the leaves without an update, so that the state's
    structure never changes between steps: a compiled or vmapped step needs a fixed one)."""
    return _tree.map_new_over_old(lambda a, b: b if a is None else a, fresh, old)


def _reset(fresh: Any, old: Any, inplace: bool) -> Any:
    """``fresh`` (an initial state), written into ``old``'s buffers where the caller owns them."""

    def put(a: Any, b: Any) -> Any:
        if a is b:  # a slot kept as it is (`_keep_frozen`)
            return b
        if (inplace and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.ndim > 0
                and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device):
            b.copy_(a)
            return b
        return a

    return _tree.map_new_over_old(put, fresh, old)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def _find_state(state: Any, cls: type) -> Any:
    """The outermost ``cls`` instance inside a transform state (tuples, dicts, NamedTuples)."""
    if isinstance(state, cls):
        return state
    children: Any = ()
    if isinstance(state, dict):
        children = state.values()
    elif isinstance(state, (tuple, list)):
        children = state
    for child in children:
        found = _find_state(child, cls)
        if found is not None:
            return found
    return None


def _state_of(state_or_optimizer: Any, group: int) -> Any:
    from .optim import Optimizer

    if isinstance(state_or_optimizer, Optimizer):
        return state_or_optimizer.tx_state(group)
    return state_or_optimizer


# --- ema of updates -----------------------------------------------------------------------------


class EmaState(NamedTuple):
    """``count``: per-leaf number of updates received (params-shaped 0-d int64 tensors);
    ``ema``: the moving average of the updates (params-shaped)."""

    count: Any
    ema: Any


@recorded
def ema(decay: float | torch.Tensor, debias: bool = True,
        accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Exponential moving average of the updates (optax.ema).

    ``e_t = decay * e_{t-1} + (1 - decay) * u_t``, ``e_0 = 0``; the output is ``e_t``, or with
    ``debias`` ``e_t / (1 - decay^t)`` (Adam's bias correction), ``t`` the leaf's own step.

    Args:
        decay: the decay rate, in [0, 1].
        debias: divide by ``1 - decay^t``.
        accumulator_dtype: dtype of the stored average (``None``: the params' dtype).

    Returns:
        A `GradientTransformation` whose state is `EmaState`.

    Raises:
        ValueError: ``decay`` outside [0, 1].

    References:
        optax.ema (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.ema).

    Example:
        >>> tx = gx.chain(gx.ema(0.9), gx.scale(-0.1))  # SGD with an EMA of the gradients
    """
    check_float("decay", decay, low=0.0, high=1.0)

    def init(params: Params) -> EmaState:
        zeros = _tree.tree_map(lambda p: torch.zeros_like(p, dtype=accumulator_dtype), params)
        return EmaState(_leaf_counts(params), zeros)

    def owned_update(updates: Updates, state: EmaState, params: Params | None,
                     own: Ownership) -> tuple[Updates, EmaState]:
        del params
        expect_state(state, EmaState, "ema")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        d = _tree.as_scalar(decay)
        counts = _step_counts(flat, state.count, own.state)
        old = flat.state_live(state.ema, "state.ema", check_shapes=accumulator_dtype is None)
        g = flat.live if accumulator_dtype is None else [x.to(accumulator_dtype) for x in flat.live]
        new = _ema(old, g, d, own.state)
        if debias:
            if _eager_cpu(*counts) and not isinstance(d, torch.Tensor):
                out = list(_fe.div(new, [1.0 - d ** int(c) for c in counts]))
            else:
                out = [(e / (1.0 - d ** c.to(torch.float64))).to(e.dtype) for e, c in zip(new, counts)]
        else:
            out = [e.clone() for e in new]  # the output must not alias the state buffer
        out = [o if o.dtype == x.dtype else o.to(x.dtype) for o, x in zip(out, flat.live)]
        return flat.rebuild(out), EmaState(flat.rebuild(counts, like=state.count), flat.rebuild(new, like=state.ema))

    return owned_transform(init, owned_update)


# --- params ema ---------------------------------------------------------------------------------


class ParamsEmaState(NamedTuple):
    """``ema``: the exponential moving average of the params after each update (params-shaped)."""

    ema: Any


@recorded
def params_ema(decay: float | torch.Tensor) -> GradientTransformation:
    """An exponential moving average of the params, for evaluation ("EMA of weights").

    With ``p_t = p_{t-1} + u_t`` the params after this update:
    ``e_t = decay * e_{t-1} + (1 - decay) * p_t``, ``e_0 = p_0`` (a copy of the initial params,
    as Polyak averaging and the usual model-EMA recipes start). The updates pass through
    unchanged, so put it **last** in a chain: it must see the updates that are added to the
    params. Read the average with `ema_params` (from the state, or from a `gradxform.Optimizer`).
    A leaf frozen (``None`` update) in a step keeps its average.

    Args:
        decay: the decay rate, in [0, 1] (e.g. 0.999).

    Returns:
        A `GradientTransformation` whose state is `ParamsEmaState`; it needs ``params``.

    Raises:
        ValueError: ``decay`` outside [0, 1]; ``update`` without params.

    References:
        Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
        Control Optim. 30(4), 1992; the EMA variant as in Tarvainen & Valpola, "Mean teachers are
        better role models", NeurIPS 2017 (arXiv 1703.01780), section 2.

    Example:
        >>> tx = gx.chain(gx.adamw(1e-3), gx.params_ema(0.999))
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> eval_params = gx.ema_params(state)
    """
    check_float("decay", decay, low=0.0, high=1.0)

    def init(params: Params) -> ParamsEmaState:
        return ParamsEmaState(_tree.tree_map(lambda p: p.detach().clone(), params))

    def owned_update(updates: Updates, state: ParamsEmaState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ParamsEmaState]:
        expect_state(state, ParamsEmaState, "params_ema")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        p = flat.params_live(params, "params_ema")
        old = flat.state_live(state.ema, "state.ema")
        new_params = list(_fe.add(p, flat.live))
        new = _ema(old, new_params, _tree.as_scalar(decay), own.state)
        return updates, ParamsEmaState(flat.rebuild(new, like=state.ema))

    return owned_transform(init, owned_update)


def ema_params(state_or_optimizer: Any, group: int = 0) -> Any:
    """The params EMA kept by a `params_ema` in a transform state or a `gradxform.Optimizer`.

    ``e_t = decay * e_{t-1} + (1 - decay) * p_t`` (see `params_ema`): this returns ``e_t``.

    Args:
        state_or_optimizer: a transform state holding a `ParamsEmaState` (anywhere inside a chain
            or combinator), or a `gradxform.Optimizer` whose transform holds one.
        group: with an optimizer, the param group (its state is ``opt.tx_state(group)``).

    Returns:
        The averaged params: a tree with the params' structure (for an optimizer, the list of the
        group's params' averages, in the order of ``opt.param_groups[group]["params"]``).

    Raises:
        ValueError: no `params_ema` in the state.

    References:
        Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
        Control Optim. 30(4), 1992; Tarvainen and Valpola, "Mean teachers are better role
        models", NeurIPS 2017, arXiv:1703.01780, Section 2; optax.ema
        (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.ema).

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.chain(gx.adamw(1e-3), gx.params_ema(0.999)))
        >>> model(x).square().mean().backward()
        >>> opt.step()  # ... train
        >>> averaged = dict(zip([n for n, _ in model.named_parameters()], gx.ema_params(opt)))
        >>> out = torch.func.functional_call(model, averaged, (x,))
    """
    found = _find_state(_state_of(state_or_optimizer, group), ParamsEmaState)
    if found is None:
        raise ValueError("ema_params: the state holds no ParamsEmaState; build the transform with "
                         "gx.params_ema(decay) (last in the chain)")
    return found.ema


# --- lookahead ----------------------------------------------------------------------------------


class LookaheadState(NamedTuple):
    """``fast_state``: the fast optimizer's state; ``steps_since_sync``: fast steps since the last
    synchronisation (0-d int64, CPU); ``slow``: the slow params (params-shaped)."""

    fast_state: Any
    steps_since_sync: torch.Tensor
    slow: Any


@recorded
def lookahead(fast_optimizer: GradientTransformation, sync_period: int, slow_step_size: float | torch.Tensor,
              reset_state: bool = False) -> GradientTransformation:
    """Lookahead (optax.lookahead): ``k`` fast steps forward, one slow step back.

    The fast optimizer moves the params ``phi`` (the model's params); every ``sync_period``-th
    update also moves the slow params ``theta`` and resets the fast ones to them::

        d = phi + u - theta;  theta <- theta + a * d;  phi <- theta      (u: the fast update)

    i.e. that update returns ``u - (1 - a) * d``. The slow params live in the state (optax keeps
    them in a ``LookaheadParams(fast, slow)`` params pair instead), so the transform works on
    ordinary params and in `gradxform.Optimizer`; read them with `lookahead_params` for
    evaluation. With ``reset_state`` the fast optimizer's state is re-initialised after each
    synchronisation (from the params before the update, as optax; leaves without an update stay
    frozen and keep their state slots, so the state's structure is the same at every step). Do
    not modify the output
    before applying it, or fast and slow params drift apart.

    Args:
        fast_optimizer: the inner optimizer (e.g. ``gx.adam(1e-3)``).
        sync_period: fast steps per synchronisation, ``k >= 1``.
        slow_step_size: ``a``, the slow params' step towards the fast ones, in [0, 1].
        reset_state: re-initialise the fast optimizer's state after each synchronisation.

    Returns:
        A `GradientTransformation` whose state is `LookaheadState`; it needs ``params``.

    Raises:
        ValueError: ``sync_period < 1``; ``slow_step_size`` outside [0, 1]; no params.

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS
        2019 (arXiv 1907.08610), Algorithm 1; optax.lookahead
        (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html#optax.lookahead).

    Example:
        >>> tx = gx.lookahead(gx.adam(1e-3), sync_period=5, slow_step_size=0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> slow = gx.lookahead_params(state)
    """
    _check_int("sync_period", sync_period, 1)
    check_float("slow_step_size", slow_step_size, low=0.0, high=1.0)
    inner_spec = extra_args_of(fast_optimizer)

    def init(params: Params) -> LookaheadState:
        return LookaheadState(fast_optimizer.init(params), torch.zeros((), dtype=torch.int64),
                              _tree.tree_map(lambda p: p.detach().clone(), params))

    def owned_update(updates: Updates, state: LookaheadState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, LookaheadState]:
        expect_state(state, LookaheadState, "lookahead")
        flat = _Flat(updates)
        p = flat.params_live(params, "lookahead") if flat.live else []
        u_tree, fast_state = call_update(fast_optimizer, updates, state.fast_state, params, own, **extra)
        u_leaves = _tree.check_structure(flat.spec, u_tree, "lookahead fast optimizer output", reference=updates)
        steps = state.steps_since_sync
        new_steps = (steps + 1) % sync_period
        sync_next = steps == sync_period - 1
        alpha = _tree.as_scalar(slow_step_size)
        idx = [i for i in flat.idx if u_leaves[i] is not None]
        if not idx or (_eager_cpu(steps) and not bool(sync_next)):
            # no leaf with an update (all frozen this step): nothing to synchronise, and the
            # fast state keeps every slot
            return u_tree, LookaheadState(fast_state, new_steps, state.slow)
        slow_all = _tree.check_structure(flat.spec, state.slow, "state.slow", reference=updates)
        slow = [slow_all[i] for i in idx]
        u = [u_leaves[i] for i in idx]
        where = {i: j for j, i in enumerate(flat.idx)}
        ps = [p[where[i]] for i in idx]
        diff = list(_fe.add(ps, u))
        _fe.sub_(diff, slow)
        if _eager_cpu(steps):  # a synchronisation step
            step_slow = list(_fe.mul(diff, alpha))
            if own.state:
                _fe.add_(slow, step_slow)
                new_slow = slow
            else:
                new_slow = list(_fe.add(slow, step_slow))
            _fe.mul_(diff, 1.0 - alpha)
            if own.may_write(u):
                _fe.sub_(u, diff)
                out = u
            else:
                out = list(_fe.add(u, diff, alpha=-1.0))
            if reset_state:
                fresh = _keep_frozen(fast_optimizer.init(flat.rebuild(p)), fast_state)
                fast_state = _reset(fresh, fast_state, own.state)
        else:  # all-tensor: the synchronisation weighted by the 0/1 flag (as optax)
            s = sync_next.to(torch.float64)
            step_slow = list(_fe.mul(diff, alpha * s))
            if own.state:
                _fe.add_(slow, step_slow)
                new_slow = slow
            else:
                new_slow = list(_fe.add(slow, step_slow))
            out = list(_fe.add(u, _fe.mul(diff, -(s * (1.0 - alpha)))))
            if reset_state:
                fresh = _keep_frozen(fast_optimizer.init(flat.rebuild(p)), fast_state)
                fast_state = _select(sync_next, fresh, fast_state, own.state)
        out_tree = _tree.tree_unflatten(flat.spec, _tree.scatter(u_leaves, idx, out))
        slow_tree = _tree.tree_unflatten(flat.spec, _tree.scatter(slow_all, idx, new_slow))
        return out_tree, LookaheadState(fast_state, new_steps, slow_tree)

    return owned_transform(init, owned_update, inner_spec)


def lookahead_params(state_or_optimizer: Any, params: Params | None = None, *, group: int = 0) -> Any:
    """The slow params of a `lookahead` (what the paper evaluates), from its state or an optimizer.

    ``theta``: moved only at synchronisations, ``theta <- theta + a * (phi - theta)``.

    Args:
        state_or_optimizer: a transform state holding a `LookaheadState`, or a
            `gradxform.Optimizer` whose transform holds one.
        params: optional; when given, the slow params are checked to have its structure.
        group: with an optimizer, the param group.

    Returns:
        The slow params (the params' structure; for an optimizer, a list in the order of the
        group's params).

    Raises:
        ValueError: no `lookahead` in the state, or ``params`` of another structure.

    References:
        Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back",
        NeurIPS 2019, arXiv:1907.08610, Algorithm 1 (the slow weights); optax.lookahead
        (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html#optax.lookahead).

    Example:
        >>> p = {"w": torch.zeros(1)}
        >>> tx = gx.lookahead(gx.sgd(1.0), sync_period=2, slow_step_size=0.5)
        >>> state = tx.init(p)
        >>> u, state = tx.update({"w": torch.tensor([-1.0])}, state, p)
        >>> p = gx.apply_updates(p, u)
        >>> p["w"], gx.lookahead_params(state, p)["w"]  # fast moved, slow not yet
        (tensor([1.]), tensor([0.]))
    """
    found = _find_state(_state_of(state_or_optimizer, group), LookaheadState)
    if found is None:
        raise ValueError("lookahead_params: the state holds no LookaheadState; build the transform with gx.lookahead")
    if params is not None:
        _tree.check_structure(_tree.tree_flatten(params)[1], found.slow, "the slow params", against="params",
                              reference=params)
    return found.slow


# --- apply_every --------------------------------------------------------------------------------


class ApplyEveryState(NamedTuple):
    """``count``: calls since the last emission, modulo ``k`` (0-d int64, CPU); ``grad_acc``:
    the accumulated updates (params-shaped)."""

    count: torch.Tensor
    grad_acc: Any


@recorded
def apply_every(k: int = 1) -> GradientTransformation:
    """Accumulate the updates and emit their sum every ``k`` calls (optax.apply_every).

    ``a <- u`` on the first call of a cycle, ``a <- a + u`` on the others; calls ``1..k-1`` of a
    cycle return zeros, call ``k`` returns ``a`` (the sum, not the mean). Transforms before it in
    a chain still update their state on every call; for true gradient accumulation use
    `gradxform.multi_steps`.

    Args:
        k: calls per emission, ``>= 1``.

    Returns:
        A `GradientTransformation` whose state is `ApplyEveryState`.

    Raises:
        ValueError: ``k`` is not an int >= 1.

    References:
        optax.apply_every (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.chain(gx.apply_every(4), gx.sgd(0.1))
    """
    _check_int("k", k, 1)

    def init(params: Params) -> ApplyEveryState:
        return ApplyEveryState(torch.zeros((), dtype=torch.int64), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ApplyEveryState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ApplyEveryState]:
        del params
        expect_state(state, ApplyEveryState, "apply_every")
        flat = _Flat(updates)
        count = state.count
        new_count = (count + 1) % k
        if not flat.live:
            return updates, ApplyEveryState(new_count, state.grad_acc)
        acc = flat.state_live(state.grad_acc, "state.grad_acc")
        if _eager_cpu(count):
            c = int(count)
            if c == 0:
                new_acc = [g.clone() for g in flat.live] if not own.state else acc
                if own.state:
                    for a, g in zip(acc, flat.live):
                        a.copy_(g)
            elif own.state:
                _fe.add_(acc, flat.live)
                new_acc = acc
            else:
                new_acc = list(_fe.add(acc, flat.live))
            out = [a.clone() for a in new_acc] if c == k - 1 else [torch.zeros_like(g) for g in flat.live]
        else:
            keep = (count != 0).to(torch.float64)
            emit = (count == k - 1).to(torch.float64)
            new_acc = _mul_(acc, keep, own.state)
            _fe.add_(new_acc, flat.live)
            out = list(_fe.mul(new_acc, emit))
        return flat.rebuild(out), ApplyEveryState(new_count, flat.rebuild(new_acc, like=state.grad_acc))

    return owned_transform(init, owned_update)


# --- stateless utilities ------------------------------------------------------------------------


@recorded
def centralize() -> GradientTransformation:
    """Gradient centralization (optax.centralize): for each leaf with ``ndim > 1``, subtract its
    mean over all dims but the first: ``u <- u - mean_{dims 1..}(u)``; vectors pass unchanged.

    Note the layout: the mean is over dims ``1..``, i.e. per row of a torch ``Linear.weight``
    ``(out, in)`` (per output unit, as the paper's per-column mean of a ``(in, out)`` matrix).

    Returns:
        A stateless `GradientTransformation`.

    References:
        Yong, Huang, Hua & Zhang, "Gradient Centralization: A New Optimization Technique for Deep
        Neural Networks", ECCV 2020 (arXiv 2004.01461), eq. (1); optax.centralize.

    Example:
        >>> tx = gx.chain(gx.centralize(), gx.sgd(0.1, momentum=0.9))
    """

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        del params
        flat = _Flat(updates)
        if not flat.live:
            return updates
        out = [x - x.mean(dim=tuple(range(1, x.ndim)), keepdim=True) if x.ndim > 1 else x for x in flat.live]
        return flat.rebuild(out)

    return stateless(update_fn)


@recorded
def keep_params_nonnegative() -> GradientTransformation:
    """Keep the params non-negative (optax.keep_params_nonnegative): where ``p + u < 0`` the update
    becomes ``-p`` (the param lands on 0), elsewhere it is unchanged. Put it last in a chain.
    Params that are already negative are moved to 0.

    Returns:
        A stateless `GradientTransformation` that needs ``params``.

    Raises:
        ValueError: ``update`` without params.

    References:
        optax.keep_params_nonnegative (https://optax.readthedocs.io/en/latest/api/projections.html).

    Example:
        >>> tx = gx.chain(gx.sgd(0.1), gx.keep_params_nonnegative())
    """

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        p = flat.params_live(params, "keep_params_nonnegative")
        return flat.rebuild([torch.where(q + u < 0.0, -q, u) for q, u in zip(p, flat.live)])

    return stateless(update_fn)


class ZeroNansState(NamedTuple):
    """``found_nan``: per leaf, a 0-d bool tensor: the last update of that leaf held a NaN."""

    found_nan: Any


@recorded
def zero_nans() -> GradientTransformation:
    """Replace NaNs in the updates by 0 (optax.zero_nans): ``u <- where(isnan(u), 0, u)``; the
    state records, per leaf, whether the last update held a NaN (infinities pass unchanged).

    Returns:
        A `GradientTransformation` whose state is `ZeroNansState`.

    References:
        optax.zero_nans (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.chain(gx.zero_nans(), gx.adam(1e-3))
    """

    def init(params: Params) -> ZeroNansState:
        return ZeroNansState(_tree.tree_map(lambda p: torch.zeros((), dtype=torch.bool, device=p.device), params))

    def owned_update(updates: Updates, state: ZeroNansState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ZeroNansState]:
        del params
        expect_state(state, ZeroNansState, "zero_nans")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        _tree.check_structure(flat.spec, state.found_nan, "state.found_nan", reference=updates)
        nans = [torch.isnan(x) for x in flat.live]
        found = [m.any() for m in nans]
        out = [x.masked_fill(m, 0.0) for x, m in zip(flat.live, nans)]
        return flat.rebuild(out), ZeroNansState(flat.rebuild(found, like=state.found_nan))

    return owned_transform(init, owned_update)


@recorded
def normalize_by_update_norm(scale_factor: float | torch.Tensor = 1.0,
                             eps: float | torch.Tensor = 1e-6) -> GradientTransformation:
    """Scale by the inverse of the global update norm (optax.normalize_by_update_norm):
    ``u <- u * scale_factor / (||u||_2 + eps)``, the norm over all leaves together.

    Args:
        scale_factor: the output's norm (up to ``eps``); negative to descend.
        eps: added to the norm, ``>= 0``.

    Returns:
        A stateless `GradientTransformation`.

    Raises:
        ValueError: ``eps < 0``.

    References:
        optax.normalize_by_update_norm (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.normalize_by_update_norm(scale_factor=-0.1)  # normalized gradient descent
    """
    check_float("scale_factor", scale_factor)
    check_float("eps", eps, low=0.0)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        del params
        flat = _Flat(updates)
        if not flat.live:
            return updates
        norm = _tree.global_norm(flat.live)
        g_norm = (norm + _tree.as_scalar(eps)) / _tree.as_scalar(scale_factor)
        return flat.rebuild([(x / g_norm).to(x.dtype) for x in flat.live])

    return stateless(update_fn)


def _mask_flags(mask: Any, ref: Any) -> list[bool]:
    if callable(mask):
        mask = mask(ref)
    leaves, spec = _tree.tree_flatten(ref)
    if isinstance(mask, (bool, torch.Tensor)) and not isinstance(mask, (list, tuple, dict)):
        return [bool(mask)] * len(leaves)
    from .combine import _labels_for  # (walks the params' structure under torch.compile)

    return [bool(f) for f in _labels_for(mask, ref, "mask")]


@recorded
def freeze(mask: Any) -> GradientTransformation:
    """Zero the updates of the frozen leaves (optax.freeze): ``u <- 0`` where ``mask`` is True,
    unchanged elsewhere. The mask is static.

    Args:
        mask: a bool (every leaf frozen or none), a pytree of bools with the params' structure,
            or a function ``params -> mask``.

    Returns:
        A stateless `GradientTransformation`.

    Raises:
        ValueError: a mask tree of another structure than the updates.

    References:
        optax.freeze (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.chain(gx.freeze({"w": True, "b": False}), gx.adam(1e-3))
    """
    if not (callable(mask) or isinstance(mask, (bool, torch.Tensor, list, tuple, dict)) or mask is None):
        raise TypeError(f"freeze: mask must be a bool, a pytree of bools or a function params -> mask; got {mask!r}")

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        leaves, spec = _tree.tree_flatten(updates)
        flags = _mask_flags(mask, updates)
        return _tree.tree_unflatten(spec, [torch.zeros_like(x) if x is not None and f else x
                                           for x, f in zip(leaves, flags)])

    return stateless(update_fn)


# --- named_chain --------------------------------------------------------------------------------


@recorded
def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """`gradxform.chain` with named members (optax.named_chain): ``u <- tx_k(...tx_1(u))`` and the
    state is a dict ``name -> that member's state`` (read ``state["adam"]``).

    Extra arguments go to the members that declare them, as in `gradxform.chain`.

    Args:
        *transforms: ``(name, transform)`` pairs, names unique strings.

    Returns:
        A `GradientTransformation` whose state is a dict.

    Raises:
        ValueError: duplicate names.
        TypeError: an argument is not a ``(str, transform)`` pair.

    References:
        optax.named_chain (https://optax.readthedocs.io/en/latest/api/combining_optimizers.html).

    Example:
        >>> tx = gx.named_chain(("clip", gx.clip_by_global_norm(1.0)), ("adam", gx.adam(1e-3)))
        >>> state = tx.init(params); state["adam"]
    """
    for item in transforms:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], tuple) and len(item[1]) == 2 and all(callable(f) for f in item[1])):
            raise TypeError(f"named_chain takes (name, transform) pairs with a str name; got {item!r}")
    names = [n for n, _ in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique; got {names}")
    members = [(n, t if isinstance(t, GradientTransformation) else GradientTransformation(*t)) for n, t in transforms]
    specs = [extra_args_of(t) for _, t in members]
    union = union_of(specs)
    # built once here: dynamo 2.1 reads no NamedTuple property inside update's trace
    union_check = ExtraArgs(optional=union.names)

    def init(params: Params) -> dict[str, Any]:
        return {n: t.init(params) for n, t in members}

    def owned_update(updates: Updates, state: dict[str, Any], params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, dict[str, Any]]:
        if not isinstance(state, dict) or set(state) != set(names):
            got = "None" if state is None else type(state).__name__ + (f" with keys {sorted(state)}" if isinstance(state, dict) else "")
            raise ValueError(f"named_chain.update() expects the dict of member states {names} returned by "
                             f"init(params), got {got}. Call init(params) first.")
        if not union.accepts_any:
            check_extra(union_check, extra, "named_chain")
        new: dict[str, Any] = {}
        for (n, t), spec in zip(members, specs):
            kwargs = select_extra(spec, extra)
            missing = sorted(spec.required - kwargs.keys())
            if missing:
                raise TypeError(f"{transform_name(t)} (named {n!r} in named_chain) needs the extra argument "
                                f"{missing[0]!r}; pass it as update(updates, state, params, {missing[0]}=...)")
            updates, new[n] = call_update(t, updates, state[n], params, own, **kwargs)
        return updates, new

    return owned_transform(init, owned_update, union)


# --- conditional transforms ---------------------------------------------------------------------


class ConditionallyTransformState(NamedTuple):
    """``inner_state``; ``step``: calls so far (0-d int64, CPU)."""

    inner_state: Any
    step: torch.Tensor


class ConditionallyMaskState(NamedTuple):
    """``step``: calls so far (0-d int64, CPU); ``inner_state``."""

    step: torch.Tensor
    inner_state: Any


def _conditional(name: str, inner: GradientTransformation, should_transform_fn: Callable[..., Any],
                 forward_extra_args: bool, mask: bool) -> GradientTransformation:
    if not callable(should_transform_fn):
        raise TypeError(f"{name}: should_transform_fn must be callable step -> bool; got {should_transform_fn!r}")
    cls = ConditionallyMaskState if mask else ConditionallyTransformState

    def make(step: torch.Tensor, inner_state: Any) -> Any:
        return cls(step, inner_state) if mask else cls(inner_state, step)

    def init(params: Params) -> Any:
        return make(torch.zeros((), dtype=torch.int64), inner.init(params))

    def owned_update(updates: Updates, state: Any, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, Any]:
        expect_state(state, cls, name)
        cond = should_transform_fn(state.step, **(extra if forward_extra_args else {}))
        step = state.step + 1

        def rejected() -> Updates:
            return _tree.tree_map(torch.zeros_like, updates) if mask else updates

        if not isinstance(cond, torch.Tensor) or _eager_cpu(cond):
            if bool(cond):
                new_u, new_inner = call_update(inner, updates, state.inner_state, params, own, **extra)
                return new_u, make(step, new_inner)
            return rejected(), make(step, state.inner_state)
        # a device flag, or traced: both branches, selected (the inner runs purely)
        flag = cond.reshape(()).to(torch.bool)
        new_u, new_inner = inner.update(updates, state.inner_state, params, **extra)
        return _select(flag, new_u, rejected()), make(step, _select(flag, new_inner, state.inner_state, own.state))

    return owned_transform(init, owned_update, extra_args_of(inner))


@recorded
def conditionally_transform(inner: GradientTransformation, should_transform_fn: Callable[..., Any],
                            forward_extra_args: bool = False) -> GradientTransformation:
    """Apply ``inner`` only at the steps where ``should_transform_fn(step)`` is True
    (optax.conditionally_transform); at the other steps the updates and ``inner``'s state pass
    through unchanged. ``step`` counts the calls so far (0-d int64 tensor, from 0).

    The condition may return a Python bool or a 0-d bool tensor. Eagerly on the CPU the branch
    is taken on the host; on a device flag or under ``torch.compile`` both are computed and
    selected with ``torch.where`` (no host sync).

    Args:
        inner: the transform to apply conditionally.
        should_transform_fn: ``step -> bool`` (with ``forward_extra_args``, it also gets the extra
            arguments as keywords).
        forward_extra_args: pass the extra arguments to ``should_transform_fn`` too.

    Returns:
        A `GradientTransformation` whose state is `ConditionallyTransformState`.

    Raises:
        TypeError: ``should_transform_fn`` is not callable.

    References:
        optax.conditionally_transform (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.chain(gx.conditionally_transform(gx.clip_by_global_norm(1.0), lambda step: step >= 100),
        ...               gx.sgd(0.1))
    """
    return _conditional("conditionally_transform", inner, should_transform_fn, forward_extra_args, mask=False)


@recorded
def conditionally_mask(inner: GradientTransformation, should_transform_fn: Callable[..., Any],
                       forward_extra_args: bool = False) -> GradientTransformation:
    """Apply ``inner`` at the steps where ``should_transform_fn(step)`` is True and return zero
    updates at the others, keeping ``inner``'s state (optax.conditionally_mask).

    Args:
        inner: the transform to apply conditionally.
        should_transform_fn: ``step -> bool``, ``step`` the calls so far (0-d int64, from 0).
        forward_extra_args: pass the extra arguments to ``should_transform_fn`` too.

    Returns:
        A `GradientTransformation` whose state is `ConditionallyMaskState`.

    Raises:
        TypeError: ``should_transform_fn`` is not callable.

    References:
        optax.conditionally_mask (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.conditionally_mask(gx.sgd(0.1), lambda step: step % 2 == 0)  # every other step
    """
    return _conditional("conditionally_mask", inner, should_transform_fn, forward_extra_args, mask=True)


# --- skipping steps -----------------------------------------------------------------------------


def skip_not_finite(updates: Updates, gradient_step: Any, params: Params | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """optax's ``should_skip_update_fn`` that skips updates holding a NaN or an Inf.

    ``n = sum over leaves of #{entries not finite}``; skip iff ``n > 0``. Use it with `skip_if`.

    Args:
        updates: the proposed updates.
        gradient_step: steps applied so far (unused).
        params: the params (unused).

    Returns:
        ``(should_skip, {"should_skip": should_skip, "num_not_finite": n})``, 0-d tensors on the
        updates' device (no host sync).

    References:
        optax.skip_not_finite (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html).

    Example:
        >>> tx = gx.skip_if(gx.adam(1e-3), gx.skip_not_finite)
    """
    del gradient_step, params
    live = [x for x in _tree.tree_flatten(updates)[0] if x is not None]
    device = live[0].device if live else torch.device("cpu")
    counts = [(~torch.isfinite(x)).sum() for x in live]
    n = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64, device=device)
    should_skip = n > 0
    return should_skip, {"should_skip": should_skip, "num_not_finite": n}


def skip_large_updates(updates: Updates, gradient_step: Any, params: Params | None,
                       max_squared_norm: float | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """optax's ``should_skip_update_fn`` that skips updates of a large global norm.

    ``s = sum over leaves of sum(u^2)``; skip iff ``not (s < max_squared_norm)`` (so a NaN norm
    skips too). Bind ``max_squared_norm`` with ``functools.partial`` and use it with `skip_if`.

    Args:
        updates: the proposed updates.
        gradient_step: steps applied so far (unused).
        params: the params (unused).
        max_squared_norm: the largest squared norm accepted.

    Returns:
        ``(should_skip, {"should_skip": should_skip, "norm_squared": s})``, 0-d tensors.

    References:
        optax.skip_large_updates (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html).

    Example:
        >>> import functools
        >>> tx = gx.skip_if(gx.sgd(0.1), functools.partial(gx.skip_large_updates, max_squared_norm=100.0))
        >>> u, state = tx.update({"w": torch.tensor([20.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # 400 > 100: skipped
        tensor([0.])
    """
    del gradient_step, params
    live = [x for x in _tree.tree_flatten(updates)[0] if x is not None]
    sums = [torch.sum(x * x) for x in live]
    norm_sq = torch.stack([s.to(_tree.at_least_float32(s.dtype)) for s in sums]).sum() if sums \
        else torch.zeros(())
    should_skip = torch.logical_not(norm_sq < max_squared_norm)
    return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}


class SkipIfState(NamedTuple):
    """``gradient_step``: steps applied (not skipped) so far; ``skip_state``: the info the
    predicate returned on the last call; ``inner_state``."""

    gradient_step: torch.Tensor
    skip_state: Any
    inner_state: Any


@recorded
def skip_if(inner: GradientTransformation, should_skip_update_fn: Callable[..., Any]) -> GradientTransformation:
    """Skip the steps that a predicate rejects: what ``optax.MultiSteps(inner, 1,
    should_skip_update_fn)`` does.

    ``skip, info = should_skip_update_fn(updates, gradient_step, params)`` on the incoming
    updates; a skipped step returns zeros and keeps ``inner``'s state and ``gradient_step``; the
    others apply ``inner`` and count. ``info`` is kept in the state (``skip_state``; its structure
    must not change between calls). Eagerly on the CPU the branch is taken on the host; otherwise
    (a device flag, ``torch.compile``) both are computed and selected with ``torch.where``.

    Args:
        inner: the transform to protect.
        should_skip_update_fn: ``(updates, gradient_step, params) -> (bool tensor, info)``, e.g.
            `skip_not_finite` or `skip_large_updates` with its bound ``max_squared_norm``.

    Returns:
        A `GradientTransformation` whose state is `SkipIfState`.

    Raises:
        TypeError: ``should_skip_update_fn`` is not callable.

    References:
        optax.MultiSteps (https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html).

    Example:
        >>> tx = gx.skip_if(gx.adamw(1e-3), gx.skip_not_finite)
    """
    if not callable(should_skip_update_fn):
        raise TypeError(f"skip_if: should_skip_update_fn must be callable; got {should_skip_update_fn!r}")

    def init(params: Params) -> SkipIfState:
        step = torch.zeros((), dtype=torch.int64)
        _, info = should_skip_update_fn(_tree.tree_zeros_like(params), step, params)
        return SkipIfState(step, optree.tree_map(lambda x: torch.zeros_like(torch.as_tensor(x)), info),
                           inner.init(params))

    def owned_update(updates: Updates, state: SkipIfState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, SkipIfState]:
        expect_state(state, SkipIfState, "skip_if")
        skip, info = should_skip_update_fn(updates, state.gradient_step, params)
        skip = torch.as_tensor(skip).reshape(())
        # the info keeps the dtypes of the template init made (a norm's dtype follows the live leaves)
        info = optree.tree_map(lambda x, t: torch.as_tensor(x).to(t.dtype), info, state.skip_state)
        if _eager_cpu(skip):
            if bool(skip):
                return _tree.tree_map(torch.zeros_like, updates), SkipIfState(state.gradient_step, info,
                                                                               state.inner_state)
            new_u, new_inner = call_update(inner, updates, state.inner_state, params, own, **extra)
            return new_u, SkipIfState(state.gradient_step + 1, info, new_inner)
        new_u, new_inner = inner.update(updates, state.inner_state, params, **extra)
        ok = ~skip.to(torch.bool)
        out = _select(ok, new_u, _tree.tree_map(torch.zeros_like, updates))
        step = state.gradient_step + ok.to(torch.int64).to(state.gradient_step.device)
        return out, SkipIfState(step, info, _select(ok, new_inner, state.inner_state, own.state))

    return owned_transform(init, owned_update, extra_args_of(inner))


# --- reduce_on_plateau --------------------------------------------------------------------------


class ReduceLROnPlateauState(NamedTuple):
    """0-d tensors: ``scale`` (the factor applied to the updates), ``best_value``,
    ``plateau_count``, ``cooldown_count``, ``count`` (values accumulated), ``avg_value``."""

    scale: torch.Tensor
    best_value: torch.Tensor
    plateau_count: torch.Tensor
    cooldown_count: torch.Tensor
    count: torch.Tensor
    avg_value: torch.Tensor


@recorded
def reduce_on_plateau(factor: float = 0.1, patience: int = 10, rtol: float = 1e-4, atol: float = 0.0,
                      cooldown: int = 0, accumulation_size: int = 1, min_scale: float = 0.0) -> GradientTransformation:
    """Scale the updates down when a metric stops improving (optax.contrib.reduce_on_plateau).

    The metric is the extra argument ``value`` (``update(updates, state, params, value=loss)``).
    Every ``accumulation_size`` calls, the mean ``v`` of the values given is compared with the
    best so far: ``v < (1 - rtol) * best - atol`` improves (``best <- v``, plateau count 0), else
    the plateau count grows; at ``patience`` it resets and ``scale <- max(scale * factor,
    min_scale)``, followed by ``cooldown`` evaluations that only count down. Every call returns
    ``scale * u``. The statistics are float64 (optax keeps them in the params' dtype).

    Args:
        factor: the reduction factor, in (0, 1).
        patience: evaluations without improvement before reducing.
        rtol: relative improvement needed, in [0, 1].
        atol: absolute improvement needed, ``>= 0`` (not both 0).
        cooldown: evaluations to wait after a reduction.
        accumulation_size: values averaged per evaluation.
        min_scale: the scale never goes below it.

    Returns:
        A `GradientTransformation` whose state is `ReduceLROnPlateauState`; ``value`` is required.

    Raises:
        ValueError: an argument outside its range.

    References:
        optax.contrib.reduce_on_plateau (https://optax.readthedocs.io/en/latest/api/contrib.html);
        torch.optim.lr_scheduler.ReduceLROnPlateau (the same rule as a scheduler).

    Example:
        >>> tx = gx.chain(gx.sgd(1.0), gx.reduce_on_plateau(factor=0.5, patience=1))
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.ones(1)}, state, value=torch.tensor(1.0))
        >>> u, state = tx.update({"w": torch.ones(1)}, state, value=torch.tensor(2.0))  # no better
        >>> u["w"]
        tensor([-0.5000])
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1); got {factor}")
    if rtol < 0.0 or atol < 0.0:
        raise ValueError(f"rtol and atol must be >= 0; got rtol={rtol}, atol={atol}")
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("at least one of rtol or atol must be positive")
    if rtol > 1.0:
        raise ValueError(f"rtol must be <= 1; got {rtol}")
    _check_int("patience", patience, 0)
    _check_int("cooldown", cooldown, 0)
    _check_int("accumulation_size", accumulation_size, 1)
    check_float("min_scale", min_scale, low=0.0)

    def init(params: Params) -> ReduceLROnPlateauState:
        del params
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        i64 = lambda: torch.zeros((), dtype=torch.int64)  # noqa: E731
        return ReduceLROnPlateauState(f64(1.0), f64(float("inf")), i64(), i64(), i64(), f64(0.0))

    def owned_update(updates: Updates, state: ReduceLROnPlateauState, params: Params | None, own: Ownership, *,
                     value: Any) -> tuple[Updates, ReduceLROnPlateauState]:
        del params
        expect_state(state, ReduceLROnPlateauState, "reduce_on_plateau")
        v = value.detach().to(torch.float64).reshape(()) if isinstance(value, torch.Tensor) else \
            torch.tensor(float(value), dtype=torch.float64)
        count = state.count + 1
        avg = (state.count * state.avg_value + v) / count
        improved = avg < (1 - rtol) * state.best_value - atol
        best = torch.where(improved, avg, state.best_value)
        plateau = torch.where(improved, torch.zeros_like(state.plateau_count), state.plateau_count + 1)
        in_cooldown = state.cooldown_count > 0
        hit = plateau == patience
        zero_i = torch.zeros_like(plateau)
        new_plateau = torch.where(in_cooldown | hit, zero_i, plateau)
        reduced = torch.clamp_min(torch.where(hit, state.scale * factor, state.scale), min_scale)
        new_scale = torch.where(in_cooldown, state.scale, reduced)
        new_cooldown = torch.where(in_cooldown, state.cooldown_count - 1,
                                   torch.where(hit, torch.full_like(plateau, cooldown), zero_i))
        do = count == accumulation_size
        evaluated = ReduceLROnPlateauState(new_scale, best, new_plateau, new_cooldown, zero_i,
                                           torch.zeros_like(avg))
        accumulated = ReduceLROnPlateauState(state.scale, state.best_value, state.plateau_count,
                                             state.cooldown_count, count, avg)
        new_state = ReduceLROnPlateauState(*(torch.where(do, a, b) for a, b in zip(evaluated, accumulated)))
        flat = _Flat(updates)
        if not flat.live:
            return updates, new_state
        s = _tree.as_scalar(new_state.scale)
        if isinstance(s, torch.Tensor):
            out = [(x * s).to(x.dtype) for x in flat.live]
        elif own.may_write(flat.live):
            _fe.mul_(flat.live, s)
            out = flat.live
        else:
            out = list(_fe.mul(flat.live, s))
        return flat.rebuild(out), new_state

    return owned_transform(init, owned_update)


# --- per-example clipping -----------------------------------------------------------------------


def _per_example_leaves(grads: Any, who: str) -> tuple[list[Any], Any, list[int], list[torch.Tensor]]:
    leaves, spec = _tree.tree_flatten(grads)
    idx, live = _tree.live(leaves)
    if not live:
        raise ValueError(f"{who}: grads holds no tensor")
    n = live[0].shape[0] if live[0].ndim else None
    if n is None or any(x.ndim < 1 or x.shape[0] != n for x in live):
        shapes = {p: tuple(x.shape) for p, x in zip([_tree.tree_paths(grads)[i] for i in idx], live)}
        raise ValueError(f"{who} takes per-example gradients: every leaf needs the examples in dim 0, the same "
                         f"number in each (gx.per_example_grads makes them); got shapes {shapes}")
    return leaves, spec, idx, live


def _clip_examples(live: list[torch.Tensor], clip: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    n = live[0].shape[0]
    sq = [torch.sum((x * x).reshape(n, -1), dim=1) for x in live]
    norms = torch.sqrt(torch.stack(sq).sum(dim=0))
    clip_t = torch.as_tensor(clip, dtype=norms.dtype, device=norms.device)
    multipliers = torch.nan_to_num(torch.clamp_max(clip_t / norms, 1.0), nan=1.0)
    num_clipped = (multipliers < 1.0).sum()
    sums = [torch.tensordot(multipliers.to(x.dtype), x, dims=1) for x in live]
    return sums, num_clipped


def per_example_global_norm_clip(grads: Any, l2_norm_clip: float | torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Clip each example's gradient to a global L2 norm and sum them (optax's function, DP-SGD's
    clipping step).

    ``g_n``: example ``n``'s gradient (all leaves); ``m_n = min(1, C / ||g_n||_2)`` (1 where
    that is NaN, e.g. ``0 / 0``); returns ``sum_n m_n g_n`` and ``#{n : m_n < 1}``.

    Args:
        grads: a pytree of per-example gradients, the examples in dim 0 of every leaf (what
            `per_example_grads` returns); ``None`` leaves are skipped.
        l2_norm_clip: ``C``, the largest per-example norm.

    Returns:
        ``(clipped_sum, num_clipped)``: the params-shaped sum (``None`` where ``grads`` has
        ``None``) and a 0-d int64 tensor.

    Raises:
        ValueError: a leaf without the shared example dimension.

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv 1607.00133),
        Algorithm 1; optax.per_example_global_norm_clip.

    Example:
        >>> per_ex = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # 2 examples
        >>> clipped_sum, n_clipped = gx.per_example_global_norm_clip(per_ex, 1.0)
        >>> clipped_sum["w"], n_clipped
        (tensor([0.9000, 1.2000]), tensor(1))
    """
    leaves, spec, idx, live = _per_example_leaves(grads, "per_example_global_norm_clip")
    sums, num = _clip_examples(live, l2_norm_clip)
    return _tree.tree_unflatten(spec, _tree.scatter([None] * len(leaves), idx, sums)), num


def per_example_layer_norm_clip(grads: Any, global_l2_norm_clip: float | torch.Tensor,
                                uniform: bool = True) -> tuple[Any, Any]:
    """Clip each example's gradient leaf by leaf and sum them (optax's function).

    Each of the ``K`` live leaves is clipped per example as in `per_example_global_norm_clip`,
    to ``C_i = C / sqrt(K)`` (``uniform``) or ``C * sqrt(D_i / D)`` (``D_i``: the leaf's size per
    example, ``D``: their total), so the clipped per-example gradient has norm at most ``C``.

    Args:
        grads: a pytree of per-example gradients (examples in dim 0).
        global_l2_norm_clip: ``C``.
        uniform: the same clip for every leaf, or in proportion to the square root of its size.

    Returns:
        ``(clipped_sums, num_clipped)``: two trees with the params' structure, the sums and the
        per-leaf count of clipped examples (0-d int64).

    Raises:
        ValueError: a leaf without the shared example dimension.

    References:
        McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language
        Models", ICLR 2018 (arXiv 1710.06963), section 3 (per-layer clipping);
        optax.per_example_layer_norm_clip.

    Example:
        >>> per_ex = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0.1], [2.0]])}
        >>> clipped, counts = gx.per_example_layer_norm_clip(per_ex, 1.0, uniform=False)
        >>> counts
        {'w': tensor(1), 'b': tensor(1)}
    """
    leaves, spec, idx, live = _per_example_leaves(grads, "per_example_layer_norm_clip")
    k = len(live)
    sizes = [x[0].numel() for x in live]
    total = sum(sizes)
    sums, nums = [], []
    for x, d in zip(live, sizes):
        c = global_l2_norm_clip * ((1.0 / k) ** 0.5 if uniform else (d / total) ** 0.5)
        s, num = _clip_examples([x], c)
        sums.append(s[0])
        nums.append(num)
    empty = [None] * len(leaves)
    return (_tree.tree_unflatten(spec, _tree.scatter(empty, idx, sums)),
            _tree.tree_unflatten(spec, _tree.scatter(empty, idx, nums)))


def per_example_grads(loss_fn: Callable[..., torch.Tensor], *, randomness: str = "error",
                      chunk_size: int | None = None) -> Callable[..., Any]:
    """Function transform: ``loss_fn(params, batch, *args)`` -> the per-example gradients, stacked.

    ``result[leaf][n] = grad_params loss_fn(params, batch_n, *args)``, with ``batch_n`` the batch
    cut to example ``n`` (dim 0 kept, of size 1), computed as ``torch.func.vmap(torch.func.grad)``
    over the examples: ``loss_fn`` may call ``torch.func.functional_call`` on an unmodified
    module, as for `gradxform.grad_and_sum_grad_squared` (the same convention: every tensor of
    ``batch`` holds the examples in dim 0). Feed the result to `per_example_global_norm_clip` or
    `per_example_layer_norm_clip` (DP-SGD). Memory: batch x params (bound it with ``chunk_size``).

    Args:
        loss_fn: ``(params, batch, *args) -> scalar loss``.
        randomness: passed to ``torch.func.vmap`` (``"different"`` for dropout).
        chunk_size: examples per vmap chunk (``None``: all at once).

    Returns:
        ``fn(params, batch, *args)`` returning a tree with the params' structure whose leaves
        have an extra leading dim of the batch size (``None`` stays ``None``).

    Raises:
        ValueError: a batch without a shared example dimension, or a bad ``randomness``.

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv 1607.00133);
        the torch.func per-sample-gradients tutorial
        (https://pytorch.org/tutorials/intermediate/per_sample_grads.html).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> def loss_fn(params, batch):
        ...     x, y = batch
        ...     return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> per_ex = gx.per_example_grads(loss_fn)(params, (x, y))
        >>> per_ex["weight"].shape
        torch.Size([8, 2, 4])
    """
    from .persample import _batch_size, _check_engine_args

    _check_engine_args("mean", None, randomness)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, batch, *args) -> loss; got {loss_fn!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int; got {chunk_size!r}")

    def run(params: Any, batch: Any, *args: Any) -> Any:
        _batch_size(batch)
        leaves, spec = _tree.tree_flatten(params)
        idx, live = _tree.live(leaves)
        live = [x.detach() for x in live]

        def one(live_params: list[torch.Tensor], example: Any) -> torch.Tensor:
            full = _tree.tree_unflatten(spec, _tree.scatter(leaves, idx, live_params))
            ex = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
            loss = loss_fn(full, ex, *args)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("per_example_grads: loss_fn must return a scalar tensor loss")
            return loss.reshape(())

        grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0), randomness=randomness,
                                chunk_size=chunk_size)(live, batch)
        return _tree.tree_unflatten(spec, _tree.scatter([None] * len(leaves), idx, list(grads)))

    return run


_tree.register_state_types(EmaState, ParamsEmaState, LookaheadState, ApplyEveryState, ZeroNansState,
                           ConditionallyTransformState, ConditionallyMaskState, SkipIfState,
                           ReduceLROnPlateauState, EmptyState)
