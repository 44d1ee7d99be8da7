"""Clippers: gradient clipping rules as pure transforms.

- Constant-level rules: `clip_by_global_norm` (from `gradxform.transforms`, re-exported),
  `clip_by_leaf_norm` (torch-clip's ``layer_wise``), `clip` (coordinate-wise, optax's name),
  `clip_by_block_rms` (optax) and `adaptive_grad_clip` (AGC, Brock et al., 2021).
- `autoclip`: clip at a quantile of the history of gradient norms (Seetharaman et al., 2020),
  with a fixed-size ring buffer as history; with ``beta`` it becomes torch-clip's random AutoClip.
- `random_clip_by_global_norm`: torch-clip's random norm clipping, with a seeded, reproducible
  draw per step (a counter hash, docs/clipping.md "Random rules") instead of the global RNG.
- `monitor_norm`: an identity transform that records the gradient norms (last value and a ring
  buffer of recent ones) for logging and plotting.
- `clipped_sgd`: torch-clip's ``ClippedSGD`` as a chain ``clip -> momentum -> -lr``.
- List-level helpers that composite methods (clipped SSTM) reuse: `clip_leaves`,
  `uniform_from_hash`.

Every stateful clipper keeps a `ClipStats` in its state: the number of updates, how many were
clipped, the last global norm and the last clip factor (read ``stats.clipped / stats.count`` for
the clip fraction, or call `clip_fraction`). See docs/clipping.md for the algorithms
and the torch-clip behaviours that are deliberately not reproduced.

Where state lives, the rule of every gradxform transform: a count that advances on every update
(``count``, a ring buffer's position) and a seed are 0-d int64 CPU tensors, as torch.optim keeps
``step`` (schedules and logging read them for free); whatever is computed from the values of the
updates (norms, thresholds, factors, and ``ClipStats.clipped``, which counts a data-dependent
event) stays on the params' device, since bringing it to the CPU would cost a device-to-host copy
every step. ``update`` never reads a device value on the host (no ``.item()``, ``.cpu()``, no
Python branch on a device tensor) and compiles with ``torch.compile(fullgraph=True)``; eagerly on
CPU it may branch on a CPU value (a memory read). Under `gradxform.apply_if_finite` on an
accelerator the counts too depend on a device value (a step may be skipped), so there they live
on the device.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import name_update as _name_update
from .base import PURE, GradientTransformation, Ownership, Params, Updates, chain, declare, expect_state, owned_transform, recorded, stateless
from .fastpath import ClipFactor
from .combine import inject_hyperparams
from .transforms import (
    ScalarOrSchedule,
    _Flat,
    _mul,
    _zero_count,
    check_float,
    clip_by_global_norm,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "RULES",
    "CLIPPED_SGD_RULES",
    "clip_leaves",
    "uniform_from_hash",
    "ClipStats",
    "clip_fraction",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "AutoClipState",
    "autoclip",
    "RandomClipState",
    "random_clip_by_global_norm",
    "MonitorNormState",
    "monitor_norm",
    "norm_history",
    "clipped_sgd",
]

#: Names of the rules that :func:`clip_leaves` understands.
RULES = ("norm", "layer_wise", "coordinate_wise")


# --- list-level helpers ---------------------------------------------------------------------------


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are computed in: float32 or wider (half-precision norms overflow)."""
    if not dtype.is_floating_point:
        return torch.float32
    return _tree.at_least_float32(dtype)


