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

import functools
import inspect
import pickle
from typing import Any, Callable, NamedTuple

import torch

from . import _compat
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
    "Ownership",
    "PURE",
    "TransformInfo",
    "info_of",
    "declare",
    "owned_transform",
    "recorded",
    "update_in_place",
    "call_apply",
]

Params = Any
Updates = Any
State = Any


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra_args) -> (updates, state)``.

    A transform built by gradxform's own factories also carries a `TransformInfo` (see
    `info_of`): how to rebuild it (so it pickles by name and arguments), the variant of
    ``update`` that may reuse buffers the caller owns, and an optional fused fast path. A
    transform made from user functions has none of them and is always called purely.

    It is a pair: ``len(tx) == 2`` and ``init, update = tx``. The declaration rides along in a
    third field, ``info``, so that code traced by ``torch.compile`` reads it from the tuple
    (dynamo before torch 2.13 reads no attribute of a function); read it with `info_of`.

    Attributes:
        init: ``init(params) -> state``; ``params`` is a pytree of tensors.
        update: ``update(updates, state, params=None, **extra_args) -> (updates, state)``; the
            updates are *added* to the params (`apply_updates`). Keyword-only parameters are
            the transform's extra arguments (see `extra_args_of`).
        info: the `TransformInfo` it declared when built (``None`` for a pair of user
            functions); `info_of` is the reader to use.

    References:
        optax.GradientTransformation
        (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.GradientTransformation).
        docs/concepts.md.

    Example:
        >>> def update(updates, state, params=None):
        ...     return {k: 2 * v for k, v in updates.items()}, state
        >>> tx = gx.GradientTransformation(lambda params: (), update)
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))
        ({'w': tensor([2.])}, ())
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]
    info: "TransformInfo | None" = None

    def __len__(self) -> int:
        return 2  # a pair, as optax's: ``init, update = tx``

    def __iter__(self) -> Any:
        return iter((self.init, self.update))

    def __repr__(self) -> str:
        recipe = info_of(self).recipe
        if recipe is not None:
            factory, args, kwargs = recipe
            shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            return f"{getattr(factory, '__name__', factory)}({', '.join(shown)})"
        return f"GradientTransformation({transform_name(self)})"

    def __reduce__(self) -> Any:
        recipe = info_of(self).recipe
        if recipe is None:
            raise pickle.PicklingError(
                f"cannot pickle the transform {transform_name(self)}: it was made from functions "
                "(closures), not by a gradxform factory. Save its state instead (gx.state_to_dict, or "
                "Optimizer.state_dict()) and rebuild the transform in code when loading.")
        factory, args, kwargs = recipe
        return (_rebuild, (factory, args, kwargs))

    def __copy__(self) -> "GradientTransformation":
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "GradientTransformation":
        return self  # immutable: a pair of pure functions


def _make_transform(cls: type, iterable: Any) -> "GradientTransformation":
    # ``_make`` from a pair too: dynamo 2.1 rebuilds a transform made before its trace (which it
    # sees as the two items it iterates) with ``_make`` when a closure made in the trace holds it
    items = tuple(iterable)
    return tuple.__new__(cls, items + (None,) if len(items) == 2 else items)  # type: ignore[return-value]


GradientTransformation._make = classmethod(_make_transform)  # type: ignore[method-assign,assignment]


def _rebuild(factory: Callable[..., "GradientTransformation"], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **kwargs)


