"""The core contract: chain, identity, apply_updates, None leaves, extra arguments, errors."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import gradxform as gx
from helpers import needs


def tree():
    return {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([-1.0])}


def test_identity_and_apply_updates():
    p = tree()
    tx = gx.identity()
    u, s = tx.update(tree(), tx.init(p), p)
    new = gx.apply_updates(p, u)
    torch.testing.assert_close(new["a"], torch.tensor([6.0, 8.0]))
    torch.testing.assert_close(new["b"], torch.tensor([-2.0]))
    # pure: the inputs are unchanged
    torch.testing.assert_close(p["a"], torch.tensor([3.0, 4.0]))


def test_apply_updates_casts_to_param_dtype_and_keeps_none():
    p = {"w": torch.ones(2, dtype=torch.float16), "frozen": torch.ones(1)}
    u = {"w": torch.full((2,), 0.5, dtype=torch.float32), "frozen": None}
    new = gx.apply_updates(p, u)
    assert new["w"].dtype == torch.float16
    torch.testing.assert_close(new["w"], torch.full((2,), 1.5, dtype=torch.float16))
    assert new["frozen"] is p["frozen"]


def test_chain_composes_in_order():
    # scale(2) then scale(-0.5): -1 * u; clip first: (3,4),(-1) global norm sqrt(26) -> lam 2
    tx = gx.chain(gx.clip_by_global_norm(2.0), gx.scale(-0.5))
    u, _ = tx.update(tree(), tx.init(tree()))
    k = 2.0 / 26**0.5
    torch.testing.assert_close(u["a"], torch.tensor([-1.5 * k * 1, -2.0 * k]))
    torch.testing.assert_close(u["b"], torch.tensor([0.5 * k]))


def test_clip_by_global_norm_reference_values():
    """Hand-computed, norm rule, lam = 2: a (1.176696811, 1.568929081), b (-0.392232270)."""
    g = {"a": torch.tensor([3.0, 4.0], dtype=torch.float64), "b": torch.tensor([-1.0], dtype=torch.float64)}
    tx = gx.clip_by_global_norm(2.0)
    u, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(u["a"], torch.tensor([1.176696811, 1.568929081], dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(u["b"], torch.tensor([-0.392232270], dtype=torch.float64), rtol=1e-8, atol=0)
    # below the level: untouched; zero gradient passes through
    small = {"a": torch.tensor([0.3, 0.4])}
    torch.testing.assert_close(tx.update(small, tx.init(small))[0]["a"], small["a"])
    zero = {"a": torch.zeros(2)}
    torch.testing.assert_close(tx.update(zero, tx.init(zero))[0]["a"], torch.zeros(2))


def test_nested_chains_are_flattened():
    inner = gx.chain(gx.scale(2.0), gx.scale(3.0))
    tx = gx.chain(gx.scale(0.5), inner, gx.identity())
    state = tx.init(tree())
    assert isinstance(state, tuple) and len(state) == 4
    u, _ = tx.update(tree(), state)
    torch.testing.assert_close(u["a"], torch.tensor([9.0, 12.0]))


def test_none_leaves_pass_through_and_keep_state():
    params = {"w": torch.ones(2), "frozen": torch.ones(3)}
    tx = gx.adam(0.1)
    state = tx.init(params)
    u, state = tx.update({"w": torch.ones(2), "frozen": None}, state, params)
    assert u["frozen"] is None
    adam_state = state.inner_state[0]
    torch.testing.assert_close(adam_state.mu["frozen"], torch.zeros(3))  # untouched
    torch.testing.assert_close(adam_state.mu["w"], torch.full((2,), 0.1))
    torch.testing.assert_close(u["w"], torch.full((2,), -0.1))  # first Adam step is -lr*sign


class _NeedsLosses(NamedTuple):
    pass


def needs_losses() -> gx.GradientTransformation:
    """A toy transform that scales updates by the sum of ``losses`` (a required extra)."""

    def init(params):
        return gx.EmptyState()

    def update(updates, state, params=None, *, losses):
        return gx.tree.tree_map(lambda u: u * losses.sum(), updates), state

    return gx.GradientTransformation(init, update)


def optional_scale() -> gx.GradientTransformation:
    def init(params):
        return gx.EmptyState()

    def update(updates, state, params=None, *, factor=1.0):
        return gx.tree.tree_map(lambda u: u * factor, updates), state

    return gx.GradientTransformation(init, update)


def test_extra_args_are_routed_to_declaring_members():
    tx = gx.chain(needs_losses(), gx.scale(2.0), optional_scale())
    spec = gx.extra_args_of(tx)
    assert spec.required == {"losses"} and spec.optional == {"factor"}
    state = tx.init(tree())
    u, _ = tx.update(tree(), state, losses=torch.tensor([1.0, 2.0]), factor=10.0)
    torch.testing.assert_close(u["a"], torch.tensor([180.0, 240.0]))
    u, _ = tx.update(tree(), state, losses=torch.tensor([1.0]))
    torch.testing.assert_close(u["b"], torch.tensor([-2.0]))


def test_missing_extra_argument_is_named():
    tx = gx.chain(gx.scale(2.0), needs_losses())
    with pytest.raises(TypeError, match="needs_losses .*needs the extra argument 'losses'"):
        tx.update(tree(), tx.init(tree()))


def test_unknown_extra_argument_is_rejected():
    tx = gx.chain(gx.scale(2.0), needs_losses())
    with pytest.raises(TypeError, match="unknown extra argument 'lossez'.*declared extra arguments: losses"):
        tx.update(tree(), tx.init(tree()), losses=torch.ones(1), lossez=1)


def test_extra_arguments_pass_through_combinators():
    tx = gx.chain(gx.masked(needs_losses(), {"a": True, "b": False}), gx.inject_hyperparams(gx.scale)(step_size=1.0))
    u, _ = tx.update(tree(), tx.init(tree()), losses=torch.tensor([2.0]))
    torch.testing.assert_close(u["a"], torch.tensor([6.0, 8.0]))
    torch.testing.assert_close(u["b"], torch.tensor([-1.0]))
    with pytest.raises(TypeError, match="'losses'"):
        tx.update(tree(), tx.init(tree()))


def test_update_before_init_is_a_clear_error():
    with pytest.raises(ValueError, match="state=None: call init"):
        gx.scale_by_adam().update(tree(), None)
    with pytest.raises(ValueError, match="chain.update.. expects the tuple of 2 member states"):
        gx.chain(gx.scale(1.0), gx.trace(0.9)).update(tree(), None)
    with pytest.raises(TypeError, match="expected the state returned by this transform's init"):
        gx.trace(0.9).update(tree(), gx.EmptyState())


def test_tree_mismatch_names_the_path():
    params = {"layer": {"weight": torch.ones(2, 2), "bias": torch.ones(2)}}
    tx = gx.adam()
    state = tx.init(params)
    bad = {"layer": {"weight": torch.ones(2, 2), "bais": torch.ones(2)}}
    with pytest.raises(ValueError, match=r"different tree structures.*'layer\.bais'"):
        tx.update(bad, state, params)
    wrong_shape = {"layer": {"weight": torch.ones(2, 3), "bias": torch.ones(2)}}
    with pytest.raises(ValueError, match=r"shape mismatch at 'layer\.weight'"):
        tx.update(wrong_shape, state, params)


def test_add_decayed_weights_needs_params():
    with pytest.raises(ValueError, match="add_decayed_weights needs params"):
        tx = gx.add_decayed_weights(0.1)
        tx.update(tree(), tx.init(tree()))


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match="chain.. takes GradientTransformations"):
        gx.chain(gx.scale(1.0), 3.0)


@needs("weights_only_load")
def test_state_saves_and_loads_with_weights_only():
    import io

    params = {"w": torch.ones(3, dtype=torch.float64)}
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.apply_if_finite(gx.adamw(gx.cosine_decay_schedule(1e-2, 10))),
                  gx.masked(gx.trace(0.9), {"w": True}), gx.multi_steps(gx.scale_by_rms(), 2))
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    u1, s1 = tx.update(params, state, params)
    u2, s2 = tx.update(params, loaded, params)
    assert torch.equal(u1["w"], u2["w"])
    assert type(loaded[1]).__name__ == "ApplyIfFiniteState"


def test_tree_to_casts_only_floating_leaves():
    state = gx.adam(0.1).init({"w": torch.ones(2)})
    moved = gx.tree.tree_to(state, dtype=torch.float64)
    assert moved.inner_state[0].mu["w"].dtype == torch.float64
    assert moved.inner_state[0].count["w"].dtype == torch.int64
    assert moved.count.dtype == torch.int64


def test_apply_updates_inplace_writes_the_params():
    p = {"w": torch.ones(2), "frozen": torch.ones(1)}
    w = p["w"]
    new = gx.apply_updates(p, {"w": torch.full((2,), 0.5), "frozen": None}, inplace=True)
    assert new["w"] is w and torch.equal(w, torch.full((2,), 1.5))
    assert torch.equal(new["frozen"], torch.ones(1))


def test_differentiable_mode_is_per_thread():
    # gx.differentiable is a context's setting, like torch's grad mode: entering it in one thread
    # must not switch updates running in another thread to the pure (out-of-place) code path
    import threading

    inside, outside = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def other_thread():
        inside.wait(5)
        seen["other"] = gx.tree.pure_ops()
        outside.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with gx.differentiable():
        seen["here"] = gx.tree.pure_ops()
        inside.set()
        outside.wait(5)
    t.join(5)
    assert seen == {"here": True, "other": False}
    assert not gx.tree.pure_ops()
