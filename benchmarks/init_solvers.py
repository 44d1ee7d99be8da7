"""Init-scale solvers on a 20-hidden-layer MLP: gradxform against the empirical_init and gradinit packages.

What it measures
----------------
Model: 64 -> [64] x 20 (Linear + ReLU) -> 10, 21 Linear layers, float32 CPU, cross-entropy,
random inputs ``randn(B, 64)`` and random labels (no data set needed).

1. Empirical init, one full tuning (5 + 20 iterations, batch 64):

   - ``gx``   ``gx.empirical_init(model, params, batches, F.cross_entropy, act_iters=5, upd_iters=20)``
   - ``seed`` the empirical_init package (0.0.2): every Linear wrapped in its ``Normed``, then
     ``empirical_init(wrappers, model, get_input, get_loss)`` (its 5 runs per layer in stages A and
     B, 20 runs in C, plus its eval-order and report runs; its prints go to a dummy stream).

   Counted the same way for both, from outside the solvers: *forward* = calls of the top-level
   module (a global forward hook), *backward* = calls of ``torch.autograd.backward`` and
   ``torch.autograd.grad`` (patched for the run), *layer evals* = calls of any ``nn.Linear``
   (full forwards plus the solvers' local per-layer re-evaluations: the seed's finite-difference
   re-runs, gradxform's jvps). Wall time: median of ``--repeats`` runs. Target: gradxform's
   forward + backward passes <= 0.2x the seed's.

2. GradInit, per-iteration time (batch 128, 2x He std init ``N(0, 8/fan_in)``, lr 0.01, gamma 1,
   alpha 0.01, tau 0.01, p = 2):

   - ``seed``         gradinit 0.1.1: ``GradInitWrapper(model)``, ``torch.optim.Adam`` on its
                      scales, per iteration ``loss = grad_loss(CE(model(x), y), norm=2, gamma=1)``,
                      ``backward``, ``step``, ``clamp_scales(0.01)``; ``detach()`` at the end
                      (called explicitly: docs/migration/gradinit.md).
   - ``gx_simplified`` ``gx.gradinit(..., simplified=True, p=2, scale_tx=gx.gradinit_scale_tx(tau,
                      alpha, clip=None))``: the same objective and the same Adam on the scales (no
                      clip), so its scales must match the seed's (column ``max|dm|``).
   - ``gx_paper``     ``gx.gradinit(...)`` with the defaults: the paper's look-ahead objective on
                      two halves of 64 and the scale-gradient clip.

   Per-iteration time: for gradxform, the interval between consecutive pulls of the batch
   iterator (the first and last intervals, which hold its one-off report work, are dropped); for
   the seed, each loop iteration timed directly (the first dropped). Median over all iterations
   of ``--repeats`` interleaved runs. Target: gradxform per-iteration
   time <= the seed's.

How to run
----------
::

    python benchmarks/init_solvers.py            # full: 5 repeats, 100 GradInit iterations
    python benchmarks/init_solvers.py --quick    # < 1 minute: 2 repeats, 30 iterations
    python benchmarks/init_solvers.py --threads 2

The empirical_init and gradinit packages are optional peers (never gradxform dependencies);
their rows say "not installed" without them. Nothing asserts: PASS / MISS are informational.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import statistics
import time
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import gradxform as gx

DEPTH, WIDTH = 20, 64
EI_TARGET, GI_TARGET = 0.2, 1.0
GI_CFG = dict(lr=0.01, gamma=1.0, alpha=0.01, tau=0.01)


def make_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers += [nn.Linear(64 if i == 0 else WIDTH, WIDTH), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 10))
    return nn.Sequential(*layers)


# --- counting -----------------------------------------------------------------------------------


class Counter:
    """Counts top-level forwards of ``model``, Linear evaluations and backward calls while active."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forward = self.backward = self.layer_evals = 0

    def __enter__(self) -> "Counter":
        self._orig = (torch.autograd.backward, torch.autograd.grad)
        orig_backward, orig_grad = self._orig

        def backward(*a: Any, **k: Any) -> Any:
            self.backward += 1
            return orig_backward(*a, **k)

        def grad(*a: Any, **k: Any) -> Any:
            self.backward += 1
            return orig_grad(*a, **k)

        torch.autograd.backward, torch.autograd.grad = backward, grad

        def top(mod: nn.Module, args: Any, out: Any) -> None:
            self.forward += 1

        def any_module(mod: nn.Module, args: Any, out: Any) -> None:
            if isinstance(mod, nn.Linear):
                self.layer_evals += 1

        self._handles = [self.model.register_forward_hook(top),
                         nn.modules.module.register_module_forward_hook(any_module)]
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.autograd.backward, torch.autograd.grad = self._orig
        for h in self._handles:
            h.remove()


