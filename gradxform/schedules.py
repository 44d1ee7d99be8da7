"""Step-count schedules for learning rates and other hyperparameters.

A schedule is a function ``count -> value`` where ``count`` is the 0-based
number of updates applied so far. The schedules here follow optax's names
and semantics.

Two kinds of ``count`` are accepted:

* a Python ``int``: the result is a Python ``float``;
* a ``torch.Tensor`` (normally a 0-d int64 tensor, on any device): the result
  is a float64 tensor of the same shape on the same device. It is computed
  with tensor ops only (no ``.item()``, no Python branching on tensor values),
  so a schedule can be traced by ``torch.compile(fullgraph=True)`` without a
  recompile each time the count changes.

Both kinds go through the same tensor formula; for ``int`` counts the result
is converted to ``float`` at the end. All hyperparameters are checked when a
schedule is built, and bad ones raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "Schedule",
    "ScalarOrSchedule",
    "constant_schedule",
    "linear_schedule",
    "polynomial_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "warmup_cosine_decay_schedule",
    "piecewise_constant_schedule",
    "join_schedules",
    "constant",
    "linear",
    "polynomial",
    "cosine_decay",
    "warmup_cosine_decay",
    "piecewise_constant",
    "join",
    "exponential",
]

Schedule = Callable[[int | torch.Tensor], float | torch.Tensor]
"""A function from the 0-based step count to a hyperparameter value."""

ScalarOrSchedule = float | torch.Tensor | Schedule
"""A hyperparameter that is either a fixed value or a schedule."""

_Core = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------


def _check_float(fn: str, name: str, value: object) -> float:
    """Return ``value`` as a finite Python float or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"{fn}: `{name}` must be a real number, got {value!r}.")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{fn}: `{name}` must be a scalar, got a tensor of shape {tuple(value.shape)}.")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{fn}: `{name}` must be finite, got {result!r}.")
    return result


def _check_int(fn: str, name: str, value: object) -> int:
    """Return ``value`` as a Python int (integral floats allowed) or raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{fn}: `{name}` must be an integer, got {value!r}.")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{fn}: `{name}` must be an integer, got {value!r}.")


def _check_begin(fn: str, value: object) -> int:
    begin = _check_int(fn, "transition_begin", value)
    if begin < 0:
        raise ValueError(f"{fn}: `transition_begin` must be >= 0, got {begin}.")
    return begin


# --------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------


def _count_tensor(count: object) -> torch.Tensor:
    """Turn a non-tensor count (Python/NumPy number) into a CPU tensor."""
    if isinstance(count, numbers.Integral) and not isinstance(count, bool):
        return torch.tensor(int(count), dtype=torch.int64)
    if isinstance(count, numbers.Real) and not isinstance(count, bool):
        return torch.tensor(float(count), dtype=torch.float64)
    raise TypeError(f"schedule count must be an int or a torch.Tensor, got {type(count).__name__}.")


def _f64(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64)


def _full(count: torch.Tensor, value: float) -> torch.Tensor:
    """A float64 tensor filled with ``value``, shaped and placed like ``count``."""
    return torch.full_like(count, value, dtype=torch.float64)


def _as_f64(value: float | torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bring the output of a (possibly user-written) schedule to float64 on count's device."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=torch.float64, device=count.device)
    return _full(count, float(value))


def _make_schedule(core: _Core, name: str) -> Schedule:
    """Wrap a tensor-only ``core`` so that it also takes Python ints and returns floats."""

    def schedule(count: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(count, torch.Tensor):
            return core(count)
        return float(core(_count_tensor(count)))

    schedule.__name__ = schedule.__qualname__ = name
    return schedule


# --------------------------------------------------------------------------
# Cores (tensor count in, float64 tensor out; no argument checking)
# --------------------------------------------------------------------------


def _constant_core(value: float) -> _Core:
    def core(count: torch.Tensor) -> torch.Tensor:
        return _full(count, value)

    return core


def _polynomial_core(init_value: float, end_value: float, power: float, steps: int, begin: int) -> _Core:
    if steps <= 0:
        return _constant_core(init_value)

    def core(count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_f64(count) - begin, min=0.0, max=float(steps))
        frac = 1.0 - t / steps
        return (init_value - end_value) * frac**power + end_value

    return core


def _cosine_core(init_value: float, decay_steps: int, alpha: float, exponent: float) -> _Core:
    def core(count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_f64(count), min=0.0, max=float(decay_steps))
        cosine = 0.5 * (1.0 + torch.cos(math.pi * t / decay_steps))
        return init_value * ((1.0 - alpha) * cosine**exponent + alpha)

    return core


def _join_core(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> _Core:
    def core(count: torch.Tensor) -> torch.Tensor:
        out = _as_f64(schedules[0](count), count)
        for boundary, schedule in zip(boundaries, schedules[1:]):
            later = _as_f64(schedule(count - boundary), count)
            out = torch.where(count < boundary, out, later)
        return out

    return core


# --------------------------------------------------------------------------
# Public schedules
# --------------------------------------------------------------------------


def constant_schedule(value: float) -> Schedule:
    """Schedule that always returns ``value``.

    Formula: value(count) = value.

    Args:
        value: the value at every step.

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if ``value`` is not a finite real number.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.constant_schedule(0.1)(7)
        0.1
    """
    value = _check_float("constant_schedule", "value", value)
    return _make_schedule(_constant_core(value), "constant_schedule")


def polynomial_schedule(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value``.

    Formula:
        t = clip(count - transition_begin, 0, transition_steps)
        value = (init_value - end_value) * (1 - t / transition_steps) ** power + end_value

    So the value is ``init_value`` up to ``transition_begin``, moves along the
    polynomial for ``transition_steps`` steps, and stays at ``end_value``
    afterwards. As in optax, ``transition_steps <= 0`` gives the constant
    schedule ``init_value``.

    Args:
        init_value: the value up to ``transition_begin``.
        end_value: the value after the transition.
        power: the exponent of the polynomial (> 0).
        transition_steps: the length of the transition.
        transition_begin: the step at which the transition starts.

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if a value is not finite, ``power <= 0``, a step argument
            is not an integer, or ``transition_begin < 0``.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.polynomial_schedule(1.0, 0.0, power=2, transition_steps=10)(5)
        0.25
    """
    fn = "polynomial_schedule"
    init_value = _check_float(fn, "init_value", init_value)
    end_value = _check_float(fn, "end_value", end_value)
    power = _check_float(fn, "power", power)
    if power <= 0:
        raise ValueError(f"{fn}: `power` must be > 0, got {power}.")
    steps = _check_int(fn, "transition_steps", transition_steps)
    begin = _check_begin(fn, transition_begin)
    return _make_schedule(_polynomial_core(init_value, end_value, power, steps, begin), fn)


