"""gradxform: optax-style gradient transformations for PyTorch.

The flat public API, as in optax:

    import gradxform as gx
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = gx.apply_updates(params, updates)

or, as a ``torch.optim.Optimizer``: ``opt = gx.Optimizer(model.parameters(), tx)``.
"""

from __future__ import annotations

from . import fastpath, schedules, tree
from .alias import adam, adamw, sgd, tg_adamw, tg_laprop, tg_rmsprop
from .base import (
    EmptyState,
    ExtraArgs,
    GradientTransformation,
    apply_updates,
    chain,
    extra_args_of,
    identity,
    stateless,
    update_in_place,
    with_extra_args,
)
from .clipping import (
    AutoClipState,
    ClipStats,
    MonitorNormState,
    RandomClipState,
    adaptive_grad_clip,
    autoclip,
    clip,
    clip_by_block_rms,
    clip_by_leaf_norm,
    clip_fraction,
    clipped_sgd,
    monitor_norm,
    norm_history,
    random_clip_by_global_norm,
)
from .combine import (
    ApplyIfFiniteState,
    GraftState,
    InjectHyperparamsState,
    MaskedState,
    MultiStepsState,
    PartitionState,
    apply_if_finite,
    graft,
    inject_hyperparams,
    masked,
    multi_steps,
    partition,
)
from .moments import (
    ScaleByTrueGradAdamState,
    ScaleByTrueGradLaPropState,
    ScaleByTrueGradRmsPropState,
    scale_by_truegrad_adam,
    scale_by_truegrad_laprop,
    scale_by_truegrad_rmsprop,
)
from .optim import Optimizer
from .persample import (
    PerExampleStats,
    PerParam,
    all_reduce_sum_grad_squared,
    grad_and_sum_grad_squared,
    sum_grad_squared,
    track_sum_grad_squared,
)
from .weighting import (
    DWAState,
    FixedWeightsState,
    GradNormState,
    UncertaintyWeightingState,
    WeightedGrads,
    dwa,
    fixed_weights,
    gradnorm,
    loss_weights,
    task_grad_norms,
    uncertainty_weighting,
    weighted_grad_and_task_norms,
)
from .batching import batched, get_hyperparam, set_hyperparam
from .precision import upcast
from .checkpoint import state_from_dict, state_to_dict
from .tree import differentiable
from .initscale import (
    InitReport,
    gradinit,
    gradinit_objective,
    gradinit_scale_tx,
    project_lower_bound,
)
from .empirical import (
    ScaleByEmpiricalInitState,
    empirical_init,
    empirical_init_params,
    scale_by_empirical_init,
)
from .sstm import ClippedSSTMState, RestartsState, clipped_sstm, with_restarts
from .schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_cosine_decay_schedule,
)
from .transforms import (
    ScaleByAdamState,
    ScaleByRmsState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_schedule,
    trace,
)
from .tree import tree_global_norm

__version__ = "0.1.0"


tree.register_state_types(
    EmptyState, ScaleByScheduleState, TraceState, ScaleByAdamState, ScaleByRmsState, MaskedState, PartitionState,
    InjectHyperparamsState, ApplyIfFiniteState, MultiStepsState, ClippedSSTMState, RestartsState,
)

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "ExtraArgs",
    "extra_args_of",
    "with_extra_args",
    "update_in_place",
    "identity",
    "stateless",
    "chain",
    "apply_updates",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "trace",
    "scale_by_adam",
    "scale_by_rms",
    "add_decayed_weights",
    "clip_by_global_norm",
    "masked",
    "partition",
    "inject_hyperparams",
    "apply_if_finite",
    "multi_steps",
    "sgd",
    "adam",
    "adamw",
    "clip_by_leaf_norm",
    "clip",
    "clip_by_block_rms",
    "adaptive_grad_clip",
    "autoclip",
    "random_clip_by_global_norm",
    "monitor_norm",
    "norm_history",
    "clip_fraction",
    "clipped_sgd",
    "clipped_sstm",
    "with_restarts",
    "ClipStats",
    "AutoClipState",
    "RandomClipState",
    "MonitorNormState",
    "ClippedSSTMState",
    "RestartsState",
    "Optimizer",
    "all_reduce_sum_grad_squared",
    "grad_and_sum_grad_squared",
    "sum_grad_squared",
    "track_sum_grad_squared",
    "PerExampleStats",
    "PerParam",
    "constant_schedule",
    "linear_schedule",
    "polynomial_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "warmup_cosine_decay_schedule",
    "piecewise_constant_schedule",
    "join_schedules",
    "tree_global_norm",
    "schedules",
    "tree",
    "ScaleByScheduleState",
    "TraceState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "MaskedState",
    "PartitionState",
    "InjectHyperparamsState",
    "ApplyIfFiniteState",
    "MultiStepsState",
    "graft",
    "GraftState",
    "scale_by_truegrad_adam",
    "scale_by_truegrad_laprop",
    "scale_by_truegrad_rmsprop",
    "ScaleByTrueGradAdamState",
    "ScaleByTrueGradLaPropState",
    "ScaleByTrueGradRmsPropState",
    "tg_adamw",
    "tg_laprop",
    "tg_rmsprop",
    "gradnorm",
    "uncertainty_weighting",
    "dwa",
    "fixed_weights",
    "loss_weights",
    "task_grad_norms",
    "weighted_grad_and_task_norms",
    "WeightedGrads",
    "GradNormState",
    "UncertaintyWeightingState",
    "DWAState",
    "FixedWeightsState",
    "InitReport",
    "gradinit",
    "gradinit_objective",
    "gradinit_scale_tx",
    "project_lower_bound",
    "scale_by_empirical_init",
    "ScaleByEmpiricalInitState",
    "empirical_init",
    "empirical_init_params",
    "state_to_dict",
    "state_from_dict",
    "upcast",
    "batched",
    "set_hyperparam",
    "get_hyperparam",
    "differentiable",
]

# --- torch_optimizers (issue 17: torch.optim's other optimizers) ---
from .torch_optimizers import (
    ScaleByAdadeltaState,
    ScaleByAdamaxState,
    ScaleByAsgdState,
    ScaleByNadamState,
    ScaleByRpropState,
    ScaleByRssState,
    adadelta,
    adagrad,
    adamax,
    asgd,
    averaged_params,
    nadam,
    radam,
    rmsprop,
    rprop,
    scale_by_adadelta,
    scale_by_adamax,
    scale_by_asgd,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rprop,
    scale_by_rss,
)

tree.register_state_types(ScaleByRssState, ScaleByAdadeltaState, ScaleByAdamaxState, ScaleByNadamState,
                          ScaleByRpropState, ScaleByAsgdState)
_TORCH_OPTIMIZERS_ALL = [
    "ScaleByRssState", "ScaleByAdadeltaState", "ScaleByAdamaxState", "ScaleByNadamState", "ScaleByRpropState",
    "ScaleByAsgdState", "scale_by_rss", "scale_by_adadelta", "scale_by_adamax", "scale_by_nadam", "scale_by_radam",
    "scale_by_rprop", "scale_by_asgd", "averaged_params", "adagrad", "adadelta", "adamax", "nadam", "radam",
    "rmsprop", "rprop", "asgd",
]
__all__ += _TORCH_OPTIMIZERS_ALL
# --- end torch_optimizers ---
