"""ingest.backoff: exponential backoff with full jitter, floor, budget and cool-down."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.backoff import (
    MAINTENANCE_FLOOR_S,
    NS_PER_S,
    ReconnectBackoff,
    jittered_ns,
    seconds_to_ns,
)

S = NS_PER_S


def make(seed: int = 7, **kw) -> ReconnectBackoff:
    args = {"base_s": 1.0, "cap_s": 60.0, "max_attempts": 10, "cooldown_s": 300.0} | kw
    return ReconnectBackoff(random.Random(seed), **args)


def test_first_retry_waits_exactly_the_base() -> None:
    d = make().failure()
    assert (d.failures, d.delay_ns, d.halt) == (1, 1 * S, False)


def test_delays_stay_between_base_and_a_doubling_ceiling_up_to_the_cap() -> None:
    b = make(max_attempts=1000)
    for n in range(1, 40):
        d = b.failure()
        ceiling = min(60 * S, S * 2 ** (n - 1))
        assert d.failures == n
        assert S <= d.delay_ns <= ceiling, (n, d.delay_ns)


def test_the_sequence_replays_with_the_same_seed_and_differs_with_another() -> None:
    def seq(seed: int) -> list[int]:
        b = make(seed, max_attempts=100)
        return [b.failure().delay_ns for _ in range(9)]

    assert seq(3) == seq(3)
    assert seq(3) != seq(4)


def test_jitter_uses_the_whole_range() -> None:
    # Attempt 6: ceiling min(60, 2**5) = 32 s. 2000 draws cover the range, not a point.
    delays = []
    for seed in range(2000):
        b = make(seed)
        for _ in range(5):
            b.failure()
        delays.append(b.failure().delay_ns)
    assert min(delays) < 3 * S and max(delays) > 30 * S
    assert len(set(delays)) > 1900
    mean = sum(delays) / len(delays)
    assert 15 * S < mean < 18.5 * S  # uniform(1, 32): mean 16.5 s


def test_maintenance_floor_is_five_seconds() -> None:
    b = make()
    assert b.failure(MAINTENANCE_FLOOR_S).delay_ns == 5 * S  # base 1 s lifted to 5 s
    for _ in range(7):
        assert b.failure(MAINTENANCE_FLOOR_S).delay_ns >= 5 * S


def test_budget_then_halt_and_cooldown_every_time_until_reset() -> None:
    b = make(max_attempts=3, cooldown_s=300.0)
    assert [b.failure().halt for _ in range(2)] == [False, False]
    third = b.failure()
    assert third.halt and third.delay_ns == 300 * S and third.failures == 3
    fourth = b.failure()  # the cool-down restores nothing: still over budget
    assert fourth.halt and fourth.delay_ns == 300 * S and fourth.failures == 4
    assert b.next_attempt == 5
    b.reset()  # a connection stayed healthy
    assert b.next_attempt == 1
    again = b.failure()
    assert (again.failures, again.delay_ns, again.halt) == (1, 1 * S, False)


def test_a_budget_of_one_halts_on_the_first_failure() -> None:
    d = make(max_attempts=1).failure()
    assert d.halt and d.delay_ns == 300 * S


@given(base=st.integers(1, 10**11), cap=st.integers(0, 10**12), n=st.integers(1, 500),
       seed=st.integers(0, 2**32))
def test_jittered_ns_bounds(base: int, cap: int, n: int, seed: int) -> None:
    d = jittered_ns(random.Random(seed), base, cap, n)
    assert base <= d <= max(base, min(cap, base * 2 ** (n - 1)))


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        jittered_ns(random.Random(), S, S, 0)
    with pytest.raises(ValueError):
        make(base_s=2.0, cap_s=1.0)
    with pytest.raises(ValueError):
        make(max_attempts=0)
    with pytest.raises(ValueError):
        make(cooldown_s=0.0)


def test_seconds_to_ns_rounds_exactly() -> None:
    assert seconds_to_ns(0.1) == 100_000_000
    assert seconds_to_ns(1.5) == 1_500_000_000
