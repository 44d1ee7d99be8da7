"""optax's optimizers and their blocks, under optax's names, defaults and semantics.

Every alias here is ``chain(<optax's blocks>)`` wrapped in `gradxform.combine.inject_hyperparams`,
as optax 0.2.8 builds it, so the numbers equal optax's step after step. The alias takes optax's
argument names (``learning_rate``, ``b1``, ``b2``, ...); inside the state (and so as a
`gradxform.Optimizer` group key) the learning rate is called ``lr``, the name
``torch.optim.lr_scheduler`` drives. The other hyperparameters keep optax's names (``b1``, ``eps``,
``weight_decay``, ...).

Differences from optax, all deliberate:

- counts are per leaf (params-shaped 0-d int64 tensors, as torch.optim's per-param ``step``):
  a leaf frozen (``None``) for a while gets the bias correction of its own first step. With no
  frozen leaf this is optax's single count.
- optax's ``mu_dtype`` / ``accumulator_dtype`` options are not offered (state in the params'
  dtype; cast with `gradxform.upcast` for mixed precision).
- `add_noise` draws its noise from a counter-based hash of (``key``, step, leaf, element) kept in
  the state, not from JAX's PRNG: the same distribution, not the same numbers.
- `optax_rprop` is optax's Rprop (named so next to torch.optim's ``rprop``); see its docstring.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from . import _foreach as _fe
from . import _owned
from . import tree as _tree
from .base import (
    PURE,
    EmptyState,
    ExtraArgs,
    GradientTransformation,
    Ownership,
    Params,
    Updates,
    chain,
    declare,
    info_of,
    owned_transform,
    recorded,
    stateless,
)
from .combine import inject_hyperparams, masked
from .transforms import (
    ScalarOrSchedule,
    _Flat,
    _add_scaled_,
    _apply_params,
    _leaf_counts,
    _plain,
    _step_counts,
    add_decayed_weights,
    check_float,
    scale,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "ScaleByLionState", "ScaleByBeliefState", "ScaleByYogiState", "ScaleByNovogradState", "ScaleByAdanState",
    "ScaleBySM3State", "ScaleByOptimisticGradientState", "ScaleByDistanceOverGradientsState", "AddNoiseState",
    "OptaxAdamState", "OptaxRpropState",
    "scale_by_lion", "scale_by_belief", "scale_by_yogi", "scale_by_novograd", "scale_by_adan", "scale_by_sm3",
    "scale_by_trust_ratio", "scale_by_param_block_norm", "scale_by_param_block_rms", "scale_by_sign",
    "scale_by_polyak", "scale_by_optimistic_gradient", "scale_by_distance_over_gradients", "add_noise",
    "lion", "lamb", "lars", "adabelief", "yogi", "novograd", "adan", "sm3", "fromage", "sign_sgd", "signum",
    "noisy_sgd", "polyak_sgd", "optimistic_gradient_descent", "optimistic_adam", "amsgrad", "adamaxw", "nadamw",
    "optax_rprop",
]

_sign = _fe._op("sign", torch.sign)
_abs = _fe._op("abs", torch.abs)  # built once, outside any trace (dynamo 2.1 sets no function attribute)


# --- helpers --------------------------------------------------------------------------------------


def _scalars_traced(counts: list[torch.Tensor], *hps: Any) -> bool:
    return (_tree.traced() or any(isinstance(h, torch.Tensor) for h in hps)
            or any(c.device.type != "cpu" for c in counts))


def _bias_corrections(counts: list[torch.Tensor], decay: Any, shift: int = 0) -> list[Any]:
    """``1 - decay**(t + shift)`` per live leaf: Python floats (eager, CPU counts, number decay)
    or 0-d float64 tensors (no host read)."""
    if _scalars_traced(counts, decay):
        t = torch.stack(counts).to(torch.float64) + shift
        return list((1 - decay ** t).unbind())
    return _corrections([int(c) for c in counts], decay, shift)


def _corrections(ts: list[int], decay: float, shift: int = 0) -> list[float]:
    """`_bias_corrections` from step numbers already read: ``1 - decay**(t + shift)`` per leaf."""
    return [1 - decay ** (t + shift) for t in ts]


def _div_each(xs: list[torch.Tensor], cs: list[Any]) -> list[torch.Tensor]:
    """``x_i / c_i`` (out of place) with ``c_i`` a float or a 0-d tensor."""
    if not cs:
        return []
    if isinstance(cs[0], torch.Tensor):
        return [x / c.to(x.dtype) for x, c in zip(xs, cs)]
    return list(_fe.div(xs, cs))


def _mul_each(xs: list[torch.Tensor], cs: list[Any]) -> list[torch.Tensor]:
    if not cs:
        return []
    if isinstance(cs[0], torch.Tensor):
        return [x * c.to(x.dtype) for x, c in zip(xs, cs)]
    return list(_fe.mul(xs, cs))


def _moment(old: list[torch.Tensor], new: list[torch.Tensor], decay: Any, inplace: bool) -> list[torch.Tensor]:
    """optax's ``update_moment``: ``(1 - decay) * new + decay * old``; with a number ``decay``
    as one ``lerp`` (one pass, no temporary; equal up to rounding)."""
    if not isinstance(decay, torch.Tensor):
        if inplace:
            _fe.lerp_(old, new, 1 - decay)
            return old
        return list(_fe.lerp(old, new, 1 - decay))
    a = _fe.mul(new, 1 - decay)
    if inplace:
        _fe.mul_(old, decay)
        _fe.add_(old, a)
        return old
    return list(_fe.add(a, _fe.mul(old, decay)))


def _moment_sq(old: list[torch.Tensor], new: list[torch.Tensor], decay: Any, inplace: bool) -> list[torch.Tensor]:
    """optax's ``update_moment_per_elem_norm`` of order 2: ``(1 - decay) * new**2 + decay * old``
    (a number ``decay``: ``mul`` and ``addcmul``, no temporary)."""
    if not isinstance(decay, torch.Tensor):
        out = old if inplace else list(_fe.mul(old, decay))
        if inplace:
            _fe.mul_(out, decay)
        _fe.addcmul_(out, new, new, 1 - decay)
        return out
    return _moment(old, list(_fe.mul(new, new)), decay, inplace)


def _denominators(nu_hat: list[torch.Tensor], eps: Any, eps_root: Any) -> list[torch.Tensor]:
    """``sqrt(nu_hat + eps_root) + eps`` (optax's placement)."""
    x = nu_hat if _is_zero(eps_root) else list(_fe.add(nu_hat, eps_root))
    d = list(_fe.sqrt(x))
    _fe.add_(d, eps)
    return d


_copy_ = _fe._op("copy_", lambda x, src: src.to(x.dtype).expand_as(x).clone())
_sqrt_ = _fe._op("sqrt_", _fe._safe_sqrt)
_sign_ = _fe._op("sign_", torch.sign)
_reciprocal_ = _fe._op("reciprocal_", torch.reciprocal)
_sub = _fe._op("sub", lambda x, o, alpha=1: torch.sub(x, o, alpha=alpha))


def _eager(own: Ownership, counts: list[torch.Tensor], *hps: Any) -> bool:
    """Whether an update takes its eager path: number hyperparameters, bias corrections as
    Python floats (CPU counts read eagerly), out of ``torch.func``. That path makes one
    params-shaped temporary per step and does the rest in place, on the state buffers when
    they are owned (``own.state``), else on copies of them (`_held`): the pure and the owned
    update run the same arithmetic, so they agree to the bit."""
    del own
    return not _tree.pure_ops() and not _scalars_traced(counts, *hps)


def _held(xs: list[torch.Tensor], own: Ownership) -> list[torch.Tensor]:
    """State buffers to update in place: themselves when the caller owns the state, else copies."""
    return xs if own.state else [x.clone() for x in xs]


def _moments_by_slices(flat: _Flat, state: Any, own: Ownership, counts: list[torch.Tensor], beta1: float,
                       beta2: float, nu: list[torch.Tensor], body: Callable[..., None],
                       scratch: int | None = None) -> tuple[Updates, Any]:
    """The eager step of a two-moment block (state ``count``, ``mu``, ``nu``) slice by slice
    (`_owned.by_slices`): ``body(i, c1, c2, g, mu, nu, out, t)`` on each slice of leaf ``i``
    (``c1``, ``c2`` its bias corrections, ``t`` a cached scratch slice, or the output's own
    slice when it has buffers of its own and ``scratch`` is ``None``) updates the moments in
    place and writes the output; g, mu and nu are read once and the moments written once."""
    g = flat.live
    mu, nu = _held(flat.state_live(state.mu, "state.mu"), own), _held(nu, own)
    out = _output(g, own)
    c1, c2 = _bias_corrections(counts, beta1), _bias_corrections(counts, beta2)

    def step(i: int, gs: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor, os: torch.Tensor,
             *scr: torch.Tensor) -> None:
        body(i, c1[i], c2[i], gs, ms, vs, os, scr[0] if scr else os)

    _owned.by_slices(list(zip(g, mu, nu, out)), step, _scratch_needed(out, g) if scratch is None else scratch)
    return _owned.finish(flat, out, state, count=counts, mu=mu, nu=nu)


def _adam_ratio(mu: list[torch.Tensor], nu: list[torch.Tensor], c1: list[Any], c2: list[Any] | None, eps: Any,
                eps_root: Any, scratch: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``(mu / c1) / (sqrt(nu / c2 + eps_root) + eps)`` (``c2`` None: 1) written into ``scratch``
    (tensors of the caller's own), or into one new buffer: the eager path's output (``c1``,
    ``c2``: numbers). As ``mu / (c1 (sqrt(nu / c2 + eps_root) + eps))``: rounding differs from
    the two-division form by an ulp or two."""
    if scratch is None:
        s = list(_fe.div(nu, c2)) if c2 is not None else list(_fe.add(nu, eps_root))
    else:
        s = scratch
        if c2 is not None:
            for x, v, c in zip(s, nu, c2):
                torch.div(v, c, out=x)
        else:
            _copy_(s, nu)
    if c2 is not None or scratch is not None:
        if not _is_zero(eps_root):
            _fe.add_(s, eps_root)
    _sqrt_(s)
    _fe.add_(s, eps)
    if any(c != 1 for c in c1):
        _fe.mul_(s, c1)
    _rdiv_(s, mu)
    return s


def _output(g: list[torch.Tensor], own: Ownership) -> list[torch.Tensor]:
    """Where a slice-by-slice eager update writes its output: the incoming updates themselves
    when the caller lets them be written (each slice is written after its last read), else new
    buffers."""
    return g if own.may_write(g) else [torch.empty_like(x) for x in g]


def _scratch_needed(out: list[torch.Tensor], g: list[torch.Tensor]) -> int:
    """Scratch slices a sliced step needs besides its output (see `_output`): none when the
    output has buffers of its own, whose slice serves as the scratch until it is written last
    (one cache-sized array less in the working set); one when the output is ``g`` itself."""
    return 1 if out is g else 0


def _ratio_into(out: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, c1: float, c2: float, eps: Any,
                eps_root: Any, t: torch.Tensor) -> None:
    """One slice of `_adam_ratio`: ``out <- mu / (c1 (sqrt(nu / c2 + eps_root) + eps))``, the
    denominator made in the scratch slice ``t`` (the kernels of `_adam_ratio`, the same numbers)."""
    torch.div(nu, c2, out=t)
    if not _is_zero(eps_root):
        t.add_(eps_root)
    t.sqrt_().add_(eps)
    if c1 != 1:
        t.mul_(c1)
    torch.div(mu, t, out=out)


def _rdiv_(xs: list[torch.Tensor], num: list[torch.Tensor]) -> None:
    """``x <- num / x`` in place (one pass, the division's own rounding); no foreach kernel
    divides that way round, so per leaf with ``out=`` (eager paths only)."""
    for x, n in zip(xs, num):
        torch.div(n, x, out=x)


_ROOT_CHUNK = 1 << 17  # elements of the denominator's scratch in `_div_by_root_` (512 KiB in float32: in L2)


def _div_by_root_(out: list[torch.Tensor], nu: list[torch.Tensor], c2: list[float], eps_root: Any,
                  eps: Any) -> None:
    """``out <- out / (sqrt(nu / c2 + eps_root) + eps)`` in place (``c2``: a number per leaf),
    eager only. The denominator is made chunk by chunk in one scratch of at most ``_ROOT_CHUNK``
    elements (it stays in cache), never as a params-sized temporary; per element the same
    operations as the foreach form ``div, add, sqrt, add`` then ``div``, so the same numbers."""
    sizes = [min(v.numel(), _ROOT_CHUNK) for v in nu]
    scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for o, v, c in zip(out, nu, c2):
        if not (o.is_contiguous() and v.is_contiguous()) or o.dtype != v.dtype:
            d = torch.div(v, c)
            if not _is_zero(eps_root):
                d.add_(eps_root)
            o.div_(d.sqrt_().add_(eps))
            continue
        key = (v.dtype, v.device)
        if key not in scratch:
            scratch[key] = torch.empty(max(n for n, x in zip(sizes, nu) if (x.dtype, x.device) == key),
                                       dtype=v.dtype, device=v.device)
        buf, of, vf, n = scratch[key], o.view(-1), v.view(-1), v.numel()
        for s in range(0, n, _ROOT_CHUNK):
            e = min(n, s + _ROOT_CHUNK)
            d = buf[:e - s]
            torch.div(vf[s:e], c, out=d)
            if not _is_zero(eps_root):
                d.add_(eps_root)
            d.sqrt_().add_(eps)
            of[s:e].div_(d)


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _inplace(own: Ownership) -> bool:  # noqa: D401
    """Whether state buffers may be written with plain tensor methods (``copy_``)."""
    return own.state and not _tree.pure_ops()


def _safe_norms(xs: list[torch.Tensor], floor: Any) -> list[torch.Tensor]:
    """optax's ``safe_norm(x, floor)``: ``||x||`` where it exceeds ``floor``, else ``floor``."""
    norms = _fe.norm(xs)
    return [torch.where(n <= floor, torch.as_tensor(floor, dtype=n.dtype, device=n.device), n) for n in norms]


# --- Lion -----------------------------------------------------------------------------------------


class ScaleByLionState(NamedTuple):
    """``count``: per-leaf updates received; ``mu``: the momentum (params-shaped)."""

    count: Any
    mu: Any


@recorded
def scale_by_lion(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.99, *, mode: str = "hard",
                  smooth_beta: float = 1.0) -> GradientTransformation:
    """Lion's sign update (Chen et al., NeurIPS 2023, arXiv 2302.06675, Algorithm 2), as optax.

    ``u = sign((1 - b1) g + b1 m)``; then ``m <- (1 - b2) g + b2 m``. ``mode="smooth"`` uses
    ``tanh(smooth_beta * x)`` and ``mode="refined"`` keeps ``x`` where ``|x| < 1`` (optax's modes).

    Args:
        b1: interpolation weight of the momentum in the update.
        b2: decay of the momentum.
        mode: ``"hard"`` (sign), ``"smooth"`` or ``"refined"``.
        smooth_beta: the slope of ``tanh`` in ``"smooth"`` mode.

    Returns:
        The `GradientTransformation` (state `ScaleByLionState`).

    Raises:
        ValueError: a decay outside ``[0, 1]`` or an unknown ``mode``.

    References:
        Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675;
        optax.scale_by_lion (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> tx = gx.chain(gx.scale_by_lion(), gx.scale_by_learning_rate(1e-4))
    """
    check_float("b1", b1, low=0.0, high=1.0)
    check_float("b2", b2, low=0.0, high=1.0)
    if mode not in ("hard", "smooth", "refined"):
        raise ValueError(f"scale_by_lion: mode must be 'hard', 'smooth' or 'refined'; got {mode!r}")

    def init(params: Params) -> ScaleByLionState:
        return ScaleByLionState(_leaf_counts(params), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByLionState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByLionState]:
        flat = _owned.live(updates, state, ScaleByLionState, "scale_by_lion")
        if flat is None:
            return updates, state
        beta1, beta2 = _tree.as_scalar(b1), _tree.as_scalar(b2)
        g = flat.live
        counts = _step_counts(flat, state.count, own.state)
        mu = flat.state_live(state.mu, "state.mu")
        if isinstance(beta1, torch.Tensor):
            x = list(_fe.add(_fe.mul(g, 1 - beta1), _fe.mul(mu, beta1)))
        else:  # one temporary, made and signed in place
            x = list(_fe.lerp(mu, g, 1 - beta1))
        if mode == "hard" and not _tree.pure_ops():
            _sign_(x)
            out = x
        elif mode == "hard":
            out = list(_sign(x))
        elif mode == "smooth":
            out = [torch.tanh(smooth_beta * v) for v in x]
        else:
            out = [torch.where(v.abs() < 1.0, v, torch.sign(v)) for v in x]
        mu = _moment(mu, g, beta2, own.state)
        return _owned.finish(flat, out, state, count=counts, mu=mu)

    return owned_transform(init, owned_update)


# --- AdaBelief, Yogi --------------------------------------------------------------------------------


class ScaleByBeliefState(NamedTuple):
    """``count``: per-leaf updates; ``mu``: first moment; ``nu``: the EMA of ``(g - mu)^2``
    (plus ``eps_root`` each step, as optax)."""

    count: Any
    mu: Any
    nu: Any


def _nesterov_mu_hat(mu: list[torch.Tensor], g: list[torch.Tensor], counts: list[torch.Tensor], b1: Any) -> list[torch.Tensor]:
    """optax's Nesterov first moment: ``b1 * mu / (1 - b1^(t+1)) + (1 - b1) * g / (1 - b1^t)``."""
    a = _div_each(mu, _bias_corrections(counts, b1, shift=1))
    b = _div_each(g, _bias_corrections(counts, b1))
    return list(_fe.add(_fe.mul(a, b1), _fe.mul(b, 1 - b1)))


@recorded
def scale_by_belief(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                    eps: float | torch.Tensor = 1e-16, eps_root: float | torch.Tensor = 1e-16, *,
                    nesterov: bool = False) -> GradientTransformation:
    """AdaBelief's preconditioning (Zhuang et al., NeurIPS 2020, arXiv 2010.07468), as optax.

    ``m = b1 m + (1-b1) g``; ``s = b2 s + (1-b2) (g - m)^2 + eps_root``;
    ``u = (m / (1-b1^t)) / (sqrt(s / (1-b2^t)) + eps)`` (Nesterov: optax's ``mu_hat``).

    Args:
        b1: first-moment decay.
        b2: decay of the belief (second) moment.
        eps: added to the root of the denominator.
        eps_root: added to ``s`` at every step (inside the root).
        nesterov: Nesterov's first moment, as optax.

    Returns:
        The `GradientTransformation` (state `ScaleByBeliefState`).

    Raises:
        ValueError: a decay outside ``[0, 1)`` or a negative eps.

    References:
        Zhuang et al., "AdaBelief Optimizer", NeurIPS 2020, arXiv 2010.07468; optax.scale_by_belief.

    Example:
        >>> tx = gx.chain(gx.scale_by_belief(), gx.scale_by_learning_rate(1e-3))
    """
    _check_decays(b1=b1, b2=b2)
    check_float("eps", eps, low=0.0)
    check_float("eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByBeliefState:
        return ScaleByBeliefState(_leaf_counts(params), _tree.tree_zeros_like(params), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByBeliefState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByBeliefState]:
        flat = _owned.live(updates, state, ScaleByBeliefState, "scale_by_belief")
        if flat is None:
            return updates, state
        beta1, beta2, e, er = [_tree.as_scalar(x) for x in (b1, b2, eps, eps_root)]
        g = flat.live
        counts = _step_counts(flat, state.count, own.state)
        if not nesterov and _eager(own, counts, beta1, beta2) and _owned.on_cpu(g):
            # slice by slice (`_owned.by_slices`): g, mu and nu are read once and the moments
            # written once; the residual g - mu and the denominator live in a cached scratch
            return _moments_by_slices(flat, state, own, counts, beta1, beta2, flat.state_live(state.nu, "state.nu"),
                                      _belief_slice_step(beta1, beta2, e, er))
        mu = _moment(flat.state_live(state.mu, "state.mu"), g, beta1, own.state)
        err = list(_sub(g, mu))
        nu = _moment_sq(flat.state_live(state.nu, "state.nu"), err, beta2, own.state)
        if not _is_zero(er):
            _fe.add_(nu, er)
        mu_hat = _nesterov_mu_hat(mu, g, counts, beta1) if nesterov else _div_each(mu, _bias_corrections(counts, beta1))
        nu_hat = _div_each(nu, _bias_corrections(counts, beta2))
        out = list(_fe.div(mu_hat, _denominators(nu_hat, e, 0.0)))
        return _owned.finish(flat, out, state, count=counts, mu=mu, nu=nu)

    return owned_transform(init, owned_update)


class ScaleByYogiState(NamedTuple):
    """``count``: per-leaf updates; ``mu``, ``nu``: first and second moments (both start at
    ``initial_accumulator_value``, as optax)."""

    count: Any
    mu: Any
    nu: Any


@recorded
def scale_by_yogi(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999, eps: float | torch.Tensor = 1e-3,
                  eps_root: float | torch.Tensor = 0.0,
                  initial_accumulator_value: float = 1e-6) -> GradientTransformation:
    """Yogi's additive second moment (Zaheer et al., NeurIPS 2018), as optax.

    ``m = b1 m + (1-b1) g``; ``v = v - (1-b2) sign(v - g^2) g^2``;
    ``u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t) + eps_root) + eps)``; ``m_0 = v_0 = initial_accumulator_value``.

    Args:
        b1: first-moment decay.
        b2: second-moment rate.
        eps: added to the root of the denominator.
        eps_root: added inside the root.
        initial_accumulator_value: the starting value of both moments.

    Returns:
        The `GradientTransformation` (state `ScaleByYogiState`).

    Raises:
        ValueError: a decay outside ``[0, 1)`` or a negative eps.

    References:
        Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018; optax.scale_by_yogi.

    Example:
        >>> tx = gx.chain(gx.scale_by_yogi(), gx.scale_by_learning_rate(1e-2))
    """
    _check_decays(b1=b1, b2=b2)
    check_float("eps", eps, low=0.0)
    check_float("eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByYogiState:
        full = lambda p: torch.full_like(p, initial_accumulator_value)  # noqa: E731
        return ScaleByYogiState(_leaf_counts(params), _tree.tree_map(full, params), _tree.tree_map(full, params))

    def owned_update(updates: Updates, state: ScaleByYogiState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByYogiState]:
        flat = _owned.live(updates, state, ScaleByYogiState, "scale_by_yogi")
        if flat is None:
            return updates, state
        beta1, beta2, e, er = [_tree.as_scalar(x) for x in (b1, b2, eps, eps_root)]
        g = flat.live
        counts = _step_counts(flat, state.count, own.state)
        if _eager(own, counts, beta1, beta2) and _owned.on_cpu(g):
            # slice by slice (`_owned.by_slices`): g, mu and nu are read once and the moments
            # written once; t = sign(nu - g^2) g and the denominator live in a cached scratch
            return _moments_by_slices(flat, state, own, counts, beta1, beta2, flat.state_live(state.nu, "state.nu"),
                                      _yogi_slice_step(beta1, beta2, e, er))
        mu = _moment(flat.state_live(state.mu, "state.mu"), g, beta1, own.state)
        nu_old = flat.state_live(state.nu, "state.nu")
        g2 = list(_fe.mul(g, g))
        step = list(_fe.mul(_fe.mul(_sign(_fe.add(nu_old, g2, alpha=-1)), g2), 1 - beta2))
        if own.state:
            _fe.sub_(nu_old, step)
            nu = nu_old
        else:
            nu = list(_fe.add(nu_old, step, alpha=-1))
        mu_hat = _div_each(mu, _bias_corrections(counts, beta1))
        nu_hat = _div_each(nu, _bias_corrections(counts, beta2))
        out = list(_fe.div(mu_hat, _denominators(nu_hat, e, er)))
        return _owned.finish(flat, out, state, count=counts, mu=mu, nu=nu)

    return owned_transform(init, owned_update)


def _check_decays(**decays: Any) -> None:
    for name, value in decays.items():
        check_float(name, value, low=0.0, high=1.0, high_open=True)


# --- optax's Adam family (private blocks of amsgrad, nadamw, lamb, optimistic_adam, adamaxw) ---------


class OptaxAdamState(NamedTuple):
    """``count``: per-leaf updates; ``mu``, ``nu``: moments (``nu`` is the infinity moment for
    adamaxw); ``nu_max``: AMSGrad's running maximum of the bias-corrected ``nu`` (or ``None``)."""

    count: Any
    mu: Any
    nu: Any
    nu_max: Any


def _amsgrad_max(kind: str, nu_max: Any) -> dict[str, Any]:
    """The ``nu_max`` field to store: AMSGrad's maximum, else none (the state keeps ``None``)."""
    return {"nu_max": nu_max} if kind == "amsgrad" else {}


def _belief_slice_step(beta1: float, beta2: float, e: Any, er: Any, ts: list[int] | None = None) -> Callable[..., None]:
    """One slice of AdaBelief (see `_adam_slice_step` for the signature of the step)."""
    def step(i: int, c1: float, c2: float, gs: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor,
             os: torch.Tensor, t: torch.Tensor) -> None:
        ms.lerp_(gs, 1 - beta1)
        torch.sub(gs, ms, out=t)
        vs.mul_(beta2).addcmul_(t, t, value=1 - beta2)
        if not _is_zero(er):
            vs.add_(er)
        _ratio_into(os, ms, vs, c1, c2, e, 0.0, t)
    return step


def _yogi_slice_step(beta1: float, beta2: float, e: Any, er: Any, ts: list[int] | None = None) -> Callable[..., None]:
    """One slice of Yogi (see `_adam_slice_step` for the signature of the step)."""
    def step(i: int, c1: float, c2: float, gs: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor,
             os: torch.Tensor, t: torch.Tensor) -> None:
        ms.lerp_(gs, 1 - beta1)
        torch.sub(vs, torch.mul(gs, gs, out=t), out=t).sign_().mul_(gs)
        vs.addcmul_(t, gs, value=-(1 - beta2))
        _ratio_into(os, ms, vs, c1, c2, e, er, t)
    return step


def _adam_sliceable(kind: str, nesterov: bool, beta1: Any) -> bool:
    """Whether `_adam_slice_step` covers this flavour of optax's Adam (eager, number decays)."""
    return kind == "adamax" or (kind == "adam" and not (nesterov and _is_zero(beta1)))


def _adam_slice_step(kind: str, nesterov: bool, beta1: float, beta2: float, e: Any, er: Any,
                     ts: list[int]) -> Callable[..., None]:
    """One slice of optax's Adam (``kind="adam"``, plain or Nesterov) or Adamax: ``step(i, c1, c2,
    g, mu, nu, out, t)`` updates the moments in place and writes the output (``t`` a scratch
    slice, possibly ``out`` itself for plain Adam; ``c1``, ``c2`` leaf ``i``'s bias corrections,
    ``ts`` the leaves' step numbers): the kernels of the whole-leaf eager form, the same numbers."""
    if kind == "adamax":
        def adamax_step(i: int, c1: float, c2: float, gs: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor,
                        os: torch.Tensor, t: torch.Tensor) -> None:
            ms.lerp_(gs, 1 - beta1)
            torch.abs(gs, out=os).add_(e)  # |g| + eps
            torch.maximum(vs.mul_(beta2), os, out=vs)
            os.copy_(vs).mul_(c1).reciprocal_().mul_(ms)
        return adamax_step
    # Nesterov's numerator b1 mu / c1' + (1 - b1) g / c1 as a (mu + (b / a) g)
    c1s = _corrections(ts, beta1)
    a = [beta1 / c for c in _corrections(ts, beta1, shift=1)] if nesterov else c1s
    k = [(1 - beta1) / c / ai for c, ai in zip(c1s, a)] if nesterov else c1s

    def step(i: int, c1: float, c2: float, gs: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor,
             os: torch.Tensor, t: torch.Tensor) -> None:
        ms.lerp_(gs, 1 - beta1)
        vs.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
        if not nesterov:
            _ratio_into(os, ms, vs, c1, c2, e, er, t)
            return
        torch.mul(gs, k[i], out=os).add_(ms).mul_(a[i])
        torch.div(vs, c2, out=t)
        if not _is_zero(er):
            t.add_(er)
        os.div_(t.sqrt_().add_(e))
    return step


@recorded
def _scale_by_optax_adam(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, eps_root: Any = 0.0, nesterov: bool = False,
                         kind: str = "adam", bias_correction_mu: bool = True,
                         bias_correction_nu: bool = True) -> GradientTransformation:
    """optax's scale_by_adam (``kind="adam"``, eps placement ``sqrt(nu_hat + eps_root) + eps``,
    optional Nesterov), scale_by_amsgrad (``"amsgrad"``: the maximum of the *bias-corrected*
    ``nu``) and scale_by_adamax (``"adamax"``: ``nu = max(b2 nu, |g| + eps)``, ``u = m_hat / nu``)."""

    def init(params: Params) -> OptaxAdamState:
        z = _tree.tree_zeros_like
        return OptaxAdamState(_leaf_counts(params), z(params), z(params), z(params) if kind == "amsgrad" else None)

    def owned_update(updates: Updates, state: OptaxAdamState, params: Params | None,
                     own: Ownership) -> tuple[Updates, OptaxAdamState]:
        flat = _owned.live(updates, state, OptaxAdamState, "scale_by_adam (optax)")
        if flat is None:
            return updates, state
        beta1, beta2, e, er = [_tree.as_scalar(x) for x in (b1, b2, eps, eps_root)]
        g = flat.live
        counts = _step_counts(flat, state.count, own.state)
        nu_old = flat.state_live(state.nu, "state.nu")
        nu_max = None
        fast = _eager(own, counts, beta1, beta2) and bias_correction_mu and bias_correction_nu
        if fast and _adam_sliceable(kind, nesterov, beta1) and _owned.on_cpu(g):
            # slice by slice (`_owned.by_slices`): g, mu and nu are read once and the moments
            # written once; the denominator lives in a cached scratch
            step = _adam_slice_step(kind, nesterov, beta1, beta2, e, er, [int(c) for c in counts])
            scratch = (1 if nesterov else None) if kind == "adam" else 0
            return _moments_by_slices(flat, state, own, counts, beta1, beta2, nu_old, step, scratch)
        mu = _moment(flat.state_live(state.mu, "state.mu"), g, beta1, own.state)
        if fast:
            nu_old = _held(nu_old, own)
        if fast and kind == "adamax":
            a = list(_abs(g))
            _fe.add_(a, e)
            _fe.mul_(nu_old, beta2)
            _fe.maximum_(nu_old, a)
            # a's buffer becomes the output m_hat / nu
            _copy_(a, nu_old)
            _fe.mul_(a, _bias_corrections(counts, beta1))
            _reciprocal_(a)
            _fe.mul_(a, mu)
            return _owned.finish(flat, a, state, count=counts, mu=mu, nu=nu_old)
        if fast and kind == "amsgrad":
            nu = _moment_sq(nu_old, g, beta2, True)
            c1, c2 = _bias_corrections(counts, beta1), _bias_corrections(counts, beta2)
            nu_max = _owned.held(flat, state.nu_max, "state.nu_max", own)
            s = list(_fe.div(nu, c2))
            _fe.maximum_(nu_max, s)
            out = _adam_ratio(mu, nu_max, [1.0] * len(c1), None, e, er, s)
            _fe.mul_(out, [1 / c for c in c1])
            return _owned.finish(flat, out, state, count=counts, mu=mu, nu=nu, **_amsgrad_max(kind, nu_max))
        if kind == "adamax":
            a = list(_fe.add(_abs(g), e))
            if own.state:
                _fe.mul_(nu_old, beta2)
                _fe.maximum_(nu_old, a)
                nu = nu_old
            else:
                nu = list(_fe.maximum(a, _fe.mul(nu_old, beta2)))
            out = list(_fe.div(_div_each(mu, _bias_corrections(counts, beta1)), nu))
        else:
            nu = _moment_sq(nu_old, g, beta2, own.state)
            if nesterov:
                mu_hat = _nesterov_mu_hat(mu, g, counts, beta1)
            elif bias_correction_mu:
                mu_hat = _div_each(mu, _bias_corrections(counts, beta1))
            else:
                mu_hat = mu
            nu_hat = _div_each(nu, _bias_corrections(counts, beta2)) if bias_correction_nu else nu
            if kind == "amsgrad":
                old_max = flat.state_live(state.nu_max, "state.nu_max")
                if own.state:
                    _fe.maximum_(old_max, nu_hat)
                    nu_max = old_max
                else:
                    nu_max = list(_fe.maximum(old_max, nu_hat))
                nu_hat = nu_max
            out = list(_fe.div(mu_hat, _denominators(nu_hat, e, er)))
        return _owned.finish(flat, out, state, count=counts, mu=mu, nu=nu, **_amsgrad_max(kind, nu_max))

    return owned_transform(init, owned_update)


# --- NovoGrad -------------------------------------------------------------------------------------


class ScaleByNovogradState(NamedTuple):
    """``count``: per-leaf updates; ``mu``: the momentum (params-shaped); ``nu``: the per-layer
    EMA of ``||g||^2`` (one 0-d tensor per leaf)."""

    count: Any
    mu: Any
    nu: Any


@recorded
def scale_by_novograd(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.25,
                      eps: float | torch.Tensor = 1e-8, eps_root: float | torch.Tensor = 0.0,
                      weight_decay: float | torch.Tensor = 0.0) -> GradientTransformation:
    """NovoGrad's layer-wise second moment (Ginsburg et al., 2019, arXiv 1905.11286), as optax.

    ``n_1 = ||g||^2``, ``n_t = b2 n + (1-b2) ||g||^2`` (one number per leaf);
    ``a = g / (sqrt(n_t + eps_root) + eps) + weight_decay * p``; ``m_1 = a``, ``m_t = b1 m + a``;
    ``u = m_t``. "First" is the leaf's own first update.

    Args:
        b1: momentum decay.
        b2: decay of the layer norms.
        eps: added to the root of the denominator.
        eps_root: added inside the root.
        weight_decay: the params' weight in ``a`` (needs ``params`` when not 0).

    Returns:
        The `GradientTransformation` (state `ScaleByNovogradState`).

    Raises:
        ValueError: a decay outside ``[0, 1)``, a negative eps, or no params with a weight decay.

    References:
        Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training
        of Deep Networks", arXiv 1905.11286; optax.scale_by_novograd.

    Example:
        >>> tx = gx.chain(gx.scale_by_novograd(), gx.scale_by_learning_rate(1e-2))
    """
    _check_decays(b1=b1, b2=b2)
    check_float("eps", eps, low=0.0)
    check_float("eps_root", eps_root, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)

    def init(params: Params) -> ScaleByNovogradState:
        return ScaleByNovogradState(_leaf_counts(params), _tree.tree_zeros_like(params),
                                    _tree.tree_map(lambda p: torch.zeros((), dtype=p.dtype, device=p.device), params))

    def owned_update(updates: Updates, state: ScaleByNovogradState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByNovogradState]:
        flat = _owned.live(updates, state, ScaleByNovogradState, "scale_by_novograd")
        if flat is None:
            return updates, state
        beta1, beta2, e, er, wd = [_tree.as_scalar(x) for x in (b1, b2, eps, eps_root, weight_decay)]
        g = flat.live
        counts = _step_counts(flat, state.count, own.state)
        nu_old = flat.state_live(state.nu, "state.nu", check_shapes=False)
        sq = [torch.linalg.vector_norm(x) ** 2 for x in g]
        if _scalars_traced(counts, beta1, beta2):
            later = [(c > 1).to(x.dtype) for c, x in zip(counts, g)]
            b2e = [beta2 * f for f in later]
            b1e = [beta1 * f for f in later]
        else:
            b2e = [beta2 if int(c) > 1 else 0.0 for c in counts]
            b1e = [beta1 if int(c) > 1 else 0.0 for c in counts]
        # first step: b2e = 0 gives n = ||g||^2 (bit-equal to optax's ``(1-b2) s + b2 n`` later on)
        nu = [((1 - b) * s + b * n).to(n.dtype) for s, n, b in zip(sq, nu_old, b2e)]
        denom = [torch.sqrt(n + er) + e if not _is_zero(er) else torch.sqrt(n) + e for n in nu]
        if _eager(own, counts, beta1, beta2, wd):
            # one temporary: g / denom, then the output (a copy of the new momentum)
            a = list(_fe.div(g, [d.to(x.dtype) for x, d in zip(g, denom)]))
            if not _is_zero(wd):
                _fe.add_(a, flat.params_live(params, "scale_by_novograd (weight_decay)"), alpha=wd)
            mu = _owned.held(flat, state.mu, "state.mu", own)
            nu_old = _held(nu_old, own)
            _fe.mul_(mu, b1e)
            _fe.add_(mu, a)
            _copy_(a, mu)
            _copy_(nu_old, nu)
            return _owned.finish(flat, a, state, count=counts, mu=mu, nu=nu_old)
        a = [x / d.to(x.dtype) for x, d in zip(g, denom)]
        if not _is_zero(wd):
            p = flat.params_live(params, "scale_by_novograd (weight_decay)")
            a = list(_fe.add(a, _fe.mul(p, wd)))
        mu_old = flat.state_live(state.mu, "state.mu")
        mu = [(m * b + x).to(m.dtype) for m, b, x in zip(mu_old, b1e, a)]
        if _inplace(own):
            for o, n in zip(mu_old, mu):
                o.copy_(n)
            for o, n in zip(nu_old, nu):
                o.copy_(n)
            mu, nu = mu_old, nu_old
        out = [m.clone() for m in mu]
        return _owned.finish(flat, out, state, count=counts, mu=mu, nu=nu)

    return owned_transform(init, owned_update)


# --- Adan -----------------------------------------------------------------------------------------


class ScaleByAdanState(NamedTuple):
    """``count``: per-leaf updates; ``m``, ``v``, ``n``: the moments of the gradient, of its
    difference and of ``(g + (1-b2) diff)^2``; ``g``: the previous gradient (params-shaped)."""

    count: Any
    m: Any
    v: Any
    n: Any
    g: Any


@recorded
def scale_by_adan(b1: float | torch.Tensor = 0.98, b2: float | torch.Tensor = 0.92, b3: float | torch.Tensor = 0.99,
                  eps: float | torch.Tensor = 1e-8, eps_root: float | torch.Tensor = 0.0) -> GradientTransformation:
    """Adan's Nesterov-momentum estimate (Xie et al., TPAMI 2024, arXiv 2208.06677), as optax.

    ``d = g - g_prev`` (0 at the leaf's first step); ``m = b1 m + (1-b1) g``;
    ``v = b2 v + (1-b2) d``; ``n = b3 n + (1-b3) (g + (1-b2) d)^2``;
    ``u = (m_hat + (1-b2) v_hat) / (sqrt(n_hat + eps_root) + eps)`` with ``x_hat = x / (1 - b^t)``.

    Args:
        b1: decay of ``m``.
        b2: decay of ``v``.
        b3: decay of ``n``.
        eps: added to the root of the denominator.
        eps_root: added inside the root.

    Returns:
        The `GradientTransformation` (state `ScaleByAdanState`).

    Raises:
        ValueError: a decay outside ``[0, 1)`` or a negative eps.

    References:
        Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models",
        arXiv 2208.06677; optax.scale_by_adan.

    Example:
        >>> tx = gx.chain(gx.scale_by_adan(), gx.scale_by_learning_rate(1e-3))
    """
    _check_decays(b1=b1, b2=b2, b3=b3)
    check_float("eps", eps, low=0.0)
    check_float("eps_root", eps_root, low=0.0)

    def init(params: Params) -> ScaleByAdanState:
        z = _tree.tree_zeros_like
        return ScaleByAdanState(_leaf_counts(params), z(params), z(params), z(params), z(params))

    def owned_update(updates: Updates, state: ScaleByAdanState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByAdanState]:
        flat = _owned.live(updates, state, ScaleByAdanState, "scale_by_adan")
        if flat is None:
            return updates, state
        beta1, beta2, beta3, e, er = [_tree.as_scalar(x) for x in (b1, b2, b3, eps, eps_root)]
        g = flat.live
        old_counts = flat.state_live(state.count, "state.count", check_shapes=False)
        prev = flat.state_live(state.g, "state.g")
        if _eager(own, old_counts, beta1, beta2, beta3, e, er):
            return _adan_eager(flat, state, g, old_counts, _held(prev, own), beta1, beta2, beta3, e, er, own)
        if _scalars_traced(old_counts):
            diff = [torch.where(c > 0, x - p, torch.zeros_like(x)) for c, x, p in zip(old_counts, g, prev)]
        else:
            diff = [x - p if int(c) > 0 else torch.zeros_like(x) for c, x, p in zip(old_counts, g, prev)]
        counts = _step_counts(flat, state.count, own.state)
        m = _moment(flat.state_live(state.m, "state.m"), g, beta1, own.state)
        v = _moment(flat.state_live(state.v, "state.v"), diff, beta2, own.state)
        sq = list(_fe.add(g, _fe.mul(diff, 1 - beta2)))
        n = _moment_sq(flat.state_live(state.n, "state.n"), sq, beta3, own.state)
        m_hat = _div_each(m, _bias_corrections(counts, beta1))
        v_hat = _div_each(v, _bias_corrections(counts, beta2))
        n_hat = _div_each(n, _bias_corrections(counts, beta3))
        u = list(_fe.add(m_hat, _fe.mul(v_hat, 1 - beta2)))
        out = list(_fe.div(u, _denominators(n_hat, e, er)))
        if _inplace(own):
            for p, x in zip(prev, g):
                p.copy_(x)
            new_g = prev
        else:
            new_g = [x.clone() for x in g]
        return _owned.finish(flat, out, state, count=counts, m=m, v=v, n=n, g=new_g)

    return owned_transform(init, owned_update)


def _adan_eager(flat: _Flat, state: Any, g: list[torch.Tensor], old_counts: list[torch.Tensor],
                prev: list[torch.Tensor], beta1: float, beta2: float, beta3: float, e: float,
                er: float, own: Ownership) -> tuple[Updates, Any]:
    """scale_by_adan's eager owned step: one temporary (the output); the difference of
    gradients and then the denominator live in the buffer of the previous gradient, which
    receives this gradient last."""
    first = [int(c) == 0 for c in old_counts]
    diff = prev
    _fe.mul_(diff, -1.0)
    _fe.add_(diff, g)  # g - g_prev
    for d, f in zip(diff, first):
        if f:
            d.zero_()
    counts = _step_counts(flat, state.count, own.state)
    m = _moment(_owned.held(flat, state.m, "state.m", own), g, beta1, True)
    v = _moment(_owned.held(flat, state.v, "state.v", own), diff, beta2, True)
    u = list(_fe.add(g, diff, alpha=1 - beta2))
    n = _moment_sq(_owned.held(flat, state.n, "state.n", own), u, beta3, True)
    c1, c2, c3 = [_bias_corrections(counts, b) for b in (beta1, beta2, beta3)]
    # u = m / c1 + (1 - b2) v / c2, written as ((v * k c1) + m) / c1 with k = (1 - b2) / c2
    _copy_(u, v)
    _fe.mul_(u, [(1 - beta2) / b * a for a, b in zip(c1, c2)])
    _fe.add_(u, m)
    _fe.div_(u, c1)
    den = diff
    _copy_(den, n)
    _fe.div_(den, c3)
    if not _is_zero(er):
        _fe.add_(den, er)
    _sqrt_(den)
    _fe.add_(den, e)
    _fe.div_(u, den)
    _copy_(prev, g)
    return _owned.finish(flat, u, state, count=counts, m=m, v=v, n=n, g=prev)


# --- SM3 ------------------------------------------------------------------------------------------


class ScaleBySM3State(NamedTuple):
    """``mu``: per leaf, SM3's per-axis accumulators concatenated into one 1-d tensor of length
    ``sum(shape)`` (for a leaf of fewer than 2 dims: the full accumulator, ``numel`` long);
    ``nu``: the momentum (params-shaped)."""

    mu: Any
    nu: Any


def _sm3_size(p: torch.Tensor) -> int:
    return sum(p.shape) if p.ndim >= 2 else p.numel()


@recorded
def scale_by_sm3(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 1.0,
                 eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """SM3's memory-efficient second moment (Anil et al., NeurIPS 2019, arXiv 1901.11150), as optax.

    For a leaf of ``k >= 2`` dims with one accumulator ``a_i`` per axis ``i`` (``a_i`` has
    ``shape[i]`` entries): ``v = c g^2 + b2 min_i a_i`` (broadcast; ``c = 1`` if ``b2 == 1``, else
    ``1 - b2``); ``a_i <- max of v over the other axes``; for a leaf of fewer dims the accumulator
    is full-sized. ``w = g / sqrt(v + eps)`` where ``v > 0``, else 0; ``nu = b1 nu + (1 - b1) w``;
    ``u = nu``. Layout matters: the accumulators follow the leaf's axes, so a torch ``(out, in)``
    weight keeps accumulators of ``out`` then ``in`` entries (optax's ``(in, out)`` kernel the
    reverse); the updates are the same tensors, transposed.

    Args:
        b1: momentum decay.
        b2: accumulator decay (1: SM3's plain sums).
        eps: added inside the root.

    Returns:
        The `GradientTransformation` (state `ScaleBySM3State`).

    Raises:
        ValueError: a decay outside ``[0, 1]`` or a negative eps; complex params.

    References:
        Anil et al., "Memory-Efficient Adaptive Optimization", NeurIPS 2019, arXiv 1901.11150;
        optax.scale_by_sm3.

    Example:
        >>> tx = gx.chain(gx.scale_by_sm3(), gx.scale_by_learning_rate(1e-2))
    """
    check_float("b1", b1, low=0.0, high=1.0)
    check_float("b2", b2, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0)

    def init(params: Params) -> ScaleBySM3State:
        for p in _tree.tree_flatten(params)[0]:
            if p is not None and p.is_complex():
                raise ValueError("scale_by_sm3 does not support complex params")
        mu = _tree.tree_map(lambda p: torch.zeros(_sm3_size(p), dtype=p.dtype, device=p.device), params)
        return ScaleBySM3State(mu, _tree.tree_zeros_like(params))

    def one(g: torch.Tensor, acc: torch.Tensor, beta2: Any, e: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(beta2, torch.Tensor):
            c = torch.where(beta2 != 1.0, 1.0 - beta2, torch.ones_like(beta2)).to(g.dtype)
        else:
            c = 1.0 - beta2 if beta2 != 1.0 else 1.0
        if g.numel() == 0:
            return g.clone(), acc.clone()
        if g.ndim < 2:
            v = c * g ** 2 + beta2 * acc.reshape(g.shape)
            new_acc = v.reshape(-1)
        else:
            parts = torch.split(acc, list(g.shape))
            low = None
            for i, a in enumerate(parts):
                shape = [1] * i + [g.shape[i]] + [1] * (g.ndim - i - 1)
                a = a.reshape(shape)
                low = a if low is None else torch.minimum(low, a)
            v = c * g ** 2 + beta2 * low
            new_acc = torch.cat([v.amax(dim=[j for j in range(g.ndim) if j != i]) for i in range(g.ndim)])
        inv = torch.where(v > 0, torch.rsqrt(v + e), torch.zeros_like(v))
        return g * inv, new_acc

    def owned_update(updates: Updates, state: ScaleBySM3State, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleBySM3State]:
        flat = _owned.live(updates, state, ScaleBySM3State, "scale_by_sm3")
        if flat is None:
            return updates, state
        beta1, beta2, e = [_tree.as_scalar(x) for x in (b1, b2, eps)]
        accs = flat.state_live(state.mu, "state.mu", check_shapes=False)
        for i, g, a in zip(flat.idx, flat.live, accs):
            if a.shape != (_sm3_size(g),):
                raise ValueError(f"scale_by_sm3: state.mu at '{flat.paths()[i]}' has shape {tuple(a.shape)}, "
                                 f"expected ({_sm3_size(g)},) for an update of shape {tuple(g.shape)}")
        if not _tree.pure_ops() and not any(isinstance(x, torch.Tensor) for x in (beta1, beta2, e)):
            return _sm3_eager(flat, state, _held(accs, own), beta1, beta2, e, own)
        pairs = [one(g, a, beta2, e) for g, a in zip(flat.live, accs)]
        w = [p[0] for p in pairs]
        new_acc = [p[1] for p in pairs]
        nu = _moment(flat.state_live(state.nu, "state.nu"), w, beta1, own.state)
        if _inplace(own):
            for o, n in zip(accs, new_acc):
                o.copy_(n)
            new_acc = accs
        out = [x.clone() for x in nu]
        return _owned.finish(flat, out, state, mu=new_acc, nu=nu)

    return owned_transform(init, owned_update)


def _sm3_eager(flat: _Flat, state: Any, accs: list[torch.Tensor], beta1: float, beta2: float,
               e: float, own: Ownership) -> tuple[Updates, Any]:
    """scale_by_sm3's eager owned step: per leaf one params-shaped temporary ``v`` (the
    accumulator's cover, then ``g / sqrt(v + eps)``, then the output), the state in place.
    With ``eps > 0`` the ``v > 0`` guard needs no mask: ``v = 0`` only where ``g = 0``."""
    c = 1.0 - beta2 if beta2 != 1.0 else 1.0
    w = []
    for g, acc in zip(flat.live, accs):
        if g.numel() == 0:
            w.append(g.clone())
            continue
        if g.ndim < 2:
            v = acc.view(g.shape)
            v.mul_(beta2).addcmul_(g, g, value=c)  # the accumulator itself, in place
            x = torch.add(v, e)
        else:
            parts = torch.split(acc, list(g.shape))
            views = [a.view([1] * i + [g.shape[i]] + [1] * (g.ndim - i - 1)) for i, a in enumerate(parts)]
            x = torch.minimum(views[0], views[1]) if g.ndim == 2 else torch.minimum(views[0], views[1]).expand(g.shape).clone()
            for a in views[2:]:
                torch.minimum(x, a, out=x)
            x.mul_(beta2).addcmul_(g, g, value=c)
            for i, a in enumerate(parts):
                torch.amax(x, dim=[j for j in range(g.ndim) if j != i], out=a)
            v = x
            x.add_(e)
        mask = None if e > 0 else v > 0
        x.rsqrt_().mul_(g)
        if mask is not None:
            x.masked_fill_(~mask, 0.0)
        w.append(x)
    nu = _moment(_owned.held(flat, state.nu, "state.nu", own), w, beta1, True)
    _copy_(w, nu)
    return _owned.finish(flat, w, state, mu=accs, nu=nu)


# --- stateless per-leaf scalings --------------------------------------------------------------------


def _scaled_by(flat: _Flat, factors: list[torch.Tensor], own: Ownership) -> Updates:
    g = flat.live
    if own.may_write(g) and not _tree.pure_ops():
        torch._foreach_mul_(g, [f.to(x.dtype) for f, x in zip(factors, g)])
        return flat.rebuild(g)
    return flat.rebuild([x * f.to(x.dtype) for x, f in zip(g, factors)])


@recorded
def scale_by_trust_ratio(min_norm: float | torch.Tensor = 0.0, trust_coefficient: float | torch.Tensor = 1.0,
                         eps: float | torch.Tensor = 0.0) -> GradientTransformation:
    """The layer-wise trust ratio of LARS / LAMB (You et al., 2017 arXiv 1708.03888; ICLR 2020
    arXiv 1904.00962), as optax.

    Per leaf: ``r = trust_coefficient * ||p|| / (||u|| + eps)`` with each norm floored at
    ``min_norm``; ``r = 1`` where either norm is 0; ``u <- r u``. Norms are of the whole leaf
    (Frobenius), so a torch ``(out, in)`` weight gives optax's ratio for its ``(in, out)`` kernel.

    Args:
        min_norm: the floor of both norms.
        trust_coefficient: the ratio's scale.
        eps: added to the update's norm.

    Returns:
        A stateless `GradientTransformation` (needs ``params``).

    Raises:
        ValueError: a negative argument, or ``update`` without params.

    References:
        You et al., "Large Batch Training of Convolutional Networks", arXiv 1708.03888; You et al.,
        "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv 1904.00962;
        optax.scale_by_trust_ratio.

    Example:
        >>> tx = gx.chain(gx.scale_by_adam(), gx.scale_by_trust_ratio(), gx.scale_by_learning_rate(1e-3))
    """
    check_float("min_norm", min_norm, low=0.0)
    check_float("trust_coefficient", trust_coefficient, low=0.0)
    check_float("eps", eps, low=0.0)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        p = flat.params_live(params, "scale_by_trust_ratio")
        mn, tc, e = [_tree.as_scalar(x) for x in (min_norm, trust_coefficient, eps)]
        pn, un = _safe_norms(p, mn), _safe_norms(flat.live, mn)
        factors = [torch.where((a == 0) | (b == 0), torch.ones_like(a), tc * a / (b + e)) for a, b in zip(pn, un)]
        return _scaled_by(flat, factors, own)

    return stateless(update_fn)


@recorded
def scale_by_param_block_norm(min_scale: float | torch.Tensor = 1e-3) -> GradientTransformation:
    """Scale each leaf's update by its param's norm (optax.scale_by_param_block_norm; the block
    scaling of Adafactor, Shazeer & Stern, ICML 2018, arXiv 1804.04235).

    ``u <- u * max(||p||, min_scale)`` (``min_scale`` where ``||p|| <= min_scale``); whole-leaf
    (Frobenius) norm, the same for a torch ``(out, in)`` weight and optax's ``(in, out)`` kernel.

    Args:
        min_scale: the floor of the norm.

    Returns:
        A stateless `GradientTransformation` (needs ``params``).

    Raises:
        ValueError: a negative ``min_scale``, or ``update`` without params.

    References:
        Shazeer & Stern, "Adafactor", ICML 2018, arXiv 1804.04235; optax.scale_by_param_block_norm.

    Example:
        >>> tx = gx.chain(gx.scale_by_sign(), gx.scale_by_param_block_norm(), gx.scale(-1e-2))
    """
    check_float("min_scale", min_scale, low=0.0)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        p = flat.params_live(params, "scale_by_param_block_norm")
        return _scaled_by(flat, _safe_norms(p, _tree.as_scalar(min_scale)), own)

    return stateless(update_fn)


@recorded
def scale_by_param_block_rms(min_scale: float | torch.Tensor = 1e-3) -> GradientTransformation:
    """Scale each leaf's update by its param's root mean square (optax.scale_by_param_block_rms;
    Adafactor's relative step, Shazeer & Stern, ICML 2018, arXiv 1804.04235).

    ``u <- u * max(rms(p), min_scale)`` (``min_scale`` where ``rms(p) <= min_scale``).

    Args:
        min_scale: the floor of the RMS.

    Returns:
        A stateless `GradientTransformation` (needs ``params``).

    Raises:
        ValueError: a negative ``min_scale``, or ``update`` without params.

    References:
        Shazeer & Stern, "Adafactor", ICML 2018, arXiv 1804.04235; optax.scale_by_param_block_rms.

    Example:
        >>> tx = gx.chain(gx.scale_by_sign(), gx.scale_by_param_block_rms(), gx.scale(-1e-2))
    """
    check_float("min_scale", min_scale, low=0.0)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        p = flat.params_live(params, "scale_by_param_block_rms")
        ms = _tree.as_scalar(min_scale)
        norms = _fe.norm(p)
        rms = [n / math.sqrt(max(x.numel(), 1)) for n, x in zip(norms, p)]
        factors = [torch.where(r <= ms, torch.as_tensor(ms, dtype=r.dtype, device=r.device), r) for r in rms]
        return _scaled_by(flat, factors, own)

    return stateless(update_fn)


@recorded
def scale_by_sign() -> GradientTransformation:
    """``u <- sign(u)`` (signSGD: Bernstein et al., ICML 2018, arXiv 1802.04434; optax.scale_by_sign).

    Returns:
        A stateless `GradientTransformation`.

    References:
        Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018,
        arXiv 1802.04434; optax.scale_by_sign.

    Example:
        >>> tx = gx.chain(gx.scale_by_sign(), gx.scale_by_learning_rate(1e-3))
    """

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        if own.may_write(flat.live) and not _tree.pure_ops():
            torch._foreach_sign_(flat.live)
            return flat.rebuild(flat.live)
        return flat.rebuild(list(_sign(flat.live)))

    return stateless(update_fn)


# --- Polyak step size -----------------------------------------------------------------------------


_POLYAK_EXTRA = ExtraArgs(required=frozenset({"value"}))  # built once, outside any trace


@recorded
def scale_by_polyak(f_min: float | torch.Tensor = 0.0, max_learning_rate: float | torch.Tensor = 1.0,
                    eps: float | torch.Tensor = 0.0, variant: str = "sps") -> GradientTransformation:
    """The Polyak step size (Loizou et al., AISTATS 2021, arXiv 2002.10542), as optax.

    ``u <- min((f - f_min) / (||u||^2 + eps), max_learning_rate) * u`` (0 where
    ``||u||^2 + eps`` is at most float64's machine epsilon); ``variant="sps+"`` clips the gap at 0.
    ``update`` takes the extra argument ``value`` (the loss ``f`` at the current params).

    Args:
        f_min: a lower bound of the loss.
        max_learning_rate: the cap of the step size.
        eps: added to the squared norm.
        variant: ``"sps"`` or ``"sps+"``.

    Returns:
        A stateless `GradientTransformation` with the required extra argument ``value``.

    Raises:
        ValueError: an unknown variant or a negative cap or eps.

    References:
        Loizou et al., "Stochastic Polyak Step-size for SGD", AISTATS 2021, arXiv 2002.10542;
        optax.scale_by_polyak.

    Example:
        >>> tx = gx.chain(gx.scale_by_polyak(max_learning_rate=10.0), gx.scale(-1.0))
        >>> g = {"w": torch.tensor([2.0])}
        >>> u, _ = tx.update(g, tx.init(g), value=torch.tensor(8.0))
        >>> u["w"]  # step (8 - 0) / 2^2 = 2
        tensor([-4.])
    """
    check_float("max_learning_rate", max_learning_rate, low=0.0)
    check_float("eps", eps, low=0.0)
    check_float("f_min", f_min)
    if variant not in ("sps", "sps+"):
        raise ValueError(f"scale_by_polyak: variant must be 'sps' or 'sps+'; got {variant!r}")

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def owned_update(updates: Updates, state: EmptyState, params: Params | None, own: Ownership, *,
                     value: Any) -> tuple[Updates, EmptyState]:
        del params
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        if not isinstance(value, (int, float, torch.Tensor)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
            raise TypeError(f"scale_by_polyak: value must be the loss as a number or a one-element tensor; got {value!r}")
        norms = _fe.norm(flat.live)
        sq = torch.stack([n.to(torch.float64) for n in norms]).square().sum() if len(norms) > 1 else norms[0].double() ** 2
        gap = torch.as_tensor(value, device=sq.device).reshape(()).to(sq.dtype) - _tree.as_scalar(f_min)
        if variant == "sps+":
            gap = torch.relu(gap)
        den = sq + _tree.as_scalar(eps)
        step = torch.where(den <= torch.finfo(torch.float64).eps, torch.zeros_like(den),
                           torch.clamp(gap / den, max=_tree.as_scalar(max_learning_rate)) if not isinstance(
                               _tree.as_scalar(max_learning_rate), torch.Tensor)
                           else torch.minimum(gap / den, max_learning_rate.to(den.dtype)))
        return _scaled_by(flat, [step] * len(flat.live), own), state

    # declared, not read from the signature: an alias rebuilt inside a torch 2.1 trace reads no
    # function's signature, only what the transform carries (`gradxform.base.info_of`)
    return owned_transform(init, owned_update, extra_args=_POLYAK_EXTRA)


# --- optimistic gradient --------------------------------------------------------------------------


class ScaleByOptimisticGradientState(NamedTuple):
    """``count``: per-leaf updates; ``previous_gradient``: last step's updates (params-shaped)."""

    count: Any
    previous_gradient: Any


def _optimistic_slice(g: torch.Tensor, prev: torch.Tensor, out: torch.Tensor, a: float, b: float,
                      first: bool) -> torch.Tensor:
    """One slice of the optimistic step: ``out <- (a + b) g - b g_prev`` (``g_prev = g`` at a leaf's
    first step), then ``prev <- g``; the kernels of the whole-leaf eager form. Returns ``out``."""
    torch.mul(g, a + b, out=out).add_(g if first else prev, alpha=-b)
    prev.copy_(g)
    return out


@recorded
def scale_by_optimistic_gradient(alpha: float | torch.Tensor = 1.0, beta: float | torch.Tensor = 1.0) -> GradientTransformation:
    """Optimistic gradient (Mokhtari et al., AISTATS 2020, arXiv 1901.08511), as optax.

    ``u = (alpha + beta) g_t - beta g_{t-1}`` with ``g_0 = g_1`` (the leaf's first step gives
    ``alpha g``).

    Args:
        alpha: the weight of the current gradient.
        beta: the optimism (weight of the gradient's change).

    Returns:
        The `GradientTransformation` (state `ScaleByOptimisticGradientState`).

    Raises:
        TypeError: a non-numeric argument.

    References:
        Mokhtari, Ozdaglar & Pattathil, "A Unified Analysis of Extra-gradient and Optimistic
        Gradient Methods for Saddle Point Problems", AISTATS 2020, arXiv 1901.08511;
        optax.scale_by_optimistic_gradient.

    Example:
        >>> tx = gx.chain(gx.scale_by_optimistic_gradient(), gx.scale_by_learning_rate(1e-2))
    """
    check_float("alpha", alpha)
    check_float("beta", beta)

    def init(params: Params) -> ScaleByOptimisticGradientState:
        return ScaleByOptimisticGradientState(_leaf_counts(params), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByOptimisticGradientState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByOptimisticGradientState]:
        flat = _owned.live(updates, state, ScaleByOptimisticGradientState, "scale_by_optimistic_gradient")
        if flat is None:
            return updates, state
        a, b = _tree.as_scalar(alpha), _tree.as_scalar(beta)
        g = flat.live
        old_counts = flat.state_live(state.count, "state.count", check_shapes=False)
        prev = flat.state_live(state.previous_gradient, "state.previous_gradient")
        if _eager(own, old_counts, a, b):
            # out = (a + b) g - b g_prev (g_prev = g at a leaf's first step): the one temporary.
            # The state keeps a copy of g, in its own buffers when they are ours, never g itself:
            # a donated update may be reused by the caller (a zero_grad(set_to_none=False) on it
            # would then zero the state)
            first = [int(c) == 0 for c in old_counts]
            if own.state and own.may_write(g) and _owned.on_cpu(g) and _plain(g) and _plain(prev):
                # the output into the owned update itself, one cache-sized slice at a time (read
                # for the output and the new g_prev, then written): no params-sized temporary
                def into_update(i: int, x: torch.Tensor, pv: torch.Tensor, t: torch.Tensor) -> None:
                    x.copy_(_optimistic_slice(x, pv, t, a, b, first[i]))
                _owned.by_slices(list(zip(g, prev)), into_update, scratch=1)
                counts = _step_counts(flat, state.count, own.state)
                return _owned.finish(flat, g, state, count=counts, previous_gradient=prev)
            prev_eff = [x if f else pv for f, x, pv in zip(first, g, prev)]
            out = list(_fe.mul(g, a + b))
            _fe.add_(out, prev_eff, alpha=-b)
            if own.state:
                for pv, x in zip(prev, g):
                    pv.copy_(x)
                new_prev = prev
            else:
                new_prev = [x.clone() for x in g]
            counts = _step_counts(flat, state.count, own.state)
            return _owned.finish(flat, out, state, count=counts, previous_gradient=new_prev)
        if _scalars_traced(old_counts):
            prev_eff = [torch.where(c == 0, x, p) for c, x, p in zip(old_counts, g, prev)]
        else:
            prev_eff = [x if int(c) == 0 else p for c, x, p in zip(old_counts, g, prev)]
        out = list(_fe.add(_fe.mul(g, a + b), _fe.mul(prev_eff, -b)))
        counts = _step_counts(flat, state.count, own.state)
        if _inplace(own):
            for p, x in zip(prev, g):
                p.copy_(x)
            new_prev = prev
        else:
            new_prev = [x.clone() for x in g]
        return _owned.finish(flat, out, state, count=counts, previous_gradient=new_prev)

    return owned_transform(init, owned_update)


# --- DoG ------------------------------------------------------------------------------------------


class ScaleByDistanceOverGradientsState(NamedTuple):
    """``max_dist``: per leaf, the largest distance from the initial params so far (0-d);
    ``grad_sum_of_squares``: per leaf, the running sum of ``||g||^2`` (0-d); ``init_params``: the
    params at ``init`` (in ``param_dtype``)."""

    max_dist: Any
    grad_sum_of_squares: Any
    init_params: Any


def _dog_norms(p: list[torch.Tensor], p0: list[torch.Tensor],
               g: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The norms of a DoG step (Ivgi et al., 2023), shared by the layer-wise
    `scale_by_distance_over_gradients` and the global `gradxform.scale_by_dog`: ``p - p0`` (a
    temporary, returned for `_dog_scaled` to reuse), ``||p_i - p0_i||`` and ``||g_i||`` per leaf
    (foreach norms; the global variant combines them)."""
    tmp = list(_sub(p, p0))
    return tmp, list(_fe.norm(tmp)), list(_fe.norm(g))


def _dog_scaled(flat: _Flat, tmp: list[torch.Tensor], factors: Any) -> Updates:
    """``factor * g`` (``factors``: one 0-d tensor, or one per leaf) written into the temporary
    of `_dog_norms` where its dtype is the update's, so the step makes one temporary."""
    g = flat.live
    if any(t.dtype != x.dtype for t, x in zip(tmp, g)):
        tmp = [torch.empty_like(x) for x in g]
    _copy_(tmp, g)
    if isinstance(factors, list):
        _fe.mul_(tmp, [f.to(x.dtype) for f, x in zip(factors, g)])
    else:
        _fe.mul_(tmp, factors)
    return flat.rebuild(tmp)


@recorded
def scale_by_distance_over_gradients(reps_rel: float = 1e-6, eps: float = 1e-8,
                                     param_dtype: torch.dtype | None = torch.float32,
                                     global_scale: float = 1.0) -> GradientTransformation:
    """Layer-wise DoG, "distance over gradients" (Ivgi, Hinder & Carmon, ICML 2023,
    arXiv 2302.12022), as optax.

    Per leaf: ``d_t = max(d_{t-1}, ||p_t - p_0||)`` with ``d_0 = reps_rel (1 + ||p_0||)``;
    ``G_t = G_{t-1} + ||g_t||^2``; ``u = global_scale * d_t / sqrt(G_t + eps) * g_t``. Positive
    (add a negative scale to descend).

    Args:
        reps_rel: the relative initial distance ``r_eps``.
        eps: added to ``G`` inside the root.
        param_dtype: dtype of the stored initial params (optax's default ``float32``; ``None``:
            the params' own dtype).
        global_scale: a constant factor of the step size.

    Returns:
        The `GradientTransformation` (state `ScaleByDistanceOverGradientsState`; needs ``params``).

    Raises:
        ValueError: a non-positive ``reps_rel`` or a negative eps; ``update`` without params.

    References:
        Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
        Schedule", ICML 2023, arXiv 2302.12022; optax.contrib.dog / optax.scale_by_distance_over_gradients.

    Example:
        >>> tx = gx.chain(gx.scale_by_distance_over_gradients(), gx.scale(-1.0))
    """
    check_float("reps_rel", reps_rel, low=0.0, low_open=True)
    check_float("eps", eps, low=0.0)
    check_float("global_scale", global_scale)
    if param_dtype is not None and not isinstance(param_dtype, torch.dtype):
        raise TypeError(f"param_dtype must be a torch.dtype or None; got {param_dtype!r}")

    def init(params: Params) -> ScaleByDistanceOverGradientsState:
        d0 = _tree.tree_map(lambda p: reps_rel * (1 + torch.linalg.vector_norm(p)), params)
        gs = _tree.tree_map(lambda p: torch.zeros((), dtype=p.dtype, device=p.device), params)
        p0 = _tree.tree_map(lambda p: p.detach().clone() if param_dtype is None else p.detach().to(param_dtype, copy=True),
                            params)
        return ScaleByDistanceOverGradientsState(d0, gs, p0)

    def owned_update(updates: Updates, state: ScaleByDistanceOverGradientsState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByDistanceOverGradientsState]:
        flat = _owned.live(updates, state, ScaleByDistanceOverGradientsState, "scale_by_distance_over_gradients")
        if flat is None:
            return updates, state
        p = flat.params_live(params, "scale_by_distance_over_gradients")
        p0 = flat.state_live(state.init_params, "state.init_params", check_shapes=False)
        d_old = flat.state_live(state.max_dist, "state.max_dist", check_shapes=False)
        gs_old = flat.state_live(state.grad_sum_of_squares, "state.grad_sum_of_squares", check_shapes=False)
        tmp, dist, gn = _dog_norms(p, p0, flat.live)
        d = [torch.maximum(o, x.to(o.dtype)) for o, x in zip(d_old, dist)]
        gs = [o + x.to(o.dtype) ** 2 for o, x in zip(gs_old, gn)]
        factors = [global_scale * (a / torch.sqrt(b + eps)) for a, b in zip(d, gs)]
        out = _dog_scaled(flat, tmp, factors)
        if _inplace(own):
            for o, n in zip(d_old + gs_old, d + gs):
                o.copy_(n)
            d, gs = d_old, gs_old
        return out, _owned.restate(flat, state, max_dist=d, grad_sum_of_squares=gs)

    return owned_transform(init, owned_update)


# --- noise ----------------------------------------------------------------------------------------


class AddNoiseState(NamedTuple):
    """``count``: per-leaf updates; ``key``: the seed (0-d int64), fixed: the noise of a step is a
    function of (``key``, the leaf's count, the leaf's position, the element)."""

    count: Any
    key: torch.Tensor


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) in int64 arithmetic, value in ``[0, 2^32)``."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` in place (the same operations, on a tensor the caller owns)."""
    x.bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _mix32_i32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` in place on an int32 tensor holding the 32-bit patterns: the same function
    modulo 2^32 (int32 products wrap; each right shift is masked to be logical), in half the
    bytes and with a native multiply (int64's is emulated in the CPU's vector units)."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(0x7FEB352D)
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(0x846CA68B - (1 << 32))
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor as int32 (two's complement)."""
    x = x & _M32
    return (x - ((x >> 31) << 32)).to(torch.int32)


_TWO32 = 4294967296.0
_NOISE_CHUNK = 1 << 17  # pairs per eager chunk: the int32 counters (1 MiB) stay in cache


def _normal_like(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` from a 0-d int64 ``seed``: Box-Muller on pairs of
    hashed 32-bit uniforms, both of its outputs used. With ``m = ceil(n / 2)`` pairs, pair ``i``
    hashes the counters ``i`` and ``m + i`` into ``u1 = (h_i + 1) / 2^32``, ``u2 = h_{m+i} / 2^32``
    and gives ``z_i = r cos(2 pi u2)``, ``z_{m+i} = r sin(2 pi u2)``, ``r = sqrt(-2 log u1)``.
    Deterministic, no generator, traceable. Eagerly (not traced) the same operations run in
    place over chunks of pairs, so the integer temporaries stay in cache: the result is the one
    buffer of the noise."""
    n = x.numel()
    m = (n + 1) // 2
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    seed = seed.to(x.device)
    if _tree.traced():
        h = _mix32(_mix32(torch.arange(2 * m, device=x.device, dtype=torch.int64) ^ seed) + seed)
        u = h.to(dtype)
        r = torch.sqrt(-2.0 * torch.log((u[:m] + 1.0) / _TWO32))
        theta = 2.0 * math.pi * (u[m:] / _TWO32)
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)])
    else:
        z = torch.empty(2 * m, device=x.device, dtype=dtype)
        narrow = 2 * m < 2**31  # the counters fit int32: the hash runs on the low 32 bits
        seed32 = _as_i32(seed) if narrow else seed
        for s in range(0, m, _NOISE_CHUNK):
            e = min(m, s + _NOISE_CHUNK)
            if narrow:  # the same values as the int64 branch (all of it is arithmetic mod 2^32)
                a = torch.arange(s, e, device=x.device, dtype=torch.int32)
                h = _mix32_i32_(_mix32_i32_(torch.cat([a, a + m]).bitwise_xor_(seed32)).add_(seed32))
                h = h.to(torch.int64).bitwise_and_(_M32)
            else:
                a = torch.arange(s, e, device=x.device, dtype=torch.int64)
                h = _mix32_(_mix32_(torch.cat([a, a + m]).bitwise_xor_(seed)).add_(seed))
            u = h.to(dtype)
            k = e - s
            r = u[:k].add_(1.0).div_(_TWO32).log_().mul_(-2.0).sqrt_()
            theta = u[k:].div_(_TWO32).mul_(2.0 * math.pi)
            torch.cos(theta, out=z[s:e]).mul_(r)
            torch.sin(theta, out=z[m + s:m + e]).mul_(r)
    z = z[:n].reshape(x.shape)
    return z if z.dtype == x.dtype else z.to(x.dtype)


@recorded
def add_noise(eta: float | torch.Tensor = 0.01, gamma: float | torch.Tensor = 0.55, key: int = 0) -> GradientTransformation:
    """Annealed Gaussian gradient noise (Neelakantan et al., 2015, arXiv 1511.06807), as optax.

    ``u <- u + sqrt(eta / t^gamma) * z``, ``z ~ N(0, 1)``, ``t`` the leaf's step (from 1). The
    noise is seeded from the state (``key``), never from torch's global generator: a run is
    reproducible from its state and a checkpoint resumes the same sequence. Not JAX's PRNG:
    optax draws different (equally distributed) numbers.

    Args:
        eta: the initial variance.
        gamma: the decay exponent of the variance.
        key: the seed (an int).

    Returns:
        The `GradientTransformation` (state `AddNoiseState`).

    Raises:
        ValueError: a negative ``eta`` or ``gamma``; TypeError: a non-int ``key``.

    References:
        Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks",
        arXiv 1511.06807; optax.add_noise.

    Example:
        >>> tx = gx.chain(gx.add_noise(0.01, 0.55, key=0), gx.scale_by_learning_rate(1e-2))
    """
    check_float("eta", eta, low=0.0)
    check_float("gamma", gamma, low=0.0)
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"add_noise: key must be an int seed; got {key!r}")

    def init(params: Params) -> AddNoiseState:
        return AddNoiseState(_leaf_counts(params), torch.tensor(key & ((1 << 62) - 1), dtype=torch.int64))

    def owned_update(updates: Updates, state: AddNoiseState, params: Params | None,
                     own: Ownership) -> tuple[Updates, AddNoiseState]:
        flat = _owned.live(updates, state, AddNoiseState, "add_noise")
        if flat is None:
            return updates, state
        e, gm = _tree.as_scalar(eta), _tree.as_scalar(gamma)
        counts = _step_counts(flat, state.count, own.state)
        out = []
        for i, x, c in zip(flat.idx, flat.live, counts):
            seed = _mix32(_mix32(state.key) + _mix32(c * 1000003 + i))
            t = c.to(torch.float64)
            std = torch.sqrt(e / t ** gm).to(x.dtype).to(x.device)
            z = _normal_like(x, seed)
            # eagerly the noise is a fresh buffer of ours: scale it and add the update in place
            out.append(x + std * z if _tree.traced() else z.mul_(std).add_(x))
        return _owned.finish(flat, out, state, count=counts)

    return owned_transform(init, owned_update)


# --- optax's Rprop (private block) ------------------------------------------------------------------


class OptaxRpropState(NamedTuple):
    """``step_sizes``: per-element step sizes in units of the learning rate (1 at ``init``);
    ``prev_updates``: last step's signed steps (absolute)."""

    step_sizes: Any
    prev_updates: Any


def _rprop_slice_step(lr: float, em: float, ep: float, lo: float, hi: float) -> Callable[..., None]:
    """One slice of optax's Rprop, eager and owned: ``step(i, g, step_sizes, prev, out, sgn, a)``
    rewrites the state in place and writes the output (``sgn``, ``a``: scratch slices). The
    selects are exact arithmetic on sgn = sign(g * prev) (CPU comparisons, where and masked_fill
    are not vectorised: 3-15x the cost of a multiply): factor = clamp(K sgn, em, ep) is em or ep
    exactly; nz = sgn^2 and keep = clamp(sgn + 1, 0, 1) are 0 or 1, and lerp(a, b, w) is a at
    w = 0 and b at w = 1 exactly (torch's two-sided lerp; finite values); a zeroed entry may be
    -0.0 where the select gives 0.0 (equal values)."""
    big = 2.0 * max(abs(ep), abs(em), 1.0)
    rel_lo, rel_hi = lo / lr, hi / lr

    def step(i: int, gs: torch.Tensor, st: torch.Tensor, pv: torch.Tensor, os: torch.Tensor,
             sgn: torch.Tensor, a: torch.Tensor) -> None:
        torch.mul(gs, pv, out=sgn).sign_()
        torch.mul(sgn, big, out=a).clamp_(min=em, max=ep).mul_(st).clamp_(min=rel_lo, max=rel_hi)
        # the step sizes (units of lr); nz made in the output's slice, written below
        st.lerp_(a, torch.mul(sgn, sgn, out=os))
        keep = sgn.add_(1.0).clamp_(min=0.0, max=1.0)
        torch.mul(pv, keep, out=os)  # the output: last step's update
        torch.sign(gs, out=pv).mul_(st).mul_(lr).mul_(keep)  # this step's update
    return step


@recorded
def _scale_by_optax_rprop(learning_rate: Any, eta_minus: Any = 0.5, eta_plus: Any = 1.2, min_step_size: Any = 1e-6,
                          max_step_size: Any = 50.0) -> GradientTransformation:
    """optax's scale_by_rprop with step sizes kept relative to the learning rate: with a constant
    rate exactly optax's rule; a changed rate (a scheduler) scales the steps from then on."""

    def init(params: Params) -> OptaxRpropState:
        return OptaxRpropState(_tree.tree_map(torch.ones_like, params), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: OptaxRpropState, params: Params | None,
                     own: Ownership) -> tuple[Updates, OptaxRpropState]:
        flat = _owned.live(updates, state, OptaxRpropState, "optax_rprop")
        if flat is None:
            return updates, state
        lr, em, ep, lo, hi = [_tree.as_scalar(x) for x in (learning_rate, eta_minus, eta_plus, min_step_size,
                                                           max_step_size)]
        steps_old = flat.state_live(state.step_sizes, "state.step_sizes")
        prev_old = flat.state_live(state.prev_updates, "state.prev_updates")
        if (_inplace(own) and not any(isinstance(x, torch.Tensor) for x in (lr, em, ep, lo, hi)) and em <= ep
                and _owned.on_cpu(flat.live)):
            # eager and owned: slice by slice (`_owned.by_slices`), the state rewritten in place,
            # g and the state read once, the output written once (`_rprop_slice_step`)
            out = [torch.empty_like(g) for g in flat.live]
            _owned.by_slices(list(zip(flat.live, steps_old, prev_old, out)), _rprop_slice_step(lr, em, ep, lo, hi), 2)
            return flat.rebuild(out), state
        steps, prev, out = [], [], []
        for g, s_old, p_old in zip(flat.live, steps_old, prev_old):
            s = g * p_old
            factor = torch.where(s > 0, torch.as_tensor(ep, dtype=g.dtype), torch.as_tensor(em, dtype=g.dtype))
            rel_lo, rel_hi = lo / lr, hi / lr
            if isinstance(lr, torch.Tensor):
                rel_lo, rel_hi = rel_lo.to(g.dtype), rel_hi.to(g.dtype)
            st = torch.where(s == 0, s_old, torch.clamp(s_old * factor, min=rel_lo, max=rel_hi))
            step = st * (lr.to(g.dtype) if isinstance(lr, torch.Tensor) else lr)
            pv = torch.where(s < 0, torch.zeros_like(g), step * torch.sign(g))
            out.append(torch.where(s < 0, torch.zeros_like(p_old), p_old))
            steps.append(st)
            prev.append(pv)
        if _inplace(own):
            for o, n in zip(steps_old + prev_old, steps + prev):
                o.copy_(n)
            steps, prev = steps_old, prev_old
        return _owned.finish(flat, out, state, step_sizes=steps, prev_updates=prev)

    return owned_transform(init, owned_update)


@recorded
def _ema_no_debias(decay: Any) -> GradientTransformation:
    """optax.ema(decay, debias=False): ``m = (1 - decay) g + decay m``; ``u = m``."""

    def init(params: Params) -> Any:
        return _EmaState(_tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: Any, params: Params | None, own: Ownership) -> tuple[Updates, Any]:
        flat = _owned.live(updates, state, _EmaState, "signum (ema)")
        if flat is None:
            return updates, state
        m = _moment(flat.state_live(state.ema, "state.ema"), flat.live, _tree.as_scalar(decay), own.state)
        return _owned.finish(flat, [x.clone() for x in m], state, ema=m)

    return owned_transform(init, owned_update)


class _EmaState(NamedTuple):
    """``ema``: the momentum of signum (params-shaped)."""

    ema: Any


@recorded
def _add_scaled_params(weight: Any) -> GradientTransformation:
    """``u <- u + weight * p`` for any sign of ``weight`` (fromage's shrink).

    Eager on CPU leaves with a number ``weight``, ``weight * p`` is made one cache-sized slice at
    a time (`_owned.by_slices`) and added into an update the caller owns, or, for a caller that
    adds the update into the params right after (`gradxform.base.call_apply`), ``u + weight p``
    is added into the params slice by slice: the kernels of the pure form per element (``+`` is
    commutative to the bit), no params-sized temporary."""

    def step(updates: Updates, params: Params | None, own: Ownership, apply: bool) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        p = flat.params_live(params, "fromage")
        w, u = _tree.as_scalar(weight), flat.live
        sliced = (isinstance(w, (int, float)) and _owned.on_cpu(u) and _plain(u) and _plain(p)
                  and all(a.dtype == b.dtype for a, b in zip(u, p)))
        ps = _apply_params(flat, params, u) if apply and sliced else None
        if ps is not None:
            def into_params(i: int, pi: torch.Tensor, ui: torch.Tensor, s: torch.Tensor) -> None:
                pi.add_(torch.mul(pi, w, out=s).add_(ui))
            _owned.by_slices(list(zip(ps, u)), into_params, scratch=1)
            return flat.rebuild([None] * len(u))
        if sliced and own.may_write(u):
            _add_scaled_(u, p, w)  # u + (w p), w p made slice by slice in a scratch
            return flat.rebuild(u)
        return flat.rebuild(list(_fe.add(u, _fe.mul(p, w))))

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        return step(updates, params, own, False)

    def owned_apply(updates: Updates, state: Any, params: Params, own: Ownership) -> tuple[Updates, Any]:
        return step(updates, params, own, True), state

    return declare(stateless(update_fn), owned_apply=owned_apply)


# --- aliases --------------------------------------------------------------------------------------


def _sliced_chain(tx: GradientTransformation, members: int, state_cls: type, who: str, buffers: tuple[str, ...],
                  hyperparams: tuple[Any, ...], body: Callable[..., Callable[..., None]],
                  scratch: int = 1, when: Callable[..., bool] | None = None) -> GradientTransformation:
    """``tx`` (a `chain` of ``members`` ending in ``scale_by_learning_rate``, whose first member
    keeps ``state_cls``: a per-leaf ``count`` when it has one, and the params-shaped ``buffers``)
    declaring an ``owned_apply`` (`gradxform.base.call_apply`) that runs the whole chain one
    cache-sized slice at a time and adds into the params: the update is never params-sized.

    ``body(*numbers, ts)`` (the ``hyperparams`` read as numbers, ``ts[i]`` leaf ``i``'s step
    number after this step, 1 at its first; 0 without a count) returns ``step(i, g, *buffers,
    param, *scratch)`` (``scratch`` slices) for `_owned.by_slices`, written with the kernels of
    the members' eager paths, so the numbers are the chain's to the bit
    (`tests/test_optax_slices.py`). ``when(*numbers)``, if given, may decline the numbers.
    Anything else (declined numbers, a hyperparameter that stays a tensor, a traced or
    ``torch.func`` step, params not on the CPU or not plain) takes the chain's own
    ``owned_apply``."""
    chain_apply = info_of(tx).owned_apply
    if chain_apply is None:
        return tx
    counted = "count" in state_cls._fields

    def owned_apply(updates: Updates, state: tuple[Any, ...], params: Params, own: Ownership) -> tuple[Updates, Any]:
        if not isinstance(state, tuple) or len(state) != members:
            return chain_apply(updates, state, params, own)  # (which names what is wrong)
        flat = _owned.live(updates, state[0], state_cls, who)
        numbers = [_tree.as_scalar(x) for x in hyperparams]
        ps = _apply_params(flat, params, flat.live) if flat is not None else None
        if (ps is None or _tree.pure_ops() or not all(isinstance(x, (int, float)) for x in numbers)
                or (when is not None and not when(*numbers))):
            return chain_apply(updates, state, params, own)
        trees = {f: _owned.held(flat, getattr(state[0], f), f"state.{f}", own) for f in buffers}
        ts = [0] * len(ps)
        if counted:
            trees["count"] = _step_counts(flat, state[0].count, own.state)
            ts = [int(c) for c in trees["count"]]
        _owned.by_slices(list(zip(flat.live, *[trees[f] for f in buffers], ps)), body(*numbers, ts), scratch=scratch)
        return flat.rebuild([None] * len(ps)), (_owned.restate(flat, state[0], **trees), *state[1:])

    return declare(tx, owned_apply=owned_apply)


def _sliced_moments_chain(tx: GradientTransformation, members: int, state_cls: type, who: str, lr: Any, b1: Any,
                          b2: Any, others: tuple[Any, ...], make_step: Callable[..., Callable[..., None]],
                          weight_decay: Any = None, when: Callable[..., bool] | None = None) -> GradientTransformation:
    """`_sliced_chain` for ``chain(block, [add_decayed_weights(weight_decay)],
    scale_by_learning_rate(lr))`` with a two-moment block (state ``count``, ``mu``, ``nu``) whose
    slice step is ``make_step(beta1, beta2, *others, ts)`` (`_adam_slice_step`'s signature): the
    block's output is made in a scratch slice, decayed and added into the params times ``-lr``."""
    use_wd = weight_decay is not None

    def body(k: float, beta1: float, beta2: float, *rest: Any) -> Callable[..., None]:
        *values, wd, ts = rest
        inner = make_step(beta1, beta2, *values, ts)
        c1s, c2s = _corrections(ts, beta1), _corrections(ts, beta2)

        def step(i: int, gs: torch.Tensor, ms: torch.Tensor, vs: torch.Tensor, pf: torch.Tensor,
                 os: torch.Tensor, t: torch.Tensor) -> None:
            inner(i, c1s[i], c2s[i], gs, ms, vs, os, t)  # the block's output, in a scratch slice
            if use_wd:
                os.add_(pf, alpha=wd)  # add_decayed_weights
            pf.add_(os.mul_(k))  # scale_by_learning_rate's add into the params
        return step

    return _sliced_chain(tx, members, state_cls, who, ("mu", "nu"),
                         (-1.0 * lr, b1, b2, *others, weight_decay if use_wd else 0.0), body, scratch=2, when=when)


def _nonzero(x: Any) -> bool:
    if not isinstance(x, torch.Tensor) and callable(x):
        return True
    if isinstance(x, torch.Tensor):
        return bool((x != 0).any())
    return x != 0


def _check_lr(learning_rate: Any) -> None:
    if learning_rate is None:
        raise TypeError("learning_rate is required (optax's aliases have no default learning rate)")
    check_float("learning_rate", learning_rate, low=0.0)


def _decayed(parts: list[GradientTransformation], weight_decay: Any, mask: Any, use: bool) -> None:
    if use:
        parts.append(add_decayed_weights(weight_decay, mask))


def _lion(lr: Any, b1: Any, b2: Any, weight_decay: Any, mask: Any, use_weight_decay: bool) -> GradientTransformation:
    parts = [scale_by_lion(b1, b2)]
    _decayed(parts, weight_decay, mask, use_weight_decay)
    tx = chain(*parts, scale_by_learning_rate(lr))
    if mask is not None:
        return tx

    def body(k: float, beta1: float, beta2: float, wd: float, ts: list[int]) -> Callable[..., None]:
        def step(i: int, gs: torch.Tensor, ms: torch.Tensor, pf: torch.Tensor, t: torch.Tensor) -> None:
            torch.lerp(ms, gs, 1 - beta1, out=t).sign_()  # scale_by_lion
            ms.lerp_(gs, 1 - beta2)
            if use_weight_decay:
                t.add_(pf, alpha=wd)  # add_decayed_weights
            pf.add_(t.mul_(k))  # scale_by_learning_rate's add into the params
        return step

    return _sliced_chain(tx, len(parts) + 1, ScaleByLionState, "scale_by_lion", ("mu",),
                         (-1.0 * lr, b1, b2, weight_decay if use_weight_decay else 0.0), body)


@recorded
def lion(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99, weight_decay: ScalarOrSchedule = 1e-3,
         mask: Any = None) -> GradientTransformation:
    """Lion as optax.lion (Chen et al., NeurIPS 2023, arXiv 2302.06675).

    ``p <- p - lr * (sign((1-b1) g + b1 m) + weight_decay * p)``; ``m <- (1-b2) g + b2 m``:
    ``chain(scale_by_lion, add_decayed_weights, scale_by_learning_rate)``.

    Args:
        learning_rate: the step size (a number, 0-d tensor or schedule; ``group["lr"]``).
        b1: update interpolation. b2: momentum decay.
        weight_decay: decoupled decay (times the learning rate).
        mask: which leaves to decay (a pytree of bools or a function of params).

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Chen et al., arXiv 2302.06675; optax.lion (https://optax.readthedocs.io/en/latest/api/optimizers.html).

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.lion(1e-4))
    """
    _check_lr(learning_rate)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_lion, static_args=("mask", "use_weight_decay"))(
        lr=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask, use_weight_decay=_nonzero(weight_decay))


def _adam_wd(lr: Any, b1: Any, b2: Any, eps: Any, eps_root: Any, weight_decay: Any, mask: Any, nesterov: bool,
             kind: str, use_weight_decay: bool, trust_ratio: bool) -> GradientTransformation:
    parts = [_scale_by_optax_adam(b1, b2, eps, eps_root, nesterov, kind)]
    _decayed(parts, weight_decay, mask, use_weight_decay)
    if trust_ratio:
        parts.append(scale_by_trust_ratio())
    tx = chain(*parts, scale_by_learning_rate(lr))
    if trust_ratio or mask is not None or kind not in ("adam", "adamax"):
        return tx
    return _sliced_moments_chain(
        tx, len(parts) + 1, OptaxAdamState, "scale_by_adam (optax)", lr, b1, b2, (eps, eps_root),
        lambda beta1, beta2, e, er, ts: _adam_slice_step(kind, nesterov, beta1, beta2, e, er, ts),
        weight_decay if use_weight_decay else None, when=lambda k, beta1, *rest: _adam_sliceable(kind, nesterov, beta1))


def _adam_alias(learning_rate: Any, b1: Any, b2: Any, eps: Any, eps_root: Any, weight_decay: Any, mask: Any,
                nesterov: bool, kind: str, trust_ratio: bool) -> GradientTransformation:
    _check_lr(learning_rate)
    _check_decays(b1=b1, b2=b2)
    check_float("eps", eps, low=0.0)
    check_float("eps_root", eps_root, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_adam_wd, static_args=("mask", "nesterov", "kind", "use_weight_decay", "trust_ratio"))(
        lr=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask,
        nesterov=nesterov, kind=kind, use_weight_decay=_nonzero(weight_decay), trust_ratio=trust_ratio)


@recorded
def lamb(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, eps_root: float = 0.0,
         weight_decay: ScalarOrSchedule = 0.0, mask: Any = None) -> GradientTransformation:
    """LAMB as optax.lamb (You et al., ICLR 2020, arXiv 1904.00962).

    ``a = adam(g) + weight_decay * p`` (optax's Adam: ``m_hat / (sqrt(v_hat + eps_root) + eps)``);
    ``p <- p - lr * r a`` with the trust ratio ``r = ||p|| / ||a||`` per leaf (1 where a norm is 0).

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2: moment decays. eps, eps_root: as optax.
        weight_decay: decay added before the trust ratio. mask: which leaves to decay.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
        arXiv 1904.00962; optax.lamb.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.lamb(1e-3, weight_decay=0.01))
    """
    return _adam_alias(learning_rate, b1, b2, eps, eps_root, weight_decay, mask, False, "adam", True)


@recorded
def nadamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
           weight_decay: ScalarOrSchedule = 1e-4, mask: Any = None) -> GradientTransformation:
    """NAdamW as optax.nadamw (Dozat, ICLR 2016 workshop; Loshchilov & Hutter, ICLR 2019).

    optax's Nesterov Adam: ``m_hat = b1 m / (1-b1^(t+1)) + (1-b1) g / (1-b1^t)``,
    ``u = m_hat / (sqrt(v_hat + eps_root) + eps)``; ``p <- p - lr (u + weight_decay p)``.
    Differs from torch.optim.NAdam (momentum decay schedule ``mu_t``, coupled decay).

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, eps, eps_root: as optax.
        weight_decay: decoupled decay. mask: which leaves to decay.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop; optax.nadamw.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.nadamw(1e-3))
    """
    return _adam_alias(learning_rate, b1, b2, eps, eps_root, weight_decay, mask, True, "adam", False)


@recorded
def amsgrad(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
            eps_root: float = 0.0) -> GradientTransformation:
    """AMSGrad as optax.amsgrad (Reddi et al., ICLR 2018, arXiv 1904.09237).

    ``v_max = max(v_max, v / (1 - b2^t))`` (the maximum of the *bias-corrected* second moment,
    unlike torch.optim.Adam(amsgrad=True), which keeps the maximum of ``v`` and corrects after);
    ``u = m_hat / (sqrt(v_max + eps_root) + eps)``; ``p <- p - lr u``.

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, eps, eps_root: as optax.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018; optax.amsgrad.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.amsgrad(1e-3))
    """
    return _adam_alias(learning_rate, b1, b2, eps, eps_root, 0.0, None, False, "amsgrad", False)


@recorded
def adamaxw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
            weight_decay: ScalarOrSchedule = 1e-4, mask: Any = None) -> GradientTransformation:
    """AdaMaxW as optax.adamaxw (Kingma & Ba, 2015, Section 7.1; Loshchilov & Hutter, 2019).

    ``v = max(b2 v, |g| + eps)`` (eps inside the maximum, as optax: torch.optim.Adamax adds it the
    same way); ``u = (m / (1 - b1^t)) / v``; ``p <- p - lr (u + weight_decay p)``.

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, eps: as optax.
        weight_decay: decoupled decay. mask: which leaves to decay.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Kingma & Ba, "Adam", ICLR 2015, arXiv 1412.6980, Section 7.1; optax.adamaxw.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adamaxw(1e-3))
    """
    return _adam_alias(learning_rate, b1, b2, eps, 0.0, weight_decay, mask, False, "adamax", False)


def _lars(lr: Any, weight_decay: Any, weight_decay_mask: Any, trust_coefficient: Any, eps: Any, trust_ratio_mask: Any,
          momentum: Any, nesterov: bool, use_weight_decay: bool, use_momentum: bool) -> GradientTransformation:
    parts = []
    if use_weight_decay:
        parts.append(add_decayed_weights(weight_decay, None if weight_decay_mask is True else weight_decay_mask))
    tr = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    parts.append(tr if trust_ratio_mask is True else masked(tr, trust_ratio_mask))
    parts.append(scale_by_learning_rate(lr))
    if use_momentum:
        parts.append(trace(momentum, nesterov=nesterov))
    return chain(*parts)


@recorded
def lars(learning_rate: ScalarOrSchedule, weight_decay: ScalarOrSchedule = 0.0, weight_decay_mask: Any = True,
         trust_coefficient: float = 0.001, eps: float = 0.0, trust_ratio_mask: Any = True, momentum: float = 0.9,
         nesterov: bool = False) -> GradientTransformation:
    """LARS as optax.lars (You, Gitman & Ginsburg, 2017, arXiv 1708.03888).

    ``a = g + weight_decay p``; ``a <- trust_coefficient ||p|| / (||a|| + eps) * a`` per leaf;
    ``b = momentum b - lr a`` (optax's trace *after* the learning rate); ``p <- p + b``.

    Args:
        learning_rate: step size (``group["lr"]``). weight_decay: L2 decay added to the gradient.
        weight_decay_mask: ``True`` (all leaves) or a mask. trust_coefficient, eps: of the ratio.
        trust_ratio_mask: ``True`` or a mask of the leaves that get the ratio.
        momentum: momentum decay. nesterov: Nesterov momentum.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888;
        optax.lars.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.lars(0.1, weight_decay=1e-4))
    """
    _check_lr(learning_rate)
    check_float("weight_decay", weight_decay, low=0.0)
    check_float("momentum", momentum, low=0.0)
    return inject_hyperparams(_lars, static_args=("weight_decay_mask", "trust_ratio_mask", "nesterov", "use_weight_decay",
                                                  "use_momentum"))(
        lr=learning_rate, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
        trust_coefficient=trust_coefficient, eps=eps, trust_ratio_mask=trust_ratio_mask, momentum=momentum,
        nesterov=nesterov, use_weight_decay=_nonzero(weight_decay), use_momentum=_nonzero(momentum))


def _belief(lr: Any, b1: Any, b2: Any, eps: Any, eps_root: Any, nesterov: bool) -> GradientTransformation:
    tx = chain(scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov), scale_by_learning_rate(lr))
    if nesterov:
        return tx
    return _sliced_moments_chain(tx, 2, ScaleByBeliefState, "scale_by_belief", lr, b1, b2, (eps, eps_root),
                                 _belief_slice_step)


@recorded
def adabelief(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16,
              eps_root: float = 1e-16, *, nesterov: bool = False) -> GradientTransformation:
    """AdaBelief as optax.adabelief (Zhuang et al., NeurIPS 2020, arXiv 2010.07468).

    ``p <- p - lr * u`` with ``u`` from `scale_by_belief` (no weight decay, no rectification:
    the adabelief-pytorch package's defaults differ).

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, eps, eps_root: as `scale_by_belief`.
        nesterov: optax's Nesterov first moment.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Zhuang et al., arXiv 2010.07468; optax.adabelief.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adabelief(1e-3))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_belief, static_args=("nesterov",))(lr=learning_rate, b1=b1, b2=b2, eps=eps,
                                                                   eps_root=eps_root, nesterov=nesterov)


def _yogi(lr: Any, b1: Any, b2: Any, eps: Any) -> GradientTransformation:
    tx = chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(lr))
    # (scale_by_yogi's eps_root default, 0.0, as the block reads it)
    return _sliced_moments_chain(tx, 2, ScaleByYogiState, "scale_by_yogi", lr, b1, b2, (eps, 0.0), _yogi_slice_step)


@recorded
def yogi(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3) -> GradientTransformation:
    """Yogi as optax.yogi (Zaheer et al., NeurIPS 2018): ``p <- p - lr * u``, ``u`` from `scale_by_yogi`.

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, eps: as `scale_by_yogi`.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018; optax.yogi.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.yogi(1e-2))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_yogi)(lr=learning_rate, b1=b1, b2=b2, eps=eps)


def _novograd(lr: Any, b1: Any, b2: Any, eps: Any, eps_root: Any, weight_decay: Any) -> GradientTransformation:
    return chain(scale_by_novograd(b1, b2, eps, eps_root, weight_decay), scale_by_learning_rate(lr))


@recorded
def novograd(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.25, eps: float = 1e-6,
             eps_root: float = 0.0, weight_decay: float = 0.0) -> GradientTransformation:
    """NovoGrad as optax.novograd (Ginsburg et al., 2019, arXiv 1905.11286): ``p <- p - lr * m``
    with ``m`` from `scale_by_novograd` (weight decay inside the momentum).

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, eps, eps_root, weight_decay: as the block.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Ginsburg et al., arXiv 1905.11286; optax.novograd.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.novograd(1e-2))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_novograd)(lr=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                         weight_decay=weight_decay)


def _adan(lr: Any, b1: Any, b2: Any, b3: Any, eps: Any, eps_root: Any, weight_decay: Any, mask: Any,
          use_weight_decay: bool) -> GradientTransformation:
    parts = [scale_by_adan(b1, b2, b3, eps, eps_root)]
    _decayed(parts, weight_decay, mask, use_weight_decay)
    return chain(*parts, scale_by_learning_rate(lr))


@recorded
def adan(learning_rate: ScalarOrSchedule, b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8,
         eps_root: float = 1e-8, weight_decay: ScalarOrSchedule = 0.0, mask: Any = None) -> GradientTransformation:
    """Adan as optax.adan (Xie et al., arXiv 2208.06677): ``p <- p - lr (u + weight_decay p)``
    with ``u`` from `scale_by_adan` (note the alias's ``eps_root=1e-8``, as optax).

    Args:
        learning_rate: step size (``group["lr"]``). b1, b2, b3, eps, eps_root: as the block.
        weight_decay: decoupled decay. mask: which leaves to decay.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Xie et al., arXiv 2208.06677; optax.adan.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adan(1e-3))
    """
    _check_lr(learning_rate)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_adan, static_args=("mask", "use_weight_decay"))(
        lr=learning_rate, b1=b1, b2=b2, b3=b3, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask,
        use_weight_decay=_nonzero(weight_decay))


def _sm3(lr: Any, momentum: Any) -> GradientTransformation:
    return chain(scale_by_sm3(momentum), scale_by_learning_rate(lr))


@recorded
def sm3(learning_rate: ScalarOrSchedule, momentum: float = 0.9) -> GradientTransformation:
    """SM3 as optax.sm3 (Anil et al., NeurIPS 2019, arXiv 1901.11150): ``p <- p - lr u`` with ``u``
    from `scale_by_sm3` (``b1 = momentum``, ``b2 = 1``). Accumulators follow the leaf's axes (see
    `scale_by_sm3`); optax takes no schedule here, gradxform does.

    Args:
        learning_rate: step size (``group["lr"]``). momentum: ``b1`` of the block.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Anil et al., "Memory-Efficient Adaptive Optimization", arXiv 1901.11150; optax.sm3.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.sm3(0.1))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_sm3)(lr=learning_rate, momentum=momentum)