def _leaf_norms(leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each leaf, in float32 or wider (one foreach kernel per dtype on CUDA)."""
    if all(_wide(g.dtype) == g.dtype for g in leaves):
        return list(_fe.norm(list(leaves)))
    return _tree.reduced_all([torch.linalg.vector_norm(g, dtype=_wide(g.dtype)) for g in leaves])


def _as_level(level: Any, dtype: torch.dtype) -> Any:
    """A level usable against tensors of ``dtype`` on any device *without a host-to-device copy*:
    a Python number stays a number; a tensor is cast (a 0-d CPU tensor then mixes with device
    tensors as a scalar)."""
    if isinstance(level, torch.Tensor):
        return level.to(dtype)
    return float(level)


def _norm_factor(norm: torch.Tensor, level: Any) -> torch.Tensor:
    """``level / max(norm, level)`` = ``min(1, level / norm)``; 1 for a zero norm."""
    lam = _as_level(level, norm.dtype)
    if isinstance(lam, torch.Tensor):
        return lam / torch.maximum(norm, lam)
    return lam / torch.clamp(norm, min=lam)


def _scale_leaves(leaves: list[torch.Tensor], factors: list[torch.Tensor], inplace: bool) -> list[torch.Tensor]:
    """``leaves[j] * factors[j]`` with 0-d factors (cast to each leaf's dtype)."""
    factors = [f if f.dtype == g.dtype else f.to(g.dtype) for f, g in zip(factors, leaves)]
    if inplace:
        _fe.mul_(leaves, factors)
        return leaves
    return list(_fe.mul(leaves, factors))


def _clamp_leaves(leaves: list[torch.Tensor], level: Any, inplace: bool) -> list[torch.Tensor]:
    """Elementwise ``clamp(g, -level, level)``: the exact clamp (docs/clipping.md, torch-clip table, row 10)."""
    if not isinstance(level, torch.Tensor):
        lam = float(level)
        if inplace:
            _fe.clamp_min_(leaves, -lam)
            _fe.clamp_max_(leaves, lam)
            return leaves
        out = _fe.clamp_min(leaves, -lam)
        _fe.clamp_max_(out, lam)
        return list(out)
    out = []
    for g in leaves:
        lam = level.to(g.dtype)
        out.append(torch.clamp(g, -lam, lam))
    return out


def clip_leaves(rule: str, leaves: Sequence[torch.Tensor], level: torch.Tensor | float) -> list[torch.Tensor]:
    """Clip a list of tensors with a named rule at level ``level`` (pure, no host sync).

    - ``"norm"``: ``g * min(1, level / ||g||)`` with the global L2 norm over all leaves;
    - ``"layer_wise"``: each leaf ``g_j * min(1, level / ||g_j||)``;
    - ``"coordinate_wise"``: ``clamp(g, -level, level)`` elementwise (exact clamp).

    ``level`` may be a Python number or a 0-d tensor (e.g. a level that changes every step, as in
    clipped SSTM). A zero gradient passes through unchanged.

    Args:
        rule: ``"norm"``, ``"layer_wise"`` or ``"coordinate_wise"``.
        leaves: the tensors to clip.
        level: the clipping level.

    Returns:
        The clipped tensors (new ones; the inputs are not written).

    Raises:
        ValueError: an unknown ``rule``.

    References:
        torch-clip 0.0.6's ``norm``, ``layer_wise`` and ``coordinate_wise`` rules; Pascanu, Mikolov
        and Bengio, "On the difficulty of training recurrent neural networks", ICML 2013,
        arXiv:1211.5063, Section 3.2. docs/clipping.md.

    Example:
        >>> from gradxform.clipping import clip_leaves
        >>> clip_leaves("norm", [torch.tensor([3.0, 4.0])], 1.0)
        [tensor([0.6000, 0.8000])]
    """
    leaves = list(leaves)
    if rule not in RULES:
        raise ValueError(f"unknown clipping rule {rule!r}; expected one of {RULES}")
    if not leaves:
        return []
    if rule == "norm":
        factor = _norm_factor(_tree.global_norm(leaves), level)
        return list(_fe.mul(leaves, factor))
    if rule == "layer_wise":
        factors = [_norm_factor(n, level) for n in _leaf_norms(leaves)]
        return _scale_leaves(leaves, factors, False)
    return _clamp_leaves(leaves, level, False)


_M32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash on uint32 values held in int64 (docs/clipping.md, "Random rules")."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def uniform_from_hash(seed: torch.Tensor | int, t0: torch.Tensor | int) -> torch.Tensor:
    """A uniform number in [0, 1) from ``(seed, step)``: ``H(H(H(t0) ^ H(seed ^ 0x9E3779B9))) / 2**32``.

    Pure int64 tensor ops: reproducible, no global RNG, no host sync, the same on CPU and GPU.
    ``t0`` is the 0-based step. Returns a float64 0-d tensor (or the broadcast shape).

    Args:
        seed: the seed (an int or an int64 tensor).
        t0: the 0-based step (an int or an int64 tensor).

    Returns:
        A float64 tensor in [0, 1), on ``seed``'s device.

    References:
        The "lowbias32" integer hash (C. Wellons, "Prospecting for Hash Functions", 2018,
        https://nullprogram.com/blog/2018/07/31/). docs/clipping.md, "Random rules".

    Example:
        >>> from gradxform.clipping import uniform_from_hash
        >>> uniform_from_hash(0, 1)
        tensor(0.4042, dtype=torch.float64)
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    t0 = torch.as_tensor(t0, dtype=torch.int64, device=seed.device)
    h = _lowbias32(_lowbias32(_lowbias32(t0) ^ _lowbias32(seed ^ 0x9E3779B9)))
    return h.to(torch.float64) / 2.0**32


# --- statistics kept by the stateful clippers ------------------------------------------------------


class ClipStats(NamedTuple):
    """What a stateful clipper did, readable from its state.

    ``count``: updates seen (0-d int64 on the CPU: it advances on every update); ``clipped``: how
    many of them were clipped (0-d int64 on the params' device: it depends on the norms, and
    keeping it there costs no host sync); ``last_norm``: the global L2 norm of the last incoming
    updates; ``last_factor``: the factor the last updates were multiplied by (1 when not
    clipped), both on the params' device. The clip fraction is ``clipped / count``
    (`clip_fraction`). Under `gradxform.apply_if_finite` on an accelerator ``count`` is on the
    device too.
    """

    count: torch.Tensor
    clipped: torch.Tensor
    last_norm: torch.Tensor
    last_factor: torch.Tensor


def clip_fraction(stats: ClipStats) -> torch.Tensor:
    """The fraction of updates a stateful clipper clipped: ``stats.clipped / max(stats.count, 1)``.

    A float64 0-d tensor (0 before the first update). Reading it (``float(...)``) syncs with the
    device: do it when logging, not every step.

    Args:
        stats: the `ClipStats` of a clipper's state (e.g. ``state.stats`` of `autoclip`).

    Returns:
        The fraction, a float64 0-d tensor on ``stats.clipped``'s device.

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", IEEE MLSP 2020, arXiv:2007.14469 (`autoclip`, whose state keeps
        these statistics). docs/clipping.md.

    Example:
        >>> tx = gx.autoclip(0.5, history=4)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> for g in ([3.0, 4.0], [0.3, 0.4], [6.0, 8.0]):
        ...     _, state = tx.update({"w": torch.tensor(g)}, state)
        >>> gx.clip_fraction(state.stats)  # the third update (norm 10) was clipped
        tensor(0.3333, dtype=torch.float64)
    """
    return stats.clipped.to(torch.float64) / torch.clamp(stats.count.to(torch.float64), min=1.0)


def _home(params: Params) -> tuple[torch.device, torch.dtype]:
    """Device and norm dtype for a clipper's scalar state: the first tensor leaf's device and
    float32-or-wider dtype (CPU float32 without tensor leaves, e.g. ``init([])``)."""
    leaves = [x for x in _tree.tree_flatten(params)[0] if isinstance(x, torch.Tensor)]
    if not leaves:
        return torch.device("cpu"), torch.float32
    first = leaves[0]
    dtype = _wide(first.dtype) if first.is_floating_point() else torch.float32
    return first.device, dtype


def _stats_init(device: torch.device, dtype: torch.dtype) -> ClipStats:
    return ClipStats(
        _zero_count(),
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros((), dtype=dtype, device=device),
        torch.ones((), dtype=dtype, device=device),
    )


def _stats_next(stats: ClipStats, clipped: torch.Tensor, norm: torch.Tensor, factor: torch.Tensor) -> ClipStats:
    like = stats.last_norm
    return ClipStats(
        stats.count + 1,
        stats.clipped + clipped.to(device=stats.clipped.device, dtype=torch.int64),
        norm.to(device=like.device, dtype=like.dtype),
        factor.to(device=like.device, dtype=like.dtype),
    )


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {seed!r}")
    if not -(2**63) <= int(seed) < 2**63:
        raise ValueError(f"seed must fit in int64; got {seed}")
    return int(seed)


def _check_beta(beta: Any) -> None:
    if beta is None:
        raise ValueError("beta is required for a random clipping rule: it must be in (0, 1) "
                         "(torch-clip's default beta=0 would never clip)")
    check_float("beta", beta, low=0.0, high=1.0, low_open=True, high_open=True)


def _random_decision(seed: torch.Tensor, count: torch.Tensor, norm: torch.Tensor, level: Any,
                     beta: Any, power: Any) -> torch.Tensor:
    """The random rule's decision: ``||g|| > level and u < beta ** ((level / ||g||) ** power)``.

    ``u = uniform_from_hash(seed, count)`` (``count`` 0-based); computed in float64. A zero norm
    never clips (the comparison with the level is false; the NaN/0 probability is not selected).
    """
    u = uniform_from_hash(seed, count)
    n64 = norm.to(torch.float64)
    lam = _as_level(level, torch.float64)
    prob = beta ** ((lam / n64) ** power)
    return (n64 > lam) & (u < prob)


# --- constant-level rules -------------------------------------------------------------------------


def _factor_rule(tx: GradientTransformation, kind: str, level: Any = None) -> GradientTransformation:
    """Declare that a rule's output is a factor times its input, computable from norms alone
    (``"global"``: one factor from the global norm; ``"leaf"``: one factor per leaf from its
    norm) or an elementwise clamp (``"coordinate"``): `gradxform.fastpath` folds a global factor
    into torch's fused kernels. The transform itself is unchanged."""
    del level
    return declare(tx, fast_path=ClipFactor(kind))


@recorded
def clip_by_leaf_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Clip each leaf to L2 norm ``max_norm`` separately: ``g_j <- g_j * min(1, max_norm / ||g_j||)``.

    torch-clip's ``layer_wise`` rule (one "layer" = one parameter tensor). Norms are computed in
    float32 or wider; a zero leaf passes through unchanged. Stateless.

    Args:
        max_norm: the largest L2 norm of each leaf (> 0).

    Returns:
        A stateless `GradientTransformation` (``params`` not needed).

    Raises:
        TypeError: the level is not a number or a 0-d tensor; ``update`` on a non-floating leaf.
        ValueError: the level is not > 0 (or is NaN).

    References:
        torch-clip 0.0.6 ``layer_wise``; optax's ``clip_by_block_rms`` for the RMS form.
        docs/clipping.md.

    Example:
        >>> g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([-1.0])}
        >>> tx = gx.clip_by_leaf_norm(2.0)
        >>> u, _ = tx.update(g, tx.init(g))
        >>> torch.cat([u["a"], u["b"]])
        tensor([ 1.2000,  1.6000, -1.0000])
    """
    check_float("max_norm", max_norm, low=0.0, low_open=True)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        level = _tree.as_scalar(max_norm)
        factors = [_norm_factor(n, level) for n in _leaf_norms(flat.live)]
        return flat.rebuild(_scale_leaves(flat.live, factors, own.may_write(flat.live)))

    _name_update(update_fn, "clip_by_leaf_norm")
    return _factor_rule(stateless(update_fn), "leaf", max_norm)


@recorded
def clip(max_delta: float | torch.Tensor) -> GradientTransformation:
    """Clamp every coordinate: ``g <- clamp(g, -max_delta, max_delta)`` (optax's ``clip``).

    torch-clip's ``coordinate_wise`` rule, computed as an exact clamp: torch-clip multiplies by
    ``min(1, max_delta / (|g| + 1e-8))``, so its clipped entries come out slightly below
    ``max_delta`` (docs/clipping.md, torch-clip table, row 10). Stateless.

    Args:
        max_delta: the largest absolute value let through (> 0).

    Returns:
        A stateless `GradientTransformation` (``params`` not needed).

    Raises:
        TypeError: the level is not a number or a 0-d tensor; ``update`` on a non-floating leaf.
        ValueError: the level is not > 0 (or is NaN).

    References:
        optax's ``clip``; torch-clip 0.0.6 ``coordinate_wise``. docs/clipping.md.

    Example:
        >>> g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([-1.0])}
        >>> tx = gx.clip(2.0)
        >>> u, _ = tx.update(g, tx.init(g))
        >>> torch.cat([u["a"], u["b"]])
        tensor([ 2.,  2., -1.])
    """
    check_float("max_delta", max_delta, low=0.0, low_open=True)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        level = _tree.as_scalar(max_delta)
        return flat.rebuild(_clamp_leaves(flat.live, level, own.may_write(flat.live)))

    _name_update(update_fn, "clip")
    return _factor_rule(stateless(update_fn), "coordinate", max_delta)


@recorded
def clip_by_block_rms(threshold: float | torch.Tensor) -> GradientTransformation:
    """Clip each leaf ("block") to RMS ``threshold``, as optax's ``clip_by_block_rms``.

    ``g_j <- g_j * min(1, threshold / rms(g_j))`` with ``rms(g) = sqrt(mean(g ** 2))`` over all
    entries of the leaf (optax writes it ``g / max(1, rms / threshold)``). A zero leaf passes
    through unchanged. Stateless.

    Args:
        threshold: the largest RMS of each leaf (> 0).

    Returns:
        A stateless `GradientTransformation` (``params`` not needed).

    Raises:
        TypeError: the level is not a number or a 0-d tensor; ``update`` on a non-floating leaf.
        ValueError: the level is not > 0 (or is NaN).

    References:
        optax's ``clip_by_block_rms``. docs/clipping.md.

    Example:
        >>> g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([-1.0])}
        >>> tx = gx.clip_by_block_rms(1.0)
        >>> u, _ = tx.update(g, tx.init(g))
        >>> torch.cat([u["a"], u["b"]])
        tensor([ 0.8485,  1.1314, -1.0000])
    """
    check_float("threshold", threshold, low=0.0, low_open=True)

    def update_fn(updates: Updates, params: Params | None, own: Ownership = PURE) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        level = _tree.as_scalar(threshold)
        norms = _leaf_norms(flat.live)
        factors = [_norm_factor(n / math.sqrt(max(g.numel(), 1)), level) for n, g in zip(norms, flat.live)]
        return flat.rebuild(_scale_leaves(flat.live, factors, own.may_write(flat.live)))

    _name_update(update_fn, "clip_by_block_rms")
    return stateless(update_fn)


def _unit_norms(x: torch.Tensor, vector_unit: str = "whole", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unit-wise L2 norms in torch's layout, shaped to broadcast against ``x`` (float32 or wider,
    or ``dtype``).

    ``ndim >= 2`` (Linear ``(out, in)``, Conv ``(out, in/groups, *kernel)``, Embedding
    ``(num, dim)``): one unit per index of dim 0, the norm over all other dims. ``ndim <= 1``
    (biases, norm-layer gains, scalars): the whole leaf is one unit (``vector_unit="whole"``), or
    each element is its own unit (``vector_unit="element"``, the norm is ``|x|``).
    """
    wide = dtype or _wide(x.dtype)
    if x.ndim <= 1:
        if vector_unit == "whole":
            return _tree.reduced(torch.linalg.vector_norm(x, dtype=wide))
        return x.abs().to(wide)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=wide)


