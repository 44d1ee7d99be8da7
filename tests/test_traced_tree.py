"""The pure-Python flatten that `gradxform.tree` uses under a dynamo trace on torch < 2.13
(``gradxform._traced_tree``) gives optree's leaves, order and rebuilt trees exactly, and the tree
helpers traced with it (``fullgraph=True``) equal eager mode.

The reference is optree itself (``none_is_leaf=True``, as gradxform flattens)."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradxform as gx
from gradxform import _compat
from helpers import needs
from gradxform import _traced_tree as tt


class Moments(NamedTuple):
    count: Any
    mu: Any
    nu: Any


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def _dd(items: dict) -> defaultdict:
    out = defaultdict(list)
    out.update(items)
    return out


TREES = {
    "leaf": _t(1.0),
    "none": None,
    "dict unsorted": {"w": _t(1.0), "b": _t(2.0), "a": None},
    "int keys": {3: _t(1.0), 1: _t(2.0), 2: [_t(3.0)]},
    "nested": {"layers": [{"weight": _t(1.0), "bias": None}, {"weight": _t(2.0), "bias": _t(3.0)}], "head": (_t(4.0),)},
    "namedtuple": Moments(_t(0.0), {"z": _t(1.0), "y": _t(2.0)}, [None, _t(3.0)]),
    "chain state": ((), Moments(1, [_t(1.0)], [_t(2.0)]), {"lr": _t(0.1)}),
    "ordereddict": OrderedDict([("z", _t(1.0)), ("a", _t(2.0))]),
    "defaultdict": _dd({"z": _t(1.0), "a": _t(2.0)}),
    "deque": deque([_t(1.0), None], maxlen=4),
    "scalars": {"step": 3, "name": "adam", "flag": True, "size": torch.Size([2, 3])},
    "empty": {"a": [], "b": {}, "c": ()},
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_leaves_order_and_rebuild_are_optrees(name):
    tree = TREES[name]
    leaves: list[Any] = []
    spec = tt.flatten(tree, leaves)
    ref_leaves, ref_spec = optree.tree_flatten(tree, none_is_leaf=True)
    assert spec is not False
    assert len(leaves) == len(ref_leaves) == tt.num_leaves(spec)
    assert all(a is b for a, b in zip(leaves, ref_leaves)), name
    marks = list(range(len(leaves)))
    rebuilt = tt.unflatten(spec, marks)
    expected = optree.tree_unflatten(ref_spec, marks)
    assert rebuilt == expected and type(rebuilt) is type(expected)
    assert repr(rebuilt) == repr(expected)  # key order (insertion order, as optree rebuilds it) and types
    assert optree.tree_structure(rebuilt, none_is_leaf=True) == ref_spec


def _differs(a: Any, b: Any) -> bool:
    return optree.tree_structure(a, none_is_leaf=True) != optree.tree_structure(b, none_is_leaf=True)


OTHERS = [
    ({"a": _t(1.0), "b": _t(2.0)}, {"b": _t(0.0), "a": _t(0.0)}),  # same keys, other order: same structure
    ({"a": _t(1.0), "b": _t(2.0)}, {"a": _t(1.0), "c": _t(2.0)}),  # other key
    ({"a": _t(1.0)}, {"a": _t(1.0), "b": None}),  # extra key
    ([_t(1.0), _t(2.0)], (_t(1.0), _t(2.0))),  # list vs tuple
    ([_t(1.0)], [[_t(1.0)]]),  # a subtree where a leaf was
    ([_t(1.0), None], [_t(1.0), 3]),  # None and a number are both leaves
    (Moments(1, 2, 3), (1, 2, 3)),  # NamedTuple vs tuple
    (OrderedDict([("a", 1), ("b", 2)]), OrderedDict([("b", 2), ("a", 1)])),  # OrderedDict order counts
    ({"a": 1}, OrderedDict([("a", 1)])),  # dict vs OrderedDict
    (deque([1], maxlen=2), deque([1], maxlen=3)),
]


@pytest.mark.parametrize("i", range(len(OTHERS)))
def test_structure_check_is_optrees_spec_equality(i):
    a, b = OTHERS[i]
    spec = tt.flatten(a, [])
    got: list[Any] = []
    assert tt.flatten_up_to(spec, b, got, strict=True) == (not _differs(a, b))
    if not _differs(a, b):
        assert got == optree.tree_leaves(b, none_is_leaf=True)


def test_prefix_rule_is_optree_tree_maps():
    """Without ``strict``, a subtree of another tree at a leaf of the first is passed whole, as
    ``optree.tree_map`` passes it."""
    first, other = [_t(1.0), _t(2.0)], [{"x": _t(3.0)}, _t(4.0)]
    got: list[Any] = []
    assert tt.flatten_up_to(tt.flatten(first, []), other, got, strict=False)
    assert got == optree.tree_map(lambda a, b: b, first, other, none_is_leaf=True)


class _Opaque:
    pass


@pytest.mark.parametrize("tree", [{1: _t(1.0), "a": _t(2.0)}, [_Opaque()], {"a": torch.float32}],
                         ids=["mixed keys", "object", "dtype"])
def test_what_it_does_not_know_goes_to_optree(tree):
    assert tt.flatten(tree, []) is False


_leaf = st.one_of(st.none(), st.integers(-3, 3).map(lambda v: torch.tensor(float(v))))
_keys = st.text(alphabet="abcxyz", min_size=1, max_size=3)
_trees = st.recursive(
    _leaf,
    lambda sub: st.one_of(
        st.lists(sub, max_size=3),
        st.lists(sub, max_size=3).map(tuple),
        st.dictionaries(_keys, sub, max_size=3),
        st.tuples(sub, sub, sub).map(lambda t: Moments(*t)),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(_trees)
def test_any_tree_flattens_as_optree(tree):
    leaves: list[Any] = []
    spec = tt.flatten(tree, leaves)
    ref_leaves, ref_spec = optree.tree_flatten(tree, none_is_leaf=True)
    assert all(a is b for a, b in zip(leaves, ref_leaves)) and len(leaves) == len(ref_leaves)
    assert optree.tree_structure(tt.unflatten(spec, leaves), none_is_leaf=True) == ref_spec
    assert tt.flatten_up_to(spec, optree.tree_unflatten(ref_spec, ref_leaves), [], strict=True)


def _helpers_step(tree: Any, other: Any) -> Any:
    leaves, spec = gx.tree.tree_flatten(tree)
    doubled = gx.tree.tree_unflatten(spec, [None if x is None else 2 * x for x in leaves])
    checked = gx.tree.check_structure(spec, other, "other", reference=tree)
    # ``tree`` first: dynamo 2.1 cannot take the class of a NamedTuple made in the graph (``doubled``
    # holds one), so the Python flatten walks a made tree only against a known structure
    summed = gx.tree.tree_map(lambda a, b, c: a + b + c, tree, doubled, other)
    return doubled, summed, checked


@pytest.mark.parametrize("old_classes", [True, False], ids=["isinstance", "this-torch"])
def test_traced_helpers_equal_eager(monkeypatch, old_classes):
    """``fullgraph=True`` with the container classes asked as before torch 2.13 (``isinstance``;
    forced on 2.13) and as this torch asks them (``type()`` from 2.13)."""
    if old_classes:
        monkeypatch.setattr(_compat, "dynamo_traces_optree", lambda: False)
    torch._dynamo.reset()
    tree = {"w": _t(1.0, 2.0), "a": [None, Moments(_t(3.0), {"z": _t(4.0), "b": _t(5.0)}, None)]}
    # keys in another insertion order: the same structure for optree (eager) and for the Python
    # flatten (dynamo 2.13's own optree support calls the two specs different)
    other = {"a": [None, Moments(_t(1.0), {"b": _t(1.0), "z": _t(1.0)}, None)], "w": _t(1.0, 1.0)}
    eager = _helpers_step(tree, other)
    compiled = torch.compile(_helpers_step, fullgraph=True, backend="eager")(tree, other)
    for e, c in zip(eager, compiled):
        assert repr(c) == repr(e)  # values, key order and container types
    torch._dynamo.reset()


def test_traced_structure_mismatch_is_the_eager_error(monkeypatch):
    """A mismatch found by the Python flatten is reported by optree's path, with the message of
    eager mode (named paths)."""
    monkeypatch.setattr(gx.tree, "is_compiling", lambda: True)
    monkeypatch.setattr(_compat, "dynamo_traces_optree", lambda: False)
    params = {"w": _t(1.0), "b": _t(2.0)}
    _, spec = gx.tree.tree_flatten(params)
    assert isinstance(spec, tt.Node)
    with pytest.raises(ValueError, match="path 'b' exists only in the first"):
        gx.tree.check_structure(spec, {"w": _t(1.0), "c": _t(2.0)}, "state.mu", reference=params)


def test_eager_mode_keeps_optree():
    _, spec = gx.tree.tree_flatten({"w": _t(1.0)})
    assert isinstance(spec, optree.PyTreeSpec)


@needs("fullgraph_compile")
def test_compiled_update_takes_gradients_in_another_key_order():
    """Gradients whose dict was built in another key order than the params: eagerly the same
    structure (optree sorts the keys), and under ``fullgraph=True`` too (dynamo 2.13's optree
    support raised here; gradxform flattens in plain Python under a trace)."""
    torch._dynamo.reset()
    tx = gx.adam(0.1)
    params = {"w": _t(1.0, 2.0), "b": _t(3.0)}
    grads = {"b": _t(0.5), "w": _t(-1.0, 2.0)}
    state = tx.init(params)
    want, _ = tx.update(grads, state, params)
    got, _ = torch.compile(tx.update, fullgraph=True, backend="eager")(grads, state, params)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    torch._dynamo.reset()


def test_a_list_subclass_is_left_to_optree_from_2_13(monkeypatch):
    """From torch 2.13 the Python flatten asks classes exactly: a subclass of ``list`` is not
    taken for a list (optree: a leaf), so ``flatten`` hands the tree to optree."""
    monkeypatch.setattr(_compat, "dynamo_traces_optree", lambda: True)

    class MyList(list):
        pass

    assert tt.flatten({"a": MyList([_t(1.0)])}, []) is False
    assert tt.flatten({"a": [_t(1.0)]}, []) is not False
