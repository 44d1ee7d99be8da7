"""Training an ensemble of small MLPs: one vmapped gradxform loop against sequential loops.

What it measures
----------------
Wall time to train ``--models`` (default 16) MLPs 64-64-10 for ``--steps`` (default 200) Adam
steps of batch ``--batch`` (default 128), each model from its own seed, with its own learning rate
(log-spaced 1e-4 .. 1e-2) and its own minibatch stream (index tensor ``(steps, N, B)`` into a
fixed random data set of 1347 x 64 float32 rows with 10 classes, the size of digits' training
split). Rows (whole training runs, forward + backward + optimizer step, float32, CPU):

- ``torch_seq``      N sequential loops, each a standard ``nn.Module`` + ``loss.backward()`` +
                     ``torch.optim.Adam(lr_i)`` (``foreach`` default) ``step()`` / ``zero_grad()``.
- ``gx_seq``         N sequential gradxform functional loops: ``torch.func.grad(loss)`` +
                     ``gx.adam(lr_i)`` ``update`` + ``gx.apply_updates``.
- ``vmap``           ONE loop for all N: params from ``torch.func.stack_module_state``,
                     ``vmap(grad(loss))`` + ``gx.batched(gx.adam(1e-3))`` with per-model lrs from
                     ``gx.set_hyperparam(state, "lr", lrs)`` + ``gx.apply_updates``.
- ``vmap_compiled``  the same step function ``step(params, state, x, y) -> (params, state)`` under
                     ``torch.compile`` (default mode). Compile time (the first call, cold inductor
                     cache unless ``--compile-cache``) is reported apart and not in the time.
- ``vmap_grad_only`` reference: the ``vmap(grad)`` calls of the ``vmap`` row alone (no update):
                     a lower bound for any eager vmapped loop.
- ``einsum_torch``   reference: a hand-batched ensemble (``baddbmm`` over stacked weights, the
                     sum of the N mean losses, one ``backward()``) with ONE ``torch.optim.Adam``
                     over the stacked tensors. One param group, so one lr (1e-3) for all models:
                     not the same computation as the other rows (no ``dev``).

Timing: after one untimed warm-up run of a few steps per row (lazy initialisation: torch.func's
first ``vmap(grad)`` call alone costs ~1 s), the rows run interleaved ``--repeats`` times
(``for r in repeats: for row in rows``); each time is a whole run of ``--steps`` steps for all N
models (``time.perf_counter``; CPU ops are synchronous). Reported: median and min over repeats,
and each row's speed-up over ``torch_seq`` (``torch_seq time / row time``; > 1 is faster).
``dev``: max over models and leaves of ``max|p - p_gx_seq| / max|p_gx_seq|`` of the final params
(the rows compute the same steps up to float32 rounding).

Profile of the vmapped step (``--no-profile`` skips it): median per-step time of its parts over
``--steps`` calls, with the same tensors: ``vmap(grad)``, ``gx.batched(adam).update``,
``gx.apply_updates``; for comparison ``gx.adam.update`` (unbatched, one shared lr) and
``torch.optim.Adam.step`` on the very same stacked ``(N, ...)`` tensors, the batched update with
every leaf shrunk to ``(N, 1)`` (what is left is fixed per-call overhead), and the number of
aten ops one update dispatches (``torch.profiler``).

Target (from the issue): the vmapped loop >= 3x faster than the sequential torch.optim loops.
PASS / MISS is informational; nothing is asserted (the script exits 0 unless it crashes).

How to run
----------
::

    python benchmarks/ensemble.py                 # 16 models x 200 steps, 3 interleaved repeats
    python benchmarks/ensemble.py --quick         # < 1 minute: 50 steps, 1 repeat
    python benchmarks/ensemble.py --no-compile --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import gradxform as gx

TARGET_SPEEDUP = 3.0
N_DATA, D_IN, D_HID, N_CLASSES = 1347, 64, 64, 10


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.ReLU(), nn.Linear(D_HID, N_CLASSES))


class Setup:
    def __init__(self, n_models: int, steps: int, batch: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.X = torch.randn(N_DATA, D_IN, generator=gen)
        self.y = torch.randint(0, N_CLASSES, (N_DATA,), generator=gen)
        self.idx = torch.randint(0, N_DATA, (steps, n_models, batch), generator=gen)
        # Pre-gathered batches: every row gets the same tensors and none times the gather.
        self.xb = self.X[self.idx]  # (steps, N, B, 64)
        self.yb = self.y[self.idx]  # (steps, N, B)
        self.models = [make_model(i) for i in range(n_models)]
        self.base = self.models[0]
        self.lrs = torch.logspace(-4, -2, n_models, dtype=torch.float64)
        self.n, self.steps = n_models, steps

    def loss_fn(self, p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.base, p, (x,)), y)

    def stacked(self) -> dict:
        params, _ = stack_module_state(self.models)
        return {k: v.detach().clone() for k, v in params.items()}


# --- the rows: each returns the final params as a list of N dicts --------------------------------


def run_torch_seq(s: Setup, steps: int) -> list[dict]:
    out = []
    for i, proto in enumerate(s.models):
        model = make_model(i)
        model.load_state_dict(proto.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=s.lrs[i].item())
        for t in range(steps):
            loss = F.cross_entropy(model(s.xb[t, i]), s.yb[t, i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append({k: v.detach() for k, v in model.named_parameters()})
    return out


def run_gx_seq(s: Setup, steps: int) -> list[dict]:
    grad_fn = grad(s.loss_fn)
    out = []
    for i, model in enumerate(s.models):
        p = {k: v.detach().clone() for k, v in model.named_parameters()}
        tx = gx.adam(s.lrs[i].item())
        st = tx.init(p)
        for t in range(steps):
            u, st = tx.update(grad_fn(p, s.xb[t, i], s.yb[t, i]), st, p)
            p = gx.apply_updates(p, u)
        out.append(p)
    return out


def unstack(params: dict, n: int) -> list[dict]:
    return [{k: v[i] for k, v in params.items()} for i in range(n)]


def vmapped_parts(s: Setup):
    grads_fn = vmap(grad(s.loss_fn))
    tx = gx.batched(gx.adam(1e-3))

    def init(params: dict):
        state = gx.set_hyperparam(tx.init(params), "lr", s.lrs)
        # batched init returns the per-model step counts as an expanded (stride-0) tensor; the
        # first update returns a contiguous one, and torch.compile would recompile on the stride.
        return gx.tree.tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, state)

    def step(params: dict, state, x: torch.Tensor, y: torch.Tensor):
        updates, state = tx.update(grads_fn(params, x, y), state, params)
        return gx.apply_updates(params, updates), state

    return grads_fn, tx, init, step


def run_vmap(s: Setup, steps: int, step_fn=None) -> list[dict]:
    _, _, init, step = vmapped_parts(s)
    step_fn = step_fn or step
    params = s.stacked()
    state = init(params)
    for t in range(steps):
        params, state = step_fn(params, state, s.xb[t], s.yb[t])
    return unstack(params, s.n)


def run_vmap_grad_only(s: Setup, steps: int) -> list[dict]:
    grads_fn = vmapped_parts(s)[0]
    params = s.stacked()
    for t in range(steps):
        grads_fn(params, s.xb[t], s.yb[t])
    return unstack(params, s.n)


def run_einsum_torch(s: Setup, steps: int) -> list[dict]:
    sd = s.stacked()
    # nn.Linear keeps (out, in): transpose once so the forward is x @ W.
    w1 = sd["0.weight"].transpose(1, 2).contiguous().requires_grad_()
    b1 = sd["0.bias"].unsqueeze(1).clone().requires_grad_()
    w2 = sd["2.weight"].transpose(1, 2).contiguous().requires_grad_()
    b2 = sd["2.bias"].unsqueeze(1).clone().requires_grad_()
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-3)
    for t in range(steps):
        h = torch.relu(torch.baddbmm(b1, s.xb[t], w1))
        logits = torch.baddbmm(b2, h, w2)  # (N, B, 10)
        # Sum of the N per-model mean losses: each model's gradient is that of its own loss.
        loss = F.cross_entropy(logits.flatten(0, 1), s.yb[t].flatten(), reduction="sum") / s.yb.shape[2]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return []


def max_rel_dev(a: list[dict], ref: list[dict]) -> float | None:
    if not a:
        return None
    return max(((x[k] - r[k]).abs().max() / r[k].abs().max()).item() for x, r in zip(a, ref) for k in r)


# --- profile -------------------------------------------------------------------------------------


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def count_ops(fn) -> int:
    """aten ops one call of ``fn`` dispatches (below vmap's batching: the ops that really run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def profile_vmapped(s: Setup, n: int) -> None:
    grads_fn, tx, init, _ = vmapped_parts(s)
    params = s.stacked()
    state = init(params)
    x, y = s.xb[0], s.yb[0]
    grads = grads_fn(params, x, y)
    updates, _ = tx.update(grads, state, params)
    plain = gx.adam(1e-3)
    plain_state = plain.init(params)
    leaves = [v.clone().requires_grad_() for v in params.values()]
    for leaf, g in zip(leaves, grads.values()):
        leaf.grad = g.clone()
    opt = torch.optim.Adam(leaves, lr=1e-3)
    tiny = {k: torch.zeros(s.n, 1) for k in params}
    tiny_state = init(tiny)
    rows = [
        ("vmap(grad(loss))", lambda: grads_fn(params, x, y)),
        ("gx.batched(adam).update", lambda: tx.update(grads, state, params)),
        ("gx.apply_updates", lambda: gx.apply_updates(params, updates)),
        ("  ref: gx.adam.update, unbatched", lambda: plain.update(grads, plain_state, params)),
        ("  ref: torch.optim.Adam.step", opt.step),
        ("  batched update, (N, 1) leaves", lambda: tx.update(tiny, tiny_state, tiny)),
    ]
    print(f"profile of one vmapped step ({s.n} models, median of {n} calls; 'aten ops': ops one call dispatches)")
    for name, fn in rows:
        ops = count_ops(fn)
        ops_s = f"{ops:6d} aten ops" if ops is not None else ""
        print(f"  {name:34s} {median_ms(fn, n):7.3f} ms   {ops_s}")


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="< 1 minute: 50 steps, 1 repeat")
    ap.add_argument("--no-compile", action="store_true", help="skip the vmap_compiled row")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of the vmapped step")
    ap.add_argument("--compile-cache", default="", help="TORCHINDUCTOR_CACHE_DIR to reuse (default: a fresh one, cold compile)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 50, 1
    torch.set_num_threads(args.threads)
    s = Setup(args.models, args.steps, args.batch)

    print(f"gradxform ensemble benchmark: {args.models} MLPs {D_IN}-{D_HID}-{N_CLASSES}, {args.steps} Adam steps of "
          f"batch {args.batch}, per-model lrs {s.lrs[0]:.0e}..{s.lrs[-1]:.0e}, float32 CPU")
    print(f"gradxform {gx.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, {platform.machine()}; "
          f"{args.repeats} interleaved repeats per row")
    print(flush=True)

    rows = {
        "torch_seq": lambda n: run_torch_seq(s, n),
        "gx_seq": lambda n: run_gx_seq(s, n),
        "vmap": lambda n: run_vmap(s, n),
        "vmap_grad_only": lambda n: run_vmap_grad_only(s, n),
        "einsum_torch": lambda n: run_einsum_torch(s, n),
    }
    compile_note = "skipped (--no-compile)"
    compile_s = None
    if not args.no_compile:
        own_cache = None
        if args.compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.compile_cache
        else:
            own_cache = tempfile.mkdtemp(prefix="gx_bench_ensemble_inductor_")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = own_cache
        step_c = torch.compile(vmapped_parts(s)[3])
        try:
            params = s.stacked()
            state = vmapped_parts(s)[2](params)
            t0 = time.perf_counter()
            params, state = step_c(params, state, s.xb[0], s.yb[0])
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            step_c(params, state, s.xb[1], s.yb[1])
            second = time.perf_counter() - t0
            compile_note = f"compile {compile_s:.1f} s (first call); second call {second * 1e3:.1f} ms"
            if second > 0.5:
                compile_note += " (a recompile?)"
            rows["vmap_compiled"] = lambda n: run_vmap(s, n, step_c)
        except Exception as exc:  # report, keep the other rows
            compile_note = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    # Warm-up (lazy init, allocator), then interleaved repeats.
    for fn in rows.values():
        fn(min(5, args.steps))
    times: dict[str, list[float]] = {k: [] for k in rows}
    finals: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for _ in range(args.repeats):
        for key, fn in rows.items():
            t0 = time.perf_counter()
            finals[key] = fn(args.steps)
            times[key].append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all

    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["torch_seq"]
    header = f"{'row':16s} {'median s':>9s} {'min s':>8s} {'ms/step':>8s} {'speed-up vs torch_seq':>22s} {'dev':>9s}"
    print(header)
    print("-" * len(header))
    for key in rows:
        dev = max_rel_dev(finals[key], finals["gx_seq"]) if key not in ("gx_seq", "vmap_grad_only") else None
        dev_s = f"{dev:9.1e}" if dev is not None else f"{'ref' if key == 'gx_seq' else '-':>9s}"
        print(f"{key:16s} {med[key]:9.3f} {min(times[key]):8.3f} {med[key] / args.steps * 1e3:8.2f} "
              f"{ref / med[key]:21.2f}x {dev_s}")
    print(f"(timed runs {total:.0f} s; ms/step: per step for all {args.models} models)")
    print(f"vmap_compiled: {compile_note}")
    print()
    print("target (from the issue): vmapped loop >= 3x faster than the sequential torch.optim loops")
    for key in ("vmap", "vmap_compiled"):
        if key in med:
            sp = ref / med[key]
            print(f"  {key:14s} {sp:5.2f}x  (min-based {min(times['torch_seq']) / min(times[key]):.2f}x)  "
                  f"{'PASS' if sp >= TARGET_SPEEDUP else 'MISS'}")
    print(f"  for reference: gx_seq {ref / med['gx_seq']:.2f}x, vmap_grad_only {ref / med['vmap_grad_only']:.2f}x, "
          f"einsum_torch {ref / med['einsum_torch']:.2f}x")
    print("(informational; timings on a shared machine are noisy)")
    if not args.no_profile:
        print()
        profile_vmapped(s, n=min(args.steps, 100))


if __name__ == "__main__":
    main()
