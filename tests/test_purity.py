"""Every public transform's ``update`` leaves its inputs (updates, state, params) unchanged."""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch

import gradxform as gx
from helpers import assert_unchanged, snapshot


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g), "frozen": torch.randn(2, generator=g)}


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g), "frozen": None}


CASES = {
    "identity": lambda: gx.identity(),
    "stateless": lambda: gx.stateless(lambda u, p: gx.tree.tree_map(lambda x, y: x * y, u, p)),
    "scale": lambda: gx.scale(0.5),
    "scale_by_schedule": lambda: gx.scale_by_schedule(gx.cosine_decay_schedule(1.0, 10)),
    "scale_by_learning_rate": lambda: gx.scale_by_learning_rate(0.1),
    "trace": lambda: gx.trace(0.9, nesterov=True),
    "trace_dampening": lambda: gx.trace(0.9, dampening=0.3),
    "scale_by_adam": lambda: gx.scale_by_adam(amsgrad=True),
    "scale_by_rms": lambda: gx.scale_by_rms(),
    "add_decayed_weights": lambda: gx.add_decayed_weights(0.1, mask={"w": True, "b": False, "frozen": True}),
    "clip_by_global_norm": lambda: gx.clip_by_global_norm(0.5),
    "masked": lambda: gx.masked(gx.trace(0.9), {"w": True, "b": False, "frozen": False}),
    "partition": lambda: gx.partition({"x": gx.adam(0.1), "y": gx.sgd(0.1, momentum=0.9)}, {"w": "x", "b": "y", "frozen": "y"}),
    "inject_hyperparams": lambda: gx.inject_hyperparams(gx.scale_by_rms)(decay=0.9),
    "apply_if_finite": lambda: gx.apply_if_finite(gx.adam(0.1)),
    "multi_steps": lambda: gx.multi_steps(gx.adamw(0.1), every_k=2),
    "chain": lambda: gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.1, amsgrad=True)),
    "sgd": lambda: gx.sgd(0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adam": lambda: gx.adam(0.1, weight_decay=0.1),
    "adamw": lambda: gx.adamw(gx.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10), amsgrad=True),
    "clip_by_leaf_norm": lambda: gx.clip_by_leaf_norm(0.5),
    "clip": lambda: gx.clip(0.1),
    "clip_by_block_rms": lambda: gx.clip_by_block_rms(0.1),
    "adaptive_grad_clip": lambda: gx.adaptive_grad_clip(0.01),
    "autoclip": lambda: gx.autoclip(0.5, history=4),
    "autoclip_random": lambda: gx.autoclip(0.5, history=4, beta=0.5, power=2),
    "random_clip_by_global_norm": lambda: gx.random_clip_by_global_norm(0.5, beta=0.5),
    "monitor_norm": lambda: gx.monitor_norm(8),
    "clipped_sgd": lambda: gx.clipped_sgd(0.1, momentum=0.9, rule="auto", q=0.5),
    "clipped_sstm": lambda: gx.clipped_sstm(1.0, 1.0, 0.5),
    "with_restarts": lambda: gx.with_restarts(gx.sgd(0.1, momentum=0.9), first_period=1, coeff=1.0),
}


def _with_sgs(tx):
    """The purity test passes no extras: feed ``sum_grad_squared = g^2 / 2`` (``None`` where the
    update is) so that the TrueGrad path runs. The statistic is made here, fresh every call."""

    def update(updates, state, params=None):
        sgs = gx.tree.tree_map(lambda g: 0.5 * g * g, updates)
        return tx.update(updates, state, params, sum_grad_squared=sgs)

    return gx.GradientTransformation(tx.init, update)


CASES.update({
    "scale_by_truegrad_adam": lambda: _with_sgs(gx.scale_by_truegrad_adam()),
    "scale_by_truegrad_adam_fallback": lambda: gx.scale_by_truegrad_adam(graft=False, fallback="adam"),
    "scale_by_truegrad_laprop": lambda: _with_sgs(gx.scale_by_truegrad_laprop()),
    "scale_by_truegrad_laprop_fallback": lambda: gx.scale_by_truegrad_laprop(fallback="adam"),
    "scale_by_truegrad_rmsprop": lambda: _with_sgs(gx.scale_by_truegrad_rmsprop()),
    "scale_by_truegrad_rmsprop_fallback": lambda: gx.scale_by_truegrad_rmsprop(fallback="adam"),
    "tg_adamw": lambda: _with_sgs(gx.tg_adamw(0.1)),
    "tg_laprop": lambda: _with_sgs(gx.tg_laprop(0.1, graft=False)),
    "tg_rmsprop": lambda: _with_sgs(gx.tg_rmsprop(0.1)),
    "graft": lambda: gx.graft(gx.scale_by_adam(), gx.trace(0.9)),
    "graft_clip_truegrad": lambda: _with_sgs(gx.graft(gx.clip_by_global_norm(0.5), gx.scale_by_truegrad_adam(graft=False))),
    "multi_steps_truegrad": lambda: _with_sgs(gx.multi_steps(gx.tg_adamw(0.1), every_k=2)),
})

