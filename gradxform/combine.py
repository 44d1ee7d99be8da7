"""Combinators: transforms built from other transforms.

``masked`` and ``partition`` restrict transforms to some leaves (that is how param groups are
expressed functionally), ``inject_hyperparams`` moves hyperparameters into the state as tensors
(which is how the torch.optim adapter exposes ``group["lr"]``), ``apply_if_finite`` skips
non-finite steps, ``multi_steps`` accumulates gradients over micro-batches and ``graft`` combines
the step size of one transform with the direction of another.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import types
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import torch

from . import _foreach as _fe
from . import tree as _tree
from .base import (
    Ownership,
    call_apply,
    call_update,
    declare,
    info_of,
    owned_transform,
    recorded,
    ExtraArgs,
    GradientTransformation,
    Params,
    Updates,
    check_extra,
    expect_state,
    extra_args_of,
    select_extra,
    transform_name,
    union_of,
    with_extra_args,
    _names,
)

__all__ = [
    "ApplyIfFiniteState",
    "GraftState",
    "InjectHyperparamsState",
    "MaskedState",
    "MultiStepsState",
    "PartitionState",
    "apply_if_finite",
    "graft",
    "inject_hyperparams",
    "masked",
    "multi_steps",
    "partition",
]


def _resolve(tree_or_fn: Any, params: Any) -> Any:
    return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _labels_for(labels: Any, reference: Any, what: str) -> list[Any]:
    """Flatten a labels / mask tree that must have ``reference``'s structure."""
    _, spec = _tree.tree_flatten(reference)
    if _tree.is_compiling() and not _tree._is_python_spec(spec):
        # dynamo constant-folds flattening a dict of Python constants (a mask of bools) through
        # optree's own dict flatten and cannot wrap its result; walk the params' structure instead
        # (``flatten_up_to`` raises ValueError on a mismatch; eager mode keeps the precise message).
        return spec.flatten_up_to(labels)
    return _tree.check_structure(spec, labels, what, against="params", reference=reference)


def _forward_spec(inner: GradientTransformation | list[GradientTransformation]) -> ExtraArgs:
    inners = inner if isinstance(inner, list) else [inner]
    return union_of([extra_args_of(tx) for tx in inners])


def _forwarding(update: Callable[..., Any], inner: GradientTransformation | list[GradientTransformation]) -> Callable[..., Any]:
    return with_extra_args(update, _forward_spec(inner))


def _forwarding_transform(init: Callable[[Params], Any], owned_update: Callable[..., Any],
                          inner: GradientTransformation | list[GradientTransformation]) -> GradientTransformation:
    """A combinator from its owned update, declaring the extra arguments of its inner transforms."""
    return owned_transform(init, owned_update, _forward_spec(inner))


def _reject_unknown_extra(specs: Any, extra: dict[str, Any], owner: str) -> None:
    """A ``TypeError`` for an extra argument no inner transform declares (a typo such as
    ``loses=``), raised on every call: a combinator that filters or defers extras would
    otherwise drop it silently."""
    specs = list(specs)
    if any(spec.accepts_any for spec in specs):
        return
    # membership tests, no ExtraArgs built per call: traceable by dynamo before torch 2.13
    if any(not any(spec.declares(k) for spec in specs) for k in extra):
        union = union_of(specs)
        check_extra(ExtraArgs(optional=_names(union)), extra, owner)


# --- masked -------------------------------------------------------------------------------------


class MaskedState(NamedTuple):
    """``inner_state``: the state of the masked transform (``None`` at masked-out leaves)."""

    inner_state: Any


