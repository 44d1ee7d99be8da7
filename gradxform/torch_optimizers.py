"""torch.optim's other optimizers as gradxform aliases, and their building blocks.

Each alias has ``torch.optim``'s name (lower case), arguments, defaults and semantics, and is a
`chain` of public blocks inside `gradxform.inject_hyperparams`, so its numeric hyperparameters
are live group keys in `gradxform.Optimizer` (LR schedulers work) and ``torch.compile`` takes a
changed value without recompiling. Blocks carry optax's names where optax has the rule; where
optax and torch differ in a detail the alias follows torch and the block's docstring says how.

Per-param state uses torch.optim's key names in ``opt.state[p]`` (each state class declares
them in ``torch_state_keys``), so a torch.optim state dict loads into the gradxform twin and
continues equal, and the reverse.

Scalar per-param state that torch keeps in its scalar dtype (NAdam's ``mu_product``, ASGD's
``eta`` and ``mu``: float32 unless the default dtype is float64) is computed in that dtype,
as torch's uninterrupted run does; torch's ``load_state_dict`` casts such state to the param's
dtype, and gradxform still rounds it to the scalar dtype, so a resumed run (from a torch or a
gradxform checkpoint) continues bit for bit as the uninterrupted one.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from . import _foreach as _fe
from . import _owned
from . import tree as _tree
from .alias import _check_betas, _nonzero, _scalar_lr
from .base import (GradientTransformation, Ownership, Params, Updates, chain, declare, expect_state, owned_transform,
                   recorded)
from .combine import inject_hyperparams
from .fastpath import AdagradKernel, declare_kernel
from .transforms import (
    _CHUNK,
    ScalarOrSchedule,
    ScaleByAdamState,
    ScaleByRmsState,
    TraceState,
    _addcmul,
    _ema,
    _ema_sq,
    _Flat,
    _leaf_counts,
    _mul,
    _step_counts,
    add_decayed_weights,
    check_float,
    scale,
    scale_by_rms,
)

__all__ = [
    "ScaleByRssState",
    "ScaleByAdadeltaState",
    "ScaleByAdamaxState",
    "ScaleByNadamState",
    "ScaleByRpropState",
    "ScaleByAsgdState",
    "scale_by_rss",
    "scale_by_adadelta",
    "scale_by_adamax",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rprop",
    "scale_by_asgd",
    "averaged_params",
    "adagrad",
    "adadelta",
    "adamax",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "asgd",
]

# foreach kernels that gradxform._foreach does not list (same fallback inside torch.func)
_abs = _fe._op("abs", torch.abs)
_sign = _fe._op("sign", torch.sign)
_sqrt_ = _fe._op("sqrt_", _fe._safe_sqrt)
_addcdiv_ = _fe._op("addcdiv_", lambda x, a, b, value=1: torch.addcdiv(x, a, b, value=value))
_reciprocal_ = _fe._op("reciprocal_", torch.reciprocal)


def _host_steps(counts: list[torch.Tensor]) -> list[int] | None:
    """The leaves' step counts as ints when they may be read (eager, CPU), else ``None``."""
    if _tree.traced() or any(c.device.type != "cpu" for c in counts):
        return None
    return [int(c) for c in counts]


