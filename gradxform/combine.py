"""Combinators: transforms built from other transforms.

``masked`` and ``partition`` restrict transforms to some leaves (that is how param groups are
expressed functionally), ``inject_hyperparams`` moves hyperparameters into the state as tensors
(which is how the torch.optim adapter exposes ``group["lr"]``), ``apply_if_finite`` skips
non-finite steps and ``multi_steps`` accumulates gradients over micro-batches.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Hashable, Mapping, NamedTuple

import torch

from . import tree as _tree
from .base import (
    ExtraArgs,
    GradientTransformation,
    Params,
    Updates,
    expect_state,
    extra_args_of,
    transform_name,
    with_extra_args,
)

__all__ = [
    "MaskedState",
    "masked",
    "PartitionState",
    "partition",
    "InjectHyperparamsState",
    "inject_hyperparams",
    "ApplyIfFiniteState",
    "apply_if_finite",
    "MultiStepsState",
    "multi_steps",
]


def _resolve(tree_or_fn: Any, params: Any) -> Any:
    return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _labels_for(labels: Any, reference: Any, what: str) -> list[Any]:
    """Flatten a labels / mask tree that must have ``reference``'s structure."""
    _, spec = _tree.tree_flatten(reference)
    return _tree.check_structure(spec, labels, what, against="params", reference=reference)


def _forwarding(update: Callable[..., Any], inner: GradientTransformation | list[GradientTransformation]) -> Callable[..., Any]:
    inners = inner if isinstance(inner, list) else [inner]
    spec = ExtraArgs()
    for tx in inners:
        spec = spec | extra_args_of(tx)
    return with_extra_args(update, spec)


# --- masked -------------------------------------------------------------------------------------


class MaskedState(NamedTuple):
    """``inner_state``: the state of the masked transform (``None`` at masked-out leaves)."""

    inner_state: Any


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only where ``mask`` is True; other updates pass through unchanged.

    ``mask`` is a pytree of bools with the params' structure, or a function ``params -> mask``.
    The inner transform sees ``None`` at masked-out leaves, so it keeps no state for them.
    """

    def split(tree: Any, ref: Any, m: Any) -> Any:
        leaves, spec = _tree.tree_flatten(tree)
        flags = _labels_for(m, ref, "mask")
        return _tree.tree_unflatten(spec, [x if bool(f) else None for x, f in zip(leaves, flags)])

    def init(params: Params) -> MaskedState:
        m = _resolve(mask, params)
        return MaskedState(inner.init(split(params, params, m)))

    def update(updates: Updates, state: MaskedState, params: Params | None = None, **extra: Any) -> tuple[Updates, MaskedState]:
        expect_state(state, MaskedState, "masked")
        m = _resolve(mask, params if params is not None else updates)
        inner_u = split(updates, updates, m)
        inner_p = None if params is None else split(params, updates, m)
        new_u, new_inner = inner.update(inner_u, state.inner_state, inner_p, **extra)
        u_leaves, spec = _tree.tree_flatten(updates)
        n_leaves = _tree.check_structure(spec, new_u, "masked inner output", reference=updates)
        flags = _labels_for(m, updates, "mask")
        out = [n if bool(f) else u for u, n, f in zip(u_leaves, n_leaves, flags)]
        return _tree.tree_unflatten(spec, out), MaskedState(new_inner)

    return GradientTransformation(init, _forwarding(update, inner))


# --- partition ----------------------------------------------------------------------------------


class PartitionState(NamedTuple):
    """``inner_states``: label -> that label's transform state."""

    inner_states: dict[Hashable, Any]


