"""A pure-Python flatten/unflatten in optree's leaf order, for code that dynamo traces.

Dynamo before torch 2.13 cannot trace optree's C++ ``tree_flatten`` / ``tree_unflatten`` /
``PyTreeSpec`` methods (a graph break at every call). Under such a trace `gradxform.tree` flattens
with the functions here instead: plain Python over the containers optree knows natively, which
dynamo inlines. They give optree's leaves in optree's order (``none_is_leaf=True``):

- ``None`` and tensors are leaves, and so are numbers, strings and bytes;
- ``list``, ``tuple`` and ``collections.deque`` in order; NamedTuples in field order;
- ``dict`` and ``collections.defaultdict`` in sorted key order (optree sorts the keys), rebuilt in
  the original insertion order (as optree's ``tree_unflatten``); ``OrderedDict`` in its own order.

Anything else (a dict with keys of mixed types, an object other than a number or string, a type
registered with ``optree.register_pytree_node``) makes `flatten` answer ``False``: the caller then
uses optree itself, which is exact on every torch and graph-breaks on an old one. From torch
2.13 the container classes are asked exactly (``type()``), so the result is optree's. Before
2.13 there are two departures from optree, both forced by what dynamo 2.1 can ask about an
object: a subclass of ``list`` or ``dict`` counts as a list or dict, and any subclass of
``tuple`` but ``torch.Size`` as a NamedTuple (optree: a leaf, or a ``PyStructSequence``);
gradxform's states and the params trees it is given hold neither.

gradxform uses these functions under every dynamo trace, on 2.13 too, where dynamo could trace
optree: the plain Python traces about twice as fast (first compile of ``gx.adamw``'s update,
measured: 2.0 s with optree, 1.1 s here), and dynamo 2.13's optree support takes two dicts with
the same keys inserted in different orders for different structures (gradients built in another
key order than the params failed ``fullgraph=True``), where optree itself does not.

A spec is ``LEAF`` (``None``) or a `Node`: the container's class, what rebuilding it needs
(``meta``) and the children's specs. Nothing here is used outside a trace: eager code keeps
optree's ``PyTreeSpec``.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from typing import Any, NamedTuple

import torch

from . import _compat

LEAF = None

_SCALARS = (bool, int, float, complex, str, bytes, torch.Size)


class Node(NamedTuple):
    """An inner node of a traced spec: ``cls`` (the container type), ``meta`` (a dict's keys in
    sorted and in insertion order, a defaultdict's factory, a deque's ``maxlen``) and the
    children's specs, in leaf order."""

    cls: Any
    meta: Any
    children: tuple


_NATIVE = (OrderedDict, defaultdict, dict, list, deque, tuple)


def _class_of(x: Any) -> Any:
    """The container class of ``x`` for the dispatch below, or ``None`` (a leaf or a type for
    optree).

    From torch 2.13 exactly optree's classes, asked with ``type()``: a subclass of a builtin
    container that is not a NamedTuple is ``None`` (optree: a leaf, or a registered type), so
    the caller leaves it to optree. Before 2.13 with ``isinstance`` (dynamo 2.1 refuses
    ``type()`` of a list or dict made in the graph and misreads ``x.__class__`` in a recursive
    call), so a subclass of ``list`` or ``dict`` counts as one; a tuple's own class (``tuple`` or
    a NamedTuple's) is ``type(x)``; ``torch.Size`` is a leaf (``None`` here)."""
    if _compat.dynamo_traces_optree():
        t = type(x)
        if t in _NATIVE:
            return t
        if issubclass(t, tuple) and hasattr(t, "_fields") and t is not torch.Size:
            return t
        return None
    if isinstance(x, OrderedDict):
        return OrderedDict
    if isinstance(x, defaultdict):
        return defaultdict
    if isinstance(x, dict):
        return dict
    if isinstance(x, list):
        return list
    if isinstance(x, deque):
        return deque
    if isinstance(x, tuple) and not isinstance(x, torch.Size):
        return type(x)
    return None


