"""GradNorm on the paper's toy multitask regression (Chen et al., ICML 2018, Section 4).

``T`` regression tasks ``f_i(x) = sigma_i * tanh((B + eps_i) x)`` (x in R^250, outputs in R^100;
B and eps_i fixed 100x250 matrices with IID N(0, 10) and N(0, 3.5) entries, read as variances;
x ~ N(0, I)) share a trunk of four Linear+ReLU layers 250->100->100->100->100, with one affine
head 100->100 per task. Task i's loss is the mean squared error over the batch and its outputs,
so its scale grows like sigma_i^2: with equal weights the large-sigma tasks dominate the shared
trunk. GradNorm (alpha = 0.12, the paper's toy value; weights moved by Adam(0.025)) learns loss
weights ``w`` that balance the weighted gradient norms ``G_i = w_i ||grad_W L_i||`` at ``W``, the
weight of the last trunk Linear. ``T = 2`` uses sigma = (1, 100); ``T = 10`` uses sigma log-uniform on
[1, 100] (``np.random.default_rng(0)``, rounded to 2 decimals).

Both methods (equal weights ``gx.fixed_weights([1.0] * T)`` and ``gx.gradnorm``) start from the
same initial params and see the same mini-batches. The functional step::

    f = gx.weighted_grad_and_task_norms(losses_fn, shared="trunk.6.weight")
    tx = gx.chain(gx.gradnorm(T, alpha=0.12, weight_tx=gx.adam(0.025)), gx.sgd(lr_schedule))
    state = tx.init(params)
    for each mini-batch:
        w = gx.loss_weights(state)                   # this step's weights
        res = f(params, batch, w)                    # grad of sum_i w_i L_i, and n_i = ||grad_W L_i||
        updates, state = tx.update(res.grads, state, params, losses=res.losses,
                                   task_grad_norms=res.task_grad_norms)
        params = gx.apply_updates(params, updates)

Training: SGD lr 0.003 after a 500-step linear warm-up, batch 100, 2000 steps (docs/loss-weighting.md).
Reported per method, at the end: the spread ``max_i G_i / min_i G_i`` at W (G_i = w_i n_i, n_i
on the first 1000 test points; equal weights: G_i = n_i), the task-normalised test loss
``sum_i L_i^test(t) / L_i^test(0)`` on all test points (the paper's metric, lower is better) and
GradNorm's final weights with their Spearman rank correlation with sigma (the paper: the weights
end up larger for the tasks with smaller sigma). The test-loss comparison is reported as it comes
out; it is not what the mechanism guarantees.

With ``--plot PREFIX`` (needs matplotlib) it saves ``PREFIX_T{T}.png``: the weights over time, the
spread of G over time (log scale) and the task-normalised test loss over time, for both methods.
``--smoke``: a few steps on a tiny data set (for CI).

Run:  python examples/gradnorm_toy.py [--tasks 2 10] [--steps 2000] [--seed 0] [--train 10000]
                                      [--plot docs/img/gradnorm_toy] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

import gradxform as gx

IN_DIM, OUT_DIM, HIDDEN = 250, 100, 100
SHARED = "trunk.6.weight"  # W: the weight of the last trunk Linear
ALPHA = 0.12
WEIGHT_LR = 0.025
LR, WARMUP, BATCH = 0.003, 500, 100
N_GRAD_EVAL = 1000  # G is measured on the first 1000 test points
METHODS = ("equal weights", "GradNorm")


def task_sigmas(num_tasks: int) -> tuple[float, ...]:
    """sigma = (1, 100) for T = 2; otherwise log-uniform on [1, 100] from ``default_rng(0)``,
    rounded to 2 decimals (T = 10: 18.79, 3.46, 1.21, 1.08, 42.32, 66.91, 16.34, 28.77, 12.23, 74.16)."""
    if num_tasks == 2:
        return (1.0, 100.0)
    rng = np.random.default_rng(0)
    return tuple(float(s) for s in np.round(10.0 ** rng.uniform(0.0, 2.0, num_tasks), 2))


class Problem(NamedTuple):
    sigmas: tuple[float, ...]
    x_train: torch.Tensor  # (N, 250)
    y_train: torch.Tensor  # (N, T, 100)
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_problem(sigmas: Sequence[float], n_train: int = 10000, n_test: int = 2000, seed: int = 0) -> Problem:
    """The toy data: ``y_i = sigma_i * tanh((B + eps_i) x)`` from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    t = len(sigmas)
    b = math.sqrt(10.0) * torch.randn(OUT_DIM, IN_DIM, generator=g)
    eps = math.sqrt(3.5) * torch.randn(t, OUT_DIM, IN_DIM, generator=g)
    maps = b + eps  # (T, 100, 250)
    sig = torch.tensor(sigmas, dtype=torch.float32)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, IN_DIM, generator=g)
        y = sig[None, :, None] * torch.tanh(torch.einsum("toi,ni->nto", maps, x))
        return x, y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return Problem(tuple(float(s) for s in sigmas), x_train, y_train, x_test, y_test)


