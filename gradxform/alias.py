"""Named optimisers with torch.optim's defaults, names and semantics.

Each alias is a chain of generic blocks wrapped in `gradxform.combine.inject_hyperparams`,
so its numeric hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``,
``dampening``) live in the state as tensors. That is what lets `gradxform.Optimizer` expose
a live ``group["lr"]`` to ``torch.optim.lr_scheduler`` and ``torch.compile`` take a new value
without recompiling. Any of them may also be a schedule ``count -> value``.

Which blocks the chain contains is fixed at construction: momentum and weight decay that start
at 0 are left out (as torch.optim skips them, and so that SGD without momentum keeps no buffer).
Turning them on later by writing the state has no effect. `gradxform.Optimizer` handles
the common case for you: a param group that sets ``weight_decay`` or ``momentum`` (e.g. the
decay / no-decay split) gets its own copy of the alias rebuilt with that value.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import GradientTransformation, chain, recorded
from .combine import inject_hyperparams
from .fastpath import AdamKernel, SGDKernel, declare_kernel
from .moments import (
    scale_by_truegrad_adam,
    scale_by_truegrad_laprop,
    scale_by_truegrad_rmsprop,
)
from .transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    check_float,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = ["adam", "adamw", "sgd", "tg_adamw", "tg_laprop", "tg_rmsprop"]

def _scalar_lr(lr: Any) -> Any:
    """A one-element tensor learning rate of any shape (torch.optim takes ``()`` and ``(1,)``) as
    a 0-d tensor."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.ndim > 0:
        return lr.reshape(())
    return lr


def _nonzero(x: Any) -> bool:
    if not isinstance(x, torch.Tensor) and callable(x):
        return True
    if isinstance(x, torch.Tensor):
        return bool((x != 0).any())
    return x != 0


def _sgd(lr: Any, momentum: Any, dampening: Any, weight_decay: Any, nesterov: bool, maximize: bool,
         use_momentum: bool, use_weight_decay: bool) -> GradientTransformation:
    parts = []
    if maximize:
        parts.append(scale(-1.0))
    if use_weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if use_momentum:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