def _with_task_stats(tx, t=3):
    """Fixed per-task losses and norms for the loss-weight updaters (made fresh every call)."""

    def update(updates, state, params=None):
        return tx.update(updates, state, params, losses=torch.tensor([2.0, 1.0, 0.5]),
                         task_grad_norms=torch.tensor([1.0, 3.0, 0.2]))

    return gx.GradientTransformation(tx.init, update)


CASES.update({
    "gradnorm": lambda: _with_task_stats(gx.chain(gx.gradnorm(3), gx.adam(0.1))),
    "uncertainty_weighting": lambda: _with_task_stats(gx.chain(gx.uncertainty_weighting(3), gx.sgd(0.1))),
    "dwa": lambda: _with_task_stats(gx.chain(gx.dwa(3), gx.sgd(0.1))),
    "gradinit_scale_tx": lambda: gx.gradinit_scale_tx(0.1, 0.5),
    "scale_by_empirical_init": lambda: gx.scale_by_empirical_init({"w": 2.0, "b": torch.tensor(0.5), "frozen": 3.0}),
    "project_lower_bound": lambda: gx.chain(gx.sgd(0.5), gx.project_lower_bound(0.0)),
    "fixed_weights": lambda: _with_task_stats(gx.chain(gx.fixed_weights([1.0, 2.0, 3.0]), gx.sgd(0.1))),
})

def _one_model(btx):
    """``batched`` needs every leaf stacked along one model dim: here N = 1 (unsqueeze / squeeze)."""
    up = lambda t: gx.tree.tree_map(lambda x: x.unsqueeze(0), t)  # noqa: E731
    down = lambda t: gx.tree.tree_map(lambda x: x.squeeze(0), t)  # noqa: E731

    def update(updates, state, params=None):
        u, s = btx.update(up(updates), state, None if params is None else up(params))
        return down(u), s

    return gx.GradientTransformation(lambda p: btx.init(up(p)), update)


CASES["upcast"] = lambda: gx.upcast(gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.1)), torch.float64)
CASES["batched"] = lambda: _one_model(gx.batched(gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.1))))

# The optimizer catalog registers its cases in tests/cases_*.py: a dict ``CASES`` of zero-argument
# factories (and, for cases whose construction depends on the tree's keys, ``PYTREE_FACTORIES``
# for test_properties_pytrees). Every harness that runs test_purity's CASES runs them too.
CATALOG_MODULES = [importlib.import_module(p.stem) for p in sorted(pathlib.Path(__file__).parent.glob("cases_*.py"))]
FAMILY_CASES = dict(CASES)  # the original families' cases (the distributed harness runs these)
for _module in CATALOG_MODULES:
    CASES.update(_module.CASES)

# Public names that are not transform factories.
NOT_TRANSFORMS = {
    "GradientTransformation", "EmptyState", "ExtraArgs", "extra_args_of", "with_extra_args", "apply_updates",
    "Optimizer", "tree_global_norm", "schedules", "tree", "constant_schedule", "linear_schedule",
    "polynomial_schedule", "cosine_decay_schedule", "exponential_decay", "warmup_cosine_decay_schedule",
    "piecewise_constant_schedule", "join_schedules", "norm_history", "clip_fraction", "ClipStats",
    "grad_and_sum_grad_squared", "all_reduce_sum_grad_squared", "state_to_dict", "state_from_dict", "sum_grad_squared", "track_sum_grad_squared", "PerExampleStats", "PerParam",
    "loss_weights", "task_grad_norms", "weighted_grad_and_task_norms", "WeightedGrads",
    "InitReport", "gradinit", "gradinit_objective", "set_hyperparam", "get_hyperparam", "differentiable",
    "empirical_init", "empirical_init_params", "update_in_place", "fastpath",
}
for _module in CATALOG_MODULES:  # a catalog module may declare its public non-transform functions
    NOT_TRANSFORMS |= set(getattr(_module, "NOT_TRANSFORMS", ()))

# Cases a harness cannot run, each with the reason, declared by the catalog modules: EAGER_ONLY
# (branches on loss values, as torch.optim.LBFGS: no compiled step) and KNOWN_GAPS
# ({harness: {name: reason}} for a limit not yet lifted).
EAGER_ONLY = frozenset().union(*(getattr(m, "EAGER_ONLY", ()) for m in CATALOG_MODULES))
# cases whose lr only sets the first step size (torch.optim.Rprop): a changing lr has no later effect
LR_AT_FIRST_STEP_ONLY = frozenset().union(*(getattr(m, "LR_AT_FIRST_STEP_ONLY", ()) for m in CATALOG_MODULES))
KNOWN_GAPS: dict[str, dict[str, str]] = {}
for _module in CATALOG_MODULES:
    for _harness, _names in getattr(_module, "KNOWN_GAPS", {}).items():
        KNOWN_GAPS.setdefault(_harness, {}).update(_names)


