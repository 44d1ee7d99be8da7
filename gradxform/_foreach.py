"""``torch._foreach_*`` that also work inside ``torch.func`` transforms.

The transforms run their leaf arithmetic as ``torch._foreach_*`` kernels (one launch for all
leaves). Those ops have no ``vmap`` batching rule, so inside a ``torch.func`` transform (``vmap``
over a model dimension, ``grad`` through an update) and inside `gradxform.tree.differentiable`,
every function here falls back to the same operation leaf by leaf, out of place; elsewhere it is
the foreach kernel itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import _compat
from . import tree as _tree


def _is_scalar_list(arg: Any) -> bool:
    return isinstance(arg, (list, tuple)) and len(arg) > 0 and not isinstance(arg[0], torch.Tensor)


def _per_leaf_on_old_torch(xs: Any, args: tuple[Any, ...]) -> bool:
    """Whether a foreach op must run leaf by leaf (with the same arithmetic) on this torch: a list
    of Python numbers under torch.compile before torch 2.13 (no meta kernel for the ``ScalarList``
    overloads, measured on 2.1.2, so inductor cannot trace them), or a tensor as the scalar (an
    injected hyperparameter: dynamo 2.1 reads it with ``.item()``, a data-dependent graph break);
    or a sparse leaf before torch 2.13 (`gradxform._compat.foreach_sparse`)."""
    if _compat.foreach_scalarlist_traceable():  # torch >= 2.13: nothing else is looked up
        return False
    if _tree.is_compiling():
        return any(_is_scalar_list(a) or isinstance(a, torch.Tensor) for a in args)
    return not _compat.foreach_sparse() and any(isinstance(x, torch.Tensor) and x.is_sparse for x in xs)


def _local(arg: Any) -> Any:
    """A DTensor's local shard (a view of its storage: in-place writes reach the DTensor); lists
    element by element; anything else as it is."""
    if isinstance(arg, (list, tuple)):
        return [_local(a) for a in arg]
    return arg.to_local() if _tree.is_dtensor(arg) else arg


def _on_local_shards(op: Callable[..., Any], inplace: bool, xs: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
    """``op`` over the local shards of DTensor leaves, the results wrapped back as DTensors with
    each leaf's mesh, placements, shape and stride.

    Used before torch 2.13, where DTensor has no sharding strategy for several foreach ops the
    transforms use (``aten._foreach_lerp.Scalar``, ``aten._foreach_maximum.List``: measured on
    2.8). Every op in this module is elementwise, and FSDP2 shards a param, its gradient and its
    per-param state alike, so the op on each rank's shards is the op on the whole tensors, with no
    communication (as DTensor's own pointwise strategy does on 2.13)."""
    dtensor = _tree._dtensor_type()
    out = op(_local(xs), *[_local(a) for a in args], **kwargs)
    if inplace:
        return None
    return [dtensor.from_local(o, x.device_mesh, x.placements, run_check=False, shape=x.shape,  # type: ignore[union-attr]
                               stride=x.stride()) for o, x in zip(out, xs)]


def _at(arg: Any, i: int) -> Any:
    return arg[i] if isinstance(arg, (list, tuple)) else arg


def _keep_dtypes(xs: Any, out: Any) -> Any:
    """Each result in its leaf's dtype: a 0-d leaf combined with a 0-d tensor of a wider dtype
    (a clip factor, an injected hyperparameter, a bias correction) would otherwise be promoted,
    e.g. bfloat16 * float32 -> float32, unlike a leaf with dimensions."""
    if all(o.dtype == x.dtype for o, x in zip(out, xs)):
        return out
    return [o if o.dtype == x.dtype else o.to(x.dtype) for o, x in zip(out, xs)]


def _op(name: str, per_leaf: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """The foreach kernel ``name``; inside ``torch.func``, ``per_leaf`` (out of place) per leaf.

    In-place names (``add_``, ...) then write the results back *into the list* rather than into
    the tensors: an in-place write would break ``grad`` (a saved tensor modified) and ``vmap``
    (an unbatched tensor written with batched values). Callers keep using the same list.
    """
    kernel = getattr(torch, f"_foreach_{name}")
    inplace = name.endswith("_")

    def op(xs: Any, *args: Any, **kwargs: Any) -> Any:
        # the version check is a constant and comes first: on torch >= 2.13 nothing else is looked up
        if not _compat.dtensor_foreach_complete() and len(xs) > 0 and _tree.is_dtensor(xs[0]):
            return _on_local_shards(op, inplace, xs, args, kwargs)
        if _per_leaf_on_old_torch(xs, args):
            out = _keep_dtypes(xs, [per_leaf(x, *[_at(a, i) for a in args], **kwargs) for i, x in enumerate(xs)])
            if not inplace:
                return out
            for x, o in zip(xs, out):
                x.copy_(o)
            return None
        if not _tree.pure_ops():
            out = kernel(xs, *args, **kwargs)
            if inplace or not (_tree.is_compiling() or any(isinstance(a, (torch.Tensor, list, tuple)) for a in args)):
                return out
            return _keep_dtypes(xs, out)
        out = _keep_dtypes(xs, [per_leaf(x, *[_at(a, i) for a in args], **kwargs) for i, x in enumerate(xs)])
        if inplace:
            if not isinstance(xs, list):
                raise TypeError(f"gradxform._foreach.{name} needs a list inside torch.func transforms")
            xs[:] = out
            return None
        return out

    op.__name__ = name
    return op


add = _op("add", lambda x, o, alpha=1: torch.add(x, o, alpha=alpha))
add_ = _op("add_", lambda x, o, alpha=1: torch.add(x, o, alpha=alpha))
sub_ = _op("sub_", lambda x, o, alpha=1: torch.sub(x, o, alpha=alpha))
mul = _op("mul", torch.mul)
mul_ = _op("mul_", torch.mul)
div = _op("div", torch.div)
div_ = _op("div_", torch.div)
maximum = _op("maximum", torch.maximum)
maximum_ = _op("maximum_", torch.maximum)
clamp_min = _op("clamp_min", torch.clamp_min)
clamp_min_ = _op("clamp_min_", torch.clamp_min)
clamp_max_ = _op("clamp_max_", torch.clamp_max)
def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at 0 is 0 instead of inf (which times a zero tangent is NaN:
    a second moment that is exactly 0, e.g. a dead unit, would poison a hypergradient)."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


sqrt = _op("sqrt", _safe_sqrt)
lerp = _op("lerp", torch.lerp)
lerp_ = _op("lerp_", torch.lerp)
addcmul_ = _op("addcmul_", lambda x, a, b, value=1: torch.addcmul(x, a, b, value=value))


def norm(xs: Any, ord: Any = 2, **kwargs: Any) -> Any:
    """``torch._foreach_norm`` (the L-``ord`` norm of each tensor)."""
    if not _tree.pure_ops():
        out = torch._foreach_norm(xs, ord, **kwargs)
        # norms of sharded leaves: the full norm, as plain tensors (see tree.reduced)
        return _tree.reduced_all(out) if any(_tree.is_dtensor(n) for n in out) else out
    return [torch.linalg.vector_norm(x, ord) for x in xs]
