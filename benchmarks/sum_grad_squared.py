"""Time and memory of the gradient plus ``sum_grad_squared``: gradxform against BackPACK, truegrad, vmap.

What it measures
----------------
One training-step backward on a fixed float32 CPU model and batch, computing the gradient of a
mean cross-entropy loss and, except for the baseline, ``sum_grad_squared``: per parameter, the
sum over the batch of the squared per-example contributions to the gradient (BackPACK's
``SumGradSquared`` convention: for ``L = mean_n l_n``, ``S = sum_n (grad l_n / N)^2``).

Models (``--models``, default all three; ``--quick`` shrinks every width and batch):

- ``mlp``          Linear 784-1024-1024-10 with ReLU, batch 128
- ``cnn``          Conv2d 3->32 k3 p1, ReLU, MaxPool2, Conv2d 32->64 k3 p1, ReLU, MaxPool2,
                   Flatten, Linear 4096->10 on 3x32x32 images, batch 128
- ``transformer``  token ids (vocab 256) -> Embedding(d=128) -> pre-LN block: x + MHA(LN(x))
                   with nn.MultiheadAttention(128, 4 heads, batch_first=True), x + MLP(LN(x))
                   with Linear 128-512, GELU, Linear 512-128 over the sequence dim -> mean over
                   the sequence -> Linear head (10 classes); batch 32, seq 64

Methods (rows), all on the same weights and batch, measured in the same run:

- ``plain``       ``F.cross_entropy(model(x), y).backward()`` (the gradient only): the 1.0 line
- ``gx_engine``   ``eng = gx.grad_and_sum_grad_squared(loss_fn)``, ``eng(params, (x, y))`` with
                  ``loss_fn(params, batch) = F.cross_entropy(functional_call(model, params,
                  (batch[0],)), batch[1])``; returns ``.grads`` and ``.sum_grad_squared``.
                  Params without a fast rule (the transformer's attention) take its exact
                  chunked ``vmap(grad)`` fallback; ``.methods`` is summarised under the table.
                  This is "ours" in the summary lines.
- ``gx_track``    ``with gx.track_sum_grad_squared(model) as st: loss.backward()``, then reading
                  ``st.sum_grad_squared`` (building the tracker and the read are timed). For the
                  transformer ``missing="none"``, so that params without a fast rule there are
                  left out instead of raising (the paths line under the table lists them; with
                  torch 2.x nn.MultiheadAttention's self-attention runs its projections through
                  ``F.linear``, so all its params are in fact on the fast path).
- ``backpack``    ``backpack.extend`` of a copy of the model and of ``nn.CrossEntropyLoss()``,
                  ``with backpack(SumGradSquared()): loss.backward()``. Where BackPACK cannot
                  handle the model the row says "unsupported" with the exception type.
- ``truegrad``    the same architecture built from ``truegrad.nn`` modules (Linear, Conv2d,
                  LayerNorm, Embedding), same weights; its backward fills ``p.sum_grad_squared``
                  (reset to ``None`` before each call: truegrad accumulates into it).
                  "unsupported" where truegrad.nn lacks a layer (it has no MultiheadAttention).
- ``naive``       ``torch.func.vmap(torch.func.grad(per_example_loss))`` over the batch, then
                  the mean (the gradient) and ``sum((g / N)^2)``. Holds batch x params floats
                  (~950 MiB for the MLP); ``--skip-naive`` leaves it out. (torch has no batching
                  rule for CPU flash attention: on the transformer vmap falls back to a loop.)

Time: each model's rows are built, each gets ``--warmup`` untimed calls, then ``--repeats``
*interleaved* rounds (round r calls every row once, in a rotated order, so that a load spike
hits all rows alike). One call = everything above, timed with ``time.perf_counter`` (CPU ops are
synchronous). The table shows the median and min per call and the median ratio to ``plain``
(``/plain``) and to ``backpack`` (``/bp``), both from the same rounds.

Memory: each (model, method) runs once more in a fresh interpreter (``--child``, same seeds).
That process builds the model and the method, makes one warm-up call (lazy initialisation),
drops its outputs (grads, statistics), resets the peak-RSS counter (``/proc/self/clear_refs``),
then makes the measured call while keeping its outputs. ``peak MiB`` = peak RSS after the call
minus RSS before it: the gradient, the statistic and every temporary of the call. Peak RSS is
``VmHWM`` of ``/proc/self/status`` (what ``clear_refs`` resets), not ``ru_maxrss``: on Linux a
fresh interpreter's ``ru_maxrss`` starts at the RSS of the process that forked it (here ~100+ MiB
with torch loaded) and is never reset, so it hides every peak below that. The
children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that large tensors are mmapped and
handed back to the OS when freed (otherwise glibc's adaptive threshold keeps the warm-up's
freed memory resident and hides the measured call's peak). ``xparams`` = (peak - plain's
peak) / parameter MiB; the target "peak <= plain + 2x params" is ``xparams <= 2``. Where the
peak counter cannot be reset, the warm-up is skipped and the first call is measured (marked
``*``).

Correctness, inside the run: ``err`` = max over params of max|S - S_ref| / max|S_ref|, with
``S_ref`` from BackPACK where it supports the model, else from the naive vmap, else from
``gx.grad_and_sum_grad_squared(loss_fn, fast=False)`` (the engine's chunked vmap). ``gerr`` is
the same for the gradient against ``plain``'s. truegrad's numbers are printed for information:
its statistic follows its own convention (biases are scaled by the batch size, and conv and
per-position layers sum squares over positions instead of squaring the per-example sums), so
its ``err`` is not an error of truegrad.

Nothing is asserted (the script exits 0 unless it crashes); re-run on a quiet machine before
drawing conclusions.

How to run
----------
::

    python benchmarks/sum_grad_squared.py                        # full: 3 models, 2 warmup + 10 rounds
    python benchmarks/sum_grad_squared.py --quick                # smoke run (< 1 min): tiny models, 2 rounds,
                                                                 # peak memory of the first model only
    python benchmarks/sum_grad_squared.py --models mlp,cnn --repeats 30 --skip-naive
    python benchmarks/sum_grad_squared.py --threads 2 --no-memory

BackPACK (``backpack-for-pytorch``) and truegrad are optional peers and never gradxform
dependencies; when one cannot be imported its rows say "not installed".
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from _report import fmt, ok, ratio, reset_peak_rss  # same directory: helpers shared by the benchmarks

MODELS = ("mlp", "cnn", "transformer")
METHODS = ("plain", "gx_engine", "gx_track", "backpack", "truegrad", "naive")
SEED = 0


# --- sizes -----------------------------------------------------------------------------------------


def sizes(quick: bool) -> dict[str, dict]:
    if quick:
        return {
            "mlp": {"d_in": 784, "hidden": 64, "classes": 10, "batch": 16},
            "cnn": {"c1": 8, "c2": 16, "hw": 16, "classes": 10, "batch": 16},
            "transformer": {"vocab": 64, "d": 32, "heads": 4, "ff": 128, "classes": 10, "batch": 8, "seq": 16},
        }
    return {
        "mlp": {"d_in": 784, "hidden": 1024, "classes": 10, "batch": 128},
        "cnn": {"c1": 32, "c2": 64, "hw": 32, "classes": 10, "batch": 128},
        "transformer": {"vocab": 256, "d": 128, "heads": 4, "ff": 512, "classes": 10, "batch": 32, "seq": 64},
    }


class _Skip(Exception):
    pass


# --- optional peers --------------------------------------------------------------------------------


def peer_status(only: str = "") -> dict[str, tuple[bool, str]]:
    """name -> (importable, header line) for the optional peers (``only``: check just that one)."""
    from importlib.metadata import version

    out = {"backpack": (False, "not checked"), "truegrad": (False, "not checked")}
    if only not in ("", "backpack", "truegrad"):
        return out
    try:
        if only == "truegrad":
            raise _Skip

        import backpack  # noqa: F401
        from backpack.extensions import SumGradSquared  # noqa: F401

        try:
            v = version("backpack-for-pytorch")
        except Exception:  # noqa: BLE001
            v = "?"
        out["backpack"] = (True, f"backpack-for-pytorch {v}")
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001
        out["backpack"] = (False, f"backpack: not installed ({type(e).__name__}: {e})")
    try:
        if only == "backpack":
            raise _Skip
        import truegrad.nn  # noqa: F401

        try:
            v = version("truegrad")
        except Exception:  # noqa: BLE001
            v = "?"
        out["truegrad"] = (True, f"truegrad {v}")
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001
        out["truegrad"] = (False, f"truegrad: not installed ({type(e).__name__}: {e})")
    return out


# --- models ----------------------------------------------------------------------------------------


def _transformer_cls():
    import torch.nn.functional as F
    from torch import nn

    class TinyTransformer(nn.Module):
        """Embedding -> x + MHA(LN(x)) -> x + MLP(LN(x)) -> mean over the sequence -> head."""

        def __init__(self, vocab: int, d: int, heads: int, ff: int, classes: int, lib=None) -> None:
            super().__init__()
            lib = lib or nn
            self.emb = lib.Embedding(vocab, d)
            self.ln1 = lib.LayerNorm(d)
            self.attn = lib.MultiheadAttention(d, heads, batch_first=True)
            self.ln2 = lib.LayerNorm(d)
            self.fc1 = lib.Linear(d, ff)
            self.fc2 = lib.Linear(ff, d)
            self.head = lib.Linear(d, classes)

        def forward(self, ids):
            h = self.emb(ids)
            a = self.ln1(h)
            h = h + self.attn(a, a, a, need_weights=False)[0]
            h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
            return self.head(h.mean(1))

    return TinyTransformer


def build_model(name: str, cfg: dict, lib=None):
    """The model of ``name`` from ``lib`` (``torch.nn`` by default, or ``truegrad.nn``). Raises
    ``AttributeError`` when ``lib`` lacks a layer."""
    from torch import nn

    lib = lib or nn
    if name == "mlp":
        h = cfg["hidden"]
        return nn.Sequential(lib.Linear(cfg["d_in"], h), nn.ReLU(), lib.Linear(h, h), nn.ReLU(),
                             lib.Linear(h, cfg["classes"]))
    if name == "cnn":
        c1, c2, hw = cfg["c1"], cfg["c2"], cfg["hw"]
        return nn.Sequential(lib.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             lib.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), lib.Linear(c2 * (hw // 4) ** 2, cfg["classes"]))
    if name == "transformer":
        if lib is not nn and not hasattr(lib, "MultiheadAttention"):
            raise AttributeError(f"{lib.__name__} has no MultiheadAttention")
        return _transformer_cls()(cfg["vocab"], cfg["d"], cfg["heads"], cfg["ff"], cfg["classes"], lib)
    raise ValueError(name)


def make_setup(name: str, cfg: dict):
    """(model, x, y) from fixed seeds."""
    import torch

    torch.manual_seed(SEED)
    model = build_model(name, cfg).float()
    gen = torch.Generator().manual_seed(SEED + 1)
    n = cfg["batch"]
    if name == "mlp":
        x = torch.randn(n, cfg["d_in"], generator=gen)
    elif name == "cnn":
        x = torch.randn(n, 3, cfg["hw"], cfg["hw"], generator=gen)
    else:
        x = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=gen)
    y = torch.randint(0, cfg["classes"], (n,), generator=gen)
    return model, x, y


def copy_weights(dst, src) -> None:
    """Copy ``src``'s parameters into ``dst`` (same architecture, possibly other module classes)."""
    import torch

    sp, dp = list(src.named_parameters()), list(dst.named_parameters())
    if [tuple(p.shape) for _, p in sp] != [tuple(p.shape) for _, p in dp]:
        raise RuntimeError("parameter shapes differ between the torch.nn and the peer model")
    with torch.no_grad():
        for (_, d), (_, s) in zip(dp, sp):
            d.copy_(s)


