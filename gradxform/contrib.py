"""Recent optimisers, as ``optax.contrib`` (optax 0.2.8) names and computes them.

Schedule-Free SGD / AdamW, Prodigy, D-Adaptation AdamW, AdEMAMix, ADOPT, SAM, MADGRAD, COCOB and
DoG. Each alias is built from public blocks and wrapped in `gradxform.inject_hyperparams`, so its
numeric hyperparameters are live group keys of `gradxform.Optimizer`. The arguments keep optax's
names (``learning_rate``, ``b1``, ``betas``, ...); the learning rate is injected under torch's
name ``lr`` so that ``torch.optim.lr_scheduler`` drives it through the adapter.

Counts are shared by all leaves (one 0-d int64 CPU tensor), as in optax: these methods couple the
leaves (a global distance or step-size estimate) or follow optax's single count. Scalar estimates
(``estim_lr``, distances, weight sums) live on the params' device in their widest float dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import _foreach as _fe
from . import _owned
from . import tree as _tree
from .base import (
    PURE,
    GradientTransformation,
    Ownership,
    Params,
    Updates,
    call_update,
    chain,
    declare,
    extra_args_of,
    info_of,
    owned_transform,
    recorded,
    stateless,
)
from .combine import inject_hyperparams
from .optax_optimizers import (_copy_, _div_by_root_, _dog_norms, _dog_scaled, _output, _ratio_into, _rdiv_,
                               _reciprocal_, _scratch_needed, _sqrt_, _sub)
from .transforms import (
    ScalarOrSchedule,
    _ema,
    _ema_sq,
    _Flat,
    add_decayed_weights,
    _add_scaled_,
    _apply_params,
    _plain,
    check_float,
    scale_by_learning_rate,
)

__all__ = [
    "ScheduleFreeState",
    "ScaleByRmsDebiasedState",
    "ProdigyState",
    "DAdaptAdamWState",
    "ScaleByAdemamixState",
    "ScaleByAdoptState",
    "SAMState",
    "MadgradState",
    "COCOBState",
    "DoGState",
    "schedule_free",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "schedule_free_adamw",
    "scale_by_rms_debiased",
    "prodigy",
    "dadapt_adamw",
    "scale_by_ademamix",
    "ademamix",
    "scale_by_adopt",
    "adopt",
    "normalize",
    "sam",
    "scale_by_madgrad",
    "madgrad",
    "scale_by_cocob",
    "cocob",
    "scale_by_dog",
    "dog",
]

_pow = _fe._op("pow", torch.pow)
_abs = _fe._op("abs", torch.abs)
_abs_ = _fe._op("abs_", torch.abs)


# --- helpers ------------------------------------------------------------------------------------


def _zero_count() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _scalar_home(params: Params) -> tuple[torch.device, torch.dtype]:
    """Device of the first param leaf and the widest float dtype among the leaves (float32 when
    there is none): where a method's scalar estimates live."""
    leaves = [x for x in _tree.tree_flatten(params)[0] if isinstance(x, torch.Tensor)]
    floats = [x.dtype for x in leaves if x.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    for d in floats[1:]:
        dtype = torch.promote_types(dtype, d)
    device = leaves[0].device if leaves else torch.device("cpu")
    return device, dtype


def _scalar(value: Any, params: Params) -> torch.Tensor:
    device, dtype = _scalar_home(params)
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(value), device=device, dtype=dtype)


def _like(value: Any, ref: torch.Tensor) -> torch.Tensor:
    """A number or tensor as a 0-d tensor of ``ref``'s dtype and device (a Python float is not
    rounded through float32 on the way)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=ref.device, dtype=ref.dtype)
    return torch.full((), value, dtype=ref.dtype, device=ref.device)


def _eager_numbers(*values: Any) -> bool:
    """Whether an update may take its eager in-place path: outside any trace, with every
    scalar it needs a Python number (``None``: not needed). That path writes its one
    params-shaped temporary and the state buffers (copies when the state is not owned) in
    place, the same operations for the pure and the owned update, so they agree to the bit."""
    return not _tree.traced() and all(v is None or isinstance(v, (int, float)) for v in values)


_DIFF_CHUNK = 1 << 17  # elements of `_add_scaled_diff_`'s scratch (512 KiB in float32: in L2)


def _add_scaled_diff_(out: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], k: Any) -> None:
    """``out <- out + k (a - b)`` in place, eager only, over chunks of each leaf through one
    scratch of at most ``_DIFF_CHUNK`` elements: per element the operations of the foreach form
    ``(a - b) * k`` then ``+ out`` (the same numbers), without a params-sized temporary.
    Leaves must be contiguous and of one dtype."""
    size = max(min(x.numel(), _DIFF_CHUNK) for x in a)
    buf = torch.empty(size, dtype=a[0].dtype, device=a[0].device)
    for o, x, y in zip(out, a, b):
        of, xf, yf, n = o.view(-1), x.view(-1), y.view(-1), x.numel()
        if buf.dtype != x.dtype or buf.device != x.device:
            buf = torch.empty(size, dtype=x.dtype, device=x.device)
        for s in range(0, n, _DIFF_CHUNK):
            e = min(n, s + _DIFF_CHUNK)
            d = buf[:e - s]
            torch.sub(xf[s:e], yf[s:e], out=d)
            of[s:e].add_(d.mul_(k))


def _sum(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x.sum() for x in xs]).sum()


def _vdot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)]).sum()


def _sq_norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * x).sum() for x in xs]).sum()


def _count_value(count: torch.Tensor) -> Any:
    """A CPU count as a Python int in eager mode (a memory read, no device sync), else the count
    as a float64 tensor (so powers and roots of it keep double precision)."""
    v = _tree.as_scalar(count)
    return v.to(torch.float64) if isinstance(v, torch.Tensor) else v


def _sv(x: Any) -> Any:
    """A hyperparameter (number, 0-d tensor) as used in kernels."""
    return _tree.as_scalar(x)


def _select(cond: Any, a: Any, b: Any) -> Any:
    """``a if cond else b`` for a Python bool, else ``torch.where`` (no host read)."""
    if isinstance(cond, bool):
        return a if cond else b
    a = a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float64)
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=torch.float64)
    return torch.where(cond, a, b)


def _check_betas(betas: Any) -> tuple[Any, Any]:
    if callable(betas) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    check_float("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_float("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return tuple(betas)  # type: ignore[return-value]


def _check_dtype(name: str, dtype: Any) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be None or a floating torch.dtype; got {dtype!r}")


def _is_schedule(x: Any) -> bool:
    """Whether a hyperparameter is a schedule (a function of the step count). A tensor is asked
    ``isinstance`` first: dynamo before torch 2.13 cannot trace ``callable()`` of a tensor."""
    return not isinstance(x, torch.Tensor) and callable(x)


def _nonzero(x: Any) -> bool:
    if _is_schedule(x):
        return True
    if isinstance(x, torch.Tensor):
        return bool((x != 0).any())
    return x is not None and x != 0


def _lr_arg(learning_rate: Any) -> Any:
    if isinstance(learning_rate, torch.Tensor) and learning_rate.numel() == 1 and learning_rate.ndim > 0:
        return learning_rate.reshape(())
    check_float("learning_rate", learning_rate, low=0.0)
    return learning_rate


def _warmup(lr: Any, warmup_steps: int | None) -> Any:
    """optax.warmup_constant_schedule(0, lr, warmup_steps) as a schedule of the count."""
    if warmup_steps is None:
        return lr

    def schedule(count: Any) -> Any:
        frac = torch.clamp(torch.as_tensor(count).to(torch.float64) / warmup_steps, max=1.0)
        return lr * frac

    return schedule


# --- Schedule-Free ------------------------------------------------------------------------------


class ScheduleFreeState(NamedTuple):
    """``b1``: the interpolation weight (0-d); ``weight_sum``: sum of the averaging weights;
    ``step_count``: 1-based step (0-d int64); ``max_lr``: largest learning rate seen;
    ``base_optimizer_state``: the base optimizer's state; ``z``: the base iterate (params-shaped)."""

    b1: torch.Tensor
    weight_sum: torch.Tensor
    step_count: torch.Tensor
    max_lr: torch.Tensor
    base_optimizer_state: Any
    z: Any


def _find_schedule_free_state(state: Any) -> ScheduleFreeState | None:
    if isinstance(state, ScheduleFreeState):
        return state
    children: Any = ()
    if isinstance(state, tuple):
        children = state
    elif isinstance(state, dict):
        children = state.values()
    for child in children:
        found = _find_schedule_free_state(child)
        if found is not None:
            return found
    return None


def schedule_free_eval_params(state: Any, params: Params) -> Params:
    """The evaluation point ``x`` of Schedule-Free learning: ``x = (y - (1 - b1) z) / b1``.

    The training params are ``y``, the point where gradients are taken; ``z`` and ``b1`` come
    from the `ScheduleFreeState` found in ``state`` (the state of `schedule_free`, of an alias
    built on it, or of a chain or `gradxform.inject_hyperparams` around it).

    Args:
        state: a transform state holding a `ScheduleFreeState`. Through `gradxform.Optimizer`:
            ``opt.tx_state(group_index)``, with ``params`` the group's list of params.
        params: the current params ``y`` (same structure as the ``z`` in the state).

    Returns:
        The params ``x`` to evaluate (new tensors; ``None`` leaves stay ``None``).

    Raises:
        ValueError: ``state`` holds no `ScheduleFreeState`.

    References:
        Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled", NeurIPS
        2024, arXiv 2405.15682, Section 2; optax.contrib.schedule_free_eval_params.

    Example:
        >>> tx = gx.schedule_free_adamw(1e-2)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> params = gx.apply_updates(params, updates)
        >>> eval_params = gx.schedule_free_eval_params(state, params)
        >>> with torch.no_grad():
        ...     out = torch.func.functional_call(model, eval_params, (x,))
    """
    sf = _find_schedule_free_state(state)
    if sf is None:
        raise ValueError("schedule_free_eval_params needs the state of a schedule_free transform "
                         "(schedule_free, schedule_free_sgd, schedule_free_adamw or a chain around one)")
    b1 = sf.b1

    def leaf(y: Any, z: Any) -> Any:
        if y is None or z is None:
            return y
        b = b1.to(device=y.device) if isinstance(b1, torch.Tensor) else b1
        return ((y - (1.0 - b) * z) / b).to(y.dtype)

    p_leaves, spec = _tree.tree_flatten(params)
    z_leaves = _tree.check_structure(spec, sf.z, "state.z", against="params", reference=params)
    return _tree.tree_unflatten(spec, [leaf(y, z) for y, z in zip(p_leaves, z_leaves)])


