"""Fused lowerings: declared fast paths onto torch's fused optimizer kernels.

A transform declares what it can be lowered to when it is built (`gradxform.base.declare`,
read back with `gradxform.base.info_of`), never by the adapter reading its structure:

- `AdamKernel`: ``gx.adam`` / ``gx.adamw`` with constant hyperparameters (``torch._fused_adam_``,
  ``torch._fused_adamw_``);
- `SGDKernel`: ``gx.sgd`` with constant hyperparameters (``torch._fused_sgd_``; also the exact
  per-tensor step for sparse gradients, as ``torch.optim.SGD``);
- `AdagradKernel`: ``gx.adagrad`` with constant hyperparameters (``torch._fused_adagrad_``, where
  the running torch has it for the device: not in torch 2.1);
- `ClipFactor`: a clip rule whose output is its input times a factor computed from norms alone.

`lowering_of` combines them: an alias on its own, or ``chain(rule, alias)`` with a global-factor
clip rule, whose factor scales the gradients (into scratch buffers) that the kernel then reads. `gradxform.Optimizer` asks `lowering_of` for a group's transform and runs
`Lowering.step` when `Lowering.unsupported` finds nothing against it; otherwise it runs the
generic path, which is the reference every lowering equals (to rounding: the clip factor comes
from the rule run on the global norm, ``rule(norm) / norm``).

The state is the generic path's own (``ScaleByAdamState`` / ``TraceState`` / ``ScaleByRssState`` inside the alias's
``InjectHyperparamsState``), so a run may switch paths at any step and checkpoints do not depend
on the path.

Neither path writes the user's ``.grad``: a clip factor below 1 scales the gradients into scratch
buffers the caller keeps between steps (on the CPU a factor of exactly 1, read for free, skips
that pass). The kernels' own ``grad_scale`` is not used for the clip: they unscale ``.grad`` in
place.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from . import _compat
from . import tree as _tree
from .base import GradientTransformation, declare, info_of

__all__ = ["AdamKernel", "SGDKernel", "AdagradKernel", "ClipFactor", "Lowering", "lowering_of", "kernel_supported", "declare_kernel"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdamKernel(NamedTuple):
    """Declared by ``gx.adam`` (``decoupled=False``) and ``gx.adamw`` with constant hyperparameters.

    Attributes:
        decoupled: AdamW's decoupled weight decay (``torch._fused_adamw_``) or Adam's L2
            (``torch._fused_adam_``).
        amsgrad: the AMSGrad variant.
        maximize: ascend instead of descend.
    """

    decoupled: bool
    amsgrad: bool
    maximize: bool


class SGDKernel(NamedTuple):
    """Declared by ``gx.sgd`` with constant hyperparameters.

    Attributes:
        nesterov: Nesterov momentum.
        maximize: ascend instead of descend.
    """

    nesterov: bool
    maximize: bool


class AdagradKernel(NamedTuple):
    """Declared by ``gx.adagrad`` with constant hyperparameters (``torch._fused_adagrad_``: the
    rule of ``torch.optim.Adagrad`` with ``lr``, ``lr_decay``, ``weight_decay``, ``eps``; the
    ``initial_accumulator_value`` only fills the ``sum`` buffer at init).

    Attributes:
        maximize: ascend instead of descend.
    """

    maximize: bool


class ClipFactor(NamedTuple):
    """Declared by a clip rule whose output is its input times a factor from norms alone:
    ``"global"`` (one factor from the global norm: foldable into a fused kernel), ``"leaf"`` (one
    per leaf) or ``"coordinate"`` (an elementwise clamp, no factor).

    Attributes:
        kind: ``"global"``, ``"leaf"`` or ``"coordinate"``.
    """

    kind: str


def kernel_supported(name: str, device_type: str, ops: Any = torch) -> bool:
    """Whether torch's fused kernel ``ops.<name>`` (``torch.<name>``) runs on ``device_type``.

    Looks the kernel up on every call (``torch._fused_adagrad_`` is absent from torch 2.1, for
    example), asks torch's own list of devices with fused optimizer kernels (`gradxform._compat`),
    then runs the kernel once on one-element tensors (once per kernel and device: the CPU kernels
    arrived in torch 2.4, after the names).

    Args:
        name: the kernel's name in ``torch`` (``"_fused_adam_"``, ``"_fused_adamw_"``,
            ``"_fused_sgd_"``, ``"_fused_adagrad_"``).
        device_type: ``"cpu"``, ``"cuda"``, ...
        ops: where to look the kernel up (``torch``; another namespace stands for another torch).

    Returns:
        Whether the kernel exists and runs there.

    References:
        torch.optim's ``fused=True`` kernels (https://pytorch.org/docs/stable/optim.html).

    Example:
        >>> from gradxform.fastpath import kernel_supported
        >>> kernel_supported("_fused_adagrad_", "cpu", ops=object())  # a torch without the kernel
        False
    """
    kernel = getattr(ops, name, None)
    if kernel is None:
        return False
    return _kernel_runs(name, kernel, device_type)


@functools.lru_cache(maxsize=None)
def _kernel_runs(name: str, kernel: Any, device_type: str) -> bool:
    if device_type not in _compat.fused_devices():
        return False
    try:
        one = torch.zeros(1, device=device_type)
        step = torch.ones((), device=device_type)
        if name == "_fused_sgd_":
            kernel([one.clone()], [one.clone()], [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0,
                   nesterov=False, maximize=False, is_first_step=False)
        elif name == "_fused_adagrad_":
            kernel([one.clone()], [one.clone()], [one.clone()], [step], lr=0.1, lr_decay=0.0, weight_decay=0.0,
                   eps=1e-10, maximize=False)
        else:
            kernel([one.clone()], [one.clone()], [one.clone()], [one.clone()], [], [step], lr=0.1, beta1=0.9,
                   beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _unsupported_tensors(ps: list[torch.Tensor], gs: list[torch.Tensor], kernel: str,
                         ops: Any = torch) -> str | None:
    """Why these params and gradients cannot take ``kernel`` (``None``: they can; ``ops``: where
    the kernel is looked up, as in `kernel_supported`)."""
    device = ps[0].device
    for i, (p, g) in enumerate(zip(ps, gs)):
        if type(p) is not torch.Tensor and not isinstance(p, torch.nn.Parameter):
            return f"param {i} is a {type(p).__name__}, not a plain tensor"
        if _tree.is_dtensor(p) or _tree.is_dtensor(g):
            return f"param {i} is sharded (DTensor)"
        if p.device != device or g.device != device:
            return f"param {i} is on {p.device}, the first on {device}"
        if p.dtype not in _FUSED_DTYPES or g.dtype != p.dtype:
            return f"param {i} is {p.dtype} with a {g.dtype} gradient"
        if g.layout is not torch.strided:
            return f"param {i} has a sparse gradient"
        if not (p.is_contiguous() and g.is_contiguous()):
            return f"param {i} or its gradient is not contiguous"
    if not kernel_supported(kernel, device.type, ops):
        return f"torch.{kernel} does not run on {device.type} in torch {torch.__version__}"
    return None


def _unsupported_buffers(ps: list[torch.Tensor], bufs: list[torch.Tensor | None], what: str) -> str | None:
    for i, (p, b) in enumerate(zip(ps, bufs)):
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device or not b.is_contiguous():
            return f"the {what} buffer of param {i} does not match it (shape, dtype, device or layout)"
    return None


def _find(states: Any, fields: tuple[str, ...]) -> Any:
    """The member state of an alias's inner chain with these fields (e.g. Adam's moments)."""
    for s in states:
        if getattr(s, "_fields", None) == fields:
            return s
    return None


class Lowering(NamedTuple):
    """A transform's fused step: ``kernel`` (an `AdamKernel`, `SGDKernel` or `AdagradKernel`) of an alias whose
    state is an ``InjectHyperparamsState``, optionally after ``clip``, a global-factor clip rule
    (then the transform's state is ``(clip_state, alias_state)``)."""

    kernel: AdamKernel | SGDKernel | AdagradKernel
    clip: GradientTransformation | None = None

    @property
    def kernel_name(self) -> str:
        if isinstance(self.kernel, SGDKernel):
            return "_fused_sgd_"
        if isinstance(self.kernel, AdagradKernel):
            return "_fused_adagrad_"
        return "_fused_adamw_" if self.kernel.decoupled else "_fused_adam_"

    def _split(self, state: Any) -> tuple[Any, Any]:
        return (None, state) if self.clip is None else (state[0], state[1])

    def _buffers(self, alias_state: Any, idx: list[int]) -> tuple[Any, list[list[torch.Tensor | None]], list[str]]:
        inner = alias_state.inner_state
        if isinstance(self.kernel, AdamKernel):
            adam = _find(inner, ("count", "mu", "nu", "nu_max"))
            if adam is None:
                return None, [], []
            bufs = [[adam.mu[i] for i in idx], [adam.nu[i] for i in idx]]
            names = ["exp_avg", "exp_avg_sq"]
            if self.kernel.amsgrad:
                bufs.append([adam.nu_max[i] for i in idx])
                names.append("max_exp_avg_sq")
            return adam, bufs, names
        if isinstance(self.kernel, AdagradKernel):
            rss = _find(inner, ("count", "sum_of_squares"))
            if rss is None:
                return None, [], []
            return rss, [[rss.sum_of_squares[i] for i in idx]], ["sum"]
        tr = _find(inner, ("count", "trace"))
        if tr is None:
            return None, [], []
        return tr, [[tr.trace[i] for i in idx]], ["momentum_buffer"]

    def unsupported(self, ps: list[torch.Tensor], grads: list[torch.Tensor | None], state: Any,
                    ops: Any = torch) -> str | None:
        """Why this step cannot take the lowering (``None``: it can). Checked on every step:
        device, dtype, contiguity, density, state shapes and the kernel in the running torch
        (looked up in ``ops``, as in `kernel_supported`)."""
        if _tree.traced():
            return "traced (torch.compile or torch.func): the generic path traces"
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return "no gradients"
        live_p = [ps[i] for i in idx]
        live_g = [grads[i] for i in idx]  # type: ignore[misc]
        _, alias_state = self._split(state)
        hp = alias_state.hyperparams
        for name, t in hp.items():
            if t.device.type != "cpu":
                return f"hyperparameter {name} is on {t.device}"
        if any(g.layout is not torch.strided for g in live_g):
            if not isinstance(self.kernel, SGDKernel) or self.clip is not None:
                return "sparse gradients (only gx.sgd without a clip before it takes them)"
            if "weight_decay" in hp and hp["weight_decay"].item() != 0:
                return "weight decay with sparse gradients (torch.optim.SGD does not take them either)"
            return None
        why = _unsupported_tensors(live_p, live_g, self.kernel_name, ops)
        if why is not None:
            return why
        member, bufs, names = self._buffers(alias_state, idx)
        if member is None and isinstance(self.kernel, AdamKernel):
            return "no Adam state"
        if member is None and isinstance(self.kernel, AdagradKernel):
            return "no Adagrad state"
        for b, n in zip(bufs, names):
            why = _unsupported_buffers(live_p, b, n)
            if why is not None:
                return why
        return None

    def step(self, ps: list[torch.Tensor], grads: list[torch.Tensor | None], state: Any,
             scratch: list[torch.Tensor | None]) -> Any:
        """One step on the fused kernel: params and state buffers updated in place; returns the
        new state (the same buffers, counts advanced). ``scratch`` (one slot per param, kept by
        the caller between steps) receives the clipped gradients when a clip factor applies.
        Returns ``None``, having changed nothing, when the clip's norm is not finite on the CPU:
        the generic path then decides (it recomputes an overflowed norm in float64)."""
        clip_state, alias_state = self._split(state)
        idx = [i for i, g in enumerate(grads) if g is not None]
        live_p = [ps[i] for i in idx]
        live_g: list[torch.Tensor] = [grads[i] for i in idx]  # type: ignore[misc]
        if self.clip is not None:
            factor, clip_state = self._clip_factor(live_g, clip_state)
            if factor is False:
                return None
            if factor is not None:
                for j, i in enumerate(idx):
                    if scratch[i] is None or scratch[i].shape != live_g[j].shape or scratch[i].dtype != live_g[j].dtype:
                        scratch[i] = torch.empty_like(live_g[j])
                    torch.mul(live_g[j], factor, out=scratch[i])
                live_g = [scratch[i] for i in idx]  # type: ignore[misc]
        hp = {k: (t.item() if t.ndim == 0 else tuple(t.tolist())) for k, t in alias_state.hyperparams.items()}
        if isinstance(self.kernel, SGDKernel) and any(g.layout is not torch.strided for g in live_g):
            new_alias = _sparse_sgd_step(self.kernel, alias_state, hp, idx, live_p, live_g)
        elif isinstance(self.kernel, SGDKernel):
            new_alias = self._sgd(alias_state, hp, idx, live_p, live_g)
        elif isinstance(self.kernel, AdagradKernel):
            new_alias = self._adagrad(alias_state, hp, idx, live_p, live_g)
        else:
            new_alias = self._adam(alias_state, hp, idx, live_p, live_g)
        return new_alias if self.clip is None else (clip_state, new_alias)

    def _clip_factor(self, live_g: list[torch.Tensor], clip_state: Any) -> tuple[Any, Any]:
        """The clip factor (``None`` for a factor of exactly 1 read on the CPU; ``False`` for a
        non-finite norm on the CPU) and the rule's new state: the rule runs (purely) on one proxy
        leaf holding the global norm, so its own state (AutoClip's history, a seeded counter,
        statistics) advances exactly as on the whole tree."""
        assert self.clip is not None
        norm = _tree.global_norm(live_g).reshape(1)
        if norm.device.type == "cpu" and not bool(torch.isfinite(norm)):  # a CPU read, not a device sync
            return False, clip_state
        out, clip_state = self.clip.update([norm], clip_state, None)
        finite = torch.isfinite(norm)
        factor = torch.where(finite & (norm > 0), out[0] / torch.where(norm > 0, norm, torch.ones_like(norm)),
                             torch.where(finite, torch.ones_like(norm), torch.zeros_like(norm)))
        if factor.device.type == "cpu" and float(factor) == 1.0:  # a CPU read, not a device sync
            return None, clip_state
        return factor.reshape(()).to(live_g[0].device), clip_state

    def _adam(self, alias_state: Any, hp: dict[str, Any], idx: list[int], live_p: list[torch.Tensor],
              live_g: list[torch.Tensor]) -> Any:
        kern = self.kernel
        adam, bufs, _ = self._buffers(alias_state, idx)
        counts = [adam.count[i] for i in idx]
        torch._foreach_add_(counts, 1)
        device = live_p[0].device
        # torch's kernel takes float32 step tensors on the params' device: built from the CPU
        # counts in one transfer per step (no read back).
        steps = torch.stack(counts).to(device=device, dtype=torch.float32).unbind(0)
        beta1, beta2 = hp["betas"]
        kernel = torch._fused_adamw_ if kern.decoupled else torch._fused_adam_
        kernel(live_p, live_g, bufs[0], bufs[1], bufs[2] if kern.amsgrad else [], list(steps),
               lr=hp["lr"], beta1=beta1, beta2=beta2, weight_decay=hp.get("weight_decay", 0.0), eps=hp["eps"],
               amsgrad=kern.amsgrad, maximize=kern.maximize)
        return alias_state._replace(count=alias_state.count + 1)

    def _adagrad(self, alias_state: Any, hp: dict[str, Any], idx: list[int], live_p: list[torch.Tensor],
                 live_g: list[torch.Tensor]) -> Any:
        # torch.optim.Adagrad(fused=True): each leaf's step advanced first, then the kernel reads
        # it (clr = lr / (1 + (step - 1) lr_decay)); s += g^2, p -= clr g / (sqrt(s) + eps)
        rss, bufs, _ = self._buffers(alias_state, idx)
        counts = [rss.count[i] for i in idx]
        torch._foreach_add_(counts, 1)
        device = live_p[0].device
        steps = torch.stack(counts).to(device=device, dtype=torch.float32).unbind(0)
        torch._fused_adagrad_(live_p, live_g, bufs[0], list(steps), lr=hp["lr"], lr_decay=hp["lr_decay"],
                              weight_decay=hp.get("weight_decay", 0.0), eps=hp["eps"],
                              maximize=self.kernel.maximize)
        return alias_state._replace(count=alias_state.count + 1)

    def _sgd(self, alias_state: Any, hp: dict[str, Any], idx: list[int], live_p: list[torch.Tensor],
             live_g: list[torch.Tensor]) -> Any:
        tr, bufs, _ = self._buffers(alias_state, idx)
        if tr is None:  # no momentum: no buffer
            torch._fused_sgd_(live_p, live_g, [], weight_decay=hp.get("weight_decay", 0.0), momentum=0.0, lr=hp["lr"],
                              dampening=0.0, nesterov=False, maximize=self.kernel.maximize, is_first_step=False)
            return alias_state._replace(count=alias_state.count + 1)
        counts = [tr.count[i] for i in idx]
        first = [int(c) == 0 for c in counts]  # CPU counters: no device sync
        torch._foreach_add_(counts, 1)
        for flag in (True, False):
            js = [j for j, f in enumerate(first) if f == flag]
            if not js:
                continue
            torch._fused_sgd_([live_p[j] for j in js], [live_g[j] for j in js], [bufs[0][j] for j in js],
                              weight_decay=hp.get("weight_decay", 0.0), momentum=hp["momentum"], lr=hp["lr"],
                              dampening=hp.get("dampening", 0.0), nesterov=self.kernel.nesterov,
                              maximize=self.kernel.maximize, is_first_step=flag)
        return alias_state._replace(count=alias_state.count + 1)


def _sparse_sgd_step(kern: SGDKernel, alias_state: Any, hp: dict[str, Any], idx: list[int],
                     live_p: list[torch.Tensor], live_g: list[torch.Tensor]) -> Any:
    """``torch.optim.SGD``'s rule one tensor at a time, for sparse gradients (e.g.
    ``nn.Embedding(sparse=True)``; no weight decay, as torch): ``g <- -g`` (maximize), momentum
    buffer ``b = g`` then ``mu b + (1 - dampening) g`` (nesterov ``g + mu b``), ``p <- p - lr g``.
    The buffer is dense (torch's is sparse): the same values."""
    tr = _find(alias_state.inner_state, ("count", "trace"))
    lr, mu, damp = hp["lr"], hp.get("momentum", 0.0), hp.get("dampening", 0.0)
    for j, (p, g) in enumerate(zip(live_p, live_g)):
        d = -g if kern.maximize else g
        if tr is not None:
            i = idx[j]
            buf, count = tr.trace[i], tr.count[i]
            if int(count) == 0:
                buf.copy_(d.to_dense() if d.layout is not torch.strided else d)
            else:
                buf.mul_(mu).add_(d, alpha=1.0 - damp)
            count.add_(1)
            d = buf.mul(mu).add_(d) if kern.nesterov else buf  # dense + sparse (torch's buffer is sparse)
        p.add_(d, alpha=-lr)
    return alias_state._replace(count=alias_state.count + 1)


def lowering_of(tx: GradientTransformation) -> Lowering | None:
    """The fused step ``tx`` declared, or ``None``: an alias's own `Lowering`, or
    ``chain(rule, alias)`` where ``rule`` declares a global `ClipFactor`.

    Args:
        tx: the transform.

    Returns:
        A `Lowering` (with ``clip`` set for a clipped chain) or ``None``.

    References:
        torch.optim's ``fused=True`` kernels (https://pytorch.org/docs/stable/optim.html,
        "Algorithms" and the ``fused`` argument). docs/three-ways.md.

    Example:
        >>> from gradxform.fastpath import lowering_of
        >>> lowering_of(gx.adamw(1e-3)).kernel
        AdamKernel(decoupled=True, amsgrad=False, maximize=False)
        >>> lowering_of(gx.adam(gx.constant_schedule(1e-3))) is None  # a schedule: no lowering
        True
    """
    info = info_of(tx)
    if isinstance(info.fast_path, Lowering):
        return info.fast_path
    members = info.members
    if members is None or len(members) != 2:
        return None
    rule, alias = info_of(members[0]).fast_path, info_of(members[1]).fast_path
    if isinstance(rule, ClipFactor) and rule.kind == "global" and isinstance(alias, Lowering) and alias.clip is None:
        return alias._replace(clip=members[0])
    return None


def declare_kernel(tx: GradientTransformation, kernel: AdamKernel | SGDKernel | AdagradKernel,
                   hyperparams: dict[str, Any]) -> None:
    """Declare ``kernel`` as ``tx``'s lowering unless a hyperparameter is a schedule (evaluated
    inside ``update``: the lowering reads the values the group set). Numbers and tensors qualify:
    ``group["lr"]`` stays live either way.

    Args:
        tx: the alias's transform (marked in place).
        kernel: the `AdamKernel`, `SGDKernel` or `AdagradKernel` it lowers to.
        hyperparams: the alias's hyperparameters (tuples such as ``betas`` are looked into).

    Returns:
        ``None``.

    References:
        torch.optim's ``fused=True`` kernels (https://pytorch.org/docs/stable/optim.html).

    Example:
        >>> from gradxform.fastpath import SGDKernel, declare_kernel, lowering_of
        >>> tx = gx.scale(-0.1)
        >>> declare_kernel(tx, SGDKernel(nesterov=False, maximize=False), {"lr": 0.1})
        >>> lowering_of(tx).kernel
        SGDKernel(nesterov=False, maximize=False)
    """
    flat = [x for v in hyperparams.values() for x in (v if isinstance(v, tuple) else (v,))]
    if not any(not isinstance(v, torch.Tensor) and callable(v) for v in flat):
        declare(tx, fast_path=Lowering(kernel))