def _fromage(lr: Any, min_norm: Any) -> GradientTransformation:
    mult = 1 / (1 + lr ** 2) ** 0.5
    return chain(scale_by_trust_ratio(min_norm), scale_by_learning_rate(lr * mult), _add_scaled_params(mult - 1))


@recorded
def fromage(learning_rate: ScalarOrSchedule, min_norm: float = 1e-6) -> GradientTransformation:
    """Fromage as optax.fromage (Bernstein et al., NeurIPS 2020, arXiv 2002.03432).

    With ``c = 1 / sqrt(1 + lr^2)``: ``p <- c (p - lr ||p|| / ||g|| g)`` per leaf (norms floored at
    ``min_norm``), i.e. ``chain(scale_by_trust_ratio(min_norm), scale_by_learning_rate(lr c),
    u + (c - 1) p)``.

    Args:
        learning_rate: step size (``group["lr"]``). min_norm: floor of the norms.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Bernstein, Vahdat, Yue & Liu, "On the distance between two neural networks and the stability
        of learning", NeurIPS 2020, arXiv 2002.03432; optax.fromage.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.fromage(1e-2))
    """
    _check_lr(learning_rate)
    check_float("min_norm", min_norm, low=0.0)
    return inject_hyperparams(_fromage)(lr=learning_rate, min_norm=min_norm)


