"""``gradxform.Optimizer``: any gradient transformation as a ``torch.optim.Optimizer``.

Usage:

    opt = gx.Optimizer(model.parameters(), gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()            # extra arguments: opt.step(losses=...)
        sched.step()

How it maps onto torch.optim:

- Each param group holds a transform under ``group["tx"]`` (the one given to the constructor
  unless the group brings its own) and one transform state over the list of its params.
- ``step()`` passes ``[p.grad for p in group["params"]]`` through ``tx.update`` (a ``None`` grad
  is a frozen leaf: that param and its state are left alone) and adds the updates to the params
  in place. Complex params are seen by the transform as ``torch.view_as_real`` views, as
  torch.optim does.
- The numeric hyperparameters of every `gradxform.inject_hyperparams` transform in the
  state (all the aliases: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``, ...) appear as
  group keys. They are live: a value written into ``group["lr"]`` by you or by a
  ``torch.optim.lr_scheduler`` is copied into the state before the next update. A hyperparameter
  given as a schedule overrides the group value and is written back to the group after each step.
- ``state_dict()`` has torch's layout: ``state`` maps a param index to that param's buffers
  (keyed by their path in the transform state, e.g. ``"1.inner_state.0.mu"``), and each entry of
  ``param_groups`` carries the group's hyperparameters, its param indices and, under
  ``"tx_state"``, the state's non-per-param tensors (step counts, injected hyperparameters).
  ``load_state_dict`` restores them exactly, so a resumed run is bit-identical.
- Because the adapter owns the state, transforms may update its buffers in place
  (`gradxform.tree.owned_buffers`); the user's ``.grad`` tensors are never written.
- Lowering (``fused=None``, the default): a group whose transform is ``gx.adam`` / ``gx.adamw``
  (optionally after ``gx.clip_by_global_norm``) runs on torch's fused Adam kernels, and
  ``gx.clipped_sgd`` or ``gx.chain(clip rule, gx.sgd(lr, momentum))`` on CPU folds the clip
  factor into torch's fused SGD kernel. Both keep the
  state the generic path keeps; ``fused=False`` turns the lowering off.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any, Callable, NamedTuple

import torch

from .checkpoint import FORMAT_VERSION, _children
from . import tree as _tree
from .base import GradientTransformation, chain
from .combine import find_injected as _find_injected
from .persample import PerParam
from .transforms import ScaleByAdamState

__all__ = ["Optimizer"]

logger = logging.getLogger(__name__)

_RESERVED = ("params", "tx", "tx_state", "gradxform_format")


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _group_extras(extra: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """Per-param extras (a `gradxform.PerParam`, e.g. ``sum_grad_squared``) become the group's list,
    ``None`` for params without an entry; other extras pass unchanged."""
    if not any(isinstance(v, PerParam) for v in extra.values()):
        return extra
    out = {}
    for k, v in extra.items():
        if isinstance(v, PerParam):
            vals = [v.get(p) for p in params]
            out[k] = [None if x is None else _real(x) for x in vals]
        else:
            out[k] = v
    return out




# hyperparameters that are a tuple of numbers (torch.optim's ``betas``); any other 1-d value is a
# per-model vector of `gradxform.batched`
_TUPLE_HYPERPARAMS = frozenset({"betas"})


def _probe_hyperparams(tx: GradientTransformation, params: list[torch.Tensor]) -> dict[str, Any]:
    """Initial hyperparameter values of ``tx``, read from ``tx.init``.

    Tries an empty params list first (no allocation); a transform that cannot be initialised on
    an empty list (e.g. ``partition`` with a fixed labels list) is initialised on ``params``.
    """
    try:
        return _hyperparam_values(tx.init([]))
    except Exception:  # noqa: BLE001 - any failure on the empty probe: use the real params
        logger.debug("tx.init([]) failed; probing hyperparameters with the group's params", exc_info=True)
        return _hyperparam_values(tx.init([_real(p.detach()) for p in params]))


def _hyperparam_values(state: Any) -> dict[str, Any]:
    """Group-facing values (floats, tuples of floats) of the injected hyperparameters.

    Per-model values (a `gradxform.batched` transform holds an ``(N,)`` lr, ``(N, 2)`` betas) are
    not one group's number and are left out."""
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


