"""Empirical init: three scalars per layer, measured on dummy batches instead of derived by hand.

Source: the ``empirical_init`` package (0.0.2, its README; no paper) and docs/init-scale.md. The model
is split into *layers* (by default the leaf modules that own parameters). Each layer ``l`` gets a
forward multiplier ``a_l`` on its output (``out_l = a_l * module_l(x_l; theta_l)``) and a gradient
multiplier ``c_l`` on its parameter gradient, tuned so that, with weights ~ N(0, 1):

1. activations are O(1): ``RMS(out_l) = 1``;
2. backprop signals are O(1) (automatic here: ``c_l`` rescales only the parameter gradients);
3. the maximal stable update is O(1): the change of ``out_l`` per unit learning rate after an SGD
   step along ``c_l * g_l`` has RMS 1, i.e. ``RMS(D_l) = 1`` with the exact directional derivative
   ``D_l = jvp(theta_l -> a_l * module_l(x_l; theta_l), c_l * g_l)``, ``g_l`` the true gradient
   of the loss (which contains every ``a``) with respect to ``theta_l``.

Procedure (`empirical_init`), with ``RMS(t) = sqrt(mean t^2)``:

- A. one forward pass, layers in forward order: ``a_l = 1 / RMS(module_l(x_l))`` *exactly*, set
  on the fly by a forward hook, so layer ``l + 1`` already sees the new ``a_l``; then
  ``act_iters`` damped refinements ``a_l <- a_l / RMS(out_l)^(1/2)``, one fresh batch each;
- C. one forward and one backward pass give every ``x_l`` and every ``g_l``; per layer, one local
  ``torch.func.jvp`` gives ``J_l = D_l(c=1)`` and ``c_l = 1 / RMS(J_l)`` exactly; then
  ``upd_iters`` damped refinements ``c_l <- c_l / RMS(c_l J_l)^(1/4)``, one fresh batch each.

The number of model passes does not depend on depth: every layer is handled in the same pass
(the reference package runs ~10 passes per module). Stage B of the reference (the backward
multipliers on the input gradients) only moves stage C's starting point and is not needed: the
fixed point of C does not depend on it (docs/init-scale.md, "Empirical init"; the key identity
``c_l = gy_l * prod_{k after l} gx_k gy_k``).

**Folded convention.** The forward multipliers are folded into the params of each layer, whose
output is positively homogeneous of degree 1 in its params (``a * m(theta) = m(a * theta)``,
``a > 0``), so the result is plain params for the *unmodified* module. SGD on ``theta`` with
``out = a * m(theta)`` and gradient multiplier ``c`` is the same trajectory as SGD on
``theta' = a * theta`` with multiplier ``c' = c * a^2``: the multipliers returned for training are
the folded ``c'``; the report keeps ``a_l`` and ``c_l`` in the reference's convention.

Train with ``gx.chain(gx.scale_by_empirical_init(c), gx.trace(0.9), gx.scale(-lr))`` (or
``gx.chain(gx.scale_by_empirical_init(c), gx.sgd(lr, momentum=0.9))``). For chain-structured nets
this reproduces the reference's training gradients exactly; with branches or skips the
reference's backward scaling depends on the path, and no per-leaf scalar equals it: ours is
per-leaf. Adam-type optimisers cancel ``c`` (only the folded ``a`` matters then).

Deliberate differences from the reference (docs/migration/empirical-init.md): nothing prints; no custom
autograd.Function (everything is ``torch.func``-compatible); exact jvps instead of a finite
difference with ``test_lr = 1e-5``; norm gains re-drawn as 1 (not N(0, 1)); only names ending in
"bias" are zeroed; all-zero params are fine; exact one-shot starting values. The reference tunes
the *distribution* (it re-draws the params every run and returns yet another draw); with
``reinit=True`` we draw once from ``generator`` and tune that draw, so the pillars hold for the
returned network itself.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from . import _foreach as _fe
from . import _dist
from . import tree as _tree
from .base import GradientTransformation, Ownership, Params, Updates, expect_state, owned_transform, recorded
from .initscale import (
    InitReport,
    _batches,
    _check_params,
    _dp_mean,
    _param_stats,
    _rms,
    _scalar_loss,
    apply_fn_of,
    module_activation_rms,
    progress_iter,
)
from .transforms import _Flat

__all__ = [
    "ScaleByEmpiricalInitState",
    "scale_by_empirical_init",
    "empirical_init_params",
    "empirical_init",
    "HOMOGENEOUS_LAYERS",
]

log = logging.getLogger(__name__)

#: Module types whose output is positively homogeneous of degree 1 in their params, so that a
#: forward multiplier ``a > 0`` can be folded into them: ``a * m(x; theta) = m(x; a * theta)``.
HOMOGENEOUS_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag,
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _ends_with_bias(path: str) -> bool:
    return path.casefold().endswith("bias")


# --- params re-draw ------------------------------------------------------------------------------


def empirical_init_params(
    params: Params,
    *,
    generator: torch.Generator | None = None,
    names_are_bias: Callable[[str], bool] = _ends_with_bias,
) -> Params:
    """Empirical init's re-draw of the params (empirical_init README; docs/init-scale.md).

    Per leaf, by its dotted pytree path: ``names_are_bias(path)`` (default: the path ends with
    "bias", case-insensitive) -> 0; other leaves with ``ndim >= 2`` (weights) -> N(0, 1); other
    leaves with ``ndim <= 1`` (normalisation gains, scalar gains) -> 1. ``None`` stays ``None``.
    Unlike the reference (docs/migration/empirical-init.md), gains are not drawn N(0, 1) and a name
    that merely contains "bias" (``unbiased_x``) is not zeroed. Draws use ``generator`` in leaf
    order; pure (returns new tensors with each leaf's dtype and device).

    Args:
        params: the params (a pytree of floating-point tensors; ``None`` leaves pass).
        generator: the random generator for the N(0, 1) draws (default: torch's global one).
        names_are_bias: ``path -> bool``, which leaves are biases (set to 0).

    Returns:
        New params with the structure, dtypes and devices of ``params``.

    Raises:
        TypeError: a leaf is not a floating-point tensor.

    References:
        The ``empirical_init`` package 0.0.2, its README (no paper). docs/init-scale.md,
        docs/migration/empirical-init.md.

    Example:
        >>> p = {"weight": torch.zeros(2, 3), "bias": torch.ones(2), "gain": torch.zeros(2)}
        >>> new = gx.empirical_init_params(p, generator=torch.Generator().manual_seed(0))
        >>> new["bias"], new["gain"], new["weight"].shape
        (tensor([0., 0.]), tensor([1., 1.]), torch.Size([2, 3]))
    """
    leaves, spec = _tree.tree_flatten(params)
    paths = _tree.tree_paths(params)
    out: list[Any] = []
    for path, x in zip(paths, leaves):
        if x is None:
            out.append(None)
            continue
        if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"empirical_init_params: leaf '{path}' is not a floating-point tensor")
        if names_are_bias(path):
            out.append(torch.zeros_like(x))
        elif x.ndim >= 2:
            dev = generator.device if generator is not None else x.device
            out.append(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device))
        else:
            out.append(torch.ones_like(x))
    return _tree.tree_unflatten(spec, out)


# --- the transform -------------------------------------------------------------------------------


class ScaleByEmpiricalInitState(NamedTuple):
    """``multipliers``: a params-shaped tree of 0-d float64 CPU tensors (``None`` at frozen leaves)."""

    multipliers: Any


_tree.register_state_types(ScaleByEmpiricalInitState)


@recorded
def scale_by_empirical_init(multipliers: Params) -> GradientTransformation:
    """Multiply each update leaf by its empirical-init gradient multiplier: ``u <- c * u``.

    ``multipliers``: a tree shaped like the params with one number or 0-d tensor per leaf
    (``None`` means 1), e.g. the second value returned by `empirical_init`, which is in the folded
    convention ``c' = c_l * a_l^2`` for params with the forward multipliers folded in
    (docs/init-scale.md; empirical_init README, "maximal stable update"). Use it before the
    optimiser: ``chain(scale_by_empirical_init(c), trace(0.9), scale(-lr))``. The state holds the
    multipliers as 0-d CPU float64 tensors, so they are saved and restored with the state.

    Args:
        multipliers: the per-leaf multipliers ``c``, with the params' structure.

    Returns:
        A `GradientTransformation` whose state is `ScaleByEmpiricalInitState` (``params`` not
        needed in ``update``).

    Raises:
        ValueError: (in ``init``) ``multipliers`` differs from the params in structure, or a
            multiplier is not a scalar.

    References:
        The ``empirical_init`` package 0.0.2, its README, "maximal stable update" (no paper).
        docs/init-scale.md, docs/migration/empirical-init.md.

    Example:
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> tx = gx.scale_by_empirical_init({"w": 0.5, "b": None})
        >>> u, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params))
        >>> u["w"], u["b"]
        (tensor([0.5000, 0.5000]), tensor([1.]))
    """

    def init(params: Params) -> ScaleByEmpiricalInitState:
        p_leaves, spec = _tree.tree_flatten(params)
        m_leaves = _tree.check_structure(spec, multipliers, "multipliers", against="params", reference=params)
        out = []
        for path, p, m in zip(_tree.tree_paths(params), p_leaves, m_leaves):
            if p is None:
                out.append(None)
                continue
            if isinstance(m, torch.Tensor) and m.numel() != 1:
                raise ValueError(f"scale_by_empirical_init: multiplier at '{path}' must be a scalar; got shape {tuple(m.shape)}")
            out.append(_tree.scalar_tensor(1.0 if m is None else m))
        return ScaleByEmpiricalInitState(_tree.tree_unflatten(spec, out))

    def owned_update(updates: Updates, state: ScaleByEmpiricalInitState, params: Params | None,
                     own: Ownership) -> tuple[Updates, ScaleByEmpiricalInitState]:
        del params
        expect_state(state, ScaleByEmpiricalInitState, "scale_by_empirical_init")
        flat = _Flat(updates)
        if not flat.live:
            return updates, state
        cs = flat.state_live(state.multipliers, "state.multipliers", check_shapes=False)
        scalars = [_tree.as_scalar(c) for c in cs]
        if all(isinstance(s, (int, float)) for s in scalars):
            if own.may_write(flat.live):
                _fe.mul_(flat.live, scalars)
                new = flat.live
            else:
                new = list(_fe.mul(flat.live, scalars))
        else:  # compiling, or multipliers moved off the CPU
            new = [u * c.to(u.dtype) for u, c in zip(flat.live, cs)]
        return flat.rebuild(new), state

    return owned_transform(init, owned_update)


# --- the tuner -----------------------------------------------------------------------------------


def _default_rule(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Leaf modules that own parameters, except inside ``nn.MultiheadAttention`` (whose forward
    reads its ``out_proj`` weight directly and is not homogeneous in its params)."""
    inside_mha = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha.update(n for n, _ in mod.named_modules(prefix=name))

    def rule(name: str, mod: nn.Module) -> bool:
        return (name not in inside_mha and next(mod.children(), None) is None
                and next(mod.parameters(recurse=False), None) is not None)

    return rule