def _f64(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [c.to(torch.float64) for c in counts]


_REALIZE_WIDTH = 16  # above inductor's unroll_reductions_threshold (8): a reduction it keeps as one


def _realized(xs: list[Any]) -> list[Any]:
    """Per-leaf 0-d factors (functions of the step counts) computed once under torch.compile:
    inductor would otherwise inline them into every element loop (a ``pow`` per vector of
    elements); a reduction is always materialised, so the amax over a duplicated column makes
    them one tiny kernel. Values unchanged; elsewhere ``xs`` itself."""
    if not xs or not _tree.is_compiling() or not all(isinstance(x, torch.Tensor) for x in xs):
        return xs
    v = _kept(torch.stack([x.reshape(()).to(torch.float64) for x in xs]))
    return [v[i] for i in range(len(xs))]


def _kept(v: torch.Tensor) -> torch.Tensor:
    """``v`` (1-d) through an amax over ``_REALIZE_WIDTH`` copies of each element: a reduction,
    which inductor always materialises, so ``v`` is computed once in a tiny kernel."""
    return v.unsqueeze(1).expand(v.shape[0], _REALIZE_WIDTH).amax(dim=1)


def _realized_apart(rows: list[list[Any]]) -> list[list[Any]]:
    """Per-leaf rows of 0-d scalars, each row realised in a buffer of its own under
    torch.compile: inductor fuses element loops of the same size that read a common buffer (the
    hyperparameters) into one loop over several leaves, whose many memory streams run slower
    than one loop per leaf; loops that read only their own row stay apart. The row is built by
    selects (no ``cat``, whose lowering adds a view per element) and kept by `_kept`, as in
    `_realized`. Values unchanged (float64); elsewhere ``rows`` itself."""
    if not rows or not _tree.is_compiling():
        return rows
    n = len(rows[0])
    i = torch.arange(n)
    out = []
    for row in rows:
        v = torch.as_tensor(row[-1], dtype=torch.float64).expand(n)
        for j in range(n - 2, -1, -1):
            v = torch.where(i == j, torch.as_tensor(row[j], dtype=torch.float64), v)
        v = _kept(v)
        out.append([v[j] for j in range(n)])
    return out


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for scalar state (``_get_scalar_dtype``): float64 if the default dtype
    is float64, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _each(op: str, xs: list[torch.Tensor], fs: list[Any], inplace: bool) -> list[torch.Tensor]:
    """``x_i op f_i`` for per-leaf factors: Python numbers (one foreach kernel) or 0-d tensors
    (the traced paths: per leaf, each result in its leaf's dtype)."""
    if fs and isinstance(fs[0], torch.Tensor):
        fn = getattr(torch, op)
        if inplace and not _tree.pure_ops():
            for x, f in zip(xs, fs):
                getattr(x, op + "_")(f.to(x.dtype))
            return xs
        return [fn(x, f.to(x.dtype)) for x, f in zip(xs, fs)]
    if inplace:
        getattr(_fe, op + "_")(xs, fs)
        return xs
    return list(getattr(_fe, op)(xs, fs))


def _owned_out(flat: _Flat, own: Ownership) -> bool:
    return own.may_write(flat.live)


def _neg_lr(lr: Any) -> Any:
    """``-lr`` for a learning rate folded into a block's last pass (``None``: not folded)."""
    return None if lr is None else -_tree.as_scalar(lr)


def _host_scalars(*values: Any) -> bool:
    """Whether the eager fused passes apply: not traced, and every value a Python number."""
    return not _tree.traced() and not any(isinstance(v, torch.Tensor) for v in values)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _scaled_div(a: list[torch.Tensor], b: list[torch.Tensor], ks: list[float],
                out: list[torch.Tensor]) -> list[torch.Tensor]:
    """``k_i a_i / b_i`` written into ``out`` (private buffers, which may be ``a`` or ``b``) in one
    pass per leaf (eager only: ``addcdiv`` of a 0-d zero)."""
    for x, y, k, o in zip(a, b, ks, out):
        if k == 1.0:
            torch.div(x, y, out=o)
        else:
            torch.addcdiv(_zero(o), x, y, value=k, out=o)
    return out


def _apply_params(flat: _Flat, params: Params | None, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The live leaves of ``params`` when the update can be added into them here (`call_apply`):
    each shaped, typed and placed as its update ``xs``; else ``None`` (the caller adds it)."""
    if params is None:
        return None
    leaves = _tree.tree_flatten(params)[0]
    if len(leaves) != len(flat.leaves):
        return None
    ps = [leaves[i] for i in flat.idx]
    if any(p is None or p.shape != x.shape or p.dtype != x.dtype or p.device != x.device for p, x in zip(ps, xs)):
        return None
    return ps


def _add_scaled_div(ps: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
                    ks: list[float]) -> list[None]:
    """``p <- p + k_i a_i / b_i`` in one pass (torch.optim's final ``addcdiv_``): bitwise
    ``p + u`` with ``u`` from `_scaled_div` (``addcdiv`` rounds ``(k a) / b`` then adds it). The
    updates returned for these leaves: ``None`` (added)."""
    torch._foreach_addcdiv_(ps, a, b, ks)
    return [None] * len(ps)




def _sum_div(ps: list[torch.Tensor] | None, a: list[torch.Tensor], b: list[torch.Tensor], rs: list[float],
             d: list[torch.Tensor], ks: list[float]) -> list[Any]:
    """``u = k_i (a_i + r_i b_i) / d_i`` (NAdam's two terms) without a params-sized numerator:
    it is made one slice at a time in a cache-sized scratch (`_owned.by_slices`; the same
    elementwise kernels on the same elements, so the same numbers as ``_scaled_div(a + r b, d,
    ks, d)``). With params ``ps``: ``p <- p + u`` (`call_apply`, the rounding of ``p + u``),
    ``None`` returned; else ``u`` is written into ``d`` (private to the caller) and returned."""
    zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def body(i: int, x: torch.Tensor, y: torch.Tensor, dd: torch.Tensor, *rest: torch.Tensor) -> None:
        num = torch.add(x, y, alpha=rs[i], out=rest[-1])
        if ps is not None:
            rest[0].addcdiv_(num, dd, value=ks[i])
        elif ks[i] == 1.0:
            torch.div(num, dd, out=dd)
        else:
            zero = zeros.setdefault((dd.dtype, dd.device), _zero(dd))
            torch.addcdiv(zero, num, dd, value=ks[i], out=dd)

    cols = [[x, y, dd] + ([] if ps is None else [ps[i]]) for i, (x, y, dd) in enumerate(zip(a, b, d))]
    _owned.by_slices(cols, body, scratch=1)
    return [None] * len(a) if ps is not None else d


def _streamed(cols: list[list[torch.Tensor]]) -> list[int]:
    """The leaves worth a whole step streamed chunk by chunk (`_in_chunks`): on the CPU (where a
    kernel call costs microseconds and the chunk stays in the core's cache; an accelerator's
    foreach kernels take every leaf in a few launches), more than one chunk of elements, every
    tensor of the leaf (``cols[k][i]``) contiguous. Smaller leaves stay on the foreach kernels
    (one call for all of them)."""
    return [i for i, ts in enumerate(zip(*cols))
            if ts[0].device.type == "cpu" and ts[0].numel() > _CHUNK and all(t.is_contiguous() for t in ts)]


def _in_chunks(cols: list[list[torch.Tensor]], idx: list[int], body: Any, scratches: int = 1) -> None:
    """``body(i, *views, *scratch)`` for each leaf ``i`` in ``idx`` and each ``_CHUNK`` of its
    elements (`gradxform._owned.by_slices` over those leaves): ``views`` the same flat slice of
    every ``cols[k][i]``, ``scratch`` ``scratches`` cache-sized slices of their dtype. A step
    written as such a body reads and writes each params-sized buffer once, while a chunk's
    intermediates stay in cache (the foreach form passes over memory once per kernel); the same
    elementwise kernels on the same elements, so the same numbers. Eager only (`_host_scalars`),
    on leaves from `_streamed`."""
    _owned.by_slices([[c[i] for c in cols] for i in idx], lambda j, *views: body(idx[j], *views), scratches)


def _stream(ps: list[torch.Tensor] | None, cols: list[list[torch.Tensor]], make_body: Any,
            scratches: int = 1) -> list[int]:
    """Stream the whole step of the large leaves (`_streamed`) through ``make_body()``
    (`_in_chunks` over ``[ps] + cols``) when the step adds into the params ``ps`` (`_apply_params`;
    ``None``: nothing streamed). Returns the streamed leaves' indices (the caller runs the others
    on the foreach kernels)."""
    if ps is None:
        return []
    big = _streamed([ps] + cols)
    if big:
        _in_chunks([ps] + cols, big, make_body(), scratches)
    return big


def _except(xs: list[Any], idx: list[int]) -> list[Any]:
    """``xs`` without the positions in ``idx`` (none under a trace, where nothing streams: dynamo
    before torch 2.13 cannot trace ``in`` of a set)."""
    if not idx:
        return list(xs)
    skip = set(idx)
    return [x for i, x in enumerate(xs) if i not in skip]


def _merged(n: int, idx: list[int], at_idx: list[Any], rest: list[Any]) -> list[Any]:
    """A list of ``n``: ``at_idx`` at the positions ``idx`` (in order), ``rest`` elsewhere."""
    if not idx:
        return list(rest)
    out: list[Any] = [None] * n
    for i, x in zip(idx, at_idx):
        out[i] = x
    it = iter(rest)
    skip = set(idx)
    for i in range(n):
        if i not in skip:
            out[i] = next(it)
    return out


def _with_apply(init: Any, step: Any) -> GradientTransformation:
    """``owned_transform`` from ``step(updates, state, params, own, apply)``, declaring
    ``owned_apply`` (`gradxform.base.call_apply`): ``step`` with ``apply=True`` may add its last
    term into the params and return ``None`` there."""
    def owned_update(updates: Updates, state: Any, params: Params | None, own: Ownership) -> tuple[Updates, Any]:
        return step(updates, state, params, own, False)

    def owned_apply(updates: Updates, state: Any, params: Params, own: Ownership) -> tuple[Updates, Any]:
        return step(updates, state, params, own, True)

    return declare(owned_transform(init, owned_update), owned_apply=owned_apply)


def _scaled(xs: list[torch.Tensor], k: Any, inplace: bool) -> list[torch.Tensor]:
    """``k x`` (the traced paths' unfolded learning-rate step); ``k`` ``None``: ``xs`` unchanged."""
    if k is None:
        return xs
    return _mul(xs, k, inplace)


def _sparse_rss(flat: _Flat, state: Any, own: Ownership, counts: list[torch.Tensor], e: Any, decay: Any,
                neg_lr: Any, params: Params | None) -> tuple[Updates, Any]:
    """Adagrad's step with sparse (COO) updates among the leaves, as torch.optim.Adagrad's
    per-tensor path (which torch takes for the whole group when one gradient is sparse).

    A sparse leaf, coalesced: ``s += g^2`` at its entries, ``u = k g / (sqrt(s) + eps)`` at its
    entries only (a COO update; ``k = -clr``); with ``params`` (the adapter adds the step,
    `gradxform.base.call_apply`) it is added as torch adds it, ``p.add_(g / (sqrt(s) + eps),
    alpha=k)`` (a multiply-add per row: the rounding differs from ``p + u`` by an ulp) and
    ``None`` is returned there. A dense leaf: ``u = (k g) / (sqrt(s) + eps)``, the rounding of
    torch's ``addcdiv_``. Eager only."""
    if _tree.traced():
        raise RuntimeError("scale_by_rss (gx.adagrad): sparse gradients run eagerly only (no torch.compile or "
                           "torch.func); use dense gradients there (nn.Embedding(sparse=False))")
    ts = [int(c) for c in counts]
    ps = None if params is None else [_tree.tree_flatten(params)[0][i] for i in flat.idx]
    s_old = flat.state_live(state.sum_of_squares, "state.sum_of_squares")
    out: list[torch.Tensor | None] = []
    sums = []
    for j, (g, s, t) in enumerate(zip(flat.live, s_old, ts)):
        f = 1.0 + (t - 1) * decay
        s = s if own.state else s.clone()
        if g.layout is not torch.strided:
            g = g.coalesce()
            idx, vals = g._indices(), g._values()
            s.add_(torch.sparse_coo_tensor(idx, vals.pow(2), g.shape, check_invariants=False))
            std = s.sparse_mask(g)._values().sqrt_().add_(e)
            if neg_lr is None:
                out.append(torch.sparse_coo_tensor(idx, vals.div(std.mul_(f)), g.shape, check_invariants=False))
            elif ps is not None and ps[j].dtype == g.dtype:
                ps[j].add_(torch.sparse_coo_tensor(idx, vals.div(std), g.shape, check_invariants=False),
                           alpha=neg_lr / f)
                out.append(None)
            else:
                out.append(torch.sparse_coo_tensor(idx, vals.div(std).mul_(neg_lr / f), g.shape,
                                                   check_invariants=False))
        else:
            s.addcmul_(g, g)
            std = s.sqrt().add_(e)
            out.append(torch.mul(g, neg_lr / f).div_(std) if neg_lr is not None else g.div(std.mul_(f)))
        sums.append(s)
    return _owned.finish(flat, out, state, count=counts, sum_of_squares=sums)


# --- Adagrad ------------------------------------------------------------------------------------


class ScaleByRssState(NamedTuple):
    """``count``: each leaf's step count (torch's ``step``); ``sum_of_squares``: the running sum
    of squared updates (torch's ``sum``)."""

    count: Any
    sum_of_squares: Any


ScaleByRssState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "sum_of_squares": "sum"})


@recorded
def scale_by_rss(initial_accumulator_value: float = 0.0, eps: float | torch.Tensor = 1e-10,
                 lr_decay: float | torch.Tensor = 0.0, *, eps_in_sqrt: bool = False) -> GradientTransformation:
    """Adagrad's preconditioning: divide by the root of the sum of squared updates.

    ``s_t = s_{t-1} + g^2`` (``s_0 = initial_accumulator_value``);
    ``u = g / (sqrt(s_t) + eps) / (1 + (t - 1) lr_decay)`` with ``t`` the leaf's own step
    (torch.optim.Adagrad: eps outside the root, lr decay per param). ``eps_in_sqrt=True`` gives
    optax's ``u = g / sqrt(s_t + eps)`` (zero where ``s_t = 0``). optax's defaults are
    ``initial_accumulator_value=0.1, eps=1e-7`` with eps inside the root; these are torch's.

    Args:
        initial_accumulator_value: the initial sum, >= 0.
        eps: added to the denominator, >= 0.
        lr_decay: torch's learning-rate decay: the step is divided by ``1 + (t - 1) lr_decay``.
        eps_in_sqrt: optax's eps placement.

    Returns:
        The transform; its state is `ScaleByRssState`.

    Raises:
        ValueError: a negative argument.

    References:
        Duchi, Hazan & Singer, "Adaptive subgradient methods for online learning and stochastic
        optimization", JMLR 12 (2011); https://pytorch.org/docs/stable/generated/torch.optim.Adagrad.html;
        https://optax.readthedocs.io/en/latest/api/transformations.html#optax.scale_by_rss

    Example:
        >>> tx = gx.chain(gx.scale_by_rss(0.1), gx.scale_by_learning_rate(1e-2))
    """
    check_float("initial_accumulator_value", initial_accumulator_value, low=0.0)
    check_float("eps", eps, low=0.0)
    check_float("lr_decay", lr_decay, low=0.0)
    return _rss_tx(initial_accumulator_value, eps, lr_decay, eps_in_sqrt, None)


def _rss_tx(initial_accumulator_value: float, eps: Any, lr_decay: Any, eps_in_sqrt: bool,
            lr: Any) -> GradientTransformation:
    """`scale_by_rss`; with ``lr``, followed by ``u <- -lr u`` folded into its last pass (Adagrad:
    ``u = -clr g / (sqrt(s) + eps)``, ``clr = lr / (1 + (t - 1) lr_decay)`` as torch)."""

    def init(params: Params) -> ScaleByRssState:
        return ScaleByRssState(_leaf_counts(params),
                               _tree.tree_map(lambda p: torch.full_like(p, initial_accumulator_value), params))

    def step(updates: Updates, state: ScaleByRssState, params: Params | None, own: Ownership,
             apply: bool) -> tuple[Updates, ScaleByRssState]:
        flat = _owned.live(updates, state, ScaleByRssState, "scale_by_rss")
        if flat is None:
            return updates, state
        e, decay, neg_lr = _tree.as_scalar(eps), _tree.as_scalar(lr_decay), _neg_lr(lr)
        if any(x.layout is not torch.strided for x in flat.live):
            if eps_in_sqrt:
                k = next(i for i, x in enumerate(flat.live) if x.layout is not torch.strided)
                raise ValueError(
                    f"scale_by_rss(eps_in_sqrt=True) (optax's form) takes dense updates only; the update at "
                    f"'{flat.paths()[flat.idx[k]]}' is sparse ({flat.live[k].layout}): use torch's form "
                    "(eps_in_sqrt=False, as gx.adagrad), which takes sparse ones, or dense gradients")
            return _sparse_rss(flat, state, own, _step_counts(flat, state.count, own.state), e, decay, neg_lr,
                               params if apply else None)
        counts = _step_counts(flat, state.count, own.state)
        g = flat.live
        s = flat.state_live(state.sum_of_squares, "state.sum_of_squares")
        if own.state:
            _fe.addcmul_(s, g, g)
        else:
            s = list(_addcmul(s, g, g))
        if eps_in_sqrt:
            denom = list(_fe.add(s, e))
            _sqrt_(denom)
            # optax: zero where the sum is zero (no update yet seen)
            denom = [torch.where(x > 0, d, torch.full_like(d, math.inf)) for x, d in zip(s, denom)]
        else:
            denom = _fe.sqrt(s)
            _fe.add_(denom, e)
        no_decay = isinstance(decay, (int, float)) and decay == 0
        ts = None if no_decay else _host_steps(counts)
        if _host_scalars(decay, neg_lr) and (no_decay or ts is not None):
            # one pass: u = k g / denom, k = -lr / (1 + (t - 1) lr_decay) (torch's -clr)
            lr_k = 1.0 if neg_lr is None else -neg_lr
            ks = [lr_k if no_decay else lr_k / (1.0 + (t - 1) * decay) for t in ts or [1] * len(g)]
            if neg_lr is not None:
                ks = [-k for k in ks]
            out = _scaled_div(g, denom, ks, g if _owned_out(flat, own) else denom)
        else:
            factors: list[Any] | None = None
            if not no_decay:
                ts = _host_steps(counts)
                if ts is not None:
                    factors = [1.0 + (t - 1) * decay for t in ts]
                else:
                    factors = [1.0 + (t - 1.0) * decay for t in _f64(counts)]
            if neg_lr is not None:
                # torch's form (-clr g) / denom, clr = lr / (1 + (t - 1) lr_decay) a per-leaf 0-d
                # factor: one product and one quotient per element (a compiled step otherwise
                # multiplies the denominator by the decay factor, then the quotient by -lr)
                ks = [neg_lr] * len(g) if factors is None else _realized([neg_lr / f for f in factors])
                out = list(_fe.div(_each("mul", g, ks, False), denom))
            else:
                if factors is not None:
                    denom = _each("mul", denom, _realized(factors), True)
                out = list(_fe.div(g, denom))
        return _owned.finish(flat, out, state, count=counts, sum_of_squares=s)

    return _with_apply(init, step)


# --- Adadelta -----------------------------------------------------------------------------------


class ScaleByAdadeltaState(NamedTuple):
    """``count``: each leaf's step count (torch's ``step``); ``e_g``: running mean of squared
    updates (torch's ``square_avg``); ``e_x``: running mean of squared steps (``acc_delta``)."""

    count: Any
    e_g: Any
    e_x: Any


ScaleByAdadeltaState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "e_g": "square_avg", "e_x": "acc_delta"})