@recorded
def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only where ``mask`` is True; other updates pass through unchanged.

    ``mask`` is a pytree of bools with the params' structure, or a function ``params -> mask``.
    The inner transform sees ``None`` at masked-out leaves, so it keeps no state for them.

    Args:
        inner: the transform applied where the mask is True.
        mask: a pytree of bools shaped like the params, or a function ``params -> mask``.

    Returns:
        A `GradientTransformation` whose state is `MaskedState`; ``update`` needs ``params``
        when ``mask`` is a function or ``inner`` needs them.

    Raises:
        ValueError: the mask's structure differs from the params' (the message names the path).

    References:
        optax's ``masked``. docs/concepts.md.

    Example:
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> tx = gx.masked(gx.scale(-0.1), {"w": True, "b": False})
        >>> u, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params), params)
        >>> u["w"], u["b"]
        (tensor([-0.1000, -0.1000]), tensor([1.]))
    """

    def split(tree: Any, ref: Any, m: Any) -> Any:
        leaves, spec = _tree.tree_flatten(tree)
        flags = _labels_for(m, ref, "mask")
        return _tree.tree_unflatten(spec, [x if bool(f) else None for x, f in zip(leaves, flags)])

    def init(params: Params) -> MaskedState:
        m = _resolve(mask, params)
        return MaskedState(inner.init(split(params, params, m)))

    def owned_update(updates: Updates, state: MaskedState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, MaskedState]:
        expect_state(state, MaskedState, "masked")
        m = _resolve(mask, params if params is not None else updates)
        inner_u = split(updates, updates, m)
        inner_p = None if params is None else split(params, updates, m)
        new_u, new_inner = call_update(inner, inner_u, state.inner_state, inner_p, own, **extra)
        u_leaves, spec = _tree.tree_flatten(updates)
        n_leaves = _tree.check_structure(spec, new_u, "masked inner output", reference=updates)
        flags = _labels_for(m, updates, "mask")
        out = [n if bool(f) else u for u, n, f in zip(u_leaves, n_leaves, flags)]
        return _tree.tree_unflatten(spec, out), MaskedState(new_inner)

    return _forwarding_transform(init, owned_update, inner)


# --- partition ----------------------------------------------------------------------------------


class PartitionState(NamedTuple):
    """``inner_states``: label -> that label's transform state."""

    inner_states: dict[Hashable, Any]


@recorded
def partition(transforms: Mapping[Hashable, GradientTransformation], param_labels: Any) -> GradientTransformation:
    """Route each leaf to the transform of its label (optax's ``multi_transform``).

    ``param_labels`` is a pytree of labels with the params' structure, or a function
    ``params -> labels``. Every label must be a key of ``transforms``. This is the functional form
    of torch.optim param groups.

    Args:
        transforms: ``{label: transform}``.
        param_labels: a pytree of labels shaped like the params, or a function ``params -> labels``.

    Returns:
        A `GradientTransformation` whose state is `PartitionState` (one inner state per label).

    Raises:
        ValueError: no transforms, a label without a transform, or a labels tree whose
            structure differs from the params'.

    References:
        optax's ``multi_transform``. docs/three-ways.md ("Param groups with their own transform").

    Example:
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> tx = gx.partition({"fast": gx.sgd(1.0), "slow": gx.sgd(0.1)}, {"w": "fast", "b": "slow"})
        >>> u, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params), params)
        >>> u["w"], u["b"]
        (tensor([-1., -1.]), tensor([-0.1000]))
    """
    transforms = dict(transforms)
    if not transforms:
        raise ValueError("partition() needs at least one labelled transform")

    def labels_of(ref: Any) -> list[Any]:
        labels = _labels_for(_resolve(param_labels, ref), ref, "param_labels")
        for i, (x, lab) in enumerate(zip(_tree.tree_flatten(ref)[0], labels)):
            if x is not None and lab not in transforms:
                path = _tree.tree_paths(ref)[i]  # only for the message: dynamo 2.1 cannot trace it
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

    def owned_update(updates: Updates, state: PartitionState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, PartitionState]:
        expect_state(state, PartitionState, "partition")
        _reject_unknown_extra(specs.values(), extra, "partition")
        labels = labels_of(params if params is not None else updates)
        u_leaves, spec = _tree.tree_flatten(updates)
        if params is not None:  # labels come from params: a different updates tree would misroute
            _tree.check_structure(spec, params, "params", reference=updates)
        out = list(u_leaves)
        new_states = {}
        for k, tx in transforms.items():
            kwargs = extra if specs[k].accepts_any else {n: v for n, v in extra.items() if specs[k].declares(n)}
            sub_p = None if params is None else select(params, labels, k)
            new_u, new_states[k] = call_update(tx, select(updates, labels, k), state.inner_states[k], sub_p, own, **kwargs)
            for i, (x, lab) in enumerate(zip(_tree.tree_flatten(new_u)[0], labels)):
                if lab == k:
                    out[i] = x
        return _tree.tree_unflatten(spec, out), PartitionState(new_states)

    return _forwarding_transform(init, owned_update, list(transforms.values()))


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
    return isinstance(x, (tuple, list)) and bool(x) and all(
        _is_number(v) or (isinstance(v, torch.Tensor) and v.ndim == 0) for v in x)


