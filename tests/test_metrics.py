"""Metrics through Airflow's own Stats, received by a StatsD listener (a UDP socket on loopback).

Airflow is configured for StatsD by environment variables, as a deployment would be, and its lazily
built Stats backend is rebuilt from that configuration for the test (and put back after it).
"""

from __future__ import annotations

import json
import re
import socket
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq import metrics
from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from tests.helpers import (
    RecordingPasswords,
    assert_no_secret,
    named_sandbox_secrets,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_provider_lsq.sandbox import Sandbox

REGISTER = "/api/Authentication/v2/Register"
# An InfluxDB-style StatsD line, as Airflow writes it with statsd_influxdb_enabled: name,tags:value|type
LINE = re.compile(r"^(?P<name>[^,:]+)(?P<tags>(?:,[^,:=]+=[^,:]*)*):(?P<value>[0-9.]+)\|(?P<type>c|ms)$")


def _rebuild_stats() -> Callable[[], None]:
    """Rebuild Airflow's Stats backend from the configuration now in force; return how to undo it.

    Where the backend lives is told by the ``Stats`` the provider sends through, not by a version
    number: Airflow 3.3 keeps it in module state of the Task SDK's shared ``stats`` module (its
    ``initialize()``); 3.2 on that module's ``_Stats`` metaclass (``Stats.initialize()``); 3.0, 3.1 and
    2.x on the ``_Stats`` metaclass in ``airflow.stats``, which picks its factory once at import."""
    from airflow_provider_lsq.version_compat import Stats

    meta = type(Stats)
    if meta is type:  # 3.3+: a plain class over module-level state
        from airflow.sdk._shared.observability.metrics import stats
        from airflow.sdk.observability.metrics import stats_utils

        saved = (stats._factory, stats._export_legacy_names)
        stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)

        def undo() -> None:
            factory = saved[0] or stats_utils.get_stats_factory()
            stats.initialize(factory=factory, export_legacy_names=saved[1])

        return undo
    if hasattr(meta, "initialize"):  # 3.2: the Task SDK's metaclass, rebuilt by initialize()
        from airflow.sdk.observability.metrics import stats_utils as sdk_stats_utils

        saved_factory = type.__getattribute__(Stats, "factory")
        Stats.initialize(factory=sdk_stats_utils.get_stats_factory(Stats))

        def undo_32() -> None:
            from airflow.sdk._shared.observability.metrics.base_stats_logger import NoStatsLogger

            Stats.initialize(factory=saved_factory or NoStatsLogger)

        return undo_32
    from airflow.metrics import statsd_logger

    # The metaclass picked its factory when Airflow was imported; the backend is cached on ``Stats``.
    factory = meta.factory
    meta.factory = statsd_logger.get_statsd_logger
    Stats.instance = None

    def undo_2() -> None:
        meta.factory = factory
        Stats.instance = None

    return undo_2


