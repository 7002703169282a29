"""The retry schedule, computed in one place.

``CHANNELS_RETRY_SCHEDULE`` lists the delay before each attempt; the first
entry (0 by default) is the first attempt itself. After attempt *n* the next
delay is entry *n*, with ±jitter, raised to the receiver's ``Retry-After``
when that is longer (bounded, so a hostile receiver cannot park a delivery
for a year). Past the last entry the delivery is exhausted: a dead letter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from channels_core.settings import get_settings

__all__ = ["next_delay", "MAX_RETRY_AFTER"]

MAX_RETRY_AFTER = 24 * 3600.0


def next_delay(
    attempts_made: int,
    retry_after: float | None = None,
    *,
    schedule: Sequence[float] | None = None,
    jitter: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds until the next attempt, or ``None`` when attempts are exhausted."""
    settings = get_settings()
    steps = tuple(schedule) if schedule is not None else settings.retry_steps
    if attempts_made >= len(steps):
        return None
    base = float(steps[attempts_made])
    spread = settings.retry_jitter if jitter is None else jitter
    if base > 0 and spread > 0:
        base *= 1 + (rng or random).uniform(-spread, spread)
    if retry_after is not None and retry_after > base:
        base = min(float(retry_after), MAX_RETRY_AFTER)
    return max(0.0, base)