def _sign_sgd(lr: Any) -> GradientTransformation:
    return chain(scale_by_sign(), scale_by_learning_rate(lr))


@recorded
def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """signSGD as optax.sign_sgd (Bernstein et al., ICML 2018, arXiv 1802.04434): ``p <- p - lr sign(g)``.

    Args:
        learning_rate: step size (``group["lr"]``).

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: a negative learning rate.

    References:
        Bernstein et al., arXiv 1802.04434; optax.sign_sgd.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.sign_sgd(1e-3))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_sign_sgd)(lr=learning_rate)


def _signum(lr: Any, beta: Any) -> GradientTransformation:
    def body(k: float, b: float, ts: list[int]) -> Callable[..., None]:
        def step(i: int, gs: torch.Tensor, ms: torch.Tensor, pf: torch.Tensor, t: torch.Tensor) -> None:
            ms.lerp_(gs, 1 - b)  # the EMA
            pf.add_(torch.sign(ms, out=t).mul_(k))  # its sign, -lr times it into the params
        return step

    return _sliced_chain(chain(_ema_no_debias(beta), scale_by_sign(), scale_by_learning_rate(lr)), 3, _EmaState,
                         "signum (ema)", ("ema",), (-1.0 * lr, beta), body)


@recorded
def signum(learning_rate: ScalarOrSchedule, beta: float = 0.9) -> GradientTransformation:
    """Signum as optax.signum (Bernstein et al., ICML 2018, arXiv 1802.04434).

    ``m = beta m + (1 - beta) g`` (no debiasing); ``p <- p - lr sign(m)``.

    Args:
        learning_rate: step size (``group["lr"]``). beta: momentum decay.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Bernstein et al., arXiv 1802.04434; optax.signum.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.signum(1e-3))
    """
    _check_lr(learning_rate)
    check_float("beta", beta, low=0.0, high=1.0)
    return inject_hyperparams(_signum)(lr=learning_rate, beta=beta)


def _noisy(lr: Any, eta: Any, gamma: Any, key: int) -> GradientTransformation:
    return chain(add_noise(eta, gamma, key), scale_by_learning_rate(lr))


@recorded
def noisy_sgd(learning_rate: ScalarOrSchedule, eta: float = 0.01, gamma: float = 0.55, key: int = 0) -> GradientTransformation:
    """Noisy SGD as optax.noisy_sgd (Neelakantan et al., 2015, arXiv 1511.06807).

    ``p <- p - lr (g + sqrt(eta / t^gamma) z)``, ``z ~ N(0, 1)`` seeded from the state (see
    `add_noise`: the noise is not JAX's).

    Args:
        learning_rate: step size (``group["lr"]``). eta, gamma: the noise schedule. key: the seed.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Neelakantan et al., arXiv 1511.06807; optax.noisy_sgd.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.noisy_sgd(1e-2, key=0))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_noisy, static_args=("key",))(lr=learning_rate, eta=eta, gamma=gamma, key=key)