# --- one method ------------------------------------------------------------------------------------


class Unsupported(Exception):
    pass


class Runner:
    """One method on one model: ``call()`` (timed), ``sgs()`` / ``grads()`` (name -> tensor, after a
    call), ``release()`` (drop the outputs of the last call)."""

    def __init__(self, method: str, name: str, model, x, y, peers: dict) -> None:
        import torch.nn.functional as F
        from torch import nn

        self.method, self.name, self.x, self.y = method, name, x, y
        self.n = x.shape[0]
        self.names = [k for k, _ in model.named_parameters()]
        self.out = None
        self.times: list[float] = []
        self.warm: list[float] = []
        self.methods_info: dict[str, str] | None = None
        if method in ("backpack", "truegrad") and not peers[method][0]:
            raise Unsupported("not installed")

        if method == "plain":
            self.model = model
            self.params = list(model.parameters())

            def call():
                for p in self.params:
                    p.grad = None
                F.cross_entropy(self.model(x), y).backward()
        elif method == "gx_engine":
            from torch.func import functional_call

            import gradxform as gx

            def loss_fn(params, batch):
                return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

            eng = gx.grad_and_sum_grad_squared(loss_fn)
            self.pdict = {k: p.detach() for k, p in model.named_parameters()}

            def call():
                self.out = None
                self.out = eng(self.pdict, (x, y))
        elif method == "gx_track":
            import gradxform as gx

            self.model = model
            self.params = list(model.parameters())
            missing = "none" if name == "transformer" else "raise"

            def call():
                self.out = None
                for p in self.params:
                    p.grad = None
                with gx.track_sum_grad_squared(self.model, missing=missing) as st:
                    F.cross_entropy(self.model(x), y).backward()
                self.out = (st.sum_grad_squared, st)
        elif method == "backpack":
            import backpack
            from backpack.extensions import SumGradSquared

            self.model = backpack.extend(copy.deepcopy(model))
            lossf = backpack.extend(nn.CrossEntropyLoss())
            self.params = list(self.model.parameters())

            def call():
                for p in self.params:
                    p.grad = None
                    p.sum_grad_squared = None
                with backpack.backpack(SumGradSquared()):
                    lossf(self.model(x), y).backward()
        elif method == "truegrad":
            import truegrad.nn as tnn

            try:
                self.model = build_model(name, self._cfg_of(model), lib=tnn)
            except AttributeError as e:
                raise Unsupported(f"unsupported (truegrad.nn: {e})") from None
            copy_weights(self.model, model)
            self.names = [k for k, _ in self.model.named_parameters()]
            self.params = list(self.model.parameters())

            def call():
                for p in self.params:
                    p.grad = None
                    p.sum_grad_squared = None  # truegrad adds to an existing one
                F.cross_entropy(self.model(x), y).backward()
        elif method == "naive":
            from torch.func import functional_call, grad, vmap

            pdict = {k: p.detach() for k, p in model.named_parameters()}

            def per_example_loss(params, xi, yi):
                return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

            per_ex = vmap(grad(per_example_loss), in_dims=(None, 0, 0))
            n = self.n

            def call():
                self.out = None
                g = per_ex(pdict, x, y)
                self.out = ({k: v.mean(0) for k, v in g.items()},
                            {k: v.div(n).square_().sum(0) for k, v in g.items()})
                del g
        else:
            raise ValueError(method)
        self.call = call

    @staticmethod
    def _cfg_of(model) -> dict:
        return model._bench_cfg

    def release(self) -> None:
        self.out = None
        for p in getattr(self, "params", []):
            p.grad = None
            if self.method in ("backpack", "truegrad"):
                p.sum_grad_squared = None
        gc.collect()

    def grads(self) -> dict:
        if self.method == "gx_engine":
            return dict(self.out.grads)
        if self.method == "naive":
            return self.out[0]
        return {k: p.grad for k, p in zip(self.names, self.params)}

    def sgs(self) -> dict:
        if self.method == "gx_engine":
            self.methods_info = dict(self.out.methods)
            return dict(self.out.sum_grad_squared)
        if self.method == "gx_track":
            s, st = self.out
            self.methods_info = dict(st.methods)
            return {k: s.get(p) for k, p in zip(self.names, self.params)}
        if self.method == "naive":
            return self.out[1]
        if self.method in ("backpack", "truegrad"):
            return {k: getattr(p, "sum_grad_squared", None) for k, p in zip(self.names, self.params)}
        return {}


