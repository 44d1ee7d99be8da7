"""Every public transform on two gloo ranks (CPU) equals the same run in one process.

The ranks are started once (a module fixture). Each holds half of a global batch of a small
model whose params are those of ``tests/test_purity.py`` (``w``, ``b`` and a frozen ``frozen``),
so every entry of that file's ``CASES`` registry (one per public transform) runs here unchanged.
Each case takes 3 steps in four settings:

- ``fsdp``: the model is ``fully_shard``-ed (FSDP2): params, gradients and per-param state are
  ``DTensor`` shards (``w`` split 3/3 rows, ``b`` 2/2, ``frozen`` 2/1), so everything that reduces
  over a leaf or the whole model (global and per-leaf norms, AutoClip's history, grafting norms,
  ``apply_if_finite``'s flag) must reduce across the ranks;
- ``ddp``: the model is wrapped in ``DistributedDataParallel`` (replicated params, averaged
  gradients);

each through the functional route (``tx.update`` + ``gx.apply_updates``, written back into the
module) and through ``gx.Optimizer``. The reference is this process on the whole batch. Params
and every state leaf (gathered with ``full_tensor()``) must agree to rtol 1e-6 (float64), and the
two ranks must hold the same values. A control case runs ``clip_by_global_norm`` on the local
shards: it must *not* match (the comparison can fail).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradxform as gx
from gradxform import _compat
from helpers import assert_trees_close, needs, once_per_run, run_on_ranks
# The original families' cases: the catalog's ~130 more would take the two ranks past the fixture's
# time limit on a 2-core machine; the catalog modules checked theirs on two ranks with their own
# scripts (docs: combinators, contrib), and the DDP/FSDP2 reductions they use are the shared ones.
from test_purity import FAMILY_CASES as CASES

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]

try:  # public from torch 2.6; torch.distributed._composable.fsdp from 2.4
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        fully_shard = None

WORLD = 2
N = 8  # global batch
STEPS = 3
DT = torch.float64
# transforms whose construction names the dict keys "w" / "b" / "frozen" (masks, partitions, a
# per-key scale tree): the functional route covers them; the adapter passes a list of params
BY_KEY = {"masked", "partition", "add_decayed_weights", "scale_by_empirical_init"}
# FSDP2 runs here only where the support matrix says it does (docs/support.md); GX_TRY_FSDP2=1 runs
# the two-rank FSDP2 cases on an older torch anyway, to measure whether the matrix can say less
if not _compat.FEATURES["fsdp2"].available() and not os.environ.get("GX_TRY_FSDP2"):
    fully_shard = None
MODES = ["ddp"] + (["fsdp"] if fully_shard is not None else [])


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 4, generator=g, dtype=DT))
        self.b = nn.Parameter(torch.randn(4, generator=g, dtype=DT))
        self.frozen = nn.Parameter(torch.randn(3, generator=g, dtype=DT), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w + self.b).sum(-1) + (x[:, :3] * self.frozen).sum(-1)


def _batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(N, 6, generator=g, dtype=DT), torch.randn(N, generator=g, dtype=DT)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    return x[rows], y[rows]


def _full(x):
    return x.full_tensor() if gx.tree.is_dtensor(x) else x


def _gathered(tree) -> list:
    return [_full(x) if isinstance(x, torch.Tensor) else x for x in gx.tree.tree_flatten(tree)[0]]


def _wrap(mode: str | None) -> tuple[Tiny, nn.Module]:
    model = Tiny()
    if mode == "fsdp":
        fully_shard(model)
        return model, model
    if mode == "ddp":
        return model, nn.parallel.DistributedDataParallel(model)
    return model, model


def _run_case(make_tx, mode: str | None, route: str, rank: int, world: int, local: bool = False,
              compiled: bool = False) -> dict:
    model, net = _wrap(mode)
    x, y = _batch(rank, world)
    tx = make_tx()

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return gx.apply_updates(params, updates), state

    if compiled:  # the functional step under torch.compile (fullgraph; AOTAutograd, no codegen)
        torch._dynamo.reset()
        step = torch.compile(step, backend="aot_eager", fullgraph=True)
    opt = gx.Optimizer(model.parameters(), tx) if route == "adapter" else None
    view = (lambda p: p.detach().to_local()) if local else (lambda p: p.detach())
    state = None
    for _ in range(STEPS):
        (net(x) - y).pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
            continue
        params = {k: view(p) for k, p in model.named_parameters()}
        grads = {k: None if p.grad is None else view(p.grad) for k, p in model.named_parameters()}
        if state is None:
            state = tx.init(params)
        new, state = step(params, grads, state)
        with torch.no_grad():
            for k, p in model.named_parameters():
                (p.to_local() if local else p).copy_(new[k])
                p.grad = None
    if opt is not None:
        state = opt.tx_state()
    return {"params": {k: _full(p.detach()).clone() for k, p in model.named_parameters()}, "state": _gathered(state)}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def _sgs_functional(rank: int, world: int) -> dict:
    """``grad_and_sum_grad_squared(sync=True)`` on this rank's shard + TG-AdamW, functional."""
    model = _mlp()
    x, y = _batch(rank, world)

    def loss_fn(params, batch):
        xb, yb = batch
        return (torch.func.functional_call(model, params, (xb,)).squeeze(-1) - yb).pow(2).mean()

    engine = gx.grad_and_sum_grad_squared(loss_fn, sync=True)
    tx = gx.tg_adamw(0.05)
    params = {k: p.detach() for k, p in model.named_parameters()}
    own = gx.grad_and_sum_grad_squared(loss_fn)(params, (x, y)).sum_grad_squared  # this rank alone
    state, first = tx.init(params), None
    for _ in range(STEPS):
        res = engine(params, (x, y))
        first = first or res
        updates, state = tx.update(res.grads, state, params, sum_grad_squared=res.sum_grad_squared)
        params = gx.apply_updates(params, updates)
    return {"params": params, "state": _gathered(state), "loss": first.loss, "grads": first.grads,
            "sgs": first.sum_grad_squared, "own": own}


