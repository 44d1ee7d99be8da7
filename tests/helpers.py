"""Shared test utilities: a small MLP with real gradients, and tree comparisons."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import functional_call, grad

import gradxform as gx


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).to(dtype)


def make_data(seed: int = 1, dtype: torch.dtype = torch.float64, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sign: float = 1.0) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return sign * torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def run_functional(tx: gx.GradientTransformation, steps: int, seed: int = 0, sign: float = 1.0,
                   **extra: Any) -> dict[str, torch.Tensor]:
    """Train the MLP with ``tx`` through the functional API; the batch changes every step.

    ``sign=-1`` makes the objective the negative loss (a ``maximize=True`` optimiser then still
    descends the loss, so the run stays stable and comparable over many steps)."""
    model = make_mlp(seed)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for t in range(steps):
        x, y = make_data(seed=100 + t)
        g = grad(loss_of(model, x, y, sign))(params)
        updates, state = tx.update(g, state, params, **extra)
        params = gx.apply_updates(params, updates)
    return params


def run_torch(make_opt: Callable[[Any], torch.optim.Optimizer], steps: int, seed: int = 0,
              make_sched: Callable[[torch.optim.Optimizer], Any] | None = None, sign: float = 1.0) -> dict[str, torch.Tensor]:
    """The same training loop with a torch.optim optimizer (``make_opt(model.parameters())``)."""
    model = make_mlp(seed)
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    for t in range(steps):
        x, y = make_data(seed=100 + t)
        opt.zero_grad()
        (sign * torch.nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 1e-12) -> None:
    la, sa = gx.tree.tree_flatten(a)
    lb, sb = gx.tree.tree_flatten(b)
    assert sa == sb, f"structures differ: {sa} vs {sb}"
    for path, x, y in zip(gx.tree.tree_paths(a), la, lb):
        if x is None or y is None:
            assert x is None and y is None, path
            continue
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"at {path}: {m}")  # noqa: B023 (called at once)


def assert_trees_equal(a: Any, b: Any) -> None:
    la, sa = gx.tree.tree_flatten(a)
    lb, sb = gx.tree.tree_flatten(b)
    assert sa == sb
    for path, x, y in zip(gx.tree.tree_paths(a), la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), f"differs at {path}"
        else:
            assert x == y, f"differs at {path}"


def state_buffers(state: Any, params: Any) -> list[torch.Tensor]:
    """The params-shaped tensor leaves of a state (moments, traces, accumulators): those with at
    least one dim whose shape is one of the params'."""
    shapes = {tuple(p.shape) for p in gx.tree.tree_flatten(params)[0] if isinstance(p, torch.Tensor)}
    return [x for x in gx.tree.tree_flatten(state)[0] if isinstance(x, torch.Tensor) and x.ndim > 0
            and tuple(x.shape) in shapes]


def snapshot(tree: Any) -> Any:
    """A deep copy of the tensor leaves, to check later that nothing was mutated."""
    return gx.tree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def assert_unchanged(before: Any, after: Any, what: str) -> None:
    """Every tensor leaf of ``after`` equals the snapshot ``before`` (same structure too)."""
    lb, sb = gx.tree.tree_flatten(before)
    la, sa = gx.tree.tree_flatten(after)
    assert sb == sa, f"{what}: structure changed"
    for path, x, y in zip(gx.tree.tree_paths(before), lb, la):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what} was modified at {path}"


def eager_and_compiled(tx: gx.GradientTransformation, params: Any, grads: list[Any]) -> tuple[list, list, int]:
    """Run ``update`` + ``apply_updates`` over ``grads`` eagerly and under
    ``torch.compile(fullgraph=True)`` (a counting backend, after ``torch._dynamo.reset()``).

    Returns the per-step ``(params, state)`` histories of both runs and the number of frames
    compiled (1 means no recompilation)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def step(p: Any, g: Any, s: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return gx.apply_updates(p, updates), s

    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    histories = []
    for fn in (step, compiled):
        p, s, hist = params, tx.init(params), []
        for g in grads:
            p, s = fn(p, g, s)
            hist.append((p, s))
        histories.append(hist)
    return histories[0], histories[1], counter.frame_count


# --- torch.distributed: run a function on N gloo ranks ---------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, fn: Callable[[int, int], Any]) -> None:
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[int, int], Any], world: int, tmp: Any, timeout_s: float = 120.0) -> list[Any]:
    """Start ``world`` CPU processes (``torch.multiprocessing`` spawn, gloo, ``file://`` rendezvous
    in the folder ``tmp``), run ``fn(rank, world)`` in each and return what each returned (saved
    with ``torch.save``). ``fn`` must be a module-level function (spawn imports it by name)."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank_main, args=(world, str(tmp / "rendezvous"), str(tmp), fn), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} gloo ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:  # only the processes spawned here
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def needs(feature: str) -> Any:
    """Skip a test on a torch without ``feature`` (a key of ``gradxform._compat.FEATURES``), with
    the reason naming the torch it needs. tests/test_support_matrix.py checks that every reason
    used is a row of the docs' support matrix."""
    import pytest

    from gradxform import _compat

    return pytest.mark.skipif(not _compat.FEATURES[feature].available(), reason=_compat.requirement(feature))


def once_per_run(tmp_path_factory: Any, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per test run, even when pytest-xdist runs the module on several
    workers: the first worker to get here computes it (holding a file lock) and saves it with
    ``torch.save`` in the run's shared base folder; the others wait for the lock and load it.
    For module fixtures that start process groups (a minute of two ranks' CPU each)."""
    import fcntl
    import os

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one run
    path, lock = root / f"{key}.pt", root / f"{key}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if path.exists():
                return torch.load(path, weights_only=False)
            value = compute()
            torch.save(value, path)
            return value
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