@recorded
def scale_by_adadelta(rho: float | torch.Tensor = 0.9, eps: float | torch.Tensor = 1e-6) -> GradientTransformation:
    """Adadelta's preconditioning (Zeiler, 2012).

    ``E[g^2]_t = rho E[g^2] + (1 - rho) g^2``; ``u = sqrt(E[dx^2] + eps) / sqrt(E[g^2]_t + eps) * g``;
    ``E[dx^2]_t = rho E[dx^2] + (1 - rho) u^2``. torch.optim.Adadelta and optax's
    ``scale_by_adadelta`` agree on this rule and on eps inside both roots; torch's ``lr``
    (default 1.0) multiplies ``u`` afterwards and does not enter ``E[dx^2]``.

    Args:
        rho: the averaging constant, in [0, 1].
        eps: added inside both roots, >= 0.

    Returns:
        The transform; its state is `ScaleByAdadeltaState`.

    Raises:
        ValueError: rho outside [0, 1] or a negative eps.

    References:
        Zeiler, "ADADELTA: an adaptive learning rate method", arXiv 1212.5701, Algorithm 1;
        https://pytorch.org/docs/stable/generated/torch.optim.Adadelta.html

    Example:
        >>> tx = gx.chain(gx.scale_by_adadelta(0.9), gx.scale_by_learning_rate(1.0))
    """
    check_float("rho", rho, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0)
    return _adadelta_tx(rho, eps, None)


def _adadelta_tx(rho: Any, eps: Any, lr: Any) -> GradientTransformation:
    """`scale_by_adadelta`; with ``lr``, followed by ``u <- -lr u`` folded into its last pass."""

    def init(params: Params) -> ScaleByAdadeltaState:
        zeros = _tree.tree_zeros_like
        return ScaleByAdadeltaState(_leaf_counts(params), zeros(params), zeros(params))

    def owned_update(updates: Updates, state: ScaleByAdadeltaState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByAdadeltaState]:
        del params
        flat = _owned.live(updates, state, ScaleByAdadeltaState, "scale_by_adadelta")
        if flat is None:
            return updates, state
        r, e, neg_lr = _tree.as_scalar(rho), _tree.as_scalar(eps), _neg_lr(lr)
        counts = _step_counts(flat, state.count, own.state)
        g = flat.live
        e_g = _ema_sq(flat.state_live(state.e_g, "state.e_g"), g, r, own.state)
        e_x = flat.state_live(state.e_x, "state.e_x")
        if _host_scalars(r, e, neg_lr):
            # sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) as one root of the quotient: a pass less
            q = list(_fe.add(e_g, e))
            delta = list(_fe.add(e_x, e))
            _fe.div_(delta, q)
            del q
            _sqrt_(delta)
            # fold -lr into the product when E[dx^2] can take the scaled step back exactly enough:
            # (1 - rho) / lr^2 stays finite in float32 (the kernel multiplies it by u first)
            fold = (neg_lr is not None and -neg_lr >= 1e-8
                    and all(x.dtype in (torch.float32, torch.float64) for x in g))
            k = neg_lr if fold else 1.0
            for dl, x in zip(delta, g):
                torch.addcmul(_zero(dl), dl, x, value=k, out=dl)
            e_x = _mul(e_x, r, own.state)
            _fe.addcmul_(e_x, delta, delta, (1.0 - r) / (k * k))
            out = delta if fold else _scaled(delta, neg_lr, True)
        else:
            std = list(_fe.add(e_g, e))
            _sqrt_(std)
            delta = list(_fe.add(e_x, e))
            _sqrt_(delta)
            _fe.div_(delta, std)
            _fe.mul_(delta, g)
            e_x = _ema_sq(e_x, delta, r, own.state)
            out = _scaled(list(delta), neg_lr, True)
        return _owned.finish(flat, out, state, count=counts, e_g=e_g, e_x=e_x)

    return owned_transform(init, owned_update)


# --- Adamax -------------------------------------------------------------------------------------


class ScaleByAdamaxState(NamedTuple):
    """``count``: each leaf's step count (torch's ``step``); ``mu``: first moment
    (``exp_avg``); ``nu``: exponentially weighted infinity norm (``exp_inf``)."""

    count: Any
    mu: Any
    nu: Any


ScaleByAdamaxState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "mu": "exp_avg", "nu": "exp_inf"})


@recorded
def scale_by_adamax(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                    eps: float | torch.Tensor = 1e-8) -> GradientTransformation:
    """Adamax's preconditioning (Kingma & Ba, 2015, section 7.1).

    ``m_t = b1 m + (1 - b1) g``; ``u_t = max(b2 u, |g| + eps)``; ``u = m_t / ((1 - b1^t) u_t)``
    with ``t`` the leaf's own step. torch.optim.Adamax and optax's ``scale_by_adamax`` agree
    (eps added to ``|g|`` inside the max).

    Args:
        b1: first-moment decay (torch's ``betas[0]``), in [0, 1).
        b2: infinity-norm decay (``betas[1]``), in [0, 1).
        eps: added to ``|g|``, >= 0.

    Returns:
        The transform; its state is `ScaleByAdamaxState`.

    Raises:
        ValueError: a beta outside [0, 1) or a negative eps.

    References:
        Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015, arXiv 1412.6980,
        Algorithm 2; https://pytorch.org/docs/stable/generated/torch.optim.Adamax.html

    Example:
        >>> tx = gx.chain(gx.scale_by_adamax(), gx.scale_by_learning_rate(2e-3))
    """
    check_float("b1 (betas[0])", b1, low=0.0, high=1.0, high_open=True)
    check_float("b2 (betas[1])", b2, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)
    return _adamax_tx(b1, b2, eps, None)


def _adamax_tx(b1: Any, b2: Any, eps: Any, lr: Any) -> GradientTransformation:
    """`scale_by_adamax`; with ``lr``, followed by ``u <- -lr u`` folded into its last pass (as
    torch: ``u = -(lr / (1 - b1^t)) m / u_t``). Added into the params (``owned_apply``), a leaf
    of more than one chunk takes the whole step chunk by chunk (`_in_chunks`)."""

    def init(params: Params) -> ScaleByAdamaxState:
        zeros = _tree.tree_zeros_like
        return ScaleByAdamaxState(_leaf_counts(params), zeros(params), zeros(params))

    def chunk(beta1: float, beta2: float, e: float, ks: list[float]) -> Any:
        """The whole step on one chunk (`_in_chunks`): torch.optim.Adamax's foreach kernels, in its
        order, on a cache-sized slice, ending in its ``addcdiv_`` into the params."""
        def body(i: int, p: torch.Tensor, x: torch.Tensor, m: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> None:
            m.lerp_(x, 1.0 - beta1)
            u.mul_(beta2)
            torch.abs(x, out=s)
            s.add_(e)
            torch.maximum(u, s, out=u)
            p.addcdiv_(m, u, value=ks[i])

        return body

    def step(updates: Updates, state: ScaleByAdamaxState, params: Params | None,
             own: Ownership, apply: bool) -> tuple[Updates, ScaleByAdamaxState]:
        flat = _owned.live(updates, state, ScaleByAdamaxState, "scale_by_adamax")
        if flat is None:
            return updates, state
        beta1, beta2, e = _tree.as_scalar(b1), _tree.as_scalar(b2), _tree.as_scalar(eps)
        neg_lr = _neg_lr(lr)
        counts = _step_counts(flat, state.count, own.state)
        g_all = flat.live
        n = len(g_all)
        mu_all = flat.state_live(state.mu, "state.mu")
        nu_all = flat.state_live(state.nu, "state.nu")
        ts_all = _host_steps(counts)
        host = ts_all is not None and _host_scalars(beta1, beta2, e, neg_lr)
        ks_all: list[float] = []
        if host:  # u = k m / u_t with k = -(lr / (1 - b1^t)) (torch's -clr)
            lr_v = 1.0 if neg_lr is None else -neg_lr
            ks_all = [lr_v / (1.0 - beta1**t) for t in ts_all]
            ks_all = ks_all if neg_lr is None else [-k for k in ks_all]
        ps_all = _apply_params(flat, params, g_all) if apply and host else None
        big = _stream(ps_all, [g_all, mu_all, nu_all], lambda: chunk(beta1, beta2, e, ks_all))
        g = _except(g_all, big)
        mu, nu, out = [], [], []
        if g:  # the other leaves: foreach kernels
            mu = _ema(_except(mu_all, big), g, beta1, own.state)
            nu = _mul(_except(nu_all, big), beta2, own.state)
            if _owned_out(flat, own):  # |g| + eps into the incoming buffer, which mu has consumed
                torch._foreach_abs_(g)
                a = g
            else:
                a = list(_abs(g))
            _fe.add_(a, e)
            if own.state:
                _fe.maximum_(nu, a)
            else:
                nu = list(_fe.maximum(nu, a))
            ts = None if ts_all is None else _except(ts_all, big)
            if host:
                # one pass: u = k m / u_t
                ks = _except(ks_all, big)
                ps = None if ps_all is None else _except(ps_all, big)
                # p <- p + k m / u_t: torch's one addcdiv_ into the params, else u into a's buffers
                out = _add_scaled_div(ps, mu, nu, ks) if ps is not None else _scaled_div(mu, nu, ks, a)
            else:
                if ts is not None:
                    bc: list[Any] = [1.0 - beta1**t for t in ts]
                else:
                    bc = _realized([1.0 - beta1**t for t in _f64(counts)])
                # u = m / nu / bc; a (|g| + eps) is private to this call and no longer needed: the
                # quotient goes into its buffers (no allocation) when not traced
                if _tree.traced():
                    out = list(_fe.div(mu, nu))
                else:
                    for m, v, x in zip(mu, nu, a):
                        torch.div(m, v, out=x)
                    out = a
                out = _scaled(_each("div", out, bc, True), neg_lr, True)

        def whole(xs_all: list[Any], rest: list[Any]) -> list[Any]:
            return _merged(n, big, [xs_all[i] for i in big], rest)

        return _owned.finish(flat, _merged(n, big, [None] * len(big), out), state, count=counts,
                             mu=whole(mu_all, mu), nu=whole(nu_all, nu))

    return _with_apply(init, step)


# --- NAdam --------------------------------------------------------------------------------------


class ScaleByNadamState(NamedTuple):
    """``count``: each leaf's step count (torch's ``step``); ``mu``, ``nu``: first and second
    moments (``exp_avg``, ``exp_avg_sq``); ``mu_product``: each leaf's running product of the
    momentum schedule ``prod_i mu_i`` (0-d, torch's scalar dtype)."""

    count: Any
    mu: Any
    nu: Any
    mu_product: Any


ScaleByNadamState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "mu": "exp_avg", "nu": "exp_avg_sq", "mu_product": "mu_product"})


def _ones_scalar(p: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=_scalar_dtype())