def _check_homogeneous(name: str, mod: nn.Module) -> None:
    label = f"'{name or '<root>'}' ({type(mod).__name__})"
    if not isinstance(mod, HOMOGENEOUS_LAYERS):
        raise ValueError(
            f"empirical_init: layer {label} is not known to be homogeneous of degree 1 in its params, "
            "so its forward multiplier cannot be folded into them. Exclude it with "
            "layers=lambda name, m: ... (its params then keep their values and multiplier 1). "
            f"Supported: {', '.join(t.__name__ for t in HOMOGENEOUS_LAYERS)}"
        )
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.max_norm is not None:
        raise ValueError(f"empirical_init: layer {label} has max_norm set (it renormalises rows, so it "
                         "is not homogeneous in its weight); exclude it or set max_norm=None")
    if next(mod.parameters(), None) is None:
        raise ValueError(f"empirical_init: layer {label} has no parameters")


class _Layer:
    __slots__ = ("name", "module", "names", "a", "c", "calls", "args", "kwargs", "out_rms", "err")

    def __init__(self, name: str, module: nn.Module, names: dict[str, str]) -> None:
        self.name, self.module, self.names = name, module, names  # local param name -> params key
        self.a, self.c = 1.0, 1.0
        self.calls, self.args, self.kwargs, self.out_rms, self.err = 0, None, None, math.nan, 0.0


