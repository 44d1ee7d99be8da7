"""TrueGrad-AdamW against AdamW: a small CNN on scikit-learn's digits, pure functional loop.

TrueGrad (truegrad 5.0.0, L. Nestler) replaces Adam's second moment ``EMA(g^2)`` by an EMA of
``S = sum_n (grad l_n / N)^2``, the sum of the squared per-example contributions to the
mini-batch gradient. ``gx.grad_and_sum_grad_squared`` gets the loss, the gradient and ``S`` in one
backward pass (fast per-layer rules for conv2d / linear; an exact ``vmap(grad)`` fallback for
anything else), and ``gx.tg_adamw`` takes ``S`` as an extra argument::

    eng = gx.grad_and_sum_grad_squared(loss_fn)        # loss_fn(params, (x, y)) -> mean loss
    tx = gx.tg_adamw(lr, weight_decay=1e-2, graft=True)
    state = tx.init(params)
    for each mini-batch:
        res = eng(params, (x, y))                      # .loss, .grads, .sum_grad_squared, .methods
        updates, state = tx.update(res.grads, state, params, sum_grad_squared=res.sum_grad_squared)
        params = gx.apply_updates(params, updates)

Three optimisers, each with its default betas and eps and ``weight_decay=1e-2``:

- ``AdamW``              ``gx.adamw(lr, weight_decay=1e-2)``, gradients from ``torch.func.grad_and_value``
- ``TG-AdamW``           ``gx.tg_adamw(lr, weight_decay=1e-2, graft=True)`` (per leaf: Adam's step
                         norm, TrueGrad's direction; the default)
- ``TG-AdamW no-graft``  ``gx.tg_adamw(lr, weight_decay=1e-2, graft=False)`` (the raw TrueGrad step)

Model: Conv2d(1->16, k3, p1), ReLU, Conv2d(16->32, k3, p1), ReLU, MaxPool2d(2), Flatten,
Linear(512->10) on the 8x8 images (standardised pixels). For every seed, all optimisers and
learning rates start from the same initial weights and see the same mini-batches (batch 64) in
the same order. Every optimiser gets the same learning-rate grid (``--lrs``); the summary reports,
per optimiser, the learning rate with the lowest mean final training loss (the grid table shows
them all). Reported: the full-train-set cross-entropy and the test accuracy after the last step
(mean +- std over seeds), and the wall time per step, split into the gradient computation
(engine vs plain ``grad``) and the whole step (gradient + update + apply). Times are measured on
whatever else the machine is doing; treat them as rough.

With ``--plot PATH`` (needs matplotlib) it saves the training loss and the test accuracy against the
step (mean over seeds, each optimiser at its best learning rate). ``--smoke``: a few steps, one
seed, one learning rate (for CI).

Run:  python examples/truegrad_digits.py [--seeds 3] [--steps 300] [--lrs 1e-3,3e-3,1e-2,3e-2]
                                         [--plot truegrad_digits.png] [--smoke]
      (needs scikit-learn; matplotlib for --plot)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import gradxform as gx
from digits_data import load_data

BATCH_SIZE = 64
WEIGHT_DECAY = 1e-2
LRS = (1e-3, 3e-3, 1e-2, 3e-2)  # 1e-2 was the best of every optimiser on (1e-3, 3e-3, 1e-2): widened
EVAL_EVERY = 20  # steps between full-train-set / test evaluations (for the curves)

Batch = tuple[torch.Tensor, torch.Tensor]

# name -> (uses the sum_grad_squared engine?, lr -> transform)
OPTIMIZERS: dict[str, tuple[bool, Callable[[float], gx.GradientTransformation]]] = {
    "AdamW": (False, lambda lr: gx.adamw(lr, weight_decay=WEIGHT_DECAY)),
    "TG-AdamW": (True, lambda lr: gx.tg_adamw(lr, weight_decay=WEIGHT_DECAY, graft=True)),
    "TG-AdamW no-graft": (True, lambda lr: gx.tg_adamw(lr, weight_decay=WEIGHT_DECAY, graft=False)),
}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def load_images(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    X_tr, y_tr, X_te, y_te = load_data(seed)
    return X_tr.view(-1, 1, 8, 8), y_tr, X_te.view(-1, 1, 8, 8), y_te


def batches(n: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` full mini-batches of indices: shuffled epochs, the last partial batch of each dropped."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    usable = n - n % BATCH_SIZE
    while len(out) < steps:
        out.extend(torch.randperm(n, generator=gen)[:usable].split(BATCH_SIZE))
    return out[:steps]


def train_one(name: str, lr: float, seed: int, steps: int, data: tuple, idx: list[torch.Tensor],
              init: dict[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """Train one optimiser at one learning rate from ``init`` on the mini-batches ``idx``."""
    X_tr, y_tr, X_te, y_te = data
    use_engine, make_tx = OPTIMIZERS[name]

    def loss_fn(p: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def evaluate(p: dict[str, torch.Tensor]) -> tuple[float, float]:
        with torch.no_grad():
            loss = float(F.cross_entropy(functional_call(model, p, (X_tr,)), y_tr))
            acc = float((functional_call(model, p, (X_te,)).argmax(1) == y_te).float().mean())
        return loss, acc

    if use_engine:
        engine = gx.grad_and_sum_grad_squared(loss_fn)
    else:
        plain = grad_and_value(loss_fn)
    tx = make_tx(lr)
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)

    loss0, acc0 = evaluate(params)
    curve_steps, curve_loss, curve_acc = [0], [loss0], [acc0]
    methods: dict[str, str] = {}
    t_grad = t_total = 0.0
    for step, ix in enumerate(idx, start=1):
        batch = (X_tr[ix], y_tr[ix])
        t0 = time.perf_counter()
        if use_engine:
            res = engine(params, batch)
            grads, extra = res.grads, {"sum_grad_squared": res.sum_grad_squared}
            methods = res.methods
        else:
            grads, _ = plain(params, batch)
            extra = {}
        t1 = time.perf_counter()
        updates, state = tx.update(grads, state, params, **extra)
        params = gx.apply_updates(params, updates)
        t2 = time.perf_counter()
        if step > 1:  # the first step of a run pays one-off warm-up costs (torch.func, allocations)
            t_grad += t1 - t0
            t_total += t2 - t0
        if step % EVAL_EVERY == 0 or step == len(idx):
            loss, acc = evaluate(params)
            curve_steps.append(step)
            curve_loss.append(loss)
            curve_acc.append(acc)
            if not math.isfinite(loss):
                break
    loss, acc = curve_loss[-1], curve_acc[-1]
    return dict(loss=loss, acc=acc if math.isfinite(loss) else float("nan"), steps=curve_steps,
                losses=curve_loss, accs=curve_acc, t_grad=t_grad, t_total=t_total, n_timed=curve_steps[-1] - 1,
                methods=methods)


def run(seeds: int = 3, steps: int = 400, lrs: tuple[float, ...] = LRS,
        verbose: bool = True) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Every optimiser at every learning rate for every seed: ``{(name, lr): [result per seed]}``."""
    model = make_model()  # only its structure is used: the params are passed in explicitly
    per_seed = []
    for seed in range(seeds):
        data = load_images(seed)
        torch.manual_seed(seed)
        init = {k: v.detach().clone() for k, v in make_model().named_parameters()}
        per_seed.append((data, batches(len(data[0]), steps, seed), init))
    results: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for name in OPTIMIZERS:
        for lr in lrs:
            t0 = time.perf_counter()
            results[name, lr] = [train_one(name, lr, seed, steps, data, idx, init, model)
                                 for seed, (data, idx, init) in enumerate(per_seed)]
            if verbose:
                print(f"  {name:18s} lr {lr:<7g} done in {time.perf_counter() - t0:5.1f} s", flush=True)
    return results