def _polyak(lr: Any, max_learning_rate: Any, f_min: Any, eps: Any, variant: str) -> GradientTransformation:
    return chain(scale_by_learning_rate(lr), scale_by_polyak(f_min, max_learning_rate, eps, variant))


@recorded
def polyak_sgd(max_learning_rate: float = 1.0, scaling: ScalarOrSchedule = 1.0, f_min: float = 0.0, eps: float = 0.0,
               variant: str = "sps") -> GradientTransformation:
    """Polyak SGD as optax.polyak_sgd (Loizou et al., AISTATS 2021, arXiv 2002.10542).

    ``v = -scaling g``; ``p <- p + min((f - f_min) / (||v||^2 + eps), max_learning_rate) v``:
    ``chain(sgd(scaling), scale_by_polyak)`` as optax (the norm is of the scaled gradient).
    ``scaling`` is the group's ``"lr"``; ``update`` (and ``Optimizer.step``) take ``value=loss``.

    Args:
        max_learning_rate: the cap. scaling: the gradient's scale (``group["lr"]``).
        f_min: lower bound of the loss. eps: added to the squared norm. variant: ``"sps"``/``"sps+"``.

    Returns:
        The `GradientTransformation` (hyperparameters injected; extra argument ``value``).

    Raises:
        ValueError: an argument out of range.

    References:
        Loizou et al., arXiv 2002.10542; optax.polyak_sgd.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.polyak_sgd())
        >>> loss = model(x).square().mean()
        >>> loss.backward()
        >>> opt.step(value=loss.detach())
    """
    check_float("scaling", scaling, low=0.0)
    return inject_hyperparams(_polyak, static_args=("variant",))(
        lr=scaling, max_learning_rate=max_learning_rate, f_min=f_min, eps=eps, variant=variant)


