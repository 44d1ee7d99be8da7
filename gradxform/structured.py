"""Optimisers that use the structure of a tensor or of the loss: factored second moments
(Adafactor), orthogonalised momentum (Muon), quasi-Newton steps (L-BFGS), and torch's
SparseAdam.

The torch twins follow torch.optim 2.13 (names, defaults, semantics, per-param state keys):

- `adafactor` as ``torch.optim.Adafactor`` on the block `scale_by_factored_rms`; optax's flavour
  as `optax_adafactor` on `optax_scale_by_factored_rms`;
- `muon` as ``torch.optim.Muon`` on the block `scale_by_muon`, whose Newton-Schulz iteration is
  also public (`orthogonalize_via_newton_schulz`);
- `lbfgs` as ``torch.optim.LBFGS`` (with and without the strong-Wolfe line search): its
  ``update`` takes the extra arguments ``value`` and ``value_and_grad_fn``;
- `sparse_adam` as ``torch.optim.SparseAdam`` (COO gradients, functionally and through
  `gradxform.Optimizer`).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import name_update as _name_update
from .base import (
    GradientTransformation,
    Ownership,
    Params,
    Updates,
    chain,
    expect_state,
    owned_transform,
    recorded,
)
from .combine import inject_hyperparams
from .transforms import (
    ScalarOrSchedule,
    _ema,
    _Flat,
    _leaf_counts,
    _step_counts,
    add_decayed_weights,
    check_float,
    scale,
    scale_by_learning_rate,
)

__all__ = [
    "FactoredRmsState",
    "ScaleByMuonState",
    "LbfgsState",
    "SparseAdamState",
    "scale_by_factored_rms",
    "adafactor",
    "OptaxFactoredRmsState",
    "optax_scale_by_factored_rms",
    "optax_adafactor",
    "orthogonalize_via_newton_schulz",
    "scale_by_muon",
    "muon",
    "lbfgs",
    "value_and_grad_from_closure",
    "sparse_adam",
]


def _scalar_lr(lr: Any) -> Any:
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.ndim > 0:
        return lr.reshape(())
    return lr


def _lr_dtype(lr: Any) -> torch.dtype | None:
    """The dtype of a tensor lr: torch.optim's Muon and SparseAdam compute their step sizes in it."""
    return lr.dtype if isinstance(lr, torch.Tensor) and lr.is_floating_point() else None


def _nonzero(x: Any) -> bool:
    if not isinstance(x, torch.Tensor) and callable(x):
        return True
    if isinstance(x, torch.Tensor):
        return bool((x != 0).any())
    return x != 0


def _eager_counts(counts: Sequence[torch.Tensor]) -> bool:
    return not _tree.traced() and all(c.device.type == "cpu" for c in counts)


# --- Adafactor ----------------------------------------------------------------------------------


class FactoredRmsState(NamedTuple):
    """``count``: per-leaf number of updates (0-d int64, torch's ``step``); ``row_var``,
    ``col_var``: the factored second moment of a leaf with ``ndim >= 2`` (shapes ``(..., R, 1)``
    and ``(..., 1, C)``; ``None`` for other leaves); ``variance``: the full second moment of a
    leaf with ``ndim <= 1`` (``None`` for matrices)."""

    count: Any
    row_var: Any
    col_var: Any
    variance: Any


FactoredRmsState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "row_var": "row_var", "col_var": "col_var", "variance": "variance"})


def _factored_init(params: Params) -> FactoredRmsState:
    leaves, spec = _tree.tree_flatten(params)

    def make(fn: Callable[[torch.Tensor], Any]) -> Any:
        return _tree.tree_unflatten(spec, [None if p is None else fn(p) for p in leaves])

    def row(p: torch.Tensor) -> Any:
        return p.new_zeros(p.shape[:-1] + (1,)) if p.ndim > 1 else None

    def col(p: torch.Tensor) -> Any:
        return p.new_zeros(p.shape[:-2] + (1, p.shape[-1])) if p.ndim > 1 else None

    def var(p: torch.Tensor) -> Any:
        return torch.zeros_like(p) if p.ndim <= 1 else None

    counts = _tree.tree_unflatten(spec, [None if p is None else torch.zeros((), dtype=torch.int64) for p in leaves])
    return FactoredRmsState(counts, make(row), make(col), make(var))


def _live_or_none(flat: _Flat, tree: Any) -> list[Any]:
    leaves = _tree.tree_flatten(tree)[0] if tree is not None else [None] * len(flat.leaves)
    if len(leaves) != len(flat.leaves):
        raise ValueError(f"the state has {len(leaves)} leaves but the updates have {len(flat.leaves)}: the "
                         "state was made by init() on other params")
    return [leaves[i] for i in flat.idx]


def _factored_leaf(g: torch.Tensor, row: Any, col: Any, var: Any, one_minus_beta2: Any, eps1: Any,
                   inplace: bool) -> tuple[torch.Tensor, Any, Any, Any]:
    """One leaf of Adafactor's preconditioner (torch's rounding): the new row/col (or full)
    second moment and ``u = g / sqrt(max(v_hat, eps1^2))``."""
    if isinstance(one_minus_beta2, torch.Tensor):
        one_minus_beta2 = one_minus_beta2.to(g.dtype)
    if eps1 is None:
        eps1 = torch.finfo(g.dtype).eps
    if g.ndim > 1:
        if row is None or col is None:
            raise ValueError(f"a leaf of shape {tuple(g.shape)} needs a factored state (row_var, col_var): the "
                             "state was made by init() on params of other shapes")
        row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / max(g.size(-1), 1)
        col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / max(g.size(-2), 1)
        if inplace:
            row.lerp_(row_mean, one_minus_beta2)
            col.lerp_(col_mean, one_minus_beta2)
        else:
            row = torch.lerp(row, row_mean, one_minus_beta2)
            col = torch.lerp(col, col_mean, one_minus_beta2)
        v_hat = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        if var is None:
            raise ValueError(f"a leaf of shape {tuple(g.shape)} needs a full second moment (variance): the "
                             "state was made by init() on params of other shapes")
        var = var.lerp_(g * g, one_minus_beta2) if inplace else torch.lerp(var, g * g, one_minus_beta2)
        v_hat = var
    u = v_hat.clamp(min=eps1 * eps1).rsqrt() * g
    return u, row, col, var


def _factored_core(beta2_decay: Any, eps: Any, tail: Callable[..., list[torch.Tensor]] | None, name: str
                   ) -> GradientTransformation:
    def owned_update(updates: Updates, state: FactoredRmsState, params: Params | None,
                     own: Ownership) -> tuple[Updates, FactoredRmsState]:
        expect_state(state, FactoredRmsState, name)
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        inplace = own.state
        counts = _step_counts(flat, state.count, inplace)
        rows, cols, vars_ = [_live_or_none(flat, t) for t in (state.row_var, state.col_var, state.variance)]
        b2d = _tree.as_scalar(beta2_decay)
        if _eager_counts(counts):
            ts: list[Any] = [float(int(c)) for c in counts]
            one_minus = [t ** b2d for t in ts]
        else:
            ts = [c.to(torch.float64) for c in counts]
            one_minus = [t ** b2d for t in ts]
        out, new_r, new_c, new_v = [], [], [], []
        for g, r, c, v, om in zip(flat.live, rows, cols, vars_, one_minus):
            u, r, c, v = _factored_leaf(g, r, c, v, om, eps, inplace)
            out.append(u)
            new_r.append(r)
            new_c.append(c)
            new_v.append(v)
        if tail is not None:
            out = tail(out, flat, params, ts)
        new_state = FactoredRmsState(
            flat.rebuild(counts, like=state.count),
            flat.rebuild(new_r, like=state.row_var),
            flat.rebuild(new_c, like=state.col_var),
            flat.rebuild(new_v, like=state.variance),
        )
        return flat.rebuild(out), new_state

    _name_update(owned_update, name)
    return owned_transform(_factored_init, owned_update)


@recorded
def scale_by_factored_rms(beta2_decay: float | torch.Tensor = -0.8, eps: float | None = None) -> GradientTransformation:
    """Adafactor's factored second-moment preconditioner, as in ``torch.optim.Adafactor``.

    With ``t`` the leaf's own step and ``b_t = 1 - t^beta2_decay``: a leaf with ``ndim >= 2`` keeps
    row and column means of ``g^2`` over its last two dims, ``R_t = b_t R + (1 - b_t) mean_{-1}(g^2)``,
    ``C_t = b_t C + (1 - b_t) mean_{-2}(g^2)``, and ``v_hat = R_t C_t / max(mean_{-2}(R_t), eps)``
    (a rank-1 estimate: memory ``O(R + C)`` instead of ``O(RC)``); a leaf with ``ndim <= 1`` keeps
    ``v_t = b_t v + (1 - b_t) g^2`` and ``v_hat = v_t``. Output ``u = g / sqrt(max(v_hat, eps^2))``.

    torch vs optax (``optax.scale_by_factored_rms``): torch factors every leaf with ``ndim >= 2``
    over its *last two* dims and places eps as a clamp of ``v_hat`` (``eps^2``) and of the row
    mean (``eps``), with ``eps = finfo(dtype).eps`` by default; optax factors over the *two
    largest* dims and only leaves whose dims are at least ``min_dim_size_to_factor`` (128), adds
    ``epsilon = 1e-30`` to ``g^2`` before the averages, and has ``decay_rate = 0.8`` and a
    ``step_offset`` (``b_t = 1 - (t - offset)^-0.8``). This block follows torch; optax's flavour is
    `optax_scale_by_factored_rms`.

    Args:
        beta2_decay: the exponent of the decay schedule (``<= 0``; torch's default ``-0.8``).
        eps: torch's ``eps[0]`` (``eps1``); ``None``: ``torch.finfo(leaf dtype).eps``.

    Returns:
        A transform with state `FactoredRmsState` (torch's keys ``step``, ``row_var``,
        ``col_var``, ``variance``).

    Raises:
        ValueError: ``beta2_decay > 0`` or ``eps < 0``.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
        ICML 2018, arXiv 1804.04235, sections 3-4 and 7;
        https://pytorch.org/docs/stable/generated/torch.optim.Adafactor.html

    Example:
        >>> tx = gx.chain(gx.scale_by_factored_rms(), gx.clip_by_block_rms(1.0), gx.scale(-1e-2))
    """
    check_float("beta2_decay", beta2_decay, high=0.0)
    if eps is not None:
        check_float("eps", eps, low=0.0)
    return _factored_core(beta2_decay, eps, None, "scale_by_factored_rms")


