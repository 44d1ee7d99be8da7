"""gradxform.combinators in the shared harnesses (purity, update_in_place, compile-once, bad input,
pytree properties, distributed): zero-argument factories over tests/test_purity.py's params."""

from __future__ import annotations

import functools

import torch

import gradxform as gx


def _even(step):
    return step % 2 == 0


def _with_value(tx, value=1.0):
    """reduce_on_plateau takes the metric as the extra argument ``value`` (a fixed one here: the
    second evaluation is a plateau, so with patience 1 the scale drops)."""

    def update(updates, state, params=None):
        return tx.update(updates, state, params, value=torch.tensor(value, dtype=torch.float64))

    return gx.GradientTransformation(tx.init, update)


def _first_leaf(params):
    """Freeze the first leaf only ("b" in the harness's tree): "w" still trains, so the compile
    harness can see the params move (with every other leaf frozen, both trained leaves were)."""
    flat, spec = gx.tree.tree_flatten(params)
    return gx.tree.tree_unflatten(spec, [i == 0 for i in range(len(flat))])


_large = functools.partial(gx.skip_large_updates, max_squared_norm=6.0)

CASES = {
    "ema": lambda: gx.ema(0.9),
    "ema_nodebias": lambda: gx.chain(gx.ema(0.8, debias=False), gx.scale(-0.1)),
    "params_ema": lambda: gx.chain(gx.sgd(0.1, momentum=0.9), gx.params_ema(0.9)),
    "lookahead": lambda: gx.lookahead(gx.adam(0.1), sync_period=2, slow_step_size=0.5),
    "lookahead_reset": lambda: gx.lookahead(gx.chain(gx.scale_by_adam(), gx.scale(-0.1)), 2, 0.3, reset_state=True),
    "apply_every": lambda: gx.chain(gx.apply_every(2), gx.sgd(0.1)),
    "centralize": lambda: gx.centralize(),
    "zero_nans": lambda: gx.zero_nans(),
    "keep_params_nonnegative": lambda: gx.chain(gx.sgd(0.5), gx.keep_params_nonnegative()),
    "normalize_by_update_norm": lambda: gx.normalize_by_update_norm(-0.1),
    "freeze": lambda: gx.freeze(_first_leaf),
    "named_chain": lambda: gx.named_chain(("clip", gx.clip_by_global_norm(1.0)), ("adam", gx.adam(0.1))),
    "conditionally_transform": lambda: gx.conditionally_transform(gx.adam(0.1), _even),
    "conditionally_mask": lambda: gx.conditionally_mask(gx.adam(0.1), _even),
    "skip_if": lambda: gx.skip_if(gx.adam(0.1), gx.skip_not_finite),
    # the two predicates are not transforms: their cases are skip_if with each
    "skip_not_finite": lambda: gx.skip_if(gx.chain(gx.scale_by_adam(), gx.scale(-0.1)), gx.skip_not_finite),
    "skip_large_updates": lambda: gx.skip_if(gx.sgd(0.1, momentum=0.9), _large),
    "reduce_on_plateau": lambda: _with_value(gx.chain(gx.sgd(0.1), gx.reduce_on_plateau(patience=1))),
}

# public names of gradxform.combinators that are functions, not transform factories
NOT_TRANSFORMS = {
    "ema_params", "lookahead_params", "per_example_grads", "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
}

# Harness limits not lifted yet (name -> reason), read by tests/test_purity.py::KNOWN_GAPS.
KNOWN_GAPS: dict = {}