@recorded
def scale_by_nadam(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                   eps: float | torch.Tensor = 1e-8,
                   momentum_decay: float | torch.Tensor = 4e-3) -> GradientTransformation:
    """NAdam's preconditioning as torch.optim.NAdam (Dozat, 2016, with the momentum schedule).

    ``mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))``; ``P_t = P_{t-1} mu_t`` (``P_0 = 1``);
    ``m_t = b1 m + (1 - b1) g``; ``v_t = b2 v + (1 - b2) g^2``;
    ``u = [(1 - mu_t) / (1 - P_t) g + mu_{t+1} / (1 - P_t mu_{t+1}) m_t] / (sqrt(v_t / (1 - b2^t)) + eps)``,
    ``t`` the leaf's own step. optax's ``scale_by_adam(nesterov=True)`` is NAdam without the
    schedule (``mu_t = b1``, first moment debiased by ``1 - b1^t``): a different rule, not an
    eps detail; use it for optax's variant.

    Args:
        b1: first-moment decay (torch's ``betas[0]``), in [0, 1).
        b2: second-moment decay (``betas[1]``), in [0, 1).
        eps: added to the debiased root, >= 0.
        momentum_decay: torch's ``momentum_decay`` (psi in Dozat's schedule), >= 0.

    Returns:
        The transform; its state is `ScaleByNadamState`.

    Raises:
        ValueError: a beta outside [0, 1) or a negative eps or momentum_decay.

    References:
        Dozat, "Incorporating Nesterov momentum into Adam", ICLR 2016 workshop;
        https://pytorch.org/docs/stable/generated/torch.optim.NAdam.html

    Example:
        >>> tx = gx.chain(gx.scale_by_nadam(), gx.scale_by_learning_rate(2e-3))
    """
    check_float("b1 (betas[0])", b1, low=0.0, high=1.0, high_open=True)
    check_float("b2 (betas[1])", b2, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)
    check_float("momentum_decay", momentum_decay, low=0.0)
    return _nadam_tx(b1, b2, eps, momentum_decay, None, None)


def _nadam_tx(b1: Any, b2: Any, eps: Any, momentum_decay: Any, lr: Any, decoupled_wd: Any) -> GradientTransformation:
    """`scale_by_nadam`; with ``lr``, followed by ``u <- -lr (u + decoupled_wd p)`` folded into
    its last passes (``decoupled_wd``: NAdamW's decay, or ``None``). Added into the params
    (``owned_apply``), a leaf of more than one chunk takes the whole step chunk by chunk
    (`_in_chunks`): the same kernels on the same elements, so the numbers of the update path."""

    def init(params: Params) -> ScaleByNadamState:
        zeros = _tree.tree_zeros_like
        return ScaleByNadamState(_leaf_counts(params), zeros(params), zeros(params),
                                 _tree.tree_map(_ones_scalar, params))

    def chunk(beta1: float, beta2: float, eps_s: list[float], rs: list[float], ks: list[float],
              k_wd: float | None) -> Any:
        """The whole step on one chunk (`_in_chunks`): the foreach path's kernels in its order on a
        cache-sized slice, the denominator and the numerator ``g + r m`` in the two scratches;
        ``p <- p + k (g + r m) / denom`` (with NAdamW's decay, ``u + k wd p`` formed and added)."""
        def body(i: int, p: torch.Tensor, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, d: torch.Tensor,
                 num: torch.Tensor) -> None:
            m.lerp_(x, 1.0 - beta1)
            v.mul_(beta2)
            v.addcmul_(x, x, value=1.0 - beta2)
            torch.sqrt(v, out=d)
            d.add_(eps_s[i])
            torch.add(x, m, alpha=rs[i], out=num)
            if k_wd is None:
                p.addcdiv_(num, d, value=ks[i])
                return
            if ks[i] == 1.0:
                torch.div(num, d, out=d)
            else:
                torch.addcdiv(_zero(d), num, d, value=ks[i], out=d)
            d.add_(p, alpha=k_wd)
            p.add_(d)

        return body

    def step(updates: Updates, state: ScaleByNadamState, params: Params | None,
             own: Ownership, apply: bool) -> tuple[Updates, ScaleByNadamState]:
        flat = _owned.live(updates, state, ScaleByNadamState, "scale_by_nadam")
        if flat is None:
            return updates, state
        beta1, beta2 = _tree.as_scalar(b1), _tree.as_scalar(b2)
        e, psi = _tree.as_scalar(eps), _tree.as_scalar(momentum_decay)
        neg_lr = _neg_lr(lr)
        wd = None if decoupled_wd is None else _tree.as_scalar(decoupled_wd)
        p = None if wd is None else flat.params_live(params, "nadam")
        counts = _step_counts(flat, state.count, own.state)
        g = flat.live
        sdtype = _scalar_dtype()
        products = flat.state_live(state.mu_product, "state.mu_product", check_shapes=False)
        ts = _host_steps(counts)
        if ts is not None and all(pr.device.type == "cpu" for pr in products):
            mus = [beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)) for t in ts]
            nexts = [beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi)) for t in ts]
            # P_t in torch's scalar dtype, as torch's ``mu_product *= mu`` (a loaded float64 copy
            # holds a value of that dtype: the product rounds as in the uninterrupted run)
            new_products = [pr.to(sdtype) * m for pr, m in zip(products, mus)]
            pv = [float(pr) for pr in new_products]
            bc_sqrt = [(1.0 - beta2**t) ** 0.5 for t in ts]
            # fold sqrt(1 - b2^t) into the coefficients: denom = sqrt(v) + eps sqrt(1 - b2^t)
            c_g: list[Any] = [(1.0 - m) / (1.0 - p) * s for m, p, s in zip(mus, pv, bc_sqrt)]
            c_m: list[Any] = [n / (1.0 - p * n) * s for n, p, s in zip(nexts, pv, bc_sqrt)]
            eps_s: list[Any] = [e * s for s in bc_sqrt]
        else:
            t = _f64(counts)
            mus_t = [beta1 * (1.0 - 0.5 * 0.96 ** (x * psi)) for x in t]
            nexts_t = [beta1 * (1.0 - 0.5 * 0.96 ** ((x + 1.0) * psi)) for x in t]
            # as the eager ``P * mu`` with a Python float: mu rounded to the scalar dtype first
            new_products = [pr.to(sdtype) * m.to(sdtype) for pr, m in zip(products, mus_t)]
            pv_t = [p.to(torch.float64) for p in new_products]
            bc_sqrt_t = [(1.0 - beta2**x) ** 0.5 for x in t]
            c_g = [(1.0 - m) / (1.0 - p) * s for m, p, s in zip(mus_t, pv_t, bc_sqrt_t)]
            c_m = [n / (1.0 - p * n) * s for n, p, s in zip(nexts_t, pv_t, bc_sqrt_t)]
            eps_s = [e * s for s in bc_sqrt_t]
            n_l = len(c_g)
            both = _realized(c_g + c_m + eps_s)
            c_g, c_m, eps_s = both[:n_l], both[n_l:2 * n_l], both[2 * n_l:]
        mu_all = flat.state_live(state.mu, "state.mu")
        nu_all = flat.state_live(state.nu, "state.nu")
        n = len(g)
        host = ts is not None and _host_scalars(beta1, beta2, e, neg_lr, wd) and not isinstance(c_m[0], torch.Tensor)
        ps_all = _apply_params(flat, params, g) if apply and host else None
        k = 1.0 if neg_lr is None else neg_lr
        big = _stream(ps_all, [g, mu_all, nu_all], lambda: chunk(
            beta1, beta2, eps_s, [cm / cg for cm, cg in zip(c_m, c_g)], [k * cg for cg in c_g],
            None if wd is None else k * wd), scratches=2)
        if big:
            g, p, c_g, c_m, eps_s = (_except(x, big) for x in (g, p or [], c_g, c_m, eps_s))
            p = p if wd is not None else None
        mu, nu, out = [], [], []
        if g:  # the other leaves: foreach kernels
            mu, nu = _ema(_except(mu_all, big), g, beta1, own.state), _ema_sq(_except(nu_all, big), g, beta2, own.state)
            out = rest(g, p, mu, nu, c_g, c_m, eps_s, None if ps_all is None else _except(ps_all, big), ts is not None,
                       host, k_lr=neg_lr, wd=wd, mine=_owned_out(flat, own))

        def whole(xs_all: list[Any], rest_: list[Any]) -> list[Any]:
            return _merged(n, big, [xs_all[i] for i in big], rest_)

        return _owned.finish(flat, _merged(n, big, [None] * len(big), out), state, count=counts,
                             mu=whole(mu_all, mu), nu=whole(nu_all, nu), mu_product=new_products)

    def rest(g: list[torch.Tensor], p: list[torch.Tensor] | None, mu: list[torch.Tensor], nu: list[torch.Tensor],
             c_g: list[Any], c_m: list[Any], eps_s: list[Any], ps: list[torch.Tensor] | None, host_steps: bool,
             host: bool, k_lr: Any, wd: Any, mine: bool) -> list[Any]:
        """The step of the leaves not streamed, on foreach kernels: their updates (``None`` where
        added into the params ``ps``)."""
        neg_lr = k_lr
        denom = _each("add", list(_fe.sqrt(nu)), eps_s, True)
        if host:
            # u = k_g (g + (c_m / c_g) m) / denom, k_g = -lr c_g: two passes (c_g > 0 for beta1 < 1)
            k = 1.0 if neg_lr is None else neg_lr
            rs, ks = [cm / cg for cm, cg in zip(c_m, c_g)], [k * cg for cg in c_g]
            # (with NAdamW's decay the update is u + k wd p: added by the caller, same rounding)
            ps = ps if wd is None else None
            if mine:
                for x, m, r in zip(g, mu, rs):
                    x.add_(m, alpha=r)
                out = _add_scaled_div(ps, g, denom, ks) if ps is not None else _scaled_div(g, denom, ks, denom)
            else:  # p <- p + u (ps given) or u into denom's buffers; no params-sized numerator
                out = _sum_div(ps, g, mu, rs, denom, ks)
            if wd is not None:
                _fe.add_(out, p, alpha=k * wd)
        else:
            if mine:
                _fe.div_(g, denom)
                out = g
            else:
                out = list(_fe.div(g, denom))
            out = _each("mul", out, c_g, True)
            if host_steps and not isinstance(c_m[0], torch.Tensor):
                _addcdiv_(out, mu, denom, c_m)
            else:
                out = list(_fe.add(out, _each("mul", list(_fe.div(mu, denom)), c_m, True)))
            if wd is not None:
                out = list(_fe.add(out, _fe.mul(p, wd))) if isinstance(wd, torch.Tensor) else list(_fe.add(out, p, alpha=wd))
            out = _scaled(out, neg_lr, True)
        return out

    return _with_apply(init, step)


# --- RAdam --------------------------------------------------------------------------------------


