"""Loss-weight updaters under torch.distributed: two gloo processes on CPU, each holding half of
the batch, must reproduce the weights of one process on the whole batch.

The two ranks are started once (a module fixture, ``torch.multiprocessing`` spawn, ``file://``
rendezvous in a temporary directory); each runs every scenario below and saves its results; the
tests compare them with the same code run in this process (no process group) on the
concatenated batch. Everything is float64, so agreement is to rounding (rtol 1e-6). Besides the
weights after every step, the final network params and GradNorm's recorded ``L_i(0)`` are
compared: with Adam on the weights, GradNorm's weights depend on the losses only through the
signs of ``G_i - target_i``, so unsynchronised losses can leave the weights unchanged for a few
steps, but not ``L_i(0)``.

Scenarios (``T = 3`` tasks of different scales on a small shared-trunk MLP, 5 steps each):

- GradNorm, functional route: ``gx.weighted_grad_and_task_norms`` (averages the per-task
  gradients at the shared weight over the ranks) + ``tx.update`` (averages ``losses``), the
  network gradients all-reduce-averaged by hand, ``gx.apply_updates``.
- The same with ``tx.update`` compiled (``torch.compile(fullgraph=True)``, the ``aot_eager``
  backend): the all-reduce of ``losses`` is traced into the graph.
- GradNorm, ``gx.Optimizer`` route: ``gx.task_grad_norms`` before ``backward``, manual
  all-reduce of ``p.grad``, ``opt.step(losses=..., task_grad_norms=...)``.
- GradNorm, ``gx.Optimizer`` route under DistributedDataParallel (CPU, gloo) instead of the manual
  all-reduce.
- ``gx.uncertainty_weighting`` and ``gx.dwa`` (``losses`` averaged), ``gx.Optimizer`` route; and
  ``uncertainty_weighting(sync=False)``, whose ranks must disagree (the check is not vacuous).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gradxform as gx
from gradxform._compat import FEATURES
from helpers import needs, once_per_run, run_on_ranks

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]

WORLD = 2
T = 3
N, D_IN, WIDTH, D_OUT = 16, 6, 8, 2  # N: the global batch; each rank holds N // WORLD rows
STEPS = 5
SHARED = "trunk.2.weight"  # the last trunk Linear
DT = torch.float64
RTOL, ATOL = 1e-6, 1e-12
SPAWN_TIMEOUT_S = 120


# --- the problem (identical in every process) ----------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(WIDTH, D_OUT) for _ in range(T))

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def _model() -> Net:
    torch.manual_seed(0)
    return Net().to(DT)


def _data(rank: int, world: int):
    """This rank's rows of the global batch (all of it for ``world == 1``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=DT)
    ys = torch.stack([s * torch.randn(N, D_OUT, generator=g, dtype=DT) for s in (1.0, 3.0, 10.0)])
    rows = slice(rank * N // world, (rank + 1) * N // world)
    return x[rows], ys[:, rows]


def _losses(outs, ys) -> torch.Tensor:
    return torch.stack([F.mse_loss(o, y) for o, y in zip(outs, ys)])


def _mean_grads(grads) -> None:
    """All-reduce-average a list of tensors in place (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for g in grads:
            dist.all_reduce(g)
            g.div_(dist.get_world_size())


def _params_of(model: nn.Module) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


# --- scenarios (run by each rank, and by this process as the reference) ---------------------------


def _gradnorm_functional(rank: int, world: int, activation: bool = False, compiled: bool = False) -> dict:
    """GradNorm through ``weighted_grad_and_task_norms``; norms at the shared weight, or with
    ``activation`` at the trunk's output (``shared=None``: each rank's gradient rows are its own
    examples', so the global norm is sum_r (n_r / N)^2 ||g_r||^2, not a mean)."""
    from torch.func import functional_call

    model = _model()
    x, ys = _data(rank, world)

    def losses_fn(params, batch):
        return _losses(functional_call(model, params, (batch[0],)), batch[1])

    def losses_and_activation(params, batch):
        h = functional_call(model.trunk, {k[6:]: v for k, v in params.items() if k.startswith("trunk.")}, (batch[0],))
        outs = [functional_call(model.heads[i], {k.split(".", 2)[2]: v for k, v in params.items()
                                                 if k.startswith(f"heads.{i}.")}, (h,)) for i in range(T)]
        return _losses(outs, batch[1]), h

    f = (gx.weighted_grad_and_task_norms(losses_and_activation, shared=None) if activation
         else gx.weighted_grad_and_task_norms(losses_fn, shared=SHARED))
    tx = gx.chain(gx.gradnorm(T, alpha=1.5, dtype=DT), gx.adam(1e-2))
    update = tx.update
    if compiled:  # the loss all-reduce must be traced into the graph (aot_eager: the same trace, no codegen)
        update = torch.compile(tx.update, backend="aot_eager", fullgraph=True)
    params = _params_of(model)
    state = tx.init(params)
    out = {"weights": [], "norms": [], "local_losses": []}
    for _ in range(STEPS):
        res = f(params, (x, ys), gx.loss_weights(state))
        grads = dict(res.grads)
        _mean_grads(list(grads.values()))
        updates, state = update(grads, state, params, losses=res.losses, task_grad_norms=res.task_grad_norms)
        params = gx.apply_updates(params, updates)
        out["weights"].append(gx.loss_weights(state).clone())
        out["norms"].append(res.task_grad_norms.clone())
        out["local_losses"].append(res.losses.clone())
    out["params"] = params
    out["initial_losses"] = state[0].initial_losses.clone()  # the chain's first entry: GradNormState
    return out


def _adapter_run(rank: int, world: int, weighter, *, ddp: bool = False, norms: bool = True) -> dict:
    model = _model()
    x, ys = _data(rank, world)
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    opt = gx.Optimizer(model.parameters(), gx.chain(weighter, gx.adam(1e-2)))
    shared = model.get_parameter(SHARED)
    out = {"weights": [], "local_losses": []}
    for _ in range(STEPS):
        w = gx.loss_weights(opt)
        losses = _losses(net(x), ys)
        extra = {"losses": losses.detach()}
        if norms:
            extra["task_grad_norms"] = gx.task_grad_norms(losses, shared)
        (w * losses).sum().backward()
        if not ddp:
            _mean_grads([p.grad for p in model.parameters()])
        opt.step(**extra)
        opt.zero_grad()
        out["weights"].append(gx.loss_weights(opt).clone())
        out["local_losses"].append(losses.detach().clone())
    out["params"] = _params_of(model)
    inner = opt.tx_state()[0]  # the chain's first entry: the updater's state
    if isinstance(inner, gx.weighting.GradNormState):
        out["initial_losses"] = inner.initial_losses.clone()
    return out


def _run_all(rank: int, world: int) -> dict:
    res = {
        "gn_functional": _gradnorm_functional(rank, world),
        "gn_activation": _gradnorm_functional(rank, world, activation=True),
        "gn_adapter": _adapter_run(rank, world, gx.gradnorm(T, alpha=1.5, dtype=DT)),
        "uw": _adapter_run(rank, world, gx.uncertainty_weighting(T, gx.adam(0.05), dtype=DT), norms=False),
        "dwa": _adapter_run(rank, world, gx.dwa(T, temperature=2.0, period=1, dtype=DT), norms=False),
    }
    if world > 1:
        if FEATURES["fullgraph_compile"].available():  # with graph breaks (torch < 2.13) it recompiles for minutes
            res["gn_compiled"] = _gradnorm_functional(rank, world, compiled=True)
        res["gn_ddp"] = _adapter_run(rank, world, gx.gradnorm(T, alpha=1.5, dtype=DT), ddp=True)
        res["uw_nosync"] = _adapter_run(rank, world, gx.uncertainty_weighting(T, gx.adam(0.05), sync=False, dtype=DT),
                                        norms=False)
    return res


# --- fixture: spawn the ranks once -------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def compute():
        ranks = run_on_ranks(_run_all, WORLD, tmp_path_factory.mktemp("dist"), SPAWN_TIMEOUT_S)
        assert not dist.is_initialized()
        reference = _run_all(0, 1)  # this process, the whole batch
        return ranks, reference

    return once_per_run(tmp_path_factory, "test_weighting_distributed", compute)


def _close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def _check_against_reference(ranks, ref, key, ref_key=None) -> None:
    ref_run = ref[ref_key or key]
    for r, res in enumerate(ranks):
        run = res[key]
        for step in range(STEPS):
            try:
                _close(run["weights"][step], ref_run["weights"][step])
            except AssertionError as e:
                raise AssertionError(f"{key}: rank {r}, step {step}: weights differ from one process on the "
                                     f"whole batch\n{e}") from None
        for name, p in ref_run["params"].items():
            _close(run["params"][name], p)
        if "initial_losses" in ref_run:  # GradNorm's L_i(0): the mean of the ranks' first losses
            _close(run["initial_losses"], ref_run["initial_losses"])
    # every rank sees the same weights, bit for bit (they come out of the same all-reduced numbers)
    for step in range(STEPS):
        assert torch.equal(ranks[0][key]["weights"][step], ranks[1][key]["weights"][step]), (key, step)
    # not vacuous: the ranks' local losses differ, and the weights moved
    assert not torch.allclose(ranks[0][key]["local_losses"][0], ranks[1][key]["local_losses"][0])
    assert not torch.allclose(ref_run["weights"][-1], torch.ones(T, dtype=DT))


# --- tests -------------------------------------------------------------------------------------


def test_gradnorm_functional_matches_single_process(results):
    ranks, ref = results
    _check_against_reference(ranks, ref, "gn_functional")
    # the norms are those of the global per-task gradients, not of each half
    for r in range(WORLD):
        for step in range(STEPS):
            _close(ranks[r]["gn_functional"]["norms"][step], ref["gn_functional"]["norms"][step])


@needs("fullgraph_compile")
def test_gradnorm_compiled_update_syncs_like_eager(results):
    # regression: under torch.compile the world size read 1 while tracing, so a compiled
    # GradNorm update used each rank's own losses (no error) and the ranks' L_i(0) and weights
    # diverged; now the functional all-reduce is traced into the graph
    ranks, ref = results
    _check_against_reference(ranks, ref, "gn_compiled", ref_key="gn_functional")


def test_gradnorm_at_a_shared_activation_matches_single_process(results):
    ranks, ref = results
    _check_against_reference(ranks, ref, "gn_activation")
    for r in range(WORLD):
        for step in range(STEPS):
            _close(ranks[r]["gn_activation"]["norms"][step], ref["gn_activation"]["norms"][step])
    # not vacuous: the activation norms differ from the weight norms of the same run
    assert not torch.allclose(ref["gn_activation"]["norms"][0], ref["gn_functional"]["norms"][0])


def test_gradnorm_adapter_manual_allreduce_matches_single_process(results):
    ranks, ref = results
    _check_against_reference(ranks, ref, "gn_adapter")


def test_gradnorm_adapter_ddp_matches_single_process(results):
    ranks, ref = results
    _check_against_reference(ranks, ref, "gn_ddp", ref_key="gn_adapter")


def test_gradnorm_routes_agree(results):
    # the functional and torch.optim routes run the same algorithm
    _, ref = results
    for a, b in zip(ref["gn_functional"]["weights"], ref["gn_adapter"]["weights"]):
        _close(a, b)


def test_uncertainty_weighting_matches_single_process(results):
    ranks, ref = results
    _check_against_reference(ranks, ref, "uw")


def test_dwa_matches_single_process(results):
    ranks, ref = results
    _check_against_reference(ranks, ref, "dwa")


def test_sync_false_keeps_rank_local_weights(results):
    ranks, _ = results
    w0, w1 = ranks[0]["uw_nosync"]["weights"][-1], ranks[1]["uw_nosync"]["weights"][-1]
    assert not torch.allclose(w0, w1), "with sync=False each rank should follow its own losses"