class Ownership(NamedTuple):
    """What the caller of one ``update`` lets a transform overwrite (explicit, per call).

    ``state``: the state's buffers may be updated in place (the caller discards the old state,
    as `gradxform.Optimizer` does); ``protected``: ids of update tensors that must never be
    written (the user's ``.grad``); every other incoming update tensor may be reused. Only
    transforms that declare an owned ``update`` (see `owned_transform`) ever receive it; a
    transform made from user functions is always called purely, so inputs it shares between
    inner transforms stay intact.

    Attributes:
        state: whether the state's buffers may be overwritten.
        protected: ``id``s of update tensors that must not be written.
        updates: whether incoming update tensors (other than the protected ones) may be
            overwritten at all.
    """

    state: bool = False
    protected: frozenset[int] = frozenset()
    updates: bool = False

    def may_write(self, tensors: Any) -> bool:
        """Whether these update tensors may be overwritten (never while tracing)."""
        if not self.updates or _tree.traced():
            return False
        return not any(id(t) in self.protected for t in tensors)

    def protect(self, tensors: Any) -> "Ownership":
        """The same ownership with ``tensors`` protected too (e.g. inputs shared by two inner
        transforms)."""
        if not self.updates or _tree.traced():  # traced: updates are never written (no ids to guard on)
            return self
        return self._replace(protected=self.protected | frozenset(id(t) for t in tensors))


PURE = Ownership()
"""No ownership: the plain, pure ``update``."""


class TransformInfo(NamedTuple):
    """What a transform declares when it is built (read with `info_of`).

    Attributes:
        owned_update: ``owned_update(updates, state, params, own, **extra)``, the same rule as
            ``update`` but allowed to reuse what `Ownership` ``own`` grants.
        recipe: ``(factory, args, kwargs)`` that rebuilds the transform: it pickles by name and
            arguments, and `gradxform.Optimizer` rebuilds an alias for a param group that
            changes a structural option (``maximize``, ``amsgrad``, ...).
        fast_path: a fused lowering (`gradxform.fastpath.FastPath`) or ``None``.
        members: the members of a `chain`.
        owned_apply: ``owned_apply(updates, state, params, own, **extra)``, the owned update for
            a caller that adds the updates to ``params`` in place right after (as
            `gradxform.Optimizer` does): it may add a leaf's update into its param itself, with
            the rounding of ``param + update``, and return ``None`` there (one pass over memory
            less, as torch.optim's final ``addcdiv_`` into the params); the caller adds the
            leaves it returns. See `call_apply`.
        extra_args: the `ExtraArgs` its ``update`` takes, when declared (``None``: read from
            the function, see `extra_args_of`).
    """

    owned_update: Callable[..., tuple[Updates, State]] | None = None
    recipe: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = None
    fast_path: Any = None
    members: tuple["GradientTransformation", ...] | None = None
    owned_apply: Callable[..., tuple[Updates, State]] | None = None
    extra_args: "ExtraArgs | None" = None


_NO_INFO = TransformInfo()
_INFO_ATTR = "__gx_info__"


def _blind_trace() -> bool:
    """Whether dynamo traces the caller and can read no attribute of a function (torch before
    2.13, `gradxform._compat.dynamo_reads_function_attributes`): declarations then travel in
    the transform's ``info`` field only, and functions are never asked anything."""
    return _tree.is_compiling() and not _compat.dynamo_reads_function_attributes()


def _field_info(tx: Any) -> TransformInfo | None:
    """The ``info`` field of a transform made inside a blind trace (`_blind_trace`); ``None`` for
    any other. Dynamo 2.1 sees a transform made before the trace as its two items (it iterates
    the pair), one made inside it as all three: a combinator made before the trace reads what
    its members declare when it is built, not here."""
    if not isinstance(tx, GradientTransformation) or len(tx) != 3:  # (eager: always 2)
        return None
    return tx.info


def name_update(fn: Callable[..., Any], name: str) -> None:
    """``fn.__qualname__ = name`` (error messages name the transform), skipped while dynamo before
    torch 2.13 traces the caller: it cannot set an attribute of a function made in its trace."""
    if not _blind_trace():
        fn.__qualname__ = name


def info_of(tx: Any) -> TransformInfo:
    """The `TransformInfo` that ``tx`` declared (an empty one for user-made transforms).

    Args:
        tx: a `GradientTransformation` (or an ``(init, update)`` pair).

    Returns:
        Its `TransformInfo` (all fields ``None`` when it declared nothing).

    References:
        optax's transforms carry no such record; the recipe plays the role of a torch.optim
        optimizer's ``defaults`` (https://pytorch.org/docs/stable/optim.html).

    Example:
        >>> from gradxform.base import info_of
        >>> info_of(gx.adam(0.1)).recipe[2]["lr"]
        0.1
        >>> info_of(gx.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))).recipe is None
        True
    """
    if _blind_trace():
        field = _field_info(tx)
        return _NO_INFO if field is None else field
    fn_dict = getattr(tx[1], "__dict__", None) or {}
    return fn_dict.get(_INFO_ATTR, _NO_INFO)