def _ogd(lr: Any, alpha: Any, beta: Any) -> GradientTransformation:
    def body(k: float, a: float, b: float, ts: list[int]) -> Callable[..., None]:
        def step(i: int, gs: torch.Tensor, pv: torch.Tensor, pf: torch.Tensor, t: torch.Tensor) -> None:
            pf.add_(_optimistic_slice(gs, pv, t, a, b, ts[i] == 1).mul_(k))
        return step

    return _sliced_chain(chain(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(lr)), 2,
                         ScaleByOptimisticGradientState, "scale_by_optimistic_gradient", ("previous_gradient",),
                         (-1.0 * lr, alpha, beta), body)


@recorded
def optimistic_gradient_descent(learning_rate: ScalarOrSchedule, alpha: float = 1.0,
                                beta: float = 1.0) -> GradientTransformation:
    """Optimistic gradient descent as optax.optimistic_gradient_descent (Mokhtari et al., 2020).

    ``p <- p - lr ((alpha + beta) g_t - beta g_{t-1})``.

    Args:
        learning_rate: step size (``group["lr"]``). alpha, beta: as `scale_by_optimistic_gradient`.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: a negative learning rate.

    References:
        Mokhtari, Ozdaglar & Pattathil, arXiv 1901.08511; optax.optimistic_gradient_descent.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.optimistic_gradient_descent(1e-2))
    """
    _check_lr(learning_rate)
    return inject_hyperparams(_ogd)(lr=learning_rate, alpha=alpha, beta=beta)


