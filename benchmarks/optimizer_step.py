"""Per-step time and memory of one optimizer step: gradxform against torch.optim and torchopt.

What it measures
----------------
One optimizer step over a fixed set of ~50 float32 CPU tensors totalling ``--params-millions``
(default 25M) parameters, shaped like a small transformer (embedding, per-layer qkv / out / MLP
weights, biases, layer norms). Params and gradients are generated once from fixed seeds; the
same gradients are fed to every step (no forward/backward is timed).

Two update rules, each by every implementation:

- ``adamw``:       AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
- ``clip+adamw``:  clip by global L2 norm 1.0, then the same AdamW

Implementations (rows):

- ``torch_foreach``   torch.optim.AdamW(foreach=True) (clip: torch.nn.utils.clip_grad_norm_(foreach=True))
- ``torch_fused``     torch.optim.AdamW(fused=True)   (same clip)
- ``torchopt``        torchopt's functional API, ``tx.update(grads, state, params=params,
                      inplace=True)`` + ``torchopt.apply_updates(..., inplace=True)``; this is
                      exactly what ``torchopt.AdamW.step()`` runs, minus its pytree bookkeeping.
                      Clip: ``torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.adamw(...))``.
- ``torchopt_accel``  the same with ``use_accelerated_op=True`` (torchopt's C++ fused Adam op).
                      The faster of the two torchopt rows is the "torchopt" reference for ratios.
- ``gx_adapter``      gx.Optimizer(params, gx.adamw(1e-3)) (clip: gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3)))
- ``gx_eager``        functional: ``u, s = tx.update(g, s, p); p = gx.apply_updates(p, u)``
- ``gx_compiled``     ``torch.compile(step_fn, fullgraph=True)`` of ``step_fn(params, grads, state)
                      -> (params, state)`` doing the update and apply_updates; compile time (the
                      first call, cold inductor cache unless ``--compile-cache`` is given) is
                      reported separately and is not in the step times.

Each configuration runs in a fresh subprocess (the script re-invokes itself with ``--only KEY``)
so that memory numbers do not leak between configurations.

Time: median (and min / p90) of ``--steps`` timed steps after ``--warmup`` untimed ones,
measured with ``time.perf_counter`` around each step (CPU ops are synchronous).
On a shared machine, OpenMP barriers make multi-threaded steps very noisy when other processes
compete for the cores (single steps of the same config varied 2 ms .. 80 ms at 2 threads on a
busy 2-core box); ``--threads 1`` gives steadier ratios there.

Memory:

- ``state MB``:  bytes of the optimizer state tensors (sum of ``nbytes`` over the state tree;
  ``optimizer.state`` for torch; ``opt.tx_state()`` for the adapter). Storages are deduplicated.
  The target check under the table also splits it into per-element buffers and small tensors
  (step counts, injected hyperparameters); torch keeps its hyperparameters as Python floats in
  ``param_groups``, which are not counted.
- ``peak MB``:   peak RSS increase over the whole run (``ru_maxrss`` after the timed steps minus RSS
  before the optimizer was built): state + the largest transient allocation of any step
  (+ compiler memory for ``gx_compiled``).
- ``temp MB``:   ``peak MB - state MB``: the extra memory a step needs on top of its state
  (temporaries such as the update tensors; compiler memory for ``gx_compiled``).
- ``step MB``:   transient peak of a steady-state step: the peak RSS during the timed steps
  minus RSS just before them. The peak counter is reset with ``/proc/self/clear_refs`` (Linux);
  where that is not possible the column shows ``n/a``.
- ``kflt/st``:   minor page faults per timed step (``ru_minflt``), in thousands: how much fresh
  memory a step touches (large temporaries and new outputs that the allocator returns to the OS and
  maps again every step). On CPU each costs ~1-2 us, so this often explains a slow row.

A sanity column ``dev`` gives the relative deviation of ``sum |p_final - p_0|`` from the
``torch_foreach`` row of the same rule (all rows compute the same update up to rounding).

Ratios (< 1 is faster than the peer) and the targets of the performance issue are printed under
the table: adapter <= 1.0x torch.optim foreach; compiled <= 1.5x torch.optim fused; gradxform
state memory no larger than torch.optim's. Nothing is asserted: the script always exits 0 unless
it crashes; PASS / MISS are informational (timings on a shared machine are noisy).

How to run
----------
::

    python benchmarks/optimizer_step.py                      # full: 25M params, 5 warmup + 20 steps
    python benchmarks/optimizer_step.py --quick              # smoke run: 1M params
    python benchmarks/optimizer_step.py --steps 50 --threads 4 --params-millions 50
    python benchmarks/optimizer_step.py --configs adamw:gx_adapter,adamw:torch_foreach,:gx_compiled

torchopt is optional (``pip install --no-deps torchopt``; it also imports ``graphviz``, a small
pure-Python package). When it cannot be imported its rows are skipped. It is never a gradxform
dependency.
"""

