"""Per-step time of clipped SGD: every clipping rule of gradxform against torch's idiom and torch-clip.

What it measures
----------------
One optimizer step ("clip the gradient with a rule, then SGD with momentum 0.9, lr 1e-3") over a
fixed set of ~50 float32 CPU tensors totalling ``--params-millions`` (default 25M) parameters,
shaped like a small transformer (the parameter set of ``benchmarks/optimizer_step.py``). Params
and gradients are generated once from fixed seeds (gradients ~ N(0, 1e-2), global norm ~50 at
25M, so the norm rules do clip); the same gradients are fed to every step: no forward or backward
pass is timed.

Rules (torch-clip names) and levels:

- ``norm``              global L2 norm, level 1.0        gx: ``gx.clip_by_global_norm(1.0)``
- ``layer_wise``        per-tensor L2 norm, level 0.3    gx: ``clip_by_leaf_norm(0.3)``
- ``coordinate_wise``   elementwise, level 0.1           gx: ``clip(0.1)``
- ``auto``              AutoClip, q = 0.5, inverted_cdf  gx: ``autoclip(0.5, method="inverted_cdf")``
- ``linear_rand_norm``  random norm clip, level 1.0, beta 0.5, power 1
                                                         gx: ``random_clip_by_global_norm(1.0, 0.5)``

Implementations (rows), for each rule:

- ``torch_idiom``        ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)`` then
                         ``torch.optim.SGD(lr=1e-3, momentum=0.9, foreach=True).step()``. This is the
                         *global-norm* idiom whatever the rule: it is the common reference line.
                         (It clips its own copy of the gradients in place.)
- ``torch_clip``         ``torch_clip.optimizers.ClippedSGD(params, 1e-3, momentum=0.9,
                         clipping_type=<rule>, clipping_level=<level>, beta=0.5, p_autoclip=0.5)``
                         (torch-clip 0.0.6; ``auto`` is its ``auto_clip``). Its AutoClip prints
                         ``Here!`` once per tensor per step: stdout is redirected to ``/dev/null``
                         around its ``step()`` (inside the timed region: that print is part of its
                         cost). Note: torch-clip applies the norm / auto factor to the momentum
                         buffer (docs/clipping.md, torch-clip table, row 7), so its parameters differ from ours.
- ``gx_adapter``         ``gx.Optimizer(params, clipped_sgd(1e-3, momentum=0.9, rule=<rule>, ...))``
- ``gx_adapter_chain``   ``gx.Optimizer(params, gx.chain(<rule tx>, gx.sgd(1e-3, momentum=0.9)))``
- ``gx_compiled``        ``torch.compile(step_fn, fullgraph=True)`` of the pure functional step
                         ``step_fn(params, grads, state) -> (params, state)`` (``tx.update`` then
                         ``gx.apply_updates``; ``tx`` = the ``clipped_sgd`` above). Returns new
                         params and state each call. Compile time (the first call) is reported
                         separately and is not in the step times.
- ``gx_compiled_owned``  the same step with ``gx.apply_updates(..., inplace=True)``, compiled and
                         called through ``gx.update_in_place``: it donates its params and state
                         buffers (inductor writes them in place).

Plus a "global norm alone" group (no optimizer): ``torch.nn.utils.clip_grad_norm_(foreach=True)``
(in place) against ``gx.clip_by_global_norm(1.0).update(grads, state)``: pure eager (a new
output tree each call), eager through ``gx.update_in_place(..., donate_updates=True)`` (may scale the gradients it owns
in place, as torch does) and compiled (pure).

How it is timed
---------------
Each group (a rule, or "global norm alone") runs in a fresh Python process (the script re-invokes
itself with ``--only GROUP``), so that no group inherits another's compiled code or allocator
state: glibc's mmap threshold adapts to the sizes freed so far, and with it how many page faults
the rows that allocate a fresh 100 MB update tree per step pay; in one process the same row
measured 72 ms in the first group and 34 ms in the fourth (an allocating row, before the adapter
lowering). Within a group, all rows are built first (each with its own copy of the params), each
gets ``--warmup`` untimed steps (the first call of a compiled row compiles), then the timed steps are
*interleaved*: round r runs one step of every row, in a rotated order, so that a load spike on a
shared machine hits all rows of the group alike. Each step is timed with ``time.perf_counter``
(CPU ops are synchronous); the table shows the median, min and p90 of ``--steps`` timed steps.
On a busy 2-core machine multi-threaded steps are noisy (OpenMP barriers): ``--threads 1`` gives
steadier ratios.

Columns: ``/tclip`` = median / torch_clip's median for the same rule, ``/idiom`` = median /
torch_idiom's median in the same group (< 1: faster). ``kflt/st`` = minor page faults per timed
step, in thousands (fresh memory touched; ~1-2 us each on CPU: 24k faults = one 96 MiB tree).
``dev`` = relative deviation of
``sum |p_final - p_0|`` from the ``gx_adapter`` row of the same rule, a sanity check that the gx
rows compute the same thing (torch_clip and, for rules other than norm, torch_idiom compute
something else, so their dev is not an error).

The targets of the clippers issue are printed under the table with PASS / MISS: every rule
<= 1.0x torch_clip's time for the same rule; coordinate-wise >= 5x faster than torch_clip's;
global norm alone <= 1.1x ``clip_grad_norm_``. Nothing is asserted; timings on a shared machine
are noisy, so re-run on a quiet machine before drawing conclusions.

How to run
----------
::

    python benchmarks/clipping.py --threads 1                 # full: 25M params, 3 warmup + 20 steps
    python benchmarks/clipping.py --quick                      # smoke run: 1M params
    python benchmarks/clipping.py --rules norm,auto --no-compile --steps 50
    python benchmarks/clipping.py --json out.json

torch-clip is optional (``pip install --no-deps torch_clip tqdm``; it is never a gradxform
dependency); without it its rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _report import fmt, ok, ratio  # same directory: helpers shared by the benchmarks

RULES = ("norm", "layer_wise", "coordinate_wise", "auto", "linear_rand_norm")
LEVELS = {"norm": 1.0, "layer_wise": 0.3, "coordinate_wise": 0.1, "auto": None, "linear_rand_norm": 1.0}
TORCH_CLIP_NAMES = {"auto": "auto_clip"}  # ours -> torch-clip's clipping_type, where they differ
LR, MOMENTUM, Q, BETA, SEED = 1e-3, 0.9, 0.5, 0.5, 0
NORM_LEVEL = 1.0

IMPLS = ("torch_idiom", "torch_clip", "gx_adapter", "gx_adapter_chain", "gx_compiled", "gx_compiled_owned")
CLIP_ONLY_IMPLS = ("torch_clip_grad_norm_", "gx_eager", "gx_eager_owned", "gx_compiled")

TARGET_VS_TORCH_CLIP = 1.0
TARGET_COORD_SPEEDUP = 5.0
TARGET_GLOBAL_NORM = 1.1


# --- the parameter set (as in benchmarks/optimizer_step.py) ----------------------------------------


from optimizer_step import make_shapes  # noqa: E402  (same directory; the same parameter set)


# --- the transforms under test ---------------------------------------------------------------------


def gx_rule_tx(rule: str):
    """The bare clipping transform of a rule (for ``gx.chain(rule_tx, gx.sgd(...))``)."""
    import gradxform as gx
    from gradxform import clipping as C

    if rule == "norm":
        return gx.clip_by_global_norm(LEVELS[rule])
    if rule == "layer_wise":
        return C.clip_by_leaf_norm(LEVELS[rule])
    if rule == "coordinate_wise":
        return C.clip(LEVELS[rule])
    if rule == "auto":
        return C.autoclip(q=Q, method="inverted_cdf")
    if rule == "linear_rand_norm":
        return C.random_clip_by_global_norm(LEVELS[rule], beta=BETA, power=1, seed=SEED)
    raise ValueError(rule)


def gx_clipped_sgd(rule: str):
    from gradxform.clipping import clipped_sgd

    kw: dict = {}
    if rule == "auto":
        kw = dict(q=Q, method="inverted_cdf")
    elif rule == "linear_rand_norm":
        kw = dict(beta=BETA, power=1, seed=SEED)
    return clipped_sgd(LR, momentum=MOMENTUM, rule=rule, level=LEVELS[rule], **kw)


def torch_clip_status() -> tuple[bool, str]:
    try:
        import torch_clip  # noqa: F401
        from torch_clip.optimizers import ClippedSGD  # noqa: F401
    except ImportError as e:
        return False, f"torch_clip: not importable ({e}); its rows are skipped (pip install --no-deps torch_clip tqdm)"
    except Exception as e:  # noqa: BLE001
        return False, f"torch_clip: cannot be imported ({type(e).__name__}: {e}); its rows are skipped"
    try:
        from importlib.metadata import version

        v = version("torch_clip")
    except Exception:  # noqa: BLE001
        v = "?"
    return True, f"torch_clip {v} (stdout redirected to /dev/null around its step(): its AutoClip prints 'Here!' per tensor per step)"


# --- one row ---------------------------------------------------------------------------------------


class Runner:
    """One implementation of one rule: ``step()``, ``params()``; ``first_s`` after warmup."""

    def __init__(self, group: str, impl: str, p0: list, grads: list, names: list[str], compile_: bool) -> None:
        import torch

        import gradxform as gx

        self.group, self.impl, self.names = group, impl, names
        self.times: list[float] = []
        self.faults: list[int] = []
        self.warm: list[float] = []
        if group == "clip_only":
            self._build_clip_only(impl, grads, names, compile_)
            return
        rule = group
        if impl in ("torch_idiom", "torch_clip", "gx_adapter", "gx_adapter_chain"):
            self.ps = [p.clone().requires_grad_(True) for p in p0]
            own_grads = [g.clone() for g in grads] if impl == "torch_idiom" else grads  # torch clips .grad in place
            for p, g in zip(self.ps, own_grads):
                p.grad = g
        if impl == "torch_idiom":
            self.opt = torch.optim.SGD(self.ps, lr=LR, momentum=MOMENTUM, foreach=True)

            def step() -> None:
                torch.nn.utils.clip_grad_norm_(self.ps, NORM_LEVEL, foreach=True)
                self.opt.step()
        elif impl == "torch_clip":
            from torch_clip.optimizers import ClippedSGD

            level = LEVELS[rule] if LEVELS[rule] is not None else 1.0
            self.opt = ClippedSGD(self.ps, LR, momentum=MOMENTUM, clipping_type=TORCH_CLIP_NAMES.get(rule, rule),
                                  clipping_level=float(level), beta=BETA, p_autoclip=Q)
            devnull = open(os.devnull, "w")  # noqa: SIM115
            self._devnull = devnull

            def step() -> None:
                with contextlib.redirect_stdout(devnull):  # its AutoClip prints "Here!" per tensor per step
                    self.opt.step()
        elif impl in ("gx_adapter", "gx_adapter_chain"):
            tx = gx_clipped_sgd(rule) if impl == "gx_adapter" else gx.chain(gx_rule_tx(rule), gx.sgd(LR, momentum=MOMENTUM))
            self.opt = gx.Optimizer(self.ps, tx)

            def step() -> None:
                self.opt.step()
        elif impl in ("gx_compiled", "gx_compiled_owned"):
            tx = gx_clipped_sgd(rule)
            donate = impl == "gx_compiled_owned"
            self.ps = {n: p.clone() for n, p in zip(names, p0)}
            g_tree = dict(zip(names, grads))
            self.st = tx.init(self.ps)

            def step_fn(params, grads_, state):
                if donate:  # donates params and state; the shared gradients stay protected
                    updates, state = gx.update_in_place(tx, grads_, state, params)
                else:
                    updates, state = tx.update(grads_, state, params)
                return gx.apply_updates(params, updates, inplace=donate), state

            fn = torch.compile(step_fn, fullgraph=True) if compile_ else step_fn

            def step() -> None:
                self.ps, self.st = fn(self.ps, g_tree, self.st)
        else:
            raise SystemExit(f"unknown implementation {impl!r}")
        self.step = step

    def _build_clip_only(self, impl: str, grads: list, names: list[str], compile_: bool) -> None:
        import torch

        import gradxform as gx

        if impl == "torch_clip_grad_norm_":
            # clip_grad_norm_ reads and scales ``p.grad`` of the tensors it is given.
            holders = [torch.empty_like(g).requires_grad_(True) for g in grads]
            for h, g in zip(holders, grads):
                h.grad = g.clone()  # clipped in place
            self.out = [h.grad for h in holders]

            def step() -> None:
                torch.nn.utils.clip_grad_norm_(holders, NORM_LEVEL, foreach=True)
        else:
            tx = gx.clip_by_global_norm(NORM_LEVEL)
            g_tree = {n: g.clone() for n, g in zip(names, grads)}
            st = tx.init(g_tree)
            self.out = g_tree

            if impl == "gx_eager":
                def step() -> None:
                    self.out, _ = tx.update(g_tree, st)
            elif impl == "gx_eager_owned":
                def step() -> None:  # the caller owns g_tree: the clip may scale it in place
                    self.out, _ = gx.update_in_place(tx, g_tree, st, donate_updates=True)
            elif impl == "gx_compiled":
                fn = torch.compile(lambda g: tx.update(g, st)[0], fullgraph=True) if compile_ else (lambda g: tx.update(g, st)[0])

                def step() -> None:
                    self.out = fn(g_tree)
            else:
                raise SystemExit(f"unknown implementation {impl!r}")
        self.step = step

    def params(self) -> list:
        src = self.out if self.group == "clip_only" else self.ps
        if isinstance(src, dict):
            return [src[n] for n in self.names]
        return [p.detach() for p in src]

    def summary(self) -> dict:
        ts = sorted(self.times)
        med = statistics.median(ts)
        return dict(
            median_ms=med * 1e3, min_ms=ts[0] * 1e3,
            p90_ms=ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))] * 1e3,
            first_s=self.warm[0] if self.warm else None,
            compile_s=(self.warm[0] - med) if self.warm and "compiled" in self.impl else None,
            slow_warmup=[round(t, 3) for t in self.warm[1:] if t > 5 * med],
            faults_per_step=statistics.mean(self.faults) if self.faults else None,
        )


def run_group(group: str, impls: list[str], p0: list, grads: list, names: list[str], args) -> dict[str, dict]:
    """Build every row of a group, warm each up, then time interleaved rounds of one step per row."""
    import torch

    runners: list[Runner] = []
    results: dict[str, dict] = {}
    # Every compiled row compiles the same ``step_fn`` code object (with a different closure):
    # start each group from an empty dynamo cache so that the groups do not add up to dynamo's
    # per-code-object recompile limit (8), which fails a fullgraph=True compile.
    torch._dynamo.reset()
    for impl in impls:
        print(f"  [{group}] building + warming up {impl:22s}", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            r = Runner(group, impl, p0, grads, names, compile_=not args.no_compile)
            for _ in range(max(1, args.warmup)):
                t1 = time.perf_counter()
                r.step()
                r.warm.append(time.perf_counter() - t1)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results[impl] = {"error": msg}
            print(f"ERROR {msg}", flush=True)
            continue
        runners.append(r)
        print(f"first step {r.warm[0]:.2f} s ({time.perf_counter() - t0:.0f} s)", flush=True)

    for rnd in range(args.steps):
        k = rnd % max(1, len(runners))
        for r in runners[k:] + runners[:k]:  # rotate the order each round
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            r.step()
            r.times.append(time.perf_counter() - t0)
            r.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    for r in runners:
        res = r.summary()
        if args.no_compile:
            res["compile_s"] = None
        with torch.no_grad():
            res["abs_delta_sum"] = float(sum((p.double() - q.double()).abs().sum() for p, q in zip(r.params(), p0)))
            if group == "clip_only":  # the sum of |clipped grads| instead (p0 = the grads here)
                res["abs_delta_sum"] = float(sum(p.double().abs().sum() for p in r.params()))
        results[r.impl] = res
    del runners
    return results


# --- the driver ------------------------------------------------------------------------------------


def make_tensors(shapes: list) -> tuple[list, list]:
    """The fixed params (N(0, 0.02)) and gradients (N(0, 1e-2)), from fixed seeds."""
    import torch

    gen = torch.Generator().manual_seed(0)
    p0 = [torch.randn(s, generator=gen) * 0.02 for _, s in shapes]
    gen.manual_seed(1)
    grads = [torch.randn(s, generator=gen) * 1e-2 for _, s in shapes]
    return p0, grads


def run_group_process(group: str, args, shapes: list, names: list[str], has_tc: bool) -> dict:
    """One group, in this (fresh) process: build its tensors, run it, check the gradients are intact."""
    p0, grads = make_tensors(shapes)
    check = [g.clone() for g in grads]
    if group == "clip_only":
        res = run_group(group, list(CLIP_ONLY_IMPLS), grads, grads, names, args)
    else:
        res = run_group(group, [i for i in IMPLS if has_tc or i != "torch_clip"], p0, grads, names, args)
    res["_grads_modified"] = any(not bool((a == b).all()) for a, b in zip(grads, check))
    return res


def run_group_subprocess(group: str, args, cache_dir: str) -> dict:
    """Run one group in a fresh interpreter (``--only``), so that no group inherits another's
    allocator state (glibc's mmap threshold adapts to the sizes freed so far, which changes how
    many page faults the allocating rows pay) or compiled code; stream its progress lines."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", group, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--params-millions", repr(args.params_millions)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_compile:
        cmd.append("--no-compile")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("  ["):
            print(line, flush=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-millions", type=float, default=25.0, help="total parameters, in millions (default 25)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row first (default 3; >= 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1M params, 2 warmup + 5 steps")
    ap.add_argument("--rules", default=",".join(RULES) + ",clip_only",
                    help=f"comma-separated groups (default: all of {', '.join(RULES)}, clip_only)")
    ap.add_argument("--no-compile", action="store_true", help="run the gx_compiled rows eagerly (fast smoke test)")
    ap.add_argument("--json", default="", help="also write the raw results to this file")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed per group subprocess (default 900)")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: run one group, print RESULT json
    args = ap.parse_args()
    if args.quick:
        args.params_millions, args.steps, args.warmup = 1.0, 5, 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    groups = [g.strip() for g in args.rules.split(",") if g.strip()]
    for g in groups:
        if g not in RULES and g != "clip_only":
            raise SystemExit(f"unknown rule {g!r}; expected some of {RULES + ('clip_only',)}")

    has_tc, tc_msg = torch_clip_status()
    shapes = make_shapes(args.params_millions)
    names = [n for n, _ in shapes]
    n_params = sum(math.prod(s) for _, s in shapes)
    if args.only:
        print("RESULT " + json.dumps(run_group_process(args.only, args, shapes, names, has_tc)), flush=True)
        return
    print(f"gradxform clipping benchmark: {len(shapes)} float32 tensors, {n_params / 1e6:.2f}M params "
          f"({n_params * 4 / 2**20:.0f} MiB per copy), largest {max((s for _, s in shapes), key=math.prod)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, {platform.machine()}; {args.warmup} warmup + {args.steps} timed steps per row, "
          f"each group in a fresh process, its rows interleaved{'; compile OFF (--no-compile)' if args.no_compile else ''}")
    print(f"SGD lr {LR}, momentum {MOMENTUM}; levels {LEVELS}; auto q={Q} (inverted_cdf); random beta={BETA}")
    print(tc_msg)
    print(flush=True)

    p0, grads = make_tensors(shapes)
    print(f"gradient global norm {float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))):.2f}\n",
          flush=True)
    del p0, grads

    results: dict[str, dict[str, dict]] = {}
    skipped: dict[str, str] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gx_clip_bench_inductor_") as cache_dir:
        for g in groups:
            if g != "clip_only" and not has_tc:
                skipped[g] = "torch_clip not importable"
            results[g] = run_group_subprocess(g, args, cache_dir)
    print(f"  total {time.perf_counter() - t_start:.0f} s\n")
    for g in groups:
        if results[g].pop("_grads_modified", None):
            print(f"WARNING [{g}]: the shared gradient tensors were modified by some row (a transform wrote its input)\n")

    header = (f"{'rule':16s} {'config':22s} {'median ms':>9s} {'min ms':>8s} {'p90 ms':>8s} {'/tclip':>7s} "
              f"{'/idiom':>7s} {'kflt/st':>7s} {'compile s':>9s} {'dev':>8s}")
    print(header)
    print("-" * len(header))
    for g in groups:
        res = results[g]
        if "error" in res:
            print(f"{g:16s} ERROR: {res['error'][:300]}\n")
            continue
        if g == "clip_only":
            ref_idiom, ref_tc, ref_dev = res.get("torch_clip_grad_norm_"), None, res.get("torch_clip_grad_norm_")
            impls = CLIP_ONLY_IMPLS
        else:
            ref_idiom, ref_tc, ref_dev = res.get("torch_idiom"), res.get("torch_clip"), res.get("gx_adapter")
            impls = IMPLS
        label = "global norm only" if g == "clip_only" else g
        for impl in impls:
            if impl == "torch_clip" and g in skipped:
                print(f"{label:16s} {impl:22s} skipped: {skipped[g]}")
                continue
            r = res.get(impl)
            if r is None:
                continue
            if "error" in r:
                print(f"{label:16s} {impl:22s} ERROR: {r['error'][:160]}")
                continue
            dev = None
            if ok(ref_dev) and ref_dev["abs_delta_sum"]:
                dev = abs(r["abs_delta_sum"] / ref_dev["abs_delta_sum"] - 1)
            print(f"{label:16s} {impl:22s} {r['median_ms']:9.2f} {r['min_ms']:8.2f} {r['p90_ms']:8.2f} "
                  f"{fmt(ratio(r, ref_tc)):>7s} {fmt(ratio(r, ref_idiom)):>7s} "
                  f"{fmt(r['faults_per_step'] / 1e3 if r.get('faults_per_step') is not None else None, '.1f'):>7s} "
                  f"{fmt(r['compile_s'], '.1f'):>9s} "
                  f"{fmt(dev, '.1e'):>8s}")
            if "compiled" in impl and r.get("slow_warmup"):
                print(f"{'':40s} note: slow warmup steps after the first (recompiles?): {r['slow_warmup']} s")
        print()
    print("ratios: median / the peer's median (< 1: faster). /tclip: torch_clip's ClippedSGD, same rule; /idiom:\n"
          "  clip_grad_norm_(foreach) + SGD(foreach) in the same group (for 'global norm only': clip_grad_norm_ alone).\n"
          "dev: relative deviation of sum|p - p0| from gx_adapter of the same rule (global norm only: of sum|clipped g|\n"
          "  from clip_grad_norm_). torch_clip differs by design (it scales the momentum buffer, docs/clipping.md torch-clip table row 7;\n"
          "  its random rule uses the global RNG), and torch_idiom is the global-norm rule in every group.\n")

    print("targets (from the clippers issue; median-based, min-based in brackets):")

    def verdict(value: float | None, value_min: float | None, limit: float, at_most: bool = True) -> str:
        if value is None:
            return "n/a (missing data)"
        passed = value <= limit if at_most else value >= limit
        return (f"{value:5.2f}x  (target {'<=' if at_most else '>='} {limit:.1f}x)  {'PASS' if passed else 'MISS'}"
                f"   [min-based {value_min:.2f}x]")

    for g in groups:
        if g == "clip_only":
            continue
        res = results[g]
        tc = res.get("torch_clip")
        for impl in ("gx_adapter", "gx_adapter_chain", "gx_compiled", "gx_compiled_owned"):
            if impl in res:
                print(f"  [{g:16s}] {impl:18s} / torch_clip : "
                      f"{verdict(ratio(res[impl], tc), ratio(res[impl], tc, 'min_ms'), TARGET_VS_TORCH_CLIP)}")
        if g == "coordinate_wise":
            for impl in ("gx_adapter", "gx_adapter_chain", "gx_compiled", "gx_compiled_owned"):
                if impl in res:
                    print(f"  [{g:16s}] speed-up of {impl:18s} over torch_clip : "
                          f"{verdict(ratio(tc, res[impl]), ratio(tc, res[impl], 'min_ms'), TARGET_COORD_SPEEDUP, False)}")
    if "clip_only" in results:
        res = results["clip_only"]
        ref = res.get("torch_clip_grad_norm_")
        for impl in ("gx_eager", "gx_eager_owned", "gx_compiled"):
            if impl in res:
                print(f"  [global norm only] {impl:14s} / clip_grad_norm_ : "
                      f"{verdict(ratio(res[impl], ref), ratio(res[impl], ref, 'min_ms'), TARGET_GLOBAL_NORM)}")
    print("(Informational: nothing is asserted. Re-run on a quiet machine before drawing conclusions.)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "n_params": n_params, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
