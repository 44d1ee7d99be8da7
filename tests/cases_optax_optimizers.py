"""Harness cases of gradxform/optax_optimizers.py: every public block and alias, as a
zero-argument factory (tests/test_purity.py collects ``CASES`` from every tests/cases_*.py)."""

from __future__ import annotations

import gradxform as gx

CASES = {
    "scale_by_lion": lambda: gx.scale_by_lion(),
    "scale_by_belief": lambda: gx.scale_by_belief(nesterov=True),
    "scale_by_yogi": lambda: gx.scale_by_yogi(),
    "scale_by_novograd": lambda: gx.scale_by_novograd(weight_decay=0.01),
    "scale_by_adan": lambda: gx.scale_by_adan(),
    "scale_by_sm3": lambda: gx.scale_by_sm3(b2=0.9),
    "scale_by_trust_ratio": lambda: gx.scale_by_trust_ratio(min_norm=0.1),
    "scale_by_param_block_norm": lambda: gx.scale_by_param_block_norm(),
    "scale_by_param_block_rms": lambda: gx.scale_by_param_block_rms(),
    "scale_by_sign": lambda: gx.scale_by_sign(),
    "scale_by_optimistic_gradient": lambda: gx.scale_by_optimistic_gradient(0.5, 0.5),
    "scale_by_distance_over_gradients": lambda: gx.scale_by_distance_over_gradients(),
    "add_noise": lambda: gx.add_noise(0.01, 0.55, key=1),
    "lion": lambda: gx.lion(1e-3),
    "lamb": lambda: gx.lamb(1e-3, weight_decay=0.01),
    "lars": lambda: gx.lars(0.1, weight_decay=1e-4),
    "adabelief": lambda: gx.adabelief(1e-3),
    "yogi": lambda: gx.yogi(1e-2),
    "novograd": lambda: gx.novograd(1e-2),
    "adan": lambda: gx.adan(1e-3, weight_decay=0.01),
    "sm3": lambda: gx.sm3(0.1),
    "fromage": lambda: gx.fromage(1e-2),
    "sign_sgd": lambda: gx.sign_sgd(1e-2),
    "signum": lambda: gx.signum(1e-2),
    "noisy_sgd": lambda: gx.noisy_sgd(1e-2, key=2),
    "optimistic_gradient_descent": lambda: gx.optimistic_gradient_descent(1e-2),
    "optimistic_adam": lambda: gx.optimistic_adam(1e-2),
    "amsgrad": lambda: gx.amsgrad(1e-3),
    "adamaxw": lambda: gx.adamaxw(1e-3),
    "nadamw": lambda: gx.nadamw(1e-3),
    "optax_rprop": lambda: gx.optax_rprop(1e-2),
}


def _with_value(tx):
    """The harnesses pass no extras: feed the Polyak step's ``value`` (a loss made from the
    updates, fresh every call), keeping the transform's owned update for the in-place harness."""
    from gradxform.base import info_of, owned_transform

    owned = info_of(tx).owned_update

    def value_of(updates):
        leaves = [g for g in gx.tree.tree_flatten(updates)[0] if g is not None]
        return 1.0 + sum((g.double() ** 2).sum() for g in leaves) if leaves else 1.0

    def owned_update(updates, state, params, own):
        return owned(updates, state, params, own, value=value_of(updates))

    return owned_transform(tx.init, owned_update)


CASES.update({
    "scale_by_polyak": lambda: _with_value(gx.chain(gx.scale(-1.0), gx.scale_by_polyak(max_learning_rate=0.5))),
    "polyak_sgd": lambda: _with_value(gx.polyak_sgd(scaling=0.5)),
})