_VECTOR_UNITS = ("whole", "element")


def _overflowed_on_cpu(norms: torch.Tensor) -> bool:
    """Eagerly on CPU (a free read), whether a float32-or-narrower norm overflowed to inf; then
    AGC recomputes it in float64 (as `clip_by_global_norm` does). Elsewhere False: no host sync;
    an overflowing unit gets a zero factor there, as ``torch.nn.utils.clip_grad_norm_`` gives."""
    if norms.dtype == torch.float64 or _tree.traced() or norms.device.type != "cpu":
        return False
    return bool(torch.isinf(norms).any())


@recorded
def adaptive_grad_clip(clipping: float | torch.Tensor, eps: float | torch.Tensor = 1e-3, *,
                       vector_unit: str = "whole") -> GradientTransformation:
    """Adaptive gradient clipping (AGC): clip each unit's gradient relative to its weight's norm.

    For every unit ``i`` of every leaf, with ``p`` the params (``update`` needs them)::

        g_i <- g_i * min(1, clipping * max(||p_i||, eps) / ||g_i||)

    A zero unit passes through unchanged. Stateless.

    **Units (torch layout).** torch stores weights output-first: Linear ``(out, in)``, ConvNd
    ``(out, in / groups, *kernel)``. For every leaf with ``ndim >= 2`` (Linear, Conv1d/2d/3d,
    Embedding rows, ...) a unit is one index of **dim 0** and its norm is over **all the other
    dims**. A leaf with ``ndim <= 1`` (a bias, a LayerNorm / BatchNorm gain, a scalar) is **one
    unit** by default (``vector_unit="whole"``: the norm of the whole vector), as in the authors'
    NFNets code, optax and timm. ``vector_unit="element"`` makes each element of such a leaf its
    own unit instead (the norm is its absolute value: element ``i`` of a bias then belongs to
    output unit ``i``), which clips biases and gains much harder where they are near 0.

    **Versus optax** (``optax.adaptive_grad_clip``, the authors' JAX code): JAX kernels are
    input-first, Linear ``(in, out)`` and Conv2d ``(kh, kw, in, out)``, so optax reduces over every
    axis but the *last* and gradxform over every axis but the *first*: the same output units, and
    the same result for Linear and Conv2d weights, biases, gains and scalars. They differ where
    optax guesses a role from the shape: (1) it treats any leaf that *squeezes* to ``<= 1`` dim as
    one unit, e.g. a Linear weight with one input feature; here an ``ndim >= 2`` leaf always has
    one unit per output; (2) it reads a 3-D leaf as a multi-head linear kernel (reduces over axis
    0 only); here a 3-D leaf is a Conv1d weight ``(out, in, k)``; (3) it accepts at most 4 dims;
    Conv3d weights work here. Transposed convolutions store ``(in, out / groups, ...)``: for them
    dim 0 is the input channel. The paper does not clip the final linear layer (section 4.1);
    exclude it, or transposed convolutions, with `gradxform.masked`.

    Args:
        clipping: the ratio ``lambda`` (> 0) of a unit's gradient norm to its weight norm above
            which the unit is clipped (the paper finds that larger batches need smaller values).
        eps: the floor on a weight norm (> 0), so that units initialised at zero can move.
        vector_unit: how a leaf with ``ndim <= 1`` is split into units: ``"whole"`` (default, one
            unit) or ``"element"`` (one unit per element).

    Returns:
        A stateless `GradientTransformation`; its ``update`` needs ``params``.

    Raises:
        ValueError: ``clipping`` or ``eps`` not > 0, or an unknown ``vector_unit``; at update,
            when ``params`` is missing.

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021, arXiv 2102.06171, section 4.1.

    Example:
        >>> p = {"w": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([2.0, 0.0])}
        >>> g = {"w": torch.tensor([[6.0, 8.0]]), "b": torch.tensor([-0.5, 3.0])}
        >>> tx = adaptive_grad_clip(0.5)
        >>> out, _ = tx.update(g, tx.init(p), p)
        >>> out["w"], out["b"]  # ||p_w|| = 5, ||g_w|| = 10: x0.25; ||p_b|| = 2, ||g_b|| = 3.04
        (tensor([[1.5000, 2.0000]]), tensor([-0.1644,  0.9864]))
    """
    check_float("clipping", clipping, low=0.0, low_open=True)
    check_float("eps", eps, low=0.0, low_open=True)
    if vector_unit not in _VECTOR_UNITS:
        raise ValueError(f"vector_unit must be one of {_VECTOR_UNITS}; got {vector_unit!r}")

    def update_fn(updates: Updates, params: Params | None) -> Updates:
        flat = _Flat(updates)
        if not flat.live:
            return updates
        ps = flat.params_live(params, "adaptive_grad_clip")
        c, e = _tree.as_scalar(clipping), _tree.as_scalar(eps)
        out = []
        for g, p in zip(flat.live, ps):
            g_norm = _unit_norms(g, vector_unit)
            if _overflowed_on_cpu(g_norm):  # finite entries whose squares overflow float32
                g_norm = _unit_norms(g, vector_unit, torch.float64)
            p_norm = _unit_norms(p, vector_unit).to(g_norm.dtype)
            if isinstance(e, torch.Tensor):
                max_norm = torch.maximum(p_norm, e.to(p_norm.dtype)) * c
            else:
                max_norm = torch.clamp(p_norm, min=e) * c
            factor = max_norm / torch.maximum(g_norm, max_norm)
            out.append(g * factor.to(g.dtype))
        return flat.rebuild(out)

    _name_update(update_fn, "adaptive_grad_clip")
    return stateless(update_fn)


