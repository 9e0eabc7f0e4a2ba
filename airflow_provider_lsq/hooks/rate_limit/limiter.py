"""AccountRateLimiter: what a hook asks before each call, and tells after it.

``acquire`` waits for the account's window (and any shared pause) and returns a lease; ``release``
moves the lease's end to one window after the answer; ``refused`` tells every caller on the account
that LeadSquared refused a call (everyone pauses, the allowed rate drops, then recovers).
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.exceptions import LeadSquaredDailyLimitError, LeadSquaredStoppedError
from airflow_provider_lsq.hooks.rate_limit.storage import open_store
from airflow_provider_lsq.hooks.rate_limit.stores import MemoryLeaseStore, SqliteLeaseStore
from airflow_provider_lsq.hooks.rate_limit.window import Policy

if TYPE_CHECKING:
    from airflow_provider_lsq.hooks.config import LeadSquaredConfig
    from airflow_provider_lsq.hooks.rate_limit.stores import LeaseStore

log = logging.getLogger(__name__)
FIRST_DECREASE = 0.6  # the allowed count after a refusal at the cap, as a share of what it was
DECREASE = 0.95  # the same below the cap (the account known busy), floored: 1 call off 2..20, 2 off 21..40
RECOVERY_PERIODS_PER_CALL = 32.0  # then one more call per this many windows, up to the cap
CALM_PERIODS = 360.0  # windows without a decrease (30 min at 5 s) before FIRST_DECREASE applies again
_shared: dict[tuple[Any, ...], AccountRateLimiter] = {}
_shared_lock = threading.Lock()


@dataclass(frozen=True)
class Lease:
    """One call's place in the window: its id and its send time on the store's clock."""

    lease_id: str
    sent_at: float


def policy_for(config: LeadSquaredConfig) -> Policy:
    """The window a connection asks for: its plan less the reserve, held from send to answer + period.

    The first refusal at the cap after a calm spell (other traffic appearing: no decrease for 360
    windows, 30 min on a 5 s plan) drops the allowed count to 60% at once: one lockout to learn, not
    several walking down in small steps. Other refusals, the account known busy (or a cap the user
    already set low with ``rate_limit_reserve``), take 5% off, rounded down (one call off a level of
    2 to 20, two off 21 to 40: two at 22, the default cap on a 25-call plan),
    and the count climbs back by one call per 32 windows. Each lockout refuses every caller on the
    account, theirs too, for a whole window: a slow climb from a nearly right level keeps them rare,
    and small steps keep the level near the best one (lockouts grow steeply with the level, so a
    wide sawtooth costs more of them for the same average). Chosen with
    ``bench/coexistence_frontier.py``
    (the sandbox's exact rule, simulated for hours, another integration at 20% of the plan): the
    largest share of what the others leave with at most 2 refusals a minute and 10% of theirs refused
    (``docs/rate-limits.md`` has the table).
    """
    period = config.rate_limit_period_seconds
    return Policy(
        cap=max(1, int(config.rate_limit_calls * (1.0 - config.rate_limit_reserve))),
        period=period,
        margin=config.margin_seconds,
        hold=config.timeout_seconds + period + config.margin_seconds,
        recovery_per_second=1.0 / (RECOVERY_PERIODS_PER_CALL * period),
        decrease=DECREASE,
        first_decrease=FIRST_DECREASE,
        calm=CALM_PERIODS * period,
        daily_limit=config.daily_call_limit,
    )


class AccountRateLimiter:
    """Blocks each caller until the account's window has room; see :mod:`.window` for the bound.

    Threads of a process queue on a local lock, so one of them at a time asks the store: the shared
    store sees one poller per process, and the threads of a process are served in turn.
    """

    def __init__(self, config: LeadSquaredConfig, store: LeaseStore | None = None) -> None:
        self.policy = policy_for(config)
        self.store = store if store is not None else open_store(config)
        self._daily_limit = config.daily_call_limit
        # How often a waiter asks again while leases are in flight (their answers may free a place
        # before their expiry): a fraction of the spacing between calls, within reason.
        self._poll_seconds = min(0.05, max(0.005, self.policy.period / self.policy.cap / 4))
        self._turn = threading.Lock()

    @classmethod
    def for_account(cls, config: LeadSquaredConfig) -> AccountRateLimiter:
        """The one limiter of this process for the account, its limits and its storage: hooks share it."""
        key = (
            config.account_id,
            config.rate_limit_calls,
            config.rate_limit_period_seconds,
            config.rate_limit_reserve,
            config.margin_seconds,
            config.timeout_seconds,
            config.daily_call_limit,
            config.rate_limit_storage,
            config.rate_limit_redis_conn_id,
        )
        with _shared_lock:
            if key not in _shared:
                _shared[key] = cls(config)
            return _shared[key]

    def acquire(self, stop: threading.Event | None = None) -> Lease:
        """Wait for a place in the window (and out any shared pause).

        :param stop: when set while waiting, give up: the call is not sent.
        :raises LeadSquaredDailyLimitError: the day is spent.
        :raises LeadSquaredStoppedError: ``stop`` was set first.
        """
        stop = stop if stop is not None else threading.Event()
        while not self._turn.acquire(timeout=0.05):
            if stop.is_set():
                raise LeadSquaredStoppedError("The task is stopping: the call was not sent.")
        try:
            while True:
                if stop.is_set():
                    raise LeadSquaredStoppedError("The task is stopping: the call was not sent.")
                lease_id = uuid.uuid4().hex
                grant = self.store.acquire(self.policy, lease_id)
                if grant.lease_id is not None:
                    return Lease(grant.lease_id, grant.at)
                if grant.daily_spent:
                    raise LeadSquaredDailyLimitError(
                        f"The daily call limit of {self._daily_limit} set in the connection is spent for "
                        "the account over the last 24 hours; the remaining rows are left for a later run.",
                        exception_type="DailyCallLimitReached",
                    )
                poll = self._poll_seconds * random.uniform(0.5, 1.0)
                stop.wait(max(0.001, min(grant.wait, poll)))
        finally:
            self._turn.release()

    def release(self, lease: Lease) -> None:
        """The call's answer (or error) came: its lease ends one window from now."""
        self.store.settle(self.policy, lease.lease_id)

    def refused(self, lease: Lease) -> None:
        """LeadSquared refused the call of ``lease``: pause every caller, lower the shared rate."""
        self.store.refused(self.policy, lease.sent_at)
        local = isinstance(self.store, SqliteLeaseStore | MemoryLeaseStore)
        log.warning(
            "LeadSquared refused a call for the account's rate limit: every caller sharing %s pauses "
            "for %.1f s and slows down, then speeds up gradually.%s",
            self.store.description,
            self.policy.pause,
            " Task processes on other machines or pods do not share it: if tasks on this account run "
            "there (Celery, Kubernetes), set rate_limit_redis_conn_id in the connection extra so they "
            "share one budget; otherwise raise rate_limit_reserve."
            if local
            else "",
        )
