"""Loss-weight updaters for multitask training: GradNorm, uncertainty weighting, DWA, fixed weights.

A network with ``T`` losses ``L_1 .. L_T`` is trained on ``sum_i w_i L_i``. Each updater here is a
`gradxform.base.GradientTransformation` whose state holds the task weights ``w`` (a ``(T,)``
tensor) and whose ``update`` moves them, given the per-task losses (and, for GradNorm, the
per-task gradient norms) as extra arguments. The network updates pass through unchanged, so an
updater sits in a chain in front of the optimizer::

    tx = gx.chain(gx.gradnorm(num_tasks=2), gx.adamw(1e-3))
    w = gx.loss_weights(state)                      # the weights of this step
    # back-propagate (w * losses).sum() -> grads; norms = per-task ||grad_W L_i||
    updates, state = tx.update(grads, state, params, losses=losses, task_grad_norms=norms)

`weighted_grad_and_task_norms` computes the gradient of the weighted loss and the per-task norms
in one call (one backward through the network plus ``T`` backward passes through the layers
above the shared tensor only); `task_grad_norms` does the same on an existing autograd
graph for ``loss.backward()`` users.

Weights are read with `loss_weights` (from a state, a chain's state or a `gradxform.Optimizer`).
Nothing here synchronises with the host: schedules (``update_every``, ``update_after``) and the
non-finite skip are ``torch.where`` selections, so every updater compiles.

Where state lives (the rule of every gradxform transform): the weights, the statistics and the
counts of data-dependent events (``skipped``: non-finite inputs; DWA's ``seen``) are on the
params' device; the counts that advance on every update (``count``, DWA's ``periods``) are 0-d
int64 CPU tensors, as torch.optim keeps ``step``, so that the schedules need no device value.
Under `gradxform.apply_if_finite` on an accelerator those counts live on the device too.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import _dist
from . import tree as _tree
from .base import GradientTransformation, Params, Updates, expect_state, recorded

__all__ = [
    "GradNormState",
    "UncertaintyWeightingState",
    "DWAState",
    "FixedWeightsState",
    "gradnorm",
    "uncertainty_weighting",
    "dwa",
    "fixed_weights",
    "loss_weights",
    "task_grad_norms",
    "weighted_grad_and_task_norms",
    "WeightedGrads",
]

log = logging.getLogger(__name__)


# --- shared helpers -----------------------------------------------------------------------------


def _check_num_tasks(num_tasks: Any) -> int:
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1; got {num_tasks!r}")
    return num_tasks


def _device_of(params: Params) -> torch.device:
    for leaf in _tree.tree_flatten(params)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _dtype_of(params: Params, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the params' floating dtype promoted to at least float32."""
    if dtype is not None:
        return dtype
    for leaf in _tree.tree_flatten(params)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return _tree.at_least_float32(leaf.dtype)
    return torch.float32