def _to_state_value(x: Any) -> torch.Tensor:
    if isinstance(x, (tuple, list)):
        return torch.stack([_tree.scalar_tensor(v) for v in x])
    if isinstance(x, torch.Tensor) and x.ndim == 1:
        return x.detach().to(device="cpu", dtype=torch.float64)
    return _tree.scalar_tensor(x)


def _from_state_value(t: torch.Tensor, was_sequence: bool) -> Any:
    if was_sequence:
        if t.device.type == "cpu" and not _tree.traced():
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

    Args:
        factory: a function returning a `GradientTransformation` (``gx.adamw``, your own).
        static_args: names of arguments kept static (not injected).

    Returns:
        A factory with ``factory``'s arguments whose transforms keep the numeric ones in
        ``state.hyperparams``.

    Raises:
        TypeError: ``factory`` takes ``**kwargs`` only.
        KeyError: in ``update``, a state without the injected names (made by another transform).

    References:
        optax's ``inject_hyperparams``. docs/three-ways.md, section 3.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.inject_hyperparams(gx.sgd)(lr=0.1)
        >>> state = tx.init(params)
        >>> state.hyperparams["lr"]
        tensor(0.1000, dtype=torch.float64)
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

        def run(call: Callable[..., Any], updates: Updates, state: InjectHyperparamsState, params: Params | None,
                own: Ownership, extra: dict[str, Any]) -> tuple[Updates, InjectHyperparamsState]:
            expect_state(state, InjectHyperparamsState, f"inject_hyperparams({name_of})")
            # One new dict, not a copy mutated key by key: dynamo before torch 2.13 loses such
            # mutations of a local dict at a graph break (the schedule's value was dropped).
            hp = {**state.hyperparams, **{k: _to_state_value(s(state.count)) for k, s in schedules.items()}}
            missing = [k for k in (*numeric, *schedules) if k not in hp]
            if missing:
                raise KeyError(f"state.hyperparams lacks {sorted(missing)}: the state was not made by this transform's init")
            new_u, new_inner = call(build(hp), updates, state.inner_state, params, own, **extra)
            return new_u, InjectHyperparamsState(state.count + 1, hp, new_inner)

        def owned_update(updates: Updates, state: InjectHyperparamsState, params: Params | None, own: Ownership,
                         **extra: Any) -> tuple[Updates, InjectHyperparamsState]:
            return run(call_update, updates, state, params, own, extra)

        def owned_apply(updates: Updates, state: InjectHyperparamsState, params: Params, own: Ownership,
                        **extra: Any) -> tuple[Updates, InjectHyperparamsState]:
            return run(call_apply, updates, state, params, own, extra)

        tx = owned_transform(init, owned_update, extra_args_of(probe))
        # the inner transform adds its updates into the params itself where it can (`call_apply`)
        return declare(tx, owned_apply=owned_apply) if info_of(probe).owned_apply is not None else tx

    return wrapped