def _oadam(lr: Any, optimism: Any, b1: Any, b2: Any, eps: Any, eps_root: Any, nesterov: bool) -> GradientTransformation:
    return chain(_scale_by_optax_adam(b1, b2, eps, eps_root, nesterov, "adam"),
                 scale_by_optimistic_gradient(lr, lr if optimism is None else optimism),
                 scale_by_learning_rate(1.0))  # scale(-1.0) that adds itself into the params under gx.Optimizer


@recorded
def optimistic_adam(learning_rate: float, optimism: float | None = None, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, eps_root: float = 0.0, *, nesterov: bool = True) -> GradientTransformation:
    """Optimistic Adam as optax.optimistic_adam (Daskalakis et al., ICLR 2018, arXiv 1711.00141).

    ``a = adam(g)`` (optax's, Nesterov by default); ``p <- p - ((lr + optimism) a_t - optimism a_{t-1})``.
    ``optimism=None`` uses the learning rate (and follows a scheduler's ``group["lr"]``).

    Args:
        learning_rate: step size (``group["lr"]``). optimism: the optimism (default: the learning rate).
        b1, b2, eps, eps_root: as optax's Adam. nesterov: Nesterov's first moment.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range, or a schedule (as optax, which takes none here).

    References:
        Daskalakis, Ilyas, Syrgkanis & Zeng, "Training GANs with Optimism", ICLR 2018,
        arXiv 1711.00141; optax.optimistic_adam.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.optimistic_adam(1e-3))
    """
    if not isinstance(learning_rate, torch.Tensor) and callable(learning_rate):
        raise ValueError("optimistic_adam takes a number learning_rate, not a schedule (as optax); use an lr "
                         "scheduler on gx.Optimizer or inject_hyperparams")
    _check_lr(learning_rate)
    _check_decays(b1=b1, b2=b2)
    if optimism is not None:
        check_float("optimism", optimism, low=0.0)
    return inject_hyperparams(_oadam, static_args=("nesterov",))(
        lr=learning_rate, optimism=optimism, b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov)


