"""When things are due: the next rotation of a secret, and the backoff after a failed step."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from ..config import SecretSettings
from ..schedule import next_cron_time

__all__ = ["RetryPolicy", "next_rotation_due"]


def next_rotation_due(secret: SecretSettings, last_started: datetime | None, now: datetime) -> datetime:
    """The next rotation is due one period after the last one started; at once if none ever did."""
    if last_started is None:
        return now
    if secret.every is not None:
        return last_started + secret.every
    assert secret.cron is not None  # config validation guarantees one of the two
    return next_cron_time(secret.cron, last_started)


class RetryPolicy:
    """Exponential backoff with full jitter on the upper half, capped."""

    def __init__(self, initial: timedelta, maximum: timedelta) -> None:
        self.initial = initial
        self.maximum = maximum

    def delay(self, attempt: int) -> timedelta:
        base = min(self.initial * (2 ** max(attempt - 1, 0)), self.maximum)
        delay: timedelta = base / 2 + base / 2 * random.random()
        return delay
