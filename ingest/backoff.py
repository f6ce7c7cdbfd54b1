"""Reconnect backoff: exponential growth, full jitter above a floor, a budget, a cool-down.

Pure: no clock, no sleep. The caller owns the time (it adds `delay_ns` to its `now_ns`)
and injects the random source (`random.Random(seed)` in tests, so sequences replay).

The policy, exactly
-------------------
Let ``base = reconnect_delay_s``, ``cap = max_reconnect_delay_s`` and ``n`` the number
of consecutive failures including the one just reported (n >= 1). Then::

    ceiling(n) = min(cap, base * 2**(n-1))
    delay(n)   = uniform(base, ceiling(n))          # integer ns, both ends included
    delay(n)   = max(delay(n), floor)               # floor: 5 s while Kraken is not
                                                    # online, else 0

so the first retry waits exactly ``base``, and every later one a random time between
``base`` and a ceiling that doubles up to ``cap``. "Full" jitter: the whole range above
the floor ``base`` is used, so a fleet of clients that lost the same server does not
come back in lockstep; never below ``base``, so there is no tight loop (AWS
architecture blog, "Exponential Backoff And Jitter", with ``base`` as the floor).

The 5 s floor is Kraken's own rule: "After maintenance or extended downtime: attempt
to reconnect no more quickly than once every five (5) seconds" (docs spot-ws-intro).

Budget: when ``n`` reaches ``max_reconnect_attempts`` the decision says ``halt``: the
caller raises a `PotentialHaltTriggerEvent` and waits ``halt_cooldown_s`` (exactly,
no jitter) before the next attempt. The failure count is not reset by the cool-down:
only `reset()`, called after a connection that stayed healthy for
``[ingest] healthy_after_s``, restores the budget. So during a long outage every
further failure is again a halt trigger followed by a full cool-down: one attempt per
cool-down, never a tight loop, and far under Cloudflare's ~150 connects per 10 minutes.

`jittered_ns` is the same formula without the budget, for other retries (the
subscription pacer's pause after "Exceeded msg rate").
"""

from __future__ import annotations

import random

import msgspec

NS_PER_S = 1_000_000_000
MAINTENANCE_FLOOR_S = 5.0  # Kraken: after maintenance, reconnect at most every 5 s

__all__ = ["NS_PER_S", "MAINTENANCE_FLOOR_S", "RetryDecision", "ReconnectBackoff",
           "jittered_ns", "seconds_to_ns"]


def seconds_to_ns(seconds: float) -> int:
    """Seconds (config floats) -> integer nanoseconds, rounded to the nearest ns."""
    return round(seconds * NS_PER_S)


def jittered_ns(rng: random.Random, base_ns: int, cap_ns: int, n: int) -> int:
    """uniform(base, min(cap, base * 2**(n-1))) in integer ns, both ends included.

    `n` >= 1 is the number of consecutive failures; `cap_ns` below `base_ns` means
    `base_ns`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if base_ns < 0:
        raise ValueError(f"base must be >= 0, got {base_ns}")
    ceiling = max(base_ns, min(cap_ns, base_ns << min(n - 1, 62)))
    return rng.randint(base_ns, ceiling)


class RetryDecision(msgspec.Struct, frozen=True):
    """What to do after a failure."""

    failures: int  # consecutive failures, this one included
    delay_ns: int  # wait this long before the next attempt
    halt: bool  # budget exhausted: raise a halt trigger; delay_ns is the cool-down


class ReconnectBackoff:
    """Consecutive-failure counter plus the delay policy above."""

    def __init__(self, rng: random.Random, *, base_s: float, cap_s: float,
                 max_attempts: int, cooldown_s: float) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got {base_s}, {cap_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be > 0, got {cooldown_s}")
        self._rng = rng
        self.base_ns = seconds_to_ns(base_s)
        self.cap_ns = seconds_to_ns(cap_s)
        self.max_attempts = max_attempts
        self.cooldown_ns = seconds_to_ns(cooldown_s)
        self._failures = 0

    @property
    def failures(self) -> int:
        """Consecutive failures since the last healthy connection."""
        return self._failures

    @property
    def next_attempt(self) -> int:
        """The number of the next connection attempt (1 after a healthy connection)."""
        return self._failures + 1

    def failure(self, floor_s: float = 0.0) -> RetryDecision:
        """Record one failure (a failed connect, or a connection that died unhealthy)."""
        self._failures += 1
        n = self._failures
        if n >= self.max_attempts:
            return RetryDecision(n, self.cooldown_ns, True)
        delay = jittered_ns(self._rng, self.base_ns, self.cap_ns, n)
        return RetryDecision(n, max(delay, seconds_to_ns(floor_s)), False)

    def reset(self) -> None:
        """A connection stayed healthy: the next failure is the first again."""
        self._failures = 0
