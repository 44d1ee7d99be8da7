"""The plumbing every owned ``update`` of the optax catalog repeats (private).

An owned update (`gradxform.base.owned_transform`) starts by checking its state, flattening the
updates once and passing an all-``None`` update through untouched; it takes the state buffers it
will write in place (the buffers themselves when the caller owns the state, else copies); and it
ends by rebuilding the output tree and the new state, whose frozen (``None``) positions keep the
old state's leaves. These helpers do exactly that and nothing more: the arithmetic stays in the
blocks, and under ``torch.compile`` they trace as the inline code they replace did.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

from . import tree as _tree
from .base import Ownership, Updates, expect_state
from .transforms import _CHUNK, _Flat, _plain, _scratch_for, _slices


def live(updates: Updates, state: Any, state_cls: type, who: str) -> _Flat | None:
    """``state`` checked against ``state_cls`` (a clear error naming ``who``), then the updates
    flattened once; ``None`` when no leaf is live (the caller returns ``updates, state``)."""
    expect_state(state, state_cls, who)
    flat = _Flat(updates)
    return flat if flat.live else None


def held(flat: _Flat, tree: Any, what: str, own: Ownership, same_dtype: bool = True) -> list[torch.Tensor]:
    """The live leaves of the params-shaped state tree ``tree`` (structure- and shape-checked,
    dtypes too unless ``same_dtype`` is False: a ``mu_dtype`` buffer), to be updated in place:
    the buffers themselves when the caller owns the state, else copies."""
    if same_dtype:
        xs = flat.state_live(tree, what)
    else:
        xs = flat.state_live(tree, what, check_shapes=False)
        _tree.check_shapes(lambda: [flat.paths()[i] for i in flat.idx], flat.live, xs, what)
    return xs if own.state else [x.clone() for x in xs]


def restate(flat: _Flat, state: NamedTuple, fields: dict[str, Any] | None = None, **trees: Any) -> Any:
    """``state`` with each field named in ``trees`` replaced by those live leaves (frozen
    positions keep the old state's leaves) and each field named in ``fields`` (counts, scalars)
    by its value; the other fields stay as they are. One NamedTuple built from the given state:
    dynamo 2.1 cannot take the class of one made in the graph."""
    for name, live_leaves in trees.items():
        trees[name] = flat.rebuild(live_leaves, like=getattr(state, name))
    if fields:
        trees.update(fields)
    return replaced(state, **trees)


def replaced(state: NamedTuple, **fields: Any) -> Any:
    """``state._replace(**fields)``, built field by field: dynamo 2.1 does not trace into
    ``collections`` (a graph break under torch.compile before 2.13)."""
    cls = type(state)
    return cls(*[fields[f] if f in fields else getattr(state, f) for f in cls._fields])


def finish(flat: _Flat, out: list[torch.Tensor], state: NamedTuple, fields: dict[str, Any] | None = None,
           **trees: Any) -> tuple[Updates, Any]:
    """``(output tree, new state)``: ``out`` unflattened into the updates' structure (``None`` at
    frozen leaves) and `restate` ``(flat, state, fields, **trees)``."""
    return flat.rebuild(out), restate(flat, state, fields, **trees)


def _local(ts: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """A leaf's tensors, DTensors of one placement as their local shards (elementwise work is
    local), else as they are."""
    if ts and all(_tree.is_dtensor(t) for t in ts) and len({tuple(t.placements) for t in ts}) == 1:
        return [t.to_local() for t in ts]
    return ts


def on_cpu(xs: Sequence[torch.Tensor]) -> bool:
    """Whether an eager step may work slice by slice (`by_slices`): every leaf on the CPU, where a
    slice stays in the core's cache and a kernel call costs microseconds. On an accelerator the
    foreach kernels take every leaf in a few launches, which slicing would multiply."""
    return all(x.device.type == "cpu" for x in xs)


def by_slices(leaves: Sequence[Sequence[torch.Tensor]], fn: Callable[..., None], scratch: int = 0) -> None:
    """``fn(i, *slices, *scratch_slices)`` over each leaf ``i``'s tensors (``leaves[i]``: equally
    sized tensors, the first giving dtype and device) one `gradxform.transforms._CHUNK`-element
    slice at a time, with ``scratch`` buffers of the slice's size that stay in cache: an eager
    step's intermediate results never travel to memory, and each params-sized buffer is read
    (and written) once. Per element the kernels are those of the whole-leaf form, so the numbers
    are the same. DTensors are worked on through their local shards; a leaf that is not plain
    and contiguous (`gradxform.transforms._plain`) is passed whole, with whole-leaf scratch."""
    leaves = [_local(ts) for ts in leaves]
    bufs = _scratch_for([ts[0] for ts in leaves if _plain(ts)], scratch) if scratch else {}
    for i, ts in enumerate(leaves):
        if not _plain(ts):
            fn(i, *ts, *[torch.empty_like(ts[0]) for _ in range(scratch)])
            continue
        flat = [t.view(-1) for t in ts]
        n = ts[0].numel()
        b = bufs.get((ts[0].dtype, ts[0].device), [])
        for s in _slices(n):
            e = min(n, s + _CHUNK)
            fn(i, *[f[s:e] for f in flat], *[x[:e - s] for x in b])