# --- AutoClip ---------------------------------------------------------------------------------------


class AutoClipState(NamedTuple):
    """State of `autoclip`.

    ``count``: updates so far (0-d int64, CPU); ``buf``: ring buffer of the last ``history`` global
    norms (``buf[t % history]`` holds the norm of update ``t``, 0-based; entries not yet written
    are 0); ``seed``: the random rule's seed (0-d int64, CPU); ``threshold``: the clipping level
    used by the last update (the quantile, current norm included); ``stats``: `ClipStats`.
    """

    count: torch.Tensor
    buf: torch.Tensor
    seed: torch.Tensor
    threshold: torch.Tensor
    stats: ClipStats


_QUANTILE_METHODS = ("linear", "inverted_cdf")


def _quantile_of_sorted(s: torch.Tensor, n: torch.Tensor, q: Any, method: str) -> torch.Tensor:
    """The ``q``-quantile of the first ``n`` entries of the sorted vector ``s`` (the rest is +inf).

    ``n`` is a 0-d int64 CPU tensor; entries are selected with masks, not indexing, so that no
    index has to be copied to the device. ``linear``: ``pos = q (n - 1)``, interpolate between
    ``floor(pos)`` and ``ceil(pos)`` (``np.quantile``'s default). ``inverted_cdf``: the ``k``-th
    smallest with ``k`` the least integer with ``k / n >= q`` (``k = ceil(q n)``, evaluated with
    the comparison, so that float rounding of ``q * n`` cannot pick the next entry).
    """
    ar = torch.arange(s.shape[0], device=s.device)
    nf = n.to(torch.float64)
    if method == "linear":
        pos = q * (nf - 1)
        lo = torch.floor(pos)
        frac = (pos - lo).to(s.dtype)
        lo = lo.to(torch.int64)
        hi = torch.minimum(lo + 1, n - 1)
        s_lo = torch.where(ar == lo, s, 0.0).sum()
        s_hi = torch.where(ar == hi, s, 0.0).sum()
        return s_lo + frac * (s_hi - s_lo)
    k = torch.ceil(q * nf)
    k = torch.where((k - 1) / nf >= q, k - 1, k)
    k = torch.where(k / nf < q, k + 1, k)
    idx = torch.clamp(k.to(torch.int64) - 1, min=0)
    idx = torch.minimum(idx, n - 1)
    return torch.where(ar == idx, s, 0.0).sum()


