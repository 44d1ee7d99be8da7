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
  Transforms made from user functions are called purely. A transform that declares an
  ``owned_apply`` (`gradxform.base.call_apply`: RMSprop, Adamax, NAdam, RAdam) adds its last
  term into the params itself, as torch.optim's last ``addcdiv_`` does, with the rounding of
  ``p + u``; the adapter adds the updates of every other transform.
- **Fast paths.** A group whose transform declares a lowering (`gradxform.fastpath`: ``gx.adam``,
  ``gx.adamw``, ``gx.sgd``, ``gx.adagrad`` with constant hyperparameters, optionally after a global-norm clip rule)
  runs on torch's fused kernel when every precondition holds for the step (device in torch's
  fused-supported set with the kernel present, float dtype, contiguous dense params and grads,
  state buffers shaped like the params, eager). ``fused=False`` (or a group's ``fused``) turns it
  off, ``fused=True`` raises when it cannot be taken.
- **Params without a gradient.** They are skipped (no update), except in a group whose alias
  declares ``zeros_for_missing_gradients`` (``gx.lbfgs``, as torch.optim.LBFGS reads a missing
  ``.grad`` as zeros): it gets zeros for them and moves them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from . import fastpath as _fastpath
from . import statemap as _sm
from .statemap import _real
from . import tree as _tree
from .base import GradientTransformation, Ownership, call_apply, call_update

__all__ = ["Optimizer"]

logger = logging.getLogger(__name__)

_TORCH_OPTIONS = {"foreach": None, "capturable": False, "differentiable": False}


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
        TypeError: ``tx`` is not a transform; ``params`` is a single tensor (give a list), as
            torch.optim.
        RuntimeError: ``fused=True`` for a step that cannot take a fused kernel (the reason named).

    ``step(closure=None, **extra_args)`` forwards extra keyword arguments to ``tx.update``. A
    per-param extra (``sum_grad_squared``) is given as a `gradxform.PerParam` (what
    `gradxform.track_sum_grad_squared` returns): each group receives the list of its params'
    entries, ``None`` where a param has none.

    References:
        torch.optim.Optimizer (https://pytorch.org/docs/stable/optim.html); optax's
        ``init``/``update`` contract (https://optax.readthedocs.io/en/latest/api/transformations.html).
        docs/three-ways.md.

    Example:
        >>> opt = gx.Optimizer(model.parameters(), gx.adamw(1e-3))
        >>> model(x).square().mean().backward()
        >>> opt.step()
        >>> opt.zero_grad()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'step']
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
        defaults = {**_sm.probe_hyperparams(tx, first), **_sm.options(tx), **_TORCH_OPTIONS, "fused": fused, "tx_index": 0}
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
            own_keys = {**_sm.probe_hyperparams(own, param_group["params"]), **_sm.options(own)}
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
        key = (id(base),) + tuple(sorted((k, repr(group[k])) for k in self._options(base) if k in group))
        key += tuple((k, group[k] == 0) for k in ("momentum", "weight_decay") if isinstance(group.get(k), (int, float)))
        tx = self._gx_cache.get(key)
        if tx is None:
            tx = self._gx_cache[key] = _sm.for_group(base, group)
        return tx

    def _options(self, tx: GradientTransformation) -> dict[str, Any]:
        """`statemap.options` of ``tx`` (a transform this optimizer holds), computed once: it builds
        the alias's members (``init([])``), too slow to repeat at every step."""
        key = ("options", id(tx))
        found = self._gx_cache.get(key)
        if found is None:
            found = self._gx_cache[key] = (tx, _sm.options(tx))  # tx kept: its id stays its own
        return found[1]

    # -- state: opt.state <-> the transform's pytree --------------------------------------------

    def _layout_for(self, tx: GradientTransformation, ps: list[torch.Tensor]) -> _sm.Layout:
        key = ("layout", id(tx), len(ps))
        layout = self._gx_cache.get(key)
        if layout is None:
            try:
                template = tx.init([None] * len(ps))
            except Exception:  # noqa: BLE001 - an init that needs real params
                logger.debug("tx.init on frozen leaves failed; laying out the state from the params", exc_info=True)
                template = tx.init([p.detach() for p in ps])
            layout = self._gx_cache[key] = _sm.layout_of_template(template, len(ps))
        return layout

    def _synced(self, tx: GradientTransformation, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The group's injected hyperparameter tensors (set from the group before each update)."""
        return self._gx_cache.setdefault(("synced", id(tx), tuple(id(p) for p in params)), {})

    @_eager_only
    def _read(self, group: dict[str, Any], gi: int, live: list[bool]) -> tuple[GradientTransformation, Any]:
        tx = self._tx(group)
        params = group["params"]
        ps = [_real(p) for p in params]
        key = ("absent", id(tx), tuple(id(p) for p in params))
        if key not in self._gx_cache:
            self._gx_cache[key] = _sm.absent_records(tx, ps)
        state = _sm.gather(self._layout_for(tx, ps), tx, group, self.state, ps, live, self._synced(tx, params),
                           self._gx_cache[key])
        _sm.sync_in(state, group, gi)
        return tx, state

    @_eager_only
    def _write(self, group: dict[str, Any], gi: int, tx: GradientTransformation, state: Any) -> None:
        params = group["params"]
        ps = [_real(p) for p in params]
        _sm.scatter(self._layout_for(tx, ps), group, self.state, ps, state, self._synced(tx, params), gi)
        for name, value in _sm.hyperparam_values(state).items():
            if not isinstance(group.get(name), torch.Tensor):
                group[name] = value

    # -- the step    # -- the step -------------------------------------------------------------------------------

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
            params = group["params"]
            grads = [None if p.grad is None else _real(p.grad) for p in params]
            if any(g is None for g in grads) and _sm.zeros_for_missing_gradients(self._tx(group)):
                # torch.optim.LBFGS: a param without a gradient has zeros in the flat gradient
                # and still moves along the flat direction
                grads = [torch.zeros_like(_real(p)) if g is None else g for p, g in zip(params, grads)]
            if all(g is None for g in grads):
                continue
            tx, state = self._read(group, gi, [g is not None for g in grads])
            ps = [_real(p) for p in params]
            maximize = bool(group.get("maximize", False)) and "maximize" not in self._options(tx)
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
                stepped = lowering.step(ps, grads, state, scratch)  # type: ignore[union-attr]
                state = stepped if stepped is not None else \
                    self._generic_step(tx, group, gi, ps, grads, state, extra_args)
            elif sparse and not _sm.takes_sparse_gradients(tx):
                raise RuntimeError(f"param {sparse[0]} of group {gi} has a sparse gradient: only gx.sgd, "
                                   f"gx.adagrad and gx.sparse_adam take sparse gradients, as torch.optim.SGD, Adagrad "
                                   f"and SparseAdam (here: "
                                   f"{why}); use one of them, or dense gradients (e.g. nn.Embedding(sparse=False))")
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
        try:
            # owned: a transform that declares it adds its last term into the params itself
            # (`call_apply`: None returned there), as torch.optim's final addcdiv_ into the params
            updates, state = (call_apply if owned else call_update)(tx, grads, state, ps, own,
                                                                    **_group_extras(extra_args, group["params"]))
        except TypeError as e:  # an extra argument missing or unknown: say how to give it here
            if "update(updates, state, params, " not in str(e):
                raise
            raise TypeError(re.sub(r"update\(updates, state, params, (\w+)=\.\.\.\)", r"opt.step(\1=...)",
                                   str(e).replace("to update()", "to opt.step()"))) from e
        if not isinstance(updates, list) or len(updates) != len(ps):
            raise TypeError(f"the transform of group {gi} returned {type(updates).__name__} updates; expected a "
                            f"list of {len(ps)} tensors (or None) mirroring the params")
        idx = [i for i, u in enumerate(updates) if u is not None and u.layout is torch.strided]
        for i, u in enumerate(updates):  # a sparse update (gx.sparse_adam): added one tensor at a time
            if u is not None and u.layout is not torch.strided:
                ps[i].add_(u if u.dtype == ps[i].dtype else u.to(ps[i].dtype))
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
        """Create the state of every param that requires grad and has none (what its first step
        would start from), without taking a step: a fresh optimizer then has a full
        ``state_dict``, the template that ``torch.distributed.checkpoint`` fills in place. A
        frozen param (``requires_grad=False``) gets none, as in training."""
        for gi, group in enumerate(self.param_groups):
            tx, state = self._read(group, gi, [p.requires_grad for p in group["params"]])
            self._write(group, gi, tx, state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (hooks, ids, casting of floating state to the params'
        dtype and device), after checking each param's entries and shapes against the transform;
        integer state (step counts) is kept as saved (not cast to a float param's dtype), and each
        group keeps its transform (``tx_index``), also when a ``torch.optim`` state dict is
        loaded. A state dict of gradxform 0.1's adapter is converted first."""
        kept = [g.get("tx_index", 0) for g in self.param_groups]
        layout_of = lambda g: self._layout_for(self._tx(g), [_real(p) for p in g["params"]])  # noqa: E731
        state_dict = _sm.upgrade_v1(state_dict, self.param_groups, layout_of)
        _sm.check_loadable(state_dict, self.param_groups, self._tx, layout_of)
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
