"""The core contract: gradient transformations, ``chain``, ``identity`` and ``apply_updates``.

A `GradientTransformation` is a pair of pure functions:

    state = tx.init(params)
    updates, state = tx.update(updates, state, params=None, **extra_args)

``params``, ``updates`` and ``state`` are pytrees (optree) whose leaves are tensors; ``None`` marks
a frozen or gradient-less leaf and passes through every transform untouched. ``update`` never
mutates its inputs. Updates are *added* to params (`apply_updates`), so descent needs a final
negative scale, as in optax.

Extra arguments (``losses=``, ``sum_grad_squared=``, ...) are keyword-only parameters of a
transform's ``update``. `chain` forwards each one to the members that declare it, raises a
``TypeError`` naming a required extra argument that was not given, and rejects an extra argument
that no member declares.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import torch

from . import tree as _tree

__all__ = [
    "Params",
    "Updates",
    "State",
    "GradientTransformation",
    "EmptyState",
    "ExtraArgs",
    "extra_args_of",
    "identity",
    "stateless",
    "chain",
    "apply_updates",
    "with_extra_args",
]

Params = Any
Updates = Any
State = Any


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra_args) -> (updates, state)``."""

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


@dataclasses.dataclass(frozen=True)
class ExtraArgs:
    """Which extra keyword arguments an ``update`` takes.

    ``required`` must be given, ``optional`` may be given, ``accepts_any`` means the update
    takes arbitrary keywords (``**kwargs`` without a declaration).
    """

    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    accepts_any: bool = False

    @property
    def names(self) -> frozenset[str]:
        return self.required | self.optional

    def declares(self, name: str) -> bool:
        """Whether ``name`` is a declared extra argument (membership only: no set arithmetic, which
        dynamo before torch 2.13 cannot trace)."""
        return name in self.required or name in self.optional

    def __or__(self, other: "ExtraArgs") -> "ExtraArgs":
        return ExtraArgs(
            required=self.required | other.required,
            optional=(self.optional | other.optional) - (self.required | other.required),
            accepts_any=self.accepts_any or other.accepts_any,
        )


_ATTR = "__gx_extra_args__"


def with_extra_args(update: Callable[..., Any], spec: ExtraArgs) -> Callable[..., Any]:
    """Declare the extra arguments of an ``update`` that takes ``**extra`` (combinators use it)."""
    setattr(update, _ATTR, spec)
    return update


def extra_args_of(tx: GradientTransformation) -> ExtraArgs:
    """The extra arguments ``tx.update`` declares.

    Read from a declaration made with `with_extra_args`, else from the signature: every
    keyword-only parameter is an extra argument (required when it has no default); a bare
    ``**kwargs`` accepts anything.
    """
    fn = tx.update
    fn_dict = getattr(fn, "__dict__", None) or {}
    spec = fn_dict.get(_ATTR)
    if spec is not None:
        return spec
    code = getattr(fn, "__code__", None)
    if code is not None and not inspect.ismethod(fn):
        # Plain functions (closures included): read the code object. Unlike inspect.signature
        # this also traces under torch.compile, where an inject_hyperparams transform rebuilds
        # its inner chain on every update.
        start = code.co_argcount
        kwonly = code.co_varnames[start:start + code.co_kwonlyargcount]
        accepts_any = bool(code.co_flags & inspect.CO_VARKEYWORDS)
        if _tree.is_compiling():
            # dynamo cannot read __kwdefaults__ of a closure created while tracing (an
            # inject_hyperparams transform rebuilds its inner chain on every update); the names
            # suffice to route extras, and the eager call has already checked required ones.
            return ExtraArgs(frozenset(), frozenset(kwonly), accepts_any)
        defaults = (fn.__kwdefaults__ or {}) if kwonly else {}
        return ExtraArgs(
            frozenset(k for k in kwonly if k not in defaults),
            frozenset(k for k in kwonly if k in defaults),
            accepts_any,
        )
    required, optional, accepts_any = set(), set(), False
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return ExtraArgs(accepts_any=True)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            (required if p.default is inspect.Parameter.empty else optional).add(p.name)
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_any = True
    return ExtraArgs(frozenset(required), frozenset(optional), accepts_any)


def transform_name(tx: GradientTransformation) -> str:
    """A readable name for error messages, e.g. ``scale_by_adam``."""
    name = getattr(tx.update, "__qualname__", None) or type(tx.update).__name__
    return name.split(".<locals>")[0]


def expect_state(state: Any, cls: type | tuple[type, ...], name: str) -> None:
    """Raise a clear error when ``update`` gets a state it did not create (e.g. before ``init``)."""
    if not isinstance(state, cls):
        if state is None:
            raise ValueError(f"{name}.update() got state=None: call init(params) first and pass its result")
        raise TypeError(
            f"{name}.update() got a state of type {type(state).__name__}; expected the state "
            f"returned by this transform's init(params). Call init(params) first."
        )