def _adafactor_tail(lr: Any, eps2: Any, d: Any, weight_decay: Any, use_weight_decay: bool
                    ) -> Callable[..., list[torch.Tensor]]:
    """torch's step from the preconditioned ``u``: ``-alpha / max(1, rms(u) / d) * u - lr wd p``
    with ``alpha = max(eps2, rms(p)) * min(lr, 1 / sqrt(t))``."""

    def tail(us: list[torch.Tensor], flat: _Flat, params: Params | None, ts: list[Any]) -> list[torch.Tensor]:
        ps = flat.params_live(params, "adafactor")
        lr_, e2, d_, wd = [_tree.as_scalar(x) for x in (lr, eps2, d, weight_decay)]
        out = []
        for u, p, t in zip(us, ps, ts):
            n = max(p.numel(), 1)
            if isinstance(t, float) and not isinstance(lr_, torch.Tensor):
                rho: Any = min(lr_, 1.0 / t ** 0.5)
            else:
                rho = torch.clamp(torch.as_tensor(t, dtype=torch.float64) ** -0.5, max=lr_)
            rms_p = torch.linalg.vector_norm(p) / math.sqrt(n)
            alpha = rms_p.clamp(min=e2) * rho
            denom = (torch.linalg.vector_norm(u) / (math.sqrt(n) * d_)).clamp(min=1.0)
            step = u * (-alpha / denom).to(u.dtype)
            if use_weight_decay:
                step = step - (lr_ * wd) * p
            out.append(step)
        return out

    return tail


def _adafactor(lr: Any, beta2_decay: Any, d: Any, weight_decay: Any, eps: tuple[Any, Any], maximize: bool,
               use_weight_decay: bool) -> GradientTransformation:
    eps1, eps2 = eps
    core = _factored_core(beta2_decay, eps1, _adafactor_tail(lr, eps2, d, weight_decay, use_weight_decay),
                          "adafactor")
    return chain(scale(-1.0), core) if maximize else core


@recorded
def adafactor(
    lr: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adafactor as ``torch.optim.Adafactor``.

    ``g <- -g`` if maximize; ``u`` from `scale_by_factored_rms` (``eps1 = eps[0]``);
    ``p <- p (1 - lr wd) - alpha_t u / max(1, rms(u) / d)`` with the relative step
    ``alpha_t = max(eps[1], rms(p)) * min(lr, 1 / sqrt(t))`` (torch always takes the minimum with
    ``1/sqrt(t)``: ``lr`` caps the relative step; a schedule for ``lr`` caps it step by step) and
    ``rms(x) = ||x||_2 / sqrt(numel)``; ``t`` is the leaf's own step, ``rms(p)`` is taken before
    the decay. Like torch there is no first moment.

    Differences from optax's ``adafactor``: see `scale_by_factored_rms` (factored dims, eps
    placement); optax also multiplies by ``max(1e-3, rms(p))`` but uses ``lr`` as is (no
    ``1/sqrt(t)`` cap), clips with ``clip_by_block_rms``, has optional momentum and decays without
    ``lr``: that flavour is `optax_adafactor`.

    Args:
        lr: the cap of the relative step (number, 0-d tensor or schedule), ``>= 0``.
        beta2_decay: the exponent of the second-moment decay, ``<= 0``.
        eps: ``(eps1, eps2)``: ``eps1`` (``None``: the dtype's machine epsilon) regularises the
            second moment, ``eps2`` is the smallest param scale.
        d: the clipping threshold of ``rms(u)``, ``>= 1``.
        weight_decay: decoupled decay ``p <- p (1 - lr wd)``, ``>= 0``.
        maximize: ascend instead.

    Returns:
        The transform; ``update`` needs ``params``.

    Raises:
        ValueError: an argument out of torch's range (named in the message).

    References:
        Shazeer & Stern, ICML 2018, arXiv 1804.04235;
        https://pytorch.org/docs/stable/generated/torch.optim.Adafactor.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adafactor(1e-2))
    """
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    check_float("beta2_decay", beta2_decay, high=0.0)
    if callable(eps) or not hasattr(eps, "__len__") or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1 or None, eps2); got {eps!r}")
    if eps[0] is not None:
        check_float("eps[0] (epsilon1)", eps[0], low=0.0)
    check_float("eps[1] (epsilon2)", eps[1], low=0.0)
    check_float("d (clipping threshold)", d, low=1.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_adafactor, static_args=("eps", "maximize", "use_weight_decay"))(
        lr=lr, beta2_decay=beta2_decay, d=d, weight_decay=weight_decay, eps=tuple(eps), maximize=maximize,
        use_weight_decay=_nonzero(weight_decay))


def _adafactor_group_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """torch.optim.Adafactor's ``eps`` pair ``(eps1 or None, eps2)``, a group key in torch (its
    step reads ``eps1, eps2 = group["eps"]``): gx.Optimizer keeps it in the group, so that its
    state dict loads into torch.optim.Adafactor; a group that changes it gets the alias rebuilt
    with the group's pair."""
    return {"eps": tuple(kwargs["eps"])}


adafactor.torch_group_options = _adafactor_group_options  # type: ignore[attr-defined]


# --- Adafactor in optax's flavour -----------------------------------------------------------------


class OptaxFactoredRmsState(NamedTuple):
    """``count``: per-leaf number of updates (0-d int64; optax keeps one shared count, equal while
    every leaf gets a gradient at every step); ``v_row``, ``v_col``: the factored second moment of
    a leaf that is factored (its largest dim, respectively its second largest, averaged out;
    ``None`` for other leaves); ``v``: the full second moment of a leaf that is not (``None`` for
    factored ones)."""

    count: Any
    v_row: Any
    v_col: Any
    v: Any


