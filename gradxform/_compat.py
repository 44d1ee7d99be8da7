"""What the installed torch can do: capability checks for features newer than the torch>=2.1 floor.

gradxform runs its core (every transform, `chain`, the schedules, ``torch.func`` use, checkpoints
of the state, the per-example engine) on torch 2.1 and later. A few features need a newer torch;
each has a check here, made by capability where torch offers one (its fused-supported-devices
query, ``hasattr``) and by version only where it does not. Callers degrade to the generic path
or raise an error naming the torch needed (`requirement`).

`FEATURES` is the one table of those features: the support matrix in the docs
(``docs/support.md``) and the reasons the tests skip with on an older torch are both read from
it, and a test keeps the three in agreement.

Nothing here is cached in a module-level variable: each check is a few attribute look-ups.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Callable

import torch

__all__ = [
    "Feature",
    "FEATURES",
    "torch_version",
    "requirement",
    "fused_adam_supported",
    "fused_sgd_supported",
    "fused_adagrad_supported",
    "has_fsdp2",
    "has_dcp_save",
    "has_amp_gradscaler_cpu",
    "has_safe_globals",
    "has_get_total_norm",
    "fullgraph_compile_supported",
    "compile_supported",
    "dynamo_traces_optree",
    "dynamo_reads_function_attributes",
    "dtensor_foreach_complete",
    "foreach_scalarlist_traceable",
]


def _parse_version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


# An immutable constant read once at import: parsing the string under torch.compile would trace it.
_TORCH_VERSION: tuple[int, int] = _parse_version(torch.__version__)


def torch_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed torch, e.g. ``(2, 1)`` for ``2.1.2+cu121``."""
    return _TORCH_VERSION


def _at_least(major: int, minor: int) -> bool:
    return _TORCH_VERSION >= (major, minor)


def _device_type(device: Any) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def fused_devices() -> list[str]:
    """torch's own list of device types with fused optimizer kernels (torch >= 2.1 has the query;
    it lists ``cpu`` from torch 2.4, when the CPU kernels appeared)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # not in any torch >= 2.1, kept for forks
        return ["cuda"]
    return list(_get_fused_kernels_supported_devices())


def _fused_ops_supported(ops: tuple[str, ...], device: Any) -> bool:
    """Whether every op in ``ops`` exists on ``torch`` and ``device``'s type is in torch's
    fused-supported-devices list."""
    return all(hasattr(torch, op) for op in ops) and _device_type(device) in fused_devices()


def fused_adam_supported(device: Any) -> bool:
    """Whether ``torch._fused_adam_`` / ``torch._fused_adamw_`` run on ``device``.

    True when both ops exist (CUDA since torch 2.0) and ``device``'s type is in torch's
    fused-supported-devices list (``torch.utils._foreach_utils._get_fused_kernels_supported_devices``;
    ``cpu`` is in it from torch 2.4, with the CPU kernels). On torch 2.1-2.3 it is False for CPU
    tensors: calling the op there raises ``NotImplementedError`` (measured on 2.1.2).

    Args:
        device: a ``torch.device``, a device string (``"cuda:0"``) or a tensor on the device.

    Returns:
        Whether the fused Adam/AdamW kernels can be called for tensors on ``device``.
    """
    return _fused_ops_supported(("_fused_adam_", "_fused_adamw_"), device)


def fused_sgd_supported(device: Any) -> bool:
    """Whether ``torch._fused_sgd_`` runs on ``device``.

    The op does not exist in torch 2.1 (measured on 2.1.2); it appeared later for CUDA and has
    CPU kernels from torch 2.4. True when the op exists and ``device``'s type is in torch's
    fused-supported-devices list.

    Args:
        device: a ``torch.device``, a device string or a tensor on the device.

    Returns:
        Whether the fused SGD kernel can be called for tensors on ``device``.
    """
    return _fused_ops_supported(("_fused_sgd_",), device)


def fused_adagrad_supported(device: Any) -> bool:
    """Whether ``torch._fused_adagrad_`` may run on ``device``.

    The op does not exist in torch 2.1 (measured on 2.1.2); it arrived with its CPU kernel in
    torch 2.4 (a CUDA kernel came later). True when the op exists and ``device``'s type is in
    torch's fused-supported-devices list; `gradxform.fastpath.kernel_supported` also runs it
    once on the device before the adapter relies on it.

    Args:
        device: a ``torch.device``, a device string or a tensor on the device.

    Returns:
        Whether the fused Adagrad kernel can be called for tensors on ``device``.
    """
    return _fused_ops_supported(("_fused_adagrad_",), device)


def has_fsdp2() -> bool:
    """Whether FSDP2's public ``torch.distributed.fsdp.fully_shard`` exists (torch 2.6; it was
    private as ``torch.distributed._composable.fsdp`` in 2.4-2.5, which gradxform does not use)."""
    if not torch.distributed.is_available():
        return False
    try:
        mod = importlib.import_module("torch.distributed.fsdp")
    except ImportError:
        return False
    return hasattr(mod, "fully_shard")


def has_dcp_save() -> bool:
    """Whether ``torch.distributed.checkpoint.save`` / ``load`` exist (torch 2.2; 2.1 only has
    ``save_state_dict``)."""
    if not torch.distributed.is_available():
        return False
    try:
        dcp = importlib.import_module("torch.distributed.checkpoint")
    except ImportError:
        return False
    return hasattr(dcp, "save") and hasattr(dcp, "load")


def has_amp_gradscaler_cpu() -> bool:
    """Whether ``torch.amp.GradScaler("cpu")`` exists (torch 2.3; before it only
    ``torch.cuda.amp.GradScaler``)."""
    return hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")


def has_safe_globals() -> bool:
    """Whether ``torch.serialization.add_safe_globals`` exists (torch 2.4), which lets
    ``torch.load(..., weights_only=True)`` rebuild gradxform's state NamedTuples."""
    return hasattr(torch.serialization, "add_safe_globals")