def _sgs_ddp_tracker(rank: int, world: int) -> dict:
    """DDP + ``track_sum_grad_squared`` + ``all_reduce_sum_grad_squared`` + ``gx.Optimizer``."""
    model = _mlp()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    x, y = _batch(rank, world)
    opt = gx.Optimizer(model.parameters(), gx.tg_adamw(0.05))
    first = None
    for _ in range(STEPS):
        with gx.track_sum_grad_squared(model.parameters()) as stats:
            (net(x).squeeze(-1) - y).pow(2).mean().backward()
        sgs = gx.all_reduce_sum_grad_squared(stats.sum_grad_squared, len(x))
        first = first or [sgs[p].clone() for p in model.parameters()]
        opt.step(sum_grad_squared=sgs)
        opt.zero_grad()
    return {"params": {k: p.detach().clone() for k, p in model.named_parameters()},
            "state": _gathered(opt.tx_state()), "sgs": first}


def _resume(rank: int, world: int) -> dict:
    """``torch.distributed.checkpoint`` of a sharded model + ``gx.Optimizer`` after 2 steps, loaded
    into a fresh sharded model and optimizer (``init_state`` makes the template), 2 more steps;
    and the functional state through ``gx.state_to_dict``. Returns both finals and the
    uninterrupted run's."""
    import tempfile

    import torch.distributed.checkpoint as dcp

    box = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    make = lambda: gx.chain(gx.autoclip(0.5, history=3), gx.adamw(0.05))  # noqa: E731
    x, y = _batch(rank, world)

    def run(model, opt, steps):
        for _ in range(steps):
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    straight, _ = _wrap("fsdp")
    opt = gx.Optimizer(straight.parameters(), make())
    run(straight, opt, 4)

    first, _ = _wrap("fsdp")
    opt1 = gx.Optimizer(first.parameters(), make())
    run(first, opt1, 2)
    dcp.save({"model": first.state_dict(), "optim": opt1.state_dict()}, checkpoint_id=f"{box[0]}/adapter")
    second, _ = _wrap("fsdp")
    with torch.no_grad():
        for p in second.parameters():
            p.zero_()  # nothing of the fresh model survives the load
    opt2 = gx.Optimizer(second.parameters(), make())
    opt2.init_state()
    template = {"model": second.state_dict(), "optim": opt2.state_dict()}
    dcp.load(template, checkpoint_id=f"{box[0]}/adapter")
    second.load_state_dict(template["model"])
    opt2.load_state_dict(template["optim"])
    sharded = any(gx.tree.is_dtensor(v) for d in template["optim"]["state"].values() for v in d.values())
    run(second, opt2, 2)

    # functional: a DTensor state through state_to_dict
    tx = make()
    params = {k: p.detach() for k, p in first.named_parameters()}
    grads = {k: torch.ones_like(p) if p.requires_grad else None for k, p in params.items()}
    state = tx.update(grads, tx.init(params), params)[1]
    dcp.save({"opt": gx.state_to_dict(state)}, checkpoint_id=f"{box[0]}/functional")
    loaded = {"opt": gx.state_to_dict(tx.init(params))}
    dcp.load(loaded, checkpoint_id=f"{box[0]}/functional")
    restored = gx.state_from_dict(tx.init(params), loaded["opt"])
    return {"straight": {k: _full(p.detach()).clone() for k, p in straight.named_parameters()},
            "resumed": {k: _full(p.detach()).clone() for k, p in second.named_parameters()},
            "straight_state": _gathered(opt.tx_state()), "resumed_state": _gathered(opt2.tx_state()),
            "sharded": sharded, "functional": _gathered(state), "functional_restored": _gathered(restored)}