# --- apply_if_finite ----------------------------------------------------------------------------


class ApplyIfFiniteState(NamedTuple):
    """``notfinite_count``: consecutive non-finite steps so far; ``last_finite``: whether the last
    step was applied; ``total_notfinite``: non-finite steps in total; ``inner_state``.

    The three counters depend on the values of the updates, so they live on the device of the
    params (0-d int64 / bool): updating them never copies a flag to the host."""

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def _home_device(params: Params) -> torch.device:
    """The device of the first tensor leaf of ``params`` (CPU without one)."""
    for leaf in _tree.tree_flatten(params)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _counters_to(state: Any, device: torch.device) -> Any:
    """``state`` with its 0-d integer and bool CPU tensors (step counts, seeds) moved to ``device``."""
    def move(x: Any) -> Any:
        if (isinstance(x, torch.Tensor) and x.ndim == 0 and x.device.type == "cpu"
                and (x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()))):
            return x.to(device)
        return x

    return _tree.tree_map(move, state)


@recorded
def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Skip steps whose updates are not finite.

    If any incoming update, or any update ``inner`` produces, holds a NaN or an Inf, the step
    returns zero updates and keeps ``inner``'s previous state, and the counters record it.

    **No host sync.** Eagerly on CPU the decision is a Python branch on a CPU flag (a memory
    read): a non-finite input skips ``inner`` altogether, and a good step returns ``inner``'s new
    state as it is. Elsewhere (accelerators, ``torch.compile``, ``torch.func``) it is a
    ``torch.where`` selection of every update and state leaf on the flag, which stays on the
    device. ``inner`` runs out of place either way (its old state must survive a bad output).

    **Where the counters live.** gradxform keeps a step count that advances on every update on
    the CPU (as torch.optim keeps ``step``), and anything that depends on the values of the
    updates on their device. Under ``apply_if_finite`` every counter of ``inner`` advances only on
    finite steps, i.e. depends on a device flag: so when the params are on an accelerator,
    ``init`` puts ``inner``'s integer and bool scalars (step counts, seeds) on the params' device,
    as torch.optim keeps ``step`` on the device for ``capturable`` / ``fused`` steps, and the
    three counters of `ApplyIfFiniteState` live there too. Float scalars (injected
    hyperparameters) stay on the CPU; one that ``inner`` changes (a schedule) moves to the
    device on its first update. A state tensor of ``inner`` with ``ndim >= 1`` kept on the CPU
    while the updates are on an accelerator (offloaded state) costs one read of the flag.

    Unlike optax's ``apply_if_finite(inner, max_consecutive_errors)``, gradxform never applies a
    non-finite update, however many consecutive steps fail: doing so would write NaN into the
    params and the moments for good. After many bad steps in a row the params and inner state
    are still those of the last good step; read ``state.notfinite_count`` to detect a run that
    has stopped making progress.

    Args:
        inner: the transform to guard.

    Returns:
        A `GradientTransformation` whose state is `ApplyIfFiniteState` (``inner``'s state and
        the counters); ``update`` takes what ``inner`` takes.

    References:
        optax's ``apply_if_finite``. docs/bad-input.md.

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.apply_if_finite(gx.sgd(0.1))
        >>> u, state = tx.update({"w": torch.tensor([1.0, float("nan")])}, tx.init(params), params)
        >>> u["w"]
        tensor([0., 0.])
    """

    def init(params: Params) -> ApplyIfFiniteState:
        home = _home_device(params)
        zero = torch.zeros((), dtype=torch.int64, device=home)
        inner_state = inner.init(params)
        if home.type != "cpu":
            inner_state = _counters_to(inner_state, home)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=home), zero.clone(), inner_state)

    def update(updates: Updates, state: ApplyIfFiniteState, params: Params | None = None, **extra: Any) -> tuple[Updates, ApplyIfFiniteState]:
        expect_state(state, ApplyIfFiniteState, "apply_if_finite")
        in_leaves, spec = _tree.tree_flatten(updates)
        live_in = [x for x in in_leaves if x is not None]

        def counted(finite: torch.Tensor, inner_state: Any) -> ApplyIfFiniteState:
            """The state after a step that was applied (``finite``) or skipped (a 0-d CPU tensor
            mixes with a device tensor as a scalar, so no operand is copied to the host)."""
            return ApplyIfFiniteState(torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1),
                                      finite, state.total_notfinite + (~finite).to(torch.int64), inner_state)

        def zeros() -> Updates:
            return _tree.tree_unflatten(spec, [None if x is None else torch.zeros_like(x) for x in in_leaves])

        # Eager on CPU: branch on the flags (a memory read); elsewhere select with torch.where.
        eager = not _tree.traced() and all(x.device.type == "cpu" for x in live_in)
        if eager and not bool(_tree.all_finite(live_in)):
            return zeros(), counted(torch.zeros((), dtype=torch.bool), state.inner_state)
        # apply_if_finite declares no owned update, so the inner transform runs purely: the old
        # state must survive a bad output.
        new_u, new_inner = inner.update(updates, state.inner_state, params, **extra)
        out_leaves = _tree.check_structure(spec, new_u, "apply_if_finite inner output", reference=updates)
        live_out = [x for x in out_leaves if x is not None]
        if eager:
            if bool(_tree.all_finite(live_out)):
                return new_u, counted(torch.ones((), dtype=torch.bool), new_inner)
            return zeros(), counted(torch.zeros((), dtype=torch.bool), state.inner_state)
        finite = _tree.all_finite(live_in + live_out)  # on the updates' device: never read here

        def pick(new: Any, old: Any) -> Any:
            if not isinstance(new, torch.Tensor):
                return new
            if new.device == finite.device:
                return torch.where(finite, new, old)
            if new is old:  # a CPU scalar the step left alone (a constant hyperparameter)
                return new
            if new.ndim == 0 and new.device.type == "cpu":
                # a 0-d CPU tensor mixes with a device flag as a scalar: the result is on the
                # flag's device, with no copy to the host
                return torch.where(finite, new, old)
            return torch.where(finite.to(new.device), new, old)  # offloaded state: one flag read

        safe_u = [None if x is None else torch.where(finite.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in out_leaves]
        return _tree.tree_unflatten(spec, safe_u), counted(finite, _tree.map_new_over_old(lambda n, o: None if n is None else pick(n, o), new_inner, state.inner_state))

    return GradientTransformation(init, _forwarding(update, inner))


# --- multi_steps --------------------------------------------------------------------------------


class MultiStepsState(NamedTuple):
    """``mini_step``: micro-batches accumulated since the last real step; ``gradient_step``: real
    steps taken; ``acc_grads``: the running sum of micro-batch updates; ``inner_state``;
    ``acc_extras``: name -> running sum of that params-shaped extra argument (see ``accumulate``
    in `multi_steps`), or ``None`` when the inner transform takes none of them."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    acc_grads: Any
    inner_state: Any
    acc_extras: Any = None


