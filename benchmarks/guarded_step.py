"""Per-step time of a NaN/Inf-guarded AdamW step: ``gx.apply_if_finite(gx.adamw)`` against the
unguarded step and against torch's guarded idiom, measured in the same run.

What it measures
----------------
One AdamW step (lr 1e-3, weight decay 1e-2) over the parameter set of ``optimizer_step.py``
(about 50 float32 tensors shaped like a small transformer; 5M parameters by default). Params and
gradients are generated once and the same finite gradients are fed to every step, so every
guarded step is a *good* step (the common case; a bad step skips the inner update and is cheaper).
No forward or backward pass is timed. Rows:

- ``torch_fused``           ``torch.optim.AdamW(fused=True).step()``, unguarded
- ``torch_fused_guarded``   the idiom without a scaler: ``if all(isfinite(g).all()): opt.step()``
                            (one ``isfinite`` pass per gradient and a host read)
- ``torch_foreach_guarded`` the same with ``torch.optim.AdamW(foreach=True)``
- ``gx_donating``           ``gx.adamw`` through ``gx.update_in_place`` (donates its state)
                            with ``apply_updates(inplace=True)``, unguarded
- ``gx_pure``               the same, pure (new params and state each step), unguarded
- ``gx_guarded``            ``gx.apply_if_finite(gx.adamw)`` through ``gx.update_in_place``
                            (the inner step runs out of place: its old state must survive a bad output)
- ``gx_adapter_guarded``    ``gx.Optimizer(params, gx.apply_if_finite(gx.adamw(...)))``

Ratios are against ``torch_fused_guarded``. Medians of ``--steps`` timed steps after
``--warmup`` untimed ones, rows interleaved over ``--repeats`` rounds; informational only.

    python benchmarks/guarded_step.py                  # 5M params, 1 thread
    python benchmarks/guarded_step.py --params-millions 25 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_step import make_shapes  # noqa: E402  (same directory; the same parameter set)

import gradxform as gx  # noqa: E402

LR, WD = 1e-3, 1e-2


def build(params_millions: float) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    names, p0, grads = [], [], []
    for name, shape in make_shapes(params_millions):
        names.append(name)
        p0.append(torch.randn(shape, generator=gen) * 0.02)
        grads.append(torch.randn(shape, generator=gen) * 1e-3)
    return names, p0, grads


def rows(names: list[str], p0: list[torch.Tensor], grads: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """name -> a zero-argument step function with its own params and state."""
    out: dict[str, Callable[[], None]] = {}

    def torch_row(kind: str, guarded: bool) -> Callable[[], None]:
        ps = [p.clone().requires_grad_(True) for p in p0]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **{kind: True})

        def step() -> None:
            if not guarded or all(bool(torch.isfinite(p.grad).all()) for p in ps):
                opt.step()
        return step

    out["torch_fused"] = torch_row("fused", False)
    out["torch_fused_guarded"] = torch_row("fused", True)
    out["torch_foreach_guarded"] = torch_row("foreach", True)

    def gx_row(tx: gx.GradientTransformation, donate: bool) -> Callable[[], None]:
        box = {"p": {n: p.clone() for n, p in zip(names, p0)}}
        box["s"] = tx.init(box["p"])
        g = dict(zip(names, grads))

        def step() -> None:
            if donate:
                u, box["s"] = gx.update_in_place(tx, g, box["s"], box["p"])
                box["p"] = gx.apply_updates(box["p"], u, inplace=True)
            else:
                u, box["s"] = tx.update(g, box["s"], box["p"])
                box["p"] = gx.apply_updates(box["p"], u)
        return step

    out["gx_donating"] = gx_row(gx.adamw(LR, weight_decay=WD), True)
    out["gx_pure"] = gx_row(gx.adamw(LR, weight_decay=WD), False)
    out["gx_guarded"] = gx_row(gx.apply_if_finite(gx.adamw(LR, weight_decay=WD)), True)

    ps = [p.clone().requires_grad_(True) for p in p0]
    for p, g in zip(ps, grads):
        p.grad = g
    opt = gx.Optimizer(ps, gx.apply_if_finite(gx.adamw(LR, weight_decay=WD)))
    out["gx_adapter_guarded"] = opt.step
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-millions", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names, p0, grads = build(args.params_millions)
    total = sum(p.numel() for p in p0)
    print(f"guarded AdamW step: {total / 1e6:.2f}M params in {len(p0)} float32 tensors, {args.threads} thread(s), "
          f"torch {torch.__version__}, gradxform {gx.__version__}, python {platform.python_version()}")
    steps = rows(names, p0, grads)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch_fused_guarded"])
    print(f"{'row':24s} {'median ms':>10s} {'min ms':>8s} {'/torch_fused_guarded':>21s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} {med * 1e3:10.2f} {min(ts) * 1e3:8.2f} {med / ref:21.2f}")
    guard = statistics.median(times["gx_guarded"]) / statistics.median(times["gx_donating"])
    print(f"cost of the guard: gx_guarded / gx_donating = {guard:.2f}x "
          "(informational; timings on a shared machine are noisy)")


if __name__ == "__main__":
    main()
