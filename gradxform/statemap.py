"""The two-way map between a transform's state and torch.optim's places for it.

`gradxform.Optimizer` keeps no private copy of a transform state. For a param group, the state
pytree that ``tx.init`` makes is split (`Layout`):

- a leaf whose parent is a list with one entry per param is that param's: it lives in
  ``opt.state[p][key]``, ``key`` being torch.optim's name where the state class declares one
  (a ``torch_state_keys`` class attribute, e.g. ``ScaleByAdamState``: ``count`` -> ``step``,
  ``mu`` -> ``exp_avg``), else the field's name, else its path (``1/inner_state/0/mu``),
  whichever is unique; a per-param count that only says whether the param was stepped
  (``stepped_flags``, torch.optim.SGD keeps none) is not stored;
- an injected hyperparameter is the group's own value (``group["lr"]``): not stored twice;
- a state class that declares ``torch_first_param_keys`` (torch.optim.LBFGS's history) lives,
  as in torch, in ``opt.state[params[0]]`` under those keys: the class converts itself with
  ``to_torch_state()`` and ``from_torch_state(entries, like)`` (`FirstParamNode`);
- a state class that declares ``torch_python_ints`` (fields whose torch value is a Python int,
  torch.optim.SparseAdam's ``step``) is stored with those fields as Python ints;
- every other leaf (combinator counts, clip histories, task weights) is the group's:
  ``group["tx_state"][path]``.

`gather` builds the state from those places before an update and `scatter` writes the new one
back, so torch's ``state_dict``/``load_state_dict``, ``copy.deepcopy``, DCP and ZeRO see it.
The helpers for group options (`options`, `for_group`) and the checks made before a state dict
is loaded (`check_loadable`, `upgrade_v1`) live here too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import optree
import torch

from .base import GradientTransformation, chain, info_of
from .checkpoint import _children
from .combine import find_injected as _find_injected

__all__ = ["Layout", "FirstParamNode", "layout_of_template", "absent_records", "gather", "scatter", "sync_in", "options", "for_group",
           "probe_hyperparams", "hyperparam_values", "takes_sparse_gradients", "zeros_for_missing_gradients",
           "check_loadable", "upgrade_v1"]

logger = logging.getLogger(__name__)

STEPPED = "#stepped"  # a per-param count that only says whether the param was stepped: not stored
FIRST = -2  # the record index of a leaf of a state kept in opt.state[params[0]] (see FirstParamNode)
# hyperparameters that are a tuple of numbers (torch.optim's ``betas``); any other 1-d value is a
# per-model vector of `gradxform.batched`
_TUPLE_HYPERPARAMS = frozenset({"betas", "etas", "step_sizes"})


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def hyperparam_values(state: Any) -> dict[str, Any]:
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


def probe_hyperparams(tx: GradientTransformation, params: list[torch.Tensor]) -> dict[str, Any]:
    """Initial hyperparameter values of ``tx``, from ``tx.init`` on an empty list (no allocation)
    or, for a transform that needs real params (``partition`` with a fixed labels list), on them."""
    try:
        return hyperparam_values(tx.init([]))
    except Exception:  # noqa: BLE001 - any failure on the empty probe: use the real params
        logger.debug("tx.init([]) failed; probing hyperparameters with the group's params", exc_info=True)
        return hyperparam_values(tx.init([_real(p.detach()) for p in params]))


def aliases(tx: GradientTransformation) -> list[GradientTransformation]:
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


def _declared_options(member: GradientTransformation) -> dict[str, Any]:
    """The group options an alias's factory declares with ``torch_group_options(kwargs) -> dict``
    (torch.optim.LBFGS's ``max_iter``, ``history_size``, ...: static arguments that torch keeps in
    the group, resolved as torch resolves them)."""
    factory, _, kwargs = info_of(member).recipe  # type: ignore[misc]
    declare = getattr(factory, "torch_group_options", None)
    return dict(declare(kwargs)) if declare is not None else {}


def options(tx: GradientTransformation) -> dict[str, Any]:
    """The alias options (bool arguments: ``maximize``, ``amsgrad``, ``nesterov``, and the static
    options an alias declares, see `_declared_options`) ``tx`` was built with; they become group
    keys, and a group that changes one gets the alias rebuilt."""
    out: dict[str, Any] = {}
    for m in aliases(tx):
        for k, v in info_of(m).recipe[2].items():  # type: ignore[index]
            if isinstance(v, bool):
                out.setdefault(k, v)
        for k, v in _declared_options(m).items():
            out.setdefault(k, v)
    return out


def takes_sparse_gradients(tx: GradientTransformation) -> bool:
    """Whether ``tx`` is an alias whose factory declares ``takes_sparse_gradients = True`` (it
    updates from COO gradients and returns COO updates, e.g. ``gx.sparse_adam``): the adapter then
    passes sparse gradients through its generic path without densifying them."""
    recipe = info_of(tx).recipe
    return recipe is not None and bool(getattr(recipe[0], "takes_sparse_gradients", False))


def zeros_for_missing_gradients(tx: GradientTransformation) -> bool:
    """Whether ``tx`` is an alias whose factory declares ``zeros_for_missing_gradients = True``
    (``gx.lbfgs``: torch.optim.LBFGS reads a missing ``.grad`` as zeros and moves every param of
    its group along the flat direction): the adapter then hands the transform a zero gradient for
    each param of the group without one (when some param has one), so the transform updates it."""
    recipe = info_of(tx).recipe
    return recipe is not None and bool(getattr(recipe[0], "zeros_for_missing_gradients", False))


def structural(old: Any, new: Any) -> bool:
    """Whether a group value needs the alias rebuilt: a changed option, or a numeric
    hyperparameter switched on or off (an alias leaves out blocks whose value is 0)."""
    if isinstance(old, bool) or isinstance(new, bool):
        return bool(old) != bool(new)
    if isinstance(new, torch.Tensor) and new.numel() != 1:
        return False  # refused with a clear message when it is copied into the state
    if isinstance(old, (int, float)) and isinstance(new, (int, float, torch.Tensor)):
        return (old == 0) != bool(new == 0)
    return False


def for_group(tx: GradientTransformation, group: dict[str, Any]) -> GradientTransformation:
    """``tx`` with its alias members rebuilt where the group changes them structurally."""

    alias_ids = {id(m) for m in aliases(tx)}

    def rebuilt(member: GradientTransformation) -> GradientTransformation:
        recipe = info_of(member).recipe
        if recipe is None or id(member) not in alias_ids:
            return member
        factory, args, kwargs = recipe
        overrides = {k: group[k] for k, v in kwargs.items() if k in group and structural(v, group[k])}
        declared = _declared_options(member)
        if any(k in group and group[k] != v for k, v in declared.items()):
            overrides.update({k: group[k] for k in declared if k in group})  # as torch: the group's values
        if not overrides:
            return member
        fresh = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in overrides.items()}
        return factory(*args, **{**kwargs, **fresh})

    members = info_of(tx).members
    if members is None:
        return rebuilt(tx)
    new = [rebuilt(m) for m in members]
    return tx if all(a is b for a, b in zip(new, members)) else chain(*new)


class FirstParamNode(NamedTuple):
    """A state node kept in ``opt.state[params[0]]`` in torch's own format, as torch.optim.LBFGS
    keeps its (global) state. Its class declares ``torch_first_param_keys`` (every key it may
    write there), a method ``to_torch_state() -> dict`` (torch's entries; a key left out is absent)
    and a classmethod ``from_torch_state(entries, like) -> state`` (``like``: the node of a
    template from ``tx.init``, for what torch's entries lack). Its fields must be leaves."""

    cls: type
    leaves: tuple[int, ...]  # the positions of its fields among the state's leaves
    like: Any  # the node of the layout's template


class Layout(NamedTuple):
    """Where each leaf of a group's transform state lives: ``(i, key)`` in ``opt.state[p_i]``,
    ``(None, key)`` in ``group["tx_state"]``, ``(-1, key)`` an injected hyperparameter that the
    group's own value sets before every update (not saved twice), ``(FIRST, path)`` a field of a
    `FirstParamNode`."""

    spec: Any
    records: list[tuple[int | None, str]]
    paths: list[str]  # each leaf's field path, dotted (the key of gradxform 0.1's adapter)
    shared: frozenset[str]  # the group keys that hold a tensor (the others are None)
    synced: dict[str, torch.Tensor]  # initial values of the (-1, key) leaves
    first: tuple[FirstParamNode, ...] = ()
    python_ints: frozenset[str] = frozenset()  # per-param keys whose torch value is a Python int


def layout_of_template(template: Any, n: int) -> Layout:
    """The layout of a state made by ``tx.init`` on ``n`` params: a leaf whose parent is a list of
    ``n`` tensors (or ``None``) is a per-param leaf, named by torch's key for its field where the
    state class declares one (``torch_state_keys``), else by the field's name, else by its path,
    whichever is unique in the state."""
    paths, leaves, spec = optree.tree_flatten_with_path(template, none_is_leaf=True)
    synced_ids = {id(t) for inj in _find_injected(template) for t in inj.hyperparams.values()}
    located: list[tuple[list[str], bool, Any]] = []  # (names on the path, per-param, owner of the field)
    first_nodes: dict[int, tuple[Any, list[int]]] = {}  # id(node) -> (node, its leaves)
    in_first: dict[int, str] = {}  # leaf position -> its path, for the leaves of such nodes
    for j, path in enumerate(paths):
        node, chain_of, names = template, [], []
        for entry in path:
            key = node._fields[entry] if hasattr(node, "_fields") else str(entry)
            chain_of.append(node)
            names.append(key)
            node = dict(_children(node))[key]
        parent = chain_of[-1] if chain_of else None
        if parent is not None and hasattr(type(parent), "torch_first_param_keys"):
            first_nodes.setdefault(id(parent), (parent, []))[1].append(j)
            in_first[j] = "/".join(names)
        per_param = (j not in in_first and isinstance(parent, list) and len(parent) == n
                     and all(x is None or isinstance(x, torch.Tensor) for x in parent))
        located.append((names, per_param, chain_of[-2] if len(chain_of) >= 2 else None))
    first = []
    for node, js in first_nodes.values():
        if len(js) != len(node._fields):
            raise TypeError(f"{type(node).__name__} declares torch_first_param_keys: its fields must be leaves")
        first.append(FirstParamNode(type(node), tuple(js), node))
    options: dict[tuple[str, ...], list[str]] = {}
    for names, per_param, owner in located:
        field = tuple(names[:-1])
        if per_param and field and field[-1] in getattr(type(owner), "stepped_flags", ()):
            options[field] = [STEPPED]
        elif per_param and field not in options:
            torch_key = getattr(type(owner), "torch_state_keys", {}).get(field[-1]) if field else None
            options[field] = [o for o in (torch_key, field[-1] if field else None, "/".join(field) or "state") if o]
    chosen: dict[tuple[str, ...], str] = {}
    for level in range(3):
        proposals = {f: o[min(level, len(o) - 1)] for f, o in options.items() if f not in chosen}
        taken = list(chosen.values()) + list(proposals.values())
        chosen.update({f: name for f, name in proposals.items() if taken.count(name) == 1})
    records = [(int(names[-1]), chosen.get(tuple(names[:-1]), "/".join(names[:-1]))) if per_param
               else (FIRST, in_first[j]) if j in in_first
               else (-1 if id(leaf) in synced_ids else None, "/".join(names))
               for j, ((names, per_param, _), leaf) in enumerate(zip(located, leaves))]
    dotted = [".".join(names[:-1] if per_param else names) for names, per_param, _ in located]
    shared = frozenset(key for (i, key), leaf in zip(records, leaves) if i is None and leaf is not None)
    synced = {key: leaf for (i, key), leaf in zip(records, leaves) if i == -1}
    python_ints = frozenset(chosen[tuple(names[:-1])] for names, per_param, owner in located
                            if per_param and len(names) >= 2 and tuple(names[:-1]) in chosen
                            and names[-2] in getattr(type(owner), "torch_python_ints", ()))
    return Layout(spec, records, dotted, shared, synced, tuple(first), python_ints)


def gather(layout: Layout, tx: GradientTransformation, group: dict[str, Any], opt_state: Mapping[Any, Any],
           ps: list[torch.Tensor], live: list[bool], synced: dict[str, torch.Tensor],
           absent: frozenset[int] = frozenset()) -> Any:
    """The transform state of a group, read from ``opt.state`` and ``group["tx_state"]``;
    params without state that have a gradient now get their initial state, the others
    ``None`` (frozen). ``absent``: the records that the transform keeps as ``None`` for their
    param (e.g. Adafactor's row statistics of a vector), from `absent_records`."""
    params = group["params"]
    per_param_keys = {key for i, key in layout.records if i is not None and i >= 0 and key != STEPPED}
    stored = [opt_state.get(p) or {} for p in params]
    has = [any(k in d for k in per_param_keys) for d in stored]
    shared = group.get("tx_state") or {}
    need = [live[i] and not has[i] for i in range(len(params))]
    # a buffer the transform keeps now but the param's state lacks (the group switched a block
    # on, e.g. momentum): created at its initial value, as torch.optim creates state lazily
    partial = [has[i] and not all(key in stored[i] for k, (j, key) in enumerate(layout.records)
                                  if j == i and key != STEPPED and k not in absent)
               for i in range(len(params))]
    fresh: list[Any] = []
    per_param = any(i is not None and i >= 0 for i, _ in layout.records)
    if (per_param and (any(need) or any(partial))) or not layout.shared <= shared.keys():
        init = tx.init([p.detach() if need[i] or partial[i] else None for i, p in enumerate(ps)])
        fresh = optree.tree_flatten(init, none_is_leaf=True)[0]
    from_first: dict[int, Any] = {}
    for node in layout.first:  # torch's format in opt.state[params[0]], converted by the state class
        entries = (opt_state.get(params[0]) or {}) if params else {}
        own = {k: v for k, v in entries.items() if k in node.cls.torch_first_param_keys}
        from_first.update(zip(node.leaves, node.cls.from_torch_state(own, node.like)))
    leaves = []
    for j, (i, key) in enumerate(layout.records):
        if i == FIRST:
            leaves.append(from_first[j])
        elif i is None:
            leaves.append(shared[key] if key in shared else fresh[j] if key in layout.shared else None)
        elif i == -1:  # set from the group by _sync_in
            if key not in synced:
                synced[key] = layout.synced[key].clone()
            leaves.append(synced[key])
        elif need[i]:
            leaves.append(fresh[j])
        elif not has[i]:
            leaves.append(None)
        elif key == STEPPED:
            leaves.append(torch.ones((), dtype=torch.int64))
        else:
            t = stored[i].get(key)
            if t is None and j in absent:
                leaves.append(None)
                continue
            if t is None:
                t = fresh[j]
            elif not isinstance(t, torch.Tensor) and (key == "step" or key in layout.python_ints):
                t = torch.tensor(int(t), dtype=torch.int64)  # a number (torch.optim takes one too)
            elif key == "step" and t.is_floating_point():
                t = t.to(torch.int64)  # torch.optim's float step
            if t.is_complex():
                t = torch.view_as_real(t)
            leaves.append(t)
    return optree.tree_unflatten(layout.spec, leaves)


def absent_records(tx: GradientTransformation, ps: list[torch.Tensor]) -> frozenset[int]:
    """The records whose leaf ``tx.init`` leaves ``None`` for their param, from an init on meta
    tensors (no allocation; empty if the transform's init needs real values)."""
    try:
        template = tx.init([torch.empty_like(p, device="meta") for p in ps])
    except Exception:  # noqa: BLE001 - an init that needs real values
        logger.debug("meta init failed; every per-param buffer is taken as kept", exc_info=True)
        return frozenset()
    return frozenset(j for j, leaf in enumerate(optree.tree_flatten(template, none_is_leaf=True)[0]) if leaf is None)


def scatter(layout: Layout, group: dict[str, Any], opt_state: Any, ps: list[torch.Tensor], new_state: Any,
            synced: dict[str, torch.Tensor], gi: int) -> None:
    """Write a group's new transform state back where `gather` reads it."""
    params = group["params"]
    leaves, spec = optree.tree_flatten(new_state, none_is_leaf=True)
    if spec != layout.spec:
        raise ValueError(f"the transform of group {gi} returned a state of another structure than its init "
                         f"gives: {spec} vs {layout.spec}")
    shared = group.setdefault("tx_state", {}) if layout.shared else {}
    for node in layout.first:
        entries = opt_state[params[0]]
        torch_state = node.cls(*(leaves[j] for j in node.leaves)).to_torch_state()
        for k in node.cls.torch_first_param_keys:
            if k in torch_state:
                entries[k] = torch_state[k]
            else:
                entries.pop(k, None)
    for (i, key), leaf in zip(layout.records, leaves):
        if leaf is None or i == FIRST:
            continue
        if i is None:
            shared[key] = leaf
        elif i == -1:
            synced[key] = leaf
        elif key != STEPPED:
            p = params[i]
            if key in layout.python_ints:
                opt_state[p][key] = int(leaf)  # torch keeps a Python int (eager: scatter runs outside traces)
                continue
            opt_state[p][key] = torch.view_as_complex(leaf) if p.is_complex() and leaf.shape == ps[i].shape else leaf


def sync_in(state: Any, group: dict[str, Any], gi: int) -> None:
    """Copy the group's hyperparameter values into the state's injected tensors (in place)."""
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


def upgrade_v1(state_dict: dict[str, Any], groups_now: list[dict[str, Any]],
               layout_of: Callable[[dict[str, Any]], Layout]) -> dict[str, Any]:
    """A state dict of gradxform 0.1's adapter (buffers keyed by dotted path, the group's other
    tensors under ``param_groups[i]["tx_state"]``) in this layout."""
    groups = state_dict.get("param_groups", [])
    if not any("gradxform_format" in g for g in groups) or len(groups) != len(groups_now):
        return state_dict
    state = {pid: dict(v) for pid, v in state_dict["state"].items()}
    new_groups = []
    for group, saved in zip(groups_now, groups):
        saved = dict(saved)
        old_shared = saved.pop("tx_state", {})
        saved.pop("gradxform_format", None)
        layout = layout_of(group)
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


def check_loadable(state_dict: dict[str, Any], groups_now: list[dict[str, Any]],
                   tx_of: Callable[[dict[str, Any]], GradientTransformation],
                   layout_of: Callable[[dict[str, Any]], Layout]) -> None:
    """Before anything is loaded: each param's saved entries must be the buffers the group's
    transform keeps for it (torch's names included), with the shapes it gives that param
    (found from an init on meta tensors: no allocation)."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups_now):
        return  # torch's load_state_dict says so
    for gi, (group, saved) in enumerate(zip(groups_now, saved_groups)):
        params = group["params"]
        if len(saved["params"]) != len(params):
            return
        tx = tx_of(group)
        try:
            template = tx.init([torch.empty_like(_real(p), device="meta") for p in params])
        except Exception:  # noqa: BLE001 - a transform whose init needs real values: torch's checks only
            logger.debug("meta init failed; not checking the loaded state", exc_info=True)
            continue
        leaves = optree.tree_flatten(template, none_is_leaf=True)[0]
        layout = layout_of(group)
        if params and saved["params"]:
            first_entries = state_dict["state"].get(saved["params"][0], {})
            for node in layout.first:  # the class's own checks (e.g. a history longer than it keeps)
                node.cls.from_torch_state({k: v for k, v in first_entries.items()
                                           if k in node.cls.torch_first_param_keys}, node.like)
        records = layout.records
        first_keys = frozenset(k for node in layout.first for k in node.cls.torch_first_param_keys)
        expect: list[dict[str, torch.Tensor]] = [{} for _ in params]
        for (i, key), like in zip(records, leaves):
            if i is not None and i >= 0 and like is not None and key != STEPPED:
                expect[i][key] = like
        for i, pid in enumerate(saved["params"]):
            entries = state_dict["state"].get(pid, {})
            own = set(entries) - (first_keys if i == 0 else frozenset())
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


