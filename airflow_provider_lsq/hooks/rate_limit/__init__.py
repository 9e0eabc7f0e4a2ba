"""The account's call budget, kept on the client so the API never has to refuse us.

LeadSquared limits calls per account (not per key), in a moving window: 25 calls per 5 s on the most
generous plan, shared with every other integration on the account. Modules:

- :mod:`.window`: the rule (leases held from send to answer + period; shared pause; adaptive rate);
- :mod:`.stores`: memory and the default SQLite file; :mod:`.redis_store`: Redis (atomic Lua);
- :mod:`.storage`: which store a connection names; :mod:`.limiter`: what the hook calls.
"""

from __future__ import annotations

from airflow_provider_lsq.hooks.rate_limit.limiter import AccountRateLimiter, Lease, policy_for

__all__ = ["AccountRateLimiter", "Lease", "policy_for"]
