"""A call that must fit two of the account's windows: the bulk call's own, and the account's.

``Lead/Bulk/CreateOrUpdate`` has "a separate, lower rate limit" (API notes, "Lead APIs"); the notes do
not say whether it also counts against the account's limit, so a bulk call takes a place in both
(it costs the account's window one call in 25 records, and is never refused for that window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from airflow_provider_lsq.hooks.rate_limit.limiter import Lease

if TYPE_CHECKING:
    import threading

    from airflow_provider_lsq.hooks.rate_limit.limiter import AccountRateLimiter
    from airflow_provider_lsq.hooks.rate_limit.stores import LeaseStore


class CallBudget(Protocol):
    """What the hook's call path asks of a budget (:class:`AccountRateLimiter` is one)."""

    @property
    def store(self) -> LeaseStore: ...

    def acquire(self, stop: threading.Event | None = None) -> Lease: ...

    def release(self, lease: Lease) -> None: ...

    def refused(self, lease: Lease) -> None: ...


@dataclass(frozen=True)
class PairedLease(Lease):
    """The bulk window's lease (its own id and send time) with the account window's lease."""

    account: Lease


class PairedLimiter:
    """Waits for the bulk window first, then the account's; releases both; a refusal is the bulk one's.

    The bulk window is acquired first: its wait is the long one (a call per several seconds), and no
    place in the account's window is held while waiting for it. A refusal of a bulk call pauses and
    slows the bulk window only: it is the bulk call's own limit that refused (the account's window,
    which other calls share, is not taken down by a bulk plan set too high).
    """

    def __init__(self, bulk: AccountRateLimiter, account: AccountRateLimiter) -> None:
        self.bulk = bulk
        self.account = account

    @property
    def store(self) -> LeaseStore:
        return self.bulk.store

    def acquire(self, stop: threading.Event | None = None) -> Lease:
        """A place in both windows.

        :raises LeadSquaredDailyLimitError: the account's day is spent (the bulk place is given back).
        :raises LeadSquaredStoppedError: ``stop`` was set while waiting.
        """
        bulk = self.bulk.acquire(stop)
        try:
            account = self.account.acquire(stop)
        except BaseException:
            self.bulk.release(bulk)
            raise
        return PairedLease(bulk.lease_id, bulk.sent_at, account)

    def release(self, lease: Lease) -> None:
        """The call's answer came: both places end one window from now."""
        try:
            self.bulk.release(lease)
        finally:
            if isinstance(lease, PairedLease):
                self.account.release(lease.account)

    def refused(self, lease: Lease) -> None:
        self.bulk.refused(lease)


__all__ = ["CallBudget", "PairedLease", "PairedLimiter"]