def linear_schedule(
    init_value: float,
    end_value: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Linear transition from ``init_value`` to ``end_value``.

    Formula:
        t = clip(count - transition_begin, 0, transition_steps)
        value = init_value + (end_value - init_value) * t / transition_steps

    This is ``polynomial_schedule`` with ``power = 1``. As in optax,
    ``transition_steps <= 0`` gives the constant schedule ``init_value``.

    Args:
        init_value: the value up to ``transition_begin``.
        end_value: the value after the transition.
        transition_steps: the length of the transition.
        transition_begin: the step at which the transition starts.

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if a value is not finite, a step argument is not an
            integer, or ``transition_begin < 0``.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.linear_schedule(1.0, 0.0, transition_steps=10)(5)
        0.5
    """
    fn = "linear_schedule"
    init_value = _check_float(fn, "init_value", init_value)
    end_value = _check_float(fn, "end_value", end_value)
    steps = _check_int(fn, "transition_steps", transition_steps)
    begin = _check_begin(fn, transition_begin)
    return _make_schedule(_polynomial_core(init_value, end_value, 1.0, steps, begin), fn)


def cosine_decay_schedule(
    init_value: float,
    decay_steps: int,
    alpha: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value``.

    Formula:
        t = min(count, decay_steps)
        cosine = 0.5 * (1 + cos(pi * t / decay_steps))
        value = init_value * ((1 - alpha) * cosine ** exponent + alpha)

    After ``decay_steps`` the value stays at ``alpha * init_value``.

    Args:
        init_value: the value at step 0.
        decay_steps: the length of the decay (> 0).
        alpha: the final value as a fraction of ``init_value``, in [0, 1].
        exponent: the exponent of the cosine factor (> 0).

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if ``decay_steps`` is not a positive integer, ``alpha`` is
            outside [0, 1], ``exponent <= 0``, or a value is not finite.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.cosine_decay_schedule(1.0, decay_steps=10)(5)
        0.5
    """
    fn = "cosine_decay_schedule"
    init_value = _check_float(fn, "init_value", init_value)
    decay_steps = _check_int(fn, "decay_steps", decay_steps)
    if decay_steps <= 0:
        raise ValueError(f"{fn}: `decay_steps` must be > 0, got {decay_steps}.")
    alpha = _check_float(fn, "alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{fn}: `alpha` must be in [0, 1], got {alpha}.")
    exponent = _check_float(fn, "exponent", exponent)
    if exponent <= 0:
        raise ValueError(f"{fn}: `exponent` must be > 0, got {exponent}.")
    return _make_schedule(_cosine_core(init_value, decay_steps, alpha, exponent), fn)


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay (or growth, if ``decay_rate > 1``) of ``init_value``.

    Formula:
        p = (count - transition_begin) / transition_steps
        p = floor(p)                                   if staircase
        value = init_value                             if count <= transition_begin
        value = init_value * decay_rate ** p           otherwise
        value = max(value, end_value)                  if end_value is given and decay_rate < 1
        value = min(value, end_value)                  if end_value is given and decay_rate >= 1

    As in optax, ``transition_steps <= 0`` or ``decay_rate == 0`` gives the
    constant schedule ``init_value``.

    Args:
        init_value: the value up to ``transition_begin``.
        transition_steps: the steps over which the value is multiplied by ``decay_rate``.
        decay_rate: the factor per ``transition_steps`` (>= 0; > 1 grows).
        transition_begin: the step at which the decay starts.
        staircase: decay in whole periods (``floor``).
        end_value: a bound the value does not pass.

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if a value is not finite, ``decay_rate < 0``, a step
            argument is not an integer, or ``transition_begin < 0``.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.exponential_decay(1.0, transition_steps=10, decay_rate=0.5)(20)
        0.25
    """
    fn = "exponential_decay"
    init_value = _check_float(fn, "init_value", init_value)
    steps = _check_int(fn, "transition_steps", transition_steps)
    decay_rate = _check_float(fn, "decay_rate", decay_rate)
    if decay_rate < 0:
        raise ValueError(f"{fn}: `decay_rate` must be >= 0, got {decay_rate}.")
    begin = _check_begin(fn, transition_begin)
    end = None if end_value is None else _check_float(fn, "end_value", end_value)
    if steps <= 0 or decay_rate == 0.0:
        return _make_schedule(_constant_core(init_value), fn)
    staircase = bool(staircase)

    def core(count: torch.Tensor) -> torch.Tensor:
        elapsed = _f64(count) - begin
        p = elapsed / steps
        if staircase:
            p = torch.floor(p)
        decayed = torch.where(elapsed <= 0, init_value, init_value * torch.pow(decay_rate, p))
        if end is not None:
            decayed = torch.clamp(decayed, min=end) if decay_rate < 1.0 else torch.clamp(decayed, max=end)
        return decayed

    return _make_schedule(core, fn)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules`` one after another, switching at ``boundaries``.

    Formula, with boundaries b_1 <= ... <= b_n and schedules s_0, ..., s_n:
        value = s_0(count)           if count < b_1
        value = s_i(count - b_i)     if b_i <= count < b_{i+1}
        value = s_n(count - b_n)     if count >= b_n

    Each later schedule therefore starts again from count 0 at its boundary.

    Args:
        schedules: the schedules, in order (one more than ``boundaries``).
        boundaries: the steps at which the next schedule starts (from its own count 0).

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if ``len(schedules) != len(boundaries) + 1``, a schedule
            is not callable, or the boundaries are not integers in
            non-decreasing order.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.join_schedules([gx.constant_schedule(1.0), gx.constant_schedule(0.1)], [10])(12)
        0.1
    """
    fn = "join_schedules"
    schedules = list(schedules)
    boundaries = [_check_int(fn, "boundaries", b) for b in boundaries]
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"{fn}: need len(schedules) == len(boundaries) + 1, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries."
        )
    for i, schedule in enumerate(schedules):
        if not callable(schedule):
            raise ValueError(f"{fn}: `schedules[{i}]` must be callable, got {schedule!r}.")
    if any(a > b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"{fn}: `boundaries` must be sorted in non-decreasing order, got {boundaries}.")
    return _make_schedule(_join_core(schedules, boundaries), fn)


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup to ``peak_value`` followed by cosine decay to ``end_value``.

    ``decay_steps`` is the total length of the schedule, warmup included.
    Formula, with W = warmup_steps and D = decay_steps:
        value = init_value + (peak_value - init_value) * count / W     if count < W
        t = min(count - W, D - W)
        cosine = 0.5 * (1 + cos(pi * t / (D - W)))
        alpha = end_value / peak_value   (0 if peak_value == 0)
        value = peak_value * ((1 - alpha) * cosine ** exponent + alpha)  if count >= W

    For ``peak_value != 0`` the decay part equals
    ``end_value + (peak_value - end_value) * cosine ** exponent``.
    This is ``join_schedules([linear, cosine_decay], [W])``, as in optax.

    Args:
        init_value: the value at step 0.
        peak_value: the value at the end of the warmup.
        warmup_steps: the length of the linear warmup (>= 0).
        decay_steps: the total length, warmup included (> ``warmup_steps``).
        end_value: the value after ``decay_steps``.
        exponent: the exponent of the cosine factor (> 0).

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if ``warmup_steps < 0``, ``decay_steps <= warmup_steps``,
            ``exponent <= 0``, a step argument is not an integer, or a value
            is not finite.

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110)(5)
        0.5
    """
    fn = "warmup_cosine_decay_schedule"
    init_value = _check_float(fn, "init_value", init_value)
    peak_value = _check_float(fn, "peak_value", peak_value)
    end_value = _check_float(fn, "end_value", end_value)
    warmup_steps = _check_int(fn, "warmup_steps", warmup_steps)
    decay_steps = _check_int(fn, "decay_steps", decay_steps)
    if warmup_steps < 0:
        raise ValueError(f"{fn}: `warmup_steps` must be >= 0, got {warmup_steps}.")
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{fn}: `decay_steps` is the total length including warmup and must be "
            f"> warmup_steps, got decay_steps={decay_steps}, warmup_steps={warmup_steps}."
        )
    exponent = _check_float(fn, "exponent", exponent)
    if exponent <= 0:
        raise ValueError(f"{fn}: `exponent` must be > 0, got {exponent}.")
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    warmup = _make_schedule(_polynomial_core(init_value, peak_value, 1.0, warmup_steps, 0), "warmup")
    decay = _make_schedule(_cosine_core(peak_value, decay_steps - warmup_steps, alpha, exponent), "decay")
    return _make_schedule(_join_core([warmup, decay], [warmup_steps]), fn)


def piecewise_constant_schedule(
    init_value: float,
    boundaries_and_scales: Mapping[int, float] | None = None,
) -> Schedule:
    """Piecewise constant schedule that multiplies by a scale at each boundary.

    Formula:
        value = init_value * product of scale_b over all boundaries b with count >= b

    For example ``{100: 0.1, 200: 0.5}`` gives ``init_value`` for count < 100,
    ``0.1 * init_value`` for 100 <= count < 200 and ``0.05 * init_value`` from
    count 200 on.

    Args:
        init_value: the value before the first boundary.
        boundaries_and_scales: ``{step: scale}``; the value is multiplied by ``scale`` from ``step`` on.

    Returns:
        A `Schedule`: ``schedule(count)`` takes the 0-based step count (a Python int or a tensor)
        and returns the value (a float, or a float64 tensor for a tensor count).

    Raises:
        ValueError: if ``init_value`` is not finite, a boundary is not an
            integer, or a scale is negative or not finite (as in optax, scales
            must be non-negative).

    References:
        optax's ``optax.schedules`` (same formulas and edge cases); docs/three-ways.md, section 3.

    Example:
        >>> gx.piecewise_constant_schedule(1.0, {100: 0.1, 200: 0.5})(250)
        0.05
    """
    fn = "piecewise_constant_schedule"
    init_value = _check_float(fn, "init_value", init_value)
    items: list[tuple[int, float]] = []
    if boundaries_and_scales is not None:
        if not isinstance(boundaries_and_scales, Mapping):
            raise ValueError(
                f"{fn}: `boundaries_and_scales` must be a dict {{boundary: scale}} or None, "
                f"got {type(boundaries_and_scales).__name__}."
            )
        for boundary, scale in boundaries_and_scales.items():
            b = _check_int(fn, "boundaries_and_scales (boundary)", boundary)
            s = _check_float(fn, f"boundaries_and_scales[{b}]", scale)
            if s < 0:
                raise ValueError(f"{fn}: `boundaries_and_scales[{b}]` must be a non-negative scale, got {s}.")
            items.append((b, s))
        items.sort()

    def core(count: torch.Tensor) -> torch.Tensor:
        value = _full(count, init_value)
        for boundary, scale in items:
            value = torch.where(count >= boundary, value * scale, value)
        return value

    return _make_schedule(core, fn)


# Short aliases.
constant = constant_schedule
linear = linear_schedule
polynomial = polynomial_schedule
cosine_decay = cosine_decay_schedule
warmup_cosine_decay = warmup_cosine_decay_schedule
piecewise_constant = piecewise_constant_schedule
join = join_schedules
exponential = exponential_decay