def _init_problem(rank: int, world: int, halves: bool):
    """A deep tanh MLP at twice the He std, and 8 draws of a global batch of 16 rows. GradInit
    (``halves``): rank r gets ``cat(S_r, S~_r)`` and one process ``cat(S_0, S_1, S~_0, S~_1)``, so
    that the union of the ranks' first halves is one process's first half; empirical init: rank
    r gets rows ``r::world`` ... as a contiguous block."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(6, 6), nn.Tanh())], nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 2 * (2.0 / m.in_features) ** 0.5)
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(8):
        x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
        blocks = [(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i in range(4)]  # S_0, S_1, S~_0, S~_1
        if world == 1:
            batches.append((x, y))
        elif halves:
            batches.append((torch.cat([blocks[rank][0], blocks[2 + rank][0]]),
                            torch.cat([blocks[rank][1], blocks[2 + rank][1]])))
        else:
            batches.append((x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]))
    return model, {k: p.detach() for k, p in model.named_parameters()}, batches


def _gradinit_sync(rank: int, world: int) -> dict:
    model, params, batches = _init_problem(rank, world, halves=True)
    new, report = gx.gradinit(model, params, batches, nn.functional.cross_entropy, lr=0.1, gamma=3.0, sync=True)
    return {"params": new, "scales": report.scales, "objective": report.objective,
            "branch": report.norm_branch_steps}


def _empirical_sync(rank: int, world: int) -> dict:
    model, params, batches = _init_problem(rank, world, halves=False)
    new, mult, report = gx.empirical_init(model, params, batches, nn.functional.cross_entropy, act_iters=2,
                                          upd_iters=3, generator=torch.Generator().manual_seed(rank), sync=True)
    return {"params": new, "multipliers": mult, "pillar1": report.extra["pillar1"], "pillar3": report.extra["pillar3"]}


def _task_norms_fsdp(rank: int, world: int) -> dict:
    """``gx.task_grad_norms`` at a sharded shared weight and at a shared activation (FSDP2)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).to(DT)
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)]).to(DT)
    if world > 1:
        for m in (trunk, *heads):
            fully_shard(m)
    x, y = _batch(rank, world)
    h = trunk(x)
    losses = torch.stack([(head(h).squeeze(-1) - s * y).pow(2).mean() for s, head in zip((1.0, 3.0, 10.0), heads)])
    return {"weight": gx.task_grad_norms(losses, trunk[2].weight), "activation": gx.task_grad_norms(losses, h)}


def _scenarios(mode: str | None) -> list[tuple[str, str]]:
    return [(name, route) for name in sorted(CASES) for route in ("functional", "adapter")
            if not (route == "adapter" and name in BY_KEY)
            and not (mode == "fsdp" and name == "batched" and not _compat.FEATURES["fsdp2_batched"].available())]


