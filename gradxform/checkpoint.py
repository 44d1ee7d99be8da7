"""Checkpoints of a functional transform state, in a form a later gradxform can read.

``torch.save(state)`` works (a state is a pytree of NamedTuples and tensors) but pickles the
state classes by module path: a later gradxform that renames a field or a class cannot load it,
and the error will not say why. `state_to_dict` saves the *values* under named paths, with a
format name and version; `state_from_dict` puts them back into a template state made by
``tx.init(params)``, checking every path, shape and dtype, and names the culprit when they do not
match. The dict holds only strings, ints and tensors, so it also goes through
``torch.distributed.checkpoint`` (sharded ``DTensor`` leaves stay sharded)::

    torch.save(gx.state_to_dict(state), "opt.pt")
    state = gx.state_from_dict(tx.init(params), torch.load("opt.pt"))

The `gradxform.Optimizer` adapter keeps torch's ``state_dict`` layout and writes the same format
version into each param group (``"gradxform_format"``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "state_from_dict", "state_to_dict"]

FORMAT_NAME = "gradxform.state"
FORMAT_VERSION = 2  # bump when the meaning of saved paths changes; keep readers for older ones
# 2: Rprop's step sizes of a leaf not yet stepped hold 1 (version 1: the initial learning rate)


def _children(node: Any) -> list[tuple[str, Any]]:
    """Named children of a state node: NamedTuple fields, sequence indices, dict keys."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return [(f, getattr(node, f)) for f in node._fields]
    if isinstance(node, (tuple, list)):
        return [(str(i), c) for i, c in enumerate(node)]
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    return []


def _walk(node: Any, path: str, tensors: dict[str, torch.Tensor], types: dict[str, str]) -> None:
    if isinstance(node, torch.Tensor):
        tensors[path] = node
        return
    kids = _children(node)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        types[path] = type(node).__name__
    for key, child in kids:
        _walk(child, f"{path}.{key}" if path else key, tensors, types)


def state_to_dict(state: Any) -> dict[str, Any]:
    """The values of a transform state by named path, plus the format name and version.

    Returns ``{"format": "gradxform.state", "version": 1, "tensors": {path: tensor},
    "types": {path: state class name}}`` where a path is the dotted chain of NamedTuple field
    names, sequence indices and dict keys from the root (``"1.inner_state.0.mu.w"``). The
    tensors are the state's own (not copies): ``torch.save`` or ``torch.distributed.checkpoint``
    copy them. ``None`` leaves and Python constants are not stored (the template has them).

    Args:
        state: a transform state (``tx.init(params)`` or one returned by ``tx.update``).

    Returns:
        A dict of strings, ints and tensors that ``torch.load(weights_only=True)`` reads.

    References:
        docs/checkpoints.md, "The functional route".

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.adam(0.1)
        >>> saved = gx.state_to_dict(tx.init(params))
        >>> saved["format"], saved["version"]
        ('gradxform.state', 2)
    """
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    _walk(state, "", tensors, types)
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": tensors, "types": types}


def _check_header(saved: Any) -> None:
    if not isinstance(saved, dict) or saved.get("format") != FORMAT_NAME:
        got = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"not a gradxform state dict (format {got!r}, expected {FORMAT_NAME!r}); make one with "
                         "gx.state_to_dict(state)")
    version = saved.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"this state dict has format version {version!r}; this gradxform reads versions up to "
                         f"{FORMAT_VERSION}: it was saved by a newer gradxform, upgrade to load it")


