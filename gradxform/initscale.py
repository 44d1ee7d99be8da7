"""Init-scale solvers: GradInit (Zhu et al., NeurIPS 2021, arXiv 2102.08098), functional and
model-agnostic; the shared report; `project_lower_bound`. (Empirical init: `gradxform.empirical`.)

GradInit learns one positive scale ``m_j`` per parameter tensor so that the *first step* of the
optimizer that will train the network lowers the loss as much as possible, while the gradient
norm stays under a bound::

    minimise_m  L(S~; theta(m) - eta * A[g])   s.t.  ||g||_p <= gamma,  m >= alpha
    theta(m)_j = m_j * theta0_j,   g = grad_theta L(S; theta(m))
    A_SGD[g] = g (p = 2),   A_Adam[g] = sign(g) (p = 1, a constant: no gradient through it)

with two disjoint minibatches ``S``, ``S~`` per iteration. Each iteration minimises
``J = ||g||_p`` when ``||g||_p > gamma`` (the norm branch) and the look-ahead loss otherwise; the
scales move by a gradxform chain (default: clip the global norm of ``grad_m J`` to 1, Adam, step
``-tau``, `project_lower_bound` ``alpha``). ``grad_m J`` differentiates through ``g`` (a ``grad``
inside a ``grad``, via ``torch.func``). The user's module is never modified: the solver works on a
params pytree through ``torch.func.functional_call`` and returns new params.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch

from . import _dist
from . import tree as _tree
from .base import GradientTransformation, Params, Updates, chain, stateless, recorded
from .transforms import check_float, clip_by_global_norm, scale, scale_by_adam

__all__ = [
    "InitReport",
    "project_lower_bound",
    "gradinit_objective",
    "gradinit_scale_tx",
    "gradinit",
    "apply_fn_of",
    "progress_iter",
]

log = logging.getLogger(__name__)


# --- shared pieces ------------------------------------------------------------------------------


@recorded
def project_lower_bound(lower: float) -> GradientTransformation:
    """Keep params at or above ``lower`` after the update: ``u <- max(p + u, lower) - p``.

    Needs ``params`` (the values the updates will be added to), like optax's
    ``keep_params_nonnegative`` generalised to any bound. GradInit uses it for ``m >= alpha``.

    Args:
        lower: the bound (a number or a 0-d tensor).

    Returns:
        A stateless `GradientTransformation`; its ``update`` needs ``params``.

    Raises:
        TypeError: ``lower`` is not a number or a 0-d tensor.
        ValueError: ``lower`` is NaN; ``update`` without ``params``.

    References:
        optax.keep_params_nonnegative
        (https://optax.readthedocs.io/en/latest/api/transformations.html#optax.keep_params_nonnegative);
        Zhu, Ni, Xu, Kong, Huang and Goldstein, "GradInit: Learning to Initialize Neural Networks
        for Stable and Efficient Training", NeurIPS 2021, arXiv:2102.08098, Algorithm 1 (the
        projection ``m >= alpha``).

    Example:
        >>> params = {"m": torch.tensor([0.5, 2.0])}
        >>> tx = gx.project_lower_bound(1.0)
        >>> u, _ = tx.update({"m": torch.tensor([-1.0, -0.5])}, tx.init(params), params)
        >>> gx.apply_updates(params, u)["m"]
        tensor([1.0000, 1.5000])
    """
    check_float("lower", lower)

    def update_fn(updates: Updates, params: Params | None) -> Updates:
        if params is None:
            raise ValueError("project_lower_bound needs params: call update(updates, state, params)")
        return _tree.tree_map(lambda u, p: None if u is None else torch.clamp(p + u, min=lower) - p, updates, params)

    return stateless(update_fn)


def apply_fn_of(model: Any) -> Callable[[Any, Any], Any]:
    """``apply(params, x)``: ``functional_call`` for an ``nn.Module`` (unmodified), else ``model``
    itself, which must be a callable ``(params, x) -> output``.

    Args:
        model: an ``nn.Module`` or a callable ``(params, x) -> output``.

    Returns:
        ``apply(params, x)`` (``torch.func.functional_call(model, params, (x,), strict=False)``
        for a module).

    Raises:
        TypeError: ``model`` is neither a module nor callable.

    References:
        torch.func.functional_call
        (https://pytorch.org/docs/stable/generated/torch.func.functional_call.html).

    Example:
        >>> from gradxform.initscale import apply_fn_of
        >>> apply_fn_of(model)(params, x).shape
        torch.Size([8, 2])
    """
    if isinstance(model, torch.nn.Module):
        def apply(params: Any, x: Any) -> Any:
            return torch.func.functional_call(model, params, (x,), strict=False)
        return apply
    if callable(model):
        return model
    raise TypeError(f"model must be an nn.Module or a callable apply(params, x); got {type(model).__name__}")


def progress_iter(it: Iterable[Any], total: int | None, enabled: bool, desc: str) -> Iterable[Any]:
    """``it`` wrapped in a tqdm progress bar when asked for and tqdm is installed.

    Without tqdm a ``progress=True`` request is logged at INFO and ``it`` is returned as is.

    Args:
        it: the iterable.
        total: its length, for the bar (``None``: unknown).
        enabled: whether to show a bar.
        desc: the bar's label.

    Returns:
        ``it`` or the tqdm wrapper around it.

    References:
        tqdm.auto (https://tqdm.github.io/docs/shortcuts/#tqdmauto).

    Example:
        >>> from gradxform.initscale import progress_iter
        >>> list(progress_iter(range(3), 3, False, "gradinit"))
        [0, 1, 2]
    """
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.info("progress=True but tqdm is not installed: no progress bar")
        return it
    return tqdm(it, total=total, desc=desc)


def _rms(t: torch.Tensor) -> float:
    """RMS in at least float32 (float64 stays float64)."""
    t = t.detach()
    if t.is_complex():
        t = t.abs()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return float(t.square().mean().sqrt()) if t.numel() else 0.0


def _param_stats(params: Any) -> dict[str, float]:
    return {k: float(v.detach().float().norm()) for k, v in zip(_tree.tree_paths(params), _tree.tree_flatten(params)[0])
            if isinstance(v, torch.Tensor)}


def module_activation_rms(model: torch.nn.Module, params: Any, x: Any) -> dict[str, float]:
    """RMS of every parameter-owning leaf module's output for ``x`` under ``params``, measured with
    temporary forward hooks that are removed afterwards (the module is left as it was)."""
    out: dict[str, float] = {}
    handles = []
    for name, mod in model.named_modules():
        if next(mod.parameters(recurse=False), None) is None or next(mod.children(), None) is not None:
            continue

        def hook(m: Any, inp: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                out[name] = _rms(output)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            torch.func.functional_call(model, params, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
    return out


@dataclasses.dataclass
class InitReport:
    """What an init-scale solver did (`gradinit`, `empirical_init`). ``str(report)`` is a compact
    table; ``report.plot()`` (needs matplotlib) draws the per-layer picture.

    Attributes:
        method: the solver's name.
        scales: the solved multiplier per parameter tensor (path -> value).
        weight_norms_before: Frobenius norm per tensor before the solver.
        weight_norms_after: Frobenius norm per tensor after it.
        grad_rms_before: RMS of the loss gradient per tensor on the first batch, before.
        grad_rms_after: the same, after.
        act_rms_before: RMS of each parameter-owning leaf module's output on the first batch
            (when the model is an ``nn.Module``), before.
        act_rms_after: the same, after.
        objective: the trace of the solver's objective.
        grad_norms: GradInit's ``||g||_p`` per iteration.
        norm_branch_steps: GradInit iterations that took the norm branch.
        forward_passes: model evaluations the solver ran.
        backward_passes: backward passes the solver ran (a double backward counts once).
        iterations: the solver's iterations.
        extra: method-specific values.
    """

    method: str
    scales: dict[str, float]
    weight_norms_before: dict[str, float]
    weight_norms_after: dict[str, float]
    grad_rms_before: dict[str, float] = dataclasses.field(default_factory=dict)
    grad_rms_after: dict[str, float] = dataclasses.field(default_factory=dict)
    act_rms_before: dict[str, float] = dataclasses.field(default_factory=dict)
    act_rms_after: dict[str, float] = dataclasses.field(default_factory=dict)
    objective: list[float] = dataclasses.field(default_factory=list)
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    norm_branch_steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    iterations: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def final_grad_norm(self) -> float:
        """``||g||_p`` at the last GradInit iteration (NaN when the method has none)."""
        return self.grad_norms[-1] if self.grad_norms else math.nan

    def __str__(self) -> str:
        lines = [f"{self.method}: {self.iterations} iterations, {self.forward_passes} forward / "
                 f"{self.backward_passes} backward passes"]
        if self.grad_norms:
            lines.append(f"  norm-branch steps {self.norm_branch_steps}, final grad norm {self.final_grad_norm:.4g}")
        lines.append(f"  {'tensor':32s} {'scale':>9s} {'|w| before':>11s} {'|w| after':>11s} {'grad rms':>10s} {'after':>10s}")
        for k, v in self.scales.items():
            lines.append(f"  {k[:32]:32s} {v:9.4g} {self.weight_norms_before.get(k, math.nan):11.4g} "
                         f"{self.weight_norms_after.get(k, math.nan):11.4g} {self.grad_rms_before.get(k, math.nan):10.3g} "
                         f"{self.grad_rms_after.get(k, math.nan):10.3g}")
        if self.act_rms_before:
            lines.append(f"  {'module output':32s} {'rms before':>11s} {'rms after':>11s}")
            for k, v in self.act_rms_before.items():
                lines.append(f"  {k[:32]:32s} {v:11.4g} {self.act_rms_after.get(k, math.nan):11.4g}")
        return "\n".join(lines)

    def plot(self, path: str | None = None) -> Any:
        """Per-layer picture: scales, weight norms and activation RMS before/after, objective trace.
        Returns the matplotlib figure; saves it when ``path`` is given."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError("report.plot() needs matplotlib (pip install 'gradxform[plot]')") from e
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        names = list(self.scales)
        axes[0].bar(range(len(names)), [self.scales[k] for k in names], color="tab:blue")
        axes[0].set_title(f"{self.method}: scale per tensor")
        axes[0].set_xlabel("tensor index")
        if self.act_rms_before:
            mods = list(self.act_rms_before)
            axes[1].semilogy(range(len(mods)), [self.act_rms_before[k] for k in mods], "o-", label="before")
            axes[1].semilogy(range(len(mods)), [self.act_rms_after.get(k, math.nan) for k in mods], "o-", label="after")
            axes[1].set_title("output RMS per layer")
        else:
            axes[1].semilogy(range(len(names)), [self.weight_norms_before[k] for k in names], "o-", label="before")
            axes[1].semilogy(range(len(names)), [self.weight_norms_after[k] for k in names], "o-", label="after")
            axes[1].set_title("weight norm per tensor")
        axes[1].set_xlabel("layer")
        axes[1].legend()
        if self.objective:
            axes[2].semilogy(self.objective)
            axes[2].set_title("objective")
            axes[2].set_xlabel("iteration")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=90)
        return fig


def _batches(batches: Iterable[Any], what: str) -> Iterator[Any]:
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{what}: the batch iterable is empty") from None
    return itertools.chain([first], it)


def _check_params(params: Any, what: str) -> tuple[list[Any], Any, list[str]]:
    leaves, spec = _tree.tree_flatten(params)
    paths = _tree.tree_paths(params)
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise ValueError(f"{what}: the model has no parameters to scale")
    for k, x in zip(paths, leaves):
        if x is not None and (not isinstance(x, torch.Tensor) or not x.is_floating_point()):
            raise TypeError(f"{what}: params leaf '{k}' is not a floating-point tensor")
    return leaves, spec, paths


def _scalar_loss(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{what}: the loss must be a scalar (a mean over the batch); got {shape}")
    return value.reshape(())


def _split(batch: Any) -> tuple[Any, Any]:
    """The two halves of a batch along dim 0 (GradInit's ``S`` and ``S~``)."""
    leaves, spec = torch.utils._pytree.tree_flatten(batch)
    n = next((t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if n is None or n < 2:
        raise ValueError("gradinit: each batch must hold at least 2 examples (it is split into S and S~)")
    h = n // 2
    first = [t[:h] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in leaves]
    second = [t[h:2 * h] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in leaves]
    return torch.utils._pytree.tree_unflatten(first, spec), torch.utils._pytree.tree_unflatten(second, spec)


# --- GradInit -----------------------------------------------------------------------------------


def _norm_p(g: list[torch.Tensor], p: float) -> torch.Tensor:
    if p == 2:
        return torch.sqrt(sum(x.square().sum() for x in g))
    if p == 1:
        return sum(x.abs().sum() for x in g)
    return sum(x.abs().pow(p).sum() for x in g) ** (1.0 / p)


class _Objective(NamedTuple):
    value: torch.Tensor
    grad_norm: torch.Tensor
    norm_branch: torch.Tensor


def gradinit_objective(
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    target: str | GradientTransformation = "sgd",
    lr: float,
    gamma: float = 1.0,
    p: float | None = None,
    simplified: bool = False,
    _autograd: bool = False,
    _sync: bool = False,
) -> Callable[[Any, Any, Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """GradInit's objective ``J(scales, params0, batch, lookahead_batch) -> (J, aux)``.

    ``loss_fn(params, batch)`` is the mean training loss. With ``theta = scales * params0`` (per
    leaf; ``scales`` holds 0-d tensors, ``None`` leaves are not scaled) and
    ``g = grad_theta loss_fn(theta, batch)``::

        J = ||g||_p                                            if ||g||_p > gamma   (norm branch)
          = loss_fn(theta - lr * A[g], lookahead_batch)        otherwise            (look-ahead)

    ``target="sgd"``: ``A[g] = g``, ``p = 2``; ``target="adam"``: ``A[g] = sign(g)`` held
    constant (Adam's first step with eps -> 0), ``p = 1``; a `gradxform.GradientTransformation`:
    the look-ahead point is ``theta + tx.update(g, tx.init(theta), theta)`` (its first step from a
    fresh state, differentiated through; ``lr`` is then unused), ``p = 2`` unless given.
    ``simplified=True`` is the gradinit package's variant: ``loss_fn(theta, batch)`` on the same
    batch instead of the look-ahead (no second batch, no step).

    No host sync: both branches are computed and selected with ``torch.where``; the look-ahead
    is evaluated at ``theta.detach()`` on the norm branch so that an overflowing step cannot turn
    the backward into NaN. ``aux = {"value": J, "grad_norm": ||g||_p, "norm_branch": bool}``.

    Args:
        loss_fn: ``(params, batch) -> scalar`` mean training loss.
        target: ``"sgd"``, ``"adam"`` or a `GradientTransformation` (the optimizer to be trained
            after the initialisation).
        lr: the look-ahead step size ``eta`` (>= 0).
        gamma: the gradient-norm bound ``gamma`` (>= 0).
        p: the norm's order (default 2 for SGD and a transform, 1 for Adam), > 0.
        simplified: the gradinit package's same-batch variant (no look-ahead step).

    Returns:
        ``objective(scales, params0, batch, lookahead_batch) -> (J, aux)``, differentiable with
        respect to ``scales``.

    Raises:
        ValueError: an unknown ``target`` name, a negative ``lr`` or ``gamma``, ``p <= 0``.
        TypeError: ``target`` is neither a name nor a transform.

    References:
        Zhu, Ni, Xu, Kong, Huang and Goldstein, "GradInit: Learning to Initialize Neural Networks
        for Stable and Efficient Training", NeurIPS 2021, arXiv:2102.08098, Algorithm 1
        (the objective with its gradient-norm constraint). docs/init-scale.md, docs/migration/gradinit.md.

    Example:
        >>> J = gx.gradinit_objective(lambda p, b: ((p["w"] - b) ** 2).mean(), lr=0.1, gamma=10.0)
        >>> scales = {"w": torch.tensor(1.0, requires_grad=True)}
        >>> value, aux = J(scales, {"w": torch.tensor([2.0])}, torch.zeros(1), torch.zeros(1))
        >>> value, aux["norm_branch"]  # ||g|| = 4 <= 10: the loss after the step 2 - 0.1 * 4
        (tensor(2.5600, grad_fn=<WhereBackward0>), tensor(False))
    """
    if isinstance(target, str):
        if target not in ("sgd", "adam"):
            raise ValueError(f"target must be 'sgd', 'adam' or a GradientTransformation; got {target!r}")
        order = p if p is not None else (2.0 if target == "sgd" else 1.0)
    elif isinstance(target, tuple) and len(target) == 2 and callable(target[1]):
        order = p if p is not None else 2.0
    else:
        raise TypeError(f"target must be 'sgd', 'adam' or a GradientTransformation; got {target!r}")
    check_float("lr", lr, low=0.0)
    check_float("gamma", gamma, low=0.0)
    if order <= 0:
        raise ValueError(f"p must be > 0; got {order}")

    def objective(scales: Any, params0: Any, batch: Any, lookahead_batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        leaves0, spec = _tree.tree_flatten(params0)
        s_leaves = _tree.check_structure(spec, scales, "scales", reference=params0)
        live = [i for i, x in enumerate(leaves0) if x is not None]
        theta = list(leaves0)
        for i in live:
            theta[i] = s_leaves[i] * leaves0[i]

        def loss_at(live_vals: list[torch.Tensor], b: Any) -> torch.Tensor:
            full = _tree.scatter(theta, live, live_vals)
            return _scalar_loss(loss_fn(_tree.tree_unflatten(spec, full), b), "gradinit")

        th = [theta[i] for i in live]
        if _autograd:  # the driver's path: torch.autograd with create_graph (faster than nesting torch.func.grad)
            loss_s = loss_at(th, batch)
            g = list(torch.autograd.grad(loss_s, th, create_graph=True))
            if _sync:  # the gradient and loss of the batch of all ranks (differentiable all-reduce)
                g, loss_s = _dp_mean(g), _dp_mean([loss_s])[0]
        else:
            loss_s, g = _value_and_grad(loss_at, th, batch)
        gnorm = _norm_p(g, order)
        norm_branch = gnorm > gamma
        if simplified:
            second = loss_s
        else:
            if isinstance(target, str):
                direction = g if target == "sgd" else [torch.sign(x).detach() for x in g]
                stepped = [t - lr * d for t, d in zip(th, direction)]
            else:
                g_tree = _tree.tree_unflatten(_tree.tree_flatten(th)[1], g)
                th_tree = _tree.tree_unflatten(_tree.tree_flatten(th)[1], th)
                with _tree.differentiable():  # out-of-place ops: the step is differentiated through
                    u, _ = target.update(g_tree, target.init(th_tree), th_tree)
                stepped = [t + x for t, x in zip(th, _tree.tree_flatten(u)[0])]
            safe = [torch.where(norm_branch, t.detach(), s) for t, s in zip(th, stepped)]
            second = loss_at(safe, lookahead_batch)
            if _sync:
                second = _dp_mean([second])[0]
        value = torch.where(norm_branch, gnorm, second)
        return value, {"value": value.detach(), "grad_norm": gnorm.detach(), "norm_branch": norm_branch.detach()}

    return objective


def _dp_mean(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over the ranks of each tensor, differentiable (one all-reduce for the list)."""
    world = _dist.world_size()
    return [x / world for x in _dist.all_reduce_sum(xs, differentiable=True)]


def _math_attention() -> Any:
    """GradInit differentiates through a gradient: fused attention kernels have no double
    backward, so attention runs on the math backend inside the solver (torch >= 2.3's
    ``torch.nn.attention.sdpa_kernel``; a no-op before)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _value_and_grad(fn: Callable[[list[torch.Tensor], Any], torch.Tensor], xs: list[torch.Tensor],
                    batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn(xs, batch)`` and its gradient w.r.t. ``xs``, differentiable (create_graph)."""
    def wrapped(vals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        v = fn(vals, batch)
        return v, v

    g, value = torch.func.grad(wrapped, has_aux=True)(xs)
    return value, list(g)


@recorded
def gradinit_scale_tx(tau: float = 1e-2, alpha: float = 0.01, clip: float | None = 1.0) -> GradientTransformation:
    """The default optimizer of GradInit's scales: ``chain(clip_by_global_norm(clip),
    scale_by_adam(0.9, 0.999, 1e-8), scale(-tau), project_lower_bound(alpha))`` (the paper's
    Adam on the scales and ``m >= alpha``; the clip keeps the first, huge scale gradients of an
    exploding init from freezing Adam's second moment, docs/migration/gradinit.md).

    Args:
        tau: Adam's learning rate on the scales (> 0).
        alpha: the lower bound of every scale.
        clip: the global-norm clip of the scales' gradients, or ``None`` for none.

    Returns:
        The chained `GradientTransformation`; its ``update`` needs ``params`` (the scales).

    Raises:
        TypeError: ``tau`` is not a number or a 0-d tensor.
        ValueError: ``tau`` is not > 0; ``clip`` is not > 0.

    References:
        Zhu, Ni, Xu, Kong, Huang and Goldstein, "GradInit: Learning to Initialize Neural Networks
        for Stable and Efficient Training", NeurIPS 2021, arXiv:2102.08098, Algorithm 1.
        docs/migration/gradinit.md.

    Example:
        >>> tx = gx.gradinit_scale_tx(tau=0.5, alpha=0.9)
        >>> scales = {"w": torch.tensor(1.0)}
        >>> u, _ = tx.update({"w": torch.tensor(3.0)}, tx.init(scales), scales)
        >>> gx.apply_updates(scales, u)["w"]  # 1 - 0.5, held at alpha
        tensor(0.9000)
    """
    check_float("tau", tau, low=0.0, low_open=True)
    parts = [] if clip is None else [clip_by_global_norm(clip)]
    parts += [scale_by_adam(0.9, 0.999, 1e-8), scale(-tau), project_lower_bound(alpha)]
    return chain(*parts)


def gradinit(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    loss: Callable[[Any, Any], torch.Tensor],
    *,
    target: str | GradientTransformation = "sgd",
    lr: float,
    gamma: float = 1.0,
    alpha: float = 0.01,
    tau: float = 1e-2,
    p: float | None = None,
    iters: int | None = None,
    scale_grad_clip: float | None = 1.0,
    scale_tx: GradientTransformation | None = None,
    simplified: bool = False,
    autocast: torch.dtype | None = None,
    grad_scaler: Any = None,
    progress: bool = False,
    sync: bool = False,
) -> tuple[Any, InitReport]:
    """Solve GradInit's scales and return ``(new_params, report)``; the module is not touched.

    With ``theta(m) = m * theta0`` (one scale per tensor), ``g = grad L(S; theta(m))`` and the
    training optimizer's step ``A[g]``, each iteration takes a step of the scales on
    ``J(m) = L(S~; theta(m) - lr * A[g])`` when ``||g||_p <= gamma`` and on ``||g||_p`` otherwise,
    then clamps ``m >= alpha``.

    ``model``: an ``nn.Module`` (applied with ``torch.func.functional_call``) or a callable
    ``apply(params, x)``. ``params``: the initial params pytree (``theta0``). ``batches``: an
    iterable of ``(x, y)`` batches of size ``2B``; each is split into ``S`` (first half) and ``S~``
    (second half). ``loss(output, y)``: the mean training loss. ``target``/``lr``: the optimizer
    that will train the network and its learning rate (see `gradinit_objective`). ``iters``: stop
    after that many batches (default: when ``batches`` ends). Scales move by ``scale_tx``
    (default `gradinit_scale_tx(tau, alpha, scale_grad_clip)`) and are clamped to ``>= alpha``.

    ``simplified=True`` solves the gradinit package's objective instead (the loss on the whole
    batch in place of the look-ahead; ``p`` should then be given as that package's ``norm``).

    Mixed precision: ``autocast=torch.bfloat16`` (or float16) runs the model under
    ``torch.autocast``; with a ``grad_scaler`` (``torch.amp.GradScaler``) the objective is
    scaled before the scales' backward and unscaled after, and an iteration whose scale gradients
    are not finite is skipped and the scaler updated, as in a training loop.

    Data parallel (``sync=True`` under an initialised ``torch.distributed`` process group): each
    rank passes its own batches, all of the same size, and the solver computes what one process
    computes on the union of the ranks' batches (the union of the first halves is ``S``, of the
    second halves ``S~``): ``g`` and the losses are averaged over the ranks by a differentiable
    all-reduce inside the objective, and the scale gradients (each rank's share of ``d(R J)/dm``)
    are averaged before the scale step, so the scales and the returned params are equal on every
    rank. The report's RMS statistics stay this rank's.

    Returns ``{k: m_k * theta0_k}`` and an `InitReport` (scales, norms, gradient and activation
    RMS before and after, objective trace, norm-branch count, final ``||g||_p``, pass counts).

    Args:
        model: an ``nn.Module`` or a callable ``apply(params, x)``.
        params: the initial params ``theta0``.
        batches: an iterable of ``(x, y)`` batches of size ``2B``.
        loss: ``loss(output, y)``, the mean training loss.
        target: ``"sgd"``, ``"adam"`` or a `GradientTransformation`: the training optimizer.
        lr: its learning rate.
        gamma: the gradient-norm bound.
        alpha: the lower bound of the scales.
        tau: the scales' learning rate.
        p: the norm order (``None``: 2 for SGD, 1 for Adam).
        iters: the number of batches used (``None``: all).
        scale_grad_clip: the global-norm clip of the scale gradients (``None``: off).
        scale_tx: the scales' optimizer (default `gradinit_scale_tx`).
        simplified: solve the gradinit package's objective instead.
        autocast: a low-precision dtype to run the model under ``torch.autocast``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16.
        progress: log progress.
        sync: average over the ranks of the default process group.

    Returns:
        ``(new_params, report)``: ``{k: m_k * theta0_k}`` and an `InitReport`.

    Raises:
        ValueError: a hyperparameter out of range or an unknown ``target``.

    References:
        Zhu, Ni, Xu, Kong, Huang and Goldstein, "GradInit: Learning to Initialize Neural
        Networks for Stable and Efficient Training", NeurIPS 2021, arXiv:2102.08098,
        Algorithm 1. docs/init-scale.md, docs/migration/gradinit.md.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(3)]
        >>> new_params, report = gx.gradinit(model, params, batches, torch.nn.functional.mse_loss, lr=0.1)
        >>> sorted(new_params)
        ['bias', 'weight']
    """
    leaves, spec, paths = _check_params(params, "gradinit")
    check_float("alpha", alpha, low=0.0)
    if iters is not None and (not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be a positive int or None; got {iters!r}")
    apply = apply_fn_of(model)
    params0 = _tree.tree_map(lambda x: x.detach(), params)
    device_type = next(x for x in leaves if isinstance(x, torch.Tensor)).device.type

    def loss_fn(theta: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        if autocast is not None:
            with torch.autocast(device_type, dtype=autocast):
                out = apply(theta, x)
            out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        else:
            out = apply(theta, x)
        return _scalar_loss(loss(out, y), "gradinit")

    sync = sync and _dist.world_size() > 1
    objective = gradinit_objective(loss_fn, target=target, lr=lr, gamma=gamma, p=p, simplified=simplified,
                                   _autograd=True, _sync=sync)

    def obj_grad(scales: Any, s_batch: Any, la_batch: Any, factor: float = 1.0) -> tuple[Any, dict[str, torch.Tensor]]:
        """``grad_m J`` (of ``factor * J``) by torch.autograd: the scales become leaves that
        require grad, ``g`` is taken with create_graph, and one backward reaches the scales."""
        s_leaves, s_spec = _tree.tree_flatten(scales)
        req = [None if t is None else t.detach().requires_grad_(True) for t in s_leaves]
        with torch.enable_grad():
            value, aux = objective(_tree.tree_unflatten(s_spec, req), params0, s_batch, la_batch)
            live = [t for t in req if t is not None]
            grads = torch.autograd.grad(value * factor, live, allow_unused=True)
        it_g = iter(grads)
        out = [None if t is None else (torch.zeros_like(t) if (g := next(it_g)) is None else g.detach())
               for t in req]
        if sync:  # each rank holds its paths' share of d(R J)/dm: their mean is dJ/dm
            live_out = [t for t in out if t is not None]
            out = _tree.scatter(out, [i for i, t in enumerate(out) if t is not None],
                                [t.detach() for t in _dp_mean(live_out)])
        return _tree.tree_unflatten(s_spec, out), aux
    tx = scale_tx if scale_tx is not None else gradinit_scale_tx(tau, alpha, scale_grad_clip)
    scales = _tree.tree_map(lambda x: torch.ones((), dtype=x.dtype, device=x.device), params0)
    state = tx.init(scales)
    report = InitReport("gradinit-simplified" if simplified else "gradinit", {}, _param_stats(params0), {})

    def grad_rms(theta: Any, batch: Any) -> dict[str, float]:
        g = torch.func.grad(lambda th: loss_fn(th, batch))(theta)
        return {k: _rms(v) for k, v in zip(paths, _tree.tree_flatten(g)[0]) if isinstance(v, torch.Tensor)}

    it = _batches(batches, "gradinit")
    if iters is not None:
        it = itertools.islice(it, iters)
    first_batch = None
    good_steps = 0
    for batch in progress_iter(it, iters, progress, "gradinit"):
        if first_batch is None:
            first_batch = batch
            report.grad_rms_before = grad_rms(params0, batch)
            if isinstance(model, torch.nn.Module):
                report.act_rms_before = module_activation_rms(model, params0, batch[0])
        s_batch, la_batch = (batch, batch) if simplified else _split(batch)
        if grad_scaler is not None and grad_scaler.is_enabled():
            # scale() is the public way to (lazily) set the scaler up; its value is the factor
            factor = float(grad_scaler.scale(torch.ones((), device=device_type)))
            with _math_attention():
                gs, aux = obj_grad(scales, s_batch, la_batch, factor)
            gs = _tree.tree_map(lambda t, f=factor: t / f, gs)
            finite = all(bool(torch.isfinite(t).all()) for t in _tree.tree_flatten(gs)[0] if t is not None)
            good_steps = _update_scaler(grad_scaler, finite, good_steps)
            if not finite:
                report.extra["skipped"] = report.extra.get("skipped", 0) + 1
                report.iterations += 1
                report.forward_passes += 1 if simplified else 2
                report.backward_passes += 2
                continue
        else:
            with _math_attention():
                gs, aux = obj_grad(scales, s_batch, la_batch)
        updates, state = tx.update(gs, state, scales)
        scales = _tree.tree_map(lambda s, u: s + u, scales, updates)
        report.objective.append(float(aux["value"]) if "value" in aux else float(aux["grad_norm"]))
        report.grad_norms.append(float(aux["grad_norm"]))
        report.norm_branch_steps += int(bool(aux["norm_branch"]))
        report.iterations += 1
        report.forward_passes += 1 if simplified else 2
        report.backward_passes += 2
    new_leaves = [None if x is None else (s * x).detach() for s, x in zip(_tree.tree_flatten(scales)[0], _tree.tree_flatten(params0)[0])]
    new_params = _tree.tree_unflatten(spec, new_leaves)
    report.scales = {k: float(s) for k, s in zip(paths, _tree.tree_flatten(scales)[0]) if s is not None}
    report.weight_norms_after = _param_stats(new_params)
    if first_batch is not None:
        report.grad_rms_after = grad_rms(new_params, first_batch)
        if isinstance(model, torch.nn.Module):
            report.act_rms_after = module_activation_rms(model, new_params, first_batch[0])
    return new_params, report


def _update_scaler(scaler: Any, finite: bool, good_steps: int) -> int:
    """Back off or grow a ``torch.amp.GradScaler`` as its ``update()`` does after a step, through
    its public ``update(new_scale)``; returns the count of finite steps since the last change."""
    current = float(scaler.get_scale())
    if not finite:
        scaler.update(current * scaler.get_backoff_factor())
        return 0
    good_steps += 1
    if good_steps >= scaler.get_growth_interval():
        scaler.update(current * scaler.get_growth_factor())
        return 0
    return good_steps