@recorded
def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: float | torch.Tensor = 0.9,
    weight_lr_power: float | torch.Tensor = 2.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-Free wrapper (Defazio et al., 2024): momentum replaced by interpolation + averaging.

    With ``u_t`` the base optimizer's update (e.g. ``-lr g_t`` for SGD) at the params ``y_t``:
    ``z_{t+1} = z_t + u_t``; ``c_t = w_t / sum_{i<=t} w_i`` with ``w_t = max_{i<=t} lr_i ^
    weight_lr_power``; ``x_{t+1} = (1 - c_t) x_t + c_t z_{t+1}``; ``y_{t+1} = b1 x_{t+1} +
    (1 - b1) z_{t+1}``. The params are ``y`` (where gradients are taken); evaluate at ``x`` with
    `schedule_free_eval_params`. The update returned is ``y_{t+1} - y_t = c_t (z_{t+1} - y_t) +
    (1 - c_t)(1 - b1) u_t``. ``learning_rate`` (a schedule of the 1-based step) only weighs the
    average; the base optimizer applies its own. Turn off the base optimizer's momentum.

    Args:
        base_optimizer: the transform whose updates move ``z`` (without momentum).
        learning_rate: the warmup-only schedule (or constant) the base optimizer uses.
        b1: interpolation weight in ``(0, 1]``.
        weight_lr_power: exponent of the averaging weights.
        state_dtype: dtype of ``z`` (default: the params' dtype).

    Returns:
        A `GradientTransformation` that forwards extra arguments to ``base_optimizer``.

    Raises:
        ValueError: ``b1`` outside ``(0, 1]`` or a negative learning rate.

    References:
        Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled", NeurIPS
        2024, arXiv 2405.15682, Algorithm 1; optax.contrib.schedule_free.

    Example:
        >>> tx = gx.schedule_free(gx.scale_by_learning_rate(1.0), learning_rate=1.0, b1=0.9)
    """
    check_float("b1", b1, low=0.0, high=1.0, low_open=True)
    check_float("learning_rate", learning_rate, low=0.0)
    check_float("weight_lr_power", weight_lr_power)
    _check_dtype("state_dtype", state_dtype)

    def init(params: Params) -> ScheduleFreeState:
        def copy(p: Any) -> Any:
            return None if p is None else p.detach().clone() if state_dtype is None else p.detach().to(state_dtype, copy=True)

        return ScheduleFreeState(
            b1=_scalar(b1, params),
            weight_sum=_scalar(0.0, params),
            step_count=torch.ones((), dtype=torch.int64),
            max_lr=_scalar(0.0, params),
            base_optimizer_state=base_optimizer.init(params),
            z=_tree.tree_map(copy, params),
        )

    def run(updates: Updates, state: ScheduleFreeState, params: Params | None, own: Ownership, apply: bool,
            extra: dict[str, Any]) -> tuple[Updates, ScheduleFreeState]:
        flat = _owned.live(updates, state, ScheduleFreeState, "schedule_free")
        if flat is None:
            return updates, state
        y = flat.params_live(params, "schedule_free")
        z = flat.state_live(state.z, "state.z", check_shapes=False)
        _tree.check_shapes(lambda: [flat.paths()[i] for i in flat.idx], flat.live, z, "state.z")
        z = z if own.state else [x.clone() for x in z]
        lr = learning_rate(state.step_count) if _is_schedule(learning_rate) else learning_rate
        max_lr = torch.maximum(state.max_lr, _like(lr, state.max_lr))
        weight = max_lr ** _sv(weight_lr_power)
        weight = weight.to(state.weight_sum.dtype)
        total = state.weight_sum + weight
        nan = torch.isnan(weight) | torch.isnan(total)
        ck = torch.where(nan, torch.full_like(weight, math.nan),
                         torch.nan_to_num(weight / total, nan=0.0, posinf=math.inf))
        base_u, base_state = call_update(base_optimizer, updates, state.base_optimizer_state, params, own, **extra)
        bu = _Flat(base_u).live
        if len(bu) != len(z):
            raise ValueError("schedule_free: the base optimizer must return an update for every live leaf")
        beta = _sv(b1)

        def new_state() -> ScheduleFreeState:  # after z += u (inside torch.func, a new list of z)
            return ScheduleFreeState(state.b1, total, state.step_count + 1, max_lr, base_state,
                                     flat.rebuild(z, like=state.z))

        eager = not _tree.traced() and all(a.dtype == b.dtype == u.dtype and a.is_contiguous() and b.is_contiguous()
                                           and u.is_contiguous() for a, b, u in zip(z, y, bu))
        k2 = (1.0 - ck) * (1.0 - beta)
        # the eager paths' factors: Python numbers for CPU scalars (no per-kernel dtype cast of a
        # 0-d float64 tensor; the same float32 product), tensors on an accelerator (no host read)
        ckf, k2f = (_sv(ck), _sv(k2)) if eager else (ck, k2)
        ps = _apply_params(flat, params, bu) if apply and eager else None
        if ps is not None:
            # the caller adds the update into the params right after (gx.Optimizer): slice by
            # slice z += u; y += k2 u + ck (z - y), the kernels of the path below (the same
            # numbers) with its update and its difference in cached slices, never in memory
            writable = own.may_write(bu)

            def step(i: int, us: torch.Tensor, zs: torch.Tensor, ys: torch.Tensor, *scratch: torch.Tensor) -> None:
                zs.add_(us)
                o = us if writable else scratch[0]
                torch.mul(us, k2f, out=o)
                o.add_(torch.sub(zs, ys, out=scratch[-1]).mul_(ckf))
                ys.add_(o)

            _owned.by_slices(list(zip(bu, z, ps)), step, 1 if writable else 2)
            return flat.rebuild([None] * len(bu)), new_state()
        _fe.add_(z, bu)
        if eager:
            # at most one temporary: the output is the base update scaled in place (when the
            # caller lets us write it), then ck (z - y) is added chunk by chunk (`_add_scaled_diff_`)
            if own.may_write(bu):
                _fe.mul_(bu, k2f)
                out = bu
            else:
                out = list(_fe.mul(bu, k2f))
            _add_scaled_diff_(out, z, y, ckf)
            return flat.rebuild(out), new_state()
        out = list(_fe.add(z, y, alpha=-1)) if all(a.dtype == b.dtype for a, b in zip(z, y)) else \
            [(a - b).to(b.dtype) for a, b in zip(z, y)]
        _fe.mul_(out, ck)
        _fe.add_(out, _fe.mul(bu, (1.0 - ck) * (1.0 - beta)))
        return flat.rebuild(out), new_state()

    def owned_update(updates: Updates, state: ScheduleFreeState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, ScheduleFreeState]:
        return run(updates, state, params, own, False, extra)

    def owned_apply(updates: Updates, state: ScheduleFreeState, params: Params, own: Ownership,
                    **extra: Any) -> tuple[Updates, ScheduleFreeState]:
        return run(updates, state, params, own, True, extra)

    return declare(owned_transform(init, owned_update, extra_args_of(base_optimizer)), owned_apply=owned_apply)


class ScaleByRmsDebiasedState(NamedTuple):
    """``count``: updates so far (0-d int64); ``nu``: EMA of squared updates (params-shaped)."""

    count: torch.Tensor
    nu: Any


@recorded
def scale_by_rms_debiased(decay: float | torch.Tensor = 0.999, eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """Bias-corrected RMS scaling (Adam without first moment), optax's
    ``scale_by_rms(decay, eps, eps_in_sqrt=False, bias_correction=True)``.

    ``v_t = decay v + (1 - decay) g^2``; ``u = g / (sqrt(v_t / (1 - decay^t)) + eps)``.

    Args:
        decay: EMA decay of the squared updates, in ``[0, 1)``.
        eps: added to the root.

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)`` or negative ``eps``.

    References:
        Kingma & Ba, "Adam", ICLR 2015, arXiv 1412.6980 (with b1 = 0); optax.scale_by_rms.

    Example:
        >>> tx = gx.chain(gx.scale_by_rms_debiased(0.999), gx.scale_by_learning_rate(1e-3))
    """
    check_float("decay", decay, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)

    def init(params: Params) -> ScaleByRmsDebiasedState:
        return ScaleByRmsDebiasedState(_zero_count(), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByRmsDebiasedState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByRmsDebiasedState]:
        return _rms_debiased_update(updates, state, own, decay, eps, None)

    return owned_transform(init, owned_update)


def _rms_debiased_update(updates: Updates, state: ScaleByRmsDebiasedState, own: Ownership, decay: Any, eps: Any,
                         factor: float | None, decayed: tuple[float, list[torch.Tensor]] | None = None,
                         ) -> tuple[Updates, ScaleByRmsDebiasedState]:
    """`scale_by_rms_debiased`'s update; with a ``factor`` (eager CPU numbers only, see
    `_rms_debiased_then_lr`) each output slice is then multiplied by it while in cache, after
    ``decayed = (wd, live params)`` adds ``wd p`` to it (`add_decayed_weights`' kernel)."""
    flat = _owned.live(updates, state, ScaleByRmsDebiasedState, "scale_by_rms_debiased")
    if flat is None:
        return updates, state
    d, e = _sv(decay), _sv(eps)
    t = _count_value(state.count) + 1
    if _eager_numbers(t, d, e) and _owned.on_cpu(flat.live):
        # slice by slice (`_owned.by_slices`): g and nu are read once and nu written once;
        # the denominator lives in a cached scratch (the kernels of the whole-leaf form)
        g, c = flat.live, 1 - d ** t
        nu = _owned.held(flat, state.nu, "state.nu", own)
        out = _output(g, own)
        wd, ps = (None, []) if decayed is None else (decayed[0], [decayed[1]])

        def step(i: int, gs: torch.Tensor, vs: torch.Tensor, os: torch.Tensor, *rest: torch.Tensor) -> None:
            p_s, scratch = rest[:len(ps)], rest[len(ps):]  # the params' slice (with a decay), the scratch
            vs.mul_(d).addcmul_(gs, gs, value=1.0 - d)
            _ratio_into(os, gs, vs, 1.0, c, e, 0.0, scratch[0] if scratch else os)
            if p_s:
                os.add_(p_s[0], alpha=wd)
            if factor is not None:
                os.mul_(factor)

        _owned.by_slices([list(x) for x in zip(g, nu, out, *ps)], step, _scratch_needed(out, g))
        return _owned.finish(flat, out, state, {"count": state.count + 1}, nu=nu)
    if factor is not None or decayed is not None:
        raise AssertionError("a folded factor is for the eager CPU path only")
    nu = _ema_sq(flat.state_live(state.nu, "state.nu"), flat.live, d, own.state)
    den = list(_fe.sqrt(_fe.div(nu, 1 - d ** t)))
    _fe.add_(den, e)
    out = list(_fe.div(flat.live, den))
    return _owned.finish(flat, out, state, {"count": state.count + 1}, nu=nu)


def _rms_debiased_then_lr(decay: Any, eps: Any, learning_rate: Any, weight_decay: Any = None) -> GradientTransformation:
    """``chain(scale_by_rms_debiased(decay, eps), [add_decayed_weights(weight_decay)],
    scale_by_learning_rate(learning_rate))``, the same state and the same numbers, with the decay
    and the rate's multiply done on each cached output slice of the RMS step on CPU
    (`schedule_free_adamw`'s base: one or two pass pairs over the update less). The rate's factor
    is the Python number that `scale_by_learning_rate` itself multiplies by: its update of a
    float64 one (exact), its state advanced by the same call."""
    rms, lr = scale_by_rms_debiased(decay, eps), scale_by_learning_rate(learning_rate)
    blocks = [rms, lr] if weight_decay is None else [rms, add_decayed_weights(weight_decay), lr]
    reference = chain(*blocks)
    ref_update = info_of(reference).owned_update

    def owned_update(updates: Updates, state: tuple[Any, ...], params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, tuple[Any, ...]]:
        if (own is PURE or extra or _tree.traced() or not isinstance(state, tuple) or len(state) != len(blocks)
                or not isinstance(state[0], ScaleByRmsDebiasedState)):
            return ref_update(updates, state, params, own, **extra)
        flat = _Flat(updates)
        wd = None if weight_decay is None else _sv(weight_decay)
        if not flat.live or not _owned.on_cpu(flat.live) or not _eager_numbers(
                _count_value(state[0].count) + 1, _sv(decay), _sv(eps), wd):
            return ref_update(updates, state, params, own, **extra)
        if wd is not None and params is None:  # the chain's own error
            return ref_update(updates, state, params, own, **extra)
        decayed = None if wd is None else (wd, flat.params_live(params, "add_decayed_weights"))
        one, lr_state = lr.update([torch.ones((), dtype=torch.float64)], state[-1])
        if one[0].requires_grad:
            return ref_update(updates, state, params, own, **extra)
        u, rms_state = _rms_debiased_update(updates, state[0], own, decay, eps, one[0].item(), decayed)
        return u, (rms_state, *state[1:-1], lr_state)

    return declare(owned_transform(reference.init, owned_update), members=info_of(reference).members)


def _sf_sgd(lr: Any, b1: Any, weight_decay: Any, weight_lr_power: Any, warmup_steps: int | None,
            state_dtype: Any, use_weight_decay: bool) -> GradientTransformation:
    sched = _warmup(lr, warmup_steps)
    base = scale_by_learning_rate(sched)
    if use_weight_decay:
        base = chain(add_decayed_weights(weight_decay), base)
    return schedule_free(base, sched, b1, weight_lr_power, state_dtype)


@recorded
def schedule_free_sgd(
    learning_rate: float | torch.Tensor = 1.0,
    warmup_steps: int | None = None,
    b1: float | torch.Tensor = 0.9,
    weight_decay: float | torch.Tensor | None = None,
    weight_lr_power: float | torch.Tensor = 2.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-Free SGD, as ``optax.contrib.schedule_free_sgd``.

    `schedule_free` around ``u = -lr_t (g + wd * y)`` with ``lr_t = learning_rate *
    min(1, t / warmup_steps)`` (linear warmup from 0, then constant). Evaluate at
    `schedule_free_eval_params`. The rate is injected as ``lr`` (a live group key of
    `gradxform.Optimizer`).

    Args:
        learning_rate: peak learning rate.
        warmup_steps: length of the linear warmup (``None``: none).
        b1: interpolation weight in ``(0, 1]``.
        weight_decay: L2 decay added to the gradient (``None``: none).
        weight_lr_power: exponent of the averaging weights.
        state_dtype: dtype of ``z``.

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv 2405.15682;
        optax.contrib.schedule_free_sgd.

    Example:
        >>> tx = gx.schedule_free_sgd(1.0, warmup_steps=100)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> eval_params = gx.schedule_free_eval_params(state, gx.apply_updates(params, updates))
    """
    learning_rate = _lr_arg(learning_rate)
    check_float("b1", b1, low=0.0, high=1.0, low_open=True)
    if weight_decay is not None:
        check_float("weight_decay", weight_decay, low=0.0)
    if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 1):
        raise ValueError(f"warmup_steps must be None or an int >= 1; got {warmup_steps!r}")
    _check_dtype("state_dtype", state_dtype)
    return inject_hyperparams(_sf_sgd, static_args=("warmup_steps", "state_dtype", "use_weight_decay"))(
        lr=learning_rate, b1=b1, weight_decay=0.0 if weight_decay is None else weight_decay,
        weight_lr_power=weight_lr_power, warmup_steps=warmup_steps, state_dtype=state_dtype,
        use_weight_decay=weight_decay is not None)


def _sf_adamw(lr: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any, weight_lr_power: Any,
              warmup_steps: int | None, state_dtype: Any, use_weight_decay: bool) -> GradientTransformation:
    sched = _warmup(lr, warmup_steps)
    base = _rms_debiased_then_lr(b2, eps, sched, weight_decay if use_weight_decay else None)
    return schedule_free(base, sched, b1, weight_lr_power, state_dtype)


@recorded
def schedule_free_adamw(
    learning_rate: float | torch.Tensor = 0.0025,
    warmup_steps: int | None = None,
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.999,
    eps: float | torch.Tensor = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
    weight_lr_power: float | torch.Tensor = 2.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Schedule-Free AdamW, as ``optax.contrib.schedule_free_adamw``.

    `schedule_free` around ``u = -lr_t (g / (sqrt(v_t / (1 - b2^t)) + eps) + wd * y)``
    (`scale_by_rms_debiased`, then decoupled decay at the point ``y``), ``lr_t`` with linear
    warmup as in `schedule_free_sgd`. The rate is injected as ``lr``.

    Args:
        learning_rate: peak learning rate.
        warmup_steps: length of the linear warmup (``None``: none).
        b1: interpolation weight in ``(0, 1]``.
        b2: decay of the second moment.
        eps: added to the root of the second moment.
        weight_decay: decoupled weight decay (multiplied by the learning rate).
        weight_lr_power: exponent of the averaging weights.
        state_dtype: dtype of ``z``.

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv 2405.15682, Algorithm 1;
        optax.contrib.schedule_free_adamw.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.schedule_free_adamw(1e-3, warmup_steps=50))
    """
    learning_rate = _lr_arg(learning_rate)
    check_float("b1", b1, low=0.0, high=1.0, low_open=True)
    check_float("b2", b2, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 1):
        raise ValueError(f"warmup_steps must be None or an int >= 1; got {warmup_steps!r}")
    _check_dtype("state_dtype", state_dtype)
    return inject_hyperparams(_sf_adamw, static_args=("warmup_steps", "state_dtype", "use_weight_decay"))(
        lr=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, weight_lr_power=weight_lr_power,
        warmup_steps=warmup_steps, state_dtype=state_dtype, use_weight_decay=_nonzero(weight_decay))


# --- Prodigy and D-Adaptation -------------------------------------------------------------------


class ProdigyState(NamedTuple):
    """``exp_avg``, ``exp_avg_sq``: Adam moments of ``d g``; ``grad_sum``: the weighted sum ``s``;
    ``params0``: the initial params; ``estim_lr``: the distance estimate ``d`` (0-d);
    ``numerator_weighted`` (0-d); ``count`` (0-d int64)."""

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    params0: Any
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor
    count: torch.Tensor


def _clone_params(params: Params) -> Any:
    return _tree.tree_map(lambda p: None if p is None else p.detach().clone(), params)


def _prodigy_tx(lr: Any, betas: Any, beta3: Any, eps: Any, estim_lr0: Any, estim_lr_coef: Any,
                weight_decay: Any, safeguard_warmup: bool, use_weight_decay: bool) -> GradientTransformation:
    def init(params: Params) -> ProdigyState:
        zeros = _tree.tree_zeros_like
        return ProdigyState(zeros(params), zeros(params), zeros(params), _clone_params(params),
                            _scalar(estim_lr0, params), _scalar(0.0, params), _zero_count())

    def owned_update(updates: Updates, state: ProdigyState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ProdigyState]:
        flat = _owned.live(updates, state, ProdigyState, "prodigy")
        if flat is None:
            return updates, state
        g = flat.live
        p = flat.params_live(params, "prodigy")
        p0 = flat.state_live(state.params0, "state.params0")
        b1, b2 = [_sv(b) for b in betas]
        b3 = b2 ** 0.5 if beta3 is None else _sv(beta3)
        d, d0 = state.estim_lr, _sv(estim_lr0)
        sched = _sv(lr(state.count)) if _is_schedule(lr) else _sv(lr)
        t = _count_value(state.count) + 1
        bc = ((1 - b2 ** t) ** 0.5) / (1 - b1 ** t)
        dlr = d * sched * bc
        wd = _sv(weight_decay) if use_weight_decay else 0.0
        if not _tree.pure_ops() and not isinstance(wd, torch.Tensor):
            return _prodigy_eager(flat, state, g, p, p0, d, d0, dlr, b1, b2, b3, wd, estim_lr_coef, eps,
                                  safeguard_warmup, own)
        dg = list(_fe.mul(g, d))
        acum = _vdot(g, _fe.add(p0, p, alpha=-1))
        ea = _ema(_owned.held(flat, state.exp_avg, "state.exp_avg", own), dg, b1, True)
        eas = _ema_sq(_owned.held(flat, state.exp_avg_sq, "state.exp_avg_sq", own), dg, b2, True)
        s = _owned.held(flat, state.grad_sum, "state.grad_sum", own)
        _fe.mul_(s, b3)
        _fe.add_(s, _fe.mul(dg, (d / d0) if safeguard_warmup else (dlr / d0)))
        num = b3 * state.numerator_weighted + (d / d0) * dlr * acum
        l1 = _sum(_abs(s))
        # ||s||_1 = 0 (all-zero or empty gradients so far): keep d (optax would make d NaN)
        estimate = torch.where(l1 > 0, _sv(estim_lr_coef) * num / torch.where(l1 > 0, l1, 1.0), d)
        num = num.to(state.numerator_weighted.dtype)  # (injected float64 hyperparameters promote)
        new_d = torch.maximum(d, estimate.to(d.dtype))
        den = list(_fe.sqrt(eas))
        _fe.add_(den, new_d * _sv(eps))  # (optax: the new estimate here, the old one in dlr)
        out = list(_fe.div(ea, den))
        _fe.mul_(out, -dlr)
        if use_weight_decay:
            _fe.add_(out, _fe.mul(p, -_sv(weight_decay) * dlr))
        scalars = {"estim_lr": new_d, "numerator_weighted": num, "count": state.count + 1}
        return _owned.finish(flat, out, state, scalars, exp_avg=ea, exp_avg_sq=eas, grad_sum=s)

    return owned_transform(init, owned_update)


def _prodigy_eager(flat: _Flat, state: ProdigyState, g: list[torch.Tensor], p: list[torch.Tensor],
                   p0: list[torch.Tensor], d: torch.Tensor, d0: Any, dlr: Any, b1: Any, b2: Any, b3: Any, wd: float,
                   estim_lr_coef: Any, eps: Any, safeguard_warmup: bool, own: Ownership) -> tuple[Updates, ProdigyState]:
    """prodigy's owned step with one temporary: ``p0 - p`` (for the dot product), then ``d g``
    (for the moments and the sum), then the output; the state in place. The estimate ``d`` stays
    a tensor (no host read)."""
    tmp = list(_sub(p0, p))
    acum = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(g, tmp)]).sum()
    _copy_(tmp, g)
    _fe.mul_(tmp, d)  # d g
    ea = _ema(_owned.held(flat, state.exp_avg, "state.exp_avg", own), tmp, b1, True)
    eas = _ema_sq(_owned.held(flat, state.exp_avg_sq, "state.exp_avg_sq", own), tmp, b2, True)
    s = _owned.held(flat, state.grad_sum, "state.grad_sum", own)
    _fe.mul_(s, b3)
    _fe.mul_(tmp, (d / d0) if safeguard_warmup else (dlr / d0))
    _fe.add_(s, tmp)
    num = b3 * state.numerator_weighted + (d / d0) * dlr * acum
    l1 = torch.stack(list(_fe.norm(s, 1))).sum()
    estimate = torch.where(l1 > 0, _sv(estim_lr_coef) * num / torch.where(l1 > 0, l1, 1.0), d)
    num = num.to(state.numerator_weighted.dtype)
    new_d = torch.maximum(d, estimate.to(d.dtype))
    out = tmp
    _copy_(out, eas)
    _sqrt_(out)
    _fe.add_(out, new_d * _sv(eps))
    _reciprocal_(out)
    _fe.mul_(out, ea)  # exp_avg / (sqrt(exp_avg_sq) + d eps)
    if wd != 0:
        _fe.add_(out, p, alpha=wd)
    _fe.mul_(out, -dlr)
    scalars = {"estim_lr": new_d, "numerator_weighted": num, "count": state.count + 1}
    return _owned.finish(flat, out, state, scalars, exp_avg=ea, exp_avg_sq=eas, grad_sum=s)