def state_from_dict(template: Any, saved: dict[str, Any]) -> Any:
    """Rebuild a state shaped like ``template`` (``tx.init(params)``) from `state_to_dict`'s dict.

    Every tensor path of ``template`` must be in ``saved`` with the same shape and the same set of
    paths (no extra ones): otherwise a ``KeyError`` / ``ValueError`` names the path and, when the
    saved state class differs, both class names (a checkpoint of another transform). Values are
    copied to the template leaf's device; floating values are cast to its dtype (as
    ``torch.optim`` does on load), integer and bool leaves (step counts, flags) must match. A
    ``DTensor`` value that ``torch.distributed.checkpoint`` loaded into the template is kept.

    Args:
        template: a state of the same transform, e.g. ``tx.init(params)``.
        saved: a dict made by `state_to_dict` (after ``torch.save`` / ``torch.load``).

    Returns:
        A new state with ``template``'s structure and ``saved``'s values.

    Raises:
        KeyError: a path of ``template`` is missing in ``saved`` (or ``saved`` has an extra one).
        ValueError: not a gradxform state dict, a newer format version, another transform's
            state, or a shape / integer dtype that differs.

    References:
        docs/checkpoints.md, "The functional route".

    Example:
        >>> params = {"w": torch.ones(2)}
        >>> tx = gx.adam(0.1)
        >>> state = tx.update({"w": torch.ones(2)}, tx.init(params), params)[1]
        >>> restored = gx.state_from_dict(tx.init(params), gx.state_to_dict(state))
        >>> torch.equal(restored.inner_state[0].mu["w"], state.inner_state[0].mu["w"])
        True
    """
    _check_header(saved)
    want_tensors: dict[str, torch.Tensor] = {}
    want_types: dict[str, str] = {}
    _walk(template, "", want_tensors, want_types)
    got, got_types = saved["tensors"], saved.get("types", {})
    for path, name in want_types.items():
        if path in got_types and got_types[path] != name:
            raise ValueError(f"state at '{path or '<root>'}' was saved from a {got_types[path]}; this transform has a "
                             f"{name} there: the checkpoint comes from a different transform")
    missing = [p for p in want_tensors if p not in got]
    extra = [p for p in got if p not in want_tensors]
    if missing:
        raise KeyError(f"the saved state has no tensor at '{missing[0]}' ({len(missing)} missing); was it saved "
                       "from the same transform and params tree?")
    if extra:
        raise ValueError(f"the saved state has a tensor at '{extra[0]}' that this transform's state does not have "
                         f"({len(extra)} extra); was it saved from the same transform and params tree?")
    values: dict[str, torch.Tensor] = {}
    for path, like in want_tensors.items():
        value = got[path]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"saved state '{path}' is a {type(value).__name__}, not a tensor")
        if value.shape != like.shape:
            raise ValueError(f"saved state '{path}' has shape {tuple(value.shape)}; this transform's state has "
                             f"{tuple(like.shape)} there")
        if value.dtype != like.dtype and not (value.is_floating_point() and like.is_floating_point()):
            raise ValueError(f"saved state '{path}' has dtype {value.dtype}; this transform's state has {like.dtype}")
        if value is like:  # loaded in place into the template (torch.distributed.checkpoint)
            values[path] = like
        else:
            values[path] = value.detach().to(device=like.device, dtype=like.dtype, copy=True)
    state = _rebuild(template, "", values)
    return _from_version_1(state) if saved["version"] < 2 else state


def _from_version_1(node: Any) -> Any:
    """A version-1 state read by version 2: Rprop's step sizes of a leaf that has not stepped
    (count 0) held the initial learning rate; they now hold 1 (the leaf's first step multiplies
    them by the rate of that step). Set in place, in the tensors just made."""
    from .torch_optimizers import ScaleByRpropState

    if isinstance(node, ScaleByRpropState):
        counts: dict[str, torch.Tensor] = {}
        sizes: dict[str, torch.Tensor] = {}
        _walk(node.count, "", counts, {})
        _walk(node.step_sizes, "", sizes, {})
        for path, d in sizes.items():
            if path in counts and int(counts[path]) == 0:
                d.fill_(1.0)
        return node
    for _, child in _children(node):
        _from_version_1(child)
    return node


def _rebuild(node: Any, path: str, values: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        return values[path]
    kids = _children(node)
    if not kids:
        return node
    new = [_rebuild(child, f"{path}.{key}" if path else key, values) for key, child in kids]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*new)
    if isinstance(node, (tuple, list)):
        return type(node)(new)
    return type(node)(zip(node.keys(), new))
