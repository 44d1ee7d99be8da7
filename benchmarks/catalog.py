"""Per-step time of every catalog alias through ``gx.Optimizer`` against torch.optim's fastest CPU
implementation of the same optimizer, in one run.

What it measures
----------------
One optimizer step over a fixed set of float32 CPU tensors totalling ``--params-millions``
(default 25M) parameters (a few matrices and their biases). Params and gradients come from
fixed seeds; the same gradients are fed to every step (no forward/backward is timed). For each
row of ``ROWS``:

- ``gx ms``:     ``gx.Optimizer(params, alias)`` (its default path) ``.step()``;
- ``torch ms``:  the torch.optim class with the fastest CPU implementation it offers, chosen in
                 the run: each of ``fused=True`` and ``foreach=True`` that the class accepts is
                 timed briefly and the faster is kept (the ``impl`` column);
- ``ratio``:     gx / torch (below 1.0: gradxform is faster);
- ``buffers``:   params-shaped state buffers per param (gx / torch): the state memory in units
                 of the params.

Time: median of ``--steps`` timed steps after ``--warmup`` untimed ones (``time.perf_counter``;
CPU ops are synchronous). On a shared machine use ``--threads 1`` for steadier ratios.

Adding rows
-----------
Other catalog modules add their optimizers to ``ROWS`` below: ``name -> (gx factory, torch
factory or None)``; each factory takes the list of params and returns an optimizer (for gx, a
`gradxform.Optimizer`). A row without a torch twin (optax's optimizers) prints its gx time only.

Usage::

    python benchmarks/catalog.py                        # 25M params
    python benchmarks/catalog.py --params-millions 5 --threads 1
    python benchmarks/catalog.py --only rmsprop,nadam --steps 20
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradxform as gx  # noqa: E402

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _gx(alias: Callable[..., Any], **kw: Any) -> Factory:
    return lambda ps: gx.Optimizer(ps, alias(**kw))


def _torch(cls: type, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(ps: list[torch.Tensor], impl: dict[str, bool]) -> torch.optim.Optimizer:
        return cls(ps, **kw, **impl)

    make.cls = cls  # type: ignore[attr-defined]
    return make


# name -> (gradxform factory, torch factory (params, impl kwargs) or None). Catalog modules add rows here.
ROWS: dict[str, tuple[Factory, Any]] = {
    "adam": (_gx(gx.adam, lr=1e-3), _torch(torch.optim.Adam, lr=1e-3)),
    "adagrad": (_gx(gx.adagrad, lr=1e-2), _torch(torch.optim.Adagrad, lr=1e-2)),
    "adadelta": (_gx(gx.adadelta), _torch(torch.optim.Adadelta)),
    "adamax": (_gx(gx.adamax), _torch(torch.optim.Adamax)),
    "nadam": (_gx(gx.nadam), _torch(torch.optim.NAdam)),
    "nadam(wd=0.01, decoupled)": (_gx(gx.nadam, weight_decay=0.01, decoupled_weight_decay=True),
                                  _torch(torch.optim.NAdam, weight_decay=0.01, decoupled_weight_decay=True)),
    "radam": (_gx(gx.radam), _torch(torch.optim.RAdam)),
    "rmsprop": (_gx(gx.rmsprop), _torch(torch.optim.RMSprop)),
    "rmsprop(momentum=0.9, centered)": (_gx(gx.rmsprop, momentum=0.9, centered=True),
                                        _torch(torch.optim.RMSprop, momentum=0.9, centered=True)),
    "rprop": (_gx(gx.rprop), _torch(torch.optim.Rprop)),
    "asgd": (_gx(gx.asgd), _torch(torch.optim.ASGD)),
}


def make_params(millions: float) -> list[torch.Tensor]:
    """Four square-ish matrices and their biases, ``millions`` * 1e6 elements in all."""
    n = int(millions * 1e6)
    side = int((n / 4) ** 0.5)
    g = torch.Generator().manual_seed(0)
    shapes = [(side, side)] * 4 + [(side,)] * 4
    ps = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def clone_params(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in ps:
        q = p.detach().clone().requires_grad_(True)
        q.grad = p.grad.clone()
        out.append(q)
    return out


def time_steps(opt: torch.optim.Optimizer, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def buffers(opt: torch.optim.Optimizer, ps: list[torch.Tensor]) -> float:
    """Params-shaped state tensors per param (averaged over params)."""
    counts = []
    for p in ps:
        st = opt.state.get(p, {})
        counts.append(sum(1 for v in st.values() if isinstance(v, torch.Tensor) and v.shape == p.shape and v.numel() > 1))
    return sum(counts) / max(len(counts), 1)


def fastest_torch(make: Any, base: list[torch.Tensor], warmup: int, steps: int) -> tuple[str, float, float]:
    accepted = set(inspect.signature(make.cls).parameters)
    best = None
    for impl in ({"fused": True}, {"foreach": True}):
        if not set(impl) <= accepted:
            continue
        ps = clone_params(base)
        try:
            opt = make(ps, impl)
            t = time_steps(opt, warmup, max(3, steps // 2))
        except (RuntimeError, ValueError) as err:  # e.g. fused not built for this device/dtype
            print(f"  ({make.cls.__name__} {impl}: {err})", file=sys.stderr)
            continue
        if best is None or t < best[1]:
            best = (next(iter(impl)), t, ps, opt)
    assert best is not None
    name, _, ps, opt = best
    t = time_steps(opt, 1, steps)  # the chosen implementation, timed in full
    return name, t, buffers(opt, ps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-millions", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = make_params(args.params_millions)
    total = sum(p.numel() for p in base)
    print(f"# {total / 1e6:.1f}M float32 params in {len(base)} tensors, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, median of {args.steps} steps")
    print(f"{'alias':34s} {'gx ms':>9s} {'torch ms':>9s} {'impl':>8s} {'ratio':>6s} {'buffers gx/torch':>17s}")
    names = args.only.split(",") if args.only else list(ROWS)
    for name in names:
        make_gx, make_t = ROWS[name]
        ps = clone_params(base)
        opt = make_gx(ps)
        t_gx = time_steps(opt, args.warmup, args.steps)
        b_gx = buffers(opt, ps)
        del opt, ps
        if make_t is None:
            print(f"{name:34s} {t_gx:9.1f} {'-':>9s} {'-':>8s} {'-':>6s} {b_gx:8.0f}/-")
            continue
        impl, t_t, b_t = fastest_torch(make_t, base, args.warmup, args.steps)
        print(f"{name:34s} {t_gx:9.1f} {t_t:9.1f} {impl:>8s} {t_gx / t_t:6.2f} {b_gx:8.0f}/{b_t:<8.0f}")


if __name__ == "__main__":
    main()
