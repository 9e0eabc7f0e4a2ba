"""The ``leadsquared`` connection, read into one typed object.

A user's whole configuration lives in the connection: host, keys and the extras below. Defaults follow
the API notes (25 calls per 5 seconds is the most generous documented plan).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Connection

DEFAULT_PORTAL_HOST = "portalapi.leadsquared.com"
CONN_TYPE = "leadsquared"


def _extra(extras: dict[str, Any], name: str) -> Any:
    """Read an extra whether the UI stored it plainly or with the old ``extra__leadsquared__`` prefix."""
    value = extras.get(name)
    if value in (None, ""):
        value = extras.get(f"extra__{CONN_TYPE}__{name}")
    return None if value == "" else value


def base_url(host: str | None, port: int | None = None) -> str:
    """Empty -> the default portal host; a bare host -> https; a full URL is used as given."""
    host = (host or "").strip().rstrip("/") or DEFAULT_PORTAL_HOST
    url = host if "://" in host else f"https://{host}"
    if port and url.count(":") < 2:
        url = f"{url}:{port}"
    return url


@dataclass(frozen=True)
class LeadSquaredConfig:
    """Everything a hook needs to talk to one LeadSquared account. Secrets stay out of ``repr``."""

    base_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    portal_id: str | None = None
    rate_limit_calls: int = 25
    rate_limit_period_seconds: float = 5.0
    rate_limit_margin_seconds: float | None = None
    rate_limit_reserve: float = 0.1
    daily_call_limit: int | None = None
    rate_limit_storage: str | None = field(default=None, repr=False)  # a Redis URI may hold a password
    rate_limit_redis_conn_id: str | None = None
    timeout_seconds: float = 30.0
    max_retries: int = 5
    retry_wait_seconds: float = 1.0
    api_host: str | None = None

    @property
    def margin_seconds(self) -> float:
        """Seconds a call is counted past its answer plus the period: 0 unless the user asks for more.

        No margin is needed: each call is counted from its send until its answer plus the period, which
        covers whenever it reached the API (see ``hooks/rate_limit/window.py``). A margin only covers a
        server whose clock or window differs from its documentation.
        """
        return self.rate_limit_margin_seconds or 0.0

    @property
    def account_id(self) -> str:
        """A stable, non-secret name for the account: shared rate-limit budgets are keyed by it."""
        digest = hashlib.sha256(f"{self.base_url}\n{self.access_key}".encode()).hexdigest()
        return digest[:16]

    @classmethod
    def from_connection(cls, conn: Connection) -> LeadSquaredConfig:
        extras = conn.extra_dejson or {}

        def number(name: str, kind: type, default: Any, *, allow_zero: bool = False) -> Any:
            value = _extra(extras, name)
            if value is None:
                return default
            try:
                result = kind(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Connection {conn.conn_id!r}: extra {name!r} must be a {kind.__name__}, got {value!r}"
                ) from None
            if result < 0 or (result == 0 and not allow_zero):
                raise ValueError(
                    f"Connection {conn.conn_id!r}: extra {name!r} must be positive, got {value!r}"
                )
            return result

        if not conn.login or not conn.password:
            raise ValueError(
                f"Connection {conn.conn_id!r} needs the LeadSquared Access Key (login) and Secret Key "
                "(password) of an admin user."
            )
        portal_id = _extra(extras, "portal_id")
        storage = _extra(extras, "rate_limit_storage")
        redis_conn_id = _extra(extras, "rate_limit_redis_conn_id")
        reserve = number("rate_limit_reserve", float, 0.1, allow_zero=True)
        if reserve >= 1:
            raise ValueError(
                f"Connection {conn.conn_id!r}: extra 'rate_limit_reserve' is the share of the plan left to "
                f"other integrations, from 0 to below 1 (e.g. 0.2), got {reserve!r}"
            )
        daily = number("daily_call_limit", int, None)
        if daily is not None and storage == "memory" and not redis_conn_id:
            raise ValueError(
                f"Connection {conn.conn_id!r}: daily_call_limit needs a shared rate_limit_storage; with "
                "'memory' each task process would count its own day. Remove rate_limit_storage (a file "
                "shared on this machine) or set rate_limit_redis_conn_id."
            )
        return cls(
            base_url=base_url(conn.host, conn.port),
            access_key=conn.login,
            secret_key=conn.password,
            portal_id=str(portal_id) if portal_id is not None else None,
            rate_limit_calls=number("rate_limit_calls", int, 25),
            rate_limit_period_seconds=number("rate_limit_period_seconds", float, 5.0),
            rate_limit_margin_seconds=number("rate_limit_margin_seconds", float, None, allow_zero=True),
            rate_limit_reserve=reserve,
            daily_call_limit=daily,
            rate_limit_storage=str(storage) if storage else None,
            rate_limit_redis_conn_id=str(redis_conn_id) if redis_conn_id else None,
            timeout_seconds=number("timeout_seconds", float, 30.0),
            max_retries=number("max_retries", int, 5, allow_zero=True),
            retry_wait_seconds=number("retry_wait_seconds", float, 1.0),
            api_host=_extra(extras, "api_host"),
        )
