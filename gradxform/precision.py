"""Mixed precision: low-precision params, optimizer state in float32.

Training in bfloat16 or float16 keeps the params (and gradients) in 2 bytes, but an optimizer
whose moments live in the same dtype loses them: float16's squared gradients underflow below
``6e-8`` (Adam's ``v`` becomes 0 and the step ``m / (sqrt(v) + eps)`` is infinite, ``eps = 1e-8``
being 0 in float16 too), and bfloat16's
8-bit mantissa rounds ``b2 * v + (1 - b2) g^2`` back to ``v`` once ``g^2 < v / 256``.
`upcast` runs any transform in a wider dtype and hands back updates in each param's dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from . import tree as _tree
from .base import GradientTransformation, Params, Updates, recorded
from .combine import _forwarding

__all__ = ["upcast"]


def _up(tree: Any, dtype: torch.dtype) -> Any:
    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    return _tree.tree_map(cast, tree)


@recorded
def upcast(inner: GradientTransformation, dtype: torch.dtype = torch.float32) -> GradientTransformation:
    """Run ``inner`` in ``dtype`` (float32 by default) whatever the params' dtype.

    ``init`` builds ``inner``'s state from the params cast to ``dtype``, so every moment and
    buffer is kept in ``dtype``; ``update`` casts the incoming updates, the params and any
    floating-point extra argument (``sum_grad_squared``, ``losses``, ...) to ``dtype``, runs
    ``inner`` there, and casts each output update back to its input leaf's dtype::

        u_t, s_t = inner.update(cast(g_t), s_{t-1}, cast(p_t));   return u_t.to(g_t.dtype), s_t

    Leaves already in ``dtype`` (or wider ones, which are cast down) and non-float leaves pass as
    they are; ``None`` leaves stay ``None``. The state is ``inner``'s own state (no wrapper), so a
    checkpoint of ``upcast(tx)`` is one of ``tx`` run in float32, and ``gx.Optimizer`` still
    finds its injected learning rate. This is the "float32 optimizer state" half of mixed
    precision (as torch.optim keeps its state in the param dtype, this is an option, not the
    default); the params themselves stay in their low dtype, so an update smaller than half a
    unit in the last place of a param is rounded away when it is added (keep float32 master
    weights, e.g. ``torch.autocast`` over float32 params, when that matters).

    Args:
        inner: the transform to run in ``dtype``.
        dtype: a floating dtype (float32 by default).

    Returns:
        A `GradientTransformation` with ``inner``'s state and extra arguments; its ``update``
        needs ``params`` when ``inner``'s does.

    Raises:
        ValueError: ``dtype`` is not a floating dtype.

    References:
        docs/mixed-precision.md.

    Example:
        >>> params = {"w": torch.ones(2, dtype=torch.bfloat16)}
        >>> tx = gx.upcast(gx.adam(0.1))
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2, dtype=torch.bfloat16)}, state, params)
        >>> updates["w"].dtype, state.inner_state[0].mu["w"].dtype
        (torch.bfloat16, torch.float32)
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"upcast: dtype must be a floating torch.dtype; got {dtype!r}")

    def init(params: Params) -> Any:
        return inner.init(_up(params, dtype))

    def update(updates: Updates, state: Any, params: Params | None = None, **extra: Any) -> tuple[Updates, Any]:
        wide = {k: _up(v, dtype) for k, v in extra.items()}
        out, state = inner.update(_up(updates, dtype), state, None if params is None else _up(params, dtype), **wide)
        leaves, spec = _tree.tree_flatten(updates)
        out_leaves = _tree.check_structure(spec, out, "upcast inner output", reference=updates)
        back = [o if (o is None or x is None or o.dtype == x.dtype) else o.to(x.dtype)
                for o, x in zip(out_leaves, leaves)]
        return _tree.tree_unflatten(spec, back), state

    return GradientTransformation(init, _forwarding(update, inner))
