"""gradxform: optax-style gradient transformations for PyTorch.

The flat public API, as in optax:

    import gradxform as gx
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = gx.apply_updates(params, updates)

or, as a ``torch.optim.Optimizer``: ``opt = gx.Optimizer(model.parameters(), tx)``.
"""

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

# --- gradxform.combinators (issue 18: optax's combinators and utilities) ---
from . import combinators as _combinators
from .combinators import (
    ApplyEveryState,
    ConditionallyMaskState,
    ConditionallyTransformState,
    EmaState,
    LookaheadState,
    ParamsEmaState,
    ReduceLROnPlateauState,
    SkipIfState,
    ZeroNansState,
    apply_every,
    centralize,
    conditionally_mask,
    conditionally_transform,
    ema,
    ema_params,
    freeze,
    keep_params_nonnegative,
    lookahead,
    lookahead_params,
    named_chain,
    normalize_by_update_norm,
    params_ema,
    per_example_global_norm_clip,
    per_example_grads,
    per_example_layer_norm_clip,
    reduce_on_plateau,
    skip_if,
    skip_large_updates,
    skip_not_finite,
    zero_nans,
)

__all__ += _combinators.__all__
# --- end gradxform.combinators ---
# --- gradxform.contrib (optax.contrib's recent methods) ---
from .contrib import (  # noqa: E402
    ScheduleFreeState,
    ScaleByRmsDebiasedState,
    ProdigyState,
    DAdaptAdamWState,
    ScaleByAdemamixState,
    ScaleByAdoptState,
    SAMState,
    MadgradState,
    COCOBState,
    DoGState,
    schedule_free,
    schedule_free_eval_params,
    schedule_free_sgd,
    schedule_free_adamw,
    scale_by_rms_debiased,
    prodigy,
    dadapt_adamw,
    scale_by_ademamix,
    ademamix,
    scale_by_adopt,
    adopt,
    normalize,
    sam,
    scale_by_madgrad,
    madgrad,
    scale_by_cocob,
    cocob,
    scale_by_dog,
    dog,
)

__all__ += [
    "ScheduleFreeState",
    "ScaleByRmsDebiasedState",
    "ProdigyState",
    "DAdaptAdamWState",
    "ScaleByAdemamixState",
    "ScaleByAdoptState",
    "SAMState",
    "MadgradState",
    "COCOBState",
    "DoGState",
    "schedule_free",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "schedule_free_adamw",
    "scale_by_rms_debiased",
    "prodigy",
    "dadapt_adamw",
    "scale_by_ademamix",
    "ademamix",
    "scale_by_adopt",
    "adopt",
    "normalize",
    "sam",
    "scale_by_madgrad",
    "madgrad",
    "scale_by_cocob",
    "cocob",
    "scale_by_dog",
    "dog",
]
# --- end gradxform.contrib ---
# --- optax's optimizers and blocks (gradxform/optax_optimizers.py) ---
from .optax_optimizers import (  # noqa: E402
    AddNoiseState, OptaxAdamState, OptaxRpropState, ScaleByAdanState, ScaleByBeliefState,
    ScaleByDistanceOverGradientsState, ScaleByLionState, ScaleByNovogradState, ScaleByOptimisticGradientState,
    ScaleBySM3State, ScaleByYogiState, adabelief, adamaxw, adan, add_noise, amsgrad, fromage, lamb, lars, lion,
    nadamw, noisy_sgd, novograd, optax_rprop, optimistic_adam, optimistic_gradient_descent, polyak_sgd,
    scale_by_adan, scale_by_belief, scale_by_distance_over_gradients, scale_by_lion, scale_by_novograd,
    scale_by_optimistic_gradient, scale_by_param_block_norm, scale_by_param_block_rms, scale_by_polyak,
    scale_by_sign, scale_by_sm3, scale_by_trust_ratio, scale_by_yogi, sign_sgd, signum, sm3, yogi,
)

__all__ += [
    "ScaleByLionState", "ScaleByBeliefState", "ScaleByYogiState", "ScaleByNovogradState", "ScaleByAdanState",
    "ScaleBySM3State", "ScaleByOptimisticGradientState", "ScaleByDistanceOverGradientsState", "AddNoiseState",
    "OptaxAdamState", "OptaxRpropState", "scale_by_lion", "scale_by_belief", "scale_by_yogi", "scale_by_novograd",
    "scale_by_adan", "scale_by_sm3", "scale_by_trust_ratio", "scale_by_param_block_norm",
    "scale_by_param_block_rms", "scale_by_sign", "scale_by_polyak", "scale_by_optimistic_gradient",
    "scale_by_distance_over_gradients", "add_noise", "lion", "lamb", "lars", "adabelief", "yogi", "novograd",
    "adan", "sm3", "fromage", "sign_sgd", "signum", "noisy_sgd", "polyak_sgd", "optimistic_gradient_descent",
    "optimistic_adam", "amsgrad", "adamaxw", "nadamw", "optax_rprop",
]
# --- end optax_optimizers ---
# --- catalog: gradxform.structured (Adafactor, Muon, L-BFGS, SparseAdam) ---
from .structured import (
    FactoredRmsState,
    LbfgsState,
    OptaxFactoredRmsState,
    ScaleByMuonState,
    SparseAdamState,
    adafactor,
    lbfgs,
    muon,
    optax_adafactor,
    optax_scale_by_factored_rms,
    orthogonalize_via_newton_schulz,
    scale_by_factored_rms,
    scale_by_muon,
    sparse_adam,
    value_and_grad_from_closure,
)

__all__ += [
    "FactoredRmsState", "LbfgsState", "ScaleByMuonState", "SparseAdamState", "adafactor", "lbfgs", "muon",
    "orthogonalize_via_newton_schulz", "scale_by_factored_rms", "scale_by_muon", "sparse_adam",
    "value_and_grad_from_closure", "OptaxFactoredRmsState", "optax_adafactor", "optax_scale_by_factored_rms",
]
# --- end catalog: gradxform.structured ---
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
_TORCH_OPTIMIZERS_ALL = (
    "ScaleByRssState", "ScaleByAdadeltaState", "ScaleByAdamaxState", "ScaleByNadamState", "ScaleByRpropState",
    "ScaleByAsgdState", "scale_by_rss", "scale_by_adadelta", "scale_by_adamax", "scale_by_nadam", "scale_by_radam",
    "scale_by_rprop", "scale_by_asgd", "averaged_params", "adagrad", "adadelta", "adamax", "nadam", "radam",
    "rmsprop", "rprop", "asgd",
)
__all__ += _TORCH_OPTIMIZERS_ALL
# --- end torch_optimizers ---