def make_runner(method: str, name: str, model, x, y, peers: dict) -> Runner:
    """Build a runner and make one call; ``Unsupported`` (with the reason) when the method cannot
    handle the model."""
    try:
        r = Runner(method, name, model, x, y, peers)
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001
        raise Unsupported(f"unsupported ({type(e).__name__}: {_first_line(e)})") from None
    import re
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            r.call()
            r.warm.append(time.perf_counter() - t0)
        if method in ("backpack", "truegrad"):
            missing = [k for k, v in r.sgs().items() if v is None]
            if missing:
                # BackPACK only warns about modules it has no extension for, and leaves their params without one
                no_ext = sorted({m.group(1).rsplit(".", 1)[-1] for w in caught
                                 if (m := re.search(r"no(?:t have an)? extension for Module <class '([^']+)'>",
                                                    str(w.message)))})
                raise Unsupported(f"unsupported ({len(missing)} params without sum_grad_squared, e.g. {missing[:2]}"
                                  + (f"; no SumGradSquared extension for {', '.join(no_ext)})" if no_ext else ")"))
    except Unsupported:
        r.release()
        raise
    except Exception as e:  # noqa: BLE001
        r.release()
        raise Unsupported(f"unsupported ({type(e).__name__}: {_first_line(e)})") from None
    return r


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:140]


