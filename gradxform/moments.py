"""TrueGrad second-moment transforms: Adam, LaProp and RMSProp preconditioned by the sum of squared
per-example gradients.

Adam's second moment is a running mean of the squared *minibatch* gradient ``g^2``. TrueGrad
(truegrad 5.0.0 by L. Nestler; there is no paper) replaces it with a running mean of
``S = sum_n (grad l_n / N)^2``, the sum over the batch's examples of the squared per-example
gradients of a mean-reduced loss ``L = (1/N) sum_n l_n`` (BackPACK's ``SumGradSquared``
convention, which is also what ``truegrad.nn.Linear`` produces for its weights). ``S`` comes in
as the extra argument ``sum_grad_squared``, a pytree like the updates::

    updates, state = tx.update(grads, state, params, sum_grad_squared=S)

Common to the three transforms:

- ``eps`` is a *floor on the root*, not an additive term: ``max(sqrt(x / (1 - b^t)), eps)``.
- ``graft=True`` keeps, per leaf, the direction of the TrueGrad step and the Frobenius norm of the
  plain (Adam / LaProp / RMSProp) step: ``u = u_tg * ||u_base||_F / (||u_tg||_F + eps)``. That
  needs the plain second moment too, so the state then holds both.
- ``fallback``: what to do at a leaf whose ``S`` is ``None`` while its update is a tensor (a layer
  the statistics engine does not cover). ``"raise"`` (the default) raises a ``ValueError`` naming
  the leaf's path; ``"adam"`` uses the plain step at that leaf. With ``fallback="adam"`` the
  ``sum_grad_squared`` argument itself becomes optional (missing means: every leaf plain).
- ``enforce_baseline=True`` always takes the plain step (no ``S`` needed), for ablations.
- ``t`` is the leaf's own 1-based step (per-leaf counts, like torch.optim's per-param ``step``).
  The ``S`` moment of a leaf advances only on steps where its ``S`` is given, but its bias
  correction uses ``t``; a leaf whose ``S`` is missing only on some steps therefore gets a
  slightly under-corrected TrueGrad step. (The reference package behaves the same way.)
- ``S`` must be finite and non-negative (it is a sum of squares). This is not checked, because
  checking needs a device-to-host synchronisation: a negative entry makes the root NaN, a NaN or
  Inf propagates into the step and the state. Wrap the optimiser in `gradxform.apply_if_finite` to
  skip such steps.

What the reference does that we do not (docs/second-moments.md, "What truegrad does"): its weight decay runs once per
parameter per step inside the parameter loop (so a model with 3 params decays ``(1 - lr wd)^3``
per step); our aliases (`gradxform.tg_adamw`, ...) decay once, with the params before the step.
Its state lives in ``p.sum_grad_squared`` attributes; ours is an explicit extra argument, so the
transforms are pure and compile with ``torch.compile(fullgraph=True)``.

All leaf arithmetic is ``torch._foreach_*`` over the live leaves; the only host reads are of the
CPU step counters in eager mode (under ``torch.compile`` the bias corrections stay tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import name_update as _name_update
from .base import ExtraArgs
from .base import GradientTransformation, Ownership, Params, Updates, expect_state, owned_transform, recorded
from .transforms import _ema, _ema_sq, _Flat, _leaf_counts, _step_counts, check_float

__all__ = [
    "ScaleByTrueGradAdamState",
    "ScaleByTrueGradLaPropState",
    "ScaleByTrueGradRmsPropState",
    "scale_by_truegrad_adam",
    "scale_by_truegrad_laprop",
    "scale_by_truegrad_rmsprop",
]

_FALLBACKS = ("raise", "adam")


# --- helpers ------------------------------------------------------------------------------------


def _check_common(eps: Any, fallback: Any) -> None:
    check_float("eps", eps, low=0.0)
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be 'raise' or 'adam'; got {fallback!r}")


def _check_beta(name: str, value: Any) -> None:
    check_float(name, value, low=0.0, high=1.0, high_open=True)


def _corrections(counts: Sequence[torch.Tensor], beta: Any, root: bool = False) -> list[Any]:
    """``1 - beta^t`` (its square root with ``root``) for each leaf's step ``t``.

    Python floats in eager mode (the counts are CPU tensors: reading them is no device sync), 0-d
    float64 tensors under ``torch.compile`` or with a tensor ``beta``.
    """
    if not counts:
        return []
    if not _tree.traced() and not isinstance(beta, torch.Tensor) and all(c.device.type == "cpu" for c in counts):
        out = [1.0 - beta ** int(c) for c in counts]
        return [x ** 0.5 for x in out] if root else out
    t = torch.stack(list(counts)).to(torch.float64)
    bc = 1 - beta ** t
    if root:
        bc = bc.sqrt()
    return list(bc.unbind(0))


def _div_each_(xs: list[torch.Tensor], factors: list[Any]) -> None:
    if factors and not isinstance(factors[0], torch.Tensor):
        _fe.div_(xs, factors)
    else:
        xs[:] = [(x / f).to(x.dtype) for x, f in zip(xs, factors)]  # a 0-d x would promote to f's float64


def _root_floor(second: list[torch.Tensor], counts: Sequence[torch.Tensor], beta: Any, eps: Any) -> list[torch.Tensor]:
    """New tensors ``max(sqrt(second / (1 - beta^t)), eps)``."""
    denom = list(_fe.sqrt(second))
    _div_each_(denom, _corrections(counts, beta, root=True))
    if isinstance(eps, torch.Tensor):
        denom = [torch.maximum(d, eps) for d in denom]  # maximum: a DTensor strategy on every torch with FSDP2
    else:
        _fe.clamp_min_(denom, eps)
    return denom


def _quotient(num: list[torch.Tensor], denom: list[torch.Tensor]) -> list[torch.Tensor]:
    """``num / denom``; ``denom`` must be private to the caller (eager mode writes into it)."""
    if _tree.traced():
        return list(_fe.div(num, denom))
    for n, d in zip(num, denom):
        torch.div(n, d, out=d)
    return denom


def _graft_(direction: list[torch.Tensor], magnitude: list[torch.Tensor], eps: Any) -> None:
    """In place: ``direction *= ||magnitude||_F / (||direction||_F + eps)``, leaf by leaf."""
    if not direction:
        return
    n_dir = list(_fe.norm(direction))
    _fe.add_(n_dir, eps)
    factors = list(_fe.div(list(_fe.norm(magnitude)), n_dir))
    _fe.mul_(direction, factors)


def _pick(xs: list[Any], pos: list[int]) -> list[Any]:
    return [xs[j] for j in pos]


def _read_sgs(flat: _Flat, sgs: Any, fallback: str, who: str,
              enforce_baseline: bool = False) -> tuple[list[int], list[torch.Tensor], list[int]]:
    """Split the live leaves into those with an ``S`` (TrueGrad) and those without (plain; all of
    them with ``enforce_baseline``).

    Returns positions in ``flat.live`` of the TrueGrad leaves, their ``S`` tensors, and the
    positions of the plain leaves.
    """
    n = len(flat.live)
    if enforce_baseline:
        return [], [], list(range(n))
    if sgs is None:
        if fallback == "adam":
            return [], [], list(range(n))
        raise ValueError(
            f"{who} needs the extra argument 'sum_grad_squared' (a pytree like the updates holding the sum "
            "of squared per-example gradients); got None. Pass it, or use fallback='adam' to take the "
            "plain step where it is missing"
        )
    leaves = _tree.check_structure(flat.spec, sgs, "sum_grad_squared", reference=flat.tree)
    tg_pos: list[int] = []
    s_live: list[torch.Tensor] = []
    base_pos: list[int] = []
    for j, i in enumerate(flat.idx):
        x = leaves[i]
        if x is None:
            if fallback != "adam":
                raise ValueError(
                    f"{who}: sum_grad_squared is None at '{flat.paths()[i]}', where the update is a tensor. "
                    "Compute it for that leaf, or pass fallback='adam' to take the plain step there"
                )
            base_pos.append(j)
        else:
            tg_pos.append(j)
            s_live.append(x)
    _tree.check_shapes(lambda: [flat.paths()[flat.idx[j]] for j in tg_pos], _pick(flat.live, tg_pos), s_live,
                       "sum_grad_squared")
    return tg_pos, s_live, base_pos


def _assemble(n: int, tg_pos: list[int], u_tg: list[torch.Tensor], base_pos: list[int], graft: bool, eps: Any,
              base_dir: Any) -> list[Any]:
    """The ``n`` output leaves: the TrueGrad directions ``u_tg`` at ``tg_pos`` (with ``graft``,
    rescaled in place to the per-leaf norm of the base direction) and the base direction at
    ``base_pos``. ``base_dir(positions)`` computes the base direction at those live positions."""
    out: list[Any] = [None] * n
    ad_pos = sorted(set(base_pos) | set(tg_pos)) if graft else base_pos
    if ad_pos:
        by_pos = dict(zip(ad_pos, base_dir(ad_pos)))
        if graft and tg_pos:
            _graft_(u_tg, [by_pos[j] for j in tg_pos], eps)
        out = _tree.scatter(out, base_pos, [by_pos[j] for j in base_pos])
    return _tree.scatter(out, tg_pos, u_tg)


def _ema_at(state_live: list[torch.Tensor], pos: list[int], new: list[torch.Tensor], decay: Any,
            inplace: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """EMA of ``state_live`` at positions ``pos`` only; returns (all leaves, the updated ones)."""
    if not pos:
        return state_live, []
    updated = _ema(_pick(state_live, pos), new, decay, inplace)
    out = list(state_live)
    for j, x in zip(pos, updated):
        out[j] = x
    return out, updated


def _make_transform(init: Any, impl: Any, required: bool, who: str) -> GradientTransformation:
    """The transform: ``sum_grad_squared`` is a required keyword-only extra argument when the
    transform cannot do without it (so `gradxform.chain` names it when missing)."""
    if required:
        def owned_update(updates: Updates, state: Any, params: Params | None, own: Ownership, *,
                         sum_grad_squared: Any) -> tuple[Updates, Any]:
            del params
            return impl(updates, state, sum_grad_squared, own)
    else:
        def owned_update(updates: Updates, state: Any, params: Params | None, own: Ownership, *,  # type: ignore[misc]
                         sum_grad_squared: Any = None) -> tuple[Updates, Any]:
            del params
            return impl(updates, state, sum_grad_squared, own)
    _name_update(owned_update, who)  # error messages of chain name the transform
    # declared, not read from the signature: a transform rebuilt inside a dynamo 2.1 trace (an
    # alias's injected rate) cannot have its function read
    spec = ExtraArgs(required=_SUM_GRAD_SQUARED) if required else ExtraArgs(optional=_SUM_GRAD_SQUARED)
    return owned_transform(init, owned_update, spec)


_SUM_GRAD_SQUARED: frozenset[str] = frozenset({"sum_grad_squared"})


def _zeros_or_none(params: Params, keep: bool) -> Any:
    return _tree.tree_zeros_like(params) if keep else None


# --- TrueGrad-Adam --------------------------------------------------------------------------------


class ScaleByTrueGradAdamState(NamedTuple):
    """``count``: per-leaf steps (params-shaped 0-d int64); ``mu``: EMA of ``g``; ``nu``: EMA of
    ``g^2`` (``None`` unless grafting, ``fallback="adam"`` or ``enforce_baseline``); ``s``: EMA of
    ``S`` (``None`` with ``enforce_baseline``)."""

    count: Any
    mu: Any
    nu: Any
    s: Any


@recorded
def scale_by_truegrad_adam(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.999,
    b3: float | torch.Tensor = 0.999,
    eps: float | torch.Tensor = 1e-12,
    graft: bool = True,
    fallback: str = "raise",
    enforce_baseline: bool = False,
) -> GradientTransformation:
    """TrueGrad-Adam's preconditioning (truegrad 5.0.0 ``TGAdamW``, L. Nestler; no paper).

    Per leaf, with ``g`` the update, ``S`` its ``sum_grad_squared`` and ``t`` the leaf's step::

        m_t  = b1 m + (1-b1) g
        v_t  = b2 v + (1-b2) g^2                       (graft / fallback / baseline only)
        s_t  = b3 s + (1-b3) S
        u_tg = m_t / max(sqrt(s_t / (1-b3^t)), eps)
        u_ad = m_t / max(sqrt(v_t / (1-b2^t)), eps)
        u    = u_tg * ||u_ad||_F / (||u_tg||_F + eps) / (1-b1^t)     (graft)
        u    = u_tg / (1-b1^t)                                         (no graft)
        u    = u_ad / (1-b1^t)            (enforce_baseline, or S is None with fallback="adam")

    Extra argument ``sum_grad_squared``: a pytree like the updates (required unless
    ``fallback="adam"`` or ``enforce_baseline``). See the module docstring for ``fallback`` and
    for what a negative or non-finite ``S`` does. Follow it with ``add_decayed_weights`` and
    ``scale_by_learning_rate`` for TGAdamW (`gradxform.tg_adamw`).

    Args:
        b1: the decay of the first moment ``m``, in [0, 1).
        b2: the decay of the plain second moment ``v`` (``g^2``), in [0, 1).
        b3: the decay of the TrueGrad moment ``s`` (``S``), in [0, 1).
        eps: the floor on the root (``max(sqrt(.), eps)``) and the graft's guard.
        graft: keep, per leaf, the TrueGrad direction with the norm of the plain step.
        fallback: at a leaf whose ``S`` is ``None``: ``"raise"`` or ``"adam"`` (the plain step).
        enforce_baseline: always take the plain step (no ``S`` needed), for ablations.

    Returns:
        A `GradientTransformation` whose state is `ScaleByTrueGradAdamState` (``params`` not
        needed); ``update`` takes the extra argument ``sum_grad_squared``.

    Raises:
        TypeError: a hyperparameter is not a number or a 0-d tensor; ``update`` without
            ``sum_grad_squared`` when it is required.
        ValueError: a beta outside [0, 1), a negative ``eps``, an unknown ``fallback``; in
            ``update``, ``sum_grad_squared`` of another structure or shape than the updates, or
            ``None`` at a leaf with an update (``fallback="raise"``).

    References:
        truegrad 5.0.0 ``TGAdamW`` by L. Nestler (no paper); Dangel, Kunstner and Hennig, "BackPACK:
        Packing more into Backprop", ICLR 2020, arXiv:1912.10985 (the ``SumGradSquared`` quantity).
        Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980.
        docs/second-moments.md, docs/migration/truegrad.md.

    Example:
        >>> tx = gx.scale_by_truegrad_adam(graft=False)
        >>> g, s = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.25, 16.0])}
        >>> u, _ = tx.update(g, tx.init(g), sum_grad_squared=s)
        >>> u["w"]  # step 1: g / sqrt(S)
        tensor([ 2.0000, -0.5000])
    """
    _check_beta("b1 (betas[0])", b1)
    _check_beta("b2 (betas[1])", b2)
    _check_beta("b3 (betas[2])", b3)
    _check_common(eps, fallback)
    keep_nu = bool(graft) or fallback == "adam" or bool(enforce_baseline)
    keep_s = not enforce_baseline
    who = "scale_by_truegrad_adam"

    def init(params: Params) -> ScaleByTrueGradAdamState:
        return ScaleByTrueGradAdamState(_leaf_counts(params), _tree.tree_zeros_like(params),
                                        _zeros_or_none(params, keep_nu), _zeros_or_none(params, keep_s))

    def impl(updates: Updates, state: ScaleByTrueGradAdamState, sgs: Any, own: Ownership) -> tuple[Updates, ScaleByTrueGradAdamState]:
        expect_state(state, ScaleByTrueGradAdamState, who)
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        tg_pos, s_in, base_pos = _read_sgs(flat, sgs, fallback, who, enforce_baseline)
        beta1, beta2, beta3, e = [_tree.as_scalar(x) for x in (b1, b2, b3, eps)]
        inplace = own.state
        counts = _step_counts(flat, state.count, inplace)
        g = flat.live
        mu = _ema(flat.state_live(state.mu, "state.mu"), g, beta1, inplace)
        nu = _ema_sq(flat.state_live(state.nu, "state.nu"), g, beta2, inplace) if keep_nu else None
        s_all = None
        u_tg: list[torch.Tensor] = []
        if keep_s:
            s_all, s_new = _ema_at(flat.state_live(state.s, "state.s"), tg_pos, s_in, beta3, inplace)
            if tg_pos:
                c_tg = _pick(counts, tg_pos)
                u_tg = _quotient(_pick(mu, tg_pos), _root_floor(s_new, c_tg, beta3, e))
        out = _assemble(len(g), tg_pos, u_tg, base_pos, graft, e, lambda pos: _quotient(
            _pick(mu, pos), _root_floor(_pick(nu, pos), _pick(counts, pos), beta2, e)))
        _div_each_(out, _corrections(counts, beta1))
        new_state = ScaleByTrueGradAdamState(
            flat.rebuild(counts, like=state.count),
            flat.rebuild(mu, like=state.mu),
            flat.rebuild(nu, like=state.nu) if keep_nu else None,
            flat.rebuild(s_all, like=state.s) if keep_s else None,
        )
        return flat.rebuild(out), new_state

    required = fallback == "raise" and not enforce_baseline
    return _make_transform(init, impl, required, who)


# --- TrueGrad-LaProp ------------------------------------------------------------------------------


class ScaleByTrueGradLaPropState(NamedTuple):
    """``count``: per-leaf steps; ``mu``: EMA (b3) of the TrueGrad-normalised gradient; ``s``: EMA
    (b4) of ``S``; ``mu_base``: EMA (b1) of the RMS-normalised gradient and ``nu``: EMA (b2) of
    ``g^2`` (both ``None`` unless grafting, ``fallback="adam"`` or ``enforce_baseline``)."""

    count: Any
    mu: Any
    s: Any
    mu_base: Any
    nu: Any


@recorded
def scale_by_truegrad_laprop(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.99,
    b3: float | torch.Tensor | None = None,
    b4: float | torch.Tensor | None = None,
    eps: float | torch.Tensor = 1e-12,
    graft: bool = True,
    fallback: str = "raise",
    enforce_baseline: bool = False,
) -> GradientTransformation:
    """TrueGrad-LaProp (truegrad 5.0.0 ``TGLaProp``) on LaProp (Ziyin et al., 2020, arXiv 2002.04839).

    LaProp normalises the gradient *before* the momentum. Per leaf, ``b3`` defaults to ``b1`` and
    ``b4`` to ``b2`` (the reference's two-beta form)::

        s_t  = b4 s + (1-b4) S
        m_t  = b3 m + (1-b3) g / max(sqrt(s_t / (1-b4^t)), eps)         (TrueGrad momentum)
        v_t  = b2 v + (1-b2) g^2                                         (base, when kept)
        mb_t = b1 mb + (1-b1) g / max(sqrt(v_t / (1-b2^t)), eps)        (LaProp momentum)
        u    = m_t * ||mb_t||_F / (||m_t||_F + eps) / (1-b1^t)         (graft)
        u    = m_t / (1-b3^t)                                            (no graft)
        u    = mb_t / (1-b1^t)       (enforce_baseline, or S is None with fallback="adam")

    The base moments are kept when grafting, with ``fallback="adam"`` or ``enforce_baseline``.
    Extra argument ``sum_grad_squared`` as in `scale_by_truegrad_adam`.

    Args:
        b1: the decay of the LaProp momentum ``mb``, in [0, 1).
        b2: the decay of the plain second moment ``v``, in [0, 1).
        b3: the decay of the TrueGrad momentum ``m`` (default ``b1``), in [0, 1).
        b4: the decay of the TrueGrad moment ``s`` (default ``b2``), in [0, 1).
        eps: the floor on the root (``max(sqrt(.), eps)``) and the graft's guard.
        graft: keep, per leaf, the TrueGrad direction with the norm of the plain step.
        fallback: at a leaf whose ``S`` is ``None``: ``"raise"`` or ``"adam"`` (the plain step).
        enforce_baseline: always take the plain step (no ``S`` needed), for ablations.

    Returns:
        A `GradientTransformation` whose state is `ScaleByTrueGradLaPropState` (``params`` not
        needed); ``update`` takes the extra argument ``sum_grad_squared``.

    Raises:
        TypeError: a hyperparameter is not a number or a 0-d tensor; ``update`` without
            ``sum_grad_squared`` when it is required.
        ValueError: a beta outside [0, 1), a negative ``eps``, an unknown ``fallback``; in
            ``update``, ``sum_grad_squared`` of another structure or shape than the updates, or
            ``None`` at a leaf with an update (``fallback="raise"``).

    References:
        truegrad 5.0.0 ``TGLaProp`` by L. Nestler (no paper); Dangel, Kunstner and Hennig, "BackPACK:
        Packing more into Backprop", ICLR 2020, arXiv:1912.10985 (the ``SumGradSquared`` quantity).
        Ziyin, Wang and Ueda, "LaProp: Separating Momentum and Adaptivity in Adam",
        arXiv:2002.04839, 2020, Algorithm 1. docs/second-moments.md, docs/migration/truegrad.md.

    Example:
        >>> tx = gx.scale_by_truegrad_laprop(graft=False)
        >>> g, s = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.25, 16.0])}
        >>> u, _ = tx.update(g, tx.init(g), sum_grad_squared=s)
        >>> u["w"]  # step 1: g / sqrt(S)
        tensor([ 2.0000, -0.5000])
    """
    b3 = b1 if b3 is None else b3
    b4 = b2 if b4 is None else b4
    for name, v in (("b1 (betas[0])", b1), ("b2 (betas[1])", b2), ("b3 (betas[2])", b3), ("b4 (betas[3])", b4)):
        _check_beta(name, v)
    _check_common(eps, fallback)
    keep_base = bool(graft) or fallback == "adam" or bool(enforce_baseline)
    keep_tg = not enforce_baseline
    who = "scale_by_truegrad_laprop"

    def init(params: Params) -> ScaleByTrueGradLaPropState:
        return ScaleByTrueGradLaPropState(
            _leaf_counts(params), _zeros_or_none(params, keep_tg), _zeros_or_none(params, keep_tg),
            _zeros_or_none(params, keep_base), _zeros_or_none(params, keep_base))

    def impl(updates: Updates, state: ScaleByTrueGradLaPropState, sgs: Any, own: Ownership) -> tuple[Updates, ScaleByTrueGradLaPropState]:
        expect_state(state, ScaleByTrueGradLaPropState, who)
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        tg_pos, s_in, base_pos = _read_sgs(flat, sgs, fallback, who, enforce_baseline)
        beta1, beta2, beta3, beta4, e = [_tree.as_scalar(x) for x in (b1, b2, b3, b4, eps)]
        inplace = own.state
        counts = _step_counts(flat, state.count, inplace)
        g = flat.live
        out: list[Any] = [None] * len(g)
        mu_all = s_all = mb = nu = None
        m_tg: list[torch.Tensor] = []
        if keep_tg:
            s_all, s_new = _ema_at(flat.state_live(state.s, "state.s"), tg_pos, s_in, beta4, inplace)
            normed: list[torch.Tensor] = []
            if tg_pos:
                normed = _quotient(_pick(g, tg_pos), _root_floor(s_new, _pick(counts, tg_pos), beta4, e))
            mu_all, m_tg = _ema_at(flat.state_live(state.mu, "state.mu"), tg_pos, normed, beta3, inplace)
        if keep_base:
            nu = _ema_sq(flat.state_live(state.nu, "state.nu"), g, beta2, inplace)
            normed_b = _quotient(g, _root_floor(nu, counts, beta2, e))
            mb = _ema(flat.state_live(state.mu_base, "state.mu_base"), normed_b, beta1, inplace)
        # outputs are fresh tensors (the momenta are state and must not be aliased)
        if tg_pos:
            u_tg = list(_fe.mul(m_tg, 1.0))
            if graft:
                _graft_(u_tg, _pick(mb, tg_pos), e)
            _div_each_(u_tg, _corrections(_pick(counts, tg_pos), beta1 if graft else beta3))
            out = _tree.scatter(out, tg_pos, u_tg)
        if base_pos:
            u_b = list(_fe.mul(_pick(mb, base_pos), 1.0))
            _div_each_(u_b, _corrections(_pick(counts, base_pos), beta1))
            out = _tree.scatter(out, base_pos, u_b)
        new_state = ScaleByTrueGradLaPropState(
            flat.rebuild(counts, like=state.count),
            flat.rebuild(mu_all, like=state.mu) if keep_tg else None,
            flat.rebuild(s_all, like=state.s) if keep_tg else None,
            flat.rebuild(mb, like=state.mu_base) if keep_base else None,
            flat.rebuild(nu, like=state.nu) if keep_base else None,
        )
        return flat.rebuild(out), new_state

    required = fallback == "raise" and not enforce_baseline
    return _make_transform(init, impl, required, who)


# --- TrueGrad-RMSProp -----------------------------------------------------------------------------


class ScaleByTrueGradRmsPropState(NamedTuple):
    """``count``: per-leaf steps; ``s``: EMA (b2) of ``S``; ``nu``: EMA (b1) of ``g^2`` (``None``
    unless grafting, ``fallback="adam"`` or ``enforce_baseline``)."""

    count: Any
    s: Any
    nu: Any


@recorded
def scale_by_truegrad_rmsprop(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor | None = None,
    eps: float | torch.Tensor = 1e-12,
    graft: bool = True,
    fallback: str = "raise",
    enforce_baseline: bool = False,
) -> GradientTransformation:
    """TrueGrad-RMSProp (truegrad 5.0.0 ``TGRMSProp``) on a *debiased* RMSProp (Tieleman & Hinton,
    2012, Coursera lecture 6.5): the second moment is bias-corrected, so step 1 is ``g / |g|``.

    ``b1`` is the decay of the plain ``g^2`` moment and ``b2`` that of ``S`` (the reference's
    ``betas`` order); ``b2`` defaults to ``b1`` (the reference's one-beta form). Per leaf::

        s_t  = b2 s + (1-b2) S
        v_t  = b1 v + (1-b1) g^2                                   (base, when kept)
        u_tg = g / max(sqrt(s_t / (1-b2^t)), eps)
        u_b  = g / max(sqrt(v_t / (1-b1^t)), eps)
        u    = u_tg * ||u_b||_F / (||u_tg||_F + eps)   (graft);   u = u_tg   (no graft)
        u    = u_b      (enforce_baseline, or S is None with fallback="adam")

    Extra argument ``sum_grad_squared`` as in `scale_by_truegrad_adam`.

    Args:
        b1: the decay of the plain second moment ``v``, in [0, 1).
        b2: the decay of the TrueGrad moment ``s`` (default ``b1``), in [0, 1).
        eps: the floor on the root (``max(sqrt(.), eps)``) and the graft's guard.
        graft: keep, per leaf, the TrueGrad direction with the norm of the plain step.
        fallback: at a leaf whose ``S`` is ``None``: ``"raise"`` or ``"adam"`` (the plain step).
        enforce_baseline: always take the plain step (no ``S`` needed), for ablations.

    Returns:
        A `GradientTransformation` whose state is `ScaleByTrueGradRmsPropState` (``params`` not
        needed); ``update`` takes the extra argument ``sum_grad_squared``.

    Raises:
        TypeError: a hyperparameter is not a number or a 0-d tensor; ``update`` without
            ``sum_grad_squared`` when it is required.
        ValueError: a beta outside [0, 1), a negative ``eps``, an unknown ``fallback``; in
            ``update``, ``sum_grad_squared`` of another structure or shape than the updates, or
            ``None`` at a leaf with an update (``fallback="raise"``).

    References:
        truegrad 5.0.0 ``TGRMSProp`` by L. Nestler (no paper); Dangel, Kunstner and Hennig, "BackPACK:
        Packing more into Backprop", ICLR 2020, arXiv:1912.10985 (the ``SumGradSquared`` quantity).
        Tieleman and Hinton, Lecture 6.5 of "Neural Networks for Machine Learning" (Coursera,
        2012). docs/second-moments.md, docs/migration/truegrad.md.

    Example:
        >>> tx = gx.scale_by_truegrad_rmsprop(graft=False)
        >>> g, s = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.25, 16.0])}
        >>> u, _ = tx.update(g, tx.init(g), sum_grad_squared=s)
        >>> u["w"]  # step 1: g / sqrt(S)
        tensor([ 2.0000, -0.5000])
    """
    b2 = b1 if b2 is None else b2
    _check_beta("b1 (betas[0])", b1)
    _check_beta("b2 (betas[1])", b2)
    _check_common(eps, fallback)
    keep_nu = bool(graft) or fallback == "adam" or bool(enforce_baseline)
    keep_s = not enforce_baseline
    who = "scale_by_truegrad_rmsprop"

    def init(params: Params) -> ScaleByTrueGradRmsPropState:
        return ScaleByTrueGradRmsPropState(_leaf_counts(params), _zeros_or_none(params, keep_s),
                                           _zeros_or_none(params, keep_nu))

    def impl(updates: Updates, state: ScaleByTrueGradRmsPropState, sgs: Any, own: Ownership) -> tuple[Updates, ScaleByTrueGradRmsPropState]:
        expect_state(state, ScaleByTrueGradRmsPropState, who)
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        tg_pos, s_in, base_pos = _read_sgs(flat, sgs, fallback, who, enforce_baseline)
        beta1, beta2, e = [_tree.as_scalar(x) for x in (b1, b2, eps)]
        inplace = own.state
        counts = _step_counts(flat, state.count, inplace)
        g = flat.live
        s_all = nu = None
        u_tg: list[torch.Tensor] = []
        if keep_s:
            s_all, s_new = _ema_at(flat.state_live(state.s, "state.s"), tg_pos, s_in, beta2, inplace)
            if tg_pos:
                u_tg = _quotient(_pick(g, tg_pos), _root_floor(s_new, _pick(counts, tg_pos), beta2, e))
        if keep_nu:
            nu = _ema_sq(flat.state_live(state.nu, "state.nu"), g, beta1, inplace)
        out = _assemble(len(g), tg_pos, u_tg, base_pos, graft, e, lambda pos: _quotient(
            _pick(g, pos), _root_floor(_pick(nu, pos), _pick(counts, pos), beta1, e)))
        new_state = ScaleByTrueGradRmsPropState(
            flat.rebuild(counts, like=state.count),
            flat.rebuild(s_all, like=state.s) if keep_s else None,
            flat.rebuild(nu, like=state.nu) if keep_nu else None,
        )
        return flat.rebuild(out), new_state

    required = fallback == "raise" and not enforce_baseline
    return _make_transform(init, impl, required, who)


_tree.register_state_types(ScaleByTrueGradAdamState, ScaleByTrueGradLaPropState, ScaleByTrueGradRmsPropState)