class _Hooks:
    """Forward hooks on the chosen layers: multiply the output by ``a_l`` (stage ``"act"`` first
    sets ``a_l`` from the raw output), optionally keep the layer's inputs for the jvps."""

    def __init__(self, layers: list[_Layer], sync: bool = False) -> None:
        self.layers = layers
        self.sync = sync
        self.mode: str | None = None  # None: inactive; "act0", "act", "fwd"
        self.capture = False
        self.order: list[_Layer] = []
        self.handles = [lay.module.register_forward_hook(self._hook_of(lay), with_kwargs=True) for lay in layers]

    def _hook_of(self, lay: _Layer) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if self.mode is None:
                return None
            lay.calls += 1
            if lay.calls > 1:
                raise ValueError(f"empirical_init: layer '{lay.name}' ran more than once in one forward pass "
                                 "(shared or reused layers are not supported); exclude it with layers=...")
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"empirical_init: layer '{lay.name}' returned {type(output).__name__}, not a tensor")
            self.order.append(lay)
            if self.mode in ("act0", "act"):
                r = _global_rms(output, self.sync)
                old = 1.0 if self.mode == "act0" else lay.a
                lay.err = abs(math.log(old * r)) if r > 0 and math.isfinite(r) else math.inf
                if not (r > 0 and math.isfinite(r)):
                    log.warning("empirical_init: layer '%s' output RMS is %g; its forward multiplier is kept at %g",
                                lay.name, r, lay.a)
                elif self.mode == "act0":
                    lay.a = 1.0 / r
                else:
                    lay.a = math.sqrt(lay.a / r)  # a / RMS(a * raw)^(1/2)
            out = output * lay.a
            lay.out_rms = _global_rms(out, self.sync)
            if self.capture:
                lay.args = _tree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tuple(args))
                lay.kwargs = _tree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, dict(kwargs))
            return out

        return hook

    def start(self, mode: str, capture: bool = False) -> None:
        self.mode, self.capture, self.order = mode, capture, []
        for lay in self.layers:
            lay.calls = 0

    def stop(self) -> None:
        self.mode, self.capture = None, False
        missing = [lay.name for lay in self.layers if lay.calls == 0]
        if missing:
            raise ValueError(f"empirical_init: layer(s) {missing} were not called during the forward pass "
                             "(e.g. a module whose weights its parent reads directly); exclude them with layers=...")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Source:
    """Fresh batches; when the iterable runs out, its batches are reused in order (logged)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.it: Iterator[Any] = _batches(batches, "empirical_init")
        self.seen: list[Any] = []
        self.cycle: Iterator[Any] | None = None

    def next(self) -> Any:
        if self.cycle is None:
            try:
                b = next(self.it)
                self.seen.append(b)
                return b
            except StopIteration:
                log.warning("empirical_init: the batch iterable ran out after %d batches; reusing them", len(self.seen))
                self.cycle = itertools.cycle(self.seen)
        return next(self.cycle)


def _global_rms(t: torch.Tensor, sync: bool) -> float:
    """RMS of ``t``; with ``sync``, over the tensors of all ranks (equal sizes: the mean of the
    ranks' mean squares, one all-reduce)."""
    if not sync:
        return _rms(t)
    t = t.detach()
    t = t.abs() if t.is_complex() else t
    ms = t.double().square().mean() if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device)
    return float((_dist.all_reduce_sum([ms])[0] / _dist.world_size()).sqrt())