def select_extra(spec: ExtraArgs, extra: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``extra`` that a member with declaration ``spec`` takes."""
    if spec.accepts_any:
        return dict(extra)
    return {k: v for k, v in extra.items() if spec.declares(k)}


def check_extra(spec: ExtraArgs, extra: dict[str, Any], owner: str) -> None:
    """Raise a ``TypeError`` for a missing required or an unknown extra argument."""
    # membership tests only (no frozenset - dict_keys): traceable by dynamo before torch 2.13
    missing = sorted(k for k in spec.required if k not in extra)
    if missing:
        raise TypeError(
            f"{owner} needs the extra argument {missing[0]!r}, which was not given to update(); "
            f"pass it as update(updates, state, params, {missing[0]}=...)"
        )
    if not spec.accepts_any:
        unknown = sorted(k for k in extra if not spec.declares(k))
        if unknown:
            declared = ", ".join(sorted(spec.names)) or "none"
            raise TypeError(
                f"{owner} got an unknown extra argument {unknown[0]!r}: no transform in it declares "
                f"it (declared extra arguments: {declared})"
            )


def stateless(fn: Callable[[Updates, Params | None], Updates]) -> GradientTransformation:
    """A transform without state from ``fn(updates, params) -> updates`` (as optax.stateless)."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        return fn(updates, params), state

    update.__qualname__ = getattr(fn, "__qualname__", "stateless")
    update.__dict__.update(getattr(fn, "__dict__", {}))  # keep fn's markers (e.g. for lowering)
    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged: ``u -> u``."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        del params
        return updates, state

    return GradientTransformation(init, update)


_CHAIN_ATTR = "__gx_chain_members__"


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in sequence: ``u <- tx_k(...tx_2(tx_1(u)))``.

    Nested chains are flattened, so ``chain(a, chain(b, c))`` is ``chain(a, b, c)`` and its state
    is the tuple ``(state_a, state_b, state_c)``. Extra keyword arguments given to ``update`` go
    to every member that declares them; a required one that is missing, or one no member
    declares, raises ``TypeError``.
    """
    members: list[GradientTransformation] = []
    for tx in transforms:
        if not isinstance(tx, GradientTransformation) and not (
            isinstance(tx, tuple) and len(tx) == 2 and all(callable(f) for f in tx)
        ):
            raise TypeError(f"chain() takes GradientTransformations; got {type(tx).__name__}: {tx!r}")
        nested = (getattr(tx.update, "__dict__", None) or {}).get(_CHAIN_ATTR)
        if nested is not None:
            members.extend(nested)
        else:
            members.append(GradientTransformation(*tx))
    specs = [extra_args_of(tx) for tx in members]
    union = ExtraArgs()
    for s in specs:
        union = union | s

    # built here, not inside update: a dataclass built under torch.compile is a graph break on 2.1
    union_check = ExtraArgs(optional=union.names, accepts_any=False)

    def init(params: Params) -> tuple[Any, ...]:
        return tuple(tx.init(params) for tx in members)

    def update(updates: Updates, state: tuple[Any, ...], params: Params | None = None, **extra: Any) -> tuple[Updates, tuple[Any, ...]]:
        if not isinstance(state, tuple) or len(state) != len(members):
            got = "None" if state is None else f"{type(state).__name__} of length {len(state) if isinstance(state, tuple) else '?'}"
            raise ValueError(
                f"chain.update() expects the tuple of {len(members)} member states returned by "
                f"chain.init(params), got {got}. Call init(params) first."
            )
        if not union.accepts_any:
            check_extra(union_check, extra, "chain")
        new_states = []
        for tx, s, spec in zip(members, state, specs):
            kwargs = select_extra(spec, extra)
            missing = sorted(k for k in spec.required if k not in kwargs)
            if missing:
                raise TypeError(
                    f"{transform_name(tx)} (in chain) needs the extra argument {missing[0]!r}, which was not given "
                    f"to update(); pass it as update(updates, state, params, {missing[0]}=...)"
                )
            updates, s = tx.update(updates, s, params, **kwargs)
            new_states.append(s)
        return updates, tuple(new_states)

    with_extra_args(update, union)
    setattr(update, _CHAIN_ATTR, tuple(members))
    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False) -> Params:
    """Return ``params + updates`` leaf by leaf (a ``None`` update keeps the param).

    Each update is cast to its param's dtype, as optax does. Pure by default; with
    ``inplace=True`` the params' tensors are updated in place and returned (for a caller that
    owns them, e.g. a compiled training step that donates its inputs).
    """
    p_leaves, spec = _tree.tree_flatten(params)
    u_leaves = _tree.check_structure(spec, updates, "updates", against="params", reference=params)
    idx = [i for i, (p, u) in enumerate(zip(p_leaves, u_leaves)) if p is not None and u is not None]
    if idx:
        ps = [p_leaves[i] for i in idx]
        us = [u_leaves[i] if u_leaves[i].dtype == p_leaves[i].dtype else u_leaves[i].to(p_leaves[i].dtype) for i in idx]
        _tree.check_shapes(lambda: [_tree.tree_paths(params)[i] for i in idx], ps, us, "updates")
        if inplace:
            torch._foreach_add_(ps, us)
        else:
            p_leaves = _tree.scatter(p_leaves, idx, torch._foreach_add(ps, us))
    return _tree.tree_unflatten(spec, p_leaves)
