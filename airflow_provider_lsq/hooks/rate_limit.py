"""The account's call budget, kept on the client so the API never has to refuse us.

LeadSquared limits calls per account (not per key), in a moving window: 25 calls per 5 s on the most
generous plan. Budgets are sliding-window logs from pyrate-limiter, in this process's memory (shared
by every hook on the same account in the process) or in Redis (shared by every process and machine).
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING

from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate, RedisBucket

from airflow_provider_lsq.exceptions import LeadSquaredDailyLimitError

if TYPE_CHECKING:
    from pyrate_limiter import AbstractBucket

    from airflow_provider_lsq.hooks.config import LeadSquaredConfig

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_shared: dict[tuple, AccountRateLimiter] = {}
_shared_lock = threading.Lock()


class AccountRateLimiter:
    """Blocks each caller until the account's window has room for one more call.

    The window is ``period + margin`` long: calls reach the API later than they leave and bunch up on
    the way, so counting ``calls`` per exactly ``period`` on our clock would still be refused now and
    then on the API's. After a server-side refusal, :meth:`pause` holds every caller until the API's
    lockout has passed, instead of letting them burn retries against it.
    """

    def __init__(self, config: LeadSquaredConfig) -> None:
        self.calls = config.rate_limit_calls
        self.window_seconds = config.rate_limit_period_seconds + config.margin_seconds
        window = Rate(self.calls, round(self.window_seconds * 1000))
        daily = Rate(config.daily_call_limit, Duration.DAY) if config.daily_call_limit else None
        self.storage = config.rate_limit_storage
        key = f"leadsquared:{config.account_id}"
        self._window = Limiter(self._bucket([window], f"{key}:window"))
        self._daily = Limiter(self._bucket([daily], f"{key}:daily")) if daily else None
        self._daily_limit = config.daily_call_limit
        # How often a waiting caller asks again: a fraction of the spacing between calls, within reason.
        self._poll_seconds = min(0.05, max(0.01, self.window_seconds / self.calls / 2))
        self._paused_until = 0.0
        self._pause_lock = threading.Lock()

    def _bucket(self, rates: list[Rate], key: str) -> AbstractBucket:
        if self.storage:
            import redis

            client = redis.Redis.from_url(self.storage)
            return RedisBucket.init(rates, client, key)
        return InMemoryBucket(rates)

    @classmethod
    def for_account(cls, config: LeadSquaredConfig) -> AccountRateLimiter:
        """The one limiter of this process for the account and its limits: hooks share it."""
        key = (
            config.account_id,
            config.rate_limit_calls,
            config.rate_limit_period_seconds,
            config.margin_seconds,
            config.daily_call_limit,
            config.rate_limit_storage,
        )
        with _shared_lock:
            if key not in _shared:
                _shared[key] = cls(config)
            return _shared[key]

    def pause(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` (the API refused a call and locks the account out)."""
        with self._pause_lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def acquire(self) -> None:
        """Wait for a slot in the window; raise at once when the daily cap is spent."""
        while (delay := self._paused_until - time.monotonic()) > 0:
            time.sleep(delay)
        if self._daily is not None and not self._daily.try_acquire("daily", blocking=False):
            raise LeadSquaredDailyLimitError(
                f"The daily call limit of {self._daily_limit} set in the connection is spent for the last "
                "24 hours; the remaining rows are left for a later run.",
                exception_type="DailyCallLimitReached",
            )
        # Ask without blocking and poll: each try is stamped with the clock's time at that moment. The
        # library's own blocking wait stamps a retried call with its planned time instead, and a shared
        # Redis window then misses calls other processes stamped later, admitting one call too many.
        while not self._window.try_acquire("window", blocking=False):
            time.sleep(self._poll_seconds * random.uniform(0.5, 1.0))