class StatsdListener:
    """The packets Airflow sent to a UDP socket, parsed into (name, tags, value, type)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw: list[str] = []

    def drain(self) -> list[tuple[str, dict[str, str], float, str]]:
        self.sock.settimeout(0.5)
        while True:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                break
            self.raw.extend(data.decode().splitlines())
        parsed = []
        for line in self.raw:
            match = LINE.match(line)
            assert match, f"not a StatsD line: {line!r}"
            tags = dict(tag.split("=", 1) for tag in match["tags"].split(",") if tag)
            parsed.append((match["name"], tags, float(match["value"]), match["type"]))
        return parsed


@pytest.fixture
def statsd(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatsdListener]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    for name, value in {
        "STATSD_ON": "True",
        "STATSD_HOST": "127.0.0.1",
        "STATSD_PORT": str(sock.getsockname()[1]),
        "STATSD_PREFIX": "airflow",
        "STATSD_INFLUXDB_ENABLED": "True",  # tags on the wire, InfluxDB style
        "TIMER_UNIT_CONSISTENCY": "True",  # Airflow 2.11: its own timers in ms too (ours always are)
    }.items():
        monkeypatch.setenv(f"AIRFLOW__METRICS__{name}", value)
    undo = _rebuild_stats()
    try:
        yield StatsdListener(sock)
    finally:
        monkeypatch.undo()
        undo()
        sock.close()


def _connect(sb: Sandbox, monkeypatch: pytest.MonkeyPatch, conn_id: str, **extra: Any) -> None:
    conn = json.loads(sb.connection_json())
    conn["extra"].update({"retry_wait_seconds": 0.01, **extra})
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def _sums(packets: list[tuple[str, dict[str, str], float, str]]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for name, _, value, _ in packets:
        sums[name] += value
    return sums


def test_a_run_sends_the_documented_metrics_tagged_by_connection_with_plausible_values(
    statsd: StatsdListener,
    leadsquared_sandbox_factory: Callable[..., Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    # The connection allows 4 calls per second: later calls wait for the window, measurably.
    _connect(sb, monkeypatch, "lsq_metrics", rate_limit_calls=4, rate_limit_period_seconds=1.0)
    sb.inject("ratelimit", 503, path=REGISTER)  # one refusal, one gateway fault: two retries
    leads = [{"EmailAddress": f"metric{i}@example.edu", "FirstName": f"Metric{i}"} for i in range(1, 10)]
    leads.append({"EmailAddress": "metric10@example.edu", "mx_Favourite_Colour": "teal"})  # unknown
    leads.append({"FirstName": "NoEmail"})  # no key: invalid before any call
    passwords = RecordingPasswords()
    op = RegisterPortalUserOperator(
        task_id="register",
        leads=leads,
        leadsquared_conn_id="lsq_metrics",
        password_callable=passwords,
        max_failure_ratio=1.0,
    )
    summary = op.execute({"ti": _TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    packets = statsd.drain()

    assert summary["registered"] == 9 and summary["failed"] == 1 and summary["invalid"] == 1
    p = "airflow." + metrics.PREFIX
    sums = _sums(packets)
    assert sums[p + "registrations.registered"] == 9
    assert sums[p + "registrations.failed"] == 1  # the unknown attribute: the API's MX... error
    assert sums[p + "registrations.invalid"] == 1
    assert sums[p + "calls"] == len(sb.calls)  # every exchange the sandbox saw, token calls included
    assert sums[p + "refusals"] == sum(1 for c in sb.calls if c.outcome == "refused") == 1
    assert sums[p + "retries"] == 2
    durations = [v for n, _, v, t in packets if n == p + "call_duration"]
    assert len(durations) == len(sb.calls) and all(v >= 0 for v in durations)
    assert {t for n, _, _, t in packets if n in (p + "call_duration", p + "rate_limit_wait")} == {"ms"}
    waits = [v for n, _, v, _ in packets if n == p + "rate_limit_wait"]
    assert len(waits) == len(sb.calls)  # one wait per attempt, most of them zero
    # 12 calls at 4 a second (plus the refusal's pause): someone waited at least half a second.
    assert max(waits) >= 500
    # Only documented names, each tagged with the connection, and nothing about any lead or secret.
    documented = {p + n for n in ("calls", "call_duration", "refusals", "retries", "rate_limit_wait")}
    statuses = ("registered", "already_registered", "invalid", "failed", "unconfirmed")
    documented |= {p + "registrations." + s for s in statuses}
    ours = [packet for packet in packets if packet[0].startswith(p)]
    assert {packet[0] for packet in ours} <= documented
    assert all(tags == {"conn_id": "lsq_metrics"} for _, tags, _, _ in ours)
    wire = "\n".join(statsd.raw)
    assert_no_secret(wire, named_sandbox_secrets(sb, *passwords.made), "the StatsD packets")
    assert "example.edu" not in wire and "Metric" not in wire and "NoEmail" not in wire


def test_a_dry_run_sends_no_registration_metric(
    statsd: StatsdListener,
    leadsquared_sandbox_factory: Callable[..., Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    _connect(sb, monkeypatch, "lsq_metrics_dry")
    op = RegisterPortalUserOperator(
        task_id="register",
        leads=[{"EmailAddress": "dry@example.edu"}, {"FirstName": "NoEmail"}],
        leadsquared_conn_id="lsq_metrics_dry",
        dry_run=True,
        max_failure_ratio=1.0,
    )
    summary = op.execute({"ti": _TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    assert summary["valid"] == 1 and summary["invalid"] == 1
    assert not [n for n, *_ in statsd.drain() if n.startswith("airflow." + metrics.PREFIX)]


class _TI:
    dag_id = "lsq_metrics_test"

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def test_a_connection_id_with_characters_statsd_refuses_still_gets_its_metrics_with_a_safe_tag(
    statsd: StatsdListener, caplog: pytest.LogCaptureFixture
) -> None:
    """Airflow allows ``:``, ``#``, ``!``, ``(``, ``)``, ``/`` and non-ASCII letters in a connection
    id; Airflow's Stats drops a metric whose name or tag holds one (and a tag with ``,`` or ``=``)."""
    odd = {
        "lsq:prod#1": "lsq_prod_1",
        "lsq prod(eu)!": "lsq_prod_eu__",
        "lsq/prod\\x": "lsq_prod_x",
        "lsq,a=b": "lsq_a_b",
        "lsqünï": "lsq_n_",
        "x" * 300: "x" * metrics.MAX_TAG_LENGTH,
    }
    caplog.set_level("ERROR")
    for conn_id in odd:
        metrics.registration(conn_id, "registered")
        with metrics.api_call(conn_id):
            pass
    packets = statsd.drain()
    p = "airflow." + metrics.PREFIX
    for name in ("registrations.registered", "calls", "call_duration"):
        tags = sorted(t["conn_id"] for n, t, _, _ in packets if n == p + name)
        assert tags == sorted(odd.values()), name
    assert "Invalid stat name" not in caplog.text and "Dropping invalid tag" not in caplog.text