def _optax_factored_dims(shape: Sequence[int], factored: bool, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """optax's choice: ``(d1, d0)``, the second largest and the largest dim (ties: the earlier dim
    counts as smaller), when the second largest has at least ``min_dim_size_to_factor`` entries."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return order[-2], order[-1]


@recorded
def optax_scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float | torch.Tensor = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float | torch.Tensor = 1e-30,
) -> GradientTransformation:
    """Adafactor's factored second-moment preconditioner in optax's flavour
    (``optax.scale_by_factored_rms``).

    With ``t = step - step_offset`` the leaf's own step (1-based) and the decay
    ``b_t = 1 - t^(-decay_rate)`` (computed in float32, as optax), ``G = g^2 + epsilon``: a leaf
    whose two largest dims ``d0 >= d1`` (by size) both have at least ``min_dim_size_to_factor``
    entries keeps ``R_t = b_t R + (1 - b_t) mean_{d0}(G)`` and ``C_t = b_t C + (1 - b_t) mean_{d1}(G)``
    and outputs ``u = g (R_t / mean(R_t))^(-1/2) C_t^(-1/2)`` (a rank-1 estimate of ``E[g^2]``);
    any other leaf keeps ``v_t = b_t v + (1 - b_t) G`` and outputs ``u = g v_t^(-1/2)``.

    Differences from `scale_by_factored_rms` (torch's flavour): the factored dims are the two
    largest (by size, so a torch ``(out, in)`` weight and JAX's ``(in, out)`` layout give the same
    numbers), only for dims of at least ``min_dim_size_to_factor``; ``epsilon`` is added to
    ``g^2`` (torch clamps ``v_hat`` at ``eps^2``); the decay is ``1 - t^-0.8`` with an optional
    ``step_offset``; there is no clamp of the row mean. The state keeps the reduced dims dropped
    (optax's shapes up to the order of the dims).

    Args:
        factored: factor the leaves with two large enough dims (``False``: none).
        decay_rate: the exponent of the decay schedule, ``>= 0``.
        step_offset: subtracted from the step (fine-tuning from a later step), an int ``>= 0``.
        min_dim_size_to_factor: the size both factored dims need, an int ``>= 1``.
        epsilon: added to ``g^2``, ``>= 0``.

    Returns:
        A transform with state `OptaxFactoredRmsState`.

    Raises:
        ValueError: an argument out of range (named in the message).

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
        arXiv 1804.04235, sections 3-4 and 7;
        https://optax.readthedocs.io/en/latest/api/transformations.html#optax.scale_by_factored_rms

    Example:
        >>> tx = gx.chain(gx.optax_scale_by_factored_rms(min_dim_size_to_factor=2), gx.scale(-1e-2))
    """
    check_float("decay_rate", decay_rate, low=0.0)
    check_float("epsilon", epsilon, low=0.0)
    for name, v, low in (("step_offset", step_offset, 0), ("min_dim_size_to_factor", min_dim_size_to_factor, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}; got {v!r}")

    def dims(p: torch.Tensor) -> tuple[int, int] | None:
        return _optax_factored_dims(tuple(p.shape), factored, min_dim_size_to_factor)

    def init(params: Params) -> OptaxFactoredRmsState:
        leaves, spec = _tree.tree_flatten(params)

        def make(fn: Callable[[torch.Tensor, Any], Any]) -> Any:
            return _tree.tree_unflatten(spec, [None if p is None else fn(p, dims(p)) for p in leaves])

        row = make(lambda p, d: None if d is None else p.new_zeros(p.shape[:d[1]] + p.shape[d[1] + 1:]))
        col = make(lambda p, d: None if d is None else p.new_zeros(p.shape[:d[0]] + p.shape[d[0] + 1:]))
        var = make(lambda p, d: torch.zeros_like(p) if d is None else None)
        return OptaxFactoredRmsState(_leaf_counts(params), row, col, var)

    def owned_update(updates: Updates, state: OptaxFactoredRmsState, params: Params | None,
                     own: Ownership) -> tuple[Updates, OptaxFactoredRmsState]:
        del params
        expect_state(state, OptaxFactoredRmsState, "optax_scale_by_factored_rms")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        inplace = own.state
        counts = _step_counts(flat, state.count, inplace)
        rows, cols, vars_ = [_live_or_none(flat, t) for t in (state.v_row, state.v_col, state.v)]
        dr = _tree.as_scalar(decay_rate)
        exponent = -(dr.to(torch.float32) if isinstance(dr, torch.Tensor) else torch.tensor(dr, dtype=torch.float32))
        eps = _tree.as_scalar(epsilon)
        eager = _eager_counts(counts) and not isinstance(dr, torch.Tensor)
        out, new_r, new_c, new_v = [], [], [], []
        for g, r, c, v, n in zip(flat.live, rows, cols, vars_, counts):
            # optax: 1 - float32(t)^-decay_rate, in float32; (1 - b_t) rounded in float32 too
            t32 = (torch.tensor(float(int(n) - step_offset), dtype=torch.float32) if eager
                   else (n - step_offset).to(torch.float32))
            b32 = 1.0 - torch.pow(t32, exponent)
            om32 = 1.0 - b32
            work = _tree.at_least_float32(g.dtype)
            if eager:
                b: Any = float(b32)
                om: Any = float(om32)
            else:
                b, om = b32.to(work), om32.to(work)
            gsq = g.to(work) * g.to(work) + eps
            d = dims(g)
            if d is not None:
                if r is None or c is None:
                    raise ValueError(f"a leaf of shape {tuple(g.shape)} needs a factored state (v_row, v_col): the "
                                     "state was made by init() on params of other shapes")
                d1, d0 = d
                row_new = (b * r + om * gsq.mean(dim=d0)).to(g.dtype)
                col_new = (b * c + om * gsq.mean(dim=d1)).to(g.dtype)
                reduced_d1 = d1 - 1 if d1 > d0 else d1
                row_factor = (row_new / row_new.mean(dim=reduced_d1, keepdim=True)) ** -0.5
                col_factor = col_new ** -0.5
                u = g * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
                if inplace:
                    r.copy_(row_new)
                    c.copy_(col_new)
                    row_new, col_new = r, c
                new_r.append(row_new)
                new_c.append(col_new)
                new_v.append(v)
            else:
                if v is None:
                    raise ValueError(f"a leaf of shape {tuple(g.shape)} needs a full second moment (v): the state "
                                     "was made by init() on params of other shapes")
                v_new = (b * v + om * gsq).to(g.dtype)
                u = g * v_new ** -0.5
                if inplace:
                    v_new = v.copy_(v_new)
                new_r.append(r)
                new_c.append(c)
                new_v.append(v_new)
            out.append(u)
        new_state = OptaxFactoredRmsState(
            flat.rebuild(counts, like=state.count), flat.rebuild(new_r, like=state.v_row),
            flat.rebuild(new_c, like=state.v_col), flat.rebuild(new_v, like=state.v))
        return flat.rebuild(out), new_state

    _name_update(owned_update, "optax_scale_by_factored_rms")
    return owned_transform(init, owned_update)


def _optax_adafactor(lr: Any, decay_rate: Any, clipping_threshold: Any, momentum: Any, weight_decay_rate: Any,
                     eps: Any, min_dim_size_to_factor: int, decay_offset: int, multiply_by_parameter_scale: bool,
                     dtype_momentum: torch.dtype | None, factored: bool, weight_decay_mask: Any
                     ) -> GradientTransformation:
    from .clipping import clip_by_block_rms
    from .combinators import ema
    from .optax_optimizers import scale_by_param_block_rms

    txs = [optax_scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        txs.append(clip_by_block_rms(clipping_threshold))
    if lr is not None:
        txs.append(scale_by_learning_rate(lr, flip_sign=False))
    if multiply_by_parameter_scale:
        txs.append(scale_by_param_block_rms())
    if momentum is not None:
        txs.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        txs.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    txs.append(scale(-1.0))
    return chain(*txs)


@recorded
def optax_adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: torch.dtype | None = torch.float32,
    weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
) -> GradientTransformation:
    """Adafactor as ``optax.adafactor`` (optax's names, defaults and blocks).

    ``u = optax_scale_by_factored_rms(g)``; ``u <- u / max(1, rms(u) / clipping_threshold)``
    (`gradxform.clip_by_block_rms`); ``u <- lr u`` (when ``learning_rate`` is given);
    ``u <- u max(rms(p), 1e-3)`` (`gradxform.scale_by_param_block_rms`, when
    ``multiply_by_parameter_scale``); ``u <- EMA_momentum(u)`` (`gradxform.ema`, no debias, when
    ``momentum`` is given); ``u <- u + weight_decay_rate p`` (`gradxform.add_decayed_weights`);
    ``p <- p - u``. With the defaults (no learning rate) the step is relative: ``rms(p)`` times
    the clipped preconditioned gradient.

    Differences from `adafactor` (``torch.optim.Adafactor``'s flavour): optax factors the two
    largest dims and only dims of at least ``min_dim_size_to_factor`` (128), adds ``eps = 1e-30``
    to ``g^2``, has no ``min(lr, 1/sqrt(t))`` cap (the learning rate, if any, multiplies),
    clips the update's RMS at ``clipping_threshold`` before the param scale, has optional momentum
    and decays the weights without the learning rate. Through `gradxform.Optimizer` the learning
    rate is the group's ``lr`` (only when ``learning_rate`` is given: then LR schedulers work).
    ``dtype_momentum`` is the dtype of the momentum buffer as optax (float32 by default); for
    float64 params `gradxform.ema` rounds the momentum's output to it too (optax rounds only the
    stored buffer): give ``dtype_momentum=None`` (the params' dtype) for float64.

    Args:
        learning_rate: ``None`` (relative step only), a number ``>= 0``, a tensor or a schedule.
        min_dim_size_to_factor, decay_rate, decay_offset, eps, factored: see
            `optax_scale_by_factored_rms` (``decay_offset`` is its ``step_offset``, ``eps`` its
            ``epsilon``).
        multiply_by_parameter_scale: scale by ``max(rms(p), 1e-3)``.
        clipping_threshold: ``None`` (no clipping) or ``>= 1``.
        momentum: ``None`` or a decay in ``[0, 1]``.
        dtype_momentum: the momentum buffer's dtype (``None``: the params').
        weight_decay_rate: ``None`` or ``>= 0`` (number or schedule).
        weight_decay_mask: the leaves to decay (see `gradxform.add_decayed_weights`).

    Returns:
        The transform; ``update`` needs ``params``.

    Raises:
        ValueError: an argument out of range (named in the message).

    References:
        Shazeer & Stern, ICML 2018, arXiv 1804.04235;
        https://optax.readthedocs.io/en/latest/api/optimizers.html#optax.adafactor

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.optax_adafactor(learning_rate=1e-2))
    """
    learning_rate = _scalar_lr(learning_rate)
    if learning_rate is not None:
        check_float("learning_rate", learning_rate, low=0.0)
    check_float("decay_rate", decay_rate, low=0.0)
    check_float("eps", eps, low=0.0)
    if clipping_threshold is not None:
        check_float("clipping_threshold", clipping_threshold, low=1.0)
    if momentum is not None:
        check_float("momentum", momentum, low=0.0, high=1.0)
    if weight_decay_rate is not None:
        check_float("weight_decay_rate", weight_decay_rate, low=0.0)
    for name, v, low in (("decay_offset", decay_offset, 0), ("min_dim_size_to_factor", min_dim_size_to_factor, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return inject_hyperparams(_optax_adafactor, static_args=(
        "min_dim_size_to_factor", "decay_offset", "multiply_by_parameter_scale", "dtype_momentum", "factored",
        "weight_decay_mask"))(
        lr=learning_rate, decay_rate=decay_rate, clipping_threshold=clipping_threshold, momentum=momentum,
        weight_decay_rate=weight_decay_rate, eps=eps, min_dim_size_to_factor=min_dim_size_to_factor,
        decay_offset=decay_offset, multiply_by_parameter_scale=multiply_by_parameter_scale,
        dtype_momentum=dtype_momentum, factored=factored, weight_decay_mask=weight_decay_mask)


# --- Muon ---------------------------------------------------------------------------------------

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize_via_newton_schulz(
    x: torch.Tensor,
    ns_coefficients: tuple[float, float, float] = _NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Approximate the orthogonal factor ``U V^T`` of ``x = U S V^T`` by a quintic Newton-Schulz
    iteration, as ``torch.optim.Muon``.

    ``X_0 = x / max(||x||_F, eps)`` (transposed when ``x`` has more rows than columns); then
    ``ns_steps`` times ``A = X X^T``, ``B = b A + c A^2``, ``X <- a X + B X`` with
    ``(a, b, c) = ns_coefficients``. The default coefficients maximise the slope at zero: the
    singular values end near ``[0.5, 1.5]``, not exactly 1.

    Args:
        x: a 2-D tensor.
        ns_coefficients: ``(a, b, c)``.
        ns_steps: iterations, ``< 100``.
        eps: the floor of the norm.
        dtype: the dtype of the iteration (torch: ``bfloat16``); ``None``: ``x``'s dtype.

    Returns:
        The orthogonalised matrix, in ``dtype`` (cast it to ``x.dtype`` as needed).

    Raises:
        ValueError: ``x`` is not 2-D, ``ns_steps >= 100`` or ``ns_coefficients`` is not a triple.

    References:
        Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
        https://kellerjordan.github.io/posts/muon/; Bernstein & Newhouse, arXiv 2409.20325.

    Example:
        >>> o = gx.orthogonalize_via_newton_schulz(torch.randn(4, 3))
    """
    if x.ndim != 2:
        raise ValueError(f"Newton-Schulz orthogonalisation needs a 2-D matrix; got shape {tuple(x.shape)}")
    if ns_steps >= 100:
        raise ValueError(f"ns_steps must be < 100; got {ns_steps}")
    if len(ns_coefficients) != 3:
        raise ValueError(f"ns_coefficients must be a triple (a, b, c); got {ns_coefficients!r}")
    a, b, c = [float(v) for v in ns_coefficients]
    tall = x.size(0) > x.size(1)
    X = x.to(dtype) if dtype is not None else x.clone()
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


class ScaleByMuonState(NamedTuple):
    """``momentum_buffer``: the EMA of the gradients (params-shaped, torch's key)."""

    momentum_buffer: Any


def _muon_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / max(cols, 1)))
    return 0.2 * math.sqrt(max(rows, cols))


_ADJUST = (None, "original", "match_rms_adamw")


@recorded
def scale_by_muon(
    momentum: float | torch.Tensor = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = _NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    ns_dtype: torch.dtype | None = torch.bfloat16,
    apply_ratio: bool = True,
) -> GradientTransformation:
    """Muon's direction for 2-D leaves, as ``torch.optim.Muon``.

    ``B_t = mu B_{t-1} + (1 - mu) g`` (an EMA: torch's ``lerp``); ``M = g + mu (B_t - g)``
    (nesterov, ``g.lerp(B_t, mu)``) or ``M = B_t``; ``u = r * NS(M)`` with
    `orthogonalize_via_newton_schulz` and the shape ratio ``r = sqrt(max(1, rows / cols))``
    (``adjust_lr_fn=None`` or ``"original"``) or ``r = 0.2 sqrt(max(rows, cols))``
    (``"match_rms_adamw"``, Liu et al.), which torch applies to the learning rate of that param.

    Args:
        momentum: ``mu >= 0``.
        nesterov: use the Nesterov mix.
        ns_coefficients, eps, ns_steps: of the Newton-Schulz iteration.
        adjust_lr_fn: ``None``, ``"original"`` or ``"match_rms_adamw"``.
        ns_dtype: the dtype of the iteration (torch: ``bfloat16``; ``None``: the leaf's).
        apply_ratio: multiply by ``r`` (``False``: leave it to a later step, as `muon` does to
            round as torch, which folds it into the learning rate).

    Returns:
        A transform with state `ScaleByMuonState` (torch's key ``momentum_buffer``).

    Raises:
        ValueError: a bad option, or (in ``init``/``update``) a leaf that is not 2-D: route those
            to another optimizer with `gradxform.partition` (see `muon`).

    References:
        Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is
        Scalable for LLM Training", arXiv 2502.16982;
        https://pytorch.org/docs/stable/generated/torch.optim.Muon.html

    Example:
        >>> tx = gx.chain(gx.scale_by_muon(), gx.scale(-0.02))
    """
    check_float("momentum", momentum, low=0.0)
    check_float("eps", eps, low=0.0)
    if adjust_lr_fn not in _ADJUST:
        raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw'; got {adjust_lr_fn!r}")
    if not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be an int in [0, 100); got {ns_steps!r}")
    if callable(ns_coefficients) or not hasattr(ns_coefficients, "__len__") or len(ns_coefficients) != 3:
        raise ValueError(f"ns_coefficients must be a triple (a, b, c); got {ns_coefficients!r}")
    coeffs = tuple(float(c) for c in ns_coefficients)

    def check_2d(tree: Any) -> None:
        paths = None
        for i, x in enumerate(_tree.tree_flatten(tree)[0]):
            if x is not None and x.ndim != 2:
                paths = paths or _tree.tree_paths(tree)
                raise ValueError(
                    f"muon takes 2-D params only; '{paths[i]}' has shape {tuple(x.shape)}. Route the others "
                    "to another optimizer: gx.partition({'muon': gx.muon(...), 'adamw': gx.adamw(...)}, labels)")

    def init(params: Params) -> ScaleByMuonState:
        check_2d(params)
        return ScaleByMuonState(_tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByMuonState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByMuonState]:
        del params
        expect_state(state, ScaleByMuonState, "scale_by_muon")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        check_2d(updates)
        mu = _tree.as_scalar(momentum)
        g = flat.live
        buf = _ema(flat.state_live(state.momentum_buffer, "state.momentum_buffer"), g, mu, own.state)
        if not nesterov:
            mixed = buf
        elif isinstance(mu, torch.Tensor):
            mixed = [x + mu.to(x.dtype) * (b - x) for x, b in zip(g, buf)]
        else:
            mixed = list(_fe.lerp(g, buf, mu))
        out = [orthogonalize_via_newton_schulz(m, coeffs, ns_steps, eps, ns_dtype).to(m.dtype) for m in mixed]
        if apply_ratio:
            out = [o * _muon_ratio(o.shape, adjust_lr_fn) for o in out]
        return flat.rebuild(out), ScaleByMuonState(flat.rebuild(buf, like=state.momentum_buffer))

    return owned_transform(init, owned_update)


def _muon_step(lr: Any, weight_decay: Any, adjust_lr_fn: str | None, use_weight_decay: bool,
               lr_dtype: torch.dtype | None) -> GradientTransformation:
    """torch.optim.Muon's param update from the orthogonalised ``O`` (ratio not applied):
    ``p_new = p (1 - lr wd) - (lr r) O``, returned as ``p_new - p`` (exact where ``p_new`` is within
    a factor 2 of ``p``, so that the params follow torch's rounding)."""
    from .base import stateless

    def update_fn(updates: Updates, params: Params | None) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        ps = flat.params_live(params, "muon")
        lr_, wd = _tree.as_scalar(lr), _tree.as_scalar(weight_decay)
        out = []
        for o, p in zip(flat.live, ps):
            ratio = _muon_ratio(o.shape, adjust_lr_fn)
            if lr_dtype is not None and not isinstance(lr_, torch.Tensor):
                # torch.optim computes with a tensor lr in its dtype (e.g. float32)
                lr_t = torch.tensor(lr_, dtype=lr_dtype)
                new = p * (1 - lr_t * wd) if use_weight_decay else p
                out.append(torch.add(new, o, alpha=-float(lr_t * ratio)) - p)
                continue
            new = p * (1 - lr_ * wd) if use_weight_decay else p
            if isinstance(lr_, torch.Tensor):
                new = new - (lr_ * ratio).to(o.dtype) * o
            else:
                new = torch.add(new, o, alpha=-(lr_ * ratio))
            out.append(new - p)
        return flat.rebuild(out)

    _name_update(update_fn, "muon")
    return stateless(update_fn)


def _muon(lr: Any, weight_decay: Any, momentum: Any, nesterov: bool, ns_coefficients: tuple[float, ...], eps: float,
          ns_steps: int, adjust_lr_fn: str | None, use_weight_decay: bool, lr_dtype: torch.dtype | None
          ) -> GradientTransformation:
    return chain(scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, apply_ratio=False),
                 _muon_step(lr, weight_decay, adjust_lr_fn, use_weight_decay, lr_dtype))