@recorded
def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0,
    weight_decay: float = 0.0,
    safeguard_warmup: bool = False,
) -> GradientTransformation:
    """Prodigy, a learning-rate-free AdamW (Mishchenko & Defazio, 2023), as ``optax.contrib.prodigy``.

    With ``d`` the distance estimate, ``lr`` the schedule multiplier and ``t`` the step:
    ``dlr = d lr sqrt(1 - b2^t) / (1 - b1^t)``; ``m = b1 m + (1-b1) d g``;
    ``v = b2 v + (1-b2) d^2 g^2``; ``s = b3 s + (dlr / d0) d g`` (``d / d0`` with
    ``safeguard_warmup``); ``r = b3 r + (d / d0) dlr <g, x0 - x>``;
    ``d' = max(d, coef * r / ||s||_1)``; ``u = -dlr (m / (sqrt(v) + d' eps) + wd x)`` (``dlr``
    with the ``d`` before the step, ``eps`` scaled by the new one, as optax). ``beta3`` defaults to ``sqrt(b2)``. The schedule multiplier
    is injected as ``lr`` (``torch.optim.lr_scheduler`` drives it through the adapter).

    Args:
        learning_rate: schedule multiplier (1.0 base).
        betas: Adam's ``(b1, b2)``.
        beta3: decay of the ``d`` estimate's sums (default ``sqrt(b2)``).
        eps: added to the denominator (scaled by ``d``).
        estim_lr0: initial (under-)estimate ``d0``.
        estim_lr_coef: multiplier of the estimates.
        weight_decay: decoupled decay (AdamW style).
        safeguard_warmup: leave the rate out of ``s`` (for warmup).

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: a hyperparameter out of range; ``update`` without params.

    References:
        Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML
        2024, arXiv 2306.06101, Algorithm 4 (Adam version); optax.contrib.prodigy.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.prodigy(weight_decay=0.01))
    """
    learning_rate = _lr_arg(learning_rate)
    betas = _check_betas(betas)
    if beta3 is not None:
        check_float("beta3", beta3, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0)
    check_float("estim_lr0", estim_lr0, low=0.0, low_open=True)
    check_float("estim_lr_coef", estim_lr_coef, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_prodigy_tx, static_args=("safeguard_warmup", "use_weight_decay"))(
        lr=learning_rate, betas=betas, beta3=beta3, eps=eps, estim_lr0=estim_lr0, estim_lr_coef=estim_lr_coef,
        weight_decay=weight_decay, safeguard_warmup=bool(safeguard_warmup), use_weight_decay=_nonzero(weight_decay))