def setup(name: str, cfg: dict):
    model, x, y = make_setup(name, cfg)
    model._bench_cfg = cfg
    return model, x, y


# --- memory (child process) ------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_kb() -> int:
    v = _status_kb("VmRSS")
    return v if v is not None else max_rss_kb()


def max_rss_kb() -> int:
    """Peak RSS of this process in KiB: ``VmHWM`` (reset by `reset_peak_rss`), else ``ru_maxrss``.

    Not ``ru_maxrss`` first: on Linux a fresh interpreter's ``ru_maxrss`` starts at the RSS of
    the process that forked it (the parent, with torch loaded: ~100 MiB) and clear_refs does not
    reset it, so it would hide any call whose peak stays below that."""
    v = _status_kb("VmHWM")
    if v is not None:
        return v
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def run_child(key: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    name, method = key.split(":")
    cfg = sizes(args.quick)[name]
    peers = peer_status(only=method)
    model, x, y = setup(name, cfg)
    can_reset = reset_peak_rss()
    try:
        r = Runner(method, name, model, x, y, peers)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {_first_line(e)}"}
    try:
        if can_reset:
            r.call()  # warm-up: lazy initialisation, BackPACK / vmap setup
            r.release()
            reset_peak_rss()
        base = current_rss_kb() if can_reset else max_rss_kb()
        r.call()
        peak = max_rss_kb()
        r.sgs()  # reading the statistic stays inside the measured region for every method
        peak = max(peak, max_rss_kb())
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {_first_line(e)}"}
    return {"peak_mib": (peak - base) / 1024, "reset": can_reset}


def run_child_subprocess(key: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# --- timing + correctness (main process) -----------------------------------------------------------


def rel_err(a: dict, b: dict, keys=None) -> float | None:
    """max over params of max|a - b| / max|b| (params missing from either side are skipped)."""
    worst = None
    for k in keys or b:
        u, v = a.get(k), b.get(k)
        if u is None or v is None:
            continue
        den = float(v.abs().max()) or 1.0
        e = float((u.double() - v.double()).abs().max()) / den
        worst = e if worst is None else max(worst, e)
    return worst


def bench_model(name: str, cfg: dict, methods: list[str], peers: dict, args) -> dict:
    import torch.nn.functional as F

    model, x, y = setup(name, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    res: dict = {"n_params": n_params, "param_mib": n_params * 4 / 2**20, "rows": {}, "notes": []}
    runners: list[Runner] = []
    for m in methods:
        print(f"  [{name}] building + warming up {m:10s}", end=" ", flush=True)
        try:
            r = make_runner(m, name, model, x, y, peers)
        except Unsupported as e:
            res["rows"][m] = {"error": str(e)}
            print(str(e), flush=True)
            continue
        for _ in range(max(1, args.warmup) - 1):
            t0 = time.perf_counter()
            r.call()
            r.warm.append(time.perf_counter() - t0)
        runners.append(r)
        print(f"first call {r.warm[0] * 1e3:.0f} ms", flush=True)

    for rnd in range(args.repeats):
        k = rnd % max(1, len(runners))
        for r in runners[k:] + runners[:k]:
            t0 = time.perf_counter()
            r.call()
            r.times.append(time.perf_counter() - t0)

    # Correctness: one more (untimed) call of each, compared against the reference.
    by = {r.method: r for r in runners}
    for r in runners:
        r.call()
    ref_sgs, ref_name = None, None
    if "backpack" in by:
        ref_sgs, ref_name = by["backpack"].sgs(), "BackPACK"
    elif "naive" in by:
        ref_sgs, ref_name = by["naive"].sgs(), "naive vmap"
    else:
        from torch.func import functional_call

        import gradxform as gx

        def loss_fn(params, batch):
            return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

        ref = gx.grad_and_sum_grad_squared(loss_fn, fast=False)({k: p.detach() for k, p in model.named_parameters()},
                                                                (x, y))
        ref_sgs, ref_name = dict(ref.sum_grad_squared), "gx fast=False (chunked vmap)"
    ref_grads = by["plain"].grads() if "plain" in by else None
    res["ref"] = ref_name
    for r in runners:
        ts = sorted(r.times)
        row = {"median_ms": statistics.median(ts) * 1e3, "min_ms": ts[0] * 1e3, "first_ms": r.warm[0] * 1e3}
        if r.method != "plain":
            s = r.sgs()
            if r.method == "truegrad":  # truegrad's names may differ; align by position
                s = dict(zip(by["plain"].names if "plain" in by else r.names, s.values()))
            row["err"] = rel_err(s, ref_sgs) if r.method != "backpack" or ref_name != "BackPACK" else 0.0
            row["n_sgs"] = sum(v is not None for v in s.values())
        if ref_grads is not None and r.method != "plain":
            g = r.grads()
            if r.method == "truegrad":
                g = dict(zip(by["plain"].names, g.values()))
            row["gerr"] = rel_err(g, ref_grads)
        if r.methods_info is not None:
            counts: dict[str, int] = {}
            for v in r.methods_info.values():
                key = v.split(":")[0] if not v.startswith("fast") else v
                counts[key] = counts.get(key, 0) + 1
            row["methods"] = counts
            slow = {k: v for k, v in r.methods_info.items() if not v.startswith("fast")}
            if slow:
                row["not_fast"] = slow
        res["rows"][r.method] = row
    for r in runners:
        r.release()
    del runners, by
    gc.collect()
    return res


# --- the driver ------------------------------------------------------------------------------------


def print_model(name: str, cfg: dict, res: dict, mem: dict, args) -> None:
    rows = res["rows"]
    plain, bp = rows.get("plain"), rows.get("backpack")
    pm = res["param_mib"]
    mem_plain = mem.get("plain") or {}
    print(f"== {name}: {cfg}  ({res['n_params'] / 1e6:.3f}M params, {pm:.1f} MiB); S reference: {res.get('ref')}")
    hdr = (f"{'method':10s} {'median ms':>9s} {'min ms':>8s} {'/plain':>7s} {'/bp':>6s} {'peak MiB':>9s} "
           f"{'xparams':>7s} {'err':>8s} {'gerr':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for m in METHODS:
        if m not in rows:
            continue
        r = rows[m]
        if "error" in r:
            print(f"{m:10s} {r['error']}")
            continue
        mm = mem.get(m) or {}
        peak = mm.get("peak_mib")
        xp = None
        if peak is not None and mem_plain.get("peak_mib") is not None and m != "plain" and pm > 0:
            xp = (peak - mem_plain["peak_mib"]) / pm
        peak_s = "-" if peak is None else f"{peak:.1f}" + ("" if mm.get("reset", True) else "*")
        if "error" in mm:
            peak_s = "err"
        print(f"{m:10s} {r['median_ms']:9.2f} {r['min_ms']:8.2f} {fmt(ratio(r, plain)):>7s} {fmt(ratio(r, bp)):>6s} "
              f"{peak_s:>9s} {fmt(xp):>7s} {fmt(r.get('err'), '.1e'):>8s} {fmt(r.get('gerr'), '.1e'):>8s}")
    for m in ("gx_engine", "gx_track"):
        r = ok(rows.get(m))
        if r and "methods" in r:
            print(f"  {m} paths: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["methods"].items())))
            for k, v in list(r.get("not_fast", {}).items())[:4]:
                print(f"    {k}: {v[:110]}")
    for m, mm in mem.items():
        if "error" in mm:
            print(f"  memory child {m}: ERROR {mm['error'][:200]}")
    if ok(rows.get("truegrad")):
        print("  (truegrad err: its own convention -- biases x batch size, conv / per-position layers sum squares "
              "over positions)")
    trk_row = ok(rows.get("gx_track"))
    if trk_row and trk_row.get("not_fast"):
        print(f"  (gx_track: missing='none': {len(trk_row['not_fast'])} params left out; err over the params it returns)")
    eng = ok(rows.get("gx_engine"))
    trk = ok(rows.get("gx_track"))
    line = f"[{name}] ours / plain = {fmt(ratio(eng, plain))}, ours / BackPACK = {fmt(ratio(eng, bp))}"
    if not ok(bp):
        line += " (BackPACK " + ((bp or {}).get("error", "not run").split(" (")[0]) + ")"
    if trk:
        line += f"   [tracker: {fmt(ratio(trk, plain))} / {fmt(ratio(trk, bp))}]"
    em, mp = (mem.get("gx_engine") or {}).get("peak_mib"), mem_plain.get("peak_mib")
    if em is not None and mp is not None:
        line += f"   [engine peak {em:.1f} MiB vs plain + 2x params = {mp + 2 * pm:.1f} MiB: " \
                f"{'PASS' if em <= mp + 2 * pm else 'MISS'}]"
    print(line)
    print()


def quiet_warnings() -> None:
    """Silence the peers' expected per-call warnings (each is explained in the module docstring)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have an extension for Module.*")  # BackPACK, unsupported layer
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing when gradients are computed.*")  # BackPACK
    warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*")  # vmap over CPU attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per row first (default 2; >= 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny models and batches, 1 warmup + 2 rounds, peak memory of the first model only")
    ap.add_argument("--skip-naive", action="store_true", help="leave out the vmap(grad) row (batch x params memory)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-(model, method) peak-memory subprocesses")
    ap.add_argument("--jobs", type=int, default=0,
                    help="memory subprocesses run at once (default 1; 2 with --quick); they run after the timing")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per memory subprocess (default 600)")
    ap.add_argument("--json", default="", help="also write the raw results to this file")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: MODEL:METHOD peak memory
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup = 2, 1
    args.warmup = max(1, args.warmup)
    quiet_warnings()

    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args)), flush=True)
        return

    import torch

    import gradxform as gx

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; expected some of {MODELS}")
    methods = [m for m in METHODS if not (args.skip_naive and m == "naive")]
    peers = peer_status()
    cfgs = sizes(args.quick)
    print(f"gradxform sum_grad_squared benchmark{' (--quick: tiny models)' if args.quick else ''}: "
          f"gradient + sum_grad_squared of a mean cross-entropy, float32 CPU")
    print(f"torch {torch.__version__}, gradxform {gx.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.warmup} warmup + {args.repeats} interleaved rounds per row")
    print("peers: " + "; ".join(msg for _, msg in peers.values()))
    print(flush=True)

    t_start = time.perf_counter()
    results = {}
    for name in models:
        results[name] = bench_model(name, cfgs[name], methods, peers, args)
    mems: dict[str, dict] = {name: {} for name in models}
    if not args.no_memory:
        from concurrent.futures import ThreadPoolExecutor

        # --quick: one model's subprocesses only (a fresh interpreter costs ~2 s, and the tiny
        # models' peaks are page-size noise anyway); the full run measures every (model, method).
        mem_models = models[:1] if args.quick else models
        keys = [(name, m) for name in mem_models for m in methods if ok(results[name]["rows"].get(m))]
        jobs = args.jobs or (2 if args.quick else 1)
        print(f"  peak memory: {len(keys)} fresh subprocesses ({jobs} at a time)"
              + (f"; --quick: {mem_models[0]} only" if args.quick else ""), flush=True)
        with ThreadPoolExecutor(max_workers=jobs) as ex:
            outs = list(ex.map(lambda k: run_child_subprocess(f"{k[0]}:{k[1]}", args), keys))
        for (name, m), out in zip(keys, outs):
            mems[name][m] = out
    print(f"  total {time.perf_counter() - t_start:.0f} s\n")

    print("columns: median / min ms per call over the interleaved rounds; /plain, /bp = median ratio to plain /\n"
          "  BackPACK (< 1: faster); peak MiB = peak RSS increase of one call in a fresh process (* = first call,\n"
          "  no warm-up); xparams = (peak - plain's peak) / param MiB, target <= 2; err = max rel. error of\n"
          "  sum_grad_squared vs the reference; gerr = of the gradient vs plain's.\n")
    for name in models:
        print_model(name, cfgs[name], results[name], mems[name], args)
    print("(Informational: nothing is asserted. Re-run on a quiet machine before drawing conclusions.)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "memory": mems}, f, indent=1)


if __name__ == "__main__":
    main()