def declare(tx: "GradientTransformation", **fields: Any) -> "GradientTransformation":
    """Attach `TransformInfo` fields to ``tx`` (its own ``update`` function) and return it.

    ``info_of(declare(tx, **fields)) == info_of(tx)._replace(**fields)``.

    Args:
        tx: the transform (its ``update`` function is marked in place).
        **fields: `TransformInfo` fields (``owned_update``, ``recipe``, ``fast_path``, ``members``).

    Returns:
        ``tx`` as a `GradientTransformation`.

    Raises:
        ValueError: an unknown field (``NamedTuple._replace``'s error).

    References:
        optax.with_extra_args_support marks transforms the same way
        (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> from gradxform.base import declare, info_of
        >>> tx = declare(gx.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s)), members=())
        >>> info_of(tx).members
        ()
    """
    init, update = tx[0], tx[1]
    if _blind_trace():  # a transform rebuilt inside the trace: its info rides in the tuple only
        old = info_of(tx)  # (TransformInfo._replace is not traced by dynamo 2.1)
        info = TransformInfo(*[fields[f] if f in fields else getattr(old, f) for f in TransformInfo._fields])
        return GradientTransformation(init, update, info)
    info = info_of(tx)._replace(**fields)
    setattr(update, _INFO_ATTR, info)
    return tx if isinstance(tx, GradientTransformation) else GradientTransformation(init, update)


def recorded(factory: Callable[..., "GradientTransformation"]) -> Callable[..., "GradientTransformation"]:
    """Decorate a public transform factory so that what it builds remembers its recipe
    (``factory``, args, kwargs): the transform then pickles by name and arguments, shows them in
    its ``repr``, and `gradxform.Optimizer` can rebuild it with a param group's options.

    Every argument is recorded by name, defaults included (unless the factory takes ``*args`` or
    ``**kwargs``); nothing is recorded while ``torch.compile`` traces.

    Args:
        factory: a function returning a `GradientTransformation`.

    Returns:
        The wrapped factory (same signature and docstring).

    References:
        Python's pickle protocol, ``__reduce__`` (https://docs.python.org/3/library/pickle.html).

    Example:
        >>> from gradxform.base import recorded
        >>> @recorded
        ... def halve() -> gx.GradientTransformation:
        ...     return gx.scale(0.5)
        >>> halve()
        halve()
    """

    sig = inspect.signature(factory)
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> "GradientTransformation":
        tx = factory(*args, **kwargs)
        if _tree.is_compiling():  # rebuilt inside a trace (inject_hyperparams): nothing to record
            return tx
        if not variadic:  # every argument by name, defaults included: options are readable
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            args, kwargs = (), dict(bound.arguments)
        return declare(tx, recipe=(make, args, kwargs))

    return make


