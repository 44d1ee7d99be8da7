"""Per-step time of GradNorm multitask training: gradxform against equal weights and gradnorm-pytorch.

What it measures
----------------
One full training step (forward + backward + optimizer step, and for GradNorm the per-task
gradient norms and the loss-weight update) of a shared-trunk multitask MLP on a fixed float32
CPU batch:

- trunk: 4 x (Linear + ReLU) of width ``--width`` (default 256) on ``--d-in`` (128) inputs
- one Linear head ``width -> --d-out`` (64) per task, MSE per task against fixed random targets
- batch ``--batch`` (256); number of tasks ``T`` in ``--tasks`` (default 2,4,8)
- GradNorm's shared tensor ``W`` = the weight of the last trunk Linear (``trunk.6.weight``),
  alpha = 1.5; the network optimizer is Adam(lr=1e-3) in every row

Rows (each has its own copy of the same initial model; all measured in the same run):

- ``equal``         equal weights: ``torch.stack(losses).sum().backward()``, torch.optim.Adam
                    (default foreach), ``zero_grad()``. The 1.0 line.
- ``gx_fixed``      the same through the adapter: ``gx.Optimizer(params, gx.chain(
                    gx.fixed_weights([1.0] * T), gx.adam(1e-3)))`` with ``step(losses=...)``
                    (shows what the adapter itself costs when extras are passed).
- ``gx_adapter``    gradxform GradNorm, torch.optim route: ``opt = gx.Optimizer(params,
                    gx.chain(gx.gradnorm(T, alpha=1.5), gx.adam(1e-3)))``; per step
                    ``w = gx.loss_weights(opt)``, ``norms = gx.task_grad_norms(losses, W)`` (one
                    batched backward above ``W``), ``(w * losses).sum().backward()``,
                    ``opt.step(losses=..., task_grad_norms=norms)``, ``zero_grad()``.
- ``gx_functional`` gradxform GradNorm, functional route: ``f = gx.weighted_grad_and_task_norms(
                    losses_fn, shared="trunk.6.weight")``, ``res = f(params, batch, w)``,
                    ``tx.update(res.grads, state, params, losses=..., task_grad_norms=...)``,
                    ``gx.apply_updates``; ``losses_fn`` uses ``torch.func.functional_call``.
- ``gn_pytorch``    gradnorm-pytorch's ``GradNormLossWeighter(num_losses=T, learning_rate=0.025,
                    restoring_force_alpha=1.5, grad_norm_parameters=W)``: ``weighter.backward(
                    losses)`` (its own weighted backward, then ``T`` ``create_graph`` gradients at
                    ``W`` and a second backward of its GradNorm loss, which also reaches the
                    network: docs/loss-weighting.md), then torch.optim.Adam ``step()`` and
                    ``zero_grad()``. "not installed" when it cannot be imported.

Time: every row gets ``--warmup`` untimed steps, then ``--repeats`` *interleaved* rounds; in
round r every row runs ``--steps`` consecutive steps, the rows in a rotated order (so that a load
spike hits all rows alike). Each step is timed with ``time.perf_counter`` (CPU ops are
synchronous). The table shows the median and min step time and the median ratios to ``equal``
(``/equal``) and to ``gn_pytorch`` (``/gnpt``) from the same rounds. Targets of the issue:
gradxform GradNorm <= 0.7x gradnorm-pytorch and <= 1.3x the equal-weights step (PASS / MISS are
informational; the script exits 0 unless it crashes).

Sanity column ``w``: the loss weights after the run (first and last entry). ``gx_adapter`` and
``gx_functional`` run the same algorithm from the same init on the same batch for the same
number of steps, so their weights agree to rounding (``dw`` = max |w - w_adapter|);
gradnorm-pytorch's differ by design, and here move the other way (its quirks: the target is
``Gbar * r_i^-alpha`` where the paper has ``r_i^+alpha``, the mean instead of the sum in the
GradNorm loss, plain SGD, the GradNorm loss back-propagated into the network).

How to run
----------
::

    python benchmarks/gradnorm_step.py                  # full: T = 2, 4, 8; 5 warmup + 10 rounds x 20 steps
    python benchmarks/gradnorm_step.py --quick          # smoke run (< 1 min): width 64, batch 64, 3 rounds x 5 steps
    python benchmarks/gradnorm_step.py --tasks 2,16 --repeats 20 --threads 2
    python benchmarks/gradnorm_step.py --json out.json  # raw results as well

gradnorm-pytorch (``pip install gradnorm-pytorch``; it needs ``accelerate``, ``beartype``,
``einops``) is an optional peer and never a gradxform dependency.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

from _report import fmt, ok, ratio  # same directory: helpers shared by the benchmarks

ROWS = ("equal", "gx_fixed", "gx_adapter", "gx_functional", "gn_pytorch")
SHARED_PATH = "trunk.6.weight"  # the last trunk Linear (trunk = L, ReLU, L, ReLU, L, ReLU, L, ReLU)
LR, ALPHA, SEED = 1e-3, 1.5, 0

# Targets from the performance issue.
TARGET_VS_GNPT = 0.7
TARGET_VS_EQUAL = 1.3


def sizes(args) -> dict:
    if args.quick:
        return {"d_in": 32, "width": 64, "d_out": 16, "batch": 64}
    return {"d_in": args.d_in, "width": args.width, "d_out": args.d_out, "batch": args.batch}


def peer_status() -> tuple[bool, str]:
    try:
        from importlib.metadata import version

        from gradnorm_pytorch import GradNormLossWeighter  # noqa: F401

        try:
            v = version("gradnorm-pytorch")
        except Exception:  # noqa: BLE001
            v = "?"
        return True, f"gradnorm-pytorch {v}"
    except Exception as e:  # noqa: BLE001
        return False, f"gradnorm-pytorch: not installed ({type(e).__name__}: {e})"


# --- model and data ------------------------------------------------------------------------------


def build(cfg: dict, num_tasks: int):
    import torch
    from torch import nn

    class MultiTask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            d = cfg["d_in"]
            for _ in range(4):
                layers += [nn.Linear(d, cfg["width"]), nn.ReLU()]
                d = cfg["width"]
            self.trunk = nn.Sequential(*layers)
            self.heads = nn.ModuleList(nn.Linear(cfg["width"], cfg["d_out"]) for _ in range(num_tasks))

        def forward(self, x):
            h = self.trunk(x)
            return [head(h) for head in self.heads]

    torch.manual_seed(SEED)
    model = MultiTask()
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(cfg["batch"], cfg["d_in"], generator=g)
    # tasks on different scales, so that GradNorm has something to balance
    scales = torch.logspace(0, 1, num_tasks)
    ys = torch.stack([s * torch.randn(cfg["batch"], cfg["d_out"], generator=g) for s in scales])
    return model, x, ys


def task_losses(outs, ys):
    import torch
    import torch.nn.functional as F

    return torch.stack([F.mse_loss(o, y) for o, y in zip(outs, ys)])


class Unsupported(Exception):
    pass


class Runner:
    """One row: ``step()`` runs one training step; ``weights()`` the current loss weights."""

    def __init__(self, row: str, base_model, x, ys, num_tasks: int, peer_ok: bool) -> None:
        import torch

        import gradxform as gx

        self.row, self.times, self.warm = row, [], []
        model = copy.deepcopy(base_model)
        self.model = model
        t = num_tasks
        shared = model.trunk[6].weight
        assert model.get_parameter(SHARED_PATH) is shared

        if row == "equal":
            opt = torch.optim.Adam(model.parameters(), lr=LR)

            def step():
                losses = task_losses(model(x), ys)
                losses.sum().backward()
                opt.step()
                opt.zero_grad()

            self._w = lambda: torch.ones(t)
        elif row == "gx_fixed":
            opt = gx.Optimizer(model.parameters(), gx.chain(gx.fixed_weights([1.0] * t), gx.adam(LR)))

            def step():
                w = gx.loss_weights(opt)
                losses = task_losses(model(x), ys)
                (w * losses).sum().backward()
                opt.step(losses=losses.detach())
                opt.zero_grad()

            self._w = lambda: gx.loss_weights(opt)
        elif row == "gx_adapter":
            opt = gx.Optimizer(model.parameters(), gx.chain(gx.gradnorm(t, alpha=ALPHA), gx.adam(LR)))

            def step():
                w = gx.loss_weights(opt)
                losses = task_losses(model(x), ys)
                norms = gx.task_grad_norms(losses, shared)
                (w * losses).sum().backward()
                opt.step(losses=losses.detach(), task_grad_norms=norms)
                opt.zero_grad()

            self._w = lambda: gx.loss_weights(opt)
        elif row == "gx_functional":
            from torch.func import functional_call

            def losses_fn(params, batch):
                return task_losses(functional_call(model, params, (batch[0],)), batch[1])

            f = gx.weighted_grad_and_task_norms(losses_fn, shared=SHARED_PATH)
            tx = gx.chain(gx.gradnorm(t, alpha=ALPHA), gx.adam(LR))
            box = {"params": {k: p.detach().clone() for k, p in model.named_parameters()}}
            box["state"] = tx.init(box["params"])

            def step():
                params, state = box["params"], box["state"]
                res = f(params, (x, ys), gx.loss_weights(state))
                updates, state = tx.update(res.grads, state, params, losses=res.losses,
                                           task_grad_norms=res.task_grad_norms)
                box["params"], box["state"] = gx.apply_updates(params, updates), state

            self._w = lambda: gx.loss_weights(box["state"])
        elif row == "gn_pytorch":
            if not peer_ok:
                raise Unsupported("not installed")
            from gradnorm_pytorch import GradNormLossWeighter

            weighter = GradNormLossWeighter(num_losses=t, learning_rate=0.025, restoring_force_alpha=ALPHA,
                                            grad_norm_parameters=shared)
            opt = torch.optim.Adam(model.parameters(), lr=LR)

            def step():
                losses = task_losses(model(x), ys)
                weighter.backward(losses)
                opt.step()
                opt.zero_grad()

            self._w = lambda: weighter.loss_weights
        else:
            raise SystemExit(f"unknown row {row!r}")
        self.step = step

    def weights(self) -> list[float]:
        return [float(v) for v in self._w().detach().reshape(-1)]


# --- one T ---------------------------------------------------------------------------------------


def bench_tasks(num_tasks: int, cfg: dict, rows: list[str], peer: tuple[bool, str], args) -> dict:
    model, x, ys = build(cfg, num_tasks)
    res: dict = {"n_params": sum(p.numel() for p in model.parameters()), "rows": {}}
    runners: list[Runner] = []
    for row in rows:
        try:
            r = Runner(row, model, x, ys, num_tasks, peer[0])
        except Unsupported as e:
            res["rows"][row] = {"error": str(e)}
            continue
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            r.step()
            r.warm.append(time.perf_counter() - t0)
        runners.append(r)
    for rnd in range(args.repeats):
        k = rnd % max(1, len(runners))
        for r in runners[k:] + runners[:k]:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r.step()
                r.times.append(time.perf_counter() - t0)
    for r in runners:
        ts = sorted(r.times)
        res["rows"][r.row] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": ts[0] * 1e3,
                              "first_ms": r.warm[0] * 1e3 if r.warm else None, "weights": r.weights()}
    return res


# --- the driver ----------------------------------------------------------------------------------


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x {'PASS' if value <= limit else 'MISS'}"


def print_tasks(t: int, res: dict) -> None:
    rows = res["rows"]
    eq, gp = rows.get("equal"), rows.get("gn_pytorch")
    ad = ok(rows.get("gx_adapter"))
    print(f"== T = {t} ({res['n_params'] / 1e6:.3f}M params)")
    hdr = f"{'row':13s} {'median ms':>9s} {'min ms':>8s} {'/equal':>7s} {'/gnpt':>6s}   {'w[0] .. w[-1]':17s} {'dw':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"{name:13s} {r['error']}")
            continue
        w = r["weights"]
        dw = None
        if ad and name in ("gx_adapter", "gx_functional"):
            dw = max(abs(a - b) for a, b in zip(w, ad["weights"]))
        print(f"{name:13s} {r['median_ms']:9.2f} {r['min_ms']:8.2f} {fmt(ratio(r, eq)):>7s} {fmt(ratio(r, gp)):>6s}   "
              f"{w[0]:7.4f} .. {w[-1]:7.4f} {fmt(dw, '.1e'):>8s}")
    for name in ("gx_adapter", "gx_functional"):
        if ok(rows.get(name)):
            print(f"  [T={t}] {name:13s} / gradnorm-pytorch: {verdict(ratio(rows[name], gp), TARGET_VS_GNPT):10s} "
                  f"(target <= {TARGET_VS_GNPT}x)   / equal: {verdict(ratio(rows[name], eq), TARGET_VS_EQUAL):10s} "
                  f"(target <= {TARGET_VS_EQUAL}x)")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="2,4,8", help="comma-separated task counts T (default 2,4,8)")
    ap.add_argument("--repeats", type=int, default=10, help="interleaved rounds (default 10)")
    ap.add_argument("--steps", type=int, default=20, help="timed consecutive steps per row per round (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per row first (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--width", type=int, default=256, help="trunk width (default 256)")
    ap.add_argument("--d-in", type=int, default=128, help="input dim (default 128)")
    ap.add_argument("--d-out", type=int, default=64, help="outputs per task head (default 64)")
    ap.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: {','.join(ROWS)})")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 1 min): width 64, batch 64, 2 warmup + 3 rounds x 5 steps")
    ap.add_argument("--json", default="", help="also write the raw results to this file")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 5, 2

    import warnings

    import torch

    import gradxform as gx

    warnings.filterwarnings("ignore", message=".*retain_graph.*")  # gradnorm-pytorch's double backward
    torch.set_num_threads(args.threads)
    tasks = [int(v) for v in args.tasks.split(",") if v.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; expected some of {ROWS}")
    peer = peer_status()
    cfg = sizes(args)
    print(f"gradxform GradNorm step benchmark{' (--quick: small model)' if args.quick else ''}: shared-trunk MLP "
          f"{cfg['d_in']}->4x{cfg['width']} (Linear+ReLU), one Linear({cfg['width']}->{cfg['d_out']}) head per task, "
          f"MSE per task, batch {cfg['batch']}, float32 CPU, Adam(lr={LR}); GradNorm alpha={ALPHA} at {SHARED_PATH}")
    print(f"torch {torch.__version__}, gradxform {gx.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.warmup} warmup steps + "
          f"{args.repeats} interleaved rounds x {args.steps} steps per row")
    print(f"peer: {peer[1]}")
    print(flush=True)

    t_start = time.perf_counter()
    results = {}
    for t in tasks:
        t0 = time.perf_counter()
        print(f"  running T = {t}", end=" ", flush=True)
        results[t] = bench_tasks(t, cfg, rows, peer, args)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"  total {time.perf_counter() - t_start:.0f} s\n")

    print("columns: median / min ms per step (forward + backward + optimizer step); /equal, /gnpt = median ratio to\n"
          "  the equal-weights torch.optim.Adam step / to gradnorm-pytorch's step (< 1: faster); w = loss weights\n"
          "  after the run; dw = max |w - w(gx_adapter)| (the two gradxform routes run the same algorithm).\n")
    for t in tasks:
        print_tasks(t, results[t])

    summary = []
    for t in tasks:
        rr = results[t]["rows"]
        best = min((r for r in (ok(rr.get("gx_adapter")), ok(rr.get("gx_functional"))) if r),
                   key=lambda r: r["median_ms"], default=None)
        parts = [f"T={t}:"]
        for name, short in (("gx_adapter", "adapter"), ("gx_functional", "functional")):
            r = ok(rr.get(name))
            if r:
                parts.append(f"{short} {fmt(ratio(r, rr.get('equal')))}x equal / {fmt(ratio(r, rr.get('gn_pytorch')))}x gnpt")
        passed = (best is not None and (ratio(best, rr.get("gn_pytorch")) or 0) <= TARGET_VS_GNPT
                  and (ratio(best, rr.get("equal")) or 0) <= TARGET_VS_EQUAL)
        parts.append("PASS" if passed else "MISS")
        summary.append(" ".join(parts[:1]) + " " + ", ".join(parts[1:-1]) + f" [{parts[-1]}]")
    print("summary (targets: <= 0.7x gradnorm-pytorch and <= 1.3x equal; PASS if the faster gradxform route meets both):")
    for line in summary:
        print("  " + line)
    print("(Informational: nothing is asserted. Timings on a shared machine are noisy; re-run on a quiet machine "
          "before drawing conclusions.)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cfg": cfg, "results": {str(k): v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