@recorded
def scale_by_radam(b1: float | torch.Tensor = 0.9, b2: float | torch.Tensor = 0.999,
                   eps: float | torch.Tensor = 1e-8, threshold: float = 5.0, *,
                   eps_on_debiased: bool = False) -> GradientTransformation:
    """Rectified Adam's preconditioning (Liu et al., 2020), eps placed as torch.optim.RAdam.

    ``rho_inf = 2 / (1 - b2) - 1``; ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``; while
    ``rho_t > threshold``: ``u = r_t (m_t / (1 - b1^t)) sqrt(1 - b2^t) / (sqrt(v_t) + eps)``
    with ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``;
    else the un-adapted ``u = m_t / (1 - b1^t)``. ``t`` is the leaf's own step.

    torch and optax differ in two details. eps: torch.optim.RAdam adds it to the raw root
    ``sqrt(v_t)`` (as here), optax's ``scale_by_radam`` to the debiased root
    ``sqrt(v_t / (1 - b2^t))`` (``eps_on_debiased=True``); the two differ while ``1 - b2^t`` is
    far from 1. Threshold: torch rectifies while ``rho_t > 5`` (strict, this default), optax
    while ``rho_t >= threshold`` (the same for the default betas: ``rho_t`` is not an integer).

    Args:
        b1: first-moment decay (torch's ``betas[0]``), in [0, 1).
        b2: second-moment decay (``betas[1]``), in [0, 1).
        eps: added to the debiased root, >= 0.
        threshold: the rectification threshold on ``rho_t``.
        eps_on_debiased: optax's eps placement (on the debiased root).

    Returns:
        The transform; its state is `gradxform.ScaleByAdamState` (``nu_max`` is ``None``).

    Raises:
        ValueError: a beta outside [0, 1) or a negative eps.

    References:
        Liu et al., "On the variance of the adaptive learning rate and beyond", ICLR 2020,
        arXiv 1908.03265, Algorithm 2; https://pytorch.org/docs/stable/generated/torch.optim.RAdam.html

    Example:
        >>> tx = gx.chain(gx.scale_by_radam(), gx.scale_by_learning_rate(1e-3))
    """
    check_float("b1 (betas[0])", b1, low=0.0, high=1.0, high_open=True)
    check_float("b2 (betas[1])", b2, low=0.0, high=1.0, high_open=True)
    check_float("eps", eps, low=0.0)
    check_float("threshold", threshold)
    return _radam_tx(b1, b2, eps, threshold, eps_on_debiased, None, None)


def _radam_tx(b1: Any, b2: Any, eps: Any, threshold: float, eps_on_debiased: bool, lr: Any,
              decoupled_wd: Any) -> GradientTransformation:
    """`scale_by_radam`; with ``lr``, followed by ``u <- -lr (u + decoupled_wd p)`` folded into
    its last passes (``decoupled_wd``: RAdamW's decay, or ``None``)."""

    def init(params: Params) -> ScaleByAdamState:
        zeros = _tree.tree_zeros_like
        return ScaleByAdamState(_leaf_counts(params), zeros(params), zeros(params), None)

    def step(updates: Updates, state: ScaleByAdamState, params: Params | None,
             own: Ownership, apply: bool) -> tuple[Updates, ScaleByAdamState]:
        flat = _owned.live(updates, state, ScaleByAdamState, "scale_by_radam")
        if flat is None:
            return updates, state
        beta1, beta2, e = _tree.as_scalar(b1), _tree.as_scalar(b2), _tree.as_scalar(eps)
        neg_lr = _neg_lr(lr)
        wd = None if decoupled_wd is None else _tree.as_scalar(decoupled_wd)
        p = None if wd is None else flat.params_live(params, "radam")
        counts = _step_counts(flat, state.count, own.state)
        g = flat.live
        mu = _ema(flat.state_live(state.mu, "state.mu"), g, beta1, own.state)
        nu = _ema_sq(flat.state_live(state.nu, "state.nu"), g, beta2, own.state)
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        ts = _host_steps(counts)
        mine = _owned_out(flat, own)
        host = _host_scalars(beta1, beta2, e, neg_lr, wd)
        k = 1.0 if neg_lr is None or not host else neg_lr  # the step folded into the passes below
        if ts is not None:
            out: list[Any] = [None] * len(g)
            rect_i, plain_i = [], []
            coef, inv_bc1, eps_s = [], [], []
            for i, t in enumerate(ts):
                bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
                rho_t = rho_inf - 2.0 * t * beta2**t / bc2
                if rho_t > threshold:
                    r = max(0.0, (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
                    rect_i.append(i)
                    coef.append(r / bc1 * bc2**0.5)  # denom = sqrt(v) + eps (torch)
                    eps_s.append(e * bc2**0.5 if eps_on_debiased else e)
                else:
                    plain_i.append(i)
                    inv_bc1.append(1.0 / bc1)
            if rect_i:
                denom = _fe.sqrt([nu[i] for i in rect_i])
                _fe.add_(denom, eps_s)
                dst = [g[i] for i in rect_i] if mine else denom
                mu_r = [mu[i] for i in rect_i]
                ps = _apply_params(flat, params, g) if apply and host and wd is None else None
                if ps is not None:  # p <- p + k coef m / denom: one addcdiv_ into the params
                    dst = _add_scaled_div([ps[i] for i in rect_i], mu_r, denom, [k * c for c in coef])
                elif host:  # one pass: u = k coef m / denom
                    _scaled_div(mu_r, denom, [k * c for c in coef], dst)
                else:
                    for i, d, o in zip(rect_i, denom, dst):
                        torch.div(mu[i], d, out=o)
                    _fe.mul_(dst, coef)
                for i, o in zip(rect_i, dst):
                    out[i] = o
            if plain_i:
                plain = list(_fe.mul([mu[i] for i in plain_i], [k * c for c in inv_bc1]))
                for i, o in zip(plain_i, plain):
                    out[i] = o
        else:
            t = _f64(counts)
            coefs, invs, rhos, e_ts = [], [], [], []
            for x in t:
                bc1, bc2 = 1.0 - beta1**x, 1.0 - beta2**x
                rho_t = rho_inf - 2.0 * x * beta2**x / bc2
                r = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp_min(0) ** 0.5
                coefs.append(r * bc2**0.5 / bc1)
                invs.append(1.0 / bc1)
                rhos.append(rho_t)
                e_ts.append(e * bc2**0.5 if eps_on_debiased else e)
            n_l = len(t)
            both = _realized(coefs + invs + rhos + (e_ts if eps_on_debiased else []))
            coefs, invs, rhos = both[:n_l], both[n_l:2 * n_l], both[2 * n_l:3 * n_l]
            if eps_on_debiased:
                e_ts = both[3 * n_l:]
            out = []
            for m, v, c, inv, rho_t, e_t in zip(mu, nu, coefs, invs, rhos, e_ts):
                adapted = m * c.to(m.dtype) / (_fe.sqrt([v])[0] + e_t)
                out.append(torch.where(rho_t > threshold, adapted, m * inv.to(m.dtype)))
        if ts is not None and host:
            if wd is not None:
                _fe.add_(out, p, alpha=k * wd)
        else:
            if wd is not None:
                out = list(_fe.add(out, _fe.mul(p, wd))) if isinstance(wd, torch.Tensor) else list(_fe.add(out, p, alpha=wd))
            out = _scaled(out, neg_lr, True)
        # RAdam keeps no nu_max (torch has none)
        return _owned.finish(flat, out, state, {"nu_max": None}, count=counts, mu=mu, nu=nu)

    return _with_apply(init, step)


# --- Rprop --------------------------------------------------------------------------------------


class ScaleByRpropState(NamedTuple):
    """``count``: each leaf's step count (torch's ``step``); ``step_sizes``: the per-element
    step sizes (``step_size``; 1 until the leaf's first step, which multiplies them by the
    learning rate of that step); ``prev_updates``: the previous update with sign-flipped
    entries zeroed (``prev``)."""

    count: Any
    step_sizes: Any
    prev_updates: Any


ScaleByRpropState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "step_sizes": "step_size", "prev_updates": "prev"})


@recorded
def scale_by_rprop(learning_rate: float | torch.Tensor = 1e-2, eta_minus: float | torch.Tensor = 0.5,
                   eta_plus: float | torch.Tensor = 1.2, min_step_size: float | torch.Tensor = 1e-6,
                   max_step_size: float | torch.Tensor = 50.0) -> GradientTransformation:
    """Rprop's sign-based steps as torch.optim.Rprop (Riedmiller & Braun, 1993; iRprop-).

    Per element, with ``s = g_t * g'_{t-1}``: ``eta = eta_plus`` if ``s > 0``, ``eta_minus`` if
    ``s < 0``, else 1; ``d_t = clamp(eta d_{t-1}, min_step_size, max_step_size)``
    (``d`` starts at ``learning_rate``, read at each leaf's first step); ``g'_t = 0`` where
    ``s < 0``, else ``g_t``; ``u = d_t sign(g'_t)``. The output ascends (add ``scale(-1)``,
    as `gradxform.rprop` does). optax's ``scale_by_rprop`` keeps the step size where ``s = 0``
    and returns the previous step on a sign change; this block follows torch.

    Args:
        learning_rate: the initial step size, > 0 (torch's ``lr``: it only starts ``d``).
        eta_minus: the decrease factor, in (0, 1).
        eta_plus: the increase factor, > 1.
        min_step_size: the smallest step size.
        max_step_size: the largest step size.

    Returns:
        The transform; its state is `ScaleByRpropState`.

    Raises:
        ValueError: ``not 0 < eta_minus < 1 < eta_plus`` or a negative learning rate.

    References:
        Riedmiller & Braun, "A direct adaptive method for faster backpropagation learning: the
        RPROP algorithm", IEEE ICNN 1993; Igel & Husken, "Improving the Rprop learning
        algorithm", NC 2000 (iRprop-); https://pytorch.org/docs/stable/generated/torch.optim.Rprop.html

    Example:
        >>> tx = gx.chain(gx.scale_by_rprop(1e-2), gx.scale(-1.0))
    """
    check_float("learning_rate", learning_rate, low=0.0)
    check_float("eta_minus (etas[0])", eta_minus, low=0.0, high=1.0, low_open=True, high_open=True)
    check_float("eta_plus (etas[1])", eta_plus, low=1.0, low_open=True)
    return _rprop_tx(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size, False)


def _rprop_tx(learning_rate: Any, eta_minus: Any, eta_plus: Any, min_step_size: Any, max_step_size: Any,
              descend: bool) -> GradientTransformation:
    """`scale_by_rprop`; with ``descend``, followed by ``u <- -u`` folded into its last pass."""
    sign = -1.0 if descend else 1.0

    def init(params: Params) -> ScaleByRpropState:
        # d is held at 1 until the leaf's first step, which multiplies it by that step's lr
        return ScaleByRpropState(_leaf_counts(params), _tree.tree_map(torch.ones_like, params),
                                 _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByRpropState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByRpropState]:
        del params
        flat = _owned.live(updates, state, ScaleByRpropState, "scale_by_rprop")
        if flat is None:
            return updates, state
        lr, em, ep = _tree.as_scalar(learning_rate), _tree.as_scalar(eta_minus), _tree.as_scalar(eta_plus)
        lo, hi = _tree.as_scalar(min_step_size), _tree.as_scalar(max_step_size)
        counts = _step_counts(flat, state.count, own.state)
        g = flat.live
        sizes = flat.state_live(state.step_sizes, "state.step_sizes")
        prev = flat.state_live(state.prev_updates, "state.prev_updates")
        ts = _host_steps(counts)
        inplace = own.state and not _tree.pure_ops()
        # The step size starts at the lr of the leaf's first step (torch reads lr then). At that
        # step prev is 0, so every element takes the "s = 0" factor; d is 1 there (init), and
        # that factor is the lr: d = 1 * lr exactly. Later steps take 1. The element loop keeps
        # no first-step select (a compiled step paid about 5% for one).
        if ts is not None:
            keep = [torch.as_tensor(lr if t == 1 else 1.0, dtype=d.dtype) for t, d in zip(ts, sizes)]
        else:
            keep = [torch.where(c == 1, torch.as_tensor(lr, dtype=d.dtype), torch.ones((), dtype=d.dtype))
                    for c, d in zip(counts, sizes)]
        # (eta_plus, eta_minus, first-step factor, min, max) per leaf; compiled, a buffer per
        # leaf keeps the leaves' element loops apart (a fused loop over several leaves ran ~5% slower)
        hyper = _realized_apart([[ep, em, k, lo, hi] for k in keep])
        s = _sign(_fe.mul(g, prev))
        new_sizes, new_prev, out = [], [], []
        for x, d, p, sg, (ep_i, em_i, k, lo_i, hi_i) in zip(g, sizes, prev, s, hyper):
            factor = torch.where(sg > 0, torch.as_tensor(ep_i, dtype=d.dtype),
                                 torch.where(sg < 0, torch.as_tensor(em_i, dtype=d.dtype), k.to(d.dtype)))
            if inplace:
                d.mul_(factor).clamp_(lo_i, hi_i)
                torch.where(sg < 0, torch.zeros((), dtype=x.dtype), x, out=p)
                o = torch.sign(p)
                torch.addcmul(torch.zeros((), dtype=o.dtype), o, d, value=sign, out=o)
                new_sizes.append(d)
                new_prev.append(p)
            else:
                d = (d * factor).clamp(lo_i, hi_i)
                p = torch.where(sg < 0, torch.zeros((), dtype=x.dtype), x)
                o = torch.sign(p) * d * sign if descend else torch.sign(p) * d
                new_sizes.append(d)
                new_prev.append(p)
            out.append(o)
        return _owned.finish(flat, out, state, count=counts, step_sizes=new_sizes, prev_updates=new_prev)

    return owned_transform(init, owned_update)