def owned_transform(init: Callable[[Params], State], owned_update: Callable[..., tuple[Updates, State]],
                    extra_args: "ExtraArgs | None" = None) -> "GradientTransformation":
    """A transform from ``owned_update(updates, state, params, own, **extra)``.

    ``update`` is ``owned_update`` with `PURE` ownership; the adapter and `update_in_place`
    call ``owned_update`` with what they own. Keyword-only parameters after ``own`` are the
    transform's extra arguments, unless ``extra_args`` declares them (a combinator that forwards
    ``**extra`` to inner transforms).

    Args:
        init: ``init(params) -> state``.
        owned_update: ``owned_update(updates, state, params, own, **extra) -> (updates, state)``.
        extra_args: the `ExtraArgs` to declare (default: read from ``owned_update``'s signature).

    Returns:
        A `GradientTransformation` that declares ``owned_update``.

    References:
        optax.GradientTransformation's ``init``/``update`` contract
        (https://optax.readthedocs.io/en/latest/api/transformations.html); torch.optim's in-place
        ``step`` (https://pytorch.org/docs/stable/optim.html).

    Example:
        >>> from gradxform.base import owned_transform
        >>> def owned_update(updates, state, params, own):
        ...     return {k: v.neg() for k, v in updates.items()}, state
        >>> tx = owned_transform(lambda params: (), owned_update)
        >>> tx.update({"w": torch.ones(1)}, ())[0]
        {'w': tensor([-1.])}
    """
    spec = _extra_args_of_fn(owned_update) if extra_args is None else extra_args

    def update(updates: Updates, state: State, params: Params | None = None, **extra: Any) -> tuple[Updates, State]:
        return owned_update(updates, state, params, PURE, **extra)

    if not _blind_trace():  # (rebuilt inside a dynamo 2.1 trace: a function's attributes cannot be set)
        update.__qualname__ = owned_update.__qualname__
        with_extra_args(update, spec)
    return declare(GradientTransformation(init, update), owned_update=owned_update, extra_args=spec)


def call_update(tx: "GradientTransformation", updates: Updates, state: State, params: Params | None,
                own: Ownership, **extra: Any) -> tuple[Updates, State]:
    """``tx.update`` with ownership ``own`` if ``tx`` declares an owned update, else purely."""
    owned = info_of(tx).owned_update
    if owned is None or own is PURE:
        return tx.update(updates, state, params, **extra)
    return owned(updates, state, params, own, **extra)


def call_apply(tx: "GradientTransformation", updates: Updates, state: State, params: Params, own: Ownership,
               **extra: Any) -> tuple[Updates, State]:
    """The owned update of a caller that then adds the returned updates to ``params`` in place.

    ``p <- p + u`` for every leaf, in two parts: a transform that declares ``owned_apply``
    (a `chain` whose last member does, `gradxform.inject_hyperparams` around one, the
    catalog's blocks with the learning rate folded in) adds some leaves' updates into ``params``
    itself, with exactly the rounding of ``p + u``, and returns ``None`` for them; the caller
    adds the rest. Any other transform runs its owned update (`call_update`) and every leaf is
    returned. Only for a caller that owns ``params`` and the state (``own.state``).

    Args:
        tx: the transform.
        updates: the incoming updates (e.g. gradients).
        state: the state (owned by the caller).
        params: the params (written in place).
        own: what the caller owns (`Ownership`).
        **extra: extra arguments of ``tx.update``.

    Returns:
        ``(updates, new_state)``: ``updates`` mirrors the params, ``None`` at leaves already
        added into their param (and at leaves the update leaves out).

    Raises:
        ValueError: ``own`` does not grant the state (the call would write the params of a pure
            update).

    References:
        torch.optim's ``foreach`` steps end in one ``addcdiv_``/``add_`` into the params
        (https://pytorch.org/docs/stable/optim.html, "Algorithms").

    Example:
        >>> from gradxform.base import Ownership, call_apply
        >>> tx = gx.rmsprop(1e-2)
        >>> p, g = [torch.ones(2)], [torch.tensor([1.0, -1.0])]
        >>> u, state = call_apply(tx, g, tx.init(p), p, Ownership(state=True, updates=True))
        >>> u, p[0]
        ([None], tensor([0.9000, 1.1000]))
    """
    if not own.state:
        raise ValueError("call_apply() writes the params: give it an Ownership that owns the state")
    fn = info_of(tx).owned_apply
    if fn is None:
        return call_update(tx, updates, state, params, own, **extra)
    return fn(updates, state, params, own, **extra)


