"""``gradxform.Optimizer``: any gradient transformation as a ``torch.optim.Optimizer``.

Usage::

    opt = gx.Optimizer(model.parameters(), gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()            # extra arguments: opt.step(losses=...)
        sched.step()

How it maps onto torch.optim:

- **State where torch keeps it.** After a step, ``opt.state[p]`` holds ``p``'s slice of every
  params-shaped leaf of the transform state, under torch.optim's names where the state has a
  torch twin (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``),
  else under the leaf's field name (``mu``, ``trace``, ...) or, where that is ambiguous, its path
  (``1/inner_state/0/mu``): for the aliases with a torch twin, exactly torch's keys. The rest of
  the state (shared counts, clip histories, task weights) is the group's: ``group["tx_state"]``
  maps its paths to tensors (``{"count": tensor(3)}`` for ``gx.adamw``). Injected
  hyperparameters are not stored twice: the group's ``lr``, ``betas``, ... are copied into the
  state before each update. Each step reads the transform state from these places and writes
  the new one back, so torch's own ``state_dict``/``load_state_dict`` (ids, hooks, casting),
  ``copy.deepcopy``, ``torch.distributed.checkpoint`` and ``ZeroRedundancyOptimizer`` see and
  restore everything. A ``torch.optim.SGD``/``Adam``/``AdamW`` state dict loads into
  ``gx.sgd``/``gx.adam``/``gx.adamw`` and continues equal, and the reverse.
- **Groups.** A group holds plain values only: the transform's numeric hyperparameters (``lr``,
  ``betas``, ...: live, copied into the state before each update; one given as a schedule is
  written back after it), the alias's options (``maximize``, ``amsgrad``, ``nesterov``: a group
  that changes one gets the alias rebuilt with it), torch's ``foreach``/``fused``/``capturable``/
  ``differentiable`` and ``tx_index``, the position of its transform in ``opt.transforms``. A
  group dict may bring its own transform under ``"tx"`` (it is moved into ``opt.transforms``).
- **Ownership.** The adapter owns the state, so it calls each transform's owned update
  (`gradxform.base.update_in_place` semantics): transforms that declare one write their new
  state into the old buffers. The user's ``.grad`` is never written on the generic path.
  Transforms made from user functions are called purely.
- **Fast paths.** A group whose transform declares a lowering (`gradxform.fastpath`: ``gx.adam``,
  ``gx.adamw``, ``gx.sgd`` with constant hyperparameters, optionally after a global-norm clip rule)
  runs on torch's fused kernel when every precondition holds for the step (device in torch's
  fused-supported set with the kernel present, float dtype, contiguous dense params and grads,
  state buffers shaped like the params, eager). ``fused=False`` (or a group's ``fused``) turns it
  off, ``fused=True`` raises when it cannot be taken.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Callable, NamedTuple

import optree
import torch

from . import fastpath as _fastpath
from . import tree as _tree
from .base import GradientTransformation, Ownership, call_update, chain, info_of
from .checkpoint import _children
from .combine import find_injected as _find_injected

__all__ = ["Optimizer"]

logger = logging.getLogger(__name__)

_STEPPED = "#stepped"  # a per-param count that only says whether the param was stepped: not stored
_TORCH_OPTIONS = {"foreach": None, "capturable": False, "differentiable": False}
# hyperparameters that are a tuple of numbers (torch.optim's ``betas``); any other 1-d value is a
# per-model vector of `gradxform.batched`
_TUPLE_HYPERPARAMS = frozenset({"betas"})


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


# --- hyperparameters and options ----------------------------------------------------------------


def _hyperparam_values(state: Any) -> dict[str, Any]:
    """Group-facing values (floats, tuples of floats) of the injected hyperparameters; per-model
    values of `gradxform.batched` (an ``(N,)`` lr) are not one group's number and are left out."""
    values: dict[str, Any] = {}
    for inj in _find_injected(state):
        for name, t in inj.hyperparams.items():
            if name in values:
                continue
            if t.ndim == 0:
                values[name] = t.item()
            elif t.ndim == 1 and name in _TUPLE_HYPERPARAMS:
                values[name] = tuple(t.tolist())
    return values