def partition(transforms: Mapping[Hashable, GradientTransformation], param_labels: Any) -> GradientTransformation:
    """Route each leaf to the transform of its label (optax's ``multi_transform``).

    ``param_labels`` is a pytree of labels with the params' structure, or a function
    ``params -> labels``. Every label must be a key of ``transforms``. This is the functional form
    of torch.optim param groups.
    """
    transforms = dict(transforms)
    if not transforms:
        raise ValueError("partition() needs at least one labelled transform")

    def labels_of(ref: Any) -> list[Any]:
        labels = _labels_for(_resolve(param_labels, ref), ref, "param_labels")
        paths = _tree.tree_paths(ref)
        for path, x, lab in zip(paths, _tree.tree_flatten(ref)[0], labels):
            if x is not None and lab not in transforms:
                raise ValueError(
                    f"param_labels gives label {lab!r} at '{path}', but partition() has no transform "
                    f"for it (labels: {sorted(map(str, transforms))})"
                )
        return labels

    def select(tree: Any, labels: list[Any], label: Hashable) -> Any:
        leaves, spec = _tree.tree_flatten(tree)
        return _tree.tree_unflatten(spec, [x if lab == label else None for x, lab in zip(leaves, labels)])

    def init(params: Params) -> PartitionState:
        labels = labels_of(params)
        return PartitionState({k: tx.init(select(params, labels, k)) for k, tx in transforms.items()})

    specs = {k: extra_args_of(tx) for k, tx in transforms.items()}

    def update(updates: Updates, state: PartitionState, params: Params | None = None, **extra: Any) -> tuple[Updates, PartitionState]:
        expect_state(state, PartitionState, "partition")
        labels = labels_of(params if params is not None else updates)
        u_leaves, spec = _tree.tree_flatten(updates)
        out = list(u_leaves)
        new_states = {}
        for k, tx in transforms.items():
            kwargs = extra if specs[k].accepts_any else {n: v for n, v in extra.items() if n in specs[k].names}
            sub_p = None if params is None else select(params, labels, k)
            new_u, new_states[k] = tx.update(select(updates, labels, k), state.inner_states[k], sub_p, **kwargs)
            for i, (x, lab) in enumerate(zip(_tree.tree_flatten(new_u)[0], labels)):
                if lab == k:
                    out[i] = x
        return _tree.tree_unflatten(spec, out), PartitionState(new_states)

    return GradientTransformation(init, _forwarding(update, list(transforms.values())))


# --- inject_hyperparams -------------------------------------------------------------------------


class InjectHyperparamsState(NamedTuple):
    """``count``: updates so far; ``hyperparams``: name -> 0-d (or 1-d, for tuples such as
    ``betas``) float64 CPU tensor, the value used by the last update (or the initial one);
    ``inner_state``: the wrapped transform's state."""

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_numeric(x: Any) -> bool:
    if _is_number(x):
        return True
    if isinstance(x, torch.Tensor):
        return x.numel() >= 1 and x.ndim <= 1 and (x.is_floating_point() or not x.dtype.is_complex)
    if isinstance(x, (tuple, list)) and x and all(_is_number(v) or (isinstance(v, torch.Tensor) and v.ndim == 0) for v in x):
        return True
    return False


def _to_state_value(x: Any) -> torch.Tensor:
    if isinstance(x, (tuple, list)):
        return torch.stack([_tree.scalar_tensor(v) for v in x])
    if isinstance(x, torch.Tensor) and x.ndim == 1:
        return x.detach().to(device="cpu", dtype=torch.float64)
    return _tree.scalar_tensor(x)