def test_every_public_transform_is_covered():
    public = {n for n in gx.__all__ if not n.endswith("State")} - NOT_TRANSFORMS
    covered = {name.split("_dampening")[0].split("_random")[0] for name in CASES}
    assert public <= covered, f"add a purity case for: {sorted(public - covered)}"






@pytest.mark.parametrize("name", sorted(CASES))
def test_update_is_pure(name):
    tx = CASES[name]()
    params = _params()
    state = tx.init(params)
    for step in range(3):
        updates = _grads(step)
        before = (snapshot(updates), snapshot(state), snapshot(params))
        new_updates, new_state = tx.update(updates, state, params)
        assert_unchanged(before[0], updates, "updates")
        assert_unchanged(before[1], state, "state")
        assert_unchanged(before[2], params, "params")
        # outputs may pass an incoming update through, but must never alias params or state
        # buffers: the caller adds them to the params, and the adapter updates state in place
        held = [x for x in gx.tree.tree_flatten(params)[0] + gx.tree.tree_flatten(new_state)[0]
                if isinstance(x, torch.Tensor) and x.numel() > 1]
        for out in gx.tree.tree_flatten(new_updates)[0]:
            if isinstance(out, torch.Tensor):
                assert all(out.data_ptr() != h.data_ptr() for h in held), "an output update aliases params or state"
        assert new_updates["frozen"] is None
        params = gx.apply_updates(params, new_updates)
        state = new_state


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_in_place_equals_pure_update_and_keeps_protected_inputs(name):
    """Every case through `gx.update_in_place` (the owned update the adapter calls): the same
    updates and state as the pure update, step after step, and the caller's updates (protected
    unless donated) are never written."""
    tx = CASES[name]()
    params = _params()
    pure_state, own_state = tx.init(params), tx.init(params)
    for step in range(3):
        grads = _grads(step)
        before = snapshot(grads)
        want_u, pure_state = tx.update(grads, pure_state, params)
        got_u, own_state = gx.update_in_place(tx, grads, own_state, params)
        assert_unchanged(before, grads, "protected updates")
        for a, b in zip(gx.tree.tree_flatten(want_u)[0], gx.tree.tree_flatten(got_u)[0]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for a, b in zip(gx.tree.tree_flatten(pure_state)[0], gx.tree.tree_flatten(own_state)[0]):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, equal_nan=True)
        params = gx.apply_updates(params, want_u)


def _average(a, b):
    """A user-written combinator (plain functions, no declared owned update) that hands the same
    updates to two inner transforms."""

    def init(p):
        return (a.init(p), b.init(p))

    def update(u, s, p=None):
        ua, sa = a.update(u, s[0], p)
        ub, sb = b.update(u, s[1], p)
        return gx.tree.tree_map(lambda x, y: (x + y) / 2, ua, ub), (sa, sb)

    return gx.GradientTransformation(init, update)


def test_user_transform_is_called_purely_by_the_owner():
    """A transform made from user functions gets no ownership, even inside a chain the adapter
    owns: its inner transforms cannot overwrite the input they share (a global "owned buffers"
    flag once let scale(2.0) scale the shared input before scale(3.0) read it: -6.0, not -2.5)."""
    tx = gx.chain(gx.clip_by_global_norm(100.0), _average(gx.scale(2.0), gx.scale(3.0)), gx.scale(-1.0))
    g = torch.ones(3)
    state = tx.init([torch.zeros(3)])
    pure, _ = tx.update([g], state, [torch.zeros(3)])
    owned, _ = gx.update_in_place(tx, [g.clone()], tx.init([torch.zeros(3)]), [torch.zeros(3)], donate_updates=True)
    assert torch.equal(pure[0], torch.full((3,), -2.5)) and torch.equal(owned[0], pure[0])
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    gx.Optimizer([w], tx).step()
    assert torch.equal(w.detach(), torch.full((3,), -2.5)) and torch.equal(w.grad, torch.ones(3))


def test_ownership_is_per_call_and_thread_safe():
    """Ownership travels with the call: a pure update running concurrently with owned ones in
    other threads never writes its inputs."""
    import threading

    tx = gx.chain(gx.clip_by_global_norm(0.5), gx.scale_by_adam(), gx.scale(-0.1))
    params = [torch.zeros(1000)]
    errors = []

    def owned():
        state = tx.init(params)
        for _ in range(50):
            _, state = gx.update_in_place(tx, [torch.randn(1000)], state, params, donate_updates=True)

    def pure():
        state = tx.init(params)
        for _ in range(50):
            g = [torch.randn(1000)]
            keep = [x.clone() for x in g] + [x.clone() for x in gx.tree.tree_flatten(state)[0] if x is not None]
            _, new = tx.update(g, state, params)
            now = g + [x for x in gx.tree.tree_flatten(state)[0] if x is not None]
            if not all(torch.equal(a, b) for a, b in zip(keep, now)):
                errors.append("a pure update wrote its inputs")
            state = new

    threads = [threading.Thread(target=f) for f in (owned, pure, owned, pure)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