from __future__ import annotations

import argparse
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

from _report import reset_peak_rss  # same directory: helpers shared by the benchmarks

RULES = ("adamw", "clip+adamw")
IMPLS = (
    ("torch_foreach", "torch.optim.AdamW(foreach=True)"),
    ("torch_fused", "torch.optim.AdamW(fused=True)"),
    ("torchopt", "torchopt.adamw, functional, inplace=True"),
    ("torchopt_accel", "torchopt.adamw(use_accelerated_op=True), inplace"),
    ("gx_adapter", "gx.Optimizer(params, tx)"),
    ("gx_adapter_generic", "gx.Optimizer(params, tx, fused=False)"),
    ("gx_eager", "tx.update + gx.apply_updates, eager"),
    ("gx_compiled", "torch.compile(step_fn, fullgraph=True)"),
    ("gx_compiled_owned", "the same through gx.update_in_place, apply_updates(inplace=True)"),
)
IMPL_DESC = dict(IMPLS)
ALL_KEYS = [f"{rule}:{impl}" for rule in RULES for impl, _ in IMPLS]

LR, WD, MAX_NORM = 1e-3, 1e-2, 1.0
TORCHOPT_HINT = "torchopt: not installed (pip install --no-deps torchopt)"

# Targets from the performance issue.
TARGET_ADAPTER_VS_FOREACH = 1.0
TARGET_COMPILED_VS_FUSED = 1.5


# --- the parameter set ---------------------------------------------------------------------------


def make_shapes(params_millions: float) -> list[tuple[str, tuple[int, ...]]]:
    """~50 tensors of a 4-layer transformer of width d with a 48*d vocabulary: ~96 d^2 params."""
    target = params_millions * 1e6
    d = max(8, int(round(math.sqrt(target / 96) / 8)) * 8)
    vocab = 48 * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("tok_emb.weight", (vocab, d))]
    for layer in range(4):
        pre = f"layers.{layer}."
        shapes += [
            (pre + "ln1.weight", (d,)), (pre + "ln1.bias", (d,)),
            (pre + "attn.qkv.weight", (3 * d, d)), (pre + "attn.qkv.bias", (3 * d,)),
            (pre + "attn.out.weight", (d, d)), (pre + "attn.out.bias", (d,)),
            (pre + "ln2.weight", (d,)), (pre + "ln2.bias", (d,)),
            (pre + "mlp.fc1.weight", (4 * d, d)), (pre + "mlp.fc1.bias", (4 * d,)),
            (pre + "mlp.fc2.weight", (d, 4 * d)), (pre + "mlp.fc2.bias", (d,)),
        ]
    shapes.append(("ln_f.weight", (d,)))
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# --- memory helpers ------------------------------------------------------------------------------


def current_rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # best effort


def max_rss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def state_nbytes(tree) -> tuple[int, int]:
    """(all bytes, bytes of the small tensors: step counts and other scalars) of a state tree."""
    import optree
    import torch

    seen, total, small = set(), 0, 0
    for leaf in optree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
                if leaf.numel() < 64:
                    small += storage.nbytes()
    return total, small


def torch_state_tree(opt) -> list:
    return [dict(opt.state[p]) for group in opt.param_groups for p in group["params"] if p in opt.state]


# --- one configuration (runs in the subprocess) --------------------------------------------------