def update_in_place(tx: "GradientTransformation", updates: Updates, state: State, params: Params | None = None, *,
                    donate_updates: bool = False, **extra: Any) -> tuple[Updates, State]:
    """``tx.update`` for a caller that owns ``state`` (and, with ``donate_updates``, ``updates``).

    Same result as ``tx.update(updates, state, params, **extra)``, but transforms that declare
    it may write the new state into the old state's buffers (and into the incoming updates when
    donated) instead of allocating: one pass over memory less per buffer. The old ``state`` (and
    donated ``updates``) must not be used afterwards. Transforms made from user functions are
    called purely. Inside ``torch.compile`` with ``apply_updates(..., inplace=True)`` this gives
    a step that donates its buffers.

    Args:
        tx: the transform.
        updates: the incoming updates (e.g. gradients).
        state: the state to update; its buffers may be overwritten.
        params: the params, for transforms that need them.
        donate_updates: whether ``updates``' tensors may be overwritten too.
        **extra: extra arguments for ``tx.update``.

    Returns:
        ``(updates, new_state)`` as ``tx.update``.

    Raises:
        TypeError: as ``tx.update`` (a state not made by ``tx.init``, a missing or unknown extra
            argument).

    References:
        torch.optim's in-place ``step`` (https://pytorch.org/docs/stable/optim.html); the pure
        counterpart is optax's ``update`` + optax.apply_updates
        (https://optax.readthedocs.io/en/latest/api/apply_updates.html).

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.adam(0.1)
        >>> state = tx.init(params)
        >>> updates, state = gx.update_in_place(tx, {"w": torch.tensor([1.0, -2.0])}, state, params)
        >>> params = gx.apply_updates(params, updates, inplace=True)
        >>> params["w"]
        tensor([0.9000, 1.1000])
    """
    # (traced, updates are never written in place: nothing to protect)
    leaves = [] if donate_updates or _tree.traced() else [x for x in _tree.tree_flatten(updates)[0] if x is not None]
    own = Ownership(state=True, protected=frozenset(id(t) for t in leaves), updates=True)
    return call_update(tx, updates, state, params, own, **extra)


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class ExtraArgs(NamedTuple):
    """Which extra keyword arguments an ``update`` takes.

    ``required`` must be given, ``optional`` may be given, ``accepts_any`` means the update
    takes arbitrary keywords (``**kwargs`` without a declaration). ``a | b`` is the
    declaration of a chain of both (required wins over optional).

    Args:
        required: the names ``update`` needs.
        optional: the names ``update`` may take.
        accepts_any: whether ``update`` takes any keyword.

    References:
        optax.GradientTransformationExtraArgs
        (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> spec = gx.ExtraArgs(required=frozenset({"losses"})) | gx.ExtraArgs(optional=frozenset({"value"}))
        >>> sorted(spec.names)
        ['losses', 'value']
    """
    # (a NamedTuple, not a dataclass: dynamo before torch 2.13 builds NamedTuples in a trace)

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

    def __or__(self, other: Any) -> "ExtraArgs":
        if not isinstance(other, ExtraArgs):
            return NotImplemented
        return union_of((self, other))


_NO_NAMES: frozenset[str] = frozenset()


def _names(spec: ExtraArgs) -> Any:
    """``spec.names`` (a tuple inside a blind trace, see `union_of`)."""
    if _blind_trace():
        return tuple(spec.required) + tuple(k for k in spec.optional if k not in spec.required)
    return spec.required | spec.optional


def union_of(specs: Any) -> ExtraArgs:
    """``specs[0] | specs[1] | ...`` (``ExtraArgs()`` for none), spelled so that dynamo 2.1
    builds the result in the trace: it folds ``a | b`` of two constant NamedTuples into a
    constant it cannot put back into a closure made in the trace, and reads no property."""
    if _blind_trace():
        # dynamo 2.1 does no set arithmetic on frozensets and builds none: the names of a union
        # made inside its trace are tuples (used there for membership tests only)
        req: tuple[str, ...] = ()
        opt: tuple[str, ...] = ()
        anyk = False
        for spec in specs:
            req = req + tuple(k for k in spec.required if k not in req)
            opt = opt + tuple(k for k in spec.optional if k not in opt)
            anyk = anyk or spec.accepts_any
        return ExtraArgs(req, tuple(k for k in opt if k not in req), anyk)  # type: ignore[arg-type]
    required, optional, accepts_any = _NO_NAMES, _NO_NAMES, False
    for spec in specs:
        required = required | spec.required
        optional = optional | spec.optional
        accepts_any = accepts_any or spec.accepts_any
    return ExtraArgs(required, optional - required, accepts_any)


