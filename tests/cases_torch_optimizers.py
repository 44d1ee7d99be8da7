"""The torch.optim catalog (gradxform.torch_optimizers) in the shared transform harnesses.

Zero-argument factories on the params of ``tests/test_purity.py::_params``: purity,
update_in_place, compile-once with a changing lr, bad input, pytree properties and the
distributed harness run every one of them.
"""

from __future__ import annotations

import gradxform as gx

CASES = {
    # the aliases, with their optional blocks switched on
    "adagrad": lambda: gx.adagrad(0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1),
    "adadelta": lambda: gx.adadelta(1.0, weight_decay=0.1, maximize=True),
    "adamax": lambda: gx.adamax(0.1, weight_decay=0.1),
    "nadam": lambda: gx.nadam(0.1, weight_decay=0.1, momentum_decay=0.006),
    "nadam_decoupled": lambda: gx.nadam(0.1, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    "radam": lambda: gx.radam(0.1, betas=(0.9, 0.8), weight_decay=0.1),
    "radam_decoupled": lambda: gx.radam(0.1, weight_decay=0.1, decoupled_weight_decay=True),
    "rmsprop": lambda: gx.rmsprop(0.1, weight_decay=0.1, momentum=0.9, centered=True),
    "rmsprop_plain": lambda: gx.rmsprop(0.1),
    "rprop": lambda: gx.rprop(0.1, maximize=True),
    "asgd": lambda: gx.asgd(0.1, lambd=0.1, t0=1, weight_decay=0.1),
    # the blocks
    "scale_by_rss": lambda: gx.scale_by_rss(0.1, lr_decay=0.5),
    "scale_by_rss_optax": lambda: gx.scale_by_rss(0.0, 1e-7, eps_in_sqrt=True),
    "scale_by_adadelta": lambda: gx.scale_by_adadelta(0.9),
    "scale_by_adamax": lambda: gx.scale_by_adamax(),
    "scale_by_nadam": lambda: gx.scale_by_nadam(momentum_decay=0.5),
    # rho_t crosses the threshold within the harnesses' few steps (r clamps at 0 below rho = 4)
    "scale_by_radam": lambda: gx.scale_by_radam(b2=0.99, threshold=1.5),
    "scale_by_rms_centered": lambda: gx.scale_by_rms(0.9, centered=True, count_steps=True),
    "scale_by_rms_optax": lambda: gx.scale_by_rms(0.9, eps_in_sqrt=True),
    "scale_by_rprop": lambda: gx.scale_by_rprop(0.1),
    "scale_by_asgd": lambda: gx.scale_by_asgd(0.1, lambd=0.1, t0=1),
    # averaged_params reads the state of this block (averaging from step 2 on: t0 = 1)
    "averaged_params": lambda: gx.scale_by_asgd(0.05, t0=1),
}

# torch.optim.Rprop reads lr for each param's first step size only (tests/test_compile_all.py)
LR_AT_FIRST_STEP_ONLY = frozenset({"rprop"})
