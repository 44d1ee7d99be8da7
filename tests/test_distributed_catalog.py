"""A representative set of the optimizer catalog on two gloo ranks (CPU, DDP) equals one process.

tests/test_distributed.py runs the original families' cases in every distributed setting; the
catalog's ~130 cases would take the two ranks past its time limit on a small machine. This file
runs a few cases of each catalog module (the torch.optim catalog, Adafactor/Muon/SparseAdam,
optax's optimizers, the combinators, optax.contrib) with the same model, data split and helpers:
each rank holds half of the global batch of ``test_distributed.Tiny`` wrapped in
``DistributedDataParallel``, and takes ``test_distributed.STEPS`` steps through the functional
route (``tx.update`` + ``gx.apply_updates``) and through ``gx.Optimizer``. Params and every state
leaf must equal this process's run on the whole batch (float64, rtol 1e-6), on both ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import gradxform as gx
from helpers import assert_trees_close, once_per_run, run_on_ranks
from test_distributed import WORLD, Tiny, _run_case
from test_purity import CATALOG_MODULES

CATALOG = {name: make for m in CATALOG_MODULES for name, make in m.CASES.items()}

# one to three cases per catalog module, chosen for the kinds of state and reduction they keep
DIST_CASES = (
    # gradxform.torch_optimizers: centred RMS + momentum, NAdam's mu product, ASGD's averaged iterate
    "rmsprop", "nadam", "asgd",
    # gradxform.structured: factored second moments (a (6, 4) weight), Newton-Schulz on 2-D leaves
    # with AdamW on the others (``muon_float64`` below: in bfloat16 a rounding could flip between
    # the ranks' averaged gradient and the one process's), SparseAdam on dense gradients
    "adafactor", "sparse_adam",
    # gradxform.optax_optimizers: sign of a momentum, per-leaf trust ratios, SM3's cover sets
    "lion", "lamb", "sm3",
    # gradxform.combinators: slow weights, an EMA of params, accumulation over calls
    # (skip_large_updates would skip every step here: Tiny's gradient norms exceed its bound)
    "lookahead", "params_ema", "apply_every",
    # gradxform.contrib: schedule-free AdamW (warmup), Prodigy's distance estimate
    "schedule_free_adamw", "prodigy",
)
_by_ndim = lambda params: gx.tree.tree_map(lambda p: "muon" if p.ndim == 2 else "adamw", params)  # noqa: E731
EXTRA = {
    "muon_float64": lambda: gx.partition(
        {"muon": gx.chain(gx.scale_by_muon(ns_dtype=None), gx.scale(-0.02)), "adamw": gx.adamw(0.01)}, _by_ndim),
}
ROUTES = ("functional", "adapter")

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]


def _make(name: str):
    return EXTRA[name] if name in EXTRA else CATALOG[name]


def _run_catalog(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    mode = "ddp" if world > 1 else None
    out: dict = {(name, route): _run_case(_make(name), mode, route, rank, world)
                 for name in (*DIST_CASES, *EXTRA) for route in ROUTES}
    # control: each rank on its own half of the batch without DDP's gradient averaging
    out["control"] = _run_case(CATALOG["rmsprop"], None, "functional", rank, world)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def compute():
        ranks = run_on_ranks(_run_catalog, WORLD, tmp_path_factory.mktemp("dist_catalog"), timeout_s=120)
        assert not dist.is_initialized()
        return ranks, _run_catalog(0, 1)

    return once_per_run(tmp_path_factory, "test_distributed_catalog", compute)


def test_the_cases_are_catalog_cases():
    assert set(DIST_CASES) <= set(CATALOG), sorted(set(DIST_CASES) - set(CATALOG))
    missing = [m.__name__ for m in CATALOG_MODULES if not set(m.CASES) & set(DIST_CASES)]
    assert not missing, f"every catalog module has a case here; none from {missing}"


def test_without_gradient_averaging_the_ranks_would_differ(results):
    """Control (the comparison can fail): a rank stepping on its half batch alone is not the
    one-process run."""
    ranks, ref = results
    got, want = ranks[0]["control"]["params"]["w"], ref[("rmsprop", "functional")]["params"]["w"]
    assert not torch.allclose(got, want, rtol=1e-3)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", [*DIST_CASES, *EXTRA])
def test_two_ddp_ranks_equal_one_process(results, name, route):
    ranks, ref = results
    want = ref[(name, route)]
    for r in range(WORLD):
        got = ranks[r][(name, route)]
        assert_trees_close(got["params"], want["params"], rtol=1e-6, atol=1e-12)
        assert len(got["state"]) == len(want["state"])
        for i, (a, b) in enumerate(zip(got["state"], want["state"])):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, equal_nan=True,
                                           msg=lambda m, i=i: f"state leaf {i}: {m}")
            else:
                assert a == b, f"state leaf {i}"
    # the params moved: the comparison is of a real update
    assert not torch.equal(want["params"]["w"], Tiny().w.detach())
