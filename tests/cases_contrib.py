"""gradxform.contrib's blocks and aliases for the shared transform harnesses (purity, in-place,
compile-once, bad input, pytree properties, distributed): zero-argument factories, params from
tests/test_purity.py::_params."""

from __future__ import annotations

import gradxform as gx

CASES = {
    "schedule_free": lambda: gx.schedule_free(gx.scale_by_learning_rate(0.1), 0.1, b1=0.9),
    "schedule_free_sgd": lambda: gx.schedule_free_sgd(0.1, warmup_steps=2, weight_decay=0.01),
    "schedule_free_adamw": lambda: gx.schedule_free_adamw(0.1, warmup_steps=2, weight_decay=0.01),
    "scale_by_rms_debiased": lambda: gx.scale_by_rms_debiased(0.99),
    "prodigy": lambda: gx.prodigy(0.5, weight_decay=0.01),
    "dadapt_adamw": lambda: gx.dadapt_adamw(0.5, weight_decay=0.01),
    "scale_by_ademamix": lambda: gx.scale_by_ademamix(b3=0.99, alpha=2.0),
    "ademamix": lambda: gx.ademamix(0.1, b3=0.99, weight_decay=0.01),
    "scale_by_adopt": lambda: gx.scale_by_adopt(b2=0.99),
    "adopt": lambda: gx.adopt(0.1, nesterov=True),
    "normalize": lambda: gx.normalize(),
    "sam": lambda: gx.sam(gx.sgd(0.1, momentum=0.9), gx.chain(gx.normalize(), gx.scale_by_learning_rate(0.05))),
    "scale_by_madgrad": lambda: gx.scale_by_madgrad(0.1),
    "madgrad": lambda: gx.madgrad(0.1, weight_decay=0.01),
    "scale_by_cocob": lambda: gx.scale_by_cocob(),
    "cocob": lambda: gx.cocob(weight_decay=0.01),
    "scale_by_dog": lambda: gx.scale_by_dog(("learning_rate", 0.1)),
    "dog": lambda: gx.dog(0.5, weight_decay=0.01),
}

# public functions of gradxform.contrib that are not transforms
NOT_TRANSFORMS = {"schedule_free_eval_params"}