_DEFAULT_ACCUMULATE: Mapping[str, float] = types.MappingProxyType({"sum_grad_squared": 2})


@recorded
def multi_steps(
    inner: GradientTransformation,
    every_k: int,
    use_grad_mean: bool = True,
    accumulate: Mapping[str, float] = _DEFAULT_ACCUMULATE,
) -> GradientTransformation:
    """Gradient accumulation: apply ``inner`` once every ``every_k`` calls.

    Calls 1..k-1 of each cycle add the updates to ``acc_grads`` and return zeros; call k passes
    ``sum / k`` (or the sum, with ``use_grad_mean=False``) through ``inner`` and returns its
    output. In eager mode the branch reads the CPU step counter (no device sync); under
    ``torch.compile`` both branches are computed and selected with ``torch.where``.

    ``accumulate`` maps the names of params-shaped extra arguments to a power ``q``: such an
    extra is summed over the micro-steps too, and call k hands ``inner`` the sum times
    ``(1/k)^q`` (times 1 with ``use_grad_mean=False``, i.e. for sum-reduced losses). The default
    ``{"sum_grad_squared": 2}`` is right for TrueGrad's statistic: with ``k`` equal micro-batches
    whose losses are means, the full batch's per-example gradients are the micro-batch ones times
    ``1/k``, so the full-batch ``S = sum_n (grad l_n / N)^2`` is ``(1/k^2) sum_j S_j``. An extra is
    accumulated only if ``inner`` declares it (`gradxform.base.extra_args_of`); otherwise the
    state holds no accumulator for it (``acc_extras`` is ``None`` when there is none). A ``None``
    leaf in the extra of the emitting call stays ``None`` for ``inner``; other extra arguments
    are handed to ``inner`` as given on the emitting call.

    Args:
        inner: the transform applied every ``every_k`` calls.
        every_k: the number of micro-steps per step (>= 1).
        use_grad_mean: hand ``inner`` the mean (True) or the sum of the micro-step updates.
        accumulate: ``{extra argument name: power}`` for params-shaped extra arguments.

    Returns:
        A `GradientTransformation` whose state is `MultiStepsState`.

    Raises:
        ValueError: ``every_k`` is not an int >= 1.
        TypeError: ``accumulate`` is not a mapping of names to numbers; in ``update``, a state
            not made by this transform's ``init``.

    References:
        optax's ``MultiSteps``. docs/second-moments.md ("Gradient accumulation").

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.multi_steps(gx.sgd(1.0), every_k=2)
        >>> state = tx.init(params)
        >>> u1, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> u2, state = tx.update({"w": torch.full((2,), 3.0)}, state, params)
        >>> u1["w"], u2["w"]
        (tensor([0., 0.]), tensor([-2., -2.]))
    """
    if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
        raise ValueError(f"every_k must be an int >= 1; got {every_k!r}")
    if not isinstance(accumulate, Mapping):
        raise TypeError(f"accumulate must be a mapping name -> power; got {accumulate!r}")
    for name, power in accumulate.items():
        if not isinstance(name, str) or not _is_number(power):
            raise TypeError(f"accumulate must map extra-argument names to numbers; got {name!r}: {power!r}")
    inner_spec = extra_args_of(inner)
    declared = _names(inner_spec)
    acc_names = tuple(n for n in accumulate if n in declared)
    grad_scale = 1.0 / every_k if use_grad_mean else 1.0

    def init(params: Params) -> MultiStepsState:
        zero = torch.zeros((), dtype=torch.int64)
        acc_extras = {n: _tree.tree_zeros_like(params) for n in acc_names} if acc_names else None
        return MultiStepsState(zero, zero.clone(), _tree.tree_zeros_like(params), inner.init(params), acc_extras)

    def accumulate_extras(state: MultiStepsState, spec: Any, updates: Updates,
                          extra: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The new sums, and the extras to hand ``inner`` if this call emits."""
        if not acc_names:
            return None, extra
        if not isinstance(state.acc_extras, dict):
            raise TypeError("multi_steps: state.acc_extras is missing; the state was not made by this transform's init")
        sums: dict[str, Any] = {}
        handed = dict(extra)
        for n in acc_names:
            old = _tree.check_structure(spec, state.acc_extras[n], f"state.acc_extras[{n!r}]", reference=updates)
            x = extra.get(n)
            if x is None:
                sums[n] = _tree.tree_unflatten(spec, old)
                continue
            new_leaves = _tree.check_structure(spec, x, n, reference=updates)
            acc = [a if v is None or a is None else a + v for a, v in zip(old, new_leaves)]
            sums[n] = _tree.tree_unflatten(spec, acc)
            factor = grad_scale ** accumulate[n]
            handed[n] = _tree.tree_unflatten(
                spec, [None if v is None or a is None else a * factor for a, v in zip(acc, new_leaves)])
        return sums, handed

    def owned_update(updates: Updates, state: MultiStepsState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, MultiStepsState]:
        expect_state(state, MultiStepsState, "multi_steps")
        _reject_unknown_extra([inner_spec], extra, "multi_steps")
        leaves, spec = _tree.tree_flatten(updates)
        acc_leaves = _tree.check_structure(spec, state.acc_grads, "state.acc_grads", reference=updates)
        _tree.check_shapes(lambda: _tree.tree_paths(updates), leaves, acc_leaves, "state.acc_grads")
        acc = [a if u is None else (a + u if a is not None else None) for a, u in zip(acc_leaves, leaves)]
        acc_tree = _tree.tree_unflatten(spec, acc)
        sums, handed = accumulate_extras(state, spec, updates, extra)
        emit = state.mini_step + 1 >= every_k
        zeros_out = _tree.tree_map(torch.zeros_like, updates)
        # Leaves frozen in this call stay frozen (None) for the inner transform.
        mean = _tree.tree_unflatten(spec, [None if u is None else a * grad_scale for a, u in zip(acc, leaves)])
        if not _tree.traced():
            if bool(emit):  # CPU tensor: no device sync
                new_u, new_inner = call_update(inner, mean, state.inner_state, params, own, **handed)
                reset = None if sums is None else {n: _tree.tree_zeros_like(t) for n, t in sums.items()}
                return new_u, MultiStepsState(torch.zeros_like(state.mini_step), state.gradient_step + 1,
                                              _tree.tree_zeros_like(acc_tree), new_inner, reset)
            return zeros_out, MultiStepsState(state.mini_step + 1, state.gradient_step, acc_tree, state.inner_state, sums)
        # Traced: the inner step runs every call and is selected below, so it runs purely (a
        # donating compiled step would otherwise advance its state on every micro-batch).
        new_u, new_inner = inner.update(mean, state.inner_state, params, **handed)

        def pick(a: Any, b: Any) -> Any:
            return torch.where(emit.to(a.device), a, b) if isinstance(a, torch.Tensor) else a

        def cleared(a: Any) -> Any:
            return torch.where(emit.to(a.device), torch.zeros_like(a), a)

        out = _tree.tree_map(pick, new_u, zeros_out)
        inner_state = _tree.map_new_over_old(lambda n, o: None if n is None else pick(n, o), new_inner, state.inner_state)
        new_acc = _tree.tree_map(cleared, acc_tree)
        new_sums = None if sums is None else {n: _tree.tree_map(cleared, t) for n, t in sums.items()}
        mini = torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1)
        return out, MultiStepsState(mini, state.gradient_step + emit.to(torch.int64), new_acc, inner_state, new_sums)

    return _forwarding_transform(init, owned_update, inner)


# --- graft --------------------------------------------------------------------------------------


class GraftState(NamedTuple):
    """The states of the two grafted transforms (`graft`).

    Attributes:
        magnitude_state: the state of ``magnitude_tx``.
        direction_state: the state of ``direction_tx``.
    """

    magnitude_state: Any
    direction_state: Any


@recorded
def graft(magnitude_tx: GradientTransformation, direction_tx: GradientTransformation,
          eps: float | torch.Tensor = 1e-12) -> GradientTransformation:
    """Learning-rate grafting (Agarwal et al., 2020, "Disentangling adaptive gradient methods from
    learning rates", arXiv 2002.11803): the step size of one transform, the direction of another.

    Both transforms see the same updates, each with its own state. Per leaf, with ``m`` the output
    of ``magnitude_tx`` and ``d`` that of ``direction_tx``::

        u = d * ||m||_F / (||d||_F + eps)

    e.g. ``graft(gx.scale_by_adam(), gx.identity())`` is SGD's direction with Adam's per-layer
    step size (Adam#SGD in the paper's notation). Extra arguments go to whichever of the two
    declares them. The state is ``GraftState(magnitude_state, direction_state)``.

    Args:
        magnitude_tx: the transform whose per-leaf norm sets the step size.
        direction_tx: the transform whose output sets the direction.
        eps: added to the direction's norm (>= 0).

    Returns:
        A `GradientTransformation` whose state is `GraftState`; its ``update`` needs ``params``
        when either transform does.

    Raises:
        TypeError: ``eps`` is not a number or a 0-d tensor.
        ValueError: ``eps`` is negative or NaN.

    References:
        Agarwal, Anil, Hazan, Koren and Zhang, "Disentangling Adaptive Gradient Methods from
        Learning Rates", arXiv:2002.11803, 2020 (learning-rate grafting, the per-layer variant).

    Example:
        >>> tx = gx.graft(gx.scale_by_adam(), gx.identity())
        >>> g = {"w": torch.tensor([3.0, 4.0])}
        >>> u, _ = tx.update(g, tx.init(g))
        >>> u["w"]  # the direction of g, Adam's first-step norm sqrt(2)
        tensor([0.8485, 1.1314])
    """
    from .transforms import check_float

    check_float("eps", eps, low=0.0)
    m_spec, d_spec = extra_args_of(magnitude_tx), extra_args_of(direction_tx)

    def init(params: Params) -> GraftState:
        return GraftState(magnitude_tx.init(params), direction_tx.init(params))

    def owned_update(updates: Updates, state: GraftState, params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, GraftState]:
        expect_state(state, GraftState, "graft")
        leaves, spec = _tree.tree_flatten(updates)
        # Both transforms read the same updates: the first must leave them intact.
        shared = own.protect([x for x in leaves if x is not None])
        m_u, m_state = call_update(magnitude_tx, updates, state.magnitude_state, params, shared,
                                   **select_extra(m_spec, extra))
        d_u, d_state = call_update(direction_tx, updates, state.direction_state, params, own,
                                   **select_extra(d_spec, extra))
        m_leaves = _tree.check_structure(spec, m_u, "graft magnitude output", reference=updates)
        d_leaves = _tree.check_structure(spec, d_u, "graft direction output", reference=updates)
        idx = [i for i, (m, d) in enumerate(zip(m_leaves, d_leaves)) if m is not None and d is not None]
        out: list[Any] = [None] * len(leaves)
        if idx:
            ms = [m_leaves[i] for i in idx]
            ds = [d_leaves[i] for i in idx]
            e = _tree.as_scalar(eps)
            d_norms = list(_fe.norm(ds))
            _fe.add_(d_norms, e)
            factors = list(_fe.div(list(_fe.norm(ms)), d_norms))
            if own.may_write(ds):
                _fe.mul_(ds, factors)
                scaled = ds
            else:
                scaled = list(_fe.mul(ds, factors))
            out = _tree.scatter(out, idx, scaled)
        return _tree.tree_unflatten(spec, out), GraftState(m_state, d_state)

    return _forwarding_transform(init, owned_update, [magnitude_tx, direction_tx])


_tree.register_state_types(GraftState)


def find_injected(state: Any) -> list[InjectHyperparamsState]:
    """Every InjectHyperparamsState in a transform state, outermost first.

    States that declare ``_gx_private_hyperparams = True`` (a loss-weight updater's own optimizer,
    which moves the task weights, not the params) are not searched: their learning rate is not the
    group's ``lr``.
    """
    found: list[InjectHyperparamsState] = []

    def walk(node: Any) -> None:
        if getattr(type(node), "_gx_private_hyperparams", False):
            return
        if isinstance(node, InjectHyperparamsState):
            found.append(node)
            walk(node.inner_state)
        elif isinstance(node, tuple):
            for child in node:
                walk(child)
        elif isinstance(node, dict):
            for child in node.values():
                walk(child)

    walk(state)
    return found
