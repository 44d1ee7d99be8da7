"""Heavy-tailed gradient noise: SGD against gradient clippers on scikit-learn's digits.

A 64-32-10 MLP is trained on mini-batches of the digits data set, and every gradient gets extra
Student-t noise (df = 1.5: finite mean, *infinite variance*) added coordinate-wise:

    g_t = grad f(x_t; batch_t) + sigma * T_t,    T_t ~ Student-t(1.5), iid per coordinate

The noise comes from a fixed ``torch.Generator`` per seed (Bailey's polar method, no global RNG),
so every method of a seed sees the same noise stream, and the same init and mini-batches. Methods
(each after a ``monitor_norm`` that records the norm of the noisy gradient; all the SGD ones use
``gx.sgd(LR, momentum=0.9)`` after the clipper):

- ``sgd``                no clipping
- ``sgd lr=0.01``        no clipping, the best learning rate of a small sweep (0.005 .. 0.1) under
                         this noise: the baseline a clipper has to beat
- ``global norm``        ``clip_by_global_norm(LAM)``
- ``layer-wise``         ``clip_by_leaf_norm(LAM_LEAF)``
- ``coordinate-wise``    ``clip(LAM_COORD)``
- ``autoclip q=0.1``     ``autoclip(0.1)``  (10th percentile of all norms so far)
- ``autoclip q=0.5``     ``autoclip(0.5)``
- ``random norm``        ``random_clip_by_global_norm(LAM, beta=0.5)``
- ``clipped SSTM``       ``clipped_sstm(a, L, B)`` (no SGD after it: it is a terminal transform;
                         ``B`` picked from a small grid on seeds 0-2)
- ``R-clipped SSTM``     ``with_restarts(clipped_sstm(a, L, B), first_period=50, coeff=1.5)``

The clipping levels were set once (the global-norm level 1.0 is of the order of the noise-free
mini-batch gradient norms), not tuned per method.

After ``--steps`` steps it reports, over ``--seeds`` seeds, the final clean training loss and the
test accuracy (mean +- std; a run whose loss is not finite counts as diverged), the fraction of
steps that were clipped (from the clipper's ``ClipStats`` where it keeps one), and a text
histogram of the gradient norms seen by plain SGD (read from ``monitor_norm``'s state). With
``--plot PATH`` and matplotlib installed it also saves that histogram as a PNG.

Run:  python examples/heavy_tailed_noise.py [--seeds 5] [--steps 400] [--plot grad_norms.png]
      (needs scikit-learn; matplotlib for --plot)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import gradxform as gx
from digits_data import load_data

BATCH_SIZE = 32
LR = 0.05          # SGD learning rate (momentum 0.9)
LR_SMALL = 0.01    # the best plain-SGD learning rate of a small sweep (0.005 .. 0.1) under this noise
DF = 1.5           # Student-t degrees of freedom of the injected noise
SIGMA = 0.01       # noise scale (per coordinate)
LAM = 1.0          # global-norm level (norm rules)
LAM_LEAF = 0.5     # per-leaf level (layer-wise)
LAM_COORD = 0.02   # per-coordinate level (coordinate-wise)
SSTM = dict(a=20.0, L=1.0, B=1.0)  # clipped SSTM: a (torch-clip's lr = 1/a), L, B (clipping parameter)
SSTM_RESTARTS = dict(first_period=50, coeff=1.5)


def student_t(shape: torch.Size, df: float, gen: torch.Generator) -> torch.Tensor:
    """Student-t samples from uniforms only (Bailey's polar method): ``cos(2 pi U1) sqrt(df (U2^(-2/df) - 1))``."""
    theta = torch.rand(shape, generator=gen) * (2 * math.pi)
    w = 1.0 - torch.rand(shape, generator=gen)  # in (0, 1]
    return torch.cos(theta) * torch.sqrt(df * (w.pow(-2.0 / df) - 1.0))


def methods() -> dict[str, Callable[[int], gx.GradientTransformation]]:
    """name -> (seed -> transform)."""

    def sgd(lr: float = LR) -> gx.GradientTransformation:
        return gx.sgd(lr, momentum=0.9)

    def sstm(restarts: bool) -> gx.GradientTransformation:
        tx = gx.clipped_sstm(SSTM["a"], SSTM["L"], SSTM["B"], clip="norm")
        return gx.with_restarts(tx, **SSTM_RESTARTS) if restarts else tx

    return {
        "sgd": lambda seed: sgd(),
        f"sgd lr={LR_SMALL}": lambda seed: sgd(LR_SMALL),
        "global norm": lambda seed: gx.chain(gx.clip_by_global_norm(LAM), sgd()),
        "layer-wise": lambda seed: gx.chain(gx.clip_by_leaf_norm(LAM_LEAF), sgd()),
        "coordinate-wise": lambda seed: gx.chain(gx.clip(LAM_COORD), sgd()),
        "autoclip q=0.1": lambda seed: gx.chain(gx.autoclip(0.1), sgd()),
        "autoclip q=0.5": lambda seed: gx.chain(gx.autoclip(0.5), sgd()),
        "random norm": lambda seed: gx.chain(gx.random_clip_by_global_norm(LAM, beta=0.5, seed=seed), sgd()),
        "clipped SSTM": lambda seed: sstm(False),
        "R-clipped SSTM": lambda seed: sstm(True),
    }


def find_clip_stats(state: Any) -> gx.ClipStats | None:
    """The first ``ClipStats`` in a state tree (the clipper's counters), or None."""
    found: list[gx.ClipStats] = []
    optree.tree_map(lambda x: None, state, is_leaf=lambda x: isinstance(x, gx.ClipStats) and not found.append(x))
    return found[0] if found else None


def monitor_norms(state: Any) -> torch.Tensor:
    """The norms recorded by the ``monitor_norm`` at the head of the chain, oldest first."""
    return gx.norm_history(state[0]).double()


def train_one(name: str, make_tx: Callable[[int], gx.GradientTransformation], seed: int, steps: int,
              data: tuple) -> dict:
    """Train one method with one seed; the chain is ``monitor_norm -> method``."""
    X_tr, y_tr, X_te, y_te = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    grad_fn = grad_and_value(loss_fn)
    tx = gx.chain(gx.monitor_norm(steps), make_tx(seed))
    state = tx.init(params)
    batch_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(10_000 + seed)
    clean_norms = []
    for _ in range(steps):
        idx = torch.randint(len(X_tr), (BATCH_SIZE,), generator=batch_gen)
        grads, _ = grad_fn(params, X_tr[idx], y_tr[idx])
        clean_norms.append(float(gx.tree_global_norm(grads)))
        grads = {k: g + SIGMA * student_t(g.shape, DF, noise_gen) for k, g in grads.items()}
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)

    with torch.no_grad():
        loss = float(loss_fn(params, X_tr, y_tr))
        acc = float((functional_call(model, params, (X_te,)).argmax(1) == y_te).float().mean())
    stats = find_clip_stats(state)
    norms = monitor_norms(state)
    if stats is not None:
        clip_frac = float(gx.clip_fraction(stats))
    elif name == "global norm":  # stateless: the monitor before it saw the norms it compared with LAM
        clip_frac = float((norms > LAM).double().mean())
    else:
        clip_frac = None
    return dict(loss=loss, acc=acc if math.isfinite(loss) else float("nan"), clip_frac=clip_frac,
                norms=norms, clean_norms=torch.tensor(clean_norms, dtype=torch.float64))


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "diverged"
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} +- {s:.4f}"