def mean_std(xs: list[float], fmt: str = ".4f") -> str:
    """``mean +- std`` of the finite values (``diverged`` if none)."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "diverged"
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} +- {s:{fmt}}"


def score(rs: list[dict[str, Any]]) -> float:
    """Mean final training loss; a diverged seed makes the learning rate ineligible."""
    losses = [r["loss"] for r in rs]
    return statistics.mean(losses) if all(math.isfinite(x) for x in losses) else math.inf


def best_lrs(results: dict[tuple[str, float], list[dict[str, Any]]]) -> dict[str, float]:
    best: dict[str, float] = {}
    for (name, lr), rs in results.items():
        if name not in best or score(rs) < score(results[name, best[name]]):
            best[name] = lr
    return best


def summarize_methods(methods: dict[str, str]) -> str:
    counts = Counter(m if m.startswith("fast") else "fallback" for m in methods.values())
    detail = ", ".join(f"{k}: {v}" for k, v in methods.items())
    return f"{', '.join(f'{v} x {k}' for k, v in sorted(counts.items()))}  ({detail})"


def plot(results: dict[tuple[str, float], list[dict[str, Any]]], best: dict[str, float], path: str,
         title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for name, lr in best.items():
        rs = results[name, lr]
        n = min(len(r["steps"]) for r in rs)
        xs = rs[0]["steps"][:n]
        loss = [statistics.mean(r["losses"][i] for r in rs) for i in range(n)]
        acc = [statistics.mean(r["accs"][i] for r in rs) for i in range(n)]
        ax_l.plot(xs, loss, label=f"{name} (lr {lr:g})")
        ax_a.plot(xs, acc, label=f"{name} (lr {lr:g})")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("train loss (full train set)")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("test accuracy")
    ax_a.set_ylim(0.8, 1.0)
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS),
                        help="comma-separated learning-rate grid, the same for every optimiser")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--plot", default="", help="save loss / accuracy curves to this PNG (needs matplotlib)")
    parser.add_argument("--smoke", action="store_true", help="CI mode: 30 steps, 1 seed, lr 3e-3")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.lrs = 1, 30, "3e-3"
    lrs = tuple(float(s) for s in args.lrs.split(",") if s.strip())
    if args.seeds < 1 or args.steps < 1 or not lrs:
        parser.error("--seeds and --steps must be >= 1 and --lrs non-empty")
    torch.set_num_threads(args.threads)

    print(f"digits 8x8, CNN conv16-conv32-pool-linear, batch {BATCH_SIZE}, {args.steps} steps, {args.seeds} "
          f"seed(s), weight decay {WEIGHT_DECAY}, lr grid {', '.join(f'{lr:g}' for lr in lrs)}")
    t0 = time.perf_counter()
    results = run(args.seeds, args.steps, lrs)
    print(f"  total {time.perf_counter() - t0:.1f} s\n")

    first = next(iter(results.values()))
    print(f"initial train loss {statistics.mean(r['losses'][0] for r in first):.4f}")
    engine_methods = next(r["methods"] for (name, _), rs in results.items() for r in rs if r["methods"])
    print(f"engine methods: {summarize_methods(engine_methods)}\n")

    header = f"{'optimizer':18s} {'lr':>7s} {'final train loss':>22s} {'test accuracy':>18s}"
    if len(lrs) > 1:
        print("all learning rates:")
        print(header)
        for (name, lr), rs in results.items():
            print(f"{name:18s} {lr:>7g} {mean_std([r['loss'] for r in rs], '.2e'):>22s} "
                  f"{mean_std([r['acc'] for r in rs]):>18s}")
        print()

    best = best_lrs(results)
    print("best learning rate of each optimizer (lowest mean final train loss):" if len(lrs) > 1 else "results:")
    print(f"{header} {'grad ms/step':>13s} {'step ms/step':>13s}")
    for name, lr in best.items():
        rs = results[name, lr]
        every = [r for (n, _), rr in results.items() if n == name for r in rr]  # timing: all its runs
        n_timed = max(1, sum(r["n_timed"] for r in every))
        grad_ms = 1000 * sum(r["t_grad"] for r in every) / n_timed
        step_ms = 1000 * sum(r["t_total"] for r in every) / n_timed
        print(f"{name:18s} {lr:>7g} {mean_std([r['loss'] for r in rs], '.2e'):>22s} "
              f"{mean_std([r['acc'] for r in rs]):>18s} {grad_ms:>13.2f} {step_ms:>13.2f}")
    print("(mean +- std over seeds of the full-train-set cross-entropy and the test accuracy after the last step;\n"
          " grad ms/step: loss + gradient (+ sum_grad_squared for TG), step ms/step: + update + apply_updates,\n"
          " averaged over all of the optimizer's runs, first step of each run excluded)")

    if args.plot:
        plot(results, best, args.plot,
             f"digits CNN, batch {BATCH_SIZE}, mean of {args.seeds} seed(s), best lr of each")


if __name__ == "__main__":
    main()