@recorded
def autoclip(
    q: float = 0.1,
    history: int = 4096,
    method: str = "linear",
    beta: float | None = None,
    power: float = 1,
    seed: int = 0,
) -> GradientTransformation:
    """AutoClip: clip the global norm at a quantile of the history of gradient norms.

    Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks" (IEEE MLSP 2020). At update ``t`` (0-based ``count``):

    1. ``h_t = ||g_t||`` (global L2 norm) is written into ``buf[t % history]``;
    2. ``lam_t = Q_q(h)`` over the ``n = min(t + 1, history)`` stored norms, **current one
       included**; ``method="linear"`` interpolates as ``np.percentile`` (the paper, which
       recommends the 10th percentile, ``q = 0.1``); ``method="inverted_cdf"`` takes the
       ``ceil(q n)``-th smallest norm (torch-clip's ``auto_clip``, whose heap has a bug:
       docs/clipping.md, torch-clip table, row 2);
    3. ``g_t <- g_t * min(1, lam_t / ||g_t||)``.

    **Window.** While ``count < history`` the quantile is over the exact, full history, as in the
    paper; after that it is over a sliding window of the last ``history`` norms (the paper keeps
    every norm; the state here has a fixed size and costs a sort of ``history`` numbers per step).

    **Random AutoClip** (torch-clip's ``linear_rand_autoclip`` / ``quadratic_rand_autoclip``):
    with ``beta`` in (0, 1), clip only if ``||g_t|| > lam_t`` and ``u_t < beta ** ((lam_t /
    ||g_t||) ** power)``, ``power`` 1 (linear) or 2 (quadratic), with ``u_t =
    uniform_from_hash(seed, t)``: one reproducible draw per step for the whole tree.

    The first update is never clipped (``lam_0 = h_0``). Updates with no live leaf pass through
    and are not recorded. State: `AutoClipState`.

    Args:
        q: the quantile level in (0, 1] (the paper's percentile / 100).
        history: the number of norms kept (the window once exceeded).
        method: ``"linear"`` (``np.percentile``) or ``"inverted_cdf"`` (torch-clip).
        beta: ``None`` for AutoClip; a number in (0, 1) for the random rule.
        power: the random rule's power (1 linear, 2 quadratic).
        seed: the seed of the random rule's draws.

    Returns:
        A `GradientTransformation` whose state is `AutoClipState` (``params`` not needed).

    Raises:
        TypeError: a level is not a number.
        ValueError: ``q`` outside (0, 1], an unknown ``method``, ``history`` not an int >= 1,
            ``beta`` outside (0, 1), ``power <= 0`` or a bad ``seed``.

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for
        Source Separation Networks", IEEE MLSP 2020, arXiv:2007.14469. torch-clip 0.0.6 ``auto_clip``. docs/clipping.md.

    Example:
        >>> tx = gx.autoclip(q=0.5)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for norm in (1.0, 10.0): u, state = tx.update({"w": torch.tensor([norm])}, state)
        >>> u["w"]  # the median of the norms 1 and 10 (linear): 5.5
        tensor([5.5000])
    """
    check_float("q (the quantile level)", q, low=0.0, high=1.0, low_open=True)
    if method not in _QUANTILE_METHODS:
        raise ValueError(f"method must be one of {_QUANTILE_METHODS}; got {method!r}")
    if isinstance(history, bool) or not isinstance(history, numbers.Integral) or history < 1:
        raise ValueError(f"history must be an int >= 1 (the number of norms kept); got {history!r}")
    if beta is not None:
        _check_beta(beta)
    check_float("power", power, low=0.0, low_open=True)
    seed = _check_seed(seed)
    size = int(history)

    def init(params: Params) -> AutoClipState:
        device, dtype = _home(params)
        return AutoClipState(
            _zero_count(),
            torch.zeros(size, dtype=dtype, device=device),
            torch.tensor(seed, dtype=torch.int64),
            torch.zeros((), dtype=dtype, device=device),
            _stats_init(device, dtype),
        )

    def owned_update(updates: Updates, state: AutoClipState, params: Params | None,
                     own: Ownership) -> tuple[Updates, AutoClipState]:
        del params
        expect_state(state, AutoClipState, "autoclip")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        buf = state.buf
        norm = _tree.global_norm(flat.live).to(device=buf.device, dtype=buf.dtype)
        count = state.count
        ar = torch.arange(size, device=buf.device)
        buf = torch.where(ar == count % size, norm, buf)
        n = torch.clamp(count + 1, max=size)
        s = torch.sort(torch.where(ar < n, buf, math.inf)).values
        thr = _quantile_of_sorted(s, n, q, method)
        if beta is None:
            clipped = norm > thr
        else:
            clipped = _random_decision(state.seed, count, norm, thr, beta, power)
        # thr / norm only where norm > thr >= 0; elsewhere the factor is exactly 1 (the divisor is
        # 1 there too, so a zero norm cannot put inf * 0 = NaN into a gradient)
        factor = torch.where(clipped, thr / torch.where(clipped, norm, torch.ones_like(norm)), torch.ones_like(norm))
        out = _mul(flat.live, factor, own.may_write(flat.live))
        new_state = AutoClipState(count + 1, buf, state.seed, thr, _stats_next(state.stats, clipped, norm, factor))
        return flat.rebuild(out), new_state

    return _factor_rule(owned_transform(init, owned_update), "global")


