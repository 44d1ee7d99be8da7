"""Per-step time of every catalog alias through ``gx.Optimizer`` against torch.optim's CPU
implementations of the same optimizer (foreach, and fused where torch has one), in one run.

What it measures
----------------
One optimizer step over a fixed set of float32 CPU tensors totalling ``--params-millions``
(default 25M) parameters (four square matrices and their biases). Params and gradients come
from fixed seeds; the same gradients are fed to every step (no forward/backward is timed). For
each row of ``ROWS``:

- ``gx ms``:      ``gx.Optimizer(params, alias)`` (its default path) ``.step()``;
- ``foreach ms``: the torch.optim class with ``foreach=True``;
- ``fused ms``:   the torch.optim class with ``fused=True`` where the class accepts it (on CPU in
                  torch 2.13: Adam, AdamW, SGD, Adagrad), else ``-``;
- ``/foreach``, ``/fused``: gx / torch (below 1.0: gradxform is faster), the median over rounds
                  of each round's ratio of median step times;
- ``min/fe``, ``min/fu``: the same from the fastest step of each (all rounds): on a loaded
                  machine, the ratio of the undisturbed costs;
- ``buffers``:    params-shaped state buffers per param (gx / torch): the state memory in units
                  of the params.

Time: each optimizer takes ``--warmup`` untimed steps, then ``--rounds`` rounds in which every
implementation of the row takes ``--steps`` timed steps in turn (``time.perf_counter``; CPU ops
are synchronous); a round's time is the median of its steps and the ratio is the median over
rounds of the per-round ratios, so the implementations of a row see the same machine load. On a
shared machine use ``--threads 1`` for steadier ratios.

``--compiled`` times compiled steps instead (see ``compiled_rows``): the alias's functional
step ``torch.compile(step, fullgraph=True)`` that donates its buffers
(``gx.update_in_place(tx, grads, state, params)`` then
``gx.apply_updates(params, updates, inplace=True)``: params and state updated in place), against torch.optim's step compiled as torch documents
(``torch.compile(opt.step)``, foreach implementation; ``fused=True`` is not traceable), both
warmed up (compiled) before timing. The compile times of the first calls are printed. With
``--twins`` each side has a second instance on its own buffers, timed in the same rounds: the
columns ``gx2/gx`` and ``t2/t`` show how far two identical steps differ on this machine, and
``gx2/t2`` repeats the ratio on the second pair.

Adding rows
-----------
Other catalog modules add their optimizers to ``ROWS`` below: ``name -> (gx alias factory,
torch factory or None)``; the gx factory takes no argument and returns the transform (it is
wrapped in a `gradxform.Optimizer`, or compiled functionally with ``--compiled``); the torch
factory takes the list of params and the implementation keywords. A row without a torch twin
(optax's optimizers) prints its gx time only.

Usage::

    python benchmarks/catalog.py                        # 25M params
    python benchmarks/catalog.py --threads 1 --rounds 5
    python benchmarks/catalog.py --only rmsprop,nadam --steps 20
    python benchmarks/catalog.py --compiled --params-millions 5 --threads 1
    python benchmarks/catalog.py --compiled --threads 1 --twins --rounds 5 --only adagrad,rprop
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

Alias = Callable[[], gx.GradientTransformation]


def _gx(alias: Callable[..., Any], **kw: Any) -> Alias:
    return lambda: alias(**kw)


def _torch(cls: type, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(ps: list[torch.Tensor], impl: dict[str, bool]) -> torch.optim.Optimizer:
        return cls(ps, **kw, **impl)

    make.cls = cls  # type: ignore[attr-defined]
    return make


# name -> (gradxform alias factory, torch factory (params, impl kwargs) or None). Catalog modules add rows here.
ROWS: dict[str, tuple[Alias, Any]] = {
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
    """Four square matrices and their biases, ``millions`` * 1e6 elements in all."""
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


def time_calls(fn: Callable[[], Any], steps: int, mins: list[float] | None = None) -> float:
    """Median ms of ``steps`` calls (their minimum appended to ``mins``)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    if mins is not None:
        mins.append(min(times) * 1e3)
    return statistics.median(times) * 1e3