def has_get_total_norm() -> bool:
    """Whether ``torch.nn.utils.get_total_norm`` exists (torch 2.6)."""
    return hasattr(torch.nn.utils, "get_total_norm")


def dtensor_foreach_complete() -> bool:
    """Whether DTensor has sharding strategies for every foreach op gradxform uses: torch 2.13,
    where they are registered from the ops' pointwise tags. Before it several out-of-place ones
    have none (``aten._foreach_lerp.Scalar``, ``aten._foreach_maximum.List``: "found no DeviceMesh
    from dtensor args"), nor does ``aten.clamp_min`` (all measured on 2.8), so there gradxform's
    foreach ops run on the DTensors' local shards (every one is elementwise) and wrap the results
    back. Version-based: torch offers no query."""
    return _at_least(2, 13)


def foreach_sparse() -> bool:
    """Whether the foreach kernels take sparse (COO) tensors: torch 2.13 (measured); torch 2.1.2
    has none for the ``SparseCPU`` key (``aten::_foreach_mul.Scalar``), so there gradxform's
    foreach ops run such leaves one by one with the same per-tensor ops. Versions in between
    are treated as lacking them (untested). Version-based: torch offers no query."""
    return _at_least(2, 13)


def foreach_scalarlist_traceable() -> bool:
    """Whether dynamo can trace the ``ScalarList`` overloads of the foreach ops (a list of Python
    numbers, e.g. ``torch._foreach_div_(xs, [0.9, 0.99])``): they need a meta kernel, missing in
    torch 2.1 (measured on 2.1.2: ``could not find kernel for aten._foreach_div_.ScalarList at
    dispatch key Meta``) and present in 2.13. Versions in between are treated as lacking it
    (untested), which costs nothing but a per-leaf op in the traced graph."""
    return _at_least(2, 13)


def dynamo_traces_optree() -> bool:
    """Whether dynamo traces optree's C++ tree functions (``tree_flatten``, ``tree_unflatten``,
    ``PyTreeSpec`` methods) without a graph break: torch 2.13 (measured; 2.4 to 2.12 break or
    crash in their optree polyfills, 2.1 has none). `gradxform._traced_tree` flattens in plain
    Python under every trace; where this is true it also asks container classes with ``type()``
    (exactly optree's classes). Version-based: torch offers no query."""
    return _at_least(2, 13)


def dynamo_reads_function_attributes() -> bool:
    """Whether dynamo reads and sets attributes of a Python function while tracing (its
    ``__code__``, ``__dict__``, an attribute set on it): torch 2.13 (measured). Dynamo 2.1 does
    neither, not even ``getattr(fn, name, default)``, for a function made before the trace or
    inside it (measured on 2.1.2: "Unsupported hasattr: UserFunctionVariable"); 2.8 cannot read
    ``__code__`` of one made inside it. Where this is false, gradxform reads a transform's
    declarations (`gradxform.base.TransformInfo`) from the transform's ``info`` field under a
    trace, never from its functions. Version-based: torch offers no query."""
    return _at_least(2, 13)


def compile_supported() -> bool:
    """Whether ``torch.compile`` of a gradxform step (graph breaks allowed) runs: torch 2.1 and
    later (measured on 2.1.2 and 2.13)."""
    return _at_least(2, 1) and hasattr(torch, "compile")


def fullgraph_compile_supported() -> bool:
    """Whether ``torch.compile(step, fullgraph=True)`` of every gradxform step traces without a
    graph break: torch 2.13 (measured). From 2.1 most do (``FEATURES["fullgraph_compile_fixed"]``):
    the transforms with fixed hyperparameters, the aliases and ``inject_hyperparams`` (whose
    update rebuilds the inner transform with the current values inside the trace: the rebuilt
    transform carries its declarations in its ``info`` field, see
    `dynamo_reads_function_attributes`), ``chain`` and most combinators. The exceptions below
    2.13 (measured on 2.1.2, listed in docs/support.md) are a few catalog transforms whose code
    dynamo 2.1 cannot trace (``callable`` of a tensor, a raise inside the step, a path-keyed
    flatten), an extra argument given to a member rebuilt inside the trace whose update does not
    declare it in its ``info``, and ``gx.update_in_place``, whose compiled step is checked on
    2.13 only.

    Version-based: torch offers no query for what dynamo can trace.
    """
    return _at_least(2, 13)


