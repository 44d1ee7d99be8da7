"""Many models at once, and hyperparameters as differentiable inputs: gradxform with torch.func.

`batched` runs a transform on ``N`` independent models stacked along a leading dimension (an
ensemble from ``torch.func.stack_module_state``, a hyperparameter sweep) with ``torch.func.vmap``:
one call updates all ``N``. `set_hyperparam` / `get_hyperparam` read and write injected
hyperparameters in any state, so a learning rate can be a vector of ``N`` values under `batched`
or a tensor that requires grad for a hypergradient through unrolled steps.

Inside ``torch.func`` transforms every gradxform transform takes its all-tensor code path (no
host reads, no in-place writes: see `gradxform.tree.traced`), so ``torch.func.grad`` through
``tx.update`` and `gradxform.apply_updates` works for the differentiable transforms.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _compat
from . import tree as _tree
from .base import GradientTransformation, Params, Updates, recorded
from .combine import find_injected

__all__ = ["batched", "set_hyperparam", "get_hyperparam"]


class _Packed:
    """A pytree split into its tensor leaves (vmapped) and everything else (kept aside)."""

    __slots__ = ("spec", "consts", "idx")

    def __init__(self, tree: Any) -> None:
        leaves, self.spec = _tree.tree_flatten(tree)
        self.idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.consts = [None if isinstance(x, torch.Tensor) else x for x in leaves]

    @staticmethod
    def tensors(tree: Any) -> list[torch.Tensor]:
        return [x for x in _tree.tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]

    def unpack(self, tensors: Any) -> Any:
        return _tree.tree_unflatten(self.spec, _tree.scatter(self.consts, self.idx, tensors))


@recorded
def batched(tx: GradientTransformation, *, unbatched_extras: tuple[str, ...] = (),
            randomness: str = "error") -> GradientTransformation:
    """``tx`` applied to ``N`` independent models at once with ``torch.func.vmap``.

    Every tensor of ``params``, ``updates`` and the state carries the model index in dim 0 (as
    ``torch.func.stack_module_state`` stacks params); ``init`` builds each model's state from its
    own params (``vmap`` of ``tx.init``), ``update`` is ``vmap`` of ``tx.update``. Extra
    arguments are batched along dim 0 too, except those named in ``unbatched_extras`` (shared by
    all models). ``None`` leaves (frozen params, absent optional state) are allowed anywhere:
    they are set aside around ``vmap``. Hyperparameters injected in the state become ``(N,)``
    vectors, so each model can have its own learning rate (`set_hyperparam`).

    Mathematically ``batched(tx).update`` equals ``N`` separate ``tx.update`` calls.
    Transforms with data-dependent Python control flow that the all-tensor path does not cover
    raise inside ``vmap``; the docs list them.

    Args:
        tx: the transform applied to each model.
        unbatched_extras: names of extra arguments shared by all models (not batched).
        randomness: ``torch.func.vmap``'s ``randomness``.

    Returns:
        A `GradientTransformation` over stacked params (model index in dim 0).

    Raises:
        ValueError: an unknown ``randomness``.

    References:
        ``torch.func.vmap`` and ``torch.func.stack_module_state``; docs/torch-func.md
        ("Many models at once").

    Example:
        >>> params = {"w": torch.ones(3, 2)}  # three models with two params each
        >>> tx = gx.batched(gx.sgd(0.1))
        >>> u, state = tx.update({"w": torch.arange(1.0, 7.0).reshape(3, 2)}, tx.init(params), params)
        >>> u["w"]
        tensor([[-0.1000, -0.2000], [-0.3000, -0.4000], [-0.5000, -0.6000]])
    """
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"randomness must be 'error', 'different' or 'same'; got {randomness!r}")

    def init(params: Params) -> Any:
        box: dict[str, _Packed] = {}

        def one(p_tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            st = tx.init(p_pack.unpack(p_tensors))
            box["state"] = _Packed(st)
            return _Packed.tensors(st)

        p_pack = _Packed(params)
        out = torch.func.vmap(one, randomness=randomness)(_Packed.tensors(params))
        # vmap returns broadcast (stride-0) tensors for values that do not depend on the params
        # (counts): make them ordinary, so that a compiled step sees the same strides every call
        # (a fresh copy: ``contiguous()`` keeps stride 0 on a size-1 dim, e.g. when N = 1)
        return box["state"].unpack([t.clone(memory_format=torch.contiguous_format) for t in out])

    def update(updates: Updates, state: Any, params: Params | None = None, **extra: Any) -> tuple[Updates, Any]:
        u_pack, s_pack, p_pack = _Packed(updates), _Packed(state), _Packed(params)
        _check_no_dtensor(_Packed.tensors(updates))
        names = sorted(extra)
        e_packs = {k: _Packed(extra[k]) for k in names}
        groups = [_Packed.tensors(updates), _Packed.tensors(state), _Packed.tensors(params)]
        groups += [_Packed.tensors(extra[k]) for k in names]
        dims: list[Any] = [0, 0, 0] + [None if k in unbatched_extras else 0 for k in names]
        box: dict[str, _Packed] = {}

        def one(u_t: list[torch.Tensor], s_t: list[torch.Tensor], p_t: list[torch.Tensor],
                *e_t: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            ex = {k: e_packs[k].unpack(t) for k, t in zip(names, e_t)}
            new_u, new_s = tx.update(u_pack.unpack(u_t), s_pack.unpack(s_t),
                                     None if params is None else p_pack.unpack(p_t), **ex)
            box["u"], box["s"] = _Packed(new_u), _Packed(new_s)
            return _Packed.tensors(new_u), _Packed.tensors(new_s)

        out_u, out_s = torch.func.vmap(one, in_dims=tuple(dims), randomness=randomness)(*groups)
        return box["u"].unpack(out_u), box["s"].unpack(out_s)

    return GradientTransformation(init, update)


def _check_no_dtensor(leaves: list[torch.Tensor]) -> None:
    """vmap over DTensor leaves before torch 2.13 stops in an internal assert of functorch
    (``*bdim < tensor.dim()``, measured on 2.8): say which torch it needs instead."""
    # the version check is a constant and comes first: on torch >= 2.13 nothing else is looked up
    if not _compat.dtensor_foreach_complete() and any(_tree.is_dtensor(t) for t in leaves):
        raise RuntimeError(f"gx.batched over FSDP2 (DTensor) leaves {_compat.requirement('fsdp2_batched')}; "
                           "on this torch run the models separately (docs/support.md)")


def set_hyperparam(state: Any, name: str, value: Any) -> Any:
    """Write injected hyperparameter ``name`` (e.g. ``"lr"``) in every
    `gradxform.inject_hyperparams` state inside ``state`` (a chain's state included; a loss-weight
    updater's private optimizer is skipped) and return ``state``.

    ``value`` may be a number, a 0-d tensor that requires grad (a hypergradient: the update then
    uses it as a tensor; with ``torch.func.grad`` nothing else is needed, with ``torch.autograd``
    run the unrolled updates inside `gradxform.differentiable`), or under `batched` an ``(N,)``
    vector, one value per model. The state's dict is updated in place (the rest of the state is
    untouched).

    Args:
        state: a transform state holding injected hyperparameters.
        name: the hyperparameter's name, e.g. ``"lr"``.
        value: a number (stored in the old value's dtype and device) or a tensor (stored as is).

    Returns:
        ``state`` itself, updated.

    Raises:
        KeyError: no injected state has ``name`` (the message lists the names it has).

    References:
        optax.inject_hyperparams
        (https://optax.readthedocs.io/en/latest/api/optimizer_schedules.html#optax.inject_hyperparams);
        setting ``param_group["lr"]`` in torch.optim (https://pytorch.org/docs/stable/optim.html).

    Example:
        >>> state = gx.adam(0.1).init({"w": torch.zeros(2)})
        >>> state = gx.set_hyperparam(state, "lr", 0.01)
        >>> gx.get_hyperparam(state, "lr")
        tensor(0.0100, dtype=torch.float64)
    """
    hits = [inj for inj in find_injected(state) if name in inj.hyperparams]
    if not hits:
        names = sorted({k for inj in find_injected(state) for k in inj.hyperparams})
        raise KeyError(f"no injected hyperparameter {name!r} in this state; it has {names}")
    for inj in hits:
        old = inj.hyperparams[name]
        if isinstance(value, torch.Tensor):
            inj.hyperparams[name] = value
        else:
            inj.hyperparams[name] = torch.full_like(old, float(value))
    return state


def get_hyperparam(state: Any, name: str) -> torch.Tensor:
    """The value of injected hyperparameter ``name`` (from the outermost injected state that has it).

    ``state`` is searched depth-first (a chain's state included) for the states that
    `gradxform.inject_hyperparams` keeps; the first with ``name`` in its ``hyperparams`` answers.

    Args:
        state: a transform state (e.g. of ``gx.adam(...)``, whose hyperparameters are injected).
        name: the hyperparameter's name, e.g. ``"lr"``.

    Returns:
        The stored value (a tensor: 0-d, or ``(N,)`` under `batched`; the state's own, not a copy).

    Raises:
        KeyError: no injected state has ``name``.

    References:
        optax.inject_hyperparams
        (https://optax.readthedocs.io/en/latest/api/optimizer_schedules.html#optax.inject_hyperparams);
        torch.optim's ``param_groups[i]["lr"]`` (https://pytorch.org/docs/stable/optim.html).

    Example:
        >>> state = gx.adam(0.1).init({"w": torch.zeros(2)})
        >>> gx.get_hyperparam(state, "lr")
        tensor(0.1000, dtype=torch.float64)
    """
    for inj in find_injected(state):
        if name in inj.hyperparams:
            return inj.hyperparams[name]
    raise KeyError(f"no injected hyperparameter {name!r} in this state")