def _rebuild_for_group(tx: GradientTransformation, group: dict[str, Any]) -> GradientTransformation:
    """Rebuild alias members of ``tx`` whose hyperparameters the group overrides.

    An alias leaves out blocks whose hyperparameter starts at 0 (momentum, weight decay). A group
    that overrides such a value needs the alias rebuilt with it, else the value would be ignored.
    """

    def rebuilt(member: GradientTransformation) -> GradientTransformation:
        hook = (getattr(member.update, "__dict__", None) or {}).get("__gx_rebuild__")
        if hook is None:
            return member
        current = _hyperparam_values(member.init([]))
        overrides = {k: group[k] for k in current if k in group and group[k] != current[k]}
        return hook(**overrides) if overrides else member

    members = (getattr(tx.update, "__dict__", None) or {}).get("__gx_chain_members__")
    if members is None:
        return rebuilt(tx)
    new = [rebuilt(m) for m in members]
    if all(a is b for a, b in zip(new, members)):
        return tx
    return chain(*new)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _FusedPlan(NamedTuple):
    kind: str  # "adam" or "adamw"
    amsgrad: bool
    maximize: bool
    max_norm: float | None  # clip_by_global_norm before the alias, or None


def _alias_info(tx: GradientTransformation) -> tuple[str, dict[str, Any]] | None:
    info = (getattr(tx.update, "__dict__", None) or {}).get("__gx_alias__")
    if info is None or info[0] not in ("adam", "adamw"):
        return None
    name, kwargs = info
    for k in ("lr", "eps", "weight_decay"):
        if not isinstance(kwargs[k], (int, float)) or isinstance(kwargs[k], bool):
            return None  # schedules and tensors take the generic path
    if not all(isinstance(b, (int, float)) for b in kwargs["betas"]):
        return None
    return name, kwargs


def _fused_plan(tx: GradientTransformation) -> _FusedPlan | None:
    """How to run ``tx`` on torch's fused Adam kernels, or ``None``.

    Lowered: ``gx.adam`` / ``gx.adamw`` with constant hyperparameters (``group["lr"]`` stays
    live), alone or as ``chain(clip_by_global_norm(c), alias)``.
    """
    members = (getattr(tx.update, "__dict__", None) or {}).get("__gx_chain_members__")
    max_norm = None
    if members is not None:
        if len(members) != 2:
            return None
        max_norm = (getattr(members[0].update, "__dict__", None) or {}).get("__gx_clip_max_norm__")
        if max_norm is None:
            return None
        tx = members[1]
    info = _alias_info(tx)
    if info is None:
        return None
    name, kwargs = info
    return _FusedPlan(name, bool(kwargs["amsgrad"]), bool(kwargs["maximize"]), max_norm)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Plain (not sharded) float params on CPU or CUDA: sharded ``DTensor`` params take the generic
    path, whose reductions see the whole tensor."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES and not _tree.is_dtensor(p)
               for p in params)