class Runner:
    """One implementation of one rule over given params / grads.

    ``prepare()`` makes the implementation's own copy of the params (not counted as optimizer
    memory); ``build()`` creates the optimizer or the functional state; then ``step()``,
    ``state()`` (the state tree) and ``params()`` (the current params, a list).
    """

    def __init__(self, impl: str, clip: bool, p0: list, grads: list, names: list[str], compile_: bool = True) -> None:
        self.impl, self.clip, self.p0, self.grads, self.names = impl, clip, p0, grads, names
        self.compile_ = compile_

    def prepare(self) -> None:
        impl = self.impl
        if impl in ("torch_foreach", "torch_fused", "gx_adapter", "gx_adapter_generic"):
            self.ps = [p.clone().requires_grad_(True) for p in self.p0]
            for p, g in zip(self.ps, self.grads):
                p.grad = g
        elif impl in ("torchopt", "torchopt_accel"):
            self.ps = [p.clone() for p in self.p0]
        elif impl in ("gx_eager", "gx_compiled", "gx_compiled_owned"):
            self.ps = {n: p.clone() for n, p in zip(self.names, self.p0)}
            self.g_tree = dict(zip(self.names, self.grads))
        else:
            raise SystemExit(f"unknown implementation {impl!r}")

    def build(self) -> None:
        import torch

        impl, clip = self.impl, self.clip
        if impl in ("gx_adapter", "gx_adapter_generic"):
            import gradxform as gx

            tx = gx.chain(gx.clip_by_global_norm(MAX_NORM), gx.adamw(LR)) if clip else gx.adamw(LR)
            self.opt = gx.Optimizer(self.ps, tx, fused=False if impl == "gx_adapter_generic" else None)
        elif impl in ("torch_foreach", "torch_fused"):
            kw = {"foreach": True} if impl == "torch_foreach" else {"fused": True}
            self.opt = torch.optim.AdamW(self.ps, lr=LR, weight_decay=WD, **kw)
        elif impl in ("torchopt", "torchopt_accel"):
            import torchopt

            adamw = torchopt.adamw(LR, weight_decay=WD, use_accelerated_op=impl == "torchopt_accel")
            self.tx = torchopt.chain(torchopt.clip_grad_norm(MAX_NORM), adamw) if clip else adamw
            self.st = self.tx.init(self.ps)
        else:  # gx_eager, gx_compiled, gx_compiled_owned
            import gradxform as gx

            tx = gx.chain(gx.clip_by_global_norm(MAX_NORM), gx.adamw(LR)) if clip else gx.adamw(LR)
            self.st = tx.init(self.ps)
            donate = impl == "gx_compiled_owned"

            def step_fn(params, grads, state):
                if donate:  # the step donates its params and state buffers
                    updates, state = gx.update_in_place(tx, grads, state, params)
                else:
                    updates, state = tx.update(grads, state, params)
                return gx.apply_updates(params, updates, inplace=donate), state

            compiled = impl in ("gx_compiled", "gx_compiled_owned") and self.compile_
            self.fn = torch.compile(step_fn, fullgraph=True) if compiled else step_fn

    def step(self) -> None:
        impl = self.impl
        if impl in ("torch_foreach", "torch_fused"):
            if self.clip:
                import torch

                torch.nn.utils.clip_grad_norm_(self.ps, MAX_NORM, foreach=True)
            self.opt.step()
        elif impl in ("gx_adapter", "gx_adapter_generic"):
            self.opt.step()
        elif impl in ("torchopt", "torchopt_accel"):
            import torchopt

            updates, self.st = self.tx.update(self.grads, self.st, params=self.ps, inplace=True)
            torchopt.apply_updates(self.ps, updates, inplace=True)
        else:
            self.ps, self.st = self.fn(self.ps, self.g_tree, self.st)

    def state(self):
        if self.impl in ("gx_adapter", "gx_adapter_generic"):
            return self.opt.tx_state(0)
        if self.impl in ("torch_foreach", "torch_fused"):
            return torch_state_tree(self.opt)
        return self.st

    def params(self) -> list:
        if isinstance(self.ps, dict):
            return [self.ps[n] for n in self.names]
        return [p.detach() for p in self.ps]