def buffers(opt: torch.optim.Optimizer, ps: list[torch.Tensor]) -> float:
    """Params-shaped state tensors per param (averaged over params)."""
    counts = []
    for p in ps:
        st = opt.state.get(p, {})
        counts.append(sum(1 for v in st.values() if isinstance(v, torch.Tensor) and v.shape == p.shape and v.numel() > 1))
    return sum(counts) / max(len(counts), 1)


def torch_impls(make: Any) -> list[dict[str, bool]]:
    accepted = set(inspect.signature(make.cls).parameters)
    return [impl for impl in ({"foreach": True}, {"fused": True}) if set(impl) <= accepted]


def eager_rows(names: list[str], base: list[torch.Tensor], args: argparse.Namespace) -> None:
    print(f"{'alias':34s} {'gx ms':>7s} {'foreach':>8s} {'fused':>7s} {'/foreach':>8s} {'/fused':>7s} "
          f"{'min/fe':>8s} {'min/fu':>7s} {'buffers gx/torch':>17s}")
    for name in names:
        eager_row(name, base, args)


def eager_row(name: str, base: list[torch.Tensor], args: argparse.Namespace) -> None:
    make_gx, make_t = ROWS[name]
    ps = clone_params(base)
    opt = gx.Optimizer(ps, make_gx())
    runners: dict[str, Callable[[], Any]] = {"gx": opt.step}
    bufs = {}
    keep = [ps]
    if make_t is not None:
        for impl in torch_impls(make_t):
            tps = clone_params(base)
            try:
                topt = make_t(tps, impl)
                topt.step()
            except (RuntimeError, ValueError) as err:  # e.g. fused not built for this device/dtype
                print(f"  ({make_t.cls.__name__} {impl}: {err})", file=sys.stderr)
                continue
            runners[next(iter(impl))] = topt.step
            keep.append(tps)
            bufs[next(iter(impl))] = (topt, tps)
    for fn in runners.values():
        for _ in range(args.warmup):
            fn()
    rounds: dict[str, list[float]] = {k: [] for k in runners}
    mins: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, fn in runners.items():
            rounds[k].append(time_calls(fn, args.steps, mins[k]))
    b_gx = buffers(opt, ps)

    def ratio(k: str) -> str:
        if k not in rounds:
            return "-"
        return f"{statistics.median(g / t for g, t in zip(rounds['gx'], rounds[k])):.2f}"

    def min_ratio(k: str) -> str:
        return f"{min(mins['gx']) / min(mins[k]):.2f}" if k in mins else "-"

    def ms(k: str) -> str:
        return f"{statistics.median(rounds[k]):.1f}" if k in rounds else "-"

    b_t = f"{buffers(*bufs['foreach']):.0f}" if "foreach" in bufs else "-"
    print(f"{name:34s} {ms('gx'):>7s} {ms('foreach'):>8s} {ms('fused'):>7s} {ratio('foreach'):>8s} "
          f"{ratio('fused'):>7s} {min_ratio('foreach'):>8s} {min_ratio('fused'):>7s} {b_gx:8.0f}/{b_t:<8s}", flush=True)
    del runners, keep, bufs, opt


def compiled_rows(names: list[str], base: list[torch.Tensor], args: argparse.Namespace) -> None:
    head = f"{'alias':34s} {'gx ms':>7s} {'torch ms':>8s} {'ratio':>6s} {'min':>6s} {'compile s gx/torch':>19s}"
    print(head + (f" {'gx2/gx':>7s} {'t2/t':>6s} {'gx2/t2':>7s}" if args.twins else ""))
    for name in names:
        compiled_row(name, base, args)


