"""The account's window in Redis: shared by every process on every machine that uses the same server.

The same rule as :class:`~.window.WindowState`, written as Lua scripts so each operation is atomic on
the server, on the server's clock (``TIME``), so machines with drifting clocks still agree. Keys share
one hash tag (``{leadsquared:<account>}``), so they stay on one node of a Redis Cluster:

- ``…:leases``: a sorted set, lease id scored by its expiry;
- ``…:state``: a hash with ``allowed``, ``allowed_at``, ``decreased_at`` and ``paused_until``;
- ``…:daily``: a hash, hour number -> calls in that hour (the last 25 hours are kept).

Every key expires on its own once unused, so nothing needs cleaning up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.hooks.rate_limit.window import DAILY_BUCKETS, HOUR_SECONDS, PACING, Grant

if TYPE_CHECKING:
    import redis

    from airflow_provider_lsq.hooks.rate_limit.window import Policy

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function limit(cap, recovery)
    local st = redis.call('HMGET', KEYS[2], 'allowed', 'allowed_at')
    if not st[1] then return cap end
    local recovered = tonumber(st[1]) + (now - tonumber(st[2])) * recovery
    return math.max(1, math.min(cap, math.floor(recovered)))
end
-- WindowState.bound: a server clock stepped back leaves stamps ahead of now; pull them back so no
-- wait exceeds the pause or the hold.
local function bound(pause, hold)
    local names = {'paused_until', 'allowed_at', 'decreased_at', 'last_grant'}
    local latest = {now + pause, now, now, now}
    local st = redis.call('HMGET', KEYS[2], unpack(names))
    for i = 1, 4 do
        if st[i] and tonumber(st[i]) > latest[i] then
            redis.call('HSET', KEYS[2], names[i], tostring(latest[i]))
        end
    end
    for _, lease in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. tostring(now + hold), '+inf')) do
        redis.call('ZADD', KEYS[1], now + hold, lease)
    end
end
"""

# ARGV: cap, hold, recovery, daily_limit (0: none), lease id, period, pause. Returns {kind, number}.
_ACQUIRE = (
    _PRELUDE
    + f"""
local cap, hold, recovery = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local daily_limit, lease, period = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
bound(tonumber(ARGV[7]), hold)
local paused = tonumber(redis.call('HGET', KEYS[2], 'paused_until') or '0')
if paused > now then return {{'wait', tostring(paused - now)}} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local allowed = limit(cap, recovery)
local live = redis.call('ZCARD', KEYS[1])
if live >= allowed then
    local e = redis.call('ZRANGE', KEYS[1], live - allowed, live - allowed, 'WITHSCORES')
    return {{'wait', tostring(math.max(0, tonumber(e[2]) - now))}}
end
if allowed < cap then
    local last = tonumber(redis.call('HGET', KEYS[2], 'last_grant') or '0')
    local spacing = {PACING} * period / allowed
    if now < last + spacing then return {{'wait', tostring(last + spacing - now)}} end
    redis.call('HSET', KEYS[2], 'last_grant', tostring(now))
end
local hour = math.floor(now / {HOUR_SECONDS})
if daily_limit > 0 then
    local total = 0
    local buckets = redis.call('HGETALL', KEYS[3])
    for i = 1, #buckets, 2 do
        if tonumber(buckets[i]) <= hour - {DAILY_BUCKETS} then
            redis.call('HDEL', KEYS[3], buckets[i])
        else
            total = total + tonumber(buckets[i + 1])
        end
    end
    if total >= daily_limit then return {{'daily', '0'}} end
end
redis.call('ZADD', KEYS[1], now + hold, lease)
redis.call('PEXPIRE', KEYS[1], math.ceil(hold * 1000) + 1000)
redis.call('HINCRBY', KEYS[3], tostring(hour), 1)
redis.call('EXPIRE', KEYS[3], {int((DAILY_BUCKETS + 1) * HOUR_SECONDS)})
return {{'ok', tostring(now)}}
"""
)

# ARGV: seconds a settled lease lives, lease id.
_SETTLE = (
    _PRELUDE
    + """
local expiry = now + tonumber(ARGV[1])
local current = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not current or expiry < tonumber(current) then redis.call('ZADD', KEYS[1], expiry, ARGV[2]) end
return 1
"""
)

# ARGV: cap, recovery, decrease, pause seconds, sent_at, first decrease (at the cap after calm), calm,
# hold.
_REFUSED = (
    _PRELUDE
    + """
local cap, recovery, decrease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local pause, sent_at, first = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
bound(pause, tonumber(ARGV[8]))
local st = redis.call('HMGET', KEYS[2], 'paused_until', 'decreased_at')
local paused, decreased = tonumber(st[1] or '0'), tonumber(st[2] or '0')
if now >= paused and sent_at >= decreased then
    local current = limit(cap, recovery)
    local factor = decrease
    if current >= cap and (decreased == 0 or now - decreased >= tonumber(ARGV[7])) then factor = first end
    local lowered = math.max(1, math.floor(current * factor))
    redis.call('HSET', KEYS[2], 'allowed', tostring(lowered), 'allowed_at', tostring(now),
               'decreased_at', tostring(now))
end
redis.call('HSET', KEYS[2], 'paused_until', tostring(math.max(paused, now + pause)))
redis.call('EXPIRE', KEYS[2], 86400)
return 1
"""
)

_SNAPSHOT = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local st = redis.call('HMGET', KEYS[2], 'allowed', 'paused_until')
local total = 0
for i, v in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(v) end
local paused_for = math.max(0, tonumber(st[2] or '0') - now)
return {tostring(redis.call('ZCARD', KEYS[1])), st[1] or '', tostring(paused_for), tostring(total)}
"""
)


class RedisLeaseStore:
    """The window in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, account: str, description: str) -> None:
        self.description = description
        prefix = f"{{leadsquared:{account}}}"
        self._keys = [f"{prefix}:leases", f"{prefix}:state", f"{prefix}:daily"]
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._refused = client.register_script(_REFUSED)
        self._snapshot = client.register_script(_SNAPSHOT)

    def acquire(self, policy: Policy, lease_id: str) -> Grant:
        args: list[str | int | float] = [
            policy.cap,
            policy.hold,
            policy.recovery_per_second,
            policy.daily_limit or 0,
            lease_id,
            policy.period,
            policy.pause,
        ]
        kind, number = self._acquire(self._keys, args)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value = float(number)
        if kind == "ok":
            return Grant(lease_id, at=value)
        if kind == "daily":
            return Grant(None, daily_spent=True)
        return Grant(None, wait=value)

    def settle(self, policy: Policy, lease_id: str) -> None:
        self._settle(self._keys, [policy.after_answer, lease_id])

    def refused(self, policy: Policy, sent_at: float) -> None:
        args: list[str | int | float] = [
            policy.cap,
            policy.recovery_per_second,
            policy.decrease,
            policy.pause,
            repr(sent_at),
            policy.first_decrease,
            policy.calm,
            policy.hold,
        ]
        self._refused(self._keys, args)

    def snapshot(self) -> dict[str, Any]:
        live, allowed, paused_for, daily = self._snapshot(self._keys, [])
        allowed_text = allowed.decode() if isinstance(allowed, bytes) else allowed
        return {
            "live_leases": int(live),
            "allowed": float(allowed_text) if allowed_text else None,
            "paused_for": float(paused_for),
            "daily_calls": int(daily),
        }