def run_one(key: str, args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rule, impl = key.split(":")
    clip = rule == "clip+adamw"
    shapes = make_shapes(args.params_millions)
    names = [n for n, _ in shapes]
    result: dict = {"key": key, "threads": torch.get_num_threads()}

    # Pay lazy imports and one-off initialisation (torch.optim pulls in torch._dynamo on first
    # use, ~70 MB of RSS) on two tiny tensors, so the memory baseline below does not count them.
    tiny = Runner(impl, clip, [torch.zeros(3, 2), torch.zeros(2)], [torch.ones(3, 2), torch.ones(2)],
                  ["a", "b"], compile_=False)
    tiny.prepare()
    tiny.build()
    for _ in range(2):
        tiny.step()
    del tiny

    gen = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    p0 = [(torch.randn(s, generator=gen) * 0.02).to(dev) for _, s in shapes]
    gen.manual_seed(1)
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(dev) for _, s in shapes]
    result["device"] = str(dev)

    runner = Runner(impl, clip, p0, grads, names)
    runner.prepare()
    # Memory baseline: params and grads exist, the optimizer and its state do not yet.
    peak_reset_ok = reset_peak_rss()
    rss_base = current_rss_kb()
    maxrss_base = max_rss_kb()
    runner.build()
    step, get_state, get_params = runner.step, runner.state, runner.params
    if dev.type == "cuda":  # time the kernels, not their launch: wait for the device after each step
        _step = step

        def step() -> None:
            _step()
            torch.cuda.synchronize(dev)

    # Warmup. The first call builds lazy state (torch, adapter) or compiles (gx_compiled).
    warm_times = []
    for _ in range(max(1, args.warmup)):
        t0 = time.perf_counter()
        step()
        warm_times.append(time.perf_counter() - t0)
    rss_warm = current_rss_kb()
    maxrss_warm = max_rss_kb()
    step_reset_ok = peak_reset_ok and reset_peak_rss()
    maxrss_before_timed = max_rss_kb()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    maxrss_end = max_rss_kb()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / max(1, args.steps)

    times_sorted = sorted(times)
    median = statistics.median(times)
    result.update(
        median_ms=median * 1e3,
        min_ms=times_sorted[0] * 1e3,
        p90_ms=times_sorted[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))] * 1e3,
        first_step_s=warm_times[0],
        # First call minus a steady step: the compile (tracing + inductor + C++ build) alone.
        compile_s=(warm_times[0] - median) if impl.startswith("gx_compiled") else None,
        slow_warmup=[round(t, 3) for t in warm_times[1:] if t > 5 * median],  # recompiles show up here
        state_bytes=state_nbytes(get_state())[0],
        state_small_bytes=state_nbytes(get_state())[1],
        kept_mb=(rss_warm - rss_base) / 1024,
        peak_mb=(max(maxrss_warm, maxrss_end) - (rss_base if peak_reset_ok else maxrss_base)) / 1024,
        step_mb=(maxrss_end - maxrss_before_timed) / 1024 if step_reset_ok else None,
        peak_reset=peak_reset_ok,
        faults_per_step=faults,
    )
    with torch.no_grad():
        result["abs_delta_sum"] = float(sum((p.double() - q.double()).abs().sum() for p, q in zip(get_params(), p0)))
    return result


# --- the driver ----------------------------------------------------------------------------------


def torchopt_status() -> tuple[bool, str]:
    try:
        import torchopt  # noqa: F401
    except ImportError as e:
        if getattr(e, "name", None) == "torchopt":
            return False, TORCHOPT_HINT
        return False, f"torchopt: installed but cannot be imported ({e}); skipped"
    except Exception as e:  # noqa: BLE001
        return False, f"torchopt: cannot be imported ({type(e).__name__}: {e}); skipped"
    return True, f"torchopt {torchopt.__version__}"


def torchopt_accel_available() -> bool:
    try:
        import torchopt

        return bool(torchopt.accelerated_op.is_available("cpu"))
    except Exception:  # noqa: BLE001
        return False