def _rprop(lr: Any, eta_minus: Any, eta_plus: Any, min_step_size: Any, max_step_size: Any) -> GradientTransformation:
    # scale_by_learning_rate(1.0) is scale(-1.0) that adds itself into the params under gx.Optimizer
    tx = chain(_scale_by_optax_rprop(lr, eta_minus, eta_plus, min_step_size, max_step_size),
               scale_by_learning_rate(1.0))

    def body(k: float, lr_: float, em: float, ep: float, lo: float, hi: float, ts: list[int]) -> Callable[..., None]:
        inner = _rprop_slice_step(lr_, em, ep, lo, hi)

        def step(i: int, gs: torch.Tensor, st: torch.Tensor, pv: torch.Tensor, pf: torch.Tensor,
                 os: torch.Tensor, sgn: torch.Tensor, a: torch.Tensor) -> None:
            inner(i, gs, st, pv, os, sgn, a)  # the block's output, in a scratch slice
            pf.add_(os.mul_(k))  # scale_by_learning_rate(1.0)'s add into the params
        return step

    return _sliced_chain(tx, 2, OptaxRpropState, "optax_rprop", ("step_sizes", "prev_updates"),
                         (-1.0 * 1.0, lr, eta_minus, eta_plus, min_step_size, max_step_size), body, scratch=3,
                         when=lambda k, lr_, em, ep, lo, hi: em <= ep)