def text_histogram(norms: torch.Tensor, bins: int = 12, width: int = 40) -> list[str]:
    logs = norms[norms > 0].log10()
    lo, hi = float(logs.min()), float(logs.max())
    hi = hi if hi > lo else lo + 1
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    peak = float(counts.max())
    lines = []
    for i, c in enumerate(counts.tolist()):
        a, b = lo + (hi - lo) * i / bins, lo + (hi - lo) * (i + 1) / bins
        lines.append(f"  [{10 ** a:9.3g}, {10 ** b:9.3g})  {int(c):5d}  {'#' * int(round(width * c / peak))}")
    return lines


def run(seeds: int = 5, steps: int = 400, verbose: bool = True) -> dict[str, list[dict]]:
    """Train every method for every seed; return ``{method: [result per seed]}``."""
    datas = [load_data(seed) for seed in range(seeds)]
    results: dict[str, list[dict]] = {}
    for name, make_tx in methods().items():
        t0 = time.perf_counter()
        results[name] = [train_one(name, make_tx, seed, steps, datas[seed]) for seed in range(seeds)]
        if verbose:
            print(f"  {name:16s} done in {time.perf_counter() - t0:5.1f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--plot", default="", help="save the gradient-norm histogram to this PNG (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"digits, MLP 64-32-10, batch {BATCH_SIZE}, {args.steps} steps, {args.seeds} seeds; noise: {SIGMA} x "
          f"Student-t(df={DF}) per coordinate; SGD lr {LR}, momentum 0.9")
    print(f"levels: global norm {LAM}, layer-wise {LAM_LEAF}, coordinate-wise {LAM_COORD}, random norm {LAM} "
          f"(beta 0.5); clipped SSTM {SSTM}, restarts {SSTM_RESTARTS}")
    t0 = time.perf_counter()
    results = run(args.seeds, args.steps)
    print(f"  total {time.perf_counter() - t0:.1f} s\n")

    print(f"{'method':16s} {'final train loss':>20s} {'test accuracy':>20s} {'diverged':>8s} {'clipped':>8s}")
    for name, rs in results.items():
        losses = [r["loss"] for r in rs]
        accs = [r["acc"] for r in rs]
        n_div = sum(not math.isfinite(x) for x in losses)
        fracs = [r["clip_frac"] for r in rs if r["clip_frac"] is not None]
        clip = f"{100 * statistics.mean(fracs):.0f}%" if fracs else "-"
        print(f"{name:16s} {mean_std(losses):>20s} {mean_std(accs):>20s} {n_div:>5d}/{len(rs)} {clip:>8s}")
    print("(mean +- std over seeds of the clean full-train-set cross-entropy and the test accuracy after the last "
          "step;\n clipped: fraction of steps the clipper scaled, from its ClipStats where it keeps one; for the stateless"
          "\n global-norm clip, the fraction of monitor_norm's recorded norms above its level)\n")

    if "sgd" in results:
        noisy = torch.cat([r["norms"] for r in results["sgd"]])
        clean = torch.cat([r["clean_norms"] for r in results["sgd"]])
        q = torch.quantile(noisy, torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
        print(f"gradient norms seen by plain SGD (monitor_norm's history, all seeds, {noisy.numel()} steps): "
              f"q10 {q[0]:.3g}, median {q[1]:.3g}, q90 {q[2]:.3g}, q99 {q[3]:.3g}, max {float(noisy.max()):.3g}; "
              f"without the injected noise: median {float(clean.median()):.3g}, max {float(clean.max()):.3g}")
        print("\n".join(text_histogram(noisy)))
        if args.plot:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                print(f"\n--plot {args.plot}: matplotlib is not installed (pip install matplotlib); no plot written")
            else:
                fig, ax = plt.subplots(figsize=(7, 4))
                lo = float(min(noisy.min(), clean.min()))
                bins = torch.logspace(math.log10(lo), math.log10(float(noisy.max())), 60).numpy()
                ax.hist(clean.numpy(), bins=bins, alpha=0.6, label="mini-batch gradient")
                ax.hist(noisy.numpy(), bins=bins, alpha=0.6, label=f"+ {SIGMA} x Student-t({DF}) noise")
                ax.axvline(LAM, color="k", ls="--", lw=1, label=f"global-norm level {LAM}")
                ax.set_xscale("log")
                ax.set_xlabel("gradient global L2 norm")
                ax.set_ylabel("steps")
                ax.set_title(f"Gradient norms under plain SGD ({args.seeds} seeds x {args.steps} steps)")
                ax.legend()
                fig.tight_layout()
                fig.savefig(args.plot, dpi=120)
                print(f"\nhistogram written to {args.plot}")


if __name__ == "__main__":
    main()