def _eager_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` outside any ``torch.compile`` trace (a graph break where it is called).

    Used for the hyperparameter sync between a param group (Python floats that an LR scheduler
    rewrites between steps) and the state's tensors: traced inside ``torch.compile(opt.step)``,
    the value read at trace time was baked into the graph and a later lr never reached the
    state. The ``torch.compiler.disable`` wrapper (torch >= 2.1) is made on the first traced
    call, so that ``import gradxform`` does not import torch._dynamo.
    """
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _tree.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disable = getattr(getattr(torch, "compiler", None), "disable", None)
            disabled.append(disable(fn) if disable is not None else fn)
        return disabled[0](*args, **kwargs)

    return call


def _fused_adam_step(plan: _FusedPlan, state: Any, ps: list[torch.Tensor], grads: list[torch.Tensor | None],
                     scratch: list[torch.Tensor | None]) -> Any:
    """One step of a lowered group on torch's fused kernel, updating ``state`` in place.

    The state is the one the generic path keeps (``ScaleByAdamState`` inside the alias), so a run
    can switch between the paths and checkpoints do not depend on it. With a clip, the clipped
    gradients are written into ``scratch`` (one params-sized buffer, kept between steps) and the
    user's ``.grad`` stays untouched; on CPU a step whose norm is below the level skips that copy.
    """
    alias_state = state if plan.max_norm is None else state[1]
    hp = alias_state.hyperparams
    lr, eps, wd = hp["lr"].item(), hp["eps"].item(), hp["weight_decay"].item()
    beta1, beta2 = hp["betas"].tolist()
    adam = next(m for m in alias_state.inner_state if isinstance(m, ScaleByAdamState))
    live = [i for i, g in enumerate(grads) if g is not None]
    inputs = list(grads)
    if plan.max_norm is not None and live:
        norm = _tree.global_norm([grads[i] for i in live])
        factor = plan.max_norm / torch.clamp(norm, min=plan.max_norm)
        if norm.device.type != "cpu" or float(factor) < 1.0:  # a CPU read, not a device sync
            for i in live:
                if scratch[i] is None:
                    scratch[i] = torch.empty_like(grads[i])
                torch.mul(grads[i], factor.to(grads[i].device), out=scratch[i])
                inputs[i] = scratch[i]
    kernel = torch._fused_adamw_ if plan.kind == "adamw" else torch._fused_adam_
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in live:
        groups.setdefault((ps[i].device, ps[i].dtype), []).append(i)
    for (device, _), idx in groups.items():
        counts = [adam.count[i] for i in idx]
        torch._foreach_add_(counts, 1)
        steps = [c.to(device=device, dtype=torch.float32) for c in counts]
        kernel(
            [ps[i] for i in idx], [inputs[i] for i in idx], [adam.mu[i] for i in idx], [adam.nu[i] for i in idx],
            [adam.nu_max[i] for i in idx] if plan.amsgrad else [], steps,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=plan.amsgrad, maximize=plan.maximize,
        )
    new_alias = alias_state._replace(count=alias_state.count + 1)
    return new_alias if plan.max_norm is None else (state[0], new_alias)


def _marker(tx: GradientTransformation, name: str) -> Any:
    return (getattr(tx.update, "__dict__", None) or {}).get(name)


def _constant(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sgd_plan(tx: GradientTransformation) -> tuple[str, dict[str, Any]] | None:
    """``("clipped_sgd", kwargs)`` for a ``clipped_sgd`` alias, or ``("chain", {})`` for
    ``chain(clip rule, gx.sgd(lr, momentum))`` (a rule marked by ``clipping._factor_rule``, plain
    momentum), with constant hyperparameters: what the adapter runs on torch's fused SGD kernel."""
    info = _marker(tx, "__gx_alias__")
    if info is not None and info[0] == "clipped_sgd":
        kwargs = info[1]
        if all(kwargs[k] is None or _constant(kwargs[k]) for k in ("lr", "momentum", "level")):
            return "clipped_sgd", kwargs
        return None
    members = _marker(tx, "__gx_chain_members__")
    if members is None or len(members) != 2 or _marker(members[0], "__gx_factor_rule__") is None:
        return None
    info = _marker(members[1], "__gx_alias__")
    if info is None or info[0] != "sgd":
        return None
    kw = info[1]
    if not (_constant(kw["lr"]) and _constant(kw["momentum"]) and kw["dampening"] == 0 and kw["weight_decay"] == 0
            and not kw["nesterov"] and not kw["maximize"]):
        return None
    kind, level = _marker(members[0], "__gx_factor_rule__")
    if kind == "coordinate" and not _constant(level):
        return None
    return "chain", {}


def _sgd_lowered_step(plan: tuple[str, dict[str, Any]], state: Any, ps: list[torch.Tensor],
                      grads: list[torch.Tensor | None], scratch: list[torch.Tensor | None],
                      tx: GradientTransformation) -> Any:
    """One step of a lowered clip + SGD group, dispatching on the two supported layouts."""
    name, kwargs = plan
    if name == "clipped_sgd":  # InjectHyperparamsState(inner=(rule, [trace,] scale))
        from .clipping import _RULE_ALIASES, _clip_rule

        hp = state.hyperparams
        level = hp["level"].item() if "level" in hp else None
        rule = _RULE_ALIASES.get(kwargs["rule"], kwargs["rule"])
        rule_tx = _clip_rule(rule, level, kwargs["q"], kwargs["beta"], _clipped_power(rule, kwargs["power"]),
                             kwargs["history"], kwargs["method"], kwargs["seed"])
        members = state.inner_state
        trace_state = members[1] if len(members) == 3 else None
        rule_state, trace_state = _clip_sgd_step(
            rule_tx, members[0], hp["lr"].item(), hp["momentum"].item(), trace_state, ps, grads, scratch)
        new_members = (rule_state, trace_state, members[2]) if len(members) == 3 else (rule_state, members[1])
        return state._replace(count=state.count + 1, inner_state=new_members)
    # chain(rule, sgd): (rule_state, InjectHyperparamsState(inner=([trace,] scale)))
    rule_tx = _marker(tx, "__gx_chain_members__")[0]
    sgd_state = state[1]
    hp = sgd_state.hyperparams
    members = sgd_state.inner_state
    trace_state = members[0] if len(members) == 2 else None
    rule_state, trace_state = _clip_sgd_step(
        rule_tx, state[0], hp["lr"].item(), hp["momentum"].item(), trace_state, ps, grads, scratch)
    new_members = (trace_state, members[1]) if len(members) == 2 else members
    return (rule_state, sgd_state._replace(count=sgd_state.count + 1, inner_state=new_members))


def _clip_sgd_step(rule_tx: GradientTransformation, rule_state: Any, lr: float, mu: float, trace_state: Any,
                   ps: list[torch.Tensor], grads: list[torch.Tensor | None],
                   scratch: list[torch.Tensor | None]) -> tuple[Any, Any]:
    """Clip with ``rule_tx`` and take an SGD (momentum) step, the clip folded into one fused pass.

    For a rule that scales all leaves by one factor (norm, AutoClip and random rules), the rule's
    own transform runs on a single proxy leaf holding the global norm: its output divided by the
    norm is the factor, and its state (AutoClip history, seeded counter, stats) advances exactly
    as on the full tree. A per-leaf rule gets one proxy leaf per param; an elementwise clamp
    writes into a kept scratch buffer. Then one pass of torch's fused SGD kernel does
    ``b <- mu b + f g; p <- p - lr b``, the factor entering as its dampening ``1 - f`` (``b_1 =
    f g_1``: the buffer starts at zero, so ``is_first_step`` stays False); without momentum the
    factor goes into the lr. The clipped gradient is never materialised and ``.grad`` is not
    written. Returns the new rule state and trace state (updated in place).
    """
    kind, level = _marker(rule_tx, "__gx_factor_rule__")
    live = [i for i, g in enumerate(grads) if g is not None]
    g_live = [grads[i] for i in live]
    if kind == "global":
        norms = [_tree.global_norm(g_live).reshape(1)]
        out, rule_state = rule_tx.update(norms, rule_state, None)
        factor = float(torch.where(norms[0] > 0, out[0] / norms[0], torch.ones_like(norms[0])))
        inputs, alphas = g_live, [factor] * len(live)
    elif kind == "leaf":
        norms = [n.reshape(1).to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(g_live)]
        proxy: list[torch.Tensor | None] = [None] * len(grads)
        for j, i in enumerate(live):
            proxy[i] = norms[j]
        out, rule_state = rule_tx.update(proxy, rule_state, None)
        alphas = [float(torch.where(n > 0, out[i] / n, torch.ones_like(n))) for i, n in zip(live, norms)]
        inputs = g_live
    else:  # an elementwise clamp has no factor: clamp into the kept scratch
        inputs = []
        for i in live:
            if scratch[i] is None:
                scratch[i] = torch.empty_like(grads[i])
            torch.clamp(grads[i], -level, level, out=scratch[i])
            inputs.append(scratch[i])
        alphas = [1.0] * len(live)
    targets = [ps[i] for i in live]
    runs = [(list(range(len(live))), alphas[0])] if len(set(alphas)) == 1 else [([j], a) for j, a in enumerate(alphas)]
    if trace_state is not None:
        counts = [trace_state.count[i] for i in live]
        torch._foreach_add_(counts, 1)
        bufs = [trace_state.trace[i] for i in live]
        for js, a in runs:
            torch._fused_sgd_([targets[j] for j in js], [inputs[j] for j in js], [bufs[j] for j in js],
                              weight_decay=0.0, momentum=mu, lr=lr, dampening=1.0 - a, nesterov=False,
                              maximize=False, is_first_step=False)
    else:
        for js, a in runs:
            torch._fused_sgd_([targets[j] for j in js], [inputs[j] for j in js], [], weight_decay=0.0,
                              momentum=0.0, lr=lr * a, dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=False)
    return rule_state, trace_state


def _clipped_power(rule: str, power: Any) -> Any:
    if rule.startswith("linear_rand"):
        return 1
    if rule.startswith("quadratic_rand"):
        return 2
    return power


def _is_per_param(node: Any, n: int) -> bool:
    return (
        isinstance(node, list)
        and len(node) == n
        and n > 0
        and all(x is None or isinstance(x, torch.Tensor) for x in node)
    )


def _split_state(state: Any, n: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per-param buffers (lists mirroring the group's params) and the other tensors, by path."""
    per_param: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    shared: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> None:
        if _is_per_param(node, n):
            for i, x in enumerate(node):
                if x is not None:
                    per_param[i][path] = x
        elif isinstance(node, torch.Tensor):
            shared[path] = node
        else:
            for key, child in _children(node):
                walk(child, f"{path}.{key}" if path else key)

    walk(state, "")
    return per_param, shared


def _merge_state(template: Any, n: int, per_param: list[dict[str, torch.Tensor]], shared: dict[str, torch.Tensor],
                 where: str) -> Any:
    """Rebuild a state shaped like ``template`` from the tensors of `_split_state`."""

    def load(saved: torch.Tensor | None, like: torch.Tensor, path: str, owner: str) -> torch.Tensor:
        if saved is None:
            raise KeyError(f"{where}: the saved state has no tensor '{path}' for {owner}; was it saved from an "
                           "optimizer with the same transform?")
        if saved.shape != like.shape:
            raise ValueError(f"{where}: saved tensor '{path}' for {owner} has shape {tuple(saved.shape)}, "
                             f"expected {tuple(like.shape)}")
        return saved.detach().to(device=like.device, dtype=saved.dtype, copy=True)

    def walk(node: Any, path: str) -> Any:
        if _is_per_param(node, n):
            return [None if x is None else load(per_param[i].get(path), x, path, f"param {i}")
                    for i, x in enumerate(node)]
        if isinstance(node, torch.Tensor):
            return load(shared.get(path), node, path, "the group")
        kids = _children(node)
        if not kids:
            return node
        new = [walk(child, f"{path}.{key}" if path else key) for key, child in kids]
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*new)
        if isinstance(node, (tuple, list)):
            return type(node)(new)
        return dict(zip(node.keys(), new))

    return walk(template, "")


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a `gradxform.GradientTransformation`.

    Args:
        params: an iterable of tensors or of param-group dicts, as for any torch optimizer. A group
            dict may carry its own transform under ``"tx"`` and hyperparameter overrides such as
            ``"lr"``.
        tx: the transform for groups that bring none. Its injected hyperparameters (see
            `gradxform.inject_hyperparams`; all aliases have them) become the defaults.
        fused: run a group whose transform is exactly ``gx.adam`` / ``gx.adamw`` with constant
            hyperparameters (the learning rate may still be changed through ``group["lr"]``,
            e.g. by a scheduler) on torch's fused kernel, one pass over memory, as
            ``torch.optim.AdamW(fused=True)``. ``None`` (default): when the params' device and
            dtype allow it; ``False``: never (the generic ``torch._foreach_*`` path, which
            rounds as ``torch.optim.AdamW(foreach=True)``); ``True``: require it. The state is
            the same either way.

    ``step(closure=None, **extra_args)`` forwards extra keyword arguments to ``tx.update``. A
    per-param extra (``sum_grad_squared``) is given as a `gradxform.PerParam` (what
    `gradxform.track_sum_grad_squared` returns): each group receives the list of its params'
    entries, ``None`` where a param has none.
    """

    def __init__(self, params: Iterable[Any], tx: GradientTransformation, *, fused: bool | None = None) -> None:
        if not (isinstance(tx, tuple) and len(tx) == 2 and callable(tx[0]) and callable(tx[1])):
            raise TypeError(f"gradxform.Optimizer needs a GradientTransformation as tx; got {tx!r}")
        self._gx_states: dict[int, Any] = {}
        self._fused = fused
        self._gx_scratch: dict[int, list[torch.Tensor | None]] = {}
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params and isinstance(params[0], dict):
            # materialise every group's params once (they may be generators)
            params = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
                      for g in params]
            first = params[0]["params"]
        else:
            first = params
        tx = GradientTransformation(*tx)
        defaults = {"tx": tx, **_probe_hyperparams(tx, first)}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a group with its own ``"tx"`` takes its hyperparameter defaults from it."""
        param_group_keys = set(param_group) if isinstance(param_group, dict) else set()
        if isinstance(param_group, dict) and "tx" in param_group:
            own = param_group["tx"]
            if not (isinstance(own, tuple) and len(own) == 2):
                raise TypeError(f"param group 'tx' must be a GradientTransformation; got {own!r}")
            param_group = dict(param_group)
            param_group["tx"] = GradientTransformation(*own)
            own_params = param_group["params"]
            own_params = [own_params] if isinstance(own_params, torch.Tensor) else list(own_params)
            param_group["params"] = own_params
            for k, v in _probe_hyperparams(param_group["tx"], own_params).items():
                param_group.setdefault(k, v)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["tx"] is not self.defaults["tx"]:
            # torch fills every default key; drop hyperparameters only the default tx has
            own_keys = set(_probe_hyperparams(group["tx"], group["params"]))
            for k in list(group):
                if k in self.defaults and k != "tx" and k not in own_keys and k not in param_group_keys:
                    del group[k]
        group["tx"] = _rebuild_for_group(group["tx"], group)

    # -- hyperparameters ------------------------------------------------------------------------

    @staticmethod
    @_eager_only
    def _sync_in(state: Any, group: dict[str, Any]) -> None:
        for inj in _find_injected(state):
            for name, t in inj.hyperparams.items():
                if name in group:
                    value = group[name]
                    if isinstance(value, torch.Tensor):
                        t.copy_(value.detach().reshape(t.shape))
                    elif t.ndim == 1:
                        t.copy_(torch.tensor([float(v) for v in value], dtype=t.dtype))
                    else:
                        t.fill_(float(value))

    @staticmethod
    @_eager_only
    def _sync_out(state: Any, group: dict[str, Any]) -> None:
        for name, value in _hyperparam_values(state).items():
            current = group.get(name)
            if isinstance(current, torch.Tensor):
                continue
            group[name] = value

    # -- the step -------------------------------------------------------------------------------

    def _fused_plan(self, group: dict[str, Any], ps: list[torch.Tensor]) -> _FusedPlan | None:
        # Under torch.compile (``torch.compile(opt.step)``) the generic path runs: inductor fuses
        # its foreach ops itself, while the lowered steps read hyperparameters on the host and
        # hand torch's fused kernels tensors that functionalisation rejects.
        if self._fused is False or _tree.is_compiling():
            return None
        plan = _fused_plan(group["tx"])
        ok = plan is not None and _fused_supported(ps)
        if self._fused is True and not ok:
            raise ValueError("fused=True needs a group transform that is exactly gx.adam or gx.adamw with constant "
                             "hyperparameters (optionally after gx.clip_by_global_norm), and float params on CPU "
                             "or CUDA")
        return plan if ok else None

    def _init_group_state(self, group: dict[str, Any]) -> Any:
        return group["tx"].init([_real(p.detach()) for p in group["params"]])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **extra_args: Any) -> Any:  # type: ignore[override]
        """Run one update of every group's transform and add it to the params in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads: list[torch.Tensor | None] = []
            for i, p in enumerate(params):
                g = p.grad
                if g is not None and g.is_sparse:
                    raise RuntimeError(f"param {i} of group {gi} has a sparse gradient; gradxform supports dense ones only")
                grads.append(None if g is None else _real(g))
            if all(g is None for g in grads):
                continue
            ps = [_real(p) for p in params]
            state = self._gx_states.get(gi)
            if state is None:
                state = self._init_group_state(group)
            self._sync_in(state, group)
            plan = self._fused_plan(group, ps)
            group_extra = _group_extras(extra_args, params)
            if plan is not None and not extra_args:
                scratch = self._gx_scratch.setdefault(gi, [None] * len(ps))
                self._gx_states[gi] = _fused_adam_step(plan, state, ps, grads, scratch)
                continue
            sgd = _sgd_plan(group["tx"]) if self._fused is not False and not _tree.is_compiling() else None
            if sgd is not None and not extra_args and all(p.device.type == "cpu" and not _tree.is_dtensor(p) for p in ps):
                scratch = self._gx_scratch.setdefault(gi, [None] * len(ps))
                self._gx_states[gi] = _sgd_lowered_step(sgd, state, ps, grads, scratch, group["tx"])
                continue
            protected = [g for g in grads if g is not None]
            with _tree.owned_buffers(protected):
                updates, state = group["tx"].update(grads, state, ps, **group_extra)
            if not isinstance(updates, list) or len(updates) != len(ps):
                raise TypeError(f"the transform of group {gi} returned {type(updates).__name__} updates; expected a "
                                f"list of {len(ps)} tensors (or None) mirroring the params")
            idx = [i for i, u in enumerate(updates) if u is not None]
            if idx:
                targets = [ps[i] for i in idx]
                deltas = [updates[i] if updates[i].dtype == ps[i].dtype else updates[i].to(ps[i].dtype) for i in idx]
                torch._foreach_add_(targets, deltas)
            self._gx_states[gi] = state
            self._sync_out(state, group)
        return loss

    # -- checkpoints ----------------------------------------------------------------------------

    def init_state(self) -> None:
        """Create the state of every group that has none yet (what its first step would start
        from), without taking a step: a fresh optimizer then has a full `state_dict`, the
        template that ``torch.distributed.checkpoint.load`` fills in place."""
        for gi, group in enumerate(self.param_groups):
            if gi not in self._gx_states:
                self._gx_states[gi] = self._init_group_state(group)
                self._sync_in(self._gx_states[gi], group)

    def tx_state(self, group_index: int = 0) -> Any:
        """The transform state of a param group (``None`` before its first step)."""
        return self._gx_states.get(group_index)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's layout: ``{"state": {index: {path: tensor}}, "param_groups": [...]}``."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = []
        start = 0
        for gi, group in enumerate(self.param_groups):
            n = len(group["params"])
            ids = list(range(start, start + n))
            start += n
            packed = {k: v for k, v in group.items() if k not in _RESERVED}
            packed["params"] = ids
            packed["gradxform_format"] = FORMAT_VERSION
            st = self._gx_states.get(gi)
            if st is not None:
                per_param, shared = _split_state(st, n)
                packed["tx_state"] = shared
                for pid, d in zip(ids, per_param):
                    if d:
                        state[pid] = d
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what `state_dict` saved; the groups must hold the same number of params."""
        saved_groups = state_dict["param_groups"]
        for gi, saved in enumerate(saved_groups):
            version = saved.get("gradxform_format")
            if version is None:
                raise ValueError(f"param group {gi} of the loaded state dict has no 'gradxform_format': it was not saved "
                                 "by gradxform.Optimizer (a torch.optim state dict names its buffers differently; "
                                 "see the torch.optim migration page)")
            if version > FORMAT_VERSION:
                raise ValueError(f"the loaded state dict has format version {version}; this gradxform reads versions up "
                                 f"to {FORMAT_VERSION}: it was saved by a newer gradxform, upgrade to load it")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups; this optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"group {gi}: the loaded state dict has {len(saved['params'])} params, this "
                                 f"optimizer's group has {len(group['params'])}")
        new_states: dict[int, Any] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if "tx_state" in saved:
                n = len(group["params"])
                per_param = [state_dict["state"].get(pid, {}) for pid in saved["params"]]
                template = self._init_group_state(group)
                new_states[gi] = _merge_state(template, n, per_param, saved["tx_state"], f"group {gi}")
        for group, saved in zip(self.param_groups, saved_groups):
            for k, v in saved.items():
                if k not in _RESERVED:
                    group[k] = v
        self._gx_states = new_states