def _from_state_value(t: torch.Tensor, was_sequence: bool) -> Any:
    if was_sequence:
        if t.device.type == "cpu" and not _tree.is_compiling():
            return tuple(t.tolist())
        return tuple(t.unbind(0))
    return _tree.as_scalar(t)


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    static_args: tuple[str, ...] = (),
) -> Callable[..., GradientTransformation]:
    """Wrap a transform factory so that its numeric hyperparameters live in the state.

    ``inject_hyperparams(gx.adamw)(lr=1e-3)`` returns a transform whose state is
    `InjectHyperparamsState`; ``state.hyperparams["lr"]`` holds the learning rate as a
    float64 CPU tensor. Numbers, 0-d tensors and tuples of numbers (``betas``) are injected;
    callables are schedules of the step count, evaluated at every update; bools, strings,
    ``None`` and the names in ``static_args`` stay static. Each update rebuilds the inner
    transform from the current values, so changing ``state.hyperparams`` (as the torch.optim
    adapter does for ``group["lr"]``) changes the step, and under ``torch.compile`` a new value
    does not recompile.
    """
    sig = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        static: dict[str, Any] = {}
        numeric: dict[str, Any] = {}
        schedules: dict[str, Callable[[Any], Any]] = {}
        sequences: set[str] = set()
        for name, value in bound.arguments.items():
            param = sig.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                raise TypeError("inject_hyperparams() needs a factory with named parameters, not **kwargs")
            if name in static_args or isinstance(value, GradientTransformation):
                static[name] = value
            elif _is_numeric(value):
                numeric[name] = value
                if isinstance(value, (tuple, list)) or (isinstance(value, torch.Tensor) and value.ndim == 1):
                    sequences.add(name)
            elif callable(value) and not isinstance(value, type):
                schedules[name] = value
            else:
                static[name] = value
        # Build once with the initial values: validates them and tells which extras the inner takes.
        probe = factory(**static, **numeric, **{k: s(0) for k, s in schedules.items()})
        name_of = transform_name(probe)

        def build(hyperparams: dict[str, torch.Tensor]) -> GradientTransformation:
            values = {k: _from_state_value(v, k in sequences) for k, v in hyperparams.items()}
            return factory(**static, **values)

        def init(params: Params) -> InjectHyperparamsState:
            hp = {k: _to_state_value(v) for k, v in numeric.items()}
            hp.update({k: _to_state_value(s(0)) for k, s in schedules.items()})
            return InjectHyperparamsState(torch.zeros((), dtype=torch.int64), hp, build(hp).init(params))

        def update(updates: Updates, state: InjectHyperparamsState, params: Params | None = None, **extra: Any) -> tuple[Updates, InjectHyperparamsState]:
            expect_state(state, InjectHyperparamsState, f"inject_hyperparams({name_of})")
            hp = dict(state.hyperparams)
            for k, s in schedules.items():
                hp[k] = _to_state_value(s(state.count))
            missing = (numeric.keys() | schedules.keys()) - hp.keys()
            if missing:
                raise KeyError(f"state.hyperparams lacks {sorted(missing)}: the state was not made by this transform's init")
            new_u, new_inner = build(hp).update(updates, state.inner_state, params, **extra)
            return new_u, InjectHyperparamsState(state.count + 1, hp, new_inner)

        return GradientTransformation(init, with_extra_args(update, extra_args_of(probe)))

    return wrapped


# --- apply_if_finite ----------------------------------------------------------------------------


class ApplyIfFiniteState(NamedTuple):
    """``notfinite_count``: consecutive non-finite steps so far; ``last_finite``: whether the last
    step was applied; ``total_notfinite``: non-finite steps in total; ``inner_state``."""

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Skip steps whose updates are not finite.

    If any incoming update, or any update ``inner`` produces, holds a NaN or an Inf, the step
    returns zero updates and keeps ``inner``'s previous state, and the counters record it. The
    decision is a tensor selection, not a Python branch, so there is no host sync.

    Unlike optax's ``apply_if_finite(inner, max_consecutive_errors)``, gradxform never applies a
    non-finite update, however many consecutive steps fail: doing so would write NaN into the
    params and the moments for good. After many bad steps in a row the params and inner state
    are still those of the last good step; read ``state.notfinite_count`` to detect a run that
    has stopped making progress.
    """

    def init(params: Params) -> ApplyIfFiniteState:
        zero = torch.zeros((), dtype=torch.int64)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool), zero.clone(), inner.init(params))

    def update(updates: Updates, state: ApplyIfFiniteState, params: Params | None = None, **extra: Any) -> tuple[Updates, ApplyIfFiniteState]:
        expect_state(state, ApplyIfFiniteState, "apply_if_finite")
        in_leaves, spec = _tree.tree_flatten(updates)
        live_in = [x for x in in_leaves if x is not None]
        # The inner transform must not overwrite its state in place: we may need the old one.
        with _no_ownership():
            new_u, new_inner = inner.update(updates, state.inner_state, params, **extra)
        out_leaves = _tree.check_structure(spec, new_u, "apply_if_finite inner output", reference=updates)
        live_out = [x for x in out_leaves if x is not None]
        finite = _tree.all_finite(live_in + live_out).cpu()

        def pick(new: Any, old: Any) -> Any:
            if not isinstance(new, torch.Tensor):
                return new
            return torch.where(finite.to(new.device), new, old)

        safe_u = [None if x is None else torch.where(finite.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in out_leaves]
        inner_state = _tree.tree_map(pick, new_inner, state.inner_state)
        notfinite = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        total = state.total_notfinite + (~finite).to(torch.int64)
        return _tree.tree_unflatten(spec, safe_u), ApplyIfFiniteState(notfinite, finite, total, inner_state)

    return GradientTransformation(init, _forwarding(update, inner))


class _no_ownership:
    def __enter__(self) -> None:
        self._prev = dict(_tree._OWNERSHIP)
        _tree._OWNERSHIP["active"] = False

    def __exit__(self, *exc: Any) -> None:
        _tree._OWNERSHIP.update(self._prev)


# --- multi_steps --------------------------------------------------------------------------------


class MultiStepsState(NamedTuple):
    """``mini_step``: micro-batches accumulated since the last real step; ``gradient_step``: real
    steps taken; ``acc_grads``: the running sum of micro-batch updates; ``inner_state``."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    acc_grads: Any
    inner_state: Any