def _probe_hyperparams(tx: GradientTransformation, params: list[torch.Tensor]) -> dict[str, Any]:
    """Initial hyperparameter values of ``tx``, from ``tx.init`` on an empty list (no allocation)
    or, for a transform that needs real params (``partition`` with a fixed labels list), on them."""
    try:
        return _hyperparam_values(tx.init([]))
    except Exception:  # noqa: BLE001 - any failure on the empty probe: use the real params
        logger.debug("tx.init([]) failed; probing hyperparameters with the group's params", exc_info=True)
        return _hyperparam_values(tx.init([_real(p.detach()) for p in params]))


def _aliases(tx: GradientTransformation) -> list[GradientTransformation]:
    """The alias members of ``tx`` (itself, or members of a chain): built by a recorded factory and
    holding injected hyperparameters, whose values and options are the group's."""
    info = info_of(tx)
    found = []
    for m in (info.members if info.members is not None else (tx,)):
        if info_of(m).recipe is None:
            continue
        try:
            if _find_injected(m.init([])):
                found.append(m)
        except Exception:  # noqa: BLE001 - an init that needs params: not an alias
            logger.debug("init([]) failed for a member; not treated as an alias", exc_info=True)
    return found


def _options(tx: GradientTransformation) -> dict[str, bool]:
    """The alias options (bool arguments: ``maximize``, ``amsgrad``, ``nesterov``) ``tx`` was built
    with; they become group keys, and a group that changes one gets the alias rebuilt."""
    out: dict[str, bool] = {}
    for m in _aliases(tx):
        for k, v in info_of(m).recipe[2].items():  # type: ignore[index]
            if isinstance(v, bool):
                out.setdefault(k, v)
    return out


def _structural(old: Any, new: Any) -> bool:
    """Whether a group value needs the alias rebuilt: a changed option, or a numeric
    hyperparameter switched on or off (an alias leaves out blocks whose value is 0)."""
    if isinstance(old, bool) or isinstance(new, bool):
        return bool(old) != bool(new)
    if isinstance(new, torch.Tensor) and new.numel() != 1:
        return False  # refused with a clear message when it is copied into the state
    if isinstance(old, (int, float)) and isinstance(new, (int, float, torch.Tensor)):
        return (old == 0) != bool(new == 0)
    return False


def _for_group(tx: GradientTransformation, group: dict[str, Any]) -> GradientTransformation:
    """``tx`` with its alias members rebuilt where the group changes them structurally."""

    aliases = {id(m) for m in _aliases(tx)}

    def rebuilt(member: GradientTransformation) -> GradientTransformation:
        recipe = info_of(member).recipe
        if recipe is None or id(member) not in aliases:
            return member
        factory, args, kwargs = recipe
        overrides = {k: group[k] for k, v in kwargs.items() if k in group and _structural(v, group[k])}
        if not overrides:
            return member
        fresh = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in overrides.items()}
        return factory(*args, **{**kwargs, **fresh})

    members = info_of(tx).members
    if members is None:
        return rebuilt(tx)
    new = [rebuilt(m) for m in members]
    return tx if all(a is b for a, b in zip(new, members)) else chain(*new)


# --- the state layout ---------------------------------------------------------------------------


class _Layout(NamedTuple):
    """Where each leaf of a group's transform state lives: ``(i, key)`` in ``opt.state[p_i]``,
    ``(None, key)`` in ``group["tx_state"]``, ``(-1, key)`` an injected hyperparameter that the
    group's own value sets before every update (not saved twice)."""

    spec: Any
    records: list[tuple[int | None, str]]
    paths: list[str]  # each leaf's field path, dotted (the key of gradxform 0.1's adapter)
    shared: frozenset[str]  # the group keys that hold a tensor (the others are None)
    synced: dict[str, torch.Tensor]  # initial values of the (-1, key) leaves