class DAdaptAdamWState(NamedTuple):
    """``exp_avg``, ``exp_avg_sq``: moments; ``grad_sum``: the weighted sum ``s``; ``estim_lr``:
    the distance estimate ``d`` (0-d); ``numerator_weighted`` (0-d); ``count`` (0-d int64)."""

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor
    count: torch.Tensor


def _dadapt_tx(lr: Any, betas: Any, eps: Any, estim_lr0: Any, weight_decay: Any,
               use_weight_decay: bool) -> GradientTransformation:
    def init(params: Params) -> DAdaptAdamWState:
        zeros = _tree.tree_zeros_like
        return DAdaptAdamWState(zeros(params), zeros(params), zeros(params), _scalar(estim_lr0, params),
                                _scalar(0.0, params), _zero_count())

    def owned_update(updates: Updates, state: DAdaptAdamWState, params: Params | None,
                     own: Ownership) -> tuple[Updates, DAdaptAdamWState]:
        flat = _owned.live(updates, state, DAdaptAdamWState, "dadapt_adamw")
        if flat is None:
            return updates, state
        g = flat.live
        p = flat.params_live(params, "dadapt_adamw")
        b1, b2 = [_sv(b) for b in betas]
        sb2 = b2 ** 0.5
        e = _sv(eps)
        sched = _sv(lr(state.count)) if _is_schedule(lr) else _sv(lr)
        t = _count_value(state.count) + 1
        bc = ((1 - b2 ** t) ** 0.5) / (1 - b1 ** t)
        dlr = state.estim_lr * sched * bc
        s = _owned.held(flat, state.grad_sum, "state.grad_sum", own)
        eas = _owned.held(flat, state.exp_avg_sq, "state.exp_avg_sq", own)
        return _dadapt_eager(flat, state, g, p, s, eas, b1, b2, sb2, e, dlr, weight_decay, use_weight_decay, own)

    return owned_transform(init, owned_update)


def _dadapt_eager(flat: _Flat, state: DAdaptAdamWState, g: list[torch.Tensor], p: list[torch.Tensor],
                  s: list[torch.Tensor], eas: list[torch.Tensor], b1: Any, b2: Any, sb2: Any, e: Any, dlr: Any,
                  weight_decay: Any, use_weight_decay: bool, own: Ownership) -> tuple[Updates, DAdaptAdamWState]:
    """dadapt_adamw's step with one temporary ``T`` (``s / den``, then ``dlr g``, then the
    output; a second one for the weight decay), the state buffers (copies unless owned) in
    place, ``d`` a tensor. Inside ``torch.func`` the in-place ops rebind the lists instead."""
    T = list(_fe.sqrt(eas))
    _fe.add_(T, e)
    _reciprocal_(T)
    _fe.mul_(T, s)  # s / (sqrt(v) + eps)
    acum = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(g, T)]).sum()
    _copy_(T, g)
    _fe.mul_(T, dlr)  # dlr g
    ea = _ema(_owned.held(flat, state.exp_avg, "state.exp_avg", own), T, b1, True)
    eas = _ema_sq(eas, g, b2, True)
    _fe.mul_(s, sb2)
    _fe.mul_(T, 1 - sb2)
    _fe.add_(s, T)
    num = sb2 * state.numerator_weighted + (1 - sb2) * dlr * acum
    l1 = torch.stack(list(_fe.norm(s, 1))).sum()
    estimate = torch.where(l1 > 0, num / ((1 - sb2) * torch.where(l1 > 0, l1, 1.0)), state.estim_lr)
    num = num.to(state.numerator_weighted.dtype)
    new_d = torch.maximum(state.estim_lr, estimate.to(state.estim_lr.dtype))
    out = T
    _copy_(out, eas)
    _sqrt_(out)
    _fe.add_(out, e)
    _reciprocal_(out)
    _fe.mul_(out, ea)
    _fe.mul_(out, -1.0)
    if use_weight_decay:
        k = -_sv(weight_decay) * dlr
        if not _tree.traced() and not _tree.pure_ops() and _owned.on_cpu(out) and _plain(out) and _plain(p):
            # out += k p with k p made one cached slice at a time (the kernels of the form
            # below, no second params-sized temporary)
            _add_scaled_(out, p, k)
        else:
            _fe.add_(out, _fe.mul(p, k))
    scalars = {"estim_lr": new_d, "numerator_weighted": num, "count": state.count + 1}
    return _owned.finish(flat, out, state, scalars, exp_avg=ea, exp_avg_sq=eas, grad_sum=s)