# --- random norm clipping -------------------------------------------------------------------------


class RandomClipState(NamedTuple):
    """State of `random_clip_by_global_norm`: ``count`` (0-d int64, CPU; the 0-based step of the
    next draw), ``seed`` (0-d int64, CPU) and ``stats`` (`ClipStats`)."""

    count: torch.Tensor
    seed: torch.Tensor
    stats: ClipStats


@recorded
def random_clip_by_global_norm(
    max_norm: float | torch.Tensor,
    beta: float,
    power: float = 1,
    seed: int = 0,
) -> GradientTransformation:
    """Random norm clipping (torch-clip's ``linear_rand_norm`` / ``quadratic_rand_norm``).

    At update ``t`` (0-based ``count``), with ``u_t = uniform_from_hash(seed, t)`` (docs/clipping.md,
    "Random rules"): if ``||g|| > max_norm`` and ``u_t < beta ** ((max_norm / ||g||) ** power)``,
    ``g <- g * max_norm / ||g||``; otherwise ``g`` passes unchanged. ``power`` 1 is the linear
    rule, 2 the quadratic one. So a gradient far above the level is clipped almost surely, one
    just above it with probability about ``beta``, and ``||g|| <= max_norm`` never is.

    Unlike torch-clip (docs/clipping.md, torch-clip table, row 6): ``beta`` is required and must be in (0, 1)
    (its default 0 never clips); there is **one draw per step** for the whole tree (torch-clip
    draws per parameter tensor from the global RNG, so a step can clip some layers and not
    others); the draw depends only on ``(seed, count)``, so a run restored from a saved state
    continues the identical stream. State: `RandomClipState`.

    Args:
        max_norm: the clipping level (> 0).
        beta: the base of the clip probability, in (0, 1).
        power: 1 (linear rule) or 2 (quadratic rule); any number > 0.
        seed: the seed of the draws.

    Returns:
        A `GradientTransformation` whose state is `RandomClipState` (``params`` not needed).

    Raises:
        TypeError: a level is not a number.
        ValueError: ``max_norm <= 0``, ``beta`` outside (0, 1), ``power <= 0`` or a bad ``seed``.

    References:
        torch-clip 0.0.6 ``linear_rand_norm`` / ``quadratic_rand_norm``. docs/clipping.md,
        "Random rules".

    Example:
        >>> tx = gx.random_clip_by_global_norm(1.0, beta=0.5, seed=0)
        >>> g = {"w": torch.tensor([60.0, 80.0])}  # ||g|| = 100: clipped with probability 0.993
        >>> u, state = tx.update(g, tx.init(g))
        >>> u["w"]
        tensor([0.6000, 0.8000])
    """
    check_float("max_norm", max_norm, low=0.0, low_open=True)
    _check_beta(beta)
    check_float("power", power, low=0.0, low_open=True)
    seed = _check_seed(seed)

    def init(params: Params) -> RandomClipState:
        device, dtype = _home(params)
        return RandomClipState(_zero_count(), torch.tensor(seed, dtype=torch.int64), _stats_init(device, dtype))

    def owned_update(updates: Updates, state: RandomClipState, params: Params | None,
                     own: Ownership) -> tuple[Updates, RandomClipState]:
        del params
        expect_state(state, RandomClipState, "random_clip_by_global_norm")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        norm = _tree.global_norm(flat.live)
        level = _tree.as_scalar(max_norm)
        clipped = _random_decision(state.seed, state.count, norm, level, beta, power)
        lam = _as_level(level, norm.dtype)
        factor = torch.where(clipped, lam / torch.where(clipped, norm, torch.ones_like(norm)), torch.ones_like(norm))
        out = _mul(flat.live, factor, own.may_write(flat.live))
        new_state = RandomClipState(state.count + 1, state.seed, _stats_next(state.stats, clipped, norm, factor))
        return flat.rebuild(out), new_state

    return _factor_rule(owned_transform(init, owned_update), "global")


# --- monitoring -------------------------------------------------------------------------------------


class MonitorNormState(NamedTuple):
    """State of `monitor_norm`: ``count`` (0-d int64, CPU), ``last_norm`` (the global norm of the
    last updates) and ``history`` (ring buffer: ``history[t % size]`` holds the norm of update
    ``t``; the first ``min(count, size)`` entries are valid, see `norm_history`)."""

    count: torch.Tensor
    last_norm: torch.Tensor
    history: torch.Tensor


