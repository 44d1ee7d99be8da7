"""Per-step time of every optax alias and contrib method through ``gx.Optimizer`` against a
budget made from torch's foreach AdamW step measured in the same run.

What it measures
----------------
The setup of ``benchmarks/catalog.py`` (its helpers are imported): one optimizer step over
float32 CPU tensors totalling ``--params-millions`` (default 25M) parameters, the same
gradients every step, no forward/backward timed. For each row of ``ROWS``:

- ``gx ms``:    ``gx.Optimizer(params, alias)`` (default path) ``.step()``;
- ``adamw ms``: ``torch.optim.AdamW(params, foreach=True)`` ``.step()``, timed right before
                the row (so drift of a shared machine hits both alike);
- ``buffers``:  params-shaped state tensors per param that the alias keeps (``opt.state``);
- ``budget``:   ``adamw ms * max(buffers, 1) / 2``: AdamW keeps 2 buffers and a memory-bound
                step costs about one pass per buffer;
- ``ratio``:    gx / budget (at most 1.0 meets the bar);
- ``traffic``:  a second, stricter-at-the-low-end yardstick: gx / (adamw ms * (3 + 2 b) / 7),
                counting the bytes a step must move (read the gradient, read and write the
                params and each buffer; AdamW: 7 passes).

``--allocs`` prints instead, per row, the bytes one step allocates (``torch.profiler`` with
``profile_memory=True``, after two untimed steps) in units of the params: the number of
params-sized temporaries a step makes, a figure that does not drift with the machine's load.

Time: median of ``--steps`` timed steps after ``--warmup`` untimed ones; ``--repeat`` runs of
the whole table keep, per row, the median of the runs' figures. Use ``--threads 1`` on a shared
machine; there ``--clock thread`` (the CPU time of the one thread that runs the kernels) leaves
out the time the process waits for a core, though not the memory bandwidth other jobs take.

Usage::

    python benchmarks/catalog_optax.py --threads 1
    python benchmarks/catalog_optax.py --only lars,sm3 --steps 10 --repeat 3
    python benchmarks/catalog_optax.py --allocs --params-millions 2
    python benchmarks/catalog_optax.py --threads 1 --clock thread --only yogi,adabelief
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradxform as gx  # noqa: E402
from catalog import buffers, clone_params, make_params, time_calls  # noqa: E402


CLOCK = {"wall": time.perf_counter, "thread": time.thread_time}


def time_steps(opt: torch.optim.Optimizer, warmup: int, steps: int, clock: str = "wall") -> float:
    """Median ms of ``steps`` calls of ``opt.step()`` after ``warmup`` untimed ones, on the
    clock named ``clock`` (``--clock``)."""
    for _ in range(warmup):
        opt.step()
    if clock == "wall":
        return time_calls(opt.step, steps)
    now = CLOCK[clock]
    times = []
    for _ in range(steps):
        t = now()
        opt.step()
        times.append(now() - t)
    return statistics.median(times) * 1e3


Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class _Stepper:
    """An optimizer whose ``step()`` passes fixed extra arguments (polyak_sgd's ``value``)."""

    def __init__(self, opt: torch.optim.Optimizer, **extra: Any) -> None:
        self.opt, self.extra = opt, extra
        self.state = opt.state

    def step(self) -> None:
        self.opt.step(**self.extra)


def _gx(alias: Callable[..., Any], *args: Any, **kw: Any) -> Factory:
    return lambda ps: gx.Optimizer(ps, alias(*args, **kw))


def _polyak(ps: list[torch.Tensor]) -> Any:
    return _Stepper(gx.Optimizer(ps, gx.polyak_sgd(scaling=0.5)), value=torch.tensor(1.0))


# optax's aliases (gradxform/optax_optimizers.py) and optax.contrib's methods (gradxform/contrib.py).
ROWS: dict[str, Factory] = {
    "lion": _gx(gx.lion, 1e-4),
    "lamb": _gx(gx.lamb, 1e-3, weight_decay=0.01),
    "lars": _gx(gx.lars, 0.1, weight_decay=1e-4),
    "adabelief": _gx(gx.adabelief, 1e-3),
    "yogi": _gx(gx.yogi, 1e-2),
    "novograd": _gx(gx.novograd, 1e-2),
    "adan": _gx(gx.adan, 1e-3, weight_decay=0.01),
    "sm3": _gx(gx.sm3, 0.1),
    "fromage": _gx(gx.fromage, 1e-2),
    "sign_sgd": _gx(gx.sign_sgd, 1e-2),
    "signum": _gx(gx.signum, 1e-2),
    "noisy_sgd": _gx(gx.noisy_sgd, 1e-2),
    "polyak_sgd": _polyak,
    "optimistic_gradient_descent": _gx(gx.optimistic_gradient_descent, 1e-2),
    "optimistic_adam": _gx(gx.optimistic_adam, 1e-2),
    "amsgrad": _gx(gx.amsgrad, 1e-3),
    "adamaxw": _gx(gx.adamaxw, 1e-3),
    "nadamw": _gx(gx.nadamw, 1e-3),
    "optax_rprop": _gx(gx.optax_rprop, 1e-2),
    "schedule_free_sgd": _gx(gx.schedule_free_sgd, 0.1),
    "schedule_free_adamw": _gx(gx.schedule_free_adamw, 1e-3),
    "schedule_free_adamw_wd": _gx(gx.schedule_free_adamw, 1e-3, weight_decay=1e-2),
    "prodigy": _gx(gx.prodigy, 1.0, weight_decay=0.01),
    "dadapt_adamw": _gx(gx.dadapt_adamw, 1.0, weight_decay=0.01),
    "ademamix": _gx(gx.ademamix, 1e-3),
    "adopt": _gx(gx.adopt, 1e-3),
    "sam": _gx(gx.sam, gx.sgd(0.1, momentum=0.9), gx.chain(gx.normalize(), gx.scale_by_learning_rate(0.05))),
    "madgrad": _gx(gx.madgrad, 1e-2, weight_decay=0.01),
    "cocob": _gx(gx.cocob),
    "dog": _gx(gx.dog, 1.0),
}


def adamw_ms(base: list[torch.Tensor], warmup: int, steps: int, clock: str = "wall") -> float:
    ps = clone_params(base)
    return time_steps(torch.optim.AdamW(ps, lr=1e-3, foreach=True), warmup, steps, clock)


def one_pass(base: list[torch.Tensor], names: list[str], warmup: int, steps: int,
             clock: str = "wall") -> dict[str, tuple[float, float, float]]:
    out = {}
    for name in names:
        t_ref = adamw_ms(base, warmup, steps, clock)
        ps = clone_params(base)
        opt = ROWS[name](ps)
        t_gx = time_steps(opt, warmup, steps, clock)
        out[name] = (t_gx, t_ref, buffers(opt, ps))
        del opt, ps
    return out


def allocations(base: list[torch.Tensor], names: list[str]) -> None:
    """Params-sized temporaries per step (bytes allocated by one step / bytes of the params)."""
    import torch.profiler as tp

    pbytes = sum(p.numel() * p.element_size() for p in base)
    print(f"{'alias':30s} {'temporaries per step (params-sized)':>36s}")
    for name in names:
        ps = clone_params(base)
        opt = ROWS[name](ps)
        opt.step()
        opt.step()
        with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
        print(f"{name:30s} {allocated / pbytes:36.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-millions", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the table; per row the median is kept")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--allocs", action="store_true", help="print temporaries per step instead of times")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                    help="wall: elapsed time; thread: CPU time of this thread (with --threads 1 the "
                         "step's kernels run on it): time spent descheduled on a shared machine is left out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = make_params(args.params_millions)
    total = sum(p.numel() for p in base)
    names = args.only.split(",") if args.only else list(ROWS)
    if args.allocs:
        allocations(base, names)
        return
    runs = [one_pass(base, names, args.warmup, args.steps, args.clock) for _ in range(args.repeat)]
    print(f"# {total / 1e6:.1f}M float32 params in {len(base)} tensors, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, median of {args.steps} steps, median of {args.repeat} run(s), "
          f"{args.clock} clock")
    print(f"{'alias':30s} {'gx ms':>8s} {'adamw ms':>9s} {'buffers':>8s} {'budget':>8s} {'ratio':>6s} {'traffic':>8s}")
    for name in names:
        t_gx = statistics.median(r[name][0] for r in runs)
        t_ref = statistics.median(r[name][1] for r in runs)
        b = runs[0][name][2]
        budget = t_ref * max(b, 1) / 2
        traffic = t_gx / (t_ref * (3 + 2 * b) / 7)
        flag = "" if t_gx <= budget else "  <- miss"
        print(f"{name:30s} {t_gx:8.1f} {t_ref:9.1f} {b:8.0f} {budget:8.1f} {t_gx / budget:6.2f} {traffic:8.2f}{flag}")


if __name__ == "__main__":
    main()