# --- ASGD ---------------------------------------------------------------------------------------


class ScaleByAsgdState(NamedTuple):
    """``count``: each leaf's step count (torch's ``step``); ``eta``: each leaf's step size for
    its next step; ``mu``: each leaf's averaging weight for its next step (both 0-d, torch's
    scalar dtype); ``ax``: the averaged iterate (params-shaped)."""

    count: Any
    eta: Any
    mu: Any
    ax: Any


ScaleByAsgdState.torch_state_keys = MappingProxyType(  # type: ignore[attr-defined]
    {"count": "step", "eta": "eta", "mu": "mu", "ax": "ax"})


@recorded
def scale_by_asgd(learning_rate: float | torch.Tensor = 1e-2, lambd: float | torch.Tensor = 1e-4,
                  alpha: float | torch.Tensor = 0.75, t0: float | torch.Tensor = 1e6) -> GradientTransformation:
    """Averaged SGD as torch.optim.ASGD (Polyak & Juditsky, 1992): the whole step, and the average.

    ``u = -eta_t (g + lambd p)``; the new params ``p + u`` enter the average
    ``ax_t = ax + mu_t (p + u - ax)``; then ``eta_{t+1} = lr / (1 + lambd lr t)^alpha`` and
    ``mu_{t+1} = 1 / max(1, t - t0)``; ``eta_1 = lr``, ``mu_1 = 1`` (read at each leaf's first
    step, as torch does). ``eta`` and ``mu`` are kept in torch's scalar dtype. This block's
    output is the step itself (the learning rate is inside ``eta``), so it must be the last
    block of a chain: the average assumes that ``p + u`` are the new params. Read the average
    with `gradxform.averaged_params`. optax has no ASGD.

    Args:
        learning_rate: torch's ``lr``, >= 0.
        lambd: the decay term (torch's ``lambd``), >= 0.
        alpha: the power of the ``eta`` schedule.
        t0: the step after which averaging starts.

    Returns:
        The transform (needs params); its state is `ScaleByAsgdState`.

    Raises:
        ValueError: a negative learning rate or lambd.

    References:
        Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
        Control Optim. 30(4), 1992; Bottou, "Stochastic gradient descent tricks", Neural
        Networks: Tricks of the Trade (2012), section 5.3;
        https://pytorch.org/docs/stable/generated/torch.optim.ASGD.html

    Example:
        >>> tx = gx.scale_by_asgd(1e-2)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(grads, state, params)
        >>> avg = gx.averaged_params(state, params)
    """
    check_float("learning_rate", learning_rate, low=0.0)
    check_float("lambd", lambd, low=0.0)
    check_float("alpha", alpha)
    check_float("t0", t0)

    def init(params: Params) -> ScaleByAsgdState:
        lr0 = _tree.as_scalar(learning_rate)
        sd = _scalar_dtype()
        return ScaleByAsgdState(_leaf_counts(params),
                                _tree.tree_map(lambda p: torch.as_tensor(lr0, dtype=torch.float64).to(sd).clone(), params),
                                _tree.tree_map(lambda p: torch.ones((), dtype=sd), params),
                                _tree.tree_zeros_like(params))

    def owned_update(updates: Updates, state: ScaleByAsgdState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByAsgdState]:
        flat = _owned.live(updates, state, ScaleByAsgdState, "scale_by_asgd")
        if flat is None:
            return updates, state
        p = flat.params_live(params, "scale_by_asgd")
        lr, lam = _tree.as_scalar(learning_rate), _tree.as_scalar(lambd)
        pw, start = _tree.as_scalar(alpha), _tree.as_scalar(t0)
        counts = _step_counts(flat, state.count, own.state)
        g = flat.live
        sd = _scalar_dtype()
        etas = flat.state_live(state.eta, "state.eta", check_shapes=False)
        mus = flat.state_live(state.mu, "state.mu", check_shapes=False)
        ax = flat.state_live(state.ax, "state.ax")
        ts = _host_steps(counts)
        if ts is not None and all(x.device.type == "cpu" for x in etas + mus):
            lr_sd = float(torch.tensor(lr, dtype=sd))
            eta_v: list[Any] = [lr_sd if t == 1 else float(x) for t, x in zip(ts, etas)]
            mu_v: list[Any] = [1.0 if t == 1 else float(x) for t, x in zip(ts, mus)]
            neg_eta: list[Any] = [-v for v in eta_v]
            new_etas = [torch.tensor(lr / ((1 + lam * lr * t) ** pw), dtype=sd) for t in ts]
            new_mus = [torch.tensor(1 / max(1, t - start), dtype=sd) for t in ts]
        else:
            t = _f64(counts)
            lr_t = torch.as_tensor(lr, dtype=torch.float64)
            eta_v = [torch.where(c == 1, lr_t.to(sd).to(torch.float64), x.to(torch.float64)) for c, x in zip(counts, etas)]
            mu_v = [torch.where(c == 1, torch.ones((), dtype=torch.float64), x.to(torch.float64)) for c, x in zip(counts, mus)]
            neg_eta = [-v for v in eta_v]
            n_l = len(t)
            both = _realized(neg_eta + mu_v)
            neg_eta, mu_v = both[:n_l], both[n_l:]
            new_etas = [(lr_t / (1 + lam * lr_t * x) ** pw).to(sd) for x in t]
            new_mus = [(1 / torch.clamp_min(x - start, 1.0)).to(sd) for x in t]
        if _owned_out(flat, own):
            _fe.add_(g, p, alpha=lam) if not isinstance(lam, torch.Tensor) else _fe.add_(g, _fe.mul(p, lam))
            out = g
        elif isinstance(lam, torch.Tensor):
            out = list(_fe.add(g, _fe.mul(p, lam)))
        else:
            out = list(_fe.add(g, p, alpha=lam))
        out = _each("mul", out, neg_eta, True)
        # the average, of the new params p + u
        if ts is not None and not _tree.pure_ops() and all(v == 1.0 for v in mu_v):
            if own.state:
                for a, x, o in zip(ax, p, out):
                    torch.add(x, o, out=a)
                new_ax = ax
            else:
                new_ax = list(_fe.add(p, out))
        elif ts is not None and not _tree.pure_ops() and not isinstance(mu_v[0], torch.Tensor):
            # ax + mu (p + u - ax) as one lerp towards the new params (two passes fewer)
            step = list(_fe.add(p, out))
            if own.state:  # per leaf: a list of weights is no lerp overload on older torch
                for a, s, m in zip(ax, step, mu_v):
                    a.lerp_(s, m)
                new_ax = ax
            else:
                new_ax = [torch.lerp(a, s, m) for a, s, m in zip(ax, step, mu_v)]
        else:
            step = list(_fe.add(p, out))
            _fe.sub_(step, ax)
            step = _each("mul", step, mu_v, True)
            if own.state:
                _fe.add_(ax, step)
                new_ax = ax
            else:
                new_ax = list(_fe.add(ax, step))
        return _owned.finish(flat, out, state, count=counts, eta=new_etas, mu=new_mus, ax=new_ax)

    return owned_transform(init, owned_update)


def averaged_params(state_or_optimizer: Any, params: Any = None) -> Any:
    """The averaged iterate ``ax`` of ASGD (`gradxform.asgd`, `gradxform.scale_by_asgd`).

    ``ax_t = ax_{t-1} + mu_t (p_t - ax_{t-1})``: the running average of the params once
    averaging has started (step ``> t0``), the params themselves before (``mu = 1``). A leaf
    that has taken no step yet has no average: its param is returned.

    Args:
        state_or_optimizer: a transform state holding a `ScaleByAsgdState` (from ``init`` /
            ``update``), or a `gradxform.Optimizer` running ``gx.asgd``.
        params: for a state, the params pytree (leaves without a step are taken from it; may be
            ``None`` once every leaf has stepped); for an optimizer, the params to read (default:
            every param of every group, in order).

    Returns:
        For a state, the ``ax`` pytree (shaped as the params); for an optimizer, a list with one
        tensor per param. The tensors are the state's own: clone them before writing.

    Raises:
        ValueError: no ASGD state found, or params needed and not given.

    References:
        Polyak & Juditsky, SIAM J. Control Optim. 30(4), 1992;
        https://pytorch.org/docs/stable/generated/torch.optim.ASGD.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.asgd())
        >>> model(x).square().mean().backward()
        >>> opt.step()  # ... train
        >>> avg = gx.averaged_params(opt)
        >>> eval_model = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     torch._foreach_copy_(list(eval_model.parameters()), avg)
    """
    if isinstance(state_or_optimizer, torch.optim.Optimizer):
        opt = state_or_optimizer
        ps = [p for g in opt.param_groups for p in g["params"]] if params is None else list(params)
        out = [opt.state[p]["ax"] if "ax" in (opt.state.get(p) or {}) else p for p in ps]
        stepped = [p for g in opt.param_groups for p in g["params"] if opt.state.get(p)]
        if stepped and not any("ax" in opt.state[p] for p in stepped):
            raise ValueError("averaged_params: this optimizer's state has no 'ax' (it does not run gx.asgd)")
        return out
    states: list[ScaleByAsgdState] = []

    def walk(node: Any) -> None:
        if isinstance(node, ScaleByAsgdState):
            states.append(node)
        elif isinstance(node, tuple):
            for child in node:
                walk(child)
        elif isinstance(node, dict):
            for child in node.values():
                walk(child)

    walk(state_or_optimizer)
    if not states:
        raise ValueError("averaged_params: no ScaleByAsgdState in this state; pass the state of gx.asgd or "
                         "gx.scale_by_asgd (or a gx.Optimizer running gx.asgd)")
    st = states[0]
    ax_leaves, spec = _tree.tree_flatten(st.ax)
    counts = _tree.tree_flatten(st.count)[0]
    p_leaves = _tree.tree_flatten(params)[0] if params is not None else [None] * len(ax_leaves)
    out_leaves = []
    for a, c, p in zip(ax_leaves, counts, p_leaves):
        if a is not None and c is not None and int(c) == 0:
            if p is None:
                raise ValueError("averaged_params: a leaf has taken no step yet; pass params to take its value")
            out_leaves.append(p)
        else:
            out_leaves.append(a)
    return _tree.tree_unflatten(spec, out_leaves)