_ATTR = "__gx_extra_args__"


def with_extra_args(update: Callable[..., Any], spec: ExtraArgs) -> Callable[..., Any]:
    """Declare the extra arguments of an ``update`` that takes ``**extra`` (combinators use it).

    The declaration is stored on the function and read back by `extra_args_of`, so `chain`
    routes each extra keyword argument only to the members that declare it.

    Args:
        update: the ``update(updates, state, params=None, **extra)`` function; marked in place.
        spec: the `ExtraArgs` it takes.

    Returns:
        ``update`` itself.

    References:
        optax.GradientTransformationExtraArgs and optax.with_extra_args_support
        (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> def update(updates, state, params=None, **extra):
        ...     return updates, state
        >>> update = gx.with_extra_args(update, gx.ExtraArgs(required=frozenset({"losses"})))
        >>> gx.extra_args_of(gx.GradientTransformation(lambda p: (), update)).required
        frozenset({'losses'})
    """
    if not _blind_trace():  # (inside a dynamo 2.1 trace the spec travels in `TransformInfo.extra_args`)
        setattr(update, _ATTR, spec)
    return update


def _extra_args_of_fn(fn: Callable[..., Any]) -> ExtraArgs:
    """Extra arguments from a function's keyword-only parameters (required without a default),
    read from its code object: unlike inspect.signature this also traces under torch.compile,
    where an inject_hyperparams transform rebuilds its inner chain on every update."""
    if _blind_trace():
        # a function made inside a trace by dynamo before 2.13, which reads none of its attributes:
        # gradxform's own transforms declare their extra arguments (`TransformInfo.extra_args`);
        # an undeclared one is taken to have none, so an extra given to it is refused with a
        # TypeError (unknown extra argument) inside the trace, never dropped silently
        return ExtraArgs()
    code = fn.__code__
    start = code.co_argcount
    kwonly = code.co_varnames[start:start + code.co_kwonlyargcount]
    accepts_any = bool(code.co_flags & inspect.CO_VARKEYWORDS)
    if _tree.is_compiling():
        # dynamo cannot read __kwdefaults__ of a closure created while tracing; the names
        # suffice to route extras, and the eager call has already checked required ones.
        return ExtraArgs(frozenset(), frozenset(kwonly), accepts_any)
    defaults = (fn.__kwdefaults__ or {}) if kwonly else {}
    return ExtraArgs(frozenset(k for k in kwonly if k not in defaults), frozenset(k for k in kwonly if k in defaults),
                     accepts_any)


def extra_args_of(tx: GradientTransformation) -> ExtraArgs:
    """The extra arguments ``tx.update`` declares.

    Read from a declaration made with `with_extra_args`, else from the signature: every
    keyword-only parameter is an extra argument (required when it has no default); a bare
    ``**kwargs`` accepts anything.

    Args:
        tx: a `GradientTransformation`.

    Returns:
        An `ExtraArgs` (``required``, ``optional``, ``accepts_any``).

    References:
        optax.GradientTransformationExtraArgs
        (https://optax.readthedocs.io/en/latest/api/transformations.html).

    Example:
        >>> def update(updates, state, params=None, *, losses, step=0):
        ...     return updates, state
        >>> gx.extra_args_of(gx.GradientTransformation(lambda p: (), update))
        ExtraArgs(required=frozenset({'losses'}), optional=frozenset({'step'}), accepts_any=False)
    """
    if _blind_trace():
        field = _field_info(tx)
        if field is not None and field.extra_args is not None:
            return field.extra_args
        return _extra_args_of_fn(tx.update)
    fn = tx.update
    fn_dict = getattr(fn, "__dict__", None) or {}
    spec = fn_dict.get(_ATTR)
    if spec is not None:
        return spec
    if getattr(fn, "__code__", None) is not None and not inspect.ismethod(fn):
        return _extra_args_of_fn(fn)  # plain functions, closures included
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