def _vector(name: str, value: Any, num_tasks: int, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a detached ``(T,)`` vector on ``like``'s device and dtype, or a clear error."""
    if value is None:
        raise ValueError(f"the extra argument '{name}' is required: a ({num_tasks},) tensor of per-task values")
    if isinstance(value, (list, tuple)):
        if len(value) and all(isinstance(v, torch.Tensor) for v in value):
            bad = [i for i, v in enumerate(value) if v.numel() != 1]
            if bad:
                raise ValueError(f"'{name}' must hold one scalar per task; entry {bad[0]} has shape "
                                 f"{tuple(value[bad[0]].shape)} (reduce each task's loss to a scalar)")
            value = torch.stack([v.reshape(()) for v in value])
        else:
            value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"'{name}' must be a tensor of shape ({num_tasks},); got {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != num_tasks:
        raise ValueError(f"'{name}' must have shape ({num_tasks},), one scalar per task; got shape "
                         f"{tuple(value.shape)}" + (" (reduce each task's loss over the batch first)"
                                                    if value.dim() > 1 else ""))
    return value.detach().to(device=like.device, dtype=like.dtype)


def _mask_vector(mask: Any, num_tasks: int) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
    if m.numel() != num_tasks:
        raise ValueError(f"mask must have {num_tasks} entries (one per task); got {m.numel()}")
    if not bool(m.any()):
        raise ValueError("mask excludes every task from balancing: at least one task must be balanced")
    return m


def _schedule_gate(count: torch.Tensor, every: int, after: int) -> torch.Tensor:
    """True on the steps where weights move: ``count >= after`` and ``(count - after) % every == 0``."""
    return (count >= after) & (torch.remainder(count - after, every) == 0)


def _ranks(group: Any = None) -> int:
    """Ranks in ``group`` under an initialised process group, else 1, **also while torch.compile
    traces** (dynamo evaluates ``get_world_size`` at trace time and bakes the number into the graph)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _mean_over_ranks(x: torch.Tensor, sync: bool, group: Any = None) -> torch.Tensor:
    """The mean of ``x`` over the ranks of ``group`` under an initialised process group, else ``x``.

    Eager: one in-place all-reduce. Under torch.compile: the functional all-reduce, which dynamo
    traces into the graph (a compiled step syncs as an eager one does, instead of silently
    computing rank-local values)."""
    world = _ranks(group) if sync else 1
    if world == 1:
        return x
    if _tree.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        dist = torch.distributed
        return funcol.all_reduce(x, "sum", group if group is not None else dist.group.WORLD) / world
    return _dist.all_reduce_sum([x], group)[0] / world


def _renormalise(w: torch.Tensor, active: torch.Tensor | None, total: torch.Tensor | float) -> torch.Tensor:
    """Scale the active weights so that they sum to ``total``; the others stay as they are."""
    if active is None:
        return w * (total / w.sum())
    act = active.to(w.device)
    s = torch.where(act, w, torch.zeros_like(w)).sum()
    return torch.where(act, w * (total / s), w)


# --- GradNorm -----------------------------------------------------------------------------------


class GradNormState(NamedTuple):
    """``weights`` ``(T,)``: the loss weights of the current step; ``initial_losses`` ``(T,)``:
    ``L_i(0)`` (zeros until recorded); ``count``: updates so far (0-d int64); ``weight_state``: the
    state of the transform that moves the weights; ``task_grad_norms`` ``(T,)``: the weighted norms
    ``G_i = w_i n_i`` of the last update (a diagnostic: their spread ``max/min`` is what GradNorm
    shrinks); ``skipped``: updates skipped because an input was not finite (0-d int64). ``count``
    is on the CPU (it advances on every update), everything else on the params' device."""

    weights: torch.Tensor
    initial_losses: torch.Tensor
    count: torch.Tensor
    weight_state: Any
    task_grad_norms: torch.Tensor
    skipped: torch.Tensor

    _gx_private_hyperparams = True  # weight_state's lr is not the param group's lr (gx.Optimizer)


@recorded
def gradnorm(
    num_tasks: int,
    alpha: float = 1.5,
    weight_tx: GradientTransformation | None = None,
    *,
    initial_losses: Sequence[float] | torch.Tensor | None = None,
    initial_losses_decay: float = 1.0,
    min_weight: float = 1e-6,
    update_every: int = 1,
    update_after: int = 0,
    mask: Sequence[bool] | torch.Tensor | None = None,
    frozen: bool = False,
    sync: bool = True,
    dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """GradNorm (Chen et al., ICML 2018, arXiv 1711.02257): learn loss weights that balance the
    tasks' gradient norms at a shared tensor ``W``.

    With ``n_i = ||grad_W L_i||`` (unweighted, the extra ``task_grad_norms``), ``L_i`` the extra
    ``losses``, ``G_i = w_i n_i``, ``Gbar = mean_i G_i``, ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``::

        L_grad   = sum_i | G_i - const(Gbar * r_i^alpha) |      (the target is held constant)
        dL/dw_i  = n_i * sign(G_i - Gbar * r_i^alpha)
        w       <- w + weight_tx(dL/dw)                          (default Adam(lr=0.025))
        w       <- T * max(w, min_weight) / sum_j max(w_j, min_weight)

    The derivative is with respect to the weights only: the network's gradient is that of
    ``sum_i w_i L_i`` with the weights of the step (the reference gradnorm-pytorch also
    back-propagates ``L_grad`` into the network; docs/loss-weighting.md). ``G_i`` is linear in ``w_i``,
    so no double backward is needed: only the ``T`` norms and losses.

    Args:
        num_tasks: ``T``.
        alpha: the restoring force; 0 balances the norms without regard to training rates.
        weight_tx: the transform that turns ``dL/dw`` into a weight update (a descent step, e.g.
            ``gx.sgd(0.1)`` for the paper's literal rule). Default ``gx.adam(0.025)``: ``dL/dw``
            scales with the gradient norms, so SGD needs a per-problem learning rate.
        initial_losses: known ``L_i(0)`` (e.g. ``log C`` for a C-class cross-entropy); by default
            the losses of the first update are recorded.
        initial_losses_decay: below 1, ``L_i(0)`` is an EMA of the losses of the updates that
            move the weights (``L0 <- d L0 + (1-d) L``), as the reference's option.
        min_weight: a floor before renormalisation, so that no weight reaches 0 or below.
        update_every: move the weights only on updates ``k`` with ``k >= update_after`` and
            ``(k - update_after) % update_every == 0`` (0-based count).
        update_after: see ``update_every``.
        mask: tasks to balance (``True``) and tasks whose weight stays fixed (``False``); ``Gbar``,
            the mean training rate and the renormalisation use the balanced tasks only, which
            keep the sum of their weights.
        frozen: never move the weights (an A/B switch); ``L_i(0)`` is still recorded.
        sync: under ``torch.distributed`` (initialised, more than one rank) average ``losses``
            over the ranks, so that every rank computes the same weights; eagerly with one
            all-reduce, under ``torch.compile`` with the functional all-reduce traced into the
            graph (the world size is read while tracing). The norms
            must be those of the global per-task gradients: `task_grad_norms` and
            `weighted_grad_and_task_norms` average the per-task gradients before the norm.
        dtype: dtype of the weights and statistics (default: the params' floating dtype, at least
            float32).

    Extra arguments of ``update``: ``losses`` and ``task_grad_norms``, ``(T,)`` each (a list of
    scalars is accepted). An update whose losses or norms are not all finite leaves the weights
    and ``L_i(0)`` unchanged and counts it in ``state.skipped`` (no host sync). Updates pass
    through unchanged.

    Returns:
        A `GradientTransformation` whose state is `GradNormState` (read the weights with
        `loss_weights`); ``update`` needs the extra arguments ``losses`` and
        ``task_grad_norms``.

    Raises:
        ValueError: ``num_tasks`` or a step argument not a valid int, ``alpha`` not finite
            and >= 0, ``initial_losses_decay`` outside [0, 1], ``min_weight < 0``, or bad
            ``initial_losses`` / ``mask``.
        TypeError: ``update`` without ``losses`` or ``task_grad_norms``.

    References:
        Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
        Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257, Section 3.
        docs/loss-weighting.md.

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = gx.gradnorm(2, weight_tx=gx.sgd(0.1))
        >>> state = tx.init(params)
        >>> _, state = tx.update({"w": torch.ones(2)}, state, params,
        ...                      losses=torch.tensor([2.0, 8.0]), task_grad_norms=torch.tensor([1.0, 5.0]))
        >>> gx.loss_weights(state)
        tensor([1.3750, 0.6250])
    """
    t = _check_num_tasks(num_tasks)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0; got {alpha!r}")
    if not 0.0 <= initial_losses_decay <= 1.0:
        raise ValueError(f"initial_losses_decay must be in [0, 1]; got {initial_losses_decay!r}")
    if not (isinstance(min_weight, (int, float)) and min_weight >= 0):
        raise ValueError(f"min_weight must be >= 0; got {min_weight!r}")
    for name, v, low in (("update_every", update_every, 1), ("update_after", update_after, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    if weight_tx is None:
        from .alias import adam

        weight_tx = adam(0.025)
    active = _mask_vector(mask, t)
    given_l0 = None
    if initial_losses is not None:
        given_l0 = torch.as_tensor(initial_losses, dtype=torch.float64).reshape(-1)
        if given_l0.numel() != t or not bool(torch.isfinite(given_l0).all()) or bool((given_l0 <= 0).any()):
            raise ValueError(f"initial_losses must be {t} finite positive numbers; got {initial_losses!r}")

    def init(params: Params) -> GradNormState:
        dev = _device_of(params)
        w = torch.ones(t, dtype=_dtype_of(params, dtype), device=dev)
        l0 = given_l0.to(dtype=_dtype_of(params, dtype), device=dev) if given_l0 is not None else torch.zeros(t, dtype=_dtype_of(params, dtype), device=dev)
        return GradNormState(w, l0, torch.zeros((), dtype=torch.int64), weight_tx.init(w),
                             torch.zeros(t, dtype=_dtype_of(params, dtype), device=dev), torch.zeros((), dtype=torch.int64, device=dev))

    def update(updates: Updates, state: GradNormState, params: Params | None = None, *,
               losses: Any, task_grad_norms: Any) -> tuple[Updates, GradNormState]:
        del params
        expect_state(state, GradNormState, "gradnorm")
        w = state.weights
        loss = _mean_over_ranks(_vector("losses", losses, t, w), sync)
        n = _vector("task_grad_norms", task_grad_norms, t, w)
        finite = torch.isfinite(loss).all() & torch.isfinite(n).all()
        move_cpu = _schedule_gate(state.count, update_every, update_after)  # CPU counter: no sync
        move = move_cpu.to(w.device) & finite
        # L_i(0): the losses of the first finite update, unless given.
        old_l0 = state.initial_losses
        if given_l0 is None:
            l0 = torch.where((old_l0 == 0).all(), loss, old_l0)
        else:
            l0 = old_l0
        if initial_losses_decay < 1.0:
            l0 = torch.where(move & (old_l0 != 0).all(), old_l0.lerp(loss, 1.0 - initial_losses_decay), l0)
        act = None if active is None else active.to(w.device)
        g = w * n
        inv_rate = torch.where(l0 > 0, loss / l0, torch.ones_like(loss))
        if act is None:
            g_bar = g.mean()
            r = inv_rate / inv_rate.mean()
        else:
            k = act.sum()
            g_bar = torch.where(act, g, torch.zeros_like(g)).sum() / k
            r = inv_rate / (torch.where(act, inv_rate, torch.zeros_like(inv_rate)).sum() / k)
        target = g_bar * r.clamp_min(0) ** alpha
        dw = n * torch.sign(g - target)
        if act is not None:
            dw = torch.where(act, dw, torch.zeros_like(dw))
        # a non-finite input must not reach the weight optimizer's moments
        dw = torch.where(finite, dw, torch.zeros_like(dw))
        # pure (weighting transforms declare no owned update): the old state stays selectable below
        delta, new_wstate = weight_tx.update(dw, state.weight_state, w)
        new_w = (w + delta).clamp_min(min_weight)
        total = float(t) if act is None else torch.where(act, w, torch.zeros_like(w)).sum()
        new_w = _renormalise(new_w, act, total)

        def gate(new: Any, old: Any) -> Any:
            if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor) or new.shape != old.shape:
                return new
            if new.device == w.device:
                return torch.where(move, new, old)
            if new is old:  # a CPU scalar the step left alone (a constant hyperparameter)
                return new
            # CPU counters follow the schedule only (a device flag would cost a sync); a 0-d CPU
            # tensor mixes with a device schedule flag (a count on the device under
            # apply_if_finite) as a scalar, so no operand is copied to the host
            if new.device == move_cpu.device or new.ndim == 0:
                return torch.where(move_cpu, new, old)
            return torch.where(move_cpu.to(new.device), new, old)

        if frozen:
            weights, wstate = w, state.weight_state
        else:
            weights, wstate = torch.where(move, new_w, w), _tree.tree_map(gate, new_wstate, state.weight_state)
        new_state = GradNormState(
            weights, torch.where(finite, l0, old_l0), state.count + 1, wstate,
            torch.where(finite, g, state.task_grad_norms), state.skipped + (~finite).to(torch.int64),
        )
        return updates, new_state

    return GradientTransformation(init, update)


# --- uncertainty weighting ----------------------------------------------------------------------


class UncertaintyWeightingState(NamedTuple):
    """``weights`` ``(T,)`` = ``exp(-log_vars)``; ``log_vars`` ``(T,)``: ``s_i = log sigma_i^2``;
    ``count``; ``weight_state``: the state of the transform that moves ``s``; ``skipped``."""

    weights: torch.Tensor
    log_vars: torch.Tensor
    count: torch.Tensor
    weight_state: Any
    skipped: torch.Tensor

    _gx_private_hyperparams = True  # weight_state's lr is not the param group's lr (gx.Optimizer)


@recorded
def uncertainty_weighting(
    num_tasks: int,
    weight_tx: GradientTransformation | None = None,
    *,
    initial_log_vars: Sequence[float] | torch.Tensor | None = None,
    sync: bool = True,
    dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, arXiv 1705.07115).

    Each task has a learned log-variance ``s_i``; the objective is
    ``sum_i exp(-s_i) L_i + s_i``, so the network is trained on ``sum_i w_i L_i`` with
    ``w_i = exp(-s_i)`` and ``s`` descends::

        dJ/ds_i = 1 - exp(-s_i) L_i ;     s <- s + weight_tx(dJ/ds)    (default Adam(lr=1e-3))

    (the common form with ``s = log sigma^2``; the paper's regression form has factors 1/2 on
    both terms, i.e. the same optimum). At the optimum ``w_i = 1 / L_i``. ``initial_log_vars``
    defaults to zeros (weights 1). Extra argument ``losses`` ``(T,)``; ``task_grad_norms`` is
    accepted and ignored, so the updaters are interchangeable. Non-finite losses skip the update.

    Args:
        num_tasks: the number of tasks ``T``.
        weight_tx: the optimizer of the log-variances (default Adam(lr=1e-3)).
        initial_log_vars: the initial ``s`` (default zeros).
        sync: average the losses over the ranks of the default process group.
        dtype: dtype of the log-variances (default: the params' floating dtype, at least float32).

    Returns:
        A `GradientTransformation` (read the weights with `loss_weights`); ``update`` needs
        the extra argument ``losses``.

    Raises:
        ValueError: bad ``num_tasks`` or ``initial_log_vars``.
        TypeError: ``update`` without ``losses``.

    References:
        Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
        Scene Geometry and Semantics", CVPR 2018, arXiv:1705.07115. docs/loss-weighting.md.

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = gx.uncertainty_weighting(2)
        >>> _, state = tx.update({"w": torch.ones(2)}, tx.init(params), params, losses=torch.tensor([1.0, 4.0]))
        >>> gx.loss_weights(state)  # task 1 is at its optimum w = 1/L; task 2's weight falls
        tensor([1.0000, 0.9990])
    """
    t = _check_num_tasks(num_tasks)
    if weight_tx is None:
        from .alias import adam

        weight_tx = adam(1e-3)
    s0 = None
    if initial_log_vars is not None:
        s0 = torch.as_tensor(initial_log_vars, dtype=torch.float64).reshape(-1)
        if s0.numel() != t or not bool(torch.isfinite(s0).all()):
            raise ValueError(f"initial_log_vars must be {t} finite numbers; got {initial_log_vars!r}")

    def init(params: Params) -> UncertaintyWeightingState:
        dev = _device_of(params)
        s = s0.to(dtype=_dtype_of(params, dtype), device=dev) if s0 is not None else torch.zeros(t, dtype=_dtype_of(params, dtype), device=dev)
        return UncertaintyWeightingState(torch.exp(-s), s, torch.zeros((), dtype=torch.int64), weight_tx.init(s),
                                         torch.zeros((), dtype=torch.int64, device=dev))

    def update(updates: Updates, state: UncertaintyWeightingState, params: Params | None = None, *,
               losses: Any, task_grad_norms: Any = None) -> tuple[Updates, UncertaintyWeightingState]:
        del params, task_grad_norms
        expect_state(state, UncertaintyWeightingState, "uncertainty_weighting")
        s = state.log_vars
        loss = _mean_over_ranks(_vector("losses", losses, t, s), sync)
        finite = torch.isfinite(loss).all()
        grad = torch.where(finite, 1.0 - torch.exp(-s) * loss, torch.zeros_like(s))
        delta, new_wstate = weight_tx.update(grad, state.weight_state, s)
        new_s = torch.where(finite, s + delta, s)
        wstate = _tree.tree_map(lambda a, b: torch.where(finite, a, b) if isinstance(a, torch.Tensor)
                                and a.device == s.device and a.shape == b.shape else a, new_wstate, state.weight_state)
        return updates, UncertaintyWeightingState(torch.exp(-new_s), new_s, state.count + 1, wstate,
                                                  state.skipped + (~finite).to(torch.int64))

    return GradientTransformation(init, update)


# --- dynamic weight average ---------------------------------------------------------------------


class DWAState(NamedTuple):
    """``weights`` ``(T,)``; ``loss_sum`` ``(T,)``: the losses of the current period so far;
    ``last``, ``before_last`` ``(T,)``: the mean losses of the last two complete periods;
    ``count``: updates (0-d int64); ``periods``: complete periods (0-d int64); ``seen``: finite
    updates in the current period (0-d int64, on the weights' device)."""

    weights: torch.Tensor
    loss_sum: torch.Tensor
    last: torch.Tensor
    before_last: torch.Tensor
    count: torch.Tensor
    periods: torch.Tensor
    seen: torch.Tensor


@recorded
def dwa(num_tasks: int, temperature: float = 2.0, period: int = 1, *, sync: bool = True,
        dtype: torch.dtype | None = None) -> GradientTransformation:
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-end multi-task learning with
    attention", CVPR 2019, arXiv 1803.10704).

    With ``Lbar_i(k)`` the mean loss of task ``i`` over period ``k`` (``period`` updates, e.g. an
    epoch's worth of steps; non-finite losses are left out of the mean)::

        w(k+1) = T * softmax(r(k) / temperature),   r_i(k) = Lbar_i(k) / Lbar_i(k-1)

    and ``w = 1`` during the first two periods. The weights change only at the end of a period.
    Extra argument ``losses`` ``(T,)``; ``task_grad_norms`` is accepted and ignored.

    Args:
        num_tasks: the number of tasks ``T``.
        temperature: the softmax temperature (> 0).
        period: the number of updates per period (>= 1).
        sync: average the losses over the ranks of the default process group.
        dtype: dtype of the statistics (default: the params' floating dtype, at least float32).

    Returns:
        A `GradientTransformation` (read the weights with `loss_weights`); ``update`` needs
        the extra argument ``losses``.

    Raises:
        ValueError: bad ``num_tasks``, ``temperature`` or ``period``.
        TypeError: ``update`` without ``losses``.

    References:
        Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
        arXiv:1803.10704 (Dynamic Weight Average). docs/loss-weighting.md.

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = gx.dwa(2)
        >>> state = tx.init(params)
        >>> for losses in ([1.0, 1.0], [1.0, 1.0], [0.5, 1.0]):
        ...     _, state = tx.update({"w": torch.ones(2)}, state, params, losses=torch.tensor(losses))
        >>> gx.loss_weights(state)  # task 0's loss fell by half: 2 softmax((0.5, 1) / 2)
        tensor([0.8756, 1.1244])
    """
    t = _check_num_tasks(num_tasks)
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"period must be an int >= 1; got {period!r}")

    def init(params: Params) -> DWAState:
        dev = _device_of(params)
        z = torch.zeros(t, dtype=_dtype_of(params, dtype), device=dev)
        zero = torch.zeros((), dtype=torch.int64)
        return DWAState(torch.ones(t, dtype=_dtype_of(params, dtype), device=dev), z, z.clone(), z.clone(), zero, zero.clone(),
                        torch.zeros((), dtype=torch.int64, device=dev))

    def update(updates: Updates, state: DWAState, params: Params | None = None, *,
               losses: Any, task_grad_norms: Any = None) -> tuple[Updates, DWAState]:
        del params, task_grad_norms
        expect_state(state, DWAState, "dwa")
        w = state.weights
        loss = _mean_over_ranks(_vector("losses", losses, t, w), sync)
        finite = torch.isfinite(loss).all()
        loss_sum = state.loss_sum + torch.where(finite, loss, torch.zeros_like(loss))
        seen = state.seen + finite.to(torch.int64)
        end = (state.count + 1) % period == 0  # CPU counter
        end_d = end.to(w.device)
        mean = loss_sum / seen.clamp_min(1).to(loss_sum.dtype)
        last = torch.where(end_d, mean, state.last)
        before = torch.where(end_d, state.last, state.before_last)
        periods = state.periods + end.to(torch.int64)
        ratio = last / torch.where(before > 0, before, torch.ones_like(before))
        new_w = t * torch.softmax(ratio / temperature, dim=0)
        weights = torch.where(end_d & (periods >= 2).to(w.device), new_w, w)
        zeros = torch.zeros_like(loss_sum)
        return updates, DWAState(weights, torch.where(end_d, zeros, loss_sum), last, before, state.count + 1, periods,
                                 torch.where(end_d, torch.zeros_like(seen), seen))

    return GradientTransformation(init, update)


# --- fixed weights ------------------------------------------------------------------------------


class FixedWeightsState(NamedTuple):
    """State of `fixed_weights`: ``weights``, the constant ``(T,)`` loss weights."""

    weights: torch.Tensor


@recorded
def fixed_weights(weights: Sequence[float] | torch.Tensor, *, dtype: torch.dtype | None = None) -> GradientTransformation:
    """Constant loss weights (the equal-weights baseline: ``fixed_weights([1.0] * T)``).

    ``w_t = w_0`` for every update. Accepts and ignores the extra arguments ``losses`` and
    ``task_grad_norms`` (``losses`` is checked to have ``T`` entries when given), so that it can
    replace any other updater in a chain without changing the call. Updates pass through
    unchanged.

    Args:
        weights: the ``T`` weights (finite, >= 0).
        dtype: dtype of the stored weights (default: the params' floating dtype, at least
            float32).

    Returns:
        A `GradientTransformation` whose state is `FixedWeightsState` (read the weights with
        `loss_weights`).

    Raises:
        ValueError: no weight, or a weight that is negative or not finite; ``update`` with
            ``losses`` of another length.

    References:
        The equal-weights baseline of Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm:
        Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018,
        arXiv:1711.02257. docs/loss-weighting.md.

    Example:
        >>> tx = gx.fixed_weights([1.0, 0.5])
        >>> gx.loss_weights(tx.init({"w": torch.zeros(2)}))
        tensor([1.0000, 0.5000])
    """
    w0 = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w0.numel() < 1 or not bool(torch.isfinite(w0).all()) or bool((w0 < 0).any()):
        raise ValueError(f"weights must be one or more finite numbers >= 0; got {weights!r}")

    def init(params: Params) -> FixedWeightsState:
        return FixedWeightsState(w0.to(dtype=_dtype_of(params, dtype), device=_device_of(params)))

    def update(updates: Updates, state: FixedWeightsState, params: Params | None = None, *,
               losses: Any = None, task_grad_norms: Any = None) -> tuple[Updates, FixedWeightsState]:
        del params, task_grad_norms
        expect_state(state, FixedWeightsState, "fixed_weights")
        if losses is not None:
            _vector("losses", losses, state.weights.shape[0], state.weights)
        return updates, state

    return GradientTransformation(init, update)


# --- reading the weights ------------------------------------------------------------------------

_WEIGHT_STATES = (GradNormState, UncertaintyWeightingState, DWAState, FixedWeightsState)


def loss_weights(source: Any) -> torch.Tensor:
    """The current loss weights ``(T,)`` held in ``source``: the state of a loss-weight updater, a
    state that contains one (a chain's, `gradxform.inject_hyperparams`'s, ...), or a
    `gradxform.Optimizer` (its first param group; initialised if it has not stepped yet).

    Args:
        source: a transform state or a `gradxform.Optimizer`.

    Returns:
        The weights, a ``(T,)`` tensor (the state's own: clone it before writing).

    Raises:
        ValueError: ``source`` holds no loss-weight state (`gradnorm`, `uncertainty_weighting`,
            `dwa`, `fixed_weights`), or more than one.

    References:
        Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
        Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257, Section 3 (the
        weights ``w_i(t)``). docs/loss-weighting.md.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.chain(gx.gradnorm(2), gx.sgd(0.1)))
        >>> gx.loss_weights(opt)  # equal before the first step
        tensor([1., 1.])
    """
    tx_state = getattr(source, "tx_state", None)
    if callable(tx_state):  # a gradxform.Optimizer: the state of its first param group
        source = tx_state(0)
    found: list[torch.Tensor] = []

    def walk(node: Any) -> None:
        if isinstance(node, _WEIGHT_STATES):
            found.append(node.weights)
            return
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (tuple, list)):
            for v in node:
                walk(v)

    walk(source)
    if not found:
        raise ValueError("no loss-weight state (gradnorm, uncertainty_weighting, dwa, fixed_weights) in this state")
    if len(found) > 1:
        raise ValueError(f"{len(found)} loss-weight states in this state: read the one you mean directly")
    return found[0]


# --- per-task gradient norms --------------------------------------------------------------------


def _per_task_grads(losses: torch.Tensor, shared: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    """``(T, *shared.shape)``: the gradient of each task's loss at ``shared``, one backward pass per
    task through the part of the graph between that loss and ``shared`` only.

    (A single batched pass with ``is_grads_batched`` would push every one-hot vector through every
    task's head, ``T^2`` head backwards; measured slower on CPU for T = 2..8.)
    """
    t = losses.shape[0]
    rows = []
    for i in range(t):
        (gi,) = torch.autograd.grad(losses[i], [shared], retain_graph=retain_graph or i < t - 1, allow_unused=True)
        rows.append(torch.zeros_like(shared) if gi is None else gi)
    return torch.stack(rows)


def _check_losses(losses: Any) -> torch.Tensor:
    if isinstance(losses, (list, tuple)):
        bad = [i for i, v in enumerate(losses) if not isinstance(v, torch.Tensor) or v.numel() != 1]
        if bad:
            raise ValueError(f"losses must be one scalar tensor per task; entry {bad[0]} is not")
        losses = torch.stack([v.reshape(()) for v in losses])
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise ValueError("losses must be a (T,) tensor of per-task scalar losses; got "
                         + (f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__))
    return losses


def task_grad_norms(losses: Any, shared: torch.Tensor, *, retain_graph: bool = True,
                    group: Any = None) -> torch.Tensor:
    """``n_i = ||grad_shared L_i||_2`` for each task, on an existing autograd graph (the
    ``loss.backward()`` route; call it before back-propagating the weighted loss, or keep
    ``retain_graph=True``).

    ``shared`` is the tensor GradNorm compares at: a parameter (the paper: the last shared layer's
    weight) or a shared activation. Each of the ``T`` gradients runs the backward only through the
    layers between that task's loss and ``shared``, not through the trunk below it.

    Under ``torch.distributed`` the norms are those of the global batch (the losses being means
    over each rank's ``n_r`` examples): at a parameter (a leaf tensor) the per-task gradients are
    averaged over the ranks of ``group`` before the norm; at an activation (batch in dim 0, each
    rank holding its own examples' rows) ``n_i^2 = sum_r (n_r / N)^2 ||grad_r||^2``.

    Args:
        losses: the ``(T,)`` task losses (or a list of scalar tensors), on the autograd graph.
        shared: the tensor the norms are taken at (requires grad).
        retain_graph: keep the graph after the last task's backward (needed to back-propagate
            the weighted loss afterwards).
        group: the process group (default: the world).

    Returns:
        The ``(T,)`` norms (detached).

    Raises:
        ValueError: ``losses`` is not a ``(T,)`` vector of scalars; ``shared`` does not require
            grad; a 0-d shared activation under ``torch.distributed``.

    References:
        Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
        Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257, Section 3
        (``G_W^(i)``). docs/loss-weighting.md.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> losses = torch.stack([(w * w).sum(), (3 * w).sum()])
        >>> gx.task_grad_norms(losses, w)  # ||2w||, ||(3, 3)||
        tensor([4.4721, 4.2426])
    """
    losses = _check_losses(losses)
    if not isinstance(shared, torch.Tensor) or not shared.requires_grad:
        raise ValueError("shared must be a tensor that is part of the losses' autograd graph (requires_grad)")
    g = _per_task_grads(losses, shared, retain_graph).detach()
    if shared.is_leaf:
        return _mean_over_ranks(g, True, group).flatten(1).norm(dim=1)
    if _ranks(group) == 1:
        return g.flatten(1).norm(dim=1)
    if shared.ndim == 0:
        raise ValueError("a shared activation must have the batch in dim 0 (got a 0-d tensor)")
    share = _dist.share_of_examples(shared.shape[0], g.device, group)
    sq = _dist.all_reduce_sum([g.flatten(1).double().square().sum(dim=1) * share**2], group)[0]
    return sq.sqrt().to(g.dtype)


class WeightedGrads(NamedTuple):
    """What `weighted_grad_and_task_norms` returns: ``loss``: ``sum_i w_i L_i`` (detached);
    ``losses`` ``(T,)`` (detached); ``grads``: the gradient of ``loss`` shaped like params;
    ``task_grad_norms`` ``(T,)``: ``||grad_shared L_i||``; ``aux``."""

    loss: torch.Tensor
    losses: torch.Tensor
    grads: Any
    task_grad_norms: torch.Tensor
    aux: Any


def weighted_grad_and_task_norms(
    losses_fn: Callable[..., Any],
    shared: str | None,
    *,
    has_aux: bool = False,
    group: Any = None,
) -> Callable[..., WeightedGrads]:
    """Function transform for GradNorm-style training: ``losses_fn(params, batch, *args)``, which
    returns the ``(T,)`` vector of task losses, becomes ``f(params, batch, weights, *args)`` that
    returns the gradient of ``sum_i w_i L_i`` for all params and the unweighted per-task norms
    ``n_i = ||grad_W L_i||`` at the shared tensor ``W``, in one call.

    ``shared``: the pytree path of ``W`` in params (as `gradxform.tree.tree_paths` writes it, e.g.
    ``"trunk.6.weight"`` for a ``named_parameters`` dict), or ``None`` for a shared *activation*:
    then ``losses_fn`` returns ``(losses, activation)`` (``(losses, activation, aux)`` with
    ``has_aux``) and the norms are taken at that activation.

    Cost: one forward, one backward for the weighted loss, and ``T`` backward passes through the
    layers above ``W`` only (each task's head and the layer that owns ``W``), not through the trunk.
    Under ``torch.distributed`` the per-task gradients at ``W`` are averaged over the ranks before
    the norms (``group``); the params' gradients are this rank's (average them as usual).

    Args:
        losses_fn: ``(params, batch, *args) -> losses`` (``(T,)``), or a tuple as above.
        shared: the path of ``W`` in params, or ``None`` for a shared activation.
        has_aux: ``losses_fn`` also returns an auxiliary value (passed through as ``aux``).
        group: the process group (default: the world).

    Returns:
        ``f(params, batch, weights, *args)`` returning a `WeightedGrads` (``loss``, ``losses``,
        ``grads``, ``task_grad_norms``, ``aux``).

    Raises:
        TypeError: ``losses_fn`` is not callable, ``shared`` is neither a str nor ``None``; (in
            ``f``) ``losses_fn`` returns another shape of tuple than ``shared``/``has_aux`` say.
        KeyError: (in ``f``) ``shared`` is not a path of params.
        ValueError: (in ``f``) ``shared`` is a frozen leaf; ``weights`` of another length than the
            losses.

    References:
        Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
        Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257, Section 3.
        docs/loss-weighting.md.

    Example:
        >>> p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
        >>> def losses_fn(p, batch):
        ...     return torch.stack([(p["a"] * batch).sum(), p["a"].sum() * p["b"].sum()])
        >>> f = gx.weighted_grad_and_task_norms(losses_fn, "a")
        >>> out = f(p, torch.ones(2), torch.tensor([1.0, 0.5]))
        >>> out.grads["a"], out.task_grad_norms
        (tensor([2.5000, 2.5000]), tensor([1.4142, 4.2426]))
    """
    if not callable(losses_fn):
        raise TypeError(f"losses_fn must be callable (params, batch, *args) -> (T,) losses; got {losses_fn!r}")
    if shared is not None and not isinstance(shared, str):
        raise TypeError(f"shared must be a params path (str) or None (a shared activation); got {shared!r}")

    def run(params: Any, batch: Any, weights: Any, *args: Any, **kwargs: Any) -> WeightedGrads:
        leaves, spec = _tree.tree_flatten(params)
        paths = _tree.tree_paths(params)
        live = [i for i, x in enumerate(leaves) if x is not None]
        work = [leaves[i].detach().requires_grad_(True) for i in live]
        full = _tree.scatter(leaves, live, work)
        w_shared = None
        if shared is not None:
            if shared not in paths:
                raise KeyError(f"shared={shared!r} is not a path of params; paths are {paths}")
            w_shared = full[paths.index(shared)]
            if w_shared is None:
                raise ValueError(f"shared={shared!r} is a frozen (None) leaf")
        with torch.enable_grad():
            out = losses_fn(_tree.tree_unflatten(spec, full), batch, *args, **kwargs)
            aux = None
            if shared is None:
                if not isinstance(out, tuple) or len(out) != (3 if has_aux else 2):
                    raise TypeError("with shared=None, losses_fn must return (losses, shared_activation"
                                    + (", aux)" if has_aux else ")"))
                losses, w_shared = out[0], out[1]
                aux = out[2] if has_aux else None
            elif has_aux:
                if not isinstance(out, tuple) or len(out) != 2:
                    raise TypeError("has_aux=True: losses_fn must return (losses, aux)")
                losses, aux = out
            else:
                losses = out
            losses = _check_losses(losses)
            w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device).detach()
            if w.shape != losses.shape:
                raise ValueError(f"weights have shape {tuple(w.shape)} but losses_fn returned {losses.shape[0]} losses")
            norms = task_grad_norms(losses, w_shared, retain_graph=True, group=group)
            total = (w * losses).sum()
            grads = torch.autograd.grad(total, work, allow_unused=True)
        out_leaves = _tree.scatter([None] * len(leaves), live,
                                   [torch.zeros_like(x) if g is None else g for x, g in zip(work, grads)])
        return WeightedGrads(total.detach(), losses.detach(), _tree.tree_unflatten(spec, out_leaves), norms, aux)

    return run

_tree.register_state_types(GradNormState, UncertaintyWeightingState, DWAState, FixedWeightsState)