@recorded
def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    estim_lr0: float = 1e-6,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """D-Adaptation AdamW (Defazio & Mishchenko, 2023), as ``optax.contrib.dadapt_adamw``.

    ``dlr = d lr sqrt(1 - b2^t) / (1 - b1^t)``; with ``v`` before the step,
    ``r = sqrt(b2) r + (1 - sqrt(b2)) dlr <g, s / (sqrt(v) + eps)>``; ``m = b1 m + (1-b1) dlr g``;
    ``v = b2 v + (1-b2) g^2``; ``s = sqrt(b2) s + (1 - sqrt(b2)) dlr g``;
    ``d <- max(d, r / ((1 - sqrt(b2)) ||s||_1))``; ``u = -m / (sqrt(v) + eps) - wd dlr x``.
    The schedule multiplier is injected as ``lr``.

    Args:
        learning_rate: schedule multiplier (1.0 base).
        betas: Adam's ``(b1, b2)``.
        eps: added to the root of the second moment.
        estim_lr0: initial (under-)estimate ``d0``.
        weight_decay: decoupled decay (AdamW style).

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: a hyperparameter out of range; ``update`` without params.

    References:
        Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023, arXiv
        2301.07733, Algorithm 5 (Adam); optax.contrib.dadapt_adamw.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.dadapt_adamw())
    """
    learning_rate = _lr_arg(learning_rate)
    betas = _check_betas(betas)
    check_float("eps", eps, low=0.0)
    check_float("estim_lr0", estim_lr0, low=0.0, low_open=True)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_dadapt_tx, static_args=("use_weight_decay",))(
        lr=learning_rate, betas=betas, eps=eps, estim_lr0=estim_lr0, weight_decay=weight_decay,
        use_weight_decay=_nonzero(weight_decay))


# --- AdEMAMix ------------------------------------------------------------------------------------


class ScaleByAdemamixState(NamedTuple):
    """``count``, ``count_m2``: updates so far (0-d int64, equal); ``m1``: fast EMA; ``m2``: slow
    EMA; ``nu``: second moment (params-shaped)."""

    count: torch.Tensor
    count_m2: torch.Tensor
    m1: Any
    m2: Any
    nu: Any


@recorded
def scale_by_ademamix(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: float | torch.Tensor = 1e-8,
    eps_root: float | torch.Tensor = 0.0,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdEMAMix's preconditioning (Pagliardini et al., 2024): Adam plus a slow EMA.

    ``m1 = b1 m1 + (1-b1) g``; ``m2 = b3 m2 + (1-b3) g``; ``v = b2 v + (1-b2) g^2``;
    ``u = (m1 / (1-b1^t) + alpha m2) / (sqrt(v / (1-b2^t) + eps_root) + eps)``. ``b3`` and
    ``alpha`` may be schedules of the 0-based count.

    Args:
        b1: decay of the fast EMA.
        b2: decay of the second moment.
        b3: decay of the slow EMA (or a schedule of the count).
        alpha: weight of the slow EMA (or a schedule of the count).
        eps: added outside the root.
        eps_root: added inside the root.
        mu_dtype: dtype of the three buffers (default: the params').

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: a decay outside ``[0, 1)``.

    References:
        Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", ICLR 2025,
        arXiv 2409.03137, Algorithm 1; optax.contrib.scale_by_ademamix.

    Example:
        >>> tx = gx.chain(gx.scale_by_ademamix(b3=0.999, alpha=5.0), gx.scale_by_learning_rate(1e-3))
    """
    check_float("b1", b1, low=0.0, high=1.0, high_open=True)
    check_float("b2", b2, low=0.0, high=1.0, high_open=True)
    check_float("b3", b3, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)
    check_float("eps_root", eps_root, low=0.0)
    _check_dtype("mu_dtype", mu_dtype)

    def init(params: Params) -> ScaleByAdemamixState:
        def zeros(p: Any) -> Any:
            return None if p is None else torch.zeros_like(p, dtype=mu_dtype or p.dtype)

        return ScaleByAdemamixState(_zero_count(), _zero_count(), _tree.tree_map(zeros, params),
                                    _tree.tree_map(zeros, params), _tree.tree_map(zeros, params))

    def owned_update(updates: Updates, state: ScaleByAdemamixState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByAdemamixState]:
        flat = _owned.live(updates, state, ScaleByAdemamixState, "scale_by_ademamix")
        if flat is None:
            return updates, state
        g = flat.live
        c3 = _sv(b3(state.count_m2)) if _is_schedule(b3) else _sv(b3)
        ca = _sv(alpha(state.count_m2)) if _is_schedule(alpha) else _sv(alpha)
        beta1, beta2, e, er = _sv(b1), _sv(b2), _sv(eps), _sv(eps_root)
        live = lambda tree, what: _owned.held(flat, tree, what, own, same_dtype=False)  # noqa: E731
        m1 = _ema(live(state.m1, "state.m1"), _cast(g, state.m1, flat), beta1, True)
        m2 = _ema(live(state.m2, "state.m2"), _cast(g, state.m2, flat), c3, True)
        nu = _ema_sq(live(state.nu, "state.nu"), _cast(g, state.nu, flat), beta2, True)
        t = _count_value(state.count) + 1
        counts = {"count": state.count + 1, "count_m2": state.count_m2 + 1}
        if _eager_numbers(t, c3, ca, beta1, beta2, e, er) and all(x.dtype == y.dtype for x, y in zip(m1, g)):
            # one temporary: the numerator, divided in place by the denominator made chunk by chunk
            out = list(_fe.div(m1, 1 - beta1 ** t))
            _fe.add_(out, m2, alpha=ca)
            _div_by_root_(out, nu, [1 - beta2 ** t] * len(nu), er, e)
            return _owned.finish(flat, out, state, counts, m1=m1, m2=m2, nu=nu)
        num = list(_fe.div(m1, 1 - beta1 ** t))
        _fe.add_(num, _fe.mul(m2, ca))
        den = list(_fe.div(nu, 1 - beta2 ** t))
        if not (isinstance(eps_root, (int, float)) and eps_root == 0):
            _fe.add_(den, er)
        den = list(_fe.sqrt(den))
        _fe.add_(den, e)
        out = [o.to(x.dtype) for o, x in zip(_fe.div(num, den), g)]
        return _owned.finish(flat, out, state, counts, m1=m1, m2=m2, nu=nu)

    return owned_transform(init, owned_update)


def _cast(g: list[torch.Tensor], tree: Any, flat: _Flat) -> list[torch.Tensor]:
    leaves = _tree.tree_flatten(tree)[0]
    return [x if x.dtype == leaves[i].dtype else x.to(leaves[i].dtype) for x, i in zip(g, flat.idx)]


def _ademamix(lr: Any, b1: Any, b2: Any, b3: Any, alpha: Any, eps: Any, eps_root: Any, mu_dtype: Any,
              weight_decay: Any, mask: Any, use_weight_decay: bool) -> GradientTransformation:
    parts = [scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype)]
    if use_weight_decay:
        parts.append(add_decayed_weights(weight_decay, mask))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


@recorded
def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """AdEMAMix (Pagliardini et al., 2024), as ``optax.contrib.ademamix``.

    ``u = -lr (u_ademamix + wd x)``: `scale_by_ademamix`, decoupled decay (on the leaves ``mask``
    selects), then the learning rate (injected as ``lr``).

    Args:
        learning_rate: the learning rate (or schedule).
        b1: as `scale_by_ademamix`.
        b2: as `scale_by_ademamix`.
        b3: as `scale_by_ademamix`.
        alpha: as `scale_by_ademamix` (optax's alias default 5.0, the block's 6.0).
        eps: as `scale_by_ademamix`.
        eps_root: as `scale_by_ademamix`.
        mu_dtype: as `scale_by_ademamix`.
        weight_decay: decoupled decay.
        mask: which leaves to decay (a pytree of bools or a function of the params).

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Pagliardini, Ablin, Grangier, ICLR 2025, arXiv 2409.03137; optax.contrib.ademamix.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.ademamix(1e-3, b3=0.999, alpha=5.0))
    """
    learning_rate = _lr_arg(learning_rate)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_ademamix, static_args=("mu_dtype", "mask", "use_weight_decay"))(
        lr=learning_rate, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
        weight_decay=weight_decay, mask=mask, use_weight_decay=_nonzero(weight_decay))


# --- ADOPT ---------------------------------------------------------------------------------------


class ScaleByAdoptState(NamedTuple):
    """``count``: updates so far (0-d int64); ``mu``: momentum of the normalised gradients;
    ``nu``: second moment (params-shaped)."""

    count: torch.Tensor
    mu: Any
    nu: Any


def _quarter_power(count: Any) -> Any:
    """ADOPT's default clip value ``count ** 0.25``."""
    return count ** 0.25


@recorded
def scale_by_adopt(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.9999,
    eps: float | torch.Tensor = 1e-6,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Any], Any] = _quarter_power,
) -> GradientTransformation:
    """ADOPT's preconditioning (Taniguchi et al., 2024): normalise by the *previous* second moment.

    Step 0: ``v = g^2``, ``m`` and the output stay 0. Then, with ``t`` the 0-based count:
    ``n = clip(g / max(sqrt(v_{t-1}), eps), ±clip_value_fn(t))``; ``m = b1 m + (1-b1) n``;
    ``v_t = b2 v_{t-1} + (1-b2) g^2``; output ``m`` (Nesterov: ``b1 m + (1-b1) n``).

    Args:
        b1: momentum decay.
        b2: second-moment decay.
        eps: floor of the root.
        mu_dtype: dtype of ``mu`` (default: the params').
        nesterov: Nesterov-style output.
        use_clipping: clip the normalised gradient.
        clip_value_fn: clip bound as a function of the count.

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: a decay outside ``[0, 1)`` or negative ``eps``.

    References:
        Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal
        Rate", NeurIPS 2024, arXiv 2411.02853, Algorithm 2; optax.contrib.scale_by_adopt.

    Example:
        >>> tx = gx.chain(gx.scale_by_adopt(), gx.scale_by_learning_rate(1e-3))
    """
    check_float("b1", b1, low=0.0, high=1.0, high_open=True)
    check_float("b2", b2, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)
    _check_dtype("mu_dtype", mu_dtype)
    if not callable(clip_value_fn):
        raise TypeError(f"clip_value_fn must be callable count -> bound; got {clip_value_fn!r}")

    def init(params: Params) -> ScaleByAdoptState:
        def zeros(p: Any) -> Any:
            return None if p is None else torch.zeros_like(p, dtype=mu_dtype or p.dtype)

        return ScaleByAdoptState(_zero_count(), _tree.tree_map(zeros, params), _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByAdoptState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByAdoptState]:
        flat = _owned.live(updates, state, ScaleByAdoptState, "scale_by_adopt")
        if flat is None:
            return updates, state
        g = flat.live
        c = _count_value(state.count)
        first = c == 0
        beta1 = _select(first, 1.0, _sv(b1))
        beta2 = _select(first, 0.0, _sv(b2))
        e = _sv(eps)
        bound = clip_value_fn(c) if use_clipping else None
        if _eager_numbers(c, beta1, beta2, e, bound):
            # one temporary s: s = clip(g / max(sqrt(nu), eps)); nu, mu in place; s <- the output
            nu = _owned.held(flat, state.nu, "state.nu", own)
            s = list(_fe.sqrt(nu))
            _fe.clamp_min_(s, e)
            _rdiv_(s, g)
            if use_clipping:
                for x in s:
                    x.clamp_(-bound, bound)
            _ema_sq(nu, g, beta2, True)
            mu = _ema(_owned.held(flat, state.mu, "state.mu", own, same_dtype=False), _cast(s, state.mu, flat), beta1, True)
            if nesterov:  # b1 mu + (1 - b1) n, written over n
                for m, x in zip(mu, s):
                    torch.lerp(m.to(x.dtype), x, 1.0 - beta1, out=x)
            else:
                _copy_(s, mu)
            return _owned.finish(flat, s, state, {"count": state.count + 1}, mu=mu, nu=nu)
        nu_old = flat.state_live(state.nu, "state.nu")
        den = list(_fe.sqrt(nu_old))
        if isinstance(e, torch.Tensor):
            den = [torch.maximum(x, e.to(x)) for x in den]  # maximum: a DTensor strategy on every torch with FSDP2
        else:
            _fe.clamp_min_(den, e)
        n = list(_fe.div(g, den))
        if use_clipping:
            n = [torch.clamp(x, -bound, bound) for x in n] if isinstance(bound, torch.Tensor) else \
                [x.clamp(-bound, bound) for x in n]
        nu = _ema_sq(nu_old if own.state else [x.clone() for x in nu_old], g, beta2, True)
        mu = _ema(_owned.held(flat, state.mu, "state.mu", own, same_dtype=False), _cast(n, state.mu, flat), beta1, True)
        if nesterov:
            out = _ema([x.to(y.dtype) for x, y in zip(mu, g)], n, beta1, False)
        else:
            out = [x.to(y.dtype, copy=True) for x, y in zip(mu, g)]
        return _owned.finish(flat, out, state, {"count": state.count + 1}, mu=mu, nu=nu)

    return owned_transform(init, owned_update)