def run_subprocess(key: str, args: argparse.Namespace, cache_dir: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--only", key,
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--params-millions", repr(args.params_millions), "--device", args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"key": key, "error": f"timed out after {args.timeout}s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"key": key, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["median_ms"] / b["median_ms"]


def ratio_min(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["min_ms"] / b["min_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5; >= 1)")
    ap.add_argument("--params-millions", type=float, default=25.0, help="total parameters, in millions (default 25)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="device of the params and grads (default cpu; e.g. cuda: "
                    "step times then include a synchronize, memory columns are host RSS)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1M params, 2 warmup + 5 steps")
    ap.add_argument("--configs", default="", help="comma-separated keys or substrings (e.g. 'adamw:gx_adapter,fused')")
    ap.add_argument("--compile-cache", default="", help="TORCHINDUCTOR_CACHE_DIR to reuse (default: a fresh one, cold compile)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per configuration subprocess")
    ap.add_argument("--json", default="", help="also write the raw results to this file")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args()
    if args.quick:
        args.params_millions, args.steps, args.warmup = 1.0, 5, 2

    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)), flush=True)
        return

    import torch

    keys = ALL_KEYS
    if args.configs:
        def matches(key: str, pat: str) -> bool:
            if ":" not in pat:
                return pat in key  # substring: "fused", "gx_", "clip"
            rule, impl = pat.split(":", 1)  # "adamw:gx_adapter", "clip+adamw:", ":gx_compiled"
            k_rule, k_impl = key.split(":")
            return rule in ("", k_rule) and impl in ("", k_impl)

        pats = [p.strip() for p in args.configs.split(",") if p.strip()]
        keys = [k for k in keys if any(matches(k, p) for p in pats)]

    has_torchopt, torchopt_msg = torchopt_status()
    skipped = {}
    if not has_torchopt:
        for k in keys:
            if ":torchopt" in k:
                skipped[k] = "not installed"
    elif not torchopt_accel_available():
        for k in keys:
            if k.endswith(":torchopt_accel"):
                skipped[k] = "accelerated op unavailable"

    shapes = make_shapes(args.params_millions)
    n_params = sum(numel(s) for _, s in shapes)
    threads = args.threads or torch.get_num_threads()
    print(f"gradxform optimizer-step benchmark: {len(shapes)} float32 tensors, {n_params / 1e6:.2f}M params "
          f"({n_params * 4 / 2**20:.0f} MiB per copy), largest {max(shapes, key=lambda x: numel(x[1]))[1]}")
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"{platform.machine()}; {args.warmup} warmup + {args.steps} timed steps per config, each in a fresh process")
    print(torchopt_msg)
    print(flush=True)

    own_cache = None
    cache_dir = args.compile_cache
    if not cache_dir:
        own_cache = tempfile.TemporaryDirectory(prefix="gx_bench_inductor_")
        cache_dir = own_cache.name

    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    for key in keys:
        if key in skipped:
            continue
        print(f"  running {key:28s}", end=" ", flush=True)
        res = run_subprocess(key, args, cache_dir)
        results[key] = res
        if "error" in res:
            print(f"ERROR {res['error']}", flush=True)
        else:
            extra = f", compile {res['compile_s']:.1f} s" if res.get("compile_s") is not None else ""
            print(f"{res['median_ms']:8.1f} ms/step ({res['wall_s']:.0f} s{extra})", flush=True)
    if own_cache is not None:
        own_cache.cleanup()
    print(f"  total {time.perf_counter() - t_start:.0f} s\n")

    # Reference rows per rule.
    refs: dict[str, dict[str, dict | None]] = {}
    for rule in RULES:
        ok = lambda k: results.get(k) if results.get(k) and "error" not in results[k] else None  # noqa: E731
        opts = [r for r in (ok(f"{rule}:torchopt"), ok(f"{rule}:torchopt_accel")) if r]
        refs[rule] = {
            "foreach": ok(f"{rule}:torch_foreach"),
            "fused": ok(f"{rule}:torch_fused"),
            "torchopt": min(opts, key=lambda r: r["median_ms"]) if opts else None,
        }

    header = (f"{'rule':10s} {'config':15s} {'median ms':>9s} {'min ms':>8s} {'p90 ms':>8s} "
              f"{'/foreach':>8s} {'/fused':>7s} {'/topt':>7s} {'state MB':>8s} {'peak MB':>8s} "
              f"{'temp MB':>8s} {'step MB':>8s} {'kflt/st':>7s} {'compile s':>9s} {'dev':>8s}")
    print(header)
    print("-" * len(header))
    for rule in RULES:
        printed = False
        for impl, _ in IMPLS:
            key = f"{rule}:{impl}"
            if key in skipped:
                print(f"{rule:10s} {impl:15s} skipped: {skipped[key]}")
                printed = True
                continue
            res = results.get(key)
            if res is None:
                continue
            printed = True
            if "error" in res:
                print(f"{rule:10s} {impl:15s} ERROR: {res['error'][:200]}")
                continue
            ref = refs[rule]
            dev = None
            if ref["foreach"] and ref["foreach"]["abs_delta_sum"]:
                dev = abs(res["abs_delta_sum"] / ref["foreach"]["abs_delta_sum"] - 1)
            print(f"{rule:10s} {impl:15s} {res['median_ms']:9.1f} {res['min_ms']:8.1f} {res['p90_ms']:8.1f} "
                  f"{fmt(ratio(res, ref['foreach']), '.2f'):>8s} {fmt(ratio(res, ref['fused']), '.2f'):>7s} "
                  f"{fmt(ratio(res, ref['torchopt']), '.2f'):>7s} {res['state_bytes'] / 2**20:8.1f} "
                  f"{res['peak_mb']:8.1f} {res['peak_mb'] - res['state_bytes'] / 2**20:8.1f} {fmt(res['step_mb'], '.1f', 'n/a'):>8s} {res['faults_per_step'] / 1e3:7.1f} "
                  f"{fmt(res['compile_s'], '.1f'):>9s} {fmt(dev, '.1e'):>8s}")
            if impl.startswith("gx_compiled") and res.get("slow_warmup"):
                print(f"{'':26s} note: slow warmup steps after the first (recompiles?): {res['slow_warmup']} s")
        if printed:
            print()
    print("ratios: median step time / the peer's median step time of the same rule (< 1: faster than the peer).")
    for rule in RULES:
        t = refs[rule]["torchopt"]
        if t:
            print(f"/topt ({rule}): against {t['key'].split(':')[1]} (the faster torchopt path here)")
    print("MB = MiB. state: optimizer-state tensor bytes. peak: max RSS rise over the run (ru_maxrss). temp: peak - state"
          "\n  (RSS figures carry a few MB of noise: a row with no temporaries can show a small negative temp)."
          "\nstep: RSS peak of a steady step above the RSS before it (memory the allocator keeps cached is not counted)."
          "\nkflt/st: minor page faults per timed step, in thousands (fresh memory touched: allocations the allocator"
          "\n  does not recycle; on CPU they cost ~1-2 us each)."
          "\ndev: relative deviation of sum|p - p0| from torch_foreach of the same rule (a sanity check; torchopt_accel"
          "\n  writes its updates into the gradient tensors, so with this benchmark's fixed grads its dev is not meaningful).")
    print()

    # Targets.
    print("targets (from the issue):")

    def verdict(a: dict | None, b: dict | None, limit: float) -> str:
        value = ratio(a, b)
        if value is None:
            return "n/a (missing data)"
        return (f"{value:.2f}x  (target <= {limit:.1f}x)  {'PASS' if value <= limit else 'MISS'}"
                f"   [min-based {ratio_min(a, b):.2f}x]")

    for rule in RULES:
        ref = refs[rule]
        a = results.get(f"{rule}:gx_adapter")
        c = results.get(f"{rule}:gx_compiled")
        co = results.get(f"{rule}:gx_compiled_owned")
        ag = results.get(f"{rule}:gx_adapter_generic")
        if a is not None or ref["foreach"] is not None:
            print(f"  [{rule:10s}] adapter  / torch foreach : {verdict(a, ref['foreach'], TARGET_ADAPTER_VS_FOREACH)}")
        if ag is not None:
            print(f"  [{rule:10s}] adapter fused=False / torch foreach : "
                  f"{verdict(ag, ref['foreach'], TARGET_ADAPTER_VS_FOREACH)}")
        if c is not None or ref["fused"] is not None:
            print(f"  [{rule:10s}] compiled / torch fused   : {verdict(c, ref['fused'], TARGET_COMPILED_VS_FUSED)}")
        if co is not None:
            print(f"  [{rule:10s}] compiled, owned buffers / torch fused : "
                  f"{verdict(co, ref['fused'], TARGET_COMPILED_VS_FUSED)}")
        torch_refs = [r for r in (ref["foreach"], ref["fused"]) if r]
        if torch_refs:
            t = min(torch_refs, key=lambda r: r["state_bytes"])
            for impl in ("gx_adapter", "gx_eager", "gx_compiled", "gx_compiled_owned"):
                r = results.get(f"{rule}:{impl}")
                if r and "error" not in r:
                    diff = r["state_bytes"] - t["state_bytes"]
                    big, t_big = r["state_bytes"] - r["state_small_bytes"], t["state_bytes"] - t["state_small_bytes"]
                    print(f"  [{rule:10s}] state {impl:11s}     : {r['state_bytes']:,} B vs torch.optim {t['state_bytes']:,} B "
                          f"({diff:+,} B)  {'PASS' if diff <= 0 else 'MISS'}   [buffers {big:,} vs {t_big:,} B; "
                          f"counts/scalars {r['state_small_bytes']:,} vs {t['state_small_bytes']:,} B]")
    print("(PASS/MISS use the median ratio; the min-based ratio is less sensitive to a busy machine.\n"
          " Informational: nothing is asserted. Re-run on a quiet machine before drawing conclusions.)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "n_params": n_params, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