@dataclasses.dataclass(frozen=True)
class Feature:
    """A feature that needs a torch newer than the 2.1 floor.

    Attributes:
        name: the key in `FEATURES` (and in the tests' ``needs(...)`` marks).
        min_torch: the lowest torch (``"2.4"``) where gradxform supports it.
        what: one line for the support matrix and the skip reasons.
        check: the capability check (``True`` when the installed torch has it).
        fallback: what gradxform does on an older torch.
    """

    name: str
    min_torch: str
    what: str
    check: Callable[[], bool]
    fallback: str

    def available(self) -> bool:
        return bool(self.check())


def _cpu_fused_adam() -> bool:
    return fused_adam_supported("cpu")


def _cpu_fused_sgd() -> bool:
    return fused_sgd_supported("cpu")


def _cpu_fused_adagrad() -> bool:
    return fused_adagrad_supported("cpu")


FEATURES: types.MappingProxyType[str, Feature] = types.MappingProxyType({
    f.name: f
    for f in (
        Feature("cpu_fused_adam", "2.4", "fused Adam/AdamW kernels on CPU (torch._fused_adamw_)", _cpu_fused_adam,
                "gx.Optimizer takes its foreach path"),
        Feature("cpu_fused_sgd", "2.4", "fused SGD kernel on CPU (torch._fused_sgd_)", _cpu_fused_sgd,
                "gx.Optimizer takes its foreach path"),
        Feature("cpu_fused_adagrad", "2.4", "fused Adagrad kernel on CPU (torch._fused_adagrad_)", _cpu_fused_adagrad,
                "gx.Optimizer takes its foreach path"),
        Feature("amp_gradscaler_cpu", "2.3", 'torch.amp.GradScaler("cpu")', has_amp_gradscaler_cpu,
                "use torch.cuda.amp.GradScaler on CUDA"),
        Feature("dcp_save", "2.2", "torch.distributed.checkpoint.save/load of the state", has_dcp_save,
                "torch.save/torch.load of the state"),
        Feature("weights_only_load", "2.4", "torch.load(weights_only=True) of the state (add_safe_globals)",
                has_safe_globals, "torch.load(weights_only=False) of a trusted file"),
        Feature("get_total_norm", "2.6", "torch.nn.utils.get_total_norm (test reference only)",
                has_get_total_norm, "tests compare with torch.nn.utils.clip_grad_norm_"),
        Feature("fsdp2", "2.8", "FSDP2 (torch.distributed.fsdp.fully_shard) with gradxform's state, on CPU/gloo",
                lambda: has_fsdp2() and _at_least(2, 8), "DDP, or the one-process path"),
        Feature("fsdp2_batched", "2.13", "gx.batched (torch.func.vmap) over FSDP2's DTensor leaves",
                lambda: has_fsdp2() and _at_least(2, 13), "gx.batched on plain tensors, or separate runs"),
        Feature("func_sdpa", "2.13", "torch.func (vmap, double backward) through scaled_dot_product_attention",
                lambda: _at_least(2, 13), "models without F.scaled_dot_product_attention (torch 2.1 lacks the batching "
                "rule and double backward of its flash kernel)"),
        Feature("fullgraph_compile_fixed", "2.1", "torch.compile(step, fullgraph=True) of most transforms: "
                "fixed hyperparameters, the aliases, inject_hyperparams, chain, most combinators "
                "(docs/support.md lists the exceptions)",
                compile_supported, "torch.compile with graph breaks"),
        Feature("fullgraph_compile", "2.13", "torch.compile(step, fullgraph=True) of every transform (the exceptions "
                "below 2.13 in docs/support.md), of gx.update_in_place and with a rate changed between steps",
                fullgraph_compile_supported, "torch.compile with graph breaks (from 2.1)"),
        Feature("compiled_adapter_step", "2.13", "torch.compile(opt.step) of gx.Optimizer",
                lambda: _at_least(2, 13), "the functional step compiled with graph breaks, or the eager adapter"),
        Feature("meta_foreach", "2.13", "torch._foreach_* kernels on the meta device (test-only: no-host-sync checks)",
                lambda: _at_least(2, 13), "the same checks on CPU tensors"),
    )
})


def requirement(name: str) -> str:
    """The sentence that names the torch a feature needs, e.g.
    ``"needs torch>=2.4: fused Adam/AdamW kernels on CPU (torch._fused_adamw_)"``.

    Used in error messages and in the tests' skip reasons.

    Args:
        name: a key of `FEATURES`.

    Returns:
        The sentence.

    Raises:
        KeyError: ``name`` is not a feature in `FEATURES`.
    """
    try:
        f = FEATURES[name]
    except KeyError:
        raise KeyError(f"unknown feature {name!r}; known: {', '.join(sorted(FEATURES))}") from None
    return f"needs torch>={f.min_torch}: {f.what} (installed: torch {torch.__version__})"
