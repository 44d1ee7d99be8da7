"""Clippers: gradient clipping rules as pure transforms.

Constant-level rules (global norm, per-leaf norm, coordinate-wise, block RMS, AGC), AutoClip,
the randomised rules of torch-clip, and the list-level helpers that the clipped SSTM method and
other composite methods reuse. See ``TECHNIQUES.md`` section 4 for the algorithms.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import tree as _tree

__all__ = ["clip_leaves", "RULES", "uniform_from_hash"]

#: Names of the rules that :func:`clip_leaves` understands.
RULES = ("norm", "layer_wise", "coordinate_wise")


def clip_leaves(rule: str, leaves: Sequence[torch.Tensor], level: torch.Tensor | float) -> list[torch.Tensor]:
    """Clip a list of tensors with a named rule at level ``level`` (pure, no host sync).

    - ``"norm"``: ``g * min(1, level / ||g||)`` with the global L2 norm over all leaves;
    - ``"layer_wise"``: each leaf ``g_j * min(1, level / ||g_j||)``;
    - ``"coordinate_wise"``: ``clamp(g, -level, level)`` elementwise (exact clamp).

    ``level`` may be a Python number or a 0-d tensor (e.g. a level that changes every step, as in
    clipped SSTM). A zero gradient passes through unchanged.
    """
    leaves = list(leaves)
    if not leaves:
        return []
    if rule == "norm":
        norm = _tree.global_norm(leaves)
        lam = torch.as_tensor(level, dtype=norm.dtype, device=norm.device)
        factor = lam / torch.maximum(norm, lam)
        return list(torch._foreach_mul(leaves, factor))
    if rule == "layer_wise":
        norms = torch._foreach_norm(leaves)
        out = []
        for g, n in zip(leaves, norms):
            lam = torch.as_tensor(level, dtype=n.dtype, device=n.device)
            out.append(g * (lam / torch.maximum(n, lam)).to(g.dtype))
        return out
    if rule == "coordinate_wise":
        out = []
        for g in leaves:
            lam = torch.as_tensor(level, dtype=g.dtype, device=g.device)
            out.append(torch.clamp(g, -lam, lam))
        return out
    raise ValueError(f"unknown clipping rule {rule!r}; expected one of {RULES}")


_M32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash on uint32 values held in int64 (TECHNIQUES.md section 0)."""
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
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    t0 = torch.as_tensor(t0, dtype=torch.int64, device=seed.device)
    h = _lowbias32(_lowbias32(_lowbias32(t0) ^ _lowbias32(seed ^ 0x9E3779B9)))
    return h.to(torch.float64) / 2.0**32