def stateless(fn: Callable[..., Updates]) -> GradientTransformation:
    """A transform without state from ``fn(updates, params) -> updates`` (as optax.stateless).

    ``fn`` may take a third parameter ``own`` (an `Ownership`): it is then also declared as the
    transform's owned update (gradxform's own stateless blocks scale their updates in place when
    the caller owns them).

    Args:
        fn: ``fn(updates, params) -> updates`` (``params`` is ``None`` when ``update`` is called
            without them), or ``fn(updates, params, own)``.

    Returns:
        A `GradientTransformation` whose state is `EmptyState`.

    Raises:
        TypeError: ``init`` given something other than a pytree of tensors (e.g. a generator).

    References:
        optax.stateless (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.stateless).

    Example:
        >>> tx = gx.stateless(lambda u, p: {k: v.sign() for k, v in u.items()})
        >>> u, _ = tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([ 1., -1.])
    """
    # (inspect.signature does not trace under torch.compile; inside a dynamo 2.1 trace nothing of
    # ``fn`` can be read: the pure update then serves, which is what an owned one does traced)
    code = None if _blind_trace() else getattr(fn, "__code__", None)
    takes_own = code is not None and "own" in code.co_varnames[:code.co_argcount]

    def init(params: Params) -> EmptyState:
        _tree.check_tree_root(params)  # tx.init(model.parameters()) fails here, with the fix named
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        return fn(updates, params), state

    if not _blind_trace():
        update.__qualname__ = getattr(fn, "__qualname__", "stateless")
    tx = GradientTransformation(init, update)
    if takes_own:
        def owned(updates: Updates, state: EmptyState, params: Params | None, own: Ownership) -> tuple[Updates, EmptyState]:
            return fn(updates, params, own), state

        tx = declare(tx, owned_update=owned)
    return tx


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged: ``u -> u``.

    Returns:
        A `GradientTransformation` whose state is `EmptyState` (``params`` not needed).

    Raises:
        TypeError: ``init`` given something other than a pytree of tensors (e.g. a generator).

    References:
        optax.identity (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.identity).

    Example:
        >>> tx = gx.identity()
        >>> u, _ = tx.update({"w": torch.tensor([1.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]
        tensor([1.])
    """

    def init(params: Params) -> EmptyState:
        _tree.check_tree_root(params)
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None) -> tuple[Updates, EmptyState]:
        del params
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in sequence: ``u <- tx_k(...tx_2(tx_1(u)))``.

    Nested chains are flattened, so ``chain(a, chain(b, c))`` is ``chain(a, b, c)`` and its state
    is the tuple ``(state_a, state_b, state_c)``. Extra keyword arguments given to ``update`` go
    to every member that declares them; a required one that is missing, or one no member
    declares, raises ``TypeError``. Ownership (see `update_in_place`) reaches only the members
    that declare an owned update.

    Args:
        *transforms: the members, in order.

    Returns:
        The chained `GradientTransformation`.

    Raises:
        TypeError: a member is not a transform.

    References:
        optax.chain (https://optax.readthedocs.io/en/latest/api/combining_optimizers.html#optax.chain).

    Example:
        >>> tx = gx.chain(gx.clip_by_global_norm(1.0), gx.scale(-0.1))
        >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([-0.0600, -0.0800])
    """
    members: list[GradientTransformation] = []
    for tx in transforms:
        if not isinstance(tx, GradientTransformation) and not (
            isinstance(tx, tuple) and len(tx) == 2 and all(callable(f) for f in tx)
        ):
            raise TypeError(f"chain() takes GradientTransformations; got {type(tx).__name__}: {tx!r}")
        nested = info_of(tx).members
        if nested is not None:
            members.extend(nested)
        else:
            members.append(tx if isinstance(tx, GradientTransformation) else GradientTransformation(*tx))
    specs = [extra_args_of(tx) for tx in members]
    owned_fns = [info_of(tx).owned_update for tx in members]
    union = union_of(specs)
    # built here, not inside update (rebuilt inside a trace: no property read, see union_of)
    union_check = ExtraArgs(optional=_names(union), accepts_any=False)

    def init(params: Params) -> tuple[Any, ...]:
        _tree.check_tree_root(params)  # before a member consumes a generator
        return tuple(tx.init(params) for tx in members)

    last_apply = info_of(members[-1]).owned_apply if members else None

    def run(updates: Updates, state: tuple[Any, ...], params: Params | None, own: Ownership, apply: bool,
            extra: dict[str, Any]) -> tuple[Updates, tuple[Any, ...]]:
        if not isinstance(state, tuple) or len(state) != len(members):
            got = "None" if state is None else f"{type(state).__name__} of length {len(state) if isinstance(state, tuple) else '?'}"
            raise ValueError(
                f"chain.update() expects the tuple of {len(members)} member states returned by "
                f"chain.init(params), got {got}. Call init(params) first."
            )
        if not union.accepts_any:
            check_extra(union_check, extra, "chain")
        new_states = []
        for i, (tx, s, spec, fn) in enumerate(zip(members, state, specs, owned_fns)):
            kwargs = select_extra(spec, extra)
            missing = sorted(k for k in spec.required if k not in kwargs)
            if missing:
                raise TypeError(
                    f"{transform_name(tx)} (in chain) needs the extra argument {missing[0]!r}, which was not given "
                    f"to update(); pass it as update(updates, state, params, {missing[0]}=...)"
                )
            if apply and i == len(members) - 1:  # the last member adds its update into the params
                updates, s = last_apply(updates, s, params, own, **kwargs)  # type: ignore[misc]
            elif fn is None or own is PURE:
                updates, s = tx.update(updates, s, params, **kwargs)
            else:
                updates, s = fn(updates, s, params, own, **kwargs)
            new_states.append(s)
        return updates, tuple(new_states)

    def owned_update(updates: Updates, state: tuple[Any, ...], params: Params | None, own: Ownership,
                     **extra: Any) -> tuple[Updates, tuple[Any, ...]]:
        return run(updates, state, params, own, False, extra)

    def owned_apply(updates: Updates, state: tuple[Any, ...], params: Params, own: Ownership,
                    **extra: Any) -> tuple[Updates, tuple[Any, ...]]:
        return run(updates, state, params, own, True, extra)

    def update(updates: Updates, state: tuple[Any, ...], params: Params | None = None, **extra: Any) -> tuple[Updates, tuple[Any, ...]]:
        return owned_update(updates, state, params, PURE, **extra)

    with_extra_args(update, union)
    recipe = None
    if not _tree.is_compiling() and all(info_of(m).recipe is not None for m in members):
        recipe = (chain, tuple(members), {})
    return declare(GradientTransformation(init, update), owned_update=owned_update, members=tuple(members),
                   recipe=recipe, owned_apply=owned_apply if last_apply is not None else None, extra_args=union)


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False) -> Params:
    """Return ``params + updates`` leaf by leaf (a ``None`` update keeps the param).

    Each update is cast to its param's dtype, as optax does. Pure by default; with
    ``inplace=True`` the params' tensors are updated in place and returned (for a caller that
    owns them, e.g. a compiled training step that donates its inputs).

    Args:
        params: the params (a pytree of tensors; ``None`` leaves pass).
        updates: the updates, with the params' structure and shapes.
        inplace: add into the params' tensors instead of returning new ones.

    Returns:
        The new params, with the structure of ``params`` (the same tensors when ``inplace``).

    Raises:
        ValueError: ``updates`` differs from ``params`` in structure or in a leaf's shape (the
            message names the path).

    References:
        optax.apply_updates (https://optax.readthedocs.io/en/latest/api/apply_updates.html).

    Example:
        >>> params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
        >>> new = gx.apply_updates(params, {"w": torch.tensor([0.5, -0.5]), "b": None})
        >>> new["w"], new["b"]
        (tensor([1.5000, 1.5000]), tensor([0.5000]))
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