def _sorted_keys(keys: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The keys in optree's order when every key is a ``str`` or every key an ``int`` (``sorted``
    order, as optree's); ``None`` for other keys (optree's order for mixed types is its own)."""
    # loops, not all(<generator>): dynamo 2.1 cannot trace a generator
    strs = ints = True
    for k in keys:
        strs = strs and type(k) is str
        ints = ints and type(k) is int
    if not (strs or ints):
        return None
    # an insertion sort: dynamo 2.1 turns ``sorted()``'s result into an object it cannot iterate
    out: list[Any] = []
    for k in keys:
        i = len(out)
        while i > 0 and k < out[i - 1]:
            i -= 1
        out.insert(i, k)
    return tuple(out)  # a tuple: dynamo 2.1 cannot iterate a list of constants in a comprehension


def flatten(tree: Any, leaves: list[Any]) -> Any:
    """Append ``tree``'s leaves to ``leaves`` in optree's order; return its spec, or ``False``
    where the tree holds a type handled by optree only (``leaves`` is then partly filled)."""
    if tree is None or isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return LEAF
    cls = _class_of(tree)
    if cls is None:
        if isinstance(tree, _SCALARS):
            leaves.append(tree)
            return LEAF
        return False
    if cls is list or cls is tuple:
        children = tree
        meta = None
    elif cls is dict or cls is defaultdict or cls is OrderedDict:
        keys = tuple(tree.keys())  # a tuple: dynamo 2.1 cannot iterate list(d.keys())
        order = keys if cls is OrderedDict else _sorted_keys(keys)
        if order is None:
            return False
        children = [tree[k] for k in order]
        meta = (tuple(order), tuple(keys), tree.default_factory if cls is defaultdict else None)
    elif cls is deque:
        children = list(tree)
        meta = tree.maxlen
    else:  # a NamedTuple (any other subclass of tuple is taken for one: dynamo 2.1 cannot tell)
        children = tree
        meta = None
    specs = []
    for child in children:
        spec = flatten(child, leaves)
        if spec is False:
            return False
        specs.append(spec)
    return Node(cls, meta, tuple(specs))


def _is_leaf_value(x: Any) -> bool:
    return x is None or isinstance(x, torch.Tensor) or isinstance(x, _SCALARS)


def flatten_up_to(spec: Any, tree: Any, leaves: list[Any], strict: bool) -> bool:
    """Append the parts of ``tree`` at ``spec``'s leaves to ``leaves``; ``False`` where ``tree``
    does not have ``spec``'s structure (with ``strict``, a container where ``spec`` has a leaf
    counts as a mismatch too: optree's spec equality; without, it is taken whole: the prefix
    rule of ``optree.tree_map``'s other trees)."""
    if spec is LEAF:
        if strict and not _is_leaf_value(tree):
            return False
        leaves.append(tree)
        return True
    if not _is_instance_of(tree, spec.cls):
        return False
    if spec.meta is not None and (spec.cls is dict or spec.cls is defaultdict or spec.cls is OrderedDict):
        order = spec.meta[0]
        keys = tuple(tree.keys())  # a tuple: dynamo 2.1 cannot iterate list(d.keys())
        if len(keys) != len(order):
            return False
        if spec.cls is OrderedDict:
            for a, b in zip(keys, order):
                if a != b:
                    return False
        else:
            for k in order:
                if k not in tree:
                    return False
        if spec.cls is defaultdict and tree.default_factory is not spec.meta[2]:
            return False
        children = [tree[k] for k in order]
    else:
        children = list(tree)
        if len(children) != len(spec.children):
            return False
        if spec.cls is deque and tree.maxlen != spec.meta:
            return False
    for child_spec, child in zip(spec.children, children):
        if not flatten_up_to(child_spec, child, leaves, strict):
            return False
    return True


def _is_instance_of(x: Any, cls: Any) -> bool:
    """``type(x) is cls`` as far as dynamo 2.1 can answer it (see `_class_of`); for a NamedTuple
    class ``isinstance(x, cls)``: it has no ``type()`` of one made in the graph."""
    if cls is list or cls is dict or cls is OrderedDict or cls is defaultdict or cls is deque:
        return _class_of(x) is cls
    if cls is tuple:
        return isinstance(x, tuple) and type(x) is tuple
    return isinstance(x, cls)


def num_leaves(spec: Any) -> int:
    if spec is LEAF:
        return 1
    return sum([num_leaves(c) for c in spec.children])


def unflatten(spec: Any, leaves: list[Any]) -> Any:
    """The tree of structure ``spec`` holding ``leaves`` (in order)."""
    out, _ = _build(spec, leaves, 0)
    return out


def _build(spec: Any, leaves: list[Any], start: int) -> tuple[Any, int]:
    if spec is LEAF:
        return leaves[start], start + 1
    children = []
    for child_spec in spec.children:
        child, start = _build(child_spec, leaves, start)
        children.append(child)
    cls = spec.cls
    if cls is list:
        return children, start
    if cls is tuple:
        return tuple(children), start
    if cls is dict or cls is defaultdict or cls is OrderedDict:
        order, keys, factory = spec.meta
        by_key = dict(zip(order, children))
        if cls is dict:
            return {k: by_key[k] for k in keys}, start
        if cls is OrderedDict:
            return OrderedDict([(k, by_key[k]) for k in keys]), start
        return defaultdict(factory, {k: by_key[k] for k in keys}), start
    if cls is deque:
        return deque(children, maxlen=spec.meta), start
    return cls(*children), start