def multi_steps(inner: GradientTransformation, every_k: int, use_grad_mean: bool = True) -> GradientTransformation:
    """Gradient accumulation: apply ``inner`` once every ``every_k`` calls.

    Calls 1..k-1 of each cycle add the updates to ``acc_grads`` and return zeros; call k passes
    ``sum / k`` (or the sum, with ``use_grad_mean=False``) through ``inner`` and returns its
    output. In eager mode the branch reads the CPU step counter (no device sync); under
    ``torch.compile`` both branches are computed and selected with ``torch.where``.
    """
    if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
        raise ValueError(f"every_k must be an int >= 1; got {every_k!r}")

    def init(params: Params) -> MultiStepsState:
        zero = torch.zeros((), dtype=torch.int64)
        return MultiStepsState(zero, zero.clone(), _tree.tree_zeros_like(params), inner.init(params))

    def update(updates: Updates, state: MultiStepsState, params: Params | None = None, **extra: Any) -> tuple[Updates, MultiStepsState]:
        expect_state(state, MultiStepsState, "multi_steps")
        leaves, spec = _tree.tree_flatten(updates)
        acc_leaves = _tree.check_structure(spec, state.acc_grads, "state.acc_grads", reference=updates)
        acc = [a if u is None else (a + u if a is not None else None) for a, u in zip(acc_leaves, leaves)]
        acc_tree = _tree.tree_unflatten(spec, acc)
        emit = state.mini_step + 1 >= every_k
        zeros_out = _tree.tree_map(torch.zeros_like, updates)
        scale = 1.0 / every_k if use_grad_mean else 1.0
        # Leaves frozen in this call stay frozen (None) for the inner transform.
        mean = _tree.tree_unflatten(spec, [None if u is None else a * scale for a, u in zip(acc, leaves)])
        if not _tree.is_compiling():
            if bool(emit):  # CPU tensor: no device sync
                new_u, new_inner = inner.update(mean, state.inner_state, params, **extra)
                return new_u, MultiStepsState(torch.zeros_like(state.mini_step), state.gradient_step + 1,
                                              _tree.tree_zeros_like(acc_tree), new_inner)
            return zeros_out, MultiStepsState(state.mini_step + 1, state.gradient_step, acc_tree, state.inner_state)
        new_u, new_inner = inner.update(mean, state.inner_state, params, **extra)

        def pick(a: Any, b: Any) -> Any:
            return torch.where(emit.to(a.device), a, b) if isinstance(a, torch.Tensor) else a

        out = _tree.tree_map(pick, new_u, zeros_out)
        inner_state = _tree.tree_map(pick, new_inner, state.inner_state)
        new_acc = _tree.tree_map(lambda a: torch.where(emit.to(a.device), torch.zeros_like(a), a), acc_tree)
        mini = torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1)
        return out, MultiStepsState(mini, state.gradient_step + emit.to(torch.int64), new_acc, inner_state)

    return GradientTransformation(init, _forwarding(update, inner))
