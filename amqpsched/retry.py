"""Retry timing: pure functions over a :class:`RetryPolicy`, unit-tested without a broker."""

from __future__ import annotations

import bisect

from .protocol import ErrorType, RetryPolicy

#: The delays (ms) the broker holds retries for: one TTL queue each. A computed delay is rounded
#: down to the nearest step (never below the first), so delays are exact to these steps.
DELAY_STEPS_MS: tuple[int, ...] = (
    100,
    250,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
)


def backoff_delay(policy: RetryPolicy, failed_attempt: int, rand: float) -> float:
    """Seconds to wait after attempt ``failed_attempt`` (1-based) failed. ``rand`` in [0, 1)."""
    base = policy.backoff * policy.multiplier ** (failed_attempt - 1)
    base = min(policy.backoff_max, base)
    return base * (1.0 - policy.jitter * rand)


def delay_step(seconds: float) -> int:
    """The broker-held delay (ms) used for a wanted delay of ``seconds``."""
    ms = seconds * 1000.0
    i = bisect.bisect_right(DELAY_STEPS_MS, ms) - 1
    return DELAY_STEPS_MS[max(i, 0)]


def retry_delay(
    policy: RetryPolicy,
    failed_attempt: int,
    error: ErrorType,
    now: float,
    deadline: float,
    rand: float,
) -> int | None:
    """Milliseconds until the next attempt, or None when the failure is final: the error type is
    not retried, the attempts are used up, or the next attempt would start after the deadline."""
    if error not in policy.retry_on or failed_attempt >= policy.max_attempts:
        return None
    step = delay_step(backoff_delay(policy, failed_attempt, rand))
    if now + step / 1000.0 >= deadline:
        return None
    return step