def random_batches(batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


# --- 1. empirical init --------------------------------------------------------------------------


def ei_gx(seed: int) -> tuple[float, Counter, Any]:
    model = make_mlp(seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with Counter(model) as c:
        t0 = time.perf_counter()
        _, _, report = gx.empirical_init(model, params, random_batches(64, seed), F.cross_entropy, act_iters=5,
                                         upd_iters=20, generator=torch.Generator().manual_seed(seed))
        dt = time.perf_counter() - t0
    return dt, c, report


def ei_seed(seed: int) -> tuple[float, Counter, Any] | None:
    try:
        from empirical_init import Normed, empirical_init, get_wrapped_submodules
    except ImportError:
        return None
    model = make_mlp(seed)
    for i, mod in enumerate(list(model)):
        if isinstance(mod, nn.Linear):
            model[i] = Normed(mod)
    gen = torch.Generator().manual_seed(seed)
    get_input = lambda b: torch.randn(b, 64, generator=gen)
    get_loss = lambda out: F.cross_entropy(out, torch.randint(0, 10, (out.shape[0],), generator=gen))
    with Counter(model) as c, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its full-backward-hook warning (the input needs no grad)
        t0 = time.perf_counter()
        empirical_init(get_wrapped_submodules(model), model, get_input, get_loss)
        dt = time.perf_counter() - t0
    return dt, c, None


# --- 2. GradInit --------------------------------------------------------------------------------


def bad_init(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(8.0 / p.shape[1]))
            else:
                p.zero_()


class Timed:
    """Wraps a batch iterator; records the time of each pull (gaps = per-iteration times)."""

    def __init__(self, it: Iterator[Any], n: int) -> None:
        self.it, self.n, self.stamps = it, n, []

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.n):
            self.stamps.append(time.perf_counter())
            yield next(self.it)

    def gaps(self, end: float) -> list[float]:
        s = self.stamps + [end]
        return [b - a for a, b in zip(s[:-1], s[1:])]


def gi_gx(seed: int, iters: int, simplified: bool) -> tuple[list[float], dict[str, float]]:
    model = make_mlp(seed)
    bad_init(model, seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batches = Timed(random_batches(128, seed), iters)
    kw: dict[str, Any] = dict(simplified=True, p=2, scale_tx=gx.gradinit_scale_tx(GI_CFG["tau"], GI_CFG["alpha"], clip=None)) \
        if simplified else {}
    _, report = gx.gradinit(model, params, batches, F.cross_entropy, target="sgd", lr=GI_CFG["lr"],
                            gamma=GI_CFG["gamma"], alpha=GI_CFG["alpha"], tau=GI_CFG["tau"], iters=iters, **kw)
    # gap 0 also holds the solver's "before" report measurements and the last gap its "after"
    # ones: both are dropped (the seed's first iteration is dropped too)
    return batches.gaps(time.perf_counter())[1:-1], report.scales


def gi_seed(seed: int, iters: int) -> tuple[list[float], dict[str, float]] | None:
    try:
        from gradinit import GradInitWrapper
    except ImportError:
        return None
    model = make_mlp(seed)
    bad_init(model, seed)
    names = [k for k, _ in model.named_parameters()]
    it = random_batches(128, seed)
    gaps: list[float] = []
    ginit = GradInitWrapper(model)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=GI_CFG["tau"], betas=(0.9, 0.999), eps=1e-8)
        for _ in range(iters):
            t0 = time.perf_counter()
            x, y = next(it)
            loss = ginit.grad_loss(F.cross_entropy(model(x), y), norm=2, gamma=GI_CFG["gamma"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ginit.clamp_scales(GI_CFG["alpha"])
            gaps.append(time.perf_counter() - t0)
        gaps = gaps[1:]
        scales = {}
        for name, (mod, pname) in zip(names, ginit.modules_parameter_names):
            scales[name] = float(getattr(mod, pname + GradInitWrapper._postfix_scale).detach())
    finally:
        ginit.detach()  # explicit: relying on __del__ after a create_graph backward can abort
    return gaps, scales


# --- main ---------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{1e3 * x:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 minute)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="GradInit iterations per run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    iters = args.iters or (30 if args.quick else 100)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s); "
          f"MLP 64 -> [{WIDTH}]x{DEPTH} -> 10 ({DEPTH + 1} Linear layers); repeats {repeats}")

    # 1. empirical init
    print("\n== empirical init: one tuning (5 + 20 iterations, batch 64)")
    print(f"{'row':8s} {'forward':>8s} {'backward':>8s} {'layer evals':>11s} {'median s':>9s} {'min s':>7s}")
    rows: dict[str, tuple[Counter, list[float]]] = {}
    for name, fn in (("gx", ei_gx), ("seed", ei_seed)):
        times, counter = [], None
        for r in range(repeats):
            res = fn(r)
            if res is None:
                break
            times.append(res[0])
            counter = res[1]
        if counter is None:
            print(f"{name:8s} not installed")
            continue
        rows[name] = (counter, times)
        print(f"{name:8s} {counter.forward:8d} {counter.backward:8d} {counter.layer_evals:11d} "
              f"{statistics.median(times):9.3f} {min(times):7.3f}")
    if {"gx", "seed"} <= set(rows):
        (cg, tg), (cs, ts) = rows["gx"], rows["seed"]
        passes = (cg.forward + cg.backward) / (cs.forward + cs.backward)
        print(f"ratio gx/seed: passes {passes:.3f} ({'PASS' if passes <= EI_TARGET else 'MISS'} <= {EI_TARGET}), "
              f"layer evals {cg.layer_evals / cs.layer_evals:.3f}, time {statistics.median(tg) / statistics.median(ts):.3f}")

    # 2. GradInit
    print(f"\n== GradInit: per-iteration time, batch 128, {iters} iterations x {repeats} runs")
    print(f"{'row':14s} {'median ms':>9s} {'min ms':>8s} {'/seed':>6s}  max|dm| vs seed")
    gi: dict[str, tuple[list[float], dict[str, float]]] = {}
    for r in range(repeats):  # interleaved rounds
        for name, fn in (("seed", lambda s: gi_seed(s, iters)), ("gx_simplified", lambda s: gi_gx(s, iters, True)),
                         ("gx_paper", lambda s: gi_gx(s, iters, False))):
            res = fn(r)
            if res is None:
                continue
            gaps, scales = res
            prev = gi.get(name, ([], {}))[0]
            gi[name] = (prev + gaps, scales if r == 0 else gi.get(name, ([], {}))[1])
    seed_med = statistics.median(gi["seed"][0]) if "seed" in gi else None
    for name in ("seed", "gx_simplified", "gx_paper"):
        if name not in gi:
            print(f"{name:14s} not installed")
            continue
        gaps, scales = gi[name]
        med = statistics.median(gaps)
        ratio = f"{med / seed_med:6.3f}" if seed_med else "     -"
        dm = "-"
        if name != "seed" and "seed" in gi:
            ref = gi["seed"][1]
            dm = f"{max(abs(scales[k] - ref[k]) for k in ref):.2e}"
        print(f"{name:14s} {ms(med):>9s} {ms(min(gaps)):>8s} {ratio}  {dm}")
    if seed_med:
        for name in ("gx_simplified", "gx_paper"):
            if name in gi:
                ratio = statistics.median(gi[name][0]) / seed_med
                print(f"ratio {name}/seed {ratio:.3f}: {'PASS' if ratio <= GI_TARGET else 'MISS'} (<= {GI_TARGET})")
    print("(gx_paper runs the paper's objective: a look-ahead loss on a second half-batch, so it does more work per "
          "iteration than the seed's simplified loss)")


if __name__ == "__main__":
    main()