def _adopt(lr: Any, b1: Any, b2: Any, eps: Any, mu_dtype: Any, nesterov: bool, use_clipping: bool,
           clip_value_fn: Any) -> GradientTransformation:
    return chain(scale_by_adopt(b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
                                clip_value_fn=clip_value_fn), scale_by_learning_rate(lr))


@recorded
def adopt(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Any], Any] = _quarter_power,
) -> GradientTransformation:
    """ADOPT (Taniguchi et al., 2024), as ``optax.contrib.adopt``: `scale_by_adopt` then
    ``-lr`` (the rate injected as ``lr``).

    Args:
        learning_rate: the learning rate (or schedule).
        b1: as `scale_by_adopt`.
        b2: as `scale_by_adopt`.
        eps: as `scale_by_adopt`.
        mu_dtype: as `scale_by_adopt`.
        nesterov: as `scale_by_adopt`.
        use_clipping: as `scale_by_adopt`.
        clip_value_fn: as `scale_by_adopt`.

    Returns:
        A `GradientTransformation`.

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Taniguchi et al., NeurIPS 2024, arXiv 2411.02853; optax.contrib.adopt.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adopt(1e-3))
    """
    learning_rate = _lr_arg(learning_rate)
    return inject_hyperparams(_adopt, static_args=("mu_dtype", "nesterov", "use_clipping", "clip_value_fn"))(
        lr=learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
        clip_value_fn=clip_value_fn)


# --- SAM -----------------------------------------------------------------------------------------


@recorded
def normalize() -> GradientTransformation:
    """Divide the updates by their global L2 norm: ``u <- u / ||u||`` (``optax.contrib.normalize``;
    SAM's adversarial direction).

    Returns:
        A stateless `GradientTransformation`.

    References:
        Foret et al., "Sharpness-Aware Minimization", ICLR 2021, arXiv 2010.01412, Eq. 2.

    Example:
        >>> adv = gx.chain(gx.normalize(), gx.scale_by_learning_rate(0.05))
    """

    def update_fn(updates: Updates, params: Params | None) -> Updates:
        del params
        flat = _Flat(updates)
        if not flat.live:
            return updates
        norm = torch.sqrt(_sq_norm(flat.live))
        return flat.rebuild(list(_fe.div(flat.live, norm)))

    return stateless(update_fn)


class SAMState(NamedTuple):
    """``steps_since_sync``: position in the cycle (0-d int64); ``opt_state``: the outer
    optimizer's state; ``adv_state``: the adversarial optimizer's state; ``cache``: the params at
    the start of the cycle (params-shaped)."""

    steps_since_sync: torch.Tensor
    opt_state: Any
    adv_state: Any
    cache: Any


def _where_tree(cond: torch.Tensor, a: Any, b: Any) -> Any:
    def pick(x: Any, y: Any) -> Any:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return torch.where(cond.to(x.device), x, y)
        return x
    return _tree.tree_map(pick, a, b)


def _assign(old: Any, new: Any, own: Ownership) -> Any:
    """``new``, written into ``old``'s buffers when the caller owns the state (outside torch.func)."""
    if not own.state or _tree.pure_ops():
        return new

    def put(o: Any, n: Any) -> Any:
        if (isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and o is not n and o.shape == n.shape
                and o.dtype == n.dtype and o.device == n.device):
            o.copy_(n)
            return o
        return n

    return _tree.tree_map(put, old, new)


@recorded
def sam(
    optimizer: GradientTransformation,
    adv_optimizer: GradientTransformation,
    sync_period: int = 2,
    reset_state: bool = True,
) -> GradientTransformation:
    """Sharpness-Aware Minimization (Foret et al., 2021) in optax's transparent (two-phase) form.

    A cycle has ``sync_period`` updates on the gradients of one batch. The first
    ``sync_period - 1`` are adversarial ascents: ``u = -adv_optimizer(g)`` (with
    ``adv_optimizer = chain(normalize(), scale_by_learning_rate(rho))``: ``u = rho g / ||g||``);
    the params at the start of the cycle are cached. The last one takes the gradient at the
    perturbed point, runs ``optimizer`` on it with the cached params, and returns to the cache:
    ``u = cache - x + optimizer(g)``. ``reset_state`` re-initialises ``adv_optimizer`` after each
    cycle. Through `gradxform.Optimizer` call ``opt.step(closure)`` ``sync_period`` times per
    batch (the closure recomputes loss and gradients at the current, perturbed, params).

    Args:
        optimizer: the outer optimizer (e.g. ``gx.sgd(0.1)``), applied at the cached params.
        adv_optimizer: the ascent transform; its update is negated (use
            ``scale_by_learning_rate(rho)``, not an alias with an injected ``lr``: the adapter
            would drive that ``lr`` too).
        sync_period: updates per cycle (>= 1; 1 is the plain optimizer).
        reset_state: re-initialise the adversarial state after each cycle.

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: ``sync_period < 1``; ``update`` without params.

    References:
        Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
        Generalization", ICLR 2021, arXiv 2010.01412, Algorithm 1; optax.contrib.sam.

    Example:
        >>> tx = gx.sam(gx.sgd(0.1), gx.chain(gx.normalize(), gx.scale_by_learning_rate(0.05)))
        >>> opt = gx.Optimizer(model.parameters(), tx)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(x).square().mean()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(2):  # ascent, then descent, on the same batch
        ...     loss = opt.step(closure)
    """
    if not isinstance(sync_period, int) or isinstance(sync_period, bool) or sync_period < 1:
        raise ValueError(f"sync_period must be an int >= 1; got {sync_period!r}")
    for name, tx in (("optimizer", optimizer), ("adv_optimizer", adv_optimizer)):
        if not (isinstance(tx, tuple) and len(tx) == 2 and all(callable(f) for f in tx)):
            raise TypeError(f"sam: {name} must be a GradientTransformation; got {tx!r}")

    def init(params: Params) -> SAMState:
        return SAMState(_zero_count(), optimizer.init(params), adv_optimizer.init(params), _clone_params(params))

    def owned_update(updates: Updates, state: SAMState, params: Params | None,
                     own: Ownership) -> tuple[Updates, SAMState]:
        flat = _owned.live(updates, state, SAMState, "sam")
        if flat is None:
            return updates, state
        x = flat.params_live(params, "sam")
        ssc = _count_value(state.steps_since_sync)
        next_ssc = (state.steps_since_sync + 1) % sync_period
        cache_all = _tree.tree_flatten(state.cache)[0]
        p_all = _tree.tree_flatten(params)[0]

        def new_cache(first: Any) -> Any:
            if isinstance(first, bool):
                if not first:
                    return state.cache
                if own.state:
                    for c, p in zip(cache_all, p_all):
                        if c is not None and p is not None:
                            c.copy_(p)
                    return state.cache
                return _clone_params(params)
            return _where_tree(first, _clone_params(params), state.cache)

        def descent(pure: bool) -> tuple[list[torch.Tensor], Any]:
            opt_u, opt_s = call_update(optimizer, updates, state.opt_state, state.cache, PURE if pure else own)
            cache = flat.state_live(state.cache, "state.cache")
            out = list(_fe.add(cache, x, alpha=-1))
            _fe.add_(out, _Flat(opt_u).live)
            return out, opt_s

        def ascent(pure: bool) -> tuple[list[torch.Tensor], Any]:
            adv_u, adv_s = call_update(adv_optimizer, updates, state.adv_state, params, PURE if pure else own)
            return list(_fe.mul(_Flat(adv_u).live, -1.0)), adv_s

        if not isinstance(ssc, torch.Tensor):  # eager, CPU count: run only this phase
            first, last = ssc == 0, ssc == sync_period - 1
            if last:
                out, opt_s = descent(False)
                adv_s = _assign(state.adv_state, adv_optimizer.init(params), own) if reset_state else state.adv_state
            else:
                out, adv_s = ascent(False)
                opt_s = state.opt_state
            cache = new_cache(first)
            return flat.rebuild(out), SAMState(next_ssc, opt_s, adv_s, cache)
        # traced: both phases, selected without a host read
        first_t, last_t = ssc == 0, ssc == sync_period - 1
        d_out, opt_s = descent(True)
        a_out, adv_s = ascent(True)
        out = [torch.where(last_t.to(d.device), d, a) for d, a in zip(d_out, a_out)]
        reset = adv_optimizer.init(params) if reset_state else state.adv_state
        adv_s = _assign(state.adv_state, _where_tree(last_t, reset, adv_s), own)
        opt_s = _assign(state.opt_state, _where_tree(last_t, opt_s, state.opt_state), own)
        cache = _assign(state.cache, new_cache(first_t), own)
        return flat.rebuild(out), SAMState(next_ssc, opt_s, adv_s, cache)

    return owned_transform(init, owned_update)