@recorded
def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: ScalarOrSchedule = 0.0,
    dampening: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD``.

    ``g <- -g`` if maximize; ``g <- g + wd * p``; ``b_1 = g_1``,
    ``b_t = momentum * b_{t-1} + (1 - dampening) * g_t``; ``g <- g + momentum * b_t`` (nesterov) or
    ``g <- b_t``; ``p <- p - lr * g``. Built as ``chain(add_decayed_weights, trace,
    scale_by_learning_rate)`` inside ``inject_hyperparams``.

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule of the step count).
        momentum: momentum factor; 0 keeps no buffer.
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximise the objective instead.

    Returns:
        A `GradientTransformation`; its ``update(updates, state, params)`` needs ``params``
        when ``weight_decay > 0``. The hyperparameters are live in ``state.hyperparams``.

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule.
        ValueError: a hyperparameter is out of range (a negative ``lr``, ``weight_decay`` or
            ``momentum``, NaN); ``nesterov`` without momentum or with dampening.

    References:
        Sutskever, Martens, Dahl and Hinton, "On the importance of initialization and momentum in
        deep learning", ICML 2013 (momentum). docs/migration/torch-optim.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.sgd(0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> gx.apply_updates(params, updates)["w"]
        tensor([0.9000, 0.9000])
    """
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    check_float("momentum", momentum, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    if nesterov and (not _nonzero(momentum) or _nonzero(dampening)):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    tx = inject_hyperparams(_sgd, static_args=("nesterov", "maximize", "use_momentum", "use_weight_decay"))(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, use_momentum=_nonzero(momentum), use_weight_decay=_nonzero(weight_decay),
    )
    declare_kernel(tx, SGDKernel(bool(nesterov), bool(maximize)),
                   {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay})
    return tx


def _adam(lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: bool, maximize: bool,
          decoupled: bool, use_weight_decay: bool) -> GradientTransformation:
    b1, b2 = betas
    parts = []
    if maximize:
        parts.append(scale(-1.0))
    if use_weight_decay and not decoupled:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_adam(b1, b2, eps, amsgrad=amsgrad))
    if use_weight_decay and decoupled:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def _check_betas(betas: Any) -> None:
    if callable(betas) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    check_float("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_float("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)


def _adam_family(decoupled: bool, lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: bool,
                 maximize: bool) -> GradientTransformation:
    lr = _scalar_lr(lr)
    check_float("lr", lr, low=0.0)
    _check_betas(betas)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad, "maximize": maximize}
    tx = inject_hyperparams(_adam, static_args=("amsgrad", "maximize", "decoupled", "use_weight_decay"))(
        **kwargs, decoupled=decoupled, use_weight_decay=_nonzero(weight_decay))
    declare_kernel(tx, AdamKernel(decoupled, bool(amsgrad), bool(maximize)),
                   {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
    return tx


@recorded
def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """Adam, as ``torch.optim.Adam``.

    L2 weight decay is added to the gradient *before* the moments: ``g <- g + wd * p``; then
    `gradxform.scale_by_adam` (``m_t = b1 m + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2``,
    ``u = m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)``) and ``p <- p - lr * u``.

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule of the step count).
        betas: ``(b1, b2)``, the decays of the first and second moments.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (not decoupled: see `adamw`).
        amsgrad: keep the running maximum of ``v`` (AMSGrad).
        maximize: maximise the objective instead.

    Returns:
        A `GradientTransformation`; its ``update(updates, state, params)`` needs ``params``
        when ``weight_decay > 0``. The hyperparameters are live in ``state.hyperparams``.

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule.
        ValueError: a hyperparameter is out of range (a negative ``lr``, ``weight_decay`` or
            ``momentum``, NaN); a beta outside [0, 1).

    References:
        Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980,
        Algorithm 1. AMSGrad: Reddi, Kale and Kumar, ICLR 2018, arXiv:1904.09237.
        docs/migration/torch-optim.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.adam(0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0, -2.0])}, state, params)
        >>> gx.apply_updates(params, updates)["w"]
        tensor([0.9000, 1.1000])
    """
    return _adam_family(False, lr, betas, eps, weight_decay, amsgrad, maximize)


@recorded
def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """AdamW, as ``torch.optim.AdamW``: ``update`` needs ``params`` (the decay reads them).

    Decoupled decay, multiplied by the learning rate: ``p <- p - lr * (u_adam + wd * p)`` with the
    params *before* the step, i.e. ``chain(scale_by_adam, add_decayed_weights(wd),
    scale_by_learning_rate(lr))``.

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule of the step count).
        betas: ``(b1, b2)``, the decays of the first and second moments.
        eps: added to the denominator.
        weight_decay: decoupled decay rate (torch's default 1e-2).
        amsgrad: keep the running maximum of ``v`` (AMSGrad).
        maximize: maximise the objective instead.

    Returns:
        A `GradientTransformation`. Its ``update(updates, state, params)`` needs ``params``
        whenever ``weight_decay > 0`` (the default): ``tx.update(grads, state)`` without them
        raises. The hyperparameters are live in ``state.hyperparams``.

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule.
        ValueError: a hyperparameter is out of range (a negative ``lr``, ``weight_decay`` or
            ``momentum``, NaN); a beta outside [0, 1).

    References:
        Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
        arXiv:1711.05101, Algorithm 2. docs/migration/torch-optim.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.adamw(0.1, weight_decay=0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0, -2.0])}, state, params)
        >>> gx.apply_updates(params, updates)["w"]
        tensor([0.8500, 1.0500])
    """
    return _adam_family(True, lr, betas, eps, weight_decay, amsgrad, maximize)


# --- TrueGrad (truegrad 5.0.0, L. Nestler) -------------------------------------------------------


def _tg_betas(betas: Any, sizes: tuple[int, ...], who: str) -> tuple[Any, ...]:
    if callable(betas) or isinstance(betas, torch.Tensor) or not hasattr(betas, "__len__") or len(betas) not in sizes:
        raise ValueError(f"{who}: betas must be a tuple of {' or '.join(map(str, sizes))} numbers; got {betas!r}")
    for i, b in enumerate(betas):
        check_float(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
    return tuple(betas)


def _tg_chain(moments: GradientTransformation, lr: Any, weight_decay: Any, use_weight_decay: bool) -> GradientTransformation:
    parts = [moments]
    if use_weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def _tg_adamw(lr: Any, betas: Any, eps: Any, weight_decay: Any, graft: bool, fallback: str,
              use_weight_decay: bool) -> GradientTransformation:
    b1, b2, b3 = betas
    return _tg_chain(scale_by_truegrad_adam(b1, b2, b3, eps, graft=graft, fallback=fallback), lr, weight_decay,
                     use_weight_decay)


def _tg_laprop(lr: Any, betas: Any, eps: Any, weight_decay: Any, graft: bool, fallback: str,
               use_weight_decay: bool) -> GradientTransformation:
    b1, b2, b3, b4 = betas
    return _tg_chain(scale_by_truegrad_laprop(b1, b2, b3, b4, eps, graft=graft, fallback=fallback), lr,
                     weight_decay, use_weight_decay)


def _tg_rmsprop(lr: Any, betas: Any, eps: Any, weight_decay: Any, graft: bool, fallback: str,
                use_weight_decay: bool) -> GradientTransformation:
    b1, b2 = betas
    return _tg_chain(scale_by_truegrad_rmsprop(b1, b2, eps, graft=graft, fallback=fallback), lr, weight_decay,
                     use_weight_decay)


def _tg_family(builder: Any, lr: Any, betas: tuple[Any, ...], eps: Any, weight_decay: Any, graft: bool,
               fallback: str) -> GradientTransformation:
    check_float("lr", lr, low=0.0)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    if fallback not in ("raise", "adam"):
        raise ValueError(f"fallback must be 'raise' or 'adam'; got {fallback!r}")
    tx = inject_hyperparams(builder, static_args=("graft", "fallback", "use_weight_decay"))(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, graft=bool(graft), fallback=fallback,
        use_weight_decay=_nonzero(weight_decay))
    return tx


@recorded
def tg_adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, ...] = (0.9, 0.999, 0.999),
    eps: float = 1e-12,
    weight_decay: ScalarOrSchedule = 1e-2,
    graft: bool = True,
    fallback: str = "raise",
) -> GradientTransformation:
    """TrueGrad-AdamW: AdamW whose second moment is that of the per-example gradients.

    ``p <- p - lr * u_tg - lr * wd * p`` with ``u_tg`` from `gradxform.scale_by_truegrad_adam`
    (betas ``(b1, b2, b3)``; with two betas ``b3 = b2``) and the decay using the params *before*
    the step, once per step (the reference decays once per parameter per step,
    docs/migration/truegrad.md): ``chain(scale_by_truegrad_adam, add_decayed_weights(wd),
    scale_by_learning_rate(lr))``
    inside ``inject_hyperparams``, so ``group["lr"]`` is live in `gradxform.Optimizer`.
    Through the adapter: ``opt.step(sum_grad_squared=stats.sum_grad_squared)`` with a
    `gradxform.PerParam` from `gradxform.track_sum_grad_squared` (or a list, one entry per
    param, for a single param group).

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule of the step count).
        betas: ``(b1, b2)`` or ``(b1, b2, b3)``: the first moment, ``g^2`` and ``S``.
        eps: added to the denominator.
        weight_decay: decoupled decay rate.
        graft: keep, per tensor, the direction of the TrueGrad step with the Frobenius norm of the
            plain (Adam-type) step, as truegrad.
        fallback: at a leaf whose ``S`` is ``None`` (a layer the statistics engine does not
            cover): ``"raise"`` (default) raises, ``"adam"`` takes the plain direction there.

    Returns:
        A `GradientTransformation` whose ``update(updates, state, params, sum_grad_squared=S)``
        needs ``params`` (decay) and the extra argument ``sum_grad_squared`` (a tree like the
        params, from `gradxform.grad_and_sum_grad_squared`).

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule; ``update``
            without ``sum_grad_squared``.
        ValueError: a hyperparameter is out of range, a wrong number of betas, an unknown
            ``fallback``; in ``update``, a leaf whose ``S`` is ``None`` (``fallback="raise"``).

    References:
        truegrad 5.0.0 ``TGAdamW`` by L. Nestler (no paper); docs/second-moments.md,
        docs/migration/truegrad.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.tg_adamw(0.1)
        >>> state = tx.init(params)
        >>> g, s = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 2.0])}
        >>> updates, state = tx.update(g, state, params, sum_grad_squared=s)
    """
    full = _tg_betas(betas, (2, 3), "tg_adamw")
    if len(full) == 2:
        full = (full[0], full[1], full[1])
    return _tg_family(_tg_adamw, lr, full, eps, weight_decay, graft, fallback)


@recorded
def tg_laprop(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, ...] = (0.9, 0.99),
    eps: float = 1e-12,
    weight_decay: ScalarOrSchedule = 1e-2,
    graft: bool = True,
    fallback: str = "raise",
) -> GradientTransformation:
    """TrueGrad-LaProp: LaProp whose second moment is that of the per-example gradients.

    ``p <- p - lr * u - lr * wd * p`` with ``u`` from `gradxform.scale_by_truegrad_laprop`;
    betas ``(b1, b2)`` (then ``b3 = b1``, ``b4 = b2``) or ``(b1, b2, b3, b4)``. Decoupled decay
    with the params before the step, once per step.

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule of the step count).
        betas: ``(b1, b2)`` or ``(b1, b2, b3, b4)``.
        eps: added to the denominator.
        weight_decay: decoupled decay rate.
        graft: keep, per tensor, the direction of the TrueGrad step with the Frobenius norm of the
            plain (Adam-type) step, as truegrad.
        fallback: at a leaf whose ``S`` is ``None`` (a layer the statistics engine does not
            cover): ``"raise"`` (default) raises, ``"adam"`` takes the plain direction there.

    Returns:
        A `GradientTransformation` whose ``update(updates, state, params, sum_grad_squared=S)``
        needs ``params`` (decay) and the extra argument ``sum_grad_squared`` (a tree like the
        params, from `gradxform.grad_and_sum_grad_squared`).

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule; ``update``
            without ``sum_grad_squared``.
        ValueError: a hyperparameter is out of range, a wrong number of betas, an unknown
            ``fallback``; in ``update``, a leaf whose ``S`` is ``None`` (``fallback="raise"``).

    References:
        truegrad 5.0.0 ``TGLaProp`` (no paper); LaProp: Ziyin, Wang and Ueda, arXiv:2002.04839.
        docs/second-moments.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.tg_laprop(0.1)
        >>> state = tx.init(params)
        >>> g, s = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 2.0])}
        >>> updates, state = tx.update(g, state, params, sum_grad_squared=s)
    """
    full = _tg_betas(betas, (2, 4), "tg_laprop")
    if len(full) == 2:
        full = (full[0], full[1], full[0], full[1])
    return _tg_family(_tg_laprop, lr, full, eps, weight_decay, graft, fallback)


@recorded
def tg_rmsprop(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, ...] = (0.9,),
    eps: float = 1e-12,
    weight_decay: ScalarOrSchedule = 1e-2,
    graft: bool = True,
    fallback: str = "raise",
) -> GradientTransformation:
    """TrueGrad-RMSProp: debiased RMSProp on the per-example second moment.

    ``p <- p - lr * u - lr * wd * p`` with ``u`` from `gradxform.scale_by_truegrad_rmsprop`;
    betas ``(b,)`` (one decay for both moments) or ``(b1, b2)`` (``g^2``, then ``S``). Decoupled
    decay with the params before the step, once per step.

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule of the step count).
        betas: ``(b,)`` or ``(b1, b2)``.
        eps: added to the denominator.
        weight_decay: decoupled decay rate.
        graft: keep, per tensor, the direction of the TrueGrad step with the Frobenius norm of the
            plain (Adam-type) step, as truegrad.
        fallback: at a leaf whose ``S`` is ``None`` (a layer the statistics engine does not
            cover): ``"raise"`` (default) raises, ``"adam"`` takes the plain direction there.

    Returns:
        A `GradientTransformation` whose ``update(updates, state, params, sum_grad_squared=S)``
        needs ``params`` (decay) and the extra argument ``sum_grad_squared`` (a tree like the
        params, from `gradxform.grad_and_sum_grad_squared`).

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule; ``update``
            without ``sum_grad_squared``.
        ValueError: a hyperparameter is out of range, a wrong number of betas, an unknown
            ``fallback``; in ``update``, a leaf whose ``S`` is ``None`` (``fallback="raise"``).

    References:
        truegrad 5.0.0 ``TGRMSProp`` (no paper); RMSProp: Tieleman and Hinton, Coursera
        lecture 6.5, 2012. docs/second-moments.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.tg_rmsprop(0.1)
        >>> state = tx.init(params)
        >>> g, s = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 2.0])}
        >>> updates, state = tx.update(g, state, params, sum_grad_squared=s)
    """
    if isinstance(betas, (int, float)) and not isinstance(betas, bool):
        betas = (betas,)
    full = _tg_betas(betas, (1, 2), "tg_rmsprop")
    if len(full) == 1:
        full = (full[0], full[0])
    return _tg_family(_tg_rmsprop, lr, full, eps, weight_decay, graft, fallback)