def _layout(template: Any, n: int) -> _Layout:
    """The layout of a state made by ``tx.init`` on ``n`` params: a leaf whose parent is a list of
    ``n`` tensors (or ``None``) is a per-param leaf, named by torch's key for its field where the
    state class declares one (``torch_state_keys``), else by the field's name, else by its path,
    whichever is unique in the state."""
    paths, leaves, spec = optree.tree_flatten_with_path(template, none_is_leaf=True)
    synced_ids = {id(t) for inj in _find_injected(template) for t in inj.hyperparams.values()}
    located: list[tuple[list[str], bool, Any]] = []  # (names on the path, per-param, owner of the field)
    for path in paths:
        node, chain_of, names = template, [], []
        for entry in path:
            key = node._fields[entry] if hasattr(node, "_fields") else str(entry)
            chain_of.append(node)
            names.append(key)
            node = dict(_children(node))[key]
        parent = chain_of[-1] if chain_of else None
        per_param = (isinstance(parent, list) and len(parent) == n
                     and all(x is None or isinstance(x, torch.Tensor) for x in parent))
        located.append((names, per_param, chain_of[-2] if len(chain_of) >= 2 else None))
    options: dict[tuple[str, ...], list[str]] = {}
    for names, per_param, owner in located:
        field = tuple(names[:-1])
        if per_param and field and field[-1] in getattr(type(owner), "stepped_flags", ()):
            options[field] = [_STEPPED]
        elif per_param and field not in options:
            torch_key = getattr(type(owner), "torch_state_keys", {}).get(field[-1]) if field else None
            options[field] = [o for o in (torch_key, field[-1] if field else None, "/".join(field) or "state") if o]
    chosen: dict[tuple[str, ...], str] = {}
    for level in range(3):
        proposals = {f: o[min(level, len(o) - 1)] for f, o in options.items() if f not in chosen}
        taken = list(chosen.values()) + list(proposals.values())
        chosen.update({f: name for f, name in proposals.items() if taken.count(name) == 1})
    records = [(int(names[-1]), chosen.get(tuple(names[:-1]), "/".join(names[:-1]))) if per_param
               else (-1 if id(leaf) in synced_ids else None, "/".join(names))
               for (names, per_param, _), leaf in zip(located, leaves)]
    dotted = [".".join(names[:-1] if per_param else names) for names, per_param, _ in located]
    shared = frozenset(key for (i, key), leaf in zip(records, leaves) if i is None and leaf is not None)
    synced = {key: leaf for (i, key), leaf in zip(records, leaves) if i == -1}
    return _Layout(spec, records, dotted, shared, synced)