# --- MADGRAD -------------------------------------------------------------------------------------


class MadgradState(NamedTuple):
    """``count`` (0-d int64); ``grad_sum_sq``: weighted sum of squared gradients; ``s``: weighted
    sum of gradients; ``x0``: the initial params (params-shaped)."""

    count: torch.Tensor
    grad_sum_sq: Any
    s: Any
    x0: Any


@recorded
def scale_by_madgrad(learning_rate: ScalarOrSchedule, momentum: float | torch.Tensor = 0.9,
                     eps: float | torch.Tensor = 1e-6) -> GradientTransformation:
    """MADGRAD's dual-averaging step (Defazio & Jelassi, 2021), as ``optax.contrib.scale_by_madgrad``.

    ``lam = (lr + eps) sqrt(k + 1)``; ``S += lam g^2``; ``s += lam g``;
    ``z = x0 - s / (S^(1/3) + eps)``; ``u = (1 - momentum)(z - x)`` (so
    ``x <- (1 - momentum) z + momentum x``). The output is the whole step (already signed).

    Args:
        learning_rate: the learning rate (or schedule of the 0-based count).
        momentum: in ``[0, 1)``.
        eps: stabiliser (added to the rate and to the cube root).

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: a hyperparameter out of range; ``update`` without params.

    References:
        Defazio & Jelassi, "Adaptivity without Compromise: A Momentumized, Adaptive, Dual
        Averaged Gradient Method for Stochastic Optimization", JMLR 2022, arXiv 2101.11075,
        Algorithm 1; optax.contrib.scale_by_madgrad.

    Example:
        >>> tx = gx.scale_by_madgrad(1e-2)
    """
    check_float("learning_rate", learning_rate, low=0.0)
    check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)

    def init(params: Params) -> MadgradState:
        zeros = _tree.tree_zeros_like
        return MadgradState(_zero_count(), zeros(params), zeros(params), _clone_params(params))

    def owned_update(updates: Updates, state: MadgradState, params: Params | None,
                     own: Ownership) -> tuple[Updates, MadgradState]:
        flat = _owned.live(updates, state, MadgradState, "scale_by_madgrad")
        if flat is None:
            return updates, state
        g = flat.live
        x = flat.params_live(params, "scale_by_madgrad")
        lr = _sv(learning_rate(state.count)) if _is_schedule(learning_rate) else _sv(learning_rate)
        e, m = _sv(eps), _sv(momentum)
        k = _count_value(state.count)
        lam = (lr + e) * ((k + 1) ** 0.5)
        gss = _owned.held(flat, state.grad_sum_sq, "state.grad_sum_sq", own)
        s = _owned.held(flat, state.s, "state.s", own)
        if isinstance(lam, (int, float)) and not _tree.pure_ops():  # no temporaries but sigma
            _fe.addcmul_(gss, g, g, lam)
            _fe.add_(s, g, alpha=lam)
        else:
            _fe.add_(gss, _fe.mul(_fe.mul(g, g), lam))
            _fe.add_(s, _fe.mul(g, lam))
        if own.may_write(g) and not _tree.pure_ops():
            # sigma into the incoming update, which the caller hands over (the decayed gradient
            # add_decayed_weights made): its last read was the sums above
            z = g
            for zi, v in zip(z, gss):
                torch.pow(v, 1.0 / 3.0, out=zi)
        else:
            z = list(_pow(gss, 1.0 / 3.0))
        _fe.add_(z, e)
        _reciprocal_(z)
        _fe.mul_(z, s)  # s / sigma, in sigma's buffer
        _fe.mul_(z, -1.0)
        _fe.add_(z, flat.state_live(state.x0, "state.x0"))
        _fe.add_(z, x, alpha=-1)
        _fe.mul_(z, 1 - m)
        return _owned.finish(flat, z, state, {"count": state.count + 1}, grad_sum_sq=gss, s=s)

    return owned_transform(init, owned_update)


def _madgrad(lr: Any, momentum: Any, weight_decay: Any, eps: Any, use_weight_decay: bool) -> GradientTransformation:
    parts = [add_decayed_weights(weight_decay)] if use_weight_decay else []
    parts.append(scale_by_madgrad(lr, momentum, eps))
    return chain(*parts)


@recorded
def madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-6,
) -> GradientTransformation:
    """MADGRAD (Defazio & Jelassi, 2021), as ``optax.contrib.madgrad`` and the authors' reference
    (L2 decay added to the gradient, then `scale_by_madgrad`). The rate is injected as ``lr``.

    Args:
        learning_rate: the learning rate (or schedule).
        momentum: in ``[0, 1)``.
        weight_decay: L2 decay added to the gradient.
        eps: stabiliser.

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Defazio & Jelassi, JMLR 2022, arXiv 2101.11075; optax.contrib.madgrad.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.madgrad(1e-2))
    """
    learning_rate = _lr_arg(learning_rate)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_madgrad, static_args=("use_weight_decay",))(
        lr=learning_rate, momentum=momentum, weight_decay=weight_decay, eps=eps,
        use_weight_decay=_nonzero(weight_decay))


# --- COCOB ---------------------------------------------------------------------------------------


class COCOBState(NamedTuple):
    """``init_particles``: the initial params; ``cumulative_gradients``: ``-sum g``; ``scale``:
    running max of ``|g|`` (from ``eps``); ``subgradients``: ``sum |g|``; ``reward`` (all
    params-shaped)."""

    init_particles: Any
    cumulative_gradients: Any
    scale: Any
    subgradients: Any
    reward: Any


