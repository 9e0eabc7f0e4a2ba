"""The provider's metrics, sent through Airflow's own ``Stats`` (StatsD, Datadog or OpenTelemetry).

Whichever backend the deployment configured in ``[metrics]`` receives them; with metrics off, every
call here is a no-op. Every name starts with :data:`PREFIX` (after Airflow's own ``statsd_prefix``, so
``airflow.leadsquared.calls`` on StatsD) and every metric is tagged with the LeadSquared connection id
(``conn_id``; a character other than ASCII letters, digits, ``_``, ``.`` and ``-`` becomes ``_``, so
``lsq:prod#1`` is tagged ``lsq_prod_1``), never with anything about a lead:

=============================================  =======  ==================================================
name                                           type     what
=============================================  =======  ==================================================
``leadsquared.registrations.<status>``         counter  rows that ended ``registered``,
                                                        ``already_registered``, ``invalid``,
                                                        ``failed`` or ``unconfirmed``
``leadsquared.lead_updates.<status>``         counter  rows of ``SqlToLeadSquaredLeadOperator`` that
                                                        ended ``updated``, ``created``, ``exists``,
                                                        ``not_found``, ``unchanged``, ``invalid`` or
                                                        ``failed``
``leadsquared.calls``                          counter  HTTP exchanges with the API (each retry counts)
``leadsquared.call_duration``                  timer    one exchange, request sent to answer parsed
``leadsquared.refusals``                       counter  the API's rate-limit refusals (429 and kin)
``leadsquared.retries``                        counter  retries of a failed call (refusal or transient)
``leadsquared.rate_limit_wait``                timer    time a call waited for room in the account's
                                                        rate-limit window before it was sent
=============================================  =======  ==================================================

Timers are given to ``Stats.timing`` as a :class:`datetime.timedelta`, which StatsD sends in
milliseconds (``|ms``) on Airflow 2.11 and 3.x alike. Tags travel as the backend allows:
Datadog and OpenTelemetry natively, StatsD with ``[metrics] statsd_influxdb_enabled`` (plain StatsD
has no tags).
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from airflow_provider_lsq.exceptions import LeadSquaredDailyLimitError, LeadSquaredRateLimitError
from airflow_provider_lsq.version_compat import Stats

if TYPE_CHECKING:
    from collections.abc import Iterator

    from airflow_provider_lsq.outcomes import RegistrationStatus

PREFIX = "leadsquared."
REGISTRATIONS = PREFIX + "registrations"  # + "." + status
LEAD_UPDATES = PREFIX + "lead_updates"  # + "." + status
CALLS = PREFIX + "calls"
CALL_DURATION = PREFIX + "call_duration"
REFUSALS = PREFIX + "refusals"
RETRIES = PREFIX + "retries"
RATE_LIMIT_WAIT = PREFIX + "rate_limit_wait"
# What a tag value may hold: Airflow drops a whole metric (logging a traceback each time) whose name,
# InfluxDB-style tags included, has any other character, and drops a tag holding "," or "=". Airflow
# connection ids may also hold ":", "#", "!", "(", ")", "/", "\\" and non-ASCII letters.
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_TAG_LENGTH = 100  # Airflow refuses a metric name (tags included) longer than 250 characters


def tag_value(conn_id: str) -> str:
    """``conn_id`` as a tag value every backend takes: each other character becomes ``_``."""
    return _TAG_UNSAFE.sub("_", conn_id)[:MAX_TAG_LENGTH] or "_"


def _tags(conn_id: str) -> dict[str, str]:
    return {"conn_id": tag_value(conn_id)}


def registration(conn_id: str, status: RegistrationStatus | str) -> None:
    """One row ended with ``status``: ``leadsquared.registrations.<status>``."""
    value = getattr(status, "value", status)
    Stats.incr(f"{REGISTRATIONS}.{value}", tags=_tags(conn_id))


def lead_update(conn_id: str, status: RegistrationStatus | str) -> None:
    """One row of a lead-update run ended with ``status``: ``leadsquared.lead_updates.<status>``."""
    value = getattr(status, "value", status)
    Stats.incr(f"{LEAD_UPDATES}.{value}", tags=_tags(conn_id))


def retry(conn_id: str) -> None:
    """A failed call is about to be retried: ``leadsquared.retries``."""
    Stats.incr(RETRIES, tags=_tags(conn_id))


@contextmanager
def rate_limit_wait(conn_id: str) -> Iterator[None]:
    """Time the block (waiting for the rate limiter) as ``leadsquared.rate_limit_wait``."""
    started = time.monotonic()
    try:
        yield
    finally:
        Stats.timing(RATE_LIMIT_WAIT, timedelta(seconds=time.monotonic() - started), tags=_tags(conn_id))


@contextmanager
def api_call(conn_id: str) -> Iterator[None]:
    """Count and time one HTTP exchange (``leadsquared.calls``, ``leadsquared.call_duration``).

    A :class:`LeadSquaredRateLimitError` leaving the block is the API refusing the call:
    ``leadsquared.refusals`` (a spent daily cap is our own limit, not a refusal, and is not counted).
    """
    tags = _tags(conn_id)
    started = time.monotonic()
    try:
        yield
    except LeadSquaredRateLimitError as error:
        if not isinstance(error, LeadSquaredDailyLimitError):
            Stats.incr(REFUSALS, tags=tags)
        raise
    finally:
        Stats.incr(CALLS, tags=tags)
        Stats.timing(CALL_DURATION, timedelta(seconds=time.monotonic() - started), tags=tags)