def _unpack(batch: Any) -> tuple[Any, Any]:
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise ValueError("empirical_init: each batch must be a pair (x, y)") from None
    return x, y


def empirical_init(
    model: nn.Module,
    params: Mapping[str, torch.Tensor | None],
    batches: Iterable[Any],
    loss: Callable[[Any, Any], torch.Tensor],
    *,
    layers: Callable[[str, nn.Module], bool] | None = None,
    act_iters: int = 5,
    upd_iters: int = 20,
    reinit: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    sync: bool = False,
) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None], InitReport]:
    """Tune empirical init's per-layer multipliers and return ``(new_params, multipliers, report)``.

    Per layer ``l``: a forward multiplier ``a_l`` such that the RMS of each layer's output is 1
    (pillar 1) and a gradient multiplier ``c_l`` such that the RMS of the change of each layer's
    output under one step is 1 (pillar 3); ``a_l`` is folded into the params.

    Source: the empirical_init package README (pillars 1 and 3) and docs/init-scale.md; the
    procedure and the folded convention are in this module's docstring. ``model``: an
    ``nn.Module``, applied with ``torch.func.functional_call`` and never modified (temporary
    forward hooks are removed afterwards; buffers are passed as copies, so BatchNorm running
    statistics are untouched). ``params``: a dict ``name -> tensor`` as from
    ``dict(model.named_parameters())``. ``batches``: an iterable of ``(x, y)`` (e.g. random inputs
    and random labels); every draw takes a fresh batch (``2 + act_iters + upd_iters`` in all; a
    shorter iterable is cycled). ``loss(output, y)``: a scalar. ``layers(name, module)``: which
    modules get multipliers (default: the leaf modules that own params, except inside
    ``nn.MultiheadAttention``, which is not homogeneous and is left as it is); each chosen layer
    must be one of `HOMOGENEOUS_LAYERS` and run once per forward. ``reinit``: first re-draw the
    chosen layers' params with `empirical_init_params` (from ``generator``); other params keep
    their values and get multiplier 1.

    Data parallel (``sync=True`` under an initialised ``torch.distributed`` process group): each
    rank passes its own batches, all of the same size, and gets what one process computes on the
    union of the ranks' batches: every RMS (pillars 1 and 3) is taken over all ranks' examples,
    the gradients are averaged over the ranks, and ``reinit`` draws are broadcast from rank 0, so
    the multipliers and params are equal on every rank. ``act_rms_before/after`` in the report
    stay this rank's.

    Returns plain params for the unmodified module (``a_l`` folded in: ``theta_l' = a_l *
    theta_l``), the gradient multipliers in the folded convention (``c_l * a_l^2`` on each leaf of
    layer ``l``, 1 elsewhere: pass them to `scale_by_empirical_init`) and an `InitReport` whose
    ``extra`` holds ``"a"``, ``"c"`` (reference convention, per layer), ``"c_folded"``,
    ``"pillar1"`` (RMS of each layer's output) and ``"pillar3"`` (RMS of the jvp of each layer's
    output along its multiplied gradient), both measured on a final fresh batch. ``objective``
    is ``max_l |log RMS error|`` per iteration (stage A, then stage C). Model passes:
    ``5 + act_iters + upd_iters`` forwards (two of them measure ``act_rms_before/after``) and
    ``2 + upd_iters`` backwards, whatever the depth; plus one local jvp per layer per stage-C pass.

    Args:
        model: an ``nn.Module`` (never modified).
        params: ``dict(model.named_parameters())``.
        batches: an iterable of ``(x, y)`` (cycled if short).
        loss: ``loss(output, y)``, a scalar.
        layers: ``layers(name, module) -> bool``, the modules that get multipliers.
        act_iters: the damped refinements of the forward multipliers.
        upd_iters: the damped refinements of the gradient multipliers.
        reinit: first re-draw the chosen layers' params (`empirical_init_params`).
        generator: the generator of that re-draw.
        progress: log progress.
        sync: average over the ranks of the default process group.

    Returns:
        ``(new_params, multipliers, report)``: params with ``a_l`` folded in, the gradient
        multipliers for `scale_by_empirical_init`, and an `InitReport`.

    Raises:
        ValueError: an iteration count that is not an int >= 0, a chosen layer that is not
            homogeneous or runs more than once per forward.

    References:
        The ``empirical_init`` package 0.0.2, its README (no paper). docs/init-scale.md,
        docs/migration/empirical-init.md.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(30)]
        >>> new_params, multipliers, report = gx.empirical_init(
        ...     model, dict(model.named_parameters()), batches, torch.nn.functional.mse_loss)
        >>> tx = gx.chain(gx.scale_by_empirical_init(multipliers), gx.sgd(1e-3))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"empirical_init: model must be an nn.Module (it is observed with forward hooks); got {type(model).__name__}")
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError("empirical_init: params must be a dict name -> tensor, as dict(model.named_parameters())")
    for name, n in (("act_iters", act_iters), ("upd_iters", upd_iters)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"empirical_init: {name} must be an int >= 0; got {n!r}")
    _check_params(dict(params), "empirical_init")

    # which layers, and which params keys they own
    canonical = {id(p): k for k, p in model.named_parameters()}
    rule = layers if layers is not None else _default_rule(model)
    chosen: list[_Layer] = []
    owner: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not rule(name, mod):
            continue
        _check_homogeneous(name, mod)
        names = {}
        for local, p in mod.named_parameters():
            key = canonical[id(p)]
            if key in owner:
                raise ValueError(f"empirical_init: parameter '{key}' belongs to both '{owner[key]}' and "
                                 f"'{name}' (nested or tied layers); choose only one of them with layers=...")
            if params.get(key) is None:
                raise ValueError(f"empirical_init: params has no tensor for '{key}' of layer '{name}'")
            owner[key] = name
            names[local] = key
        chosen.append(_Layer(name, mod, names))
    if not chosen:
        raise ValueError("empirical_init: no layer chosen (the layers rule matched no module that owns parameters)")
    uncovered = [k for k, v in params.items() if v is not None and k not in owner]
    if uncovered:
        log.info("empirical_init: params outside the chosen layers keep their values and multiplier 1: %s", uncovered)

    theta = {k: v.detach() for k, v in params.items() if v is not None}
    if reinit:
        drawn = empirical_init_params({k: theta[k] for k in owner}, generator=generator)
        theta.update(drawn)
        for lay in chosen:
            if isinstance(lay.module, nn.Embedding) and lay.module.padding_idx is not None:
                key = lay.names["weight"]
                theta[key] = theta[key].clone()
                theta[key][lay.module.padding_idx] = 0
    sync = sync and _dist.world_size() > 1
    if sync and reinit:
        import torch.distributed as dist

        for k in owner:
            theta[k] = theta[k].clone()
            dist.broadcast(theta[k], src=0)
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    apply = apply_fn_of(model)

    def full(th: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # copies of the buffers: a BatchNorm in train mode updates them in place
        return {**th, **{k: b.clone() for k, b in buffers.items()}}

    src = _Source(batches)
    report = InitReport("empirical_init", {}, _param_stats(dict(params)), {})
    hooks = _Hooks(chosen, sync)
    n_jvps = 0

    def forward_backward() -> dict[str, torch.Tensor]:
        """One forward (hooks multiply by a and capture inputs) and one backward: the per-layer
        inputs and the true gradient w.r.t. the chosen layers' params."""
        x, y = _unpack(src.next())
        live = {k: theta[k].detach().requires_grad_(True) for k in owner}
        hooks.start("fwd", capture=True)
        try:
            with torch.enable_grad():
                out = apply(full({**theta, **live}), x)
                value = _scalar_loss(loss(out, y), "empirical_init")
        finally:
            hooks.stop()
        if not value.requires_grad:
            raise ValueError("empirical_init: the loss does not depend on the chosen layers' params")
        keys = list(live)
        grads = torch.autograd.grad(value, [live[k] for k in keys], allow_unused=True)
        g = {k: torch.zeros_like(live[k]) if gk is None else gk.detach() for k, gk in zip(keys, grads)}
        if sync:  # the gradient of the loss on all ranks' batches
            g = dict(zip(keys, _dp_mean([g[k] for k in keys])))
        report.forward_passes += 1
        report.backward_passes += 1
        return g

    def jvp_rms(lay: _Layer, g: dict[str, torch.Tensor]) -> float:
        """RMS of ``J_l = jvp(theta_l -> a_l * module_l(x_l; theta_l), g_l)`` (exact, local)."""
        nonlocal n_jvps
        primal = {loc: theta[key] for loc, key in lay.names.items()}
        tangent = {loc: g[key] for loc, key in lay.names.items()}
        bufs = {k: b.detach().clone() for k, b in lay.module.named_buffers()}

        # forward-mode AD (exact jvp); torch.autograd.forward_ad rather than torch.func.jvp so
        # that a BatchNorm in train mode may update its (copied) running statistics in place
        with fwAD.dual_level(), warnings.catch_warnings():
            # torch's make_dual lazily scripts a helper, which warns that torch.jit is deprecated
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            duals = {loc: fwAD.make_dual(primal[loc], tangent[loc]) for loc in primal}
            out = torch.func.functional_call(lay.module, {**duals, **bufs}, lay.args, lay.kwargs)
            tang = fwAD.unpack_dual(out).tangent
        if tang is None:
            tang = torch.zeros_like(out)
        n_jvps += 1
        return lay.a * _global_rms(tang, sync)

    total = 2 + act_iters + upd_iters
    steps = iter(progress_iter(range(total), total, progress, "empirical_init"))
    try:
        # act_rms_before: the given params on the first batch
        first = src.next()
        report.act_rms_before = module_activation_rms(model, full({k: v.detach() for k, v in params.items() if v is not None}),
                                                      _unpack(first)[0])
        report.forward_passes += 1

        # Stage A: a_l, forward order, set on the fly within each pass
        for k in range(1 + act_iters):
            next(steps, None)
            x, _ = _unpack(first if k == 0 else src.next())
            hooks.start("act0" if k == 0 else "act")
            try:
                with torch.no_grad():
                    apply(full(theta), x)
            finally:
                hooks.stop()
            report.forward_passes += 1
            report.objective.append(max(lay.err for lay in chosen))
            report.iterations += 1
        order = list(hooks.order)

        # Stage C: c_l, all layers from one forward + one backward, one local jvp each
        for k in range(1 + upd_iters):
            next(steps, None)
            g = forward_backward()
            errs = []
            for lay in chosen:
                r = jvp_rms(lay, g)
                if not (r > 0 and math.isfinite(r)):
                    log.warning("empirical_init: layer '%s' update effect RMS is %g; its gradient multiplier "
                                "is kept at %g", lay.name, r, lay.c)
                    errs.append(math.inf)
                    continue
                errs.append(abs(math.log(lay.c * r)) if k else abs(math.log(r)))
                lay.c = 1.0 / r if k == 0 else lay.c / (lay.c * r) ** 0.25
            report.objective.append(max(errs))
            report.iterations += 1

        # check pass on a fresh batch: pillar 1 and pillar 3 with the final a and c
        g = forward_backward()
        pillar1 = {lay.name: lay.out_rms for lay in order}
        pillar3 = {lay.name: lay.c * jvp_rms(lay, g) for lay in order}
    finally:
        hooks.remove()

    new_params: dict[str, torch.Tensor | None] = {}
    multipliers: dict[str, torch.Tensor | None] = {}
    layer_of = {key: lay for lay in chosen for key in lay.names.values()}
    for key, v in params.items():
        if v is None:
            new_params[key], multipliers[key] = None, None
        elif key in layer_of:
            lay = layer_of[key]
            new_params[key] = (theta[key] * lay.a).detach()
            multipliers[key] = _tree.scalar_tensor(lay.c * lay.a ** 2)
            report.scales[key] = lay.a
        else:
            new_params[key] = v.detach().clone()
            multipliers[key] = _tree.scalar_tensor(1.0)
    report.weight_norms_after = _param_stats(new_params)
    report.act_rms_after = module_activation_rms(model, full({k: v for k, v in new_params.items() if v is not None}),
                                                 _unpack(first)[0])
    report.forward_passes += 1
    report.extra.update({
        "layers": [lay.name for lay in order],
        "a": {lay.name: lay.a for lay in order},
        "c": {lay.name: lay.c for lay in order},
        "c_folded": {lay.name: lay.c * lay.a ** 2 for lay in order},
        "pillar1": pillar1,
        "pillar3": pillar3,
        "layer_jvps": n_jvps,
        "uncovered_params": uncovered,
    })
    log.debug("empirical_init: %d layers, %d forward / %d backward passes, final errors A %.3g C %.3g",
              len(chosen), report.forward_passes, report.backward_passes,
              report.objective[act_iters], report.objective[-1])
    return new_params, multipliers, report
