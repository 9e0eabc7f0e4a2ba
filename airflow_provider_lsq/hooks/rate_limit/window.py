"""The account's window as leases: the rule every store applies, atomically, on its own clock.

A call holds a **lease** from the moment it is sent. When it is sent, the lease expires at
``send + hold`` (``hold`` = timeout + period + margin: what a call that never answers can cost); when its
answer (or error) comes, the lease is moved to ``answer + period + margin``. A new call is admitted only
while fewer leases are live than the allowed count. Why that bound is provable: LeadSquared counts a
call when it arrives, somewhere between its send and its answer; every call it counts in any window
``(t - period, t]`` was sent before ``t`` and answered after ``t - period``, so its lease is live at
``t``. At most ``allowed`` leases are ever live at once, so at most ``allowed`` calls fall in any of the
API's windows, whatever the network delay or jitter. The cost is the round trip, not a guessed margin.

The same state carries what every caller on the account must share: the pause after a refusal (the
API locks the whole account out for a window) and the adaptive allowed count (lowered at once on a
refusal, recovered gradually, never above the policy's cap, with calls spread out while it is
below the cap), and the daily call count.

Times are seconds on the store's clock (``time.time()`` for the one-machine stores, Redis's ``TIME``
for Redis), so a lease is comparable across every process sharing the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DAY_SECONDS = 86_400.0
HOUR_SECONDS = 3_600.0
# The daily count lives in hourly buckets; the last 25 cover at least any 24 h window the API may use.
DAILY_BUCKETS = 25
# While the allowed count is below the cap (the account was found busy), calls are spread out at
# least this share of ``period / allowed`` apart: a lockout then catches one or two of ours in flight,
# not a whole window's burst, and the steady rate (bound by the leases) is unchanged.
PACING = 0.5


@dataclass(frozen=True)
class Policy:
    """What one hook asks of the account's window.

    :param cap: most calls ever in flight-or-counted at once: ``rate_limit_calls`` less the reserve.
    :param period: the API's window, seconds.
    :param margin: extra seconds a lease is held past its answer (a user's option; 0 by default).
    :param hold: seconds a lease is held past its send until it is settled (timeout + period + margin).
    :param recovery_per_second: how fast the allowed count climbs back after a refusal, calls per second.
    :param decrease: the factor the allowed count is multiplied by on a refusal while it is below the cap
        (the account already known busy: a small step down from a level that was nearly right).
    :param first_decrease: the factor on a refusal at the cap after a calm spell (no decrease for
        ``calm`` seconds, or ever): the first sign of other traffic, so one large step rather than
        several lockouts walking down in small ones.
    :param calm: seconds without a decrease after which a refusal at the cap is a first sign again.
    :param daily_limit: calls per rolling day, or None.
    """

    cap: int
    period: float
    margin: float
    hold: float
    recovery_per_second: float
    decrease: float = 0.75
    first_decrease: float = 0.75
    calm: float = 0.0
    daily_limit: int | None = None

    @property
    def after_answer(self) -> float:
        """How long a settled lease lives past its answer."""
        return self.period + self.margin

    @property
    def pause(self) -> float:
        """How long every caller waits after a refusal: the API's lockout lasts one window."""
        return self.period + self.margin


@dataclass(frozen=True)
class Grant:
    """The answer to one acquire: a lease (``lease_id``, ``at`` on the store's clock), or why not.

    Without a lease, ``wait`` is the seconds until the window may have room (a lower bound when some
    live leases are still in flight: they may be settled sooner), or ``daily_spent`` is set.
    """

    lease_id: str | None
    at: float = 0.0
    wait: float = 0.0
    daily_spent: bool = False


@dataclass
class WindowState:
    """The shared state of one account, as the one-machine stores load and save it."""

    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expiry
    allowed: float | None = None  # None: the cap
    allowed_at: float = 0.0
    decreased_at: float = 0.0
    paused_until: float = 0.0
    last_grant: float = 0.0
    daily: dict[int, int] = field(default_factory=dict)  # hour number -> calls

    def bound(self, policy: Policy, now: float) -> None:
        """Pull back every stamp no caller could have written by ``now``, so no wait exceeds the
        policy's pause or hold: a pause to at most ``pause`` from now, a lease to at most ``hold`` from
        now, a decrease or grant in the future to now, a future hour's calls into this hour.

        The store is shared (the default file is writable by every local user) and clocks step back (a
        VM restored from a snapshot): without this, a ``paused_until`` years ahead stalls every task.
        Every operation applies it first, and the store saves what it pulled back.
        """
        self.paused_until = min(self.paused_until, now + policy.pause)
        self.allowed_at = min(self.allowed_at, now)
        self.decreased_at = min(self.decreased_at, now)
        self.last_grant = min(self.last_grant, now)
        if self.allowed is not None:
            self.allowed = min(max(self.allowed, 1.0), float(policy.cap))
        latest = now + policy.hold
        for lease, expiry in self.leases.items():
            if expiry > latest:
                self.leases[lease] = latest
        hour = int(now // HOUR_SECONDS)
        for ahead in [h for h in self.daily if h > hour]:
            self.daily[hour] = self.daily.get(hour, 0) + self.daily.pop(ahead)

    def limit(self, policy: Policy, now: float) -> int:
        """The allowed count now: recovering linearly from the last decrease, never above the cap."""
        if self.allowed is None:
            return policy.cap
        recovered = self.allowed + (now - self.allowed_at) * policy.recovery_per_second
        return max(1, min(policy.cap, math.floor(recovered)))

    def daily_calls(self, now: float) -> int:
        hour = int(now // HOUR_SECONDS)
        for old in [h for h in self.daily if h <= hour - DAILY_BUCKETS]:
            del self.daily[old]
        return sum(self.daily.values())

    def acquire(self, policy: Policy, now: float, lease_id: str) -> Grant:
        self.bound(policy, now)
        if self.paused_until > now:
            return Grant(None, wait=self.paused_until - now)
        for expired in [k for k, expiry in self.leases.items() if expiry <= now]:
            del self.leases[expired]
        limit = self.limit(policy, now)
        if len(self.leases) >= limit:
            expiries = sorted(self.leases.values())
            return Grant(None, wait=max(0.0, expiries[len(expiries) - limit] - now))
        if limit < policy.cap:
            spacing = PACING * policy.period / limit
            if now < self.last_grant + spacing:
                return Grant(None, wait=self.last_grant + spacing - now)
        if policy.daily_limit is not None and self.daily_calls(now) >= policy.daily_limit:
            return Grant(None, daily_spent=True)
        self.leases[lease_id] = now + policy.hold
        self.last_grant = now
        hour = int(now // HOUR_SECONDS)
        self.daily[hour] = self.daily.get(hour, 0) + 1
        return Grant(lease_id, at=now)

    def settle(self, policy: Policy, now: float, lease_id: str) -> None:
        """The answer came: the lease now ends one window (plus margin) after it."""
        self.bound(policy, now)
        expiry = now + policy.after_answer
        self.leases[lease_id] = min(self.leases.get(lease_id, expiry), expiry)

    def refused(self, policy: Policy, now: float, sent_at: float) -> None:
        """The API refused a call sent at ``sent_at``: pause everyone; lower the allowed count once.

        Calls in flight when the lockout began come back refused too; only the first refusal of a
        lockout, for a call sent after the last decrease, lowers the count again: by
        ``first_decrease`` at the cap after a calm spell, else by ``decrease``.
        """
        self.bound(policy, now)
        if now >= self.paused_until and sent_at >= self.decreased_at:
            current = self.limit(policy, now)
            calm = self.decreased_at == 0.0 or now - self.decreased_at >= policy.calm
            factor = policy.first_decrease if current >= policy.cap and calm else policy.decrease
            self.allowed = max(1.0, math.floor(current * factor))
            self.allowed_at = now
            self.decreased_at = now
        self.paused_until = max(self.paused_until, now + policy.pause)