@recorded
def optax_rprop(learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2, min_step_size: float = 1e-6,
                max_step_size: float = 50.0) -> GradientTransformation:
    """Rprop as optax.rprop (Riedmiller & Braun, ICNN 1993), optax 0.2.8's exact rule.

    With ``s = g_t * q_{t-1}`` (``q`` the previous signed step): step sizes ``eta_plus``/
    ``eta_minus`` times larger/smaller where ``s > 0``/``s < 0`` (clipped to
    ``[min_step_size, max_step_size]``, kept where ``s = 0``); ``q_t = step * sign(g_t)`` (0 where
    ``s < 0``); and the applied update is ``-q_{t-1}`` (0 where ``s < 0``): optax applies the
    *previous* step's signed step, so its first update is 0. torch.optim.Rprop (``gx.rprop``)
    applies the current one and its etas/step sizes are named ``etas``/``step_sizes``. The step
    sizes are kept in units of the learning rate (state ``step_sizes`` starts at 1): with a
    constant rate this is optax's rule exactly; a scheduler's ``group["lr"]`` scales the steps
    from then on (in optax and torch.optim the rate only sets the initial step sizes).

    Args:
        learning_rate: the initial step size. eta_minus, eta_plus: the factors.
        min_step_size, max_step_size: the clipping range of the step sizes.

    Returns:
        The `GradientTransformation` (hyperparameters injected).

    Raises:
        ValueError: an argument out of range.

    References:
        Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The
        RPROP Algorithm", ICNN 1993; optax.rprop.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.optax_rprop(1e-2))
    """
    _check_lr(learning_rate)
    check_float("learning_rate", learning_rate, low=0.0, low_open=True)
    check_float("eta_minus", eta_minus, low=0.0, high=1.0)
    check_float("eta_plus", eta_plus, low=1.0)
    check_float("min_step_size", min_step_size, low=0.0)
    check_float("max_step_size", max_step_size, low=0.0)
    return inject_hyperparams(_rprop)(lr=learning_rate, eta_minus=eta_minus, eta_plus=eta_plus,
                                      min_step_size=min_step_size, max_step_size=max_step_size)


STATE_TYPES = (ScaleByLionState, ScaleByBeliefState, ScaleByYogiState, ScaleByNovogradState, ScaleByAdanState,
               ScaleBySM3State, ScaleByOptimisticGradientState, ScaleByDistanceOverGradientsState, AddNoiseState,
               OptaxAdamState, OptaxRpropState, _EmaState)
_tree.register_state_types(*STATE_TYPES)