@recorded
def scale_by_cocob(alpha: float | torch.Tensor = 100.0, eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """COCOB-Backprop's coin betting (Orabona & Tommasi, 2017), as ``optax.contrib.scale_by_cocob``.

    ``L = max(L, |g|)`` (``L_0 = eps``); ``G += |g|``; ``R = max(R - g (x - x0), 0)``; ``C -= g``;
    the new point is ``x0 + C / (L max(G + L, alpha L)) (L + R)``, output as the step
    ``u = x0 + ... - x``.

    Args:
        alpha: bounds the first steps (larger: more careful).
        eps: the initial ``L``.

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: ``alpha`` or ``eps`` not positive; ``update`` without params.

    References:
        Orabona & Tommasi, "Training Deep Networks without Learning Rates Through Coin Betting",
        NeurIPS 2017, arXiv 1705.07795, Algorithm 2; optax.contrib.scale_by_cocob.

    Example:
        >>> tx = gx.scale_by_cocob()
    """
    check_float("alpha", alpha, low=0.0, low_open=True)
    check_float("eps", eps, low=0.0, low_open=True)

    def init(params: Params) -> COCOBState:
        zeros = _tree.tree_zeros_like
        def eps_like(p: Any) -> Any:
            if p is None:
                return None
            if isinstance(eps, torch.Tensor):
                return torch.zeros_like(p) + eps.detach().to(p)
            return torch.full_like(p, float(eps))

        scale0 = _tree.tree_map(eps_like, params)
        return COCOBState(_clone_params(params), zeros(params), scale0, zeros(params), zeros(params))

    def owned_update(updates: Updates, state: COCOBState, params: Params | None,
                     own: Ownership) -> tuple[Updates, COCOBState]:
        flat = _owned.live(updates, state, COCOBState, "scale_by_cocob")
        if flat is None:
            return updates, state
        g = flat.live
        x = flat.params_live(params, "scale_by_cocob")
        x0 = flat.state_live(state.init_particles, "state.init_particles")
        a = _sv(alpha)
        if not _tree.pure_ops() and isinstance(a, (int, float)):
            return _cocob_eager(flat, state, g, x, x0, a, own)
        absg = list(_abs(g))
        L = _owned.held(flat, state.scale, "state.scale", own)
        _fe.maximum_(L, absg)
        G = _owned.held(flat, state.subgradients, "state.subgradients", own)
        _fe.add_(G, absg)
        R = _owned.held(flat, state.reward, "state.reward", own)
        diff = list(_fe.add(x, x0, alpha=-1))
        _fe.add_(R, _fe.mul(g, diff), alpha=-1)
        _fe.clamp_min_(R, 0.0)
        C = _owned.held(flat, state.cumulative_gradients, "state.cumulative_gradients", own)
        _fe.add_(C, g, alpha=-1)
        den = list(_fe.maximum(_fe.add(G, L), _fe.mul(L, a)))
        _fe.mul_(den, L)
        out = list(_fe.div(C, den))
        _fe.mul_(out, _fe.add(L, R))
        _fe.add_(out, diff, alpha=-1)
        return _owned.finish(flat, out, state, cumulative_gradients=C, scale=L, subgradients=G, reward=R)

    return owned_transform(init, owned_update)


def _cocob_eager(flat: _Flat, state: COCOBState, g: list[torch.Tensor], x: list[torch.Tensor],
                 x0: list[torch.Tensor], a: float, own: Ownership) -> tuple[Updates, COCOBState]:
    """scale_by_cocob's step with two temporaries (``|g|``, in the update's own buffer when it may
    be written, then the ratio; ``x - x0``, then the output),
    the state in place; ``max(G + L, a L)`` as ``L + max(G, (a - 1) L)``."""
    R = _owned.held(flat, state.reward, "state.reward", own)
    diff = list(_sub(x, x0))
    _fe.addcmul_(R, g, diff, -1.0)
    _fe.clamp_min_(R, 0.0)
    C = _owned.held(flat, state.cumulative_gradients, "state.cumulative_gradients", own)
    _fe.add_(C, g, alpha=-1)
    # g is no longer needed: |g| in its own buffer when the update is ours to write
    if own.may_write(g):
        _abs_(g)
        T = g
    else:
        T = list(_abs(g))
    L = _owned.held(flat, state.scale, "state.scale", own)
    _fe.maximum_(L, T)
    G = _owned.held(flat, state.subgradients, "state.subgradients", own)
    _fe.add_(G, T)
    _copy_(T, L)
    _fe.mul_(T, a - 1.0)
    _fe.maximum_(T, G)
    _fe.add_(T, L)
    _fe.mul_(T, L)  # the denominator
    _reciprocal_(T)
    _fe.mul_(T, C)  # C / den
    _fe.mul_(diff, -1.0)  # the output: (C / den) (L + R) - (x - x0), in diff's buffer
    _fe.addcmul_(diff, T, L)
    _fe.addcmul_(diff, T, R)
    return _owned.finish(flat, diff, state, cumulative_gradients=C, scale=L, subgradients=G, reward=R)


def _cocob(lr: Any, alpha: Any, eps: Any, weight_decay: Any, mask: Any, use_weight_decay: bool) -> GradientTransformation:
    parts = [add_decayed_weights(weight_decay, mask)] if use_weight_decay else []
    parts += [scale_by_learning_rate(lr, flip_sign=False), scale_by_cocob(alpha, eps)]
    return chain(*parts)


@recorded
def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: float = 100.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """COCOB-Backprop (Orabona & Tommasi, 2017), as ``optax.contrib.cocob``: L2 decay, the
    gradient scaled by ``+learning_rate`` (injected as ``lr``; 1.0 is the method itself), then
    `scale_by_cocob`.

    Args:
        learning_rate: multiplies the gradient before the betting.
        alpha: as `scale_by_cocob`.
        eps: as `scale_by_cocob`.
        weight_decay: L2 decay added to the gradient.
        mask: which leaves to decay.

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Orabona & Tommasi, NeurIPS 2017, arXiv 1705.07795; optax.contrib.cocob.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.cocob())
    """
    learning_rate = _lr_arg(learning_rate)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_cocob, static_args=("mask", "use_weight_decay"))(
        lr=learning_rate, alpha=alpha, eps=eps, weight_decay=weight_decay, mask=mask,
        use_weight_decay=_nonzero(weight_decay))


# --- DoG -----------------------------------------------------------------------------------------


class DoGState(NamedTuple):
    """``is_init_step`` (0-d bool); ``init_params``: the initial params; ``max_dist``: largest
    distance from them (0-d, from ``r_eps``); ``sum_sq_norm_grads`` (0-d)."""

    is_init_step: torch.Tensor
    init_params: Any
    max_dist: torch.Tensor
    sum_sq_norm_grads: torch.Tensor


_DOG_INIT = ("distance", "learning_rate", "heuristic")


@recorded
def scale_by_dog(init_step: tuple[str, float] = ("heuristic", 1e-6), eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """DoG, "distance over gradients" (Ivgi et al., 2023), as ``optax.contrib.scale_by_dog``.

    ``r_t = max(r_{t-1}, ||x_t - x_0||)``; ``G_t = G_{t-1} + ||g_t||^2``;
    ``u = (r_t / sqrt(G_t + eps)) g`` (positive: chain a negative learning rate). ``r_0`` from
    ``init_step``: ``("distance", r)``: ``r``; ``("heuristic", c)``: ``c (1 + ||x_0||)``;
    ``("learning_rate", lr)``: 0, and the first step uses ``lr`` itself.

    Args:
        init_step: ``(kind, value)`` with kind ``"distance"``, ``"heuristic"`` or
            ``"learning_rate"``.
        eps: added under the root.

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: an unknown ``init_step`` kind; ``update`` without params.

    References:
        Ivgi, Hinder, Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
        Schedule", ICML 2023, arXiv 2302.12022, Algorithm 1; optax.contrib.scale_by_dog.

    Example:
        >>> tx = gx.chain(gx.scale_by_dog(("heuristic", 1e-6)), gx.scale_by_learning_rate(1.0))
    """
    if not (isinstance(init_step, (tuple, list)) and len(init_step) == 2 and init_step[0] in _DOG_INIT):
        raise ValueError(f"init_step must be (kind, value) with kind in {_DOG_INIT}; got {init_step!r}")
    kind, value = init_step
    check_float("init_step value", value, low=0.0)
    check_float("eps", eps, low=0.0)

    def init(params: Params) -> DoGState:
        live = [p for p in _tree.tree_flatten(params)[0] if p is not None]
        if kind == "distance":
            r = _scalar(value, params)
        elif kind == "heuristic":
            norm = torch.sqrt(_sq_norm([p.detach() for p in live])) if live else 0.0
            r = _scalar(value, params) * (1 + (norm.to(_scalar_home(params)[1]) if live else 0.0))
        else:
            r = _scalar(0.0, params)
        return DoGState(torch.ones((), dtype=torch.bool, device=r.device), _clone_params(params), r,
                        _scalar(0.0, params))

    def owned_update(updates: Updates, state: DoGState, params: Params | None,
                     own: Ownership) -> tuple[Updates, DoGState]:
        del own
        flat = _owned.live(updates, state, DoGState, "scale_by_dog")
        if flat is None:
            return updates, state
        x = flat.params_live(params, "scale_by_dog")
        x0 = flat.state_live(state.init_params, "state.init_params")
        # the step of the layer-wise scale_by_distance_over_gradients, with norms over all leaves
        tmp, dists, gnorms = _dog_norms(x, x0, flat.live)
        dist = torch.linalg.vector_norm(torch.stack(dists))
        max_dist = torch.maximum(state.max_dist, dist.to(state.max_dist))
        sum_sq = state.sum_sq_norm_grads + (torch.stack(gnorms) ** 2).sum().to(state.sum_sq_norm_grads)
        lr = max_dist / torch.sqrt(sum_sq + _sv(eps))
        if kind == "learning_rate":
            lr = torch.where(state.is_init_step, _like(_sv(value), lr), lr)
        out = _dog_scaled(flat, tmp, lr)
        return out, DoGState(torch.zeros_like(state.is_init_step), state.init_params, max_dist, sum_sq)

    return owned_transform(init, owned_update)


def _dog(lr: Any, init_step: Any, eps: Any, weight_decay: Any, mask: Any, use_weight_decay: bool) -> GradientTransformation:
    parts = [add_decayed_weights(weight_decay, mask)] if use_weight_decay else []
    parts += [scale_by_dog(tuple(init_step), eps), scale_by_learning_rate(lr)]
    return chain(*parts)


@recorded
def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: tuple[str, float] = ("heuristic", 1e-6),
    eps: float = 1e-8,
    weight_decay: float | None = None,
    mask: Any = None,
) -> GradientTransformation:
    """DoG (Ivgi et al., 2023), as ``optax.contrib.dog``: optional L2 decay, `scale_by_dog`, then
    ``-learning_rate`` (a multiplier, 1.0 for the method; injected as ``lr``).

    Args:
        learning_rate: multiplier of DoG's step size (or schedule).
        init_step: as `scale_by_dog`.
        eps: as `scale_by_dog`.
        weight_decay: L2 decay added to the gradient (``None``: none).
        mask: which leaves to decay.

    Returns:
        A `GradientTransformation` (needs params).

    Raises:
        ValueError: a hyperparameter out of range.

    References:
        Ivgi, Hinder, Carmon, ICML 2023, arXiv 2302.12022; optax.contrib.dog.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.dog())
    """
    learning_rate = _lr_arg(learning_rate)
    if weight_decay is not None:
        check_float("weight_decay", weight_decay, low=0.0)
    scale_by_dog(init_step, eps)  # validates init_step
    return inject_hyperparams(_dog, static_args=("init_step", "mask", "use_weight_decay"))(
        lr=learning_rate, init_step=tuple(init_step), eps=eps, weight_decay=0.0 if weight_decay is None else weight_decay,
        mask=mask, use_weight_decay=weight_decay is not None)


_tree.register_state_types(ScheduleFreeState, ScaleByRmsDebiasedState, ProdigyState, DAdaptAdamWState,
                           ScaleByAdemamixState, ScaleByAdoptState, SAMState, MadgradState, COCOBState, DoGState)