class TaskHeads(nn.Module):
    """``T`` affine heads 100->100 stored as one (T, 100, 100) weight; each initialised like ``nn.Linear``."""

    def __init__(self, num_tasks: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(num_tasks, d_out, d_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, d_out).uniform_(-bound, bound))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, d_in) -> (N, T, d_out)
        return torch.einsum("ni,toi->nto", h, self.weight) + self.bias


class ToyNet(nn.Module):
    def __init__(self, num_tasks: int):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        )
        self.heads = TaskHeads(num_tasks, HIDDEN, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))


def make_losses_fn(model: nn.Module):
    def losses_fn(params: dict, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        pred = functional_call(model, params, (x,))
        return ((pred - y) ** 2).mean(dim=(0, 2))  # (T,): MSE per task over batch and outputs

    return losses_fn


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties), with numpy only."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def lr_schedule(lr: float = LR, warmup: int = WARMUP):
    """Linear warm-up from lr/warmup to lr over ``warmup`` steps, then constant."""
    if warmup <= 1:
        return lr
    return gx.join_schedules([gx.linear_schedule(lr / warmup, lr, warmup - 1), gx.constant_schedule(lr)], [warmup - 1])


def measure(model: nn.Module, params: dict, problem: Problem, weights: torch.Tensor,
            n_grad: int = N_GRAD_EVAL) -> tuple[torch.Tensor, torch.Tensor]:
    """(test losses (T,) on all test points, G = w * n (T,) at W on the first ``n_grad`` test points)."""
    losses_fn = make_losses_fn(model)
    with torch.no_grad():
        test_losses = losses_fn(params, (problem.x_test, problem.y_test))
    p = {k: v.detach() for k, v in params.items()}
    p[SHARED] = p[SHARED].clone().requires_grad_(True)
    with torch.enable_grad():
        losses = losses_fn(p, (problem.x_test[:n_grad], problem.y_test[:n_grad]))
        n = gx.task_grad_norms(losses, p[SHARED], retain_graph=False)
    return test_losses, weights.detach() * n