@recorded
def muon(
    lr: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = _NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """Muon as ``torch.optim.Muon``, for 2-D params.

    ``p <- p (1 - lr wd) - lr r NS(M_t)``: `scale_by_muon` (momentum, Newton-Schulz in bfloat16),
    then decoupled decay with the params before the step and the step with the shape-adjusted rate
    ``lr r``, rounded as torch (``chain(scale_by_muon(apply_ratio=False), <step>)`` inside
    ``inject_hyperparams``: ``lr``, ``weight_decay`` and ``momentum`` are live group keys). Equal
    in exact arithmetic to ``chain(scale_by_muon(), add_decayed_weights(wd),
    scale_by_learning_rate(lr))``; the bfloat16 iteration turns any last-bit difference upstream
    into a visible one, hence the torch rounding.

    Muon is for the matrices of hidden layers; send biases, gains and embeddings to AdamW::

        labels = lambda params: {k: "muon" if v.ndim == 2 else "adamw" for k, v in params.items()}
        tx = gx.partition({"muon": gx.muon(0.02), "adamw": gx.adamw(3e-4)}, labels)

    (through `gradxform.Optimizer`, give the two kinds their own param groups with their own
    ``"tx"``). An embedding table is 2-D too: label it ``"adamw"`` explicitly.

    Args:
        lr: learning rate, ``>= 0``.
        weight_decay: decoupled decay, ``>= 0``.
        momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: see `scale_by_muon`.

    Returns:
        The transform; ``update`` needs ``params`` when ``weight_decay != 0``.

    Raises:
        ValueError: an argument out of range, or a param that is not 2-D.

    References:
        Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/; Liu et al.,
        arXiv 2502.16982; https://pytorch.org/docs/stable/generated/torch.optim.Muon.html

    Example:
        >>> opt = gx.Optimizer([model.weight], gx.muon(0.02))
    """
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    check_float("momentum", momentum, low=0.0)
    if adjust_lr_fn not in _ADJUST:
        raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw'; got {adjust_lr_fn!r}")
    return inject_hyperparams(
        _muon, static_args=("nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn", "use_weight_decay",
                            "lr_dtype"))(
        lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        use_weight_decay=_nonzero(weight_decay), lr_dtype=_lr_dtype(lr))


# --- L-BFGS -------------------------------------------------------------------------------------


class LbfgsState(NamedTuple):
    """torch.optim.LBFGS's state, over the flat vector of the params (``n`` entries), with its
    history in fixed-size ring buffers: ``func_evals``, ``n_iter`` (0-d int64 totals); ``d``
    (``n``), the last direction; ``t``, its step (0-d float64); ``old_dirs``, ``old_stps``
    (``(history_size, n)``: the gradient and step differences ``y``, ``s``), ``ro``
    (``(history_size,)``, ``1 / y.s``) and ``al`` (the two-loop's coefficients), each pair in
    slot ``(history_start + i) % history_size`` for the ``i``-th oldest of ``history_len``;
    ``H_diag`` (``y.s / y.y`` of the newest pair); ``prev_flat_grad`` (``n``); ``prev_loss``;
    ``history_start`` and ``history_len`` (0-d int64): the ring's oldest slot and how many pairs
    it holds.

    Through `gradxform.Optimizer` it lives as torch keeps it, in ``opt.state[params[0]]`` under
    torch's keys (``func_evals``, ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``,
    ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``; the history as lists of tensors,
    oldest first, views of the ring buffers): `to_torch_state` and `from_torch_state` convert."""

    func_evals: torch.Tensor
    n_iter: torch.Tensor
    d: torch.Tensor
    t: torch.Tensor
    old_dirs: torch.Tensor
    old_stps: torch.Tensor
    ro: torch.Tensor
    H_diag: torch.Tensor
    prev_flat_grad: torch.Tensor
    prev_loss: torch.Tensor
    al: torch.Tensor
    history_start: torch.Tensor
    history_len: torch.Tensor

    def _slots(self) -> list[int]:
        size, start, k = self.old_dirs.shape[0], int(self.history_start), int(self.history_len)
        return [(start + i) % size for i in range(k)]

    def to_torch_state(self) -> dict[str, Any]:
        """torch.optim.LBFGS's entries of ``opt.state[params[0]]`` (Python numbers where torch
        keeps them; the history as lists of views of the ring buffers, oldest first; ``al`` as
        torch's list of ``history_size`` entries, ``None`` past the history). torch creates ``d``
        ... ``prev_loss`` after its first iteration and ``al`` at its second: so are they here."""
        n_iter = int(self.n_iter)
        out: dict[str, Any] = {"func_evals": int(self.func_evals), "n_iter": n_iter}
        if n_iter == 0:
            return out
        slots = self._slots()
        out.update(d=self.d, t=float(self.t), old_dirs=[self.old_dirs[s] for s in slots],
                   old_stps=[self.old_stps[s] for s in slots], ro=[self.ro[s] for s in slots],
                   H_diag=self.H_diag if slots else 1, prev_flat_grad=self.prev_flat_grad,
                   prev_loss=float(self.prev_loss))
        if n_iter >= 2:
            out["al"] = [self.al[s] for s in slots] + [None] * (self.old_dirs.shape[0] - len(slots))
        return out

    @classmethod
    def from_torch_state(cls, entries: Mapping[str, Any], like: "LbfgsState") -> "LbfgsState":
        """The state from torch.optim.LBFGS's entries (``like``: a state from ``init``, for the
        history size and for what the entries lack). Lists that are the views `to_torch_state`
        made of one ring buffer are taken back without a copy.

        Raises:
            ValueError: a history longer than ``like``'s ``history_size``, or of uneven lengths.
        """
        count = lambda key: torch.tensor(int(entries.get(key, 0)), dtype=torch.int64)  # noqa: E731
        if "d" not in entries:  # before torch's first iteration: only the counts
            return like._replace(func_evals=count("func_evals"), n_iter=count("n_iter"),
                                 history_start=torch.zeros((), dtype=torch.int64),
                                 history_len=torch.zeros((), dtype=torch.int64))
        size = like.old_dirs.shape[0]
        d = entries["d"]
        lists = [list(entries.get(k, ())) for k in ("old_dirs", "old_stps", "ro")]
        k = len(lists[0])
        if any(len(x) != k for x in lists) or k > size:
            raise ValueError(f"the loaded L-BFGS history has {[len(x) for x in lists]} entries (old_dirs, old_stps, "
                             f"ro); this lbfgs keeps history_size={size}: build it with the history_size of the "
                             "optimizer that saved it")
        start, rings = 0, None
        base = lists[0][0]._base if k else None
        if base is not None and base.ndim == 2 and base.shape == (size, d.numel()):
            # views of one ring buffer (what to_torch_state made): take the buffers back
            found = [_ring_of(x, size) for x in lists] + [_ring_of(list(entries.get("al", ()))[:k], size)]
            if all(f is not None and f[1] == found[0][1] for f in found):  # type: ignore[index]
                rings, start = [f[0] for f in found], found[0][1]  # type: ignore[index]
        if rings is None:
            rings = []
            al = [a for a in list(entries.get("al", ()))[:k]]
            for x, shape in zip(lists + [al], ((size, d.numel()), (size, d.numel()), (size,), (size,))):
                ring = d.new_zeros(shape)
                for i, v in enumerate(x):
                    if v is not None:
                        ring[i] = v
                rings.append(ring)
        h = entries.get("H_diag", 1)
        as64 = lambda v: torch.as_tensor(v, dtype=torch.float64).detach().clone().reshape(())  # noqa: E731
        return cls(count("func_evals"), count("n_iter"), d, as64(entries.get("t", 0.0)), rings[0], rings[1], rings[2],
                   torch.as_tensor(h, dtype=d.dtype).detach().clone().reshape(()), entries["prev_flat_grad"],
                   as64(entries.get("prev_loss", 0.0)), rings[3], torch.tensor(start, dtype=torch.int64),
                   torch.tensor(k, dtype=torch.int64))


# gx.Optimizer keeps it where torch.optim.LBFGS does: opt.state[params[0]], in torch's format
LbfgsState.torch_first_param_keys = frozenset(  # type: ignore[attr-defined]
    {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al"})


def _ring_of(views: list[Any], size: int) -> tuple[torch.Tensor, int] | None:
    """``(ring, start)`` when ``views`` are the rows ``(start + i) % size`` of one ring buffer."""
    if not views or any(v is None for v in views):
        return None
    base = views[0]._base
    if base is None or base.shape[0] != size or any(v._base is not base for v in views):
        return None
    stride = base.stride(0)
    slots = [(v.storage_offset() - base.storage_offset()) // max(stride, 1) for v in views]
    start = slots[0]
    if any(s != (start + i) % size for i, s in enumerate(slots)):
        return None
    return base, start


def _cubic_min(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
               bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic through ``(x1, f1, g1)`` and ``(x2, f2, g2)``, clamped to
    ``bounds`` (default: the interval between the points); the midpoint when the cubic has no
    real minimiser (Nocedal & Wright, eq. 3.59)."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1 * d1 - g1 * g2
    if disc < 0:
        return (lo + hi) / 2.0
    d2 = math.sqrt(disc)
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(x, lo), hi)


def _strong_wolfe_search(evaluate: Callable[[float], tuple[float, torch.Tensor]], d: torch.Tensor, t: float,
                         f0: float, g0: torch.Tensor, gtd0: float, tolerance_change: float, max_ls: int,
                         c1: float = 1e-4, c2: float = 0.9) -> tuple[float, torch.Tensor, float, int]:
    """A line search along ``d`` for a step ``t`` with sufficient decrease
    ``f(t) <= f0 + c1 t gtd0`` and curvature ``|f'(t)| <= c2 |gtd0|`` (strong Wolfe), by
    bracketing then cubic-interpolation zoom (Nocedal & Wright, Algorithms 3.5 and 3.6), with
    torch.optim.LBFGS's safeguards and evaluation budget. Returns ``(f, g, t, evaluations)``."""
    d_max = float(d.abs().max())
    f_new, g_new = evaluate(t)
    evals = 1
    gtd_new = float(g_new.dot(d))
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f0, g0, gtd0
    done = False
    it = 0
    bracket: list[float] = []
    b_f: list[float] = []
    b_g: list[torch.Tensor] = []
    b_gtd: list[float] = []
    while it < max_ls:
        if f_new > f0 + c1 * t * gtd0 or (it > 1 and f_new >= f_prev):
            bracket, b_f, b_g, b_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd0:
            bracket, b_f, b_g, done = [t], [f_new], [g_new], True
            break
        if gtd_new >= 0:
            bracket, b_f, b_g, b_gtd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # extrapolate within [t + 0.01 (t - t_prev), 10 t]
        nxt = _cubic_min(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f_new, g_new, gtd_new
        t = nxt
        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = float(g_new.dot(d))
        it += 1
    if it == max_ls:
        bracket, b_f, b_g = [0.0, t], [f0, f_new], [g0, g_new]
    stalled = False
    low, high = (0, 1) if b_f[0] <= b_f[-1] else (1, 0)
    while not done and it < max_ls:
        if abs(bracket[1] - bracket[0]) * d_max < tolerance_change:
            break
        t = _cubic_min(bracket[0], b_f[0], b_gtd[0], bracket[1], b_f[1], b_gtd[1])
        # keep the trial away from the ends of the bracket
        lo_b, hi_b = min(bracket), max(bracket)
        margin = 0.1 * (hi_b - lo_b)
        if min(hi_b - t, t - lo_b) < margin:
            if stalled or t >= hi_b or t <= lo_b:
                t = hi_b - margin if abs(t - hi_b) < abs(t - lo_b) else lo_b + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False
        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = float(g_new.dot(d))
        it += 1
        if f_new > f0 + c1 * t * gtd0 or f_new >= b_f[low]:
            bracket[high], b_f[high], b_g[high], b_gtd[high] = t, f_new, g_new, gtd_new
            low, high = (0, 1) if b_f[0] <= b_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd0:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], b_f[high], b_g[high], b_gtd[high] = bracket[low], b_f[low], b_g[low], b_gtd[low]
            bracket[low], b_f[low], b_g[low], b_gtd[low] = t, f_new, g_new, gtd_new
    return b_f[low], b_g[low], bracket[low], evals


def _to_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _promoted(xs: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype ``torch.cat`` gives the flattened leaves."""
    dtype = xs[0].dtype if xs else torch.get_default_dtype()
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _flat_cat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs]) if xs else torch.zeros(0, dtype=torch.get_default_dtype())


def _lbfgs_core(lr: Any, max_iter: int, max_eval: int, tolerance_grad: float, tolerance_change: float,
                history_size: int, line_search_fn: str | None) -> GradientTransformation:
    def init(params: Params) -> LbfgsState:
        live = [p for p in _tree.tree_flatten(params)[0] if p is not None]
        dtype = _promoted(live)
        n = sum(p.numel() for p in live)
        z = lambda *shape: torch.zeros(shape, dtype=dtype)  # noqa: E731
        i64 = lambda: torch.zeros((), dtype=torch.int64)  # noqa: E731
        f64 = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        return LbfgsState(i64(), i64(), z(n), f64(), z(history_size, n), z(history_size, n), z(history_size),
                          torch.ones((), dtype=dtype), z(n), f64(), z(history_size), i64(), i64())

    def owned_update(updates: Updates, state: LbfgsState, params: Params | None, own: Ownership, *,
                     value: Any = None, value_and_grad_fn: Callable[[Params], tuple[Any, Any]] | None = None
                     ) -> tuple[Updates, LbfgsState]:
        expect_state(state, LbfgsState, "lbfgs")
        if _tree.traced():
            raise RuntimeError("lbfgs cannot run under torch.compile or torch.func: its iterations and line "
                               "search branch on loss values (as torch.optim.LBFGS); call it eagerly")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        if params is None:
            raise ValueError("lbfgs needs params: call update(updates, state, params)")
        p_leaves = _tree.check_structure(flat.spec, params, "params", reference=flat.tree)
        pidx = [i for i, p in enumerate(p_leaves) if p is not None]
        ps = [p_leaves[i] for i in pidx]
        dtype = _promoted(ps)
        needs_fn = max_iter > 1 or line_search_fn is not None
        if value_and_grad_fn is None and needs_fn:
            raise TypeError("lbfgs with max_iter > 1 or a line search re-evaluates the loss: pass "
                            "update(grads, state, params, value=loss, value_and_grad_fn=f) with "
                            "f(params) -> (loss, grads); through gx.Optimizer: opt.step(closure, "
                            "value_and_grad_fn=gx.value_and_grad_from_closure(params, closure))")
        sizes = [p.numel() for p in ps]
        # (a fresh state is rebuilt by the first iteration: init may have seen fewer params, as
        # gx.Optimizer initialises only the params that have a gradient)
        if int(state.n_iter) > 0 and state.d.numel() != sum(sizes):
            raise ValueError(f"the lbfgs state holds {state.d.numel()} entries but the params have "
                             f"{sum(sizes)}: the state was made for other params")
        if int(state.n_iter) > 0 and state.old_dirs.shape != (history_size, sum(sizes)):
            raise ValueError(f"the lbfgs state's history has shape {tuple(state.old_dirs.shape)}; this lbfgs keeps "
                             f"({history_size}, {sum(sizes)}): the state was made with another history_size")

        def grads_flat(g_leaves: Sequence[Any]) -> torch.Tensor:
            # a leaf without a gradient counts as a zero gradient (as torch.optim.LBFGS)
            return _flat_cat([p.new_zeros(p.shape, dtype=dtype) if g_leaves[i] is None else g_leaves[i].to(dtype)
                              for i, p in zip(pidx, ps)])

        def as_tree(vec: torch.Tensor, only_live: bool) -> Any:
            pieces = [c.view(p.shape).to(p.dtype) for c, p in zip(vec.split(sizes), ps)]
            out: list[Any] = [None] * len(flat.leaves)
            for i, piece in zip(pidx, pieces):
                if not only_live or flat.leaves[i] is not None:
                    out[i] = piece
            return _tree.tree_unflatten(flat.spec, out)

        def evaluate_at(vec: torch.Tensor) -> tuple[float, torch.Tensor]:
            assert value_and_grad_fn is not None
            v, gtree = value_and_grad_fn(as_tree(vec, only_live=False))
            return _to_float(v), grads_flat(_tree.check_structure(flat.spec, gtree, "value_and_grad_fn's grads",
                                                             reference=flat.tree))

        x0 = _flat_cat([p.to(dtype) for p in ps]).clone()
        x = x0.clone()
        flat_grad = grads_flat(flat.leaves)
        func_evals = int(state.func_evals)
        total_iter = int(state.n_iter)
        if value is None:
            # without a loss nor a way to evaluate it (max_iter=1, no line search) the loss is never
            # read; 0 is stored as prev_loss
            loss = evaluate_at(x)[0] if value_and_grad_fn is not None else 0.0
        else:
            loss = _to_float(value)
        current_evals = 1
        func_evals += 1
        lr_ = float(_tree.as_scalar(lr))
        if x.numel() == 0 or float(flat_grad.abs().max()) <= tolerance_grad:  # already optimal
            return as_tree(torch.zeros_like(x), only_live=True), state._replace(func_evals=torch.tensor(func_evals))
        d, t = state.d.to(flat_grad.dtype), float(state.t)
        # the history: ring buffers of history_size slots; the i-th oldest of k pairs in slot
        # (start + i) % history_size. Written in place when the state is owned, else copied first.
        rings = [state.old_dirs, state.old_stps, state.ro, state.al]
        start, k = int(state.history_start), int(state.history_len)
        copied = own.state
        h_diag: Any = state.H_diag.to(dtype)
        prev_flat_grad = state.prev_flat_grad.to(flat_grad.dtype)
        prev_loss = float(state.prev_loss)
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            total_iter += 1
            if total_iter == 1:
                d = flat_grad.neg()
                start, k, h_diag = 0, 0, torch.ones((), dtype=flat_grad.dtype)
                shapes = ((history_size, x.numel()), (history_size, x.numel()), (history_size,), (history_size,))
                if any(r.shape != sh or r.dtype != dtype for r, sh in zip(rings, shapes)):
                    rings, copied = [x.new_zeros(sh) for sh in shapes], True
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:  # keep the pair only with positive curvature
                    if not copied:
                        rings, copied = [r.clone() for r in rings], True
                    if k == history_size:  # drop the oldest
                        slot, start = start, (start + 1) % history_size
                    else:
                        slot, k = (start + k) % history_size, k + 1
                    rings[0][slot] = y
                    rings[1][slot] = s
                    rings[2][slot] = 1.0 / ys
                    h_diag = ys / y.dot(y)
                dirs, stps, ro, al = rings
                slots = [(start + i) % history_size for i in range(k)]
                if slots and not copied:
                    rings, copied = [r.clone() for r in rings], True
                    dirs, stps, ro, al = rings
                # two-loop recursion: d = -H g (torch's order and rounding)
                q = flat_grad.neg()
                coef: list[Any] = [None] * k
                for i in range(k - 1, -1, -1):
                    coef[i] = stps[slots[i]].dot(q) * ro[slots[i]]
                    q.add_(dirs[slots[i]], alpha=-coef[i])
                d = r = torch.mul(q, h_diag)
                for i in range(k):
                    be_i = dirs[slots[i]].dot(r) * ro[slots[i]]
                    r.add_(stps[slots[i]], alpha=coef[i] - be_i)
                for i in range(k):
                    al[slots[i]] = coef[i]
            prev_flat_grad = flat_grad.clone()
            prev_loss = loss
            if total_iter == 1:
                inv = 1.0 / flat_grad.abs().sum()
                t = float((inv if inv < 1.0 else 1.0) * lr_)
            else:
                t = lr_
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:  # not a descent direction
                break
            evals = 0
            if line_search_fn is not None:
                base = x.clone()
                loss, flat_grad, t, evals = _strong_wolfe_search(
                    lambda step: evaluate_at(torch.add(base, d, alpha=step)), d, t, loss, flat_grad, float(gtd),
                    tolerance_change, max_eval - current_evals)
                x.add_(d, alpha=t)
                optimal = float(flat_grad.abs().max()) <= tolerance_grad
            else:
                x.add_(d, alpha=t)
                optimal = False
                if n_iter != max_iter:
                    loss, flat_grad = evaluate_at(x)
                    optimal = float(flat_grad.abs().max()) <= tolerance_grad
                    evals = 1
            current_evals += evals
            func_evals += evals
            if n_iter == max_iter or current_evals >= max_eval or optimal:
                break
            if float(d.mul(t).abs().max()) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break
        i64 = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        new_state = LbfgsState(
            i64(func_evals), i64(total_iter), d, torch.tensor(float(t), dtype=torch.float64), rings[0], rings[1],
            rings[2], torch.as_tensor(h_diag, dtype=x.dtype).clone(), prev_flat_grad,
            torch.tensor(float(prev_loss), dtype=torch.float64), rings[3], i64(start), i64(k))
        return as_tree(x - x0, only_live=True), new_state

    _name_update(owned_update, "lbfgs")
    return owned_transform(init, owned_update)


@recorded
def lbfgs(
    lr: float | torch.Tensor = 1.0,
    max_iter: int = 20,
    max_eval: int | None = None,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 100,
    line_search_fn: str | None = None,
) -> GradientTransformation:
    """L-BFGS as ``torch.optim.LBFGS``: up to ``max_iter`` quasi-Newton iterations per update.

    Each iteration: the direction ``d = -H g`` from the two-loop recursion over the last
    ``history_size`` pairs ``(s, y)`` (kept when ``y.s > 1e-10``) with ``H_0 = (y.s / y.y) I``;
    the step ``t = lr`` (the very first: ``min(1, 1 / ||g||_1) lr``), or a strong-Wolfe line
    search from it; ``x <- x + t d``; stop on ``max_iter``, ``max_eval`` evaluations,
    ``max|g| <= tolerance_grad``, ``max|t d| <= tolerance_change``, a loss change below
    ``tolerance_change`` or a non-descent direction, all as torch. The update returned is
    ``x_final - params``.

    ``update(grads, state, params, *, value=None, value_and_grad_fn=None)``: ``value`` is the loss
    at ``params`` (the gradients being ``grads``); ``value_and_grad_fn(params) -> (loss, grads)``
    re-evaluates at trial params (same structure as ``params``) and is required when
    ``max_iter > 1`` or with the line search; without ``value`` it is called once at ``params``
    for the loss. Through `gradxform.Optimizer`::

        opt = gx.Optimizer(model.parameters(), gx.lbfgs(history_size=10, line_search_fn="strong_wolfe"))
        opt.step(closure, value_and_grad_fn=gx.value_and_grad_from_closure(list(model.parameters()), closure))

    (the adapter's own closure call gives the gradients; the helper evaluates the closure once
    more at the start for the loss, then at every trial point, restoring the params after each).

    State: `LbfgsState`, one flat history over the params in ring buffers of ``history_size``
    slots (allocated by ``init``: ``2 * history_size * n`` entries, what torch's lists reach once
    full), so its shapes never change and `gradxform.state_from_dict` restores it. Through
    `gradxform.Optimizer` it is kept as torch keeps it: in ``opt.state[params[0]]`` under torch's
    keys and types (``func_evals``, ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``,
    ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``; the history as lists, oldest first),
    and the group holds torch's ``max_iter``, ``max_eval``, ``tolerance_grad``,
    ``tolerance_change``, ``history_size`` and ``line_search_fn``: a ``torch.optim.LBFGS`` state
    dict loads into the twin and continues equal, and the reverse.

    A param without a gradient: torch.optim.LBFGS reads it as zeros in the flat gradient and
    still moves it along the flat direction (which is not zero there once the history holds its
    curvature); through ``gx.Optimizer`` the twin does the same (the adapter hands it zeros). In
    ``update`` a ``None`` gradient leaf counts as zeros but gets a ``None`` update (every
    transform's contract: it is not moved); pass zeros to move it as torch. The iterations branch on loss values
    (host reads): no ``torch.compile``, no ``torch.func``. Differences from optax's ``lbfgs``: optax does one
    iteration per update with a zoom line search by default, its ``value_fn`` returns the loss
    only and the gradient comes as ``grad=``.

    Args:
        lr: the step (or the line search's first trial), ``>= 0``.
        max_iter: iterations per update, ``>= 1``.
        max_eval: evaluations per update (default ``max_iter * 5 // 4``).
        tolerance_grad, tolerance_change: the stopping tolerances.
        history_size: pairs kept, ``>= 1``.
        line_search_fn: ``None`` or ``"strong_wolfe"``.

    Returns:
        The transform (state `LbfgsState`).

    Raises:
        ValueError: a bad argument; TypeError (in ``update``): ``value_and_grad_fn`` missing where
            it is needed.

    References:
        Liu & Nocedal, "On the limited memory BFGS method for large scale optimization",
        Math. Programming 45, 1989; Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006,
        Algorithms 3.5, 3.6, 7.4; https://pytorch.org/docs/stable/generated/torch.optim.LBFGS.html

    Example:
        >>> def f(p):  # (loss, grads) at p
        ...     grads, loss = torch.func.grad_and_value(loss_fn)(p, x)
        ...     return loss, grads
        >>> tx = gx.lbfgs(line_search_fn="strong_wolfe")
        >>> state = tx.init(params)
        >>> loss, grads = f(params)
        >>> updates, state = tx.update(grads, state, params, value=loss, value_and_grad_fn=f)
    """
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    if not isinstance(lr, torch.Tensor) and callable(lr):
        raise TypeError("lbfgs takes a number or a 0-d tensor as lr, not a schedule (use an LR scheduler "
                        "through gx.Optimizer, or rebuild it)")
    for name, v in (("max_iter", max_iter), ("history_size", history_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    if not isinstance(max_eval, int) or isinstance(max_eval, bool) or max_eval < 1:
        raise ValueError(f"max_eval must be an int >= 1 or None; got {max_eval!r}")
    check_float("tolerance_grad", tolerance_grad, low=0.0)
    check_float("tolerance_change", tolerance_change, low=0.0)
    if line_search_fn not in (None, "strong_wolfe"):
        raise ValueError(f"line_search_fn must be None or 'strong_wolfe'; got {line_search_fn!r}")
    return inject_hyperparams(_lbfgs_core, static_args=(
        "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn"))(
        lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=float(tolerance_grad),
        tolerance_change=float(tolerance_change), history_size=history_size, line_search_fn=line_search_fn)


def _lbfgs_group_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """torch.optim.LBFGS's group keys besides ``lr`` (``max_eval`` resolved as torch does): gx.Optimizer
    keeps them in the group, so that its state dict loads into torch.optim.LBFGS; a group that
    changes one gets the alias rebuilt with the group's values."""
    max_eval = kwargs.get("max_eval")
    return {"max_iter": kwargs["max_iter"],
            "max_eval": kwargs["max_iter"] * 5 // 4 if max_eval is None else max_eval,
            "tolerance_grad": kwargs["tolerance_grad"], "tolerance_change": kwargs["tolerance_change"],
            "history_size": kwargs["history_size"], "line_search_fn": kwargs["line_search_fn"]}


lbfgs.torch_group_options = _lbfgs_group_options  # type: ignore[attr-defined]
# gx.Optimizer gives a param without a gradient zeros, as torch.optim.LBFGS's flat gradient: it moves
lbfgs.zeros_for_missing_gradients = True  # type: ignore[attr-defined]


def value_and_grad_from_closure(params: Sequence[torch.Tensor], closure: Callable[[], Any]
                                ) -> Callable[[Sequence[torch.Tensor]], tuple[float, list[torch.Tensor]]]:
    """A ``value_and_grad_fn`` for `lbfgs` from a torch closure (``zero_grad``, forward,
    ``backward``, return the loss) over ``params``.

    ``f(trial)`` copies ``trial`` into ``params``, runs ``closure()`` with grad enabled, reads
    the ``.grad`` of ``params`` (zeros where ``None``), restores ``params`` and returns
    ``(loss, grads)``.

    Args:
        params: the tensors the closure's model reads (in the order of the optimizer's group).
        closure: the closure.

    Returns:
        ``f(trial) -> (float loss, list of gradients)``.

    Raises:
        ValueError: ``trial`` has another length than ``params``.

    References:
        https://pytorch.org/docs/stable/optim.html#optimizer-step-closure

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.lbfgs(history_size=10))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(x).square().mean()
        ...     loss.backward()
        ...     return loss
        >>> f = gx.value_and_grad_from_closure(list(model.parameters()), closure)
        >>> loss = opt.step(closure, value_and_grad_fn=f)
    """
    params = list(params)

    def value_and_grad(trial: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        trial = list(trial)
        if len(trial) != len(params):
            raise ValueError(f"value_and_grad_from_closure: got {len(trial)} tensors for {len(params)} params")
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, x in zip(params, trial):
                if x is not None:
                    p.copy_(x)
        try:
            with torch.enable_grad():
                loss = closure()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        return _to_float(loss), grads

    return value_and_grad


# --- SparseAdam ---------------------------------------------------------------------------------


class SparseAdamState(NamedTuple):
    """``count``: per-leaf steps (torch's ``step``); ``mu``, ``nu``: dense first and second
    moments (torch's ``exp_avg``, ``exp_avg_sq``), updated only where the gradient has entries."""

    count: Any
    mu: Any
    nu: Any


SparseAdamState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "mu": "exp_avg", "nu": "exp_avg_sq"})
# torch.optim.SparseAdam keeps ``step`` as a Python int (its bias correction ``beta ** step`` then
# stays in float64); gx.Optimizer stores it so, and a gx state dict continues equal in torch
SparseAdamState.torch_python_ints = frozenset({"count"})  # type: ignore[attr-defined]


def _sparse_adam(lr: Any, betas: Any, eps: Any, maximize: bool, lr_dtype: torch.dtype | None) -> GradientTransformation:
    def init(params: Params) -> SparseAdamState:
        zeros = _tree.tree_zeros_like
        return SparseAdamState(_leaf_counts(params), zeros(params), zeros(params))

    def owned_update(updates: Updates, state: SparseAdamState, params: Params | None,
                     own: Ownership) -> tuple[Updates, SparseAdamState]:
        del params
        expect_state(state, SparseAdamState, "sparse_adam")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        inplace = own.state
        b1, b2 = [_tree.as_scalar(b) for b in betas]
        lr_, e = _tree.as_scalar(lr), _tree.as_scalar(eps)
        counts = _step_counts(flat, state.count, inplace)
        mus = flat.state_live(state.mu, "state.mu", check_shapes=False)
        nus = flat.state_live(state.nu, "state.nu", check_shapes=False)
        eager = _eager_counts(counts)
        out, new_mu, new_nu = [], [], []
        for g, m, v, c in zip(flat.live, mus, nus, counts):
            if maximize:
                g = -g
            t: Any = float(int(c)) if eager else c.to(torch.float64)
            if eager and not any(isinstance(x, torch.Tensor) for x in (b1, b2, lr_)):
                lr_t = lr_ if lr_dtype is None else torch.tensor(lr_, dtype=lr_dtype)  # torch's tensor-lr rounding
                step_size: Any = lr_t * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            else:
                step_size = lr_ * torch.sqrt(1 - torch.as_tensor(b2, dtype=torch.float64) ** t) / (
                    1 - torch.as_tensor(b1, dtype=torch.float64) ** t)
            if g.is_sparse:
                if _tree.traced():
                    raise RuntimeError("sparse_adam: sparse gradients run eagerly only (no torch.compile/torch.func)")
                g = g.coalesce()
                idx, vals = g._indices(), g._values()
                if not inplace:
                    m, v = m.clone(), v.clone()
                if vals.numel() == 0:
                    out.append(torch.sparse_coo_tensor(idx, vals, g.shape, check_invariants=False))
                    new_mu.append(m)
                    new_nu.append(v)
                    continue
                old_m = m.sparse_mask(g)._values()
                dm = vals.sub(old_m).mul_(1 - b1)
                m.add_(torch.sparse_coo_tensor(idx, dm, g.shape, check_invariants=False))
                old_v = v.sparse_mask(g)._values()
                dv = vals.pow(2).sub_(old_v).mul_(1 - b2)
                v.add_(torch.sparse_coo_tensor(idx, dv, g.shape, check_invariants=False))
                numer = dm.add_(old_m)
                denom = dv.add_(old_v).sqrt_().add_(e)
                out.append(torch.sparse_coo_tensor(idx, numer.div_(denom) * (-step_size), g.shape, check_invariants=False))
            else:
                # a dense gradient is a sparse one with every entry present
                dm = (g - m) * (1 - b1)
                dv = (g * g - v) * (1 - b2)
                m = m.add_(dm) if inplace else m + dm
                v = v.add_(dv) if inplace else v + dv
                step = m / (v.sqrt() + e)
                out.append(step * (-step_size if not isinstance(step_size, torch.Tensor) else
                                   -step_size.to(step.dtype)))
            new_mu.append(m)
            new_nu.append(v)
        new_state = SparseAdamState(flat.rebuild(counts, like=state.count), flat.rebuild(new_mu, like=state.mu),
                                    flat.rebuild(new_nu, like=state.nu))
        return flat.rebuild(out), new_state

    _name_update(owned_update, "sparse_adam")
    return owned_transform(init, owned_update)


@recorded
def sparse_adam(
    lr: float | torch.Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    maximize: bool = False,
) -> GradientTransformation:
    """SparseAdam as ``torch.optim.SparseAdam``: Adam's moments updated only at the entries a
    sparse (COO) gradient has ("lazy" Adam, for embedding tables).

    At each entry ``i`` of the coalesced gradient: ``m_i += (1 - b1)(g_i - m_i)``,
    ``v_i += (1 - b2)(g_i^2 - v_i)``, ``u_i = -lr sqrt(1 - b2^t) / (1 - b1^t) * m_i / (sqrt(v_i) + eps)``;
    the other entries and their moments do not change; ``t`` counts the leaf's updates (also
    those with an empty gradient). The update is a sparse COO tensor (``gx.apply_updates`` adds
    it). Unlike torch, a dense gradient is accepted and taken as a sparse one with every entry
    present (then this is Adam with eps outside the bias correction of ``v``).

    Where it runs: the functional API (``tx.update`` with COO gradients, eagerly) and
    `gradxform.Optimizer` (``gx.Optimizer(emb.parameters(), gx.sparse_adam())`` with
    ``nn.Embedding(sparse=True)``): the adapter passes the COO gradients through its generic path
    without densifying them and adds the COO updates to the params; ``opt.state[p]`` holds torch's
    keys ``step``, ``exp_avg``, ``exp_avg_sq`` and a ``torch.optim.SparseAdam`` state dict loads
    into it (and the reverse). Only as the group's whole transform: inside a chain the other
    members would receive COO tensors (the adapter raises). Sparse gradients run eagerly only.

    Args:
        lr: learning rate, ``>= 0``.
        betas: ``(b1, b2)`` in ``[0, 1)``.
        eps: ``> 0``.
        maximize: ascend instead.

    Returns:
        The transform (state `SparseAdamState`, torch's keys ``step``, ``exp_avg``, ``exp_avg_sq``).

    Raises:
        ValueError: an argument out of torch's range.

    References:
        Kingma & Ba, ICLR 2015, arXiv 1412.6980;
        https://pytorch.org/docs/stable/generated/torch.optim.SparseAdam.html

    Example:
        >>> emb = torch.nn.Embedding(5, 2, sparse=True)
        >>> emb(torch.tensor([1, 3])).sum().backward()  # a COO gradient at rows 1 and 3
        >>> tx = gx.sparse_adam(1e-2)
        >>> state = tx.init([emb.weight.detach()])
        >>> updates, state = tx.update([emb.weight.grad], state, [emb.weight.detach()])
        >>> updates[0].to_dense()[:, 0]
        tensor([ 0.0000, -0.0100,  0.0000, -0.0100,  0.0000])
    """
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    check_float("eps", eps, low=0.0, low_open=True)
    if callable(betas) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    check_float("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_float("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return inject_hyperparams(_sparse_adam, static_args=("maximize", "lr_dtype"))(
        lr=lr, betas=tuple(betas), eps=eps, maximize=maximize, lr_dtype=_lr_dtype(lr))


sparse_adam.takes_sparse_gradients = True  # type: ignore[attr-defined]  # gx.Optimizer passes COO grads through

_tree.register_state_types(FactoredRmsState, OptaxFactoredRmsState, ScaleByMuonState, LbfgsState, SparseAdamState)