def _run_all(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    modes = MODES if world > 1 else [None]
    for mode in modes:
        for name, route in _scenarios(mode):
            out[(mode, name, route)] = _run_case(CASES[name], mode, route, rank, world)
    out["gradinit"] = _gradinit_sync(rank, world)
    out["empirical"] = _empirical_sync(rank, world)
    out["sgs_functional"] = _sgs_functional(rank, world)
    out["sgs_ddp_tracker"] = _sgs_ddp_tracker(rank, world)
    if fully_shard is not None:
        out["task_norms"] = _task_norms_fsdp(rank, world)
    for name in COMPILED_CASES if _compat.FEATURES["fullgraph_compile"].available() else ():
        mode = "fsdp" if world > 1 and fully_shard is not None else None
        out[("compiled", name)] = _run_case(CASES[name], mode, "functional", rank, world, compiled=True)
    if world > 1 and fully_shard is not None:
        out["resume"] = _resume(rank, world)
        out["local_shards"] = _run_case(lambda: gx.clip_by_global_norm(0.1), "fsdp", "functional", rank, world,
                                        local=True)
    else:
        out["local_shards"] = _run_case(lambda: gx.clip_by_global_norm(0.1), None, "functional", rank, world)
    return out


# compiled on FSDP2's DTensor params: a clip + AdamW chain, SGD, AutoClip, multi_steps
COMPILED_CASES = ("chain", "sgd", "autoclip", "multi_steps")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def compute():
        ranks = run_on_ranks(_run_all, WORLD, tmp_path_factory.mktemp("dist"), timeout_s=300)
        assert not dist.is_initialized()
        return ranks, _run_all(0, 1)

    return once_per_run(tmp_path_factory, "test_distributed", compute)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,route", _scenarios(None))
def test_two_ranks_equal_one_process(results, mode, name, route):
    if (name, route) not in _scenarios(mode):
        pytest.skip(_compat.requirement("fsdp2_batched"))
    ranks, ref = results
    want = ref[(None, name, route)]
    for r in range(WORLD):
        got = ranks[r][(mode, name, route)]
        assert_trees_close(got["params"], want["params"], rtol=1e-6, atol=1e-12)
        assert len(got["state"]) == len(want["state"])
        for i, (a, b) in enumerate(zip(got["state"], want["state"])):
            if isinstance(b, torch.Tensor):
                assert isinstance(a, torch.Tensor) and not gx.tree.is_dtensor(a), f"state leaf {i}"
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=lambda m, i=i: f"state leaf {i}: {m}")
            else:
                assert a == b, f"state leaf {i}"
    # the params moved: the comparison is of a real update
    assert not torch.equal(want["params"]["w"], Tiny().w.detach())


@needs("fullgraph_compile")
@needs("fsdp2")
@pytest.mark.parametrize("name", COMPILED_CASES)
def test_compiled_step_on_fsdp2_params_equals_one_process(results, name):
    """``torch.compile(step, fullgraph=True)`` of the functional step on FSDP2's DTensor params and
    grads (the clip's norm completed across ranks inside the graph): both ranks' params and state
    equal one eager process on the whole batch."""
    ranks, ref = results
    want = ref[(None, name, "functional")]
    for got in [ref[("compiled", name)]] + [ranks[r][("compiled", name)] for r in range(WORLD)]:
        assert_trees_close(got["params"], want["params"], rtol=1e-6, atol=1e-12)
        for i, (a, b) in enumerate(zip(got["state"], want["state"])):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=lambda m, i=i: f"state leaf {i}: {m}")
    assert not torch.equal(want["params"]["w"], Tiny().w.detach())


@needs("fsdp2")
def test_local_shard_norms_would_differ(results):
    """Control: clipping each rank's shard by its own norm is not what one process computes."""
    ranks, ref = results
    got, want = ranks[0]["local_shards"]["params"]["w"], ref["local_shards"]["params"]["w"]
    assert not torch.allclose(got, want, rtol=1e-3)


def _assert_state_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=lambda m, i=i: f"state leaf {i}: {m}")
        else:
            assert a == b, f"state leaf {i}"


