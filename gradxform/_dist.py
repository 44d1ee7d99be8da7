"""The few torch.distributed helpers the data-parallel paths share: the world size and an
all-reduce of a list of tensors in one collective."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import tree as _tree


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` under an initialised process group, else 1 (also while torch.compile
    traces: the collectives here are eager-only)."""
    dist = torch.distributed
    if _tree.is_compiling() or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensors: Sequence[torch.Tensor], group: Any = None, differentiable: bool = False) -> list[torch.Tensor]:
    """The sum over the ranks of each tensor, by one all-reduce of their concatenation (in their
    common dtype; each result is cast back). ``differentiable``: ``torch.distributed.nn``'s
    all-reduce, whose backward all-reduces the incoming gradients. The inputs are not modified."""
    if not tensors:
        return []
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    if differentiable:
        from torch.distributed.nn.functional import all_reduce

        flat = all_reduce(flat, group=group)
    else:
        torch.distributed.all_reduce(flat, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def share_of_examples(n: int, device: Any = None, group: Any = None) -> torch.Tensor:
    """``n / N`` (float64, 0-d): this rank's ``n`` examples over the ``N`` of all ranks."""
    mine = torch.tensor(float(n), dtype=torch.float64, device=device)
    return mine / all_reduce_sum([mine], group)[0]