# --- the aliases --------------------------------------------------------------------------------


def _lead(maximize: bool, weight_decay: Any, use_weight_decay: bool) -> list[GradientTransformation]:
    parts = []
    if maximize:
        parts.append(scale(-1.0))
    if use_weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    return parts


def _check_lr(lr: Any) -> Any:
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    return lr


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    if callable(value) or isinstance(value, torch.Tensor) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers; got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def _adagrad(lr: Any, lr_decay: Any, weight_decay: Any, initial_accumulator_value: Any, eps: Any,
             maximize: bool, use_weight_decay: bool) -> GradientTransformation:
    # scale_by_rss with the step -lr u folded into its last pass
    return chain(*_lead(maximize, weight_decay, use_weight_decay),
                 _rss_tx(initial_accumulator_value, eps, lr_decay, False, lr))


@recorded
def adagrad(lr: ScalarOrSchedule = 1e-2, lr_decay: float = 0.0, weight_decay: ScalarOrSchedule = 0.0,
            initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
            maximize: bool = False) -> GradientTransformation:
    """Adagrad as ``torch.optim.Adagrad`` (Duchi et al., 2011).

    ``g <- -g`` if maximize; ``g <- g + wd p``; ``s_t = s + g^2`` (``s_0 =
    initial_accumulator_value``); ``p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s_t) + eps)``.
    ``chain(add_decayed_weights, scale_by_rss, scale_by_learning_rate)`` in ``inject_hyperparams``.

    Sparse gradients (``nn.Embedding(sparse=True)``) are taken as torch takes them: ``s`` grows
    and the param moves only at the gradient's rows (a COO update; through `gradxform.Optimizer`
    bit for bit torch, which adds it with a multiply-add), eagerly; ``weight_decay`` with a sparse
    gradient raises, as in torch.

    Args:
        lr: learning rate (a number, a one-element tensor or a schedule).
        lr_decay: torch's per-param learning-rate decay.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: the initial sum of squares.
        eps: added to the root.
        maximize: ascend instead.

    Returns:
        The transform (state keys in ``opt.state[p]``: ``step``, ``sum``). With constant
        hyperparameters it declares a fused lowering (`gradxform.fastpath.AdagradKernel`):
        ``gx.Optimizer`` runs torch's ``torch._fused_adagrad_`` (``torch.optim.Adagrad(fused=True)``'s
        kernel) where the running torch has it for the params' device and every precondition
        holds, and the generic path otherwise.

    Raises:
        ValueError: a negative argument; at ``update``, a sparse gradient with ``weight_decay``.
        RuntimeError: a sparse gradient under ``torch.compile`` or ``torch.func``.

    References:
        Duchi, Hazan & Singer, JMLR 12 (2011); https://pytorch.org/docs/stable/generated/torch.optim.Adagrad.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adagrad(1e-2, lr_decay=1e-4))
    """
    lr = _check_lr(lr)
    check_float("lr_decay", lr_decay, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    check_float("initial_accumulator_value", initial_accumulator_value, low=0.0)
    check_float("eps", eps, low=0.0)
    tx = inject_hyperparams(_adagrad, static_args=("maximize", "use_weight_decay"))(
        lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value,
        eps=eps, maximize=maximize, use_weight_decay=_nonzero(weight_decay))
    declare_kernel(tx, AdagradKernel(bool(maximize)),
                   {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay, "eps": eps})
    return tx


adagrad.takes_sparse_gradients = True  # type: ignore[attr-defined]  # gx.Optimizer passes COO grads through


def _adadelta(lr: Any, rho: Any, eps: Any, weight_decay: Any, maximize: bool,
              use_weight_decay: bool) -> GradientTransformation:
    # scale_by_adadelta with the step -lr u folded into its last pass
    return chain(*_lead(maximize, weight_decay, use_weight_decay), _adadelta_tx(rho, eps, lr))


@recorded
def adadelta(lr: ScalarOrSchedule = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: ScalarOrSchedule = 0.0,
             *, maximize: bool = False) -> GradientTransformation:
    """Adadelta as ``torch.optim.Adadelta`` (Zeiler, 2012).

    ``g <- -g`` if maximize; ``g <- g + wd p``; `gradxform.scale_by_adadelta` (``rho``, ``eps``);
    ``p <- p - lr u``.

    Args:
        lr: scales the step (torch's default 1.0 is Zeiler's rule).
        rho: the averaging constant.
        eps: added inside both roots.
        weight_decay: L2 penalty added to the gradient.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``square_avg``, ``acc_delta``).

    Raises:
        ValueError: rho outside [0, 1] or a negative lr, eps or weight_decay.

    References:
        Zeiler, arXiv 1212.5701; https://pytorch.org/docs/stable/generated/torch.optim.Adadelta.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adadelta())
    """
    lr = _check_lr(lr)
    check_float("rho", rho, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_adadelta, static_args=("maximize", "use_weight_decay"))(
        lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
        use_weight_decay=_nonzero(weight_decay))


def _adamax(lr: Any, betas: Any, eps: Any, weight_decay: Any, maximize: bool,
            use_weight_decay: bool) -> GradientTransformation:
    b1, b2 = betas
    # scale_by_adamax with the step -lr u folded into its last pass
    return chain(*_lead(maximize, weight_decay, use_weight_decay), _adamax_tx(b1, b2, eps, lr))


@recorded
def adamax(lr: ScalarOrSchedule = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: ScalarOrSchedule = 0.0, *, maximize: bool = False) -> GradientTransformation:
    """Adamax as ``torch.optim.Adamax`` (Kingma & Ba, 2015, section 7.1).

    ``g <- -g`` if maximize; ``g <- g + wd p``; `gradxform.scale_by_adamax`; ``p <- p - lr u``.

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``: first-moment and infinity-norm decays.
        eps: added to ``|g|``.
        weight_decay: L2 penalty added to the gradient.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``exp_avg``, ``exp_inf``).

    Raises:
        ValueError: a beta outside [0, 1) or a negative lr, eps or weight_decay.

    References:
        Kingma & Ba, ICLR 2015, arXiv 1412.6980; https://pytorch.org/docs/stable/generated/torch.optim.Adamax.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adamax(2e-3))
    """
    lr = _check_lr(lr)
    _check_betas(betas)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_adamax, static_args=("maximize", "use_weight_decay"))(
        lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
        use_weight_decay=_nonzero(weight_decay))


def _nadam(lr: Any, betas: Any, eps: Any, weight_decay: Any, momentum_decay: Any, decoupled_weight_decay: bool,
           maximize: bool, use_weight_decay: bool) -> GradientTransformation:
    b1, b2 = betas
    parts = _lead(maximize, weight_decay, use_weight_decay and not decoupled_weight_decay)
    # scale_by_nadam, then NAdamW's decay and the step -lr u, folded into its last passes
    decoupled = weight_decay if use_weight_decay and decoupled_weight_decay else None
    parts.append(_nadam_tx(b1, b2, eps, momentum_decay, lr, decoupled))
    return chain(*parts)


@recorded
def nadam(lr: ScalarOrSchedule = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: ScalarOrSchedule = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
          *, maximize: bool = False) -> GradientTransformation:
    """NAdam as ``torch.optim.NAdam`` (Dozat, 2016), with torch's momentum schedule.

    ``g <- -g`` if maximize; L2 decay ``g <- g + wd p`` before the moments, or with
    ``decoupled_weight_decay=True`` (NAdamW) ``p <- p - lr wd p`` beside the step;
    `gradxform.scale_by_nadam`; ``p <- p - lr u``. The schedule's running product is state
    (``mu_product``).

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``.
        eps: added to the debiased root.
        weight_decay: the decay.
        momentum_decay: the schedule's psi.
        decoupled_weight_decay: decoupled (AdamW-style) decay.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``exp_avg``, ``exp_avg_sq``, ``mu_product``).

    Raises:
        ValueError: a beta outside [0, 1) or a negative lr, eps, weight_decay or momentum_decay.

    References:
        Dozat, ICLR 2016 workshop; Loshchilov & Hutter, ICLR 2019, arXiv 1711.05101 (decoupled
        decay); https://pytorch.org/docs/stable/generated/torch.optim.NAdam.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.nadam(2e-3, weight_decay=1e-2, decoupled_weight_decay=True))
    """
    lr = _check_lr(lr)
    _check_betas(betas)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    check_float("momentum_decay", momentum_decay, low=0.0)
    return inject_hyperparams(_nadam, static_args=("decoupled_weight_decay", "maximize", "use_weight_decay"))(
        lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
        decoupled_weight_decay=bool(decoupled_weight_decay), maximize=maximize,
        use_weight_decay=_nonzero(weight_decay))


def _radam(lr: Any, betas: Any, eps: Any, weight_decay: Any, decoupled_weight_decay: bool, maximize: bool,
           use_weight_decay: bool) -> GradientTransformation:
    b1, b2 = betas
    parts = _lead(maximize, weight_decay, use_weight_decay and not decoupled_weight_decay)
    # scale_by_radam, then RAdamW's decay and the step -lr u, folded into its last passes
    decoupled = weight_decay if use_weight_decay and decoupled_weight_decay else None
    parts.append(_radam_tx(b1, b2, eps, 5.0, False, lr, decoupled))
    return chain(*parts)


@recorded
def radam(lr: ScalarOrSchedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: ScalarOrSchedule = 0.0, decoupled_weight_decay: bool = False, *,
          maximize: bool = False) -> GradientTransformation:
    """RAdam as ``torch.optim.RAdam`` (Liu et al., 2020): rectified while ``rho_t > 5``.

    ``g <- -g`` if maximize; L2 decay before the moments, or decoupled (``p <- p - lr wd p``);
    `gradxform.scale_by_radam`; ``p <- p - lr u``.

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``.
        eps: added to the debiased root.
        weight_decay: the decay.
        decoupled_weight_decay: decoupled (AdamW-style) decay.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``exp_avg``, ``exp_avg_sq``).

    Raises:
        ValueError: a beta outside [0, 1) or a negative lr, eps or weight_decay.

    References:
        Liu et al., ICLR 2020, arXiv 1908.03265; https://pytorch.org/docs/stable/generated/torch.optim.RAdam.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.radam(1e-3))
    """
    lr = _check_lr(lr)
    _check_betas(betas)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_radam, static_args=("decoupled_weight_decay", "maximize", "use_weight_decay"))(
        lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=bool(decoupled_weight_decay), maximize=maximize,
        use_weight_decay=_nonzero(weight_decay))


