"""Clipped Stochastic Similar Triangles Method and iterate-averaging restarts.

- `clipped_sstm`: clipped-SSTM of Gorbunov, Danilova and Gasnikov, "Stochastic Optimization
  with Heavy-Tailed Noise via Accelerated Gradient Clipping" (NeurIPS 2020), in the
  Hölder-smooth form (exponent ``nu``) of torch-clip, as a *terminal* transform: it returns the
  displacement ``x_next - params`` and must not be followed by ``scale(-lr)``.
- `with_restarts`: torch-clip's ``Restarter`` as a combinator over any transform: every
  ``period + 1`` steps the params move to the mean of the iterates since the last restart and the
  inner state is re-initialised there (with `clipped_sstm` inside, this is the restarted method
  R-clipped-SSTM of the same paper).

See docs/clipping.md ("Clipped SSTM and restarts") for the algorithms and for the reference's
behaviours that are not reproduced (its table, rows 3 and 9).
Scalar state lives in 0-d CPU tensors; ``update`` has no host sync
and compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import GradientTransformation, Ownership, Params, Updates, call_update, expect_state, owned_transform, recorded
from .clipping import clip_leaves
from .combine import _forwarding_transform
from .transforms import _Flat, check_float, to_float

__all__ = [
    "SSTM_RULES",
    "ClippedSSTMState",
    "clipped_sstm",
    "RestartsState",
    "with_restarts",
]

#: Clipping rules that `clipped_sstm` accepts (constant-level rules of `clip_leaves`).
SSTM_RULES = ("norm", "layer_wise", "coordinate_wise")


# --- scalar helpers: Python numbers in eager mode, 0-d tensors under torch.compile ---------------


def _f64(x: Any) -> Any:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else float(x)


def _minimum(x: Any, y: Any) -> Any:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return torch.minimum(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64))
    return min(x, y)


def _combine(x: list[torch.Tensor], a: Any, y: Sequence[torch.Tensor], b: Any, inplace: bool) -> list[torch.Tensor]:
    """``a * x + b * y`` leaf by leaf (written into ``x`` when ``inplace``)."""
    if inplace:
        _fe.mul_(x, a)
        out = x
    else:
        out = list(_fe.mul(x, a))
    if isinstance(b, torch.Tensor):
        _fe.add_(out, _fe.mul(list(y), b))
    else:
        _fe.add_(out, list(y), alpha=b)
    return out


def _axpy(x: list[torch.Tensor], y: Sequence[torch.Tensor], b: Any, inplace: bool) -> list[torch.Tensor]:
    """``x + b * y`` leaf by leaf (written into ``x`` when ``inplace``)."""
    if isinstance(b, torch.Tensor):
        by = _fe.mul(list(y), b)
        if inplace:
            _fe.add_(x, by)
            return x
        return list(_fe.add(x, by))
    if inplace:
        _fe.add_(x, list(y), alpha=b)
        return x
    return list(_fe.add(x, list(y), alpha=b))


# --- clipped SSTM -------------------------------------------------------------------------------


class ClippedSSTMState(NamedTuple):
    """State of `clipped_sstm`.

    ``k``: updates so far (0-d int64 CPU). ``A_k``: the (possibly ratio-clamped) weight that
    formed the current point, so that the current params are
    ``x = (A_k y + alpha_{k+1} z) / (A_k + alpha_{k+1})`` (0-d float64 CPU; 0 after init).
    ``y``, ``z``: the two auxiliary sequences (params-shaped; ``y = z = params`` after init).
    Diagnostics of the last update: ``alpha`` = the step ``alpha_k`` it used and ``lam`` = its
    clipping level ``B / alpha_k`` (0-d float64 CPU; 0 before the first update).
    """

    k: torch.Tensor
    A_k: torch.Tensor
    y: Any
    z: Any
    alpha: torch.Tensor
    lam: torch.Tensor


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


@recorded
def clipped_sstm(
    a: float | torch.Tensor,
    L: float | torch.Tensor,
    B: float | torch.Tensor | None,
    nu: float | torch.Tensor = 1.0,
    clip: str = "norm",
    ratio_upper_bound: float | torch.Tensor = 1.0,
    index_offset: int = 1,
    clip_start: int | None = None,
) -> GradientTransformation:
    """Clipped Stochastic Similar Triangles Method (clipped-SSTM), a terminal transform.

    Gorbunov, Danilova, Gasnikov, "Stochastic Optimization with Heavy-Tailed Noise via
    Accelerated Gradient Clipping", NeurIPS 2020 (Algorithm 1), in torch-clip's Hölder-smooth
    form. With ``o = index_offset``, ``A_0 = 0``, ``y_0 = z_0 = x_0 = params`` and ``k = 0, 1, ...``,
    the update that receives ``g = grad f(x_{k+1})`` (``x_1 = x_0``) does::

        alpha_{k+1} = (k + o)^(2 nu / (1 + nu)) / (2 a L)      A_{k+1} = A_k + alpha_{k+1}
        lam_{k+1}   = B / alpha_{k+1}
        z_{k+1}     = z_k - alpha_{k+1} * clip(g, lam_{k+1})
        y_{k+1}     = (A_k y_k + alpha_{k+1} z_{k+1}) / A_{k+1}
        A_{k+1}     <- min(A_{k+1}, r / (1 - r) * alpha_{k+2})          (only when r < 1)
        x_{k+2}     = (A_{k+1} y_{k+1} + alpha_{k+2} z_{k+1}) / (A_{k+1} + alpha_{k+2})

    and returns ``x_{k+2} - params``; the clamped ``A_{k+1}`` is stored. ``clip`` is
    ``"norm"`` (global norm), ``"layer_wise"`` (per leaf) or ``"coordinate_wise"``
    (elementwise clamp), see `gradxform.clipping.clip_leaves`.

    Args:
      a: step-size parameter ``a > 0`` (torch-clip's ``lr`` is ``1 / a``).
      L: smoothness constant ``L > 0``.
      B: clipping parameter ``B > 0`` (torch-clip's ``clipping_level``); ``None`` with
        ``clip_start``.
      nu: Hölder exponent in ``[0, 1]`` (1: Lipschitz gradient, ``alpha_{k+1} = (k+o)/(2aL)``).
      clip: the clipping rule.
      ratio_upper_bound: ``r`` in ``(0, 1]``; ``r < 1`` caps ``A_k / A_{k+1}`` at ``r`` (the
        method otherwise becomes very conservative late in a run).
      index_offset: ``o``: 1 as torch-clip (``alpha_1 = 1/(2aL)``), 2 as the paper's
        Algorithm 1 is recalled (``alpha_1 = 2^(2nu/(1+nu))/(2aL)``; not checked against the paper).
      clip_start: ``k_s >= 1`` (norm rule, ``nu > 0``): choose ``B = (k_s + o)^(2nu/(1+nu))/(2aL)``,
        so that ``lam = 1`` at update ``k_s + 1`` and the level falls below 1 after it. Give
        ``B=None`` with it.

    ``a``, ``L``, ``B``, ``nu`` and ``ratio_upper_bound`` may be numbers or 0-d tensors, so
    ``inject_hyperparams(clipped_sstm, static_args=("index_offset", "clip_start"))`` puts them in
    the state (``clip`` is static anyway).

    Unlike torch-clip's ``ClippedSSTM`` (docs/clipping.md, torch-clip table, row 9) the first call's gradient
    is used, so our params after call ``k`` are the reference's after call ``k + 1``; the ratio
    clamp tests ``A_k > r/(1-r) alpha`` (the reference tests ``A_k > alpha/(1-r)``); scalar
    state is per transform, not shared across param groups. The method's ``k``, ``A_k`` are
    global; a leaf whose update is ``None`` in a call is frozen for that call (its ``y``, ``z``
    stay, its update stays ``None``).

    Returns:
        A terminal `GradientTransformation` (no ``scale(-lr)`` after it) whose state is
        `ClippedSSTMState`; ``update`` needs ``params``.

    Raises:
        TypeError: a hyperparameter is not a number or a 0-d tensor.
        ValueError: ``a`` or ``L`` not > 0, ``nu`` outside [0, 1], ``ratio_upper_bound``
            outside (0, 1], an unknown ``clip``, ``index_offset`` not 1 or 2, ``B`` and
            ``clip_start`` both or neither given, or ``clip_start`` with another rule or ``nu = 0``.

    References:
        Gorbunov, Danilova and Gasnikov, "Stochastic Optimization with Heavy-Tailed Noise via
        Accelerated Gradient Clipping", NeurIPS 2020, arXiv:2005.10785, Algorithm 1. torch-clip 0.0.6 ``ClippedSSTM``.
        docs/clipping.md, "Clipped SSTM and restarts".

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = gx.clipped_sstm(a=1.0, L=1.0, B=1.0)  # alpha_1 = 0.5, lam_1 = 2
        >>> u, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.6000, -0.8000])
    """
    check_float("a", a, low=0.0, low_open=True)
    check_float("L", L, low=0.0, low_open=True)
    check_float("nu", nu, low=0.0, high=1.0)
    check_float("ratio_upper_bound", ratio_upper_bound, low=0.0, high=1.0, low_open=True)
    if clip not in SSTM_RULES:
        raise ValueError(f"clip must be one of {SSTM_RULES}; got {clip!r}")
    if isinstance(index_offset, bool) or index_offset not in (1, 2):
        raise ValueError(f"index_offset must be 1 (torch-clip: alpha_1 = 1/(2aL)) or 2 (the paper); got {index_offset!r}")
    if clip_start is not None:
        _positive_int("clip_start", clip_start)
        if B is not None:
            raise ValueError("give either B or clip_start, not both: clip_start sets B = (clip_start + index_offset)"
                             "^(2nu/(1+nu)) / (2aL); pass B=None")
        if clip != "norm":
            raise ValueError(f"clip_start needs clip='norm'; got clip={clip!r}")
        if to_float(nu) <= 0.0:
            raise ValueError("clip_start needs nu > 0: with nu = 0 the clipping level B/alpha is constant")
        nu_v, a_v, L_v = to_float(nu), to_float(a), to_float(L)
        B = (clip_start + index_offset) ** (2 * nu_v / (1 + nu_v)) / (2 * a_v * L_v)
    elif B is None:
        raise ValueError("B (the clipping parameter) must be given, or clip_start")
    check_float("B", B, low=0.0, low_open=True)

    def init(params: Params) -> ClippedSSTMState:
        zero = torch.zeros((), dtype=torch.float64)
        return ClippedSSTMState(torch.zeros((), dtype=torch.int64), zero, _tree.tree_clone(params),
                                _tree.tree_clone(params), zero.clone(), zero.clone())

    def owned_update(updates: Updates, state: ClippedSSTMState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ClippedSSTMState]:
        expect_state(state, ClippedSSTMState, "clipped_sstm")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        p = flat.params_live(params, "clipped_sstm")
        y = flat.state_live(state.y, "state.y")
        z = flat.state_live(state.z, "state.z")
        a_, L_, B_ = _tree.as_scalar(a), _tree.as_scalar(L), _tree.as_scalar(B)
        nu_, r = _tree.as_scalar(nu), _tree.as_scalar(ratio_upper_bound)
        k = _f64(_tree.as_scalar(state.k))
        A = _f64(_tree.as_scalar(state.A_k))
        c = 1 / (2 * a_ * L_)
        power = 2 * nu_ / (1 + nu_)
        alpha = c * (k + index_offset) ** power  # alpha_{k+1}
        A_next = A + alpha  # A_{k+1}
        lam = B_ / alpha
        inplace = own.state
        clipped = clip_leaves(clip, flat.live, lam)
        z = _axpy(z, clipped, -alpha, inplace)  # z_{k+1}
        y = _combine(y, A, z, alpha, inplace)  # A_k y_k + alpha_{k+1} z_{k+1} ...
        _fe.div_(y, A_next)  # ... / A_{k+1}
        alpha_after = c * (k + 1 + index_offset) ** power  # alpha_{k+2}
        if isinstance(r, torch.Tensor):  # under compile: r = 1 gives +inf, i.e. no clamp
            A_next = _minimum(A_next, r / (1 - r) * alpha_after)
        elif r < 1:
            A_next = _minimum(A_next, r / (1 - r) * alpha_after)
        x = _combine(y, A_next, z, alpha_after, False)
        _fe.div_(x, A_next + alpha_after)
        _fe.sub_(x, p)
        new_state = ClippedSSTMState(
            state.k + 1,
            _tree.scalar_tensor(A_next),
            flat.rebuild(y, like=state.y),
            flat.rebuild(z, like=state.z),
            _tree.scalar_tensor(alpha),
            _tree.scalar_tensor(lam),
        )
        return flat.rebuild(x), new_state

    return owned_transform(init, owned_update)


# --- restarts -----------------------------------------------------------------------------------


class RestartsState(NamedTuple):
    """State of `with_restarts`.

    ``inner_state``: the wrapped transform's state (re-initialised at each restart);
    ``running_sum``: the sum of the iterates since the last restart (params-shaped);
    ``n``: how many iterates it holds; ``period``: the current period (a restart happens when
    ``n`` reaches ``period + 1``); ``restarts``: restarts so far (0-d int64 CPU tensors).
    """

    inner_state: Any
    running_sum: Any
    n: torch.Tensor
    period: torch.Tensor
    restarts: torch.Tensor


@recorded
def with_restarts(
    inner: GradientTransformation,
    first_period: int = 100,
    coeff: float = 1.5,
    max_steps: int = 5000,
) -> GradientTransformation:
    """Restart ``inner`` at the mean of its recent iterates (torch-clip's ``Restarter``, fixed).

    Each update runs ``u = inner.update(...)``, forms the iterate ``x = params + u`` and adds it
    to a running sum, ``n += 1``. When ``n == period + 1`` and ``n < max_steps`` it instead
    outputs ``mean - params`` with ``mean = sum / n`` (the params move to the mean of the ``n``
    iterates produced since the last restart, the current one included), re-initialises
    ``inner`` at ``inner.init(mean)``, sets ``sum = 0``, ``n = 0`` and
    ``period = floor(period * coeff)``. Once ``period + 1 >= max_steps`` there are no more
    restarts and the output is ``inner``'s. With ``inner = clipped_sstm(...)`` this is the
    restarted method (R-clipped-SSTM) of Gorbunov, Danilova, Gasnikov, "Stochastic Optimization
    with Heavy-Tailed Noise via Accelerated Gradient Clipping", NeurIPS 2020.

    Unlike torch-clip (docs/clipping.md, torch-clip table, row 3) the mean divides by the number of iterates
    (not of parameter tensors), the state holds one params-sized sum (no list of copies) and
    the params keep their device. The restart schedule is torch-clip's: restarts after
    ``first_period + 1`` steps, then ``floor(first_period * coeff) + 1`` more, and so on.

    The inner state is re-initialised entirely, step counts included (a schedule inside
    ``inner`` starts over). Needs ``params``; extra arguments are forwarded to ``inner``. A
    leaf whose update is ``None`` in a call counts as staying where it is and is not moved by
    a restart in that call. In eager mode the restart test reads the CPU counters (no device
    sync); under ``torch.compile`` both outcomes are computed and selected with ``torch.where``.

    Args:
        inner: the transform restarted (e.g. `clipped_sstm`).
        first_period: the number of updates before the first restart.
        coeff: the factor applied to the period after each restart.
        max_steps: no restart once ``period + 1`` reaches it.

    Returns:
        A `GradientTransformation` whose state is `RestartsState`; ``update`` needs ``params``.

    Raises:
        TypeError: ``inner`` is not a `GradientTransformation`.
        ValueError: ``first_period`` or ``max_steps`` not a positive int, or ``coeff`` not a
            number >= 1.

    References:
        Gorbunov, Danilova and Gasnikov, "Stochastic Optimization with Heavy-Tailed Noise via
        Accelerated Gradient Clipping", NeurIPS 2020, arXiv:2005.10785 (R-clipped-SSTM). torch-clip 0.0.6 ``Restarter``.
        docs/clipping.md, "Clipped SSTM and restarts".

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = gx.with_restarts(gx.sgd(1.0), first_period=1)
        >>> state = tx.init(params)
        >>> for g in (1.0, 3.0):
        ...     u, state = tx.update({"w": torch.full((2,), g)}, state, params)
        ...     params = gx.apply_updates(params, u)
        >>> params["w"]  # the mean of the iterates -1 and -4
        tensor([-2.5000, -2.5000])
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"with_restarts() takes a GradientTransformation; got {type(inner).__name__}")
    _positive_int("first_period", first_period)
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real) or math.isnan(coeff) or coeff < 1:
        raise ValueError(f"coeff must be a number >= 1 (the period's growth factor); got {coeff!r}")
    _positive_int("max_steps", max_steps)

    def init(params: Params) -> RestartsState:
        zero = torch.zeros((), dtype=torch.int64)
        return RestartsState(inner.init(params), _tree.tree_zeros_like(params), zero, torch.tensor(first_period, dtype=torch.int64), zero.clone())

    def owned_update(updates: Updates, state: RestartsState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, RestartsState]:
        expect_state(state, RestartsState, "with_restarts")
        if params is None:
            raise ValueError("with_restarts needs params to average the iterates: call update(updates, state, params)")
        new_u, new_inner = call_update(inner, updates, state.inner_state, params, own, **extra)
        p_leaves, spec = _tree.tree_flatten(params)
        u_leaves = _tree.check_structure(spec, new_u, "inner output", against="params", reference=params)
        s_leaves = _tree.check_structure(spec, state.running_sum, "state.running_sum", against="params", reference=params)
        idx = [i for i, pl in enumerate(p_leaves) if pl is not None and s_leaves[i] is not None]
        ps = [p_leaves[i] for i in idx]
        xs = [pl if u_leaves[i] is None else pl + u_leaves[i].to(pl.dtype) for i, pl in zip(idx, ps)]
        inplace = own.state
        sums = [s_leaves[i] for i in idx]
        if inplace:
            _fe.add_(sums, xs)
        else:
            sums = list(_fe.add(sums, xs)) if sums else []
        n = state.n + 1
        restart = (n == state.period + 1) & (n < max_steps)
        new_period = torch.floor(state.period.to(torch.float64) * coeff).to(torch.int64)

        def restarted(zero_inplace: bool) -> tuple[list[Any], Any, list[torch.Tensor]]:
            """The restart branch: outputs (in params' leaf order), fresh inner state, zero sums."""
            means = list(_fe.div(sums, _tree.as_scalar(n.to(torch.float64)))) if sums else []
            mean_tree = _tree.tree_unflatten(spec, _tree.scatter([None] * len(p_leaves), idx, means))
            out = list(u_leaves)
            for j, i in enumerate(idx):
                if u_leaves[i] is not None:
                    out[i] = (means[j] - ps[j]).to(u_leaves[i].dtype)
            zeros = [s.zero_() for s in sums] if zero_inplace else [torch.zeros_like(s) for s in sums]
            return out, inner.init(mean_tree), zeros

        def rebuild_sum(values: list[torch.Tensor]) -> Any:
            return _tree.tree_unflatten(spec, _tree.scatter(s_leaves, idx, values))

        if not _tree.traced():
            if bool(restart):  # CPU counters: no device sync
                out, fresh, zeros = restarted(inplace)
                return _tree.tree_unflatten(spec, out), RestartsState(
                    fresh, rebuild_sum(zeros), torch.zeros_like(n), new_period, state.restarts + 1)
            return new_u, RestartsState(new_inner, rebuild_sum(sums), n, state.period, state.restarts)

        # torch.compile: compute both outcomes and select (the sums must not be zeroed in place).
        out, fresh, zeros = restarted(False)

        def pick(new: Any, old: Any) -> Any:
            if not isinstance(new, torch.Tensor):
                return new
            return torch.where(restart.to(new.device), new, old)

        out_leaves = [None if u is None else pick(o, u) for o, u in zip(out, u_leaves)]
        inner_state = _tree.tree_map(pick, fresh, new_inner)
        new_sums = [pick(zz, s) for zz, s in zip(zeros, sums)]
        return _tree.tree_unflatten(spec, out_leaves), RestartsState(
            inner_state,
            rebuild_sum(new_sums),
            torch.where(restart, torch.zeros_like(n), n),
            torch.where(restart, new_period, state.period),
            state.restarts + restart.to(torch.int64),
        )

    return _forwarding_transform(init, owned_update, inner)
