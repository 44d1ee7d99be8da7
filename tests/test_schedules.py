"""Tests for gradxform.schedules: values by hand / math / numpy, errors, compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradxform import schedules as S


def evaluate(schedule, count: int) -> tuple[float, float]:
    """Call ``schedule`` with an int and with a 0-d int64 tensor; check types; return both."""
    as_int = schedule(count)
    assert isinstance(as_int, float) and not isinstance(as_int, torch.Tensor)
    as_tensor = schedule(torch.tensor(count, dtype=torch.int64))
    assert isinstance(as_tensor, torch.Tensor)
    assert as_tensor.dtype == torch.float64
    assert as_tensor.shape == ()
    return as_int, float(as_tensor)


def check(schedule, expected: dict[int, float], rel: float = 1e-12, abs: float = 1e-12) -> None:
    for count, want in expected.items():
        got_int, got_tensor = evaluate(schedule, count)
        assert got_int == pytest.approx(want, rel=rel, abs=abs), f"int count {count}"
        assert got_tensor == pytest.approx(want, rel=rel, abs=abs), f"tensor count {count}"


# --------------------------------------------------------------------------- values


def test_constant():
    check(S.constant_schedule(0.25), {0: 0.25, 1: 0.25, 10**6: 0.25})


def test_linear():
    sched = S.linear_schedule(1.0, 0.0, transition_steps=10, transition_begin=5)
    check(sched, {0: 1.0, 5: 1.0, 6: 0.9, 10: 0.5, 14: 0.1, 15: 0.0, 100: 0.0})


def test_linear_increasing_and_nonpositive_steps():
    check(S.linear_schedule(0.0, 2.0, 4), {0: 0.0, 1: 0.5, 3: 1.5, 4: 2.0, 9: 2.0})
    # optax: transition_steps <= 0 -> constant init_value
    check(S.linear_schedule(3.0, 1.0, 0), {0: 3.0, 50: 3.0})
    check(S.linear_schedule(3.0, 1.0, -5), {0: 3.0, 50: 3.0})


def test_polynomial():
    sched = S.polynomial_schedule(1.0, 0.0, power=2, transition_steps=10)
    check(sched, {0: 1.0, 5: 0.25, 8: 0.04, 10: 0.0, 20: 0.0})
    sched = S.polynomial_schedule(2.0, 1.0, power=0.5, transition_steps=4, transition_begin=2)
    check(sched, {0: 2.0, 2: 2.0, 3: 1.0 + math.sqrt(0.75), 4: 1.0 + math.sqrt(0.5), 6: 1.0, 7: 1.0})


def test_cosine_decay_key_points():
    sched = S.cosine_decay_schedule(1.0, decay_steps=100)
    check(sched, {0: 1.0, 50: 0.5, 100: 0.0, 150: 0.0})
    sched = S.cosine_decay_schedule(2.0, decay_steps=100, alpha=0.1)
    check(sched, {0: 2.0, 50: 2.0 * 0.55, 100: 0.2, 1000: 0.2})
    sched = S.cosine_decay_schedule(1.0, decay_steps=100, exponent=2.0)
    check(sched, {0: 1.0, 25: (0.5 * (1 + math.cos(math.pi / 4))) ** 2, 50: 0.25, 100: 0.0})


def test_cosine_decay_matches_numpy():
    init, steps, alpha, exponent = 0.3, 37, 0.2, 1.5
    sched = S.cosine_decay_schedule(init, steps, alpha=alpha, exponent=exponent)
    counts = np.arange(0, 60)
    t = np.minimum(counts, steps)
    want = init * ((1 - alpha) * (0.5 * (1 + np.cos(np.pi * t / steps))) ** exponent + alpha)
    got = [sched(int(c)) for c in counts]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    got_t = sched(torch.arange(0, 60))  # elementwise on a 1-d count tensor too
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-12, atol=1e-15)


def test_exponential_decay():
    check(S.exponential_decay(1.0, 10, 0.5), {0: 1.0, 5: 0.5**0.5, 10: 0.5, 15: 0.5**1.5, 30: 0.125})
    check(S.exponential_decay(1.0, 10, 0.5, staircase=True), {0: 1.0, 9: 1.0, 10: 0.5, 19: 0.5, 20: 0.25})
    check(S.exponential_decay(1.0, 10, 0.5, transition_begin=5), {0: 1.0, 5: 1.0, 15: 0.5, 25: 0.25})
    check(S.exponential_decay(1.0, 10, 0.5, end_value=0.3), {0: 1.0, 10: 0.5, 20: 0.3, 100: 0.3})
    # growth with decay_rate > 1 is capped from above by end_value
    check(S.exponential_decay(1.0, 10, 2.0, end_value=3.0), {0: 1.0, 10: 2.0, 20: 3.0, 50: 3.0})
    # optax: zero decay_rate or non-positive transition_steps -> constant
    check(S.exponential_decay(0.7, 10, 0.0), {0: 0.7, 100: 0.7})
    check(S.exponential_decay(0.7, 0, 0.5), {0: 0.7, 100: 0.7})


def test_warmup_cosine_decay():
    # decay_steps is the total length: warmup 10 steps, then cosine over 100 steps.
    sched = S.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1)
    check(sched, {0: 0.0, 5: 0.5, 9: 0.9, 10: 1.0, 60: 0.1 + 0.9 * 0.5, 110: 0.1, 500: 0.1})
    counts = np.arange(10, 120)
    t = np.minimum(counts - 10, 100)
    want = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t / 100))
    np.testing.assert_allclose([sched(int(c)) for c in counts], want, rtol=1e-12, atol=1e-15)


def test_warmup_cosine_decay_no_warmup_and_exponent():
    sched = S.warmup_cosine_decay_schedule(0.5, 2.0, warmup_steps=0, decay_steps=10, exponent=2.0)
    check(sched, {0: 2.0, 5: 2.0 * 0.25, 10: 0.0, 11: 0.0})


def test_piecewise_constant_boundaries():
    sched = S.piecewise_constant_schedule(1.0, {20: 0.5, 10: 0.1})  # unsorted dict on purpose
    check(sched, {0: 1.0, 9: 1.0, 10: 0.1, 19: 0.1, 20: 0.05, 1000: 0.05})
    check(S.piecewise_constant_schedule(0.3), {0: 0.3, 100: 0.3})
    check(S.piecewise_constant_schedule(0.3, {}), {0: 0.3, 100: 0.3})
    check(S.piecewise_constant_schedule(2.0, {0: 3.0, 5: 0.0}), {0: 6.0, 4: 6.0, 5: 0.0})


def test_join_boundaries_and_shifted_count():
    sched = S.join_schedules([S.constant_schedule(1.0), S.linear_schedule(0.0, 10.0, 10)], [5])
    # at the boundary the second schedule sees count 0, then count - 5
    check(sched, {0: 1.0, 4: 1.0, 5: 0.0, 7: 2.0, 15: 10.0, 100: 10.0})


def test_join_three_schedules_and_plain_callables():
    seen: list[int] = []

    def recorder(count):
        seen.append(int(count))
        return 7.0  # a plain float output is accepted

    sched = S.join_schedules([S.constant_schedule(1.0), S.constant_schedule(2.0), recorder], [3, 6])
    check(sched, {0: 1.0, 2: 1.0, 3: 2.0, 5: 2.0, 6: 7.0, 9: 7.0})
    assert 3 in seen  # called with count 9 - 6


def test_tensor_count_keeps_device():
    sched = S.warmup_cosine_decay_schedule(0.0, 1.0, 5, 20)
    out = sched(torch.tensor(3, dtype=torch.int64, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == ()
    if torch.cuda.is_available():
        out = sched(torch.tensor(3, dtype=torch.int64, device="cuda"))
        assert out.device.type == "cuda"
        assert float(out) == pytest.approx(0.6)


def test_aliases():
    assert S.constant is S.constant_schedule
    assert S.linear is S.linear_schedule
    assert S.polynomial is S.polynomial_schedule
    assert S.cosine_decay is S.cosine_decay_schedule
    assert S.warmup_cosine_decay is S.warmup_cosine_decay_schedule
    assert S.piecewise_constant is S.piecewise_constant_schedule
    assert S.join is S.join_schedules
    assert S.exponential is S.exponential_decay
    for name in S.__all__:
        assert hasattr(S, name), name


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: S.cosine_decay_schedule(1.0, -5), "decay_steps"),
        (lambda: S.cosine_decay_schedule(1.0, 0), "decay_steps"),
        (lambda: S.cosine_decay_schedule(1.0, 10.5), "decay_steps"),
        (lambda: S.cosine_decay_schedule(1.0, 10, alpha=1.5), "alpha"),
        (lambda: S.cosine_decay_schedule(1.0, 10, alpha=-0.1), "alpha"),
        (lambda: S.cosine_decay_schedule(1.0, 10, exponent=0.0), "exponent"),
        (lambda: S.cosine_decay_schedule(float("nan"), 10), "init_value"),
        (lambda: S.constant_schedule(float("inf")), "value"),
        (lambda: S.linear_schedule(1.0, 0.0, 10, transition_begin=-1), "transition_begin"),
        (lambda: S.linear_schedule(1.0, "x", 10), "end_value"),
        (lambda: S.polynomial_schedule(1.0, 0.0, 0.0, 10), "power"),
        (lambda: S.exponential_decay(1.0, 10, -0.5), "decay_rate"),
        (lambda: S.exponential_decay(1.0, 10, 0.5, end_value=float("nan")), "end_value"),
        (lambda: S.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "decay_steps"),
        (lambda: S.warmup_cosine_decay_schedule(0.0, 1.0, -1, 10), "warmup_steps"),
        (lambda: S.piecewise_constant_schedule(1.0, {10: float("inf")}), "boundaries_and_scales"),
        (lambda: S.piecewise_constant_schedule(1.0, {10: -0.1}), "boundaries_and_scales"),
        (lambda: S.piecewise_constant_schedule(1.0, [(10, 0.1)]), "boundaries_and_scales"),
        (lambda: S.join_schedules([S.constant(1.0)], [5]), "len\\(schedules\\)"),
        (lambda: S.join_schedules([S.constant(1.0)] * 3, [10, 5]), "boundaries"),
        (lambda: S.join_schedules([S.constant(1.0), 2.0], [5]), "schedules\\[1\\]"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------- compile


def test_compiles_once_and_matches_eager():
    from torch._dynamo.testing import CompileCounter

    sched = S.warmup_cosine_decay_schedule(0.1, 1.0, warmup_steps=3, decay_steps=8, end_value=0.05)

    def fn(count: torch.Tensor) -> torch.Tensor:
        return sched(count)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
    for i in range(10):
        count = torch.tensor(i, dtype=torch.int64)
        got = compiled(count)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        assert float(got) == pytest.approx(sched(i), rel=1e-12, abs=1e-15)
        assert float(got) == pytest.approx(float(fn(count)), rel=1e-12, abs=1e-15)
    assert counter.frame_count == 1
    torch._dynamo.reset()