def _rms_step(alpha: Any, eps: Any, centered: bool, momentum: Any, lr: Any) -> GradientTransformation:
    """``chain(scale_by_rms(alpha, eps, centered=centered, count_steps=True), [trace(momentum)],
    scale_by_learning_rate(lr))`` with torch.optim.RMSprop's passes: the momentum buffer takes
    ``g / (sqrt(v) + eps)`` in one ``addcdiv`` and ``-lr`` is folded into the last pass. Its state
    is the blocks' (`gradxform.ScaleByRmsState`, and `gradxform.TraceState` with momentum, whose
    count only flags a stepped leaf: RMSprop's buffer starts at 0, without a first-step rule).
    Added into the params (``owned_apply``), a leaf of more than one chunk takes the whole step
    chunk by chunk (`_in_chunks`): each params-sized buffer read and written once, no
    params-sized temporary, the same numbers."""
    rms = scale_by_rms(alpha, eps, centered=centered, count_steps=True)

    def init(params: Params) -> Any:
        rs = rms.init(params)
        if momentum is None:
            return rs
        return (rs, TraceState(_leaf_counts(params), _tree.tree_zeros_like(params)))

    def chunk(d: float, e: float, m: float | None, neg_lr: float) -> Any:
        """The whole step on one chunk (`_in_chunks`): torch.optim.RMSprop's foreach kernels, in
        its order, on a cache-sized slice; with momentum the update ``-lr b`` is formed in the
        scratch and added (the rounding of ``p + u``, as the other leaves)."""
        def body(i: int, p: torch.Tensor, x: torch.Tensor, v: torch.Tensor, *more: torch.Tensor) -> None:
            s = more[-1]
            v.mul_(d)
            v.addcmul_(x, x, value=1.0 - d)
            if centered:
                a = more[0]
                a.lerp_(x, 1.0 - d)
                torch.addcmul(v, a, a, value=-1.0, out=s)
                s.sqrt_()
            else:
                torch.sqrt(v, out=s)
            s.add_(e)
            if m is None:
                p.addcdiv_(x, s, value=neg_lr)
            else:
                b = more[-2]
                b.mul_(m)
                b.addcdiv_(x, s)
                torch.mul(b, neg_lr, out=s)
                p.add_(s)

        return body

    def step(updates: Updates, state: Any, params: Params | None, own: Ownership, apply: bool) -> tuple[Updates, Any]:
        rs, ms = (state, None) if momentum is None else state
        expect_state(rs, ScaleByRmsState, "rmsprop")
        if ms is not None:
            expect_state(ms, TraceState, "rmsprop")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        d, e, neg_lr = _tree.as_scalar(alpha), _tree.as_scalar(eps), _neg_lr(lr)
        m = None if ms is None else _tree.as_scalar(momentum)
        g_all = flat.live
        n = len(g_all)
        counts = _step_counts(flat, rs.count, own.state)
        mcounts = None if ms is None else _step_counts(flat, ms.count, own.state)
        nu_all = flat.state_live(rs.nu, "state.nu")
        ga_all = flat.state_live(rs.grad_avg, "state.grad_avg") if centered else []
        buf_all = [] if ms is None else flat.state_live(ms.trace, "state.trace")
        host = _host_scalars(d, e, neg_lr, m)
        ps_all = _apply_params(flat, params, g_all) if apply and host else None
        big = _stream(ps_all, [g_all, nu_all] + ([ga_all] if centered else []) + ([buf_all] if ms is not None else []),
                      lambda: chunk(d, e, m, neg_lr))
        g = _except(g_all, big)
        nu, grad_avg, buf, out = [], [], [], []
        if g:  # the other leaves: foreach kernels
            nu = _ema_sq(_except(nu_all, big), g, d, own.state)
            if centered:
                grad_avg = _ema(_except(ga_all, big), g, d, own.state)
                avg = list(_addcmul(nu, grad_avg, grad_avg, value=-1.0))  # v - m^2, as torch.optim
                _sqrt_(avg)
            else:
                avg = list(_fe.sqrt(nu))
            _fe.add_(avg, e)
            if ms is not None:
                buf = _mul(_except(buf_all, big), m, own.state)
                _addcdiv_(buf, g, avg)  # in the state's buffers when owned, else in the new ones
                if host:  # -lr b into avg's buffers (private to this call)
                    for b, a in zip(buf, avg):
                        torch.mul(b, neg_lr, out=a)
                    out = avg
                else:
                    out = list(_fe.mul(buf, neg_lr))
            else:
                ps = None if ps_all is None else _except(ps_all, big)
                if ps is not None:  # p <- p - lr g / avg: torch's one addcdiv_ into the params
                    out = _add_scaled_div(ps, g, avg, [neg_lr] * len(g))
                elif host:  # one pass: u = -lr g / avg
                    out = _scaled_div(g, avg, [neg_lr] * len(g), g if _owned_out(flat, own) else avg)
                else:
                    out = list(_fe.mul(_fe.div(g, avg), neg_lr))

        def whole(xs_all: list[Any], rest: list[Any]) -> list[Any]:
            return _merged(n, big, [xs_all[i] for i in big], rest)

        out = _merged(n, big, [None] * len(big), out)
        new_rs = ScaleByRmsState(flat.rebuild(whole(nu_all, nu), like=rs.nu),
                                 flat.rebuild(whole(ga_all, grad_avg), like=rs.grad_avg) if centered else None,
                                 flat.rebuild(counts, like=rs.count))
        if ms is None:
            return flat.rebuild(out), new_rs
        new_ms = TraceState(flat.rebuild(mcounts, like=ms.count), flat.rebuild(whole(buf_all, buf), like=ms.trace))
        return flat.rebuild(out), (new_rs, new_ms)

    return _with_apply(init, step)


def _rmsprop(lr: Any, alpha: Any, eps: Any, weight_decay: Any, momentum: Any, centered: bool, maximize: bool,
             use_weight_decay: bool, use_momentum: bool) -> GradientTransformation:
    parts = _lead(maximize, weight_decay, use_weight_decay)
    parts.append(_rms_step(alpha, eps, centered, momentum if use_momentum else None, lr))
    return chain(*parts)


@recorded
def rmsprop(lr: ScalarOrSchedule = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: ScalarOrSchedule = 0.0,
            momentum: ScalarOrSchedule = 0.0, centered: bool = False, *, maximize: bool = False) -> GradientTransformation:
    """RMSprop as ``torch.optim.RMSprop`` (Tieleman & Hinton, 2012; centered: Graves, 2013).

    ``g <- -g`` if maximize; ``g <- g + wd p``; `gradxform.scale_by_rms` (``alpha``, eps
    outside the root, ``centered``); with momentum ``b = momentum b + u`` (`gradxform.trace`);
    ``p <- p - lr b``.

    Args:
        lr: learning rate.
        alpha: the averaging constant.
        eps: added to the root.
        weight_decay: L2 penalty added to the gradient.
        momentum: heavy-ball momentum on the preconditioned step.
        centered: divide by the root of the variance estimate ``v - m^2``.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``square_avg``, and ``momentum_buffer`` /
        ``grad_avg`` when used).

    Raises:
        ValueError: a negative lr, alpha, eps, weight_decay or momentum.

    References:
        Tieleman & Hinton (2012); Graves, arXiv 1308.0850;
        https://pytorch.org/docs/stable/generated/torch.optim.RMSprop.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.rmsprop(1e-2, momentum=0.9, centered=True))
    """
    lr = _check_lr(lr)
    check_float("alpha", alpha, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    check_float("momentum", momentum, low=0.0)
    return inject_hyperparams(_rmsprop, static_args=("centered", "maximize", "use_weight_decay", "use_momentum"))(
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=bool(centered),
        maximize=maximize, use_weight_decay=_nonzero(weight_decay), use_momentum=_nonzero(momentum))


def _rprop(lr: Any, etas: Any, step_sizes: Any, maximize: bool) -> GradientTransformation:
    em, ep = etas
    lo, hi = step_sizes
    parts = [scale(-1.0)] if maximize else []
    parts.append(_rprop_tx(lr, em, ep, lo, hi, True))  # scale_by_rprop, then scale(-1) folded in
    return chain(*parts)


@recorded
def rprop(lr: ScalarOrSchedule = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
          step_sizes: tuple[float, float] = (1e-6, 50.0), *, maximize: bool = False) -> GradientTransformation:
    """Rprop as ``torch.optim.Rprop`` (Riedmiller & Braun, 1993).

    ``g <- -g`` if maximize; `gradxform.scale_by_rprop` with ``(eta_minus, eta_plus) = etas`` and
    ``(min, max) = step_sizes``; ``p <- p - u``. As in torch, ``lr`` only sets each param's first
    step size (read at its first step): a scheduler changing it later has no effect.

    Args:
        lr: the initial step size.
        etas: ``(eta_minus, eta_plus)``, ``0 < eta_minus < 1 < eta_plus``.
        step_sizes: ``(min, max)`` step size.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``prev``, ``step_size``).

    Raises:
        ValueError: bad etas or step sizes, or a negative lr.

    References:
        Riedmiller & Braun, IEEE ICNN 1993; https://pytorch.org/docs/stable/generated/torch.optim.Rprop.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.rprop(1e-2))
    """
    lr = _check_lr(lr)
    etas, step_sizes = _pair("etas", etas), _pair("step_sizes", step_sizes)
    for i, v in enumerate(etas):
        check_float(f"etas[{i}]", v)
    if not 0.0 < float(etas[0]) < 1.0 < float(etas[1]):
        raise ValueError(f"etas must satisfy 0 < etas[0] < 1 < etas[1]; got {etas}")
    for i, v in enumerate(step_sizes):
        check_float(f"step_sizes[{i}]", v, low=0.0)
    if float(step_sizes[0]) > float(step_sizes[1]):
        raise ValueError(f"step_sizes must be (min, max) with min <= max; got {step_sizes}")
    return inject_hyperparams(_rprop, static_args=("maximize",))(
        lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize)


def _asgd(lr: Any, lambd: Any, alpha: Any, t0: Any, weight_decay: Any, maximize: bool,
          use_weight_decay: bool) -> GradientTransformation:
    return chain(*_lead(maximize, weight_decay, use_weight_decay), scale_by_asgd(lr, lambd, alpha, t0))


@recorded
def asgd(lr: ScalarOrSchedule = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
         weight_decay: ScalarOrSchedule = 0.0, *, maximize: bool = False) -> GradientTransformation:
    """Averaged SGD as ``torch.optim.ASGD`` (Polyak & Juditsky, 1992).

    ``g <- -g`` if maximize; ``g <- g + wd p``; `gradxform.scale_by_asgd`: ``p <- p - eta (g +
    lambd p)`` with torch's ``eta`` schedule, and the averaged iterate ``ax`` (state; read it with
    `gradxform.averaged_params`).

    Args:
        lr: learning rate (enters ``eta`` for the next step, as in torch).
        lambd: decay term.
        alpha: power of the ``eta`` schedule.
        t0: the step after which averaging starts.
        weight_decay: L2 penalty added to the gradient.
        maximize: ascend instead.

    Returns:
        The transform (``opt.state[p]``: ``step``, ``eta``, ``mu``, ``ax``).

    Raises:
        ValueError: a negative lr, lambd or weight_decay.

    References:
        Polyak & Juditsky, SIAM J. Control Optim. 30(4), 1992;
        https://pytorch.org/docs/stable/generated/torch.optim.ASGD.html

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.asgd(1e-2, t0=100))
        >>> avg = gx.averaged_params(opt)
    """
    lr = _check_lr(lr)
    check_float("lambd", lambd, low=0.0)
    check_float("alpha", alpha)
    check_float("t0", t0)
    check_float("weight_decay", weight_decay, low=0.0)
    return inject_hyperparams(_asgd, static_args=("maximize", "use_weight_decay"))(
        lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize,
        use_weight_decay=_nonzero(weight_decay))