@recorded
def monitor_norm(size: int = 1024) -> GradientTransformation:
    """An identity transform that records the global L2 norm of the updates passing through.

    ``u -> u``; the state keeps ``last_norm`` and the last ``size`` norms in a ring buffer (no host
    sync: read them when logging, e.g. ``norm_history(state)`` for a histogram). Place it where
    the norms should be observed, e.g. ``chain(monitor_norm(), autoclip(), ...)`` for the raw
    gradient norms. Updates with no live leaf are not recorded. State: `MonitorNormState`.

    Args:
        size: the number of norms kept (>= 1).

    Returns:
        A `GradientTransformation` whose state is `MonitorNormState` (``params`` not needed).

    Raises:
        ValueError: ``size`` is not an int >= 1.

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", IEEE MLSP 2020, arXiv:2007.14469, Section 2 (the history of gradient
        norms); the total norm that torch.nn.utils.clip_grad_norm_ returns
        (https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html).

    Example:
        >>> tx = gx.chain(gx.monitor_norm(size=2), gx.scale(-0.1))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> for g in ([3.0, 4.0], [0.3, 0.4], [6.0, 8.0]):
        ...     _, state = tx.update({"w": torch.tensor(g)}, state)
        >>> state[0].last_norm
        tensor(10.)
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be an int >= 1 (the number of norms kept); got {size!r}")
    n_keep = int(size)

    def init(params: Params) -> MonitorNormState:
        device, dtype = _home(params)
        return MonitorNormState(_zero_count(), torch.zeros((), dtype=dtype, device=device),
                                torch.zeros(n_keep, dtype=dtype, device=device))

    def update(updates: Updates, state: MonitorNormState, params: Params | None = None) -> tuple[Updates, MonitorNormState]:
        del params
        expect_state(state, MonitorNormState, "monitor_norm")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        hist = state.history
        norm = _tree.global_norm(flat.live).to(device=hist.device, dtype=hist.dtype)
        ar = torch.arange(n_keep, device=hist.device)
        hist = torch.where(ar == state.count % n_keep, norm, hist)
        return updates, MonitorNormState(state.count + 1, norm, hist)

    return GradientTransformation(init, update)


def norm_history(state: MonitorNormState | AutoClipState) -> torch.Tensor:
    """The recorded norms of a `monitor_norm` (or `autoclip`) state, oldest first.

    At most the buffer's size: the last ``min(count, size)`` norms. A host-side helper for
    logging and plotting (it reads ``count``), not for use inside a compiled step.

    Args:
        state: a `MonitorNormState` or an `AutoClipState` (the member's own state, e.g.
            ``state[0]`` of a chain).

    Returns:
        A 1-D tensor of norms, oldest first (a copy).

    Raises:
        TypeError: ``state`` is neither a `MonitorNormState` nor an `AutoClipState`.

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", IEEE MLSP 2020, arXiv:2007.14469, Section 2. docs/clipping.md.

    Example:
        >>> tx = gx.chain(gx.monitor_norm(size=2), gx.scale(-0.1))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> for g in ([3.0, 4.0], [0.3, 0.4], [6.0, 8.0]):
        ...     _, state = tx.update({"w": torch.tensor(g)}, state)
        >>> gx.norm_history(state[0])  # the last two
        tensor([ 0.5000, 10.0000])
    """
    if isinstance(state, MonitorNormState):
        buf = state.history
    elif isinstance(state, AutoClipState):
        buf = state.buf
    else:
        raise TypeError(f"norm_history() takes a MonitorNormState or an AutoClipState; got {type(state).__name__}")
    count, size = int(state.count), buf.shape[0]
    if count <= size:
        return buf[:count].clone()
    start = count % size
    return torch.cat([buf[start:], buf[:start]])


# --- clipped SGD --------------------------------------------------------------------------------------


#: Rule names of `clipped_sgd` (torch-clip's ``clipping_type``; ``"auto"`` is its ``auto_clip``,
#: which is accepted too) and their default levels (torch-clip's; ``None``: the auto rules take
#: their level from the norm history and need ``q``).
CLIPPED_SGD_RULES: dict[str, float | None] = {
    "norm": 1.0,
    "layer_wise": 0.3,
    "coordinate_wise": 0.1,
    "auto": None,
    "linear_rand_norm": 1.0,
    "quadratic_rand_norm": 1.0,
    "linear_rand_autoclip": None,
    "quadratic_rand_autoclip": None,
}
_RULE_ALIASES = {"auto_clip": "auto"}


def _clip_rule(rule: str, level: Any, q: Any, beta: Any, power: Any, history: int, method: str,
               seed: int) -> GradientTransformation:
    if rule == "norm":
        return clip_by_global_norm(level)
    if rule == "layer_wise":
        return clip_by_leaf_norm(level)
    if rule == "coordinate_wise":
        return clip(level)
    if rule == "auto":
        return autoclip(q, history=history, method=method, seed=seed)
    if rule.endswith("_rand_norm"):
        return random_clip_by_global_norm(level, beta, power=power, seed=seed)
    return autoclip(q, history=history, method=method, beta=beta, power=power, seed=seed)


def _clipped_sgd(lr: Any, momentum: Any, level: Any, rule: str, q: Any, beta: Any, power: Any, history: int,
                 method: str, seed: int, use_momentum: bool) -> GradientTransformation:
    parts = [_clip_rule(rule, level, q, beta, power, history, method, seed)]
    if use_momentum:
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


@recorded
def clipped_sgd(
    lr: ScalarOrSchedule,
    momentum: ScalarOrSchedule = 0.0,
    rule: str = "norm",
    level: float | None = None,
    *,
    q: float | None = None,
    beta: float | None = None,
    power: int | None = None,
    history: int = 4096,
    method: str = "inverted_cdf",
    seed: int = 0,
) -> GradientTransformation:
    """Clipped SGD with heavy-ball momentum: torch-clip's ``ClippedSGD`` as a chain.

    ``chain(clip_rule, trace(momentum), scale_by_learning_rate(lr))``, i.e. with ``c_t`` the
    clipped gradient: ``b_1 = c_1``, ``b_t = momentum * b_{t-1} + c_t`` (no dampening), ``p <- p -
    lr * b_t`` (``trace`` is left out when ``momentum`` is 0). Wrapped in `inject_hyperparams`, so
    ``lr``, ``momentum`` and ``level`` live in the state (``group["lr"]`` in `gradxform.Optimizer`
    is live, schedulers work) and may be schedules.

    Rules (torch-clip's names; ``level`` defaults to torch-clip's default for the rule):

    - ``"norm"`` (1.0): `clip_by_global_norm`; ``"layer_wise"`` (0.3): `clip_by_leaf_norm`;
      ``"coordinate_wise"`` (0.1): `clip` (exact clamp);
    - ``"auto"`` (alias ``"auto_clip"``): `autoclip` with quantile ``q`` (required; torch-clip's
      ``p_autoclip``), ``method`` (default ``"inverted_cdf"``, torch-clip's definition) and
      ``history``; no ``level``;
    - ``"linear_rand_norm"`` / ``"quadratic_rand_norm"`` (1.0): `random_clip_by_global_norm` with
      ``beta`` (required, in (0, 1)) and power 1 / 2;
    - ``"linear_rand_autoclip"`` / ``"quadratic_rand_autoclip"``: `autoclip` with ``q`` and
      ``beta``. ``power`` is implied by the rule name (it may be given only if it agrees).

    **Where the clip sits, and how torch-clip differs** (docs/clipping.md, torch-clip table, row 7): torch-clip
    accumulates the *unclipped* gradients into its momentum buffer and clips when it applies the
    buffer. For ``norm`` and the auto / random rules it computes the factor ``min(1, lam /
    ||g_t||)`` from the *raw gradient* and multiplies the *buffer* ``b_t = mu b_{t-1} + g_t`` by
    it, which bounds neither the step nor the buffer: one large gradient stays in the buffer at
    full size (with ``lam = 1``, ``mu = 0.9`` and gradients (3, 4) then (0, 0.1) its second step
    is (-2.7, -3.7), ours (-0.54, -0.82)). For ``layer_wise`` and ``coordinate_wise`` it clips the
    buffer itself, i.e. ``chain(trace(mu), clip_rule, scale(-lr))``. Here every rule clips the
    *gradient*, before the momentum, as docs/clipping.md ("Clipped SGD") specifies and as ``chain(
    clip_by_global_norm, sgd)`` does in optax (or ``clip_grad_norm_`` + ``torch.optim.SGD``): the
    clip then bounds what each step contributes (the buffer is a geometric sum of clipped
    gradients, ``||b_t|| <= lam / (1 - mu)`` for the norm rule), one rule means the same thing
    whatever the momentum, and the clip is a separate transform that composes with any
    optimizer. With ``momentum=0`` the two orders coincide and the deterministic rules match
    torch-clip (up to its ``1e-8`` in ``coordinate_wise`` and its AutoClip heap bug: rows 10
    and 2 of the torch-clip table in docs/clipping.md). torch-clip's order for ``layer_wise`` / ``coordinate_wise`` is
    ``chain(trace(mu), clip_by_leaf_norm(lam), scale_by_learning_rate(lr))``.

    Other differences from torch-clip: an ``int`` level is used as given (torch-clip silently
    replaces it by the rule's default, row 4); norms are over the whole param tree, not per
    param group (row 8; use `gradxform.partition` for per-group clipping); the random draws are
    seeded and one per step (row 6).

    Args:
        lr: learning rate (a number, a 0-d tensor or a schedule).
        momentum: heavy-ball momentum (0: no buffer).
        rule: the clipping rule, by torch-clip's name (above).
        level: the clipping level (the rule's torch-clip default when ``None``; not for the
            auto rules).
        q: the quantile level of the auto rules.
        beta: the base of the random rules' probability.
        power: the random rules' power (implied by the rule name).
        history: the auto rules' number of norms kept.
        method: the auto rules' quantile method.
        seed: the random rules' seed.

    Returns:
        A `GradientTransformation` (``params`` not needed); ``lr``, ``momentum`` and ``level``
        are live in ``state.hyperparams``.

    Raises:
        TypeError: a hyperparameter is not a number, a 0-d tensor or a schedule.
        ValueError: an unknown rule, an argument the rule does not use, a missing ``q`` /
            ``beta``, or an out-of-range value.

    References:
        torch-clip 0.0.6 ``ClippedSGD``; docs/clipping.md ("Clipped SGD, and how it differs
        from torch-clip"), docs/migration/torch-clip.md.

    Example:
        >>> params = {"w": torch.zeros(2)}
        >>> tx = gx.clipped_sgd(0.1, momentum=0.9, rule="norm", level=1.0)
        >>> u, state = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0600, -0.0800])
    """
    rule = _RULE_ALIASES.get(rule, rule)
    if rule not in CLIPPED_SGD_RULES:
        raise ValueError(f"unknown clipping rule {rule!r}; expected one of {sorted(CLIPPED_SGD_RULES)} (or 'auto_clip')")
    check_float("lr", lr, low=0.0)
    check_float("momentum", momentum, low=0.0)
    is_auto = rule.endswith("auto") or rule.endswith("autoclip")
    is_random = "_rand_" in rule
    if is_auto:
        if level is not None:
            raise ValueError(f"rule {rule!r} takes its level from the norm history: give q, not level")
        if q is None:
            raise ValueError(f"rule {rule!r} needs q, the quantile level in (0, 1] (torch-clip's p_autoclip)")
    else:
        if q is not None:
            raise ValueError(f"q is only used by the auto rules, not by {rule!r}")
        if level is None:
            level = CLIPPED_SGD_RULES[rule]
        check_float("level", level, low=0.0, low_open=True)
    if is_random:
        _check_beta(beta)
        implied = 2 if rule.startswith("quadratic") else 1
        if power is not None and power != implied:
            raise ValueError(f"rule {rule!r} has power {implied}; got power={power}")
        power = implied
    else:
        if beta is not None:
            raise ValueError(f"beta is only used by the random rules, not by {rule!r}")
        if power is not None:
            raise ValueError(f"power is only used by the random rules, not by {rule!r}")
    use_momentum = callable(momentum) or bool(momentum != 0)
    static = ("rule", "q", "beta", "power", "history", "method", "seed", "use_momentum")
    tx = inject_hyperparams(_clipped_sgd, static_args=static)(
        lr=lr, momentum=momentum, level=level, rule=rule, q=q, beta=beta, power=power, history=history,
        method=method, seed=seed, use_momentum=use_momentum,
    )
    return tx


_tree.register_state_types(ClipStats, AutoClipState, RandomClipState, MonitorNormState)