def _eager_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` outside any ``torch.compile`` trace (a graph break where it is called): the
    state's traffic with ``opt.state`` and the group's Python hyperparameters (which an LR
    scheduler rewrites between steps) must not be baked into a graph."""

    disabled: list[Callable[..., Any]] = []  # made on the first traced call: no dynamo import at import time

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _tree.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a `gradxform.GradientTransformation`.

    Each step passes the group's gradients through ``tx`` (its owned update: the adapter owns the
    state) and adds the updates to the params in place; the state lives in ``opt.state`` (see the
    module docstring for the layout), so torch's tooling sees it.

    Args:
        params: an iterable of tensors or of param-group dicts, as for any torch optimizer. A group
            dict may carry its own transform under ``"tx"``, hyperparameter overrides (``"lr"``,
            a tensor lr of shape ``()`` or ``(1,)`` too), alias options (``"maximize"``,
            ``"amsgrad"``, ``"nesterov"``) and torch's ``"foreach"``, ``"fused"``,
            ``"capturable"``, ``"differentiable"``.
        tx: the transform for groups that bring none. Its injected hyperparameters (see
            `gradxform.inject_hyperparams`; all aliases have them) become the defaults.
        fused: ``None`` (default): take a declared fast path (`gradxform.fastpath`) where every
            precondition holds; ``False``: never (the generic path, which rounds as
            ``torch.optim``'s ``foreach=True``); ``True``: require it. A group's ``"fused"`` key
            overrides it.

    Raises:
        TypeError: ``tx`` is not a transform.
        TypeError: ``params`` is a single tensor (give a list), as torch.optim.
        ValueError: ``capturable=True`` (CUDA graph capture of the step is not supported).
        RuntimeError: ``fused=True`` for a step that cannot take a fused kernel (the reason named).

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adamw(1e-3))
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'step']

    ``step(closure=None, **extra_args)`` forwards extra keyword arguments to ``tx.update``. A
    per-param extra (``sum_grad_squared``) is given as a `gradxform.PerParam` (what
    `gradxform.track_sum_grad_squared` returns): each group receives the list of its params'
    entries, ``None`` where a param has none.
    """

    def __init__(self, params: Iterable[Any], tx: GradientTransformation, *, fused: bool | None = None) -> None:
        if not (isinstance(tx, tuple) and len(tx) == 2 and callable(tx[0]) and callable(tx[1])):
            raise TypeError(f"gradxform.Optimizer needs a GradientTransformation as tx; got {tx!r}")
        tx = tx if isinstance(tx, GradientTransformation) else GradientTransformation(*tx)
        self.transforms: list[GradientTransformation] = [tx]
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, but "
                            f"got {torch.typename(params)} (gradxform.Optimizer takes params as torch.optim: pass [p])")
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
                      for g in params]
            first = params[0]["params"]
        else:
            first = params
        defaults = {**_probe_hyperparams(tx, first), **_options(tx), **_TORCH_OPTIONS, "fused": fused, "tx_index": 0}
        self._gx_cache: dict[Any, Any] = {}
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "transforms": self.transforms}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._gx_cache = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one with its own ``"tx"`` takes its hyperparameter defaults from it."""
        if isinstance(param_group, dict) and "tx" in param_group:
            param_group = dict(param_group)
            own = param_group.pop("tx")
            if not (isinstance(own, tuple) and len(own) == 2):
                raise TypeError(f"param group 'tx' must be a GradientTransformation; got {own!r}")
            own = own if isinstance(own, GradientTransformation) else GradientTransformation(*own)
            given = set(param_group)
            param_group["params"] = ([param_group["params"]] if isinstance(param_group["params"], torch.Tensor)
                                     else list(param_group["params"]))
            own_keys = {**_probe_hyperparams(own, param_group["params"]), **_options(own)}
            for k, v in own_keys.items():
                param_group.setdefault(k, v)
            param_group["tx_index"] = self._index_of(own)
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            for k in list(group):  # hyperparameters that only the default transform has
                if k in self.defaults and k not in own_keys and k not in given and k not in _TORCH_OPTIONS \
                        and k not in ("fused", "tx_index", "params"):
                    del group[k]
            return
        super().add_param_group(param_group)

    def _index_of(self, tx: GradientTransformation) -> int:
        for i, known in enumerate(self.transforms):
            if known is tx:
                return i
        self.transforms.append(tx)
        return len(self.transforms) - 1

    def _tx(self, group: dict[str, Any]) -> GradientTransformation:
        if "tx" in group:  # put back by a wrapper that copies group keys (ZeroRedundancyOptimizer)
            group["tx_index"] = self._index_of(group.pop("tx"))
        base = self.transforms[group.get("tx_index", 0)]
        key = (id(base),) + tuple(sorted((k, repr(group[k])) for k in _options(base) if k in group))
        key += tuple((k, group[k] == 0) for k in ("momentum", "weight_decay") if isinstance(group.get(k), (int, float)))
        tx = self._gx_cache.get(key)
        if tx is None:
            tx = self._gx_cache[key] = _for_group(base, group)
        return tx

    # -- state: opt.state <-> the transform's pytree --------------------------------------------

    def _layout_for(self, tx: GradientTransformation, ps: list[torch.Tensor]) -> _Layout:
        key = ("layout", id(tx), len(ps))
        layout = self._gx_cache.get(key)
        if layout is None:
            try:
                template = tx.init([None] * len(ps))
            except Exception:  # noqa: BLE001 - an init that needs real params
                logger.debug("tx.init on frozen leaves failed; laying out the state from the params", exc_info=True)
                template = tx.init([p.detach() for p in ps])
            layout = self._gx_cache[key] = _layout(template, len(ps))
        return layout

    def _gather(self, tx: GradientTransformation, group: dict[str, Any], ps: list[torch.Tensor],
                live: list[bool], gi: int) -> Any:
        """The transform state of a group, read from ``opt.state`` and ``group["tx_state"]``;
        params without state that have a gradient now get their initial state, the others
        ``None`` (frozen)."""
        params = group["params"]
        layout = self._layout_for(tx, ps)
        per_param_keys = {key for i, key in layout.records if i is not None and i >= 0 and key != _STEPPED}
        stored = [self.state.get(p) or {} for p in params]
        has = [any(k in d for k in per_param_keys) for d in stored]
        shared = group.get("tx_state") or {}
        synced = self._gx_cache.setdefault(("synced", id(tx), tuple(id(p) for p in params)), {})
        need = [live[i] and not has[i] for i in range(len(params))]
        # a buffer the transform keeps now but the param's state lacks (the group switched a block
        # on, e.g. momentum): created at its initial value, as torch.optim creates state lazily
        partial = [has[i] and not all(key in stored[i] for j, key in layout.records if j == i and key != _STEPPED)
                   for i in range(len(params))]
        fresh: list[Any] = []
        if any(need) or any(partial) or not layout.shared <= shared.keys():
            init = tx.init([p.detach() if need[i] or partial[i] else None for i, p in enumerate(ps)])
            fresh = optree.tree_flatten(init, none_is_leaf=True)[0]
        leaves = []
        for j, (i, key) in enumerate(layout.records):
            if i is None:
                leaves.append(shared[key] if key in shared else fresh[j] if key in layout.shared else None)
            elif i == -1:  # set from the group by _sync_in
                if key not in synced:
                    synced[key] = layout.synced[key].clone()
                leaves.append(synced[key])
            elif need[i]:
                leaves.append(fresh[j])
            elif not has[i]:
                leaves.append(None)
            elif key == _STEPPED:
                leaves.append(torch.ones((), dtype=torch.int64))
            else:
                t = stored[i].get(key)
                if t is None:
                    t = fresh[j]
                elif key == "step" and not isinstance(t, torch.Tensor):
                    t = torch.tensor(int(t), dtype=torch.int64)  # a number (torch.optim takes one too)
                elif key == "step" and t.is_floating_point():
                    t = t.to(torch.int64)  # torch.optim's float step
                if t.is_complex():
                    t = torch.view_as_real(t)
                leaves.append(t)
        return optree.tree_unflatten(layout.spec, leaves)

    def _scatter(self, tx: GradientTransformation, group: dict[str, Any], ps: list[torch.Tensor],
                 new_state: Any, gi: int) -> None:
        params = group["params"]
        layout = self._layout_for(tx, ps)
        leaves, spec = optree.tree_flatten(new_state, none_is_leaf=True)
        if spec != layout.spec:
            raise ValueError(f"the transform of group {gi} returned a state of another structure than its init "
                             f"gives: {spec} vs {layout.spec}")
        synced = self._gx_cache.setdefault(("synced", id(tx), tuple(id(p) for p in params)), {})
        shared = group.setdefault("tx_state", {}) if layout.shared else {}
        for (i, key), leaf in zip(layout.records, leaves):
            if leaf is None:
                continue
            if i is None:
                shared[key] = leaf
            elif i == -1:
                synced[key] = leaf
            elif key != _STEPPED:
                p = params[i]
                self.state[p][key] = torch.view_as_complex(leaf) if p.is_complex() and leaf.shape == ps[i].shape else leaf

    @_eager_only
    def _read(self, group: dict[str, Any], gi: int, live: list[bool]) -> tuple[GradientTransformation, Any]:
        tx = self._tx(group)
        params = group["params"]
        ps = [_real(p) for p in params]
        state = self._gather(tx, group, ps, live, gi)
        self._sync_in(state, group, gi)
        return tx, state

    @_eager_only
    def _write(self, group: dict[str, Any], gi: int, tx: GradientTransformation, state: Any) -> None:
        params = group["params"]
        self._scatter(tx, group, [_real(p) for p in params], state, gi)
        for name, value in _hyperparam_values(state).items():
            if not isinstance(group.get(name), torch.Tensor):
                group[name] = value

    @staticmethod
    def _sync_in(state: Any, group: dict[str, Any], gi: int) -> None:
        for inj in _find_injected(state):
            for name, t in inj.hyperparams.items():
                if name not in group:
                    continue
                value = group[name]
                if isinstance(value, torch.Tensor):
                    if value.numel() != t.numel():
                        raise ValueError(f"group {gi}: '{name}' is a tensor of shape {tuple(value.shape)}; give a "
                                         f"number or a tensor of {t.numel()} element(s) (shape () or (1,) for one)")
                    t.copy_(value.detach().reshape(t.shape))
                elif t.ndim == 1:
                    t.copy_(torch.tensor([float(v) for v in value], dtype=t.dtype))
                else:
                    t.fill_(float(value))

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **extra_args: Any) -> Any:  # type: ignore[override]
        """Run one update of every group's transform and add it to the params in place.

        Args:
            closure: re-evaluates the model and returns the loss (as for any torch optimizer).
            **extra_args: extra arguments of the transforms (``losses=...``,
                ``sum_grad_squared=...``), given to every group.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            if group.get("capturable"):
                raise ValueError(f"group {gi}: capturable=True (CUDA graph capture of the step) is not supported by "
                                 "gradxform.Optimizer; compile the functional step instead (docs: three ways)")
            params = group["params"]
            grads = [None if p.grad is None else _real(p.grad) for p in params]
            if all(g is None for g in grads):
                continue
            tx, state = self._read(group, gi, [g is not None for g in grads])
            ps = [_real(p) for p in params]
            maximize = bool(group.get("maximize", False)) and "maximize" not in _options(tx)
            if maximize:
                grads = [None if g is None else -g for g in grads]
            sparse = [i for i, g in enumerate(grads) if g is not None and g.layout is not torch.strided]
            fused = group.get("fused")
            differentiable = bool(group.get("differentiable"))
            lowering = None if extra_args or differentiable or (fused is False and not sparse) else \
                _fastpath.lowering_of(tx)
            why = "no fused lowering declared" if lowering is None else lowering.unsupported(ps, grads, state)
            if why is None:  # a fused kernel, or torch's exact per-tensor SGD for sparse gradients
                scratch = self._gx_cache.setdefault(("scratch", tuple(id(p) for p in params)), [None] * len(params))
                state = lowering.step(ps, grads, state, scratch)  # type: ignore[union-attr]
            elif sparse:
                raise RuntimeError(f"param {sparse[0]} of group {gi} has a sparse gradient: only gx.sgd takes sparse "
                                   f"gradients, as torch.optim.SGD (here: {why}); use dense gradients (e.g. "
                                   "nn.Embedding(sparse=False))")
            elif fused is True:
                raise RuntimeError(f"group {gi}: `fused=True` requires all the params to be floating point Tensors on "
                                   "a device where torch's fused kernel runs, and a transform that declares a fused "
                                   f"lowering; this step cannot take one: {why}")
            elif differentiable:  # as torch.optim: the update is recorded by autograd (pure, out of place)
                with torch.enable_grad(), _tree.differentiable():
                    state = self._generic_step(tx, group, gi, ps, grads, state, extra_args, owned=False)
            else:
                state = self._generic_step(tx, group, gi, ps, grads, state, extra_args)
            self._write(group, gi, tx, state)
        return loss

    def _generic_step(self, tx: GradientTransformation, group: dict[str, Any], gi: int, ps: list[torch.Tensor],
                      grads: list[torch.Tensor | None], state: Any, extra_args: dict[str, Any], owned: bool = True) -> Any:
        user = [p.grad for p in group["params"] if p.grad is not None]
        own = Ownership(state=owned, protected=frozenset(id(g) for g in user + [g for g in grads if g is not None]),
                        updates=owned)
        updates, state = call_update(tx, grads, state, ps, own, **_group_extras(extra_args, group["params"]))
        if not isinstance(updates, list) or len(updates) != len(ps):
            raise TypeError(f"the transform of group {gi} returned {type(updates).__name__} updates; expected a "
                            f"list of {len(ps)} tensors (or None) mirroring the params")
        idx = [i for i, u in enumerate(updates) if u is not None]
        if idx:
            deltas = [updates[i] if updates[i].dtype == ps[i].dtype else updates[i].to(ps[i].dtype) for i in idx]
            torch._foreach_add_([ps[i] for i in idx], deltas)
        return state

    # -- reading and loading ----------------------------------------------------------------------

    def tx_state(self, group_index: int = 0) -> Any:
        """The transform state of a param group, read from ``opt.state`` (its initial state for
        params that have none yet).

        Args:
            group_index: which param group.

        Returns:
            The state pytree, as ``tx.init`` / ``tx.update`` make it.
        """
        group = self.param_groups[group_index]
        return self._read(group, group_index, [True] * len(group["params"]))[1]

    def init_state(self) -> None:
        """Create the state of every param that has none (what its first step would start from),
        without taking a step: a fresh optimizer then has a full ``state_dict``, the template
        that ``torch.distributed.checkpoint`` fills in place."""
        for gi, group in enumerate(self.param_groups):
            tx, state = self._read(group, gi, [True] * len(group["params"]))
            self._write(group, gi, tx, state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (hooks, ids, casting of floating state to the params'
        dtype and device), after checking each param's entries and shapes against the transform;
        integer state (step counts) is kept as saved (not cast to a float param's dtype), and each
        group keeps its transform (``tx_index``), also when a ``torch.optim`` state dict is
        loaded. A state dict of gradxform 0.1's adapter is converted first."""
        kept = [g.get("tx_index", 0) for g in self.param_groups]
        state_dict = self._upgrade(state_dict)
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, current):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()):
                    self.state[p][key] = value.clone()
        for g, index in zip(self.param_groups, kept):
            g["tx_index"] = index
            g.setdefault("fused", self.defaults.get("fused"))

    def _upgrade(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state dict of gradxform 0.1's adapter (buffers keyed by dotted path, the group's other
        tensors under ``param_groups[i]["tx_state"]``) in this layout."""
        groups = state_dict.get("param_groups", [])
        if not any("gradxform_format" in g for g in groups) or len(groups) != len(self.param_groups):
            return state_dict
        state = {pid: dict(v) for pid, v in state_dict["state"].items()}
        new_groups = []
        for group, saved in zip(self.param_groups, groups):
            saved = dict(saved)
            old_shared = saved.pop("tx_state", {})
            saved.pop("gradxform_format", None)
            layout = self._layout_for(self._tx(group), [_real(p) for p in group["params"]])
            saved["tx_state"] = {}
            for (i, key), path in zip(layout.records, layout.paths):
                if i is None and path in old_shared:
                    saved["tx_state"][key] = old_shared[path]
                elif i is not None and 0 <= i < len(saved["params"]):
                    entries = state.get(saved["params"][i], {})
                    if path in entries:
                        entries[key] = entries.pop(path)
            new_groups.append(saved)
        return {**state_dict, "state": state, "param_groups": new_groups}

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Before anything is loaded: each param's saved entries must be the buffers the group's
        transform keeps for it (torch's names included), with the shapes it gives that param
        (found from an init on meta tensors: no allocation)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return  # torch's load_state_dict says so
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            params = group["params"]
            if len(saved["params"]) != len(params):
                return
            tx = self._tx(group)
            try:
                template = tx.init([torch.empty_like(_real(p), device="meta") for p in params])
            except Exception:  # noqa: BLE001 - a transform whose init needs real values: torch's checks only
                logger.debug("meta init failed; not checking the loaded state", exc_info=True)
                continue
            leaves = optree.tree_flatten(template, none_is_leaf=True)[0]
            records = self._layout_for(tx, [_real(p) for p in params]).records
            expect: list[dict[str, torch.Tensor]] = [{} for _ in params]
            for (i, key), like in zip(records, leaves):
                if i is not None and i >= 0 and like is not None and key != _STEPPED:
                    expect[i][key] = like
            for i, pid in enumerate(saved["params"]):
                entries = state_dict["state"].get(pid, {})
                own = set(entries)
                if not own:
                    continue
                unknown, missing = own - expect[i].keys(), expect[i].keys() - own
                if unknown or missing:
                    raise ValueError(f"group {gi}: the loaded state of param {i} has {sorted(own)}; this transform keeps "
                                     f"{sorted(expect[i])} (unknown {sorted(unknown)}, missing {sorted(missing)}): was it "
                                     "saved from an optimizer with this transform?")
                for key, like in expect[i].items():
                    value = entries.get(key)
                    if isinstance(value, torch.Tensor):
                        shape = value.shape + ((2,) if value.is_complex() else ())
                        if shape != like.shape:
                            raise ValueError(f"group {gi}: the loaded '{key}' of param {i} has shape {tuple(shape)}, "
                                             f"the param needs {tuple(like.shape)}: was the state dict saved for this "
                                             "model?")


def _group_extras(extra: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """Per-param extras (a mapping from params, e.g. `gradxform.PerParam`) become the group's
    list, ``None`` for params without an entry; other extras pass unchanged."""
    out = {}
    for k, v in extra.items():
        if isinstance(v, Mapping) and not isinstance(v, dict):
            vals = [v.get(p) for p in params]
            out[k] = [None if x is None else _real(x) for x in vals]
        else:
            out[k] = v
    return out
