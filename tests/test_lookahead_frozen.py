"""`gx.lookahead` with frozen leaves (an update of ``None``): regressions.

- ``reset_state=True`` re-initialises the fast optimizer's state at a synchronisation from the
  leaves that have an update; a frozen leaf's slots used to become ``None`` there (a tensor in
  ``tx.init``'s state), so the state changed structure between steps and the step could not be
  compiled, vmapped (`gx.batched`) or restored into a ``tx.init`` template.
- a synchronisation step on which no leaf has an update used to crash (an empty foreach list).
"""

from __future__ import annotations

import pytest
import torch

import gradxform as gx

D = torch.float64


def _structure(tree):
    return gx.tree.tree_flatten(tree)[1]


def _slots(tree):
    """(path, None or shape) of every leaf: where a tensor slot became None, this differs."""
    return [(p, None if x is None else tuple(x.shape)) for p, x in zip(gx.tree.tree_paths(tree),
                                                                    gx.tree.tree_flatten(tree)[0])]


def test_reset_state_keeps_the_frozen_slots_and_resets_the_live_ones():
    tx = gx.lookahead(gx.adam(0.1), sync_period=2, slow_step_size=0.5, reset_state=True)
    params = {"w": torch.tensor([1.0, -2.0], dtype=D), "frozen": torch.tensor([3.0], dtype=D)}
    state = tx.init(params)
    init_slots = _slots(state)
    assert any("frozen" in p and s is not None for p, s in init_slots)  # tx.init gives the frozen leaf slots
    for step in range(4):
        grads = {"w": torch.tensor([0.5, 0.25], dtype=D) * (step + 1), "frozen": None}
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
        assert _slots(state) == init_slots, f"the state changed structure at step {step}"
        assert updates["frozen"] is None
    # the last step was a synchronisation: the fast Adam state of ``w`` is a fresh one
    fresh = gx.adam(0.1).init(params)
    for a, b, path in zip(gx.tree.tree_flatten(state.fast_state)[0], gx.tree.tree_flatten(fresh)[0],
                          gx.tree.tree_paths(fresh)):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), path
    # the frozen param and its slow copy did not move
    assert torch.equal(params["frozen"], torch.tensor([3.0], dtype=D))
    assert torch.equal(gx.lookahead_params(state)["frozen"], torch.tensor([3.0], dtype=D))


def test_reset_state_step_restores_into_an_init_template():
    """The state after a sync loads into ``tx.init``'s template (``gx.state_from_dict``)."""
    tx = gx.lookahead(gx.adam(0.1), sync_period=1, slow_step_size=0.5, reset_state=True)
    params = {"w": torch.ones(2, dtype=D), "frozen": torch.ones(1, dtype=D)}
    _, state = tx.update({"w": torch.ones(2, dtype=D), "frozen": None}, tx.init(params), params)
    restored = gx.state_from_dict(tx.init(params), gx.state_to_dict(state))
    assert _structure(restored) == _structure(state)


@pytest.mark.parametrize("reset_state", [False, True])
def test_a_sync_step_without_any_update_keeps_everything(reset_state):
    tx = gx.lookahead(gx.chain(gx.scale_by_adam(), gx.scale(-0.1)), sync_period=2, slow_step_size=0.3,
                      reset_state=reset_state)
    params = {"a": torch.ones((), dtype=D), "b": torch.full((2,), 2.0, dtype=D)}
    state = tx.init(params)
    u, state = tx.update({"a": torch.tensor(1.0, dtype=D), "b": torch.ones(2, dtype=D)}, state, params)
    params = gx.apply_updates(params, u)
    slow_before = {k: v.clone() for k, v in gx.lookahead_params(state).items()}
    u, state = tx.update({"a": None, "b": None}, state, params)  # the second step: a sync, nothing live
    assert u == {"a": None, "b": None}
    assert int(state.steps_since_sync) == 0
    for k, v in gx.lookahead_params(state).items():
        assert torch.equal(v, slow_before[k]), k
