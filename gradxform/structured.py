"""Optimisers that use the structure of a tensor or of the loss: factored second moments
(Adafactor), orthogonalised momentum (Muon), quasi-Newton steps (L-BFGS), and torch's
SparseAdam.

The torch twins follow torch.optim 2.13 (names, defaults, semantics, per-param state keys):

- `adafactor` as ``torch.optim.Adafactor`` on the block `scale_by_factored_rms`;
- `muon` as ``torch.optim.Muon`` on the block `scale_by_muon`, whose Newton-Schulz iteration is
  also public (`orthogonalize_via_newton_schulz`);
- `lbfgs` as ``torch.optim.LBFGS`` (with and without the strong-Wolfe line search): its
  ``update`` takes the extra arguments ``value`` and ``value_and_grad_fn``;
- `sparse_adam` as ``torch.optim.SparseAdam`` on the functional path (COO gradients).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import _foreach as _fe
from . import tree as _tree
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


def _nonzero(x: Any) -> bool:
    if callable(x) and not isinstance(x, torch.Tensor):
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
        row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.size(-1)
        col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.size(-2)
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
        rows, cols, vars_ = (_live_or_none(flat, t) for t in (state.row_var, state.col_var, state.variance))
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

    owned_update.__qualname__ = name
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
    not implemented.

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
        lr_, e2, d_, wd = (_tree.as_scalar(x) for x in (lr, eps2, d, weight_decay))
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
    ``lr``. An optax-flavoured alias is not provided here.

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
    a, b, c = (float(v) for v in ns_coefficients)
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
        return math.sqrt(max(1.0, rows / cols))
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
        out = [orthogonalize_via_newton_schulz(m, coeffs, ns_steps, eps, ns_dtype).to(m.dtype)
               * _muon_ratio(m.shape, adjust_lr_fn) for m in mixed]
        return flat.rebuild(out), ScaleByMuonState(flat.rebuild(buf, like=state.momentum_buffer))

    return owned_transform(init, owned_update)


def _muon(lr: Any, weight_decay: Any, momentum: Any, nesterov: bool, ns_coefficients: tuple[float, ...], eps: float,
          ns_steps: int, adjust_lr_fn: str | None, use_weight_decay: bool) -> GradientTransformation:
    parts = [scale_by_muon(momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn)]
    if use_weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


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

    ``p <- p - lr (r NS(M_t) + wd p)``: `scale_by_muon` (momentum, Newton-Schulz in bfloat16, the
    shape ratio ``r``), then decoupled decay with the params before the step, then ``-lr``
    (``chain(scale_by_muon, add_decayed_weights, scale_by_learning_rate)`` inside
    ``inject_hyperparams``: ``lr``, ``weight_decay`` and ``momentum`` are live group keys).

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
        _muon, static_args=("nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn", "use_weight_decay"))(
        lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        use_weight_decay=_nonzero(weight_decay))