@pytest.mark.parametrize("scenario", ["sgs_functional", "sgs_ddp_tracker"])
def test_sum_grad_squared_over_ranks_equals_the_whole_batch(results, scenario):
    """The statistic of the global batch is sum_r (n_r / N)^2 S_r, not the mean of the S_r."""
    ranks, ref = results
    want = ref[scenario]
    for r in range(WORLD):
        got = ranks[r][scenario]
        assert_trees_close(got["sgs"], want["sgs"], rtol=1e-9, atol=1e-15)
        assert_trees_close(got["params"], want["params"], rtol=1e-6, atol=1e-12)
        _assert_state_close(got["state"], want["state"])
        if scenario == "sgs_functional":
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=0)
            assert_trees_close(got["grads"], want["grads"], rtol=1e-9, atol=1e-15)
    # not vacuous: a rank's own statistic (its half of the batch, divided by n_r) is far off
    own, full = ranks[0]["sgs_functional"]["own"]["0.weight"], ref["sgs_functional"]["sgs"]["0.weight"]
    assert not torch.allclose(own, full, rtol=1e-2)


def test_all_reduce_sum_grad_squared_without_a_process_group_is_the_identity():
    sgs = {"a": torch.tensor([1.0, 2.0]), "b": None}
    assert gx.all_reduce_sum_grad_squared(sgs, 4) is sgs
    with pytest.raises(ValueError, match="batch_size"):
        gx.all_reduce_sum_grad_squared(sgs, 0)
    with pytest.raises(ValueError, match="reduction"):
        gx.all_reduce_sum_grad_squared(sgs, 4, reduction="max")


@needs("fsdp2")
def test_sharded_checkpoint_resumes_exactly(results):
    ranks, _ = results
    for r in range(WORLD):
        res = ranks[r]["resume"]
        assert res["sharded"], "the optimizer state in the checkpoint should be DTensor shards"
        for k in res["straight"]:
            assert torch.equal(res["resumed"][k], res["straight"][k]), k
        assert len(res["resumed_state"]) == len(res["straight_state"])
        for a, b in zip(res["resumed_state"], res["straight_state"]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(res["functional_restored"], res["functional"]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_gradinit_over_ranks_equals_the_union_of_their_batches(results):
    """``gradinit(sync=True)``: g, the look-ahead loss and the scale gradients over all ranks."""
    ranks, ref = results
    want = ref["gradinit"]
    assert want["branch"] not in (0, len(want["objective"]))  # both branches were taken
    for r in range(WORLD):
        got = ranks[r]["gradinit"]
        assert got["branch"] == want["branch"]
        assert got["scales"] == pytest.approx(want["scales"], rel=1e-9)
        assert got["objective"] == pytest.approx(want["objective"], rel=1e-9)
        assert_trees_close(got["params"], want["params"], rtol=1e-9, atol=1e-14)
    assert max(abs(v - 1.0) for v in want["scales"].values()) > 1e-3  # the scales moved


def test_empirical_init_over_ranks_equals_the_union_of_their_batches(results):
    """``empirical_init(sync=True)``: RMS over all ranks' examples, averaged gradients, and the
    re-draw broadcast from rank 0 (each rank passed a different generator)."""
    ranks, ref = results
    want = ref["empirical"]
    for r in range(WORLD):
        got = ranks[r]["empirical"]
        assert got["pillar1"] == pytest.approx(want["pillar1"], rel=1e-9)
        assert got["pillar3"] == pytest.approx(want["pillar3"], rel=1e-9)
        assert_trees_close(got["multipliers"], want["multipliers"], rtol=1e-9, atol=1e-14)
        assert_trees_close(got["params"], want["params"], rtol=1e-9, atol=1e-14)


@needs("fsdp2")
def test_gradnorm_task_norms_under_fsdp2(results):
    """GradNorm's per-task norms at a sharded weight and at an activation, on two FSDP2 ranks,
    equal one process on the whole batch."""
    ranks, ref = results
    for r in range(WORLD):
        for where in ("weight", "activation"):
            got = ranks[r]["task_norms"][where]
            assert not gx.tree.is_dtensor(got)
            torch.testing.assert_close(got, ref["task_norms"][where], rtol=1e-9, atol=0)
