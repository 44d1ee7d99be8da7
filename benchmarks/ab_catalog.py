"""Old code against new code in one process: rows of ``catalog_optax.py`` stepped in turn.

What it measures
----------------
On a shared machine the time of one step moves by up to 2x from minute to minute, so two runs
of ``catalog_optax.py`` (one per version) cannot show a 20% change. Here both versions live in
one process: ``--old`` names a checkout of an earlier commit (``git worktree add /tmp/old
<commit>``); its ``gradxform`` is copied under the name ``gradxform_old`` and
``catalog_optax.py``'s rows are built once with each package. For each row, three optimizers on
their own copies of the params (the new one, the old one, torch's foreach AdamW) step in turn:
``--rounds`` rounds, the order of old and new swapped every round, each optimizer timed as the
fastest of ``--steps`` steps on the thread clock (the time the process waits for a core is left
out). The table gives the median over rounds and the ratios ``new/old``, ``new/adamw`` and
``old/adamw``. A row's budget in ``catalog_optax.py`` is ``adamw * max(buffers, 1) / 2``.

Usage::

    git worktree add /tmp/old HEAD~3
    python benchmarks/ab_catalog.py --old /tmp/old --only lars,fromage,optimistic_adam
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import catalog_optax as new_rows  # noqa: E402
from catalog import clone_params, make_params  # noqa: E402


def old_rows(checkout: Path) -> ModuleType:
    """``catalog_optax.py`` (this one) with ``gx`` bound to the checkout's gradxform."""
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(checkout / "gradxform", tmp / "gradxform_old")
    sys.path.insert(0, str(tmp))
    old = importlib.import_module("gradxform_old")
    saved = sys.modules["gradxform"]
    sys.modules["gradxform"] = old  # the rows' `import gradxform as gx` picks the old package
    try:
        spec = importlib.util.spec_from_file_location("catalog_optax_old", HERE / "catalog_optax.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.modules["gradxform"] = saved
    return module


def fastest_ms(opt: torch.optim.Optimizer, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.thread_time()
        opt.step()
        times.append(time.thread_time() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the earlier commit")
    ap.add_argument("--only", required=True, help="comma-separated rows of catalog_optax.py")
    ap.add_argument("--params-millions", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = old_rows(args.old)
    base = make_params(args.params_millions)
    print(f"# {sum(p.numel() for p in base) / 1e6:.1f}M float32 params, 1 thread, thread clock, torch "
          f"{torch.__version__}; {args.rounds} rounds of the fastest of {args.steps} steps, median over rounds")
    print(f"{'row':30s} {'new ms':>8s} {'old ms':>8s} {'adamw ms':>9s} {'new/old':>8s} {'new/adamw':>10s} {'old/adamw':>10s}")
    for name in args.only.split(","):
        opts = {"new": new_rows.ROWS[name](clone_params(base)), "old": old.ROWS[name](clone_params(base)),
                "adamw": torch.optim.AdamW(clone_params(base), lr=1e-3, foreach=True)}
        for opt in opts.values():
            opt.step()
        times: dict[str, list[float]] = {k: [] for k in opts}
        for r in range(args.rounds):
            for k in (["new", "old"] if r % 2 == 0 else ["old", "new"]) + ["adamw"]:
                times[k].append(fastest_ms(opts[k], args.steps))
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:30s} {m['new']:8.1f} {m['old']:8.1f} {m['adamw']:9.1f} {m['new'] / m['old']:8.2f} "
              f"{m['new'] / m['adamw']:10.2f} {m['old'] / m['adamw']:10.2f}")
        del opts


if __name__ == "__main__":
    main()