def compiled_gx(tx: Any, base: list[torch.Tensor]) -> Callable[[], None]:
    """One compiled gx step on its own copy of the params (state and params donated)."""
    ps = clone_params(base)
    params = [p.detach() for p in ps]
    grads = [p.grad for p in ps]
    box = {"state": tx.init(params)}

    @torch.compile(fullgraph=True)
    def step(params: list[torch.Tensor], state: Any, grads: list[torch.Tensor]) -> tuple[Any, Any]:
        updates, state = gx.update_in_place(tx, grads, state, params)  # the state is donated
        return gx.apply_updates(params, updates, inplace=True), state

    def run_gx() -> None:
        _, box["state"] = step(params, box["state"], grads)

    return run_gx


def compiled_row(name: str, base: list[torch.Tensor], args: argparse.Namespace) -> None:
    make_gx, make_t = ROWS[name]
    tx = make_gx()
    runners: dict[str, Callable[[], Any]] = {"gx": compiled_gx(tx, base)}
    t0 = time.perf_counter()
    runners["gx"]()
    c_gx = time.perf_counter() - t0
    c_t = float("nan")
    if make_t is not None:
        topt = make_t(clone_params(base), {"foreach": True})
        runners["torch"] = torch.compile(topt.step)
        t0 = time.perf_counter()
        runners["torch"]()
        c_t = time.perf_counter() - t0
    if args.twins:  # a second instance of each side, timed in the same rounds: the spread of placement
        runners["gx2"] = compiled_gx(tx, base)
        if make_t is not None:
            runners["torch2"] = torch.compile(make_t(clone_params(base), {"foreach": True}).step)
    print(f"  ({name}: compiled, first calls {c_gx:.1f} s / {c_t:.1f} s)", file=sys.stderr, flush=True)
    rounds: dict[str, list[float]] = {k: [] for k in runners}

    mins: dict[str, list[float]] = {k: [] for k in runners}

    def timed(k: str) -> float:
        return time_calls(runners[k], args.steps, mins[k])

    for k in runners:
        for _ in range(args.warmup):
            runners[k]()
    for _ in range(args.rounds):
        for k in runners:
            rounds[k].append(timed(k))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))

    gx_ms = statistics.median(rounds["gx"])
    if "torch" in rounds:
        t_ms = statistics.median(rounds["torch"])
        r_min = min(mins["gx"]) / min(mins["torch"])
        twins = (f" {ratio('gx2', 'gx'):7.2f} {ratio('torch2', 'torch'):6.2f} {ratio('gx2', 'torch2'):7.2f}"
                 if args.twins else "")
        print(f"{name:34s} {gx_ms:7.1f} {t_ms:8.1f} {ratio('gx', 'torch'):6.2f} {r_min:6.2f} "
              f"{c_gx:9.1f}/{c_t:<9.1f}{twins}", flush=True)
    else:
        print(f"{name:34s} {gx_ms:7.1f} {'-':>8s} {'-':>6s} {'-':>6s} {c_gx:9.1f}/-", flush=True)
    torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params-millions", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (the ratio is the median over rounds)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="row names, separated by commas (or by ';' when a name has one)")
    ap.add_argument("--compiled", action="store_true",
                    help="time compiled steps: gx donating its buffers vs torch.compile(opt.step)")
    ap.add_argument("--twins", action="store_true",
                    help="with --compiled: a second instance of each side in the same rounds (gx2/gx and t2/t: "
                         "the spread of two identical steps on different buffers; gx2/t2: the ratio again)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = make_params(args.params_millions)
    total = sum(p.numel() for p in base)
    mode = "compiled" if args.compiled else "eager"
    print(f"# {mode}: {total / 1e6:.1f}M float32 params in {len(base)} tensors, {torch.get_num_threads()} "
          f"thread(s), torch {torch.__version__}, median of {args.rounds} rounds x {args.steps} steps")
    names = args.only.split(";" if ";" in args.only else ",") if args.only else list(ROWS)
    for name in names:
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    (compiled_rows if args.compiled else eager_rows)(names, base, args)


if __name__ == "__main__":
    main()