def init_params(num_tasks: int, seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = ToyNet(num_tasks)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def batch_order(n_train: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    idx: list[torch.Tensor] = []
    perm = torch.randperm(n_train, generator=g)
    pos = 0
    while len(idx) < steps:
        if pos + batch > n_train:
            perm, pos = torch.randperm(n_train, generator=g), 0
        idx.append(perm[pos:pos + batch])
        pos += batch
    return idx


def train(problem: Problem, method: str, steps: int = 2000, seed: int = 0, *, lr: float = LR, warmup: int = WARMUP,
          batch: int = BATCH, alpha: float = ALPHA, weight_lr: float = WEIGHT_LR, eval_every: int = 50,
          n_grad: int = N_GRAD_EVAL) -> dict[str, Any]:
    """Train one method; return its history (``step``, ``weights`` (K, T), ``G`` (K, T),
    ``test_losses`` (K, T)) and the final values."""
    t = len(problem.sigmas)
    model, params = init_params(t, seed)
    if method == "GradNorm":
        weighting = gx.gradnorm(t, alpha=alpha, weight_tx=gx.adam(weight_lr))
    elif method == "equal weights":
        weighting = gx.fixed_weights([1.0] * t)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    tx = gx.chain(weighting, gx.sgd(lr_schedule(lr, min(warmup, steps))))
    state = tx.init(params)
    f = gx.weighted_grad_and_task_norms(make_losses_fn(model), shared=SHARED)
    order = batch_order(problem.x_train.shape[0], steps, batch, seed)
    hist: dict[str, list] = {"step": [], "weights": [], "G": [], "test_losses": []}

    def record(step: int) -> None:
        w = gx.loss_weights(state).detach().clone()
        test_losses, g = measure(model, params, problem, w, n_grad)
        hist["step"].append(step)
        hist["weights"].append(w)
        hist["G"].append(g)
        hist["test_losses"].append(test_losses)

    start = time.perf_counter()
    for step in range(steps):
        if step % eval_every == 0:
            record(step)
        idx = order[step]
        res = f(params, (problem.x_train[idx], problem.y_train[idx]), gx.loss_weights(state))
        updates, state = tx.update(res.grads, state, params, losses=res.losses, task_grad_norms=res.task_grad_norms)
        params = gx.apply_updates(params, updates)
    seconds = time.perf_counter() - start
    record(steps)
    out = {k: torch.stack(v).numpy() if k != "step" else np.asarray(v) for k, v in hist.items()}
    out["spread"] = out["G"].max(axis=1) / out["G"].min(axis=1)
    out["norm_test_loss"] = (out["test_losses"] / out["test_losses"][0]).sum(axis=1)
    out["final_weights"] = out["weights"][-1]
    out["final_spread"] = float(out["spread"][-1])
    out["final_norm_test_loss"] = float(out["norm_test_loss"][-1])
    out["final_task_ratios"] = out["test_losses"][-1] / out["test_losses"][0]
    out["spearman"] = spearman(out["final_weights"], problem.sigmas)
    out["ms_per_step"] = 1e3 * seconds / max(steps, 1)
    out["finite"] = bool(np.isfinite(out["test_losses"]).all())
    return out


def run_experiment(num_tasks: int, steps: int = 2000, seed: int = 0, n_train: int = 10000, n_test: int = 2000,
                   **kwargs: Any) -> dict[str, Any]:
    """Both methods on the same data and init: ``{"sigmas", "problem", "equal weights", "GradNorm"}``."""
    problem = make_problem(task_sigmas(num_tasks), n_train, n_test, seed)
    kwargs.setdefault("n_grad", min(N_GRAD_EVAL, n_test))
    result: dict[str, Any] = {"sigmas": problem.sigmas, "steps": steps, "n_train": n_train, "n_test": n_test}
    for method in METHODS:
        result[method] = train(problem, method, steps, seed, **kwargs)
    return result


def fmt(values: Sequence[float], spec: str = ".4f") -> str:
    return " ".join(format(float(v), spec) for v in values)


def report(result: dict[str, Any]) -> None:
    sig = result["sigmas"]
    t = len(sig)
    print(f"== T = {t}: sigma = {fmt(sig, 'g')} | {result['steps']} steps, "
          f"{result['n_train']} train / {result['n_test']} test ==")
    eq, gn = result["equal weights"], result["GradNorm"]
    print(f"initial spread max G / min G: {eq['spread'][0]:.2f}")
    print(f"{'method':<15} {'spread G':>10} {'norm test loss':>15} {'ms/step':>8}   L_i^test/L_i^test(0)")
    for name in METHODS:
        r = result[name]
        print(f"{name:<15} {r['final_spread']:>10.2f} {r['final_norm_test_loss']:>15.4f} {r['ms_per_step']:>8.2f}   "
              f"{fmt(r['final_task_ratios'], '.3f')}")
    print(f"GradNorm final weights: {fmt(gn['final_weights'])}")
    print(f"Spearman(w, sigma): {gn['spearman']:.4f}")
    print(f"spread shrink (equal / GradNorm): {eq['final_spread'] / gn['final_spread']:.1f}x")
    better = "GradNorm" if gn["final_norm_test_loss"] < eq["final_norm_test_loss"] else "equal weights"
    print(f"lower task-normalised test loss: {better} "
          f"({gn['final_norm_test_loss']:.4f} vs {eq['final_norm_test_loss']:.4f})")


def plot(result: dict[str, Any], path: str, dpi: int = 90) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written")
        return False
    sig = result["sigmas"]
    t = len(sig)
    eq, gn = result["equal weights"], result["GradNorm"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    cmap = plt.get_cmap("viridis")
    order = np.argsort(sig)
    for rank, i in enumerate(order):
        axes[0].plot(gn["step"], gn["weights"][:, i], color=cmap(rank / max(t - 1, 1)), lw=1.3,
                     label=f"sigma={sig[i]:g}")
    axes[0].set_title(f"GradNorm weights w_i (T = {t})")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=2 if t > 4 else 1)
    for name, r, c in (("equal weights", eq, "tab:gray"), ("GradNorm", gn, "tab:red")):
        axes[1].plot(r["step"], r["spread"], color=c, label=name)
        axes[2].plot(r["step"], r["norm_test_loss"], color=c, label=name)
    axes[1].set_yscale("log")
    axes[1].set_title("spread max G_i / min G_i at W")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    axes[2].set_title("task-normalised test loss sum_i L_i/L_i(0)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"saved {path}")
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10], help="values of T to run (default 2 10)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=10000, help="training samples (default 10000)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between test measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--plot", default="", help="save PREFIX_T{T}.png for each T (needs matplotlib)")
    parser.add_argument("--smoke", action="store_true", help="CI mode: 60 steps, 500 train / 200 test points")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_test = 2000
    warmup = WARMUP
    if args.smoke:
        args.steps, args.train, n_test, args.eval_every, warmup = 60, 500, 200, 20, 20
    for i, t in enumerate(args.tasks):
        if i:
            print()
        result = run_experiment(t, args.steps, args.seed, args.train, n_test, eval_every=args.eval_every, warmup=warmup)
        report(result)
        if args.plot:
            plot(result, f"{args.plot}_T{t}.png")


if __name__ == "__main__":
    main()
