"""The account's rate limit, kept client-side: bursts the sandbox never refuses, across threads and
processes (a real Redis shares one budget)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from typing import IO, TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.exceptions import (
    LeadSquaredBudgetUnavailableError,
    LeadSquaredDailyLimitError,
    LeadSquaredRateLimitError,
)
from airflow_provider_lsq.hooks.config import LeadSquaredConfig
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.hooks.rate_limit import policy_for
from airflow_provider_lsq.hooks.rate_limit.redis_store import RedisLeaseStore
from airflow_provider_lsq.hooks.rate_limit.stores import SqliteLeaseStore
from airflow_provider_lsq.hooks.rate_limit.window import Policy, WindowState
from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.sandbox import Sandbox
from airflow_provider_lsq.version_compat import Connection
from tests.helpers import TaskLog, assert_no_secret, connect, named_sandbox_secrets

if TYPE_CHECKING:
    from pathlib import Path


def test_thirty_thread_burst_of_three_times_the_limit_is_never_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit = 20
    with Sandbox(rate_limit_calls=limit, rate_limit_period=1.0, latency=0.05, latency_jitter=0.1) as sandbox:
        hook = LeadSquaredHook(
            connect(monkeypatch, sandbox, rate_limit_calls=limit, rate_limit_period_seconds=1)
        )
        leads = ((str(i), {"EmailAddress": f"burst{i}@example.com"}) for i in range(3 * limit))
        outcomes = list(hook.register_portal_users(leads, max_workers=30))

        assert [o.status for o in outcomes] == [RegistrationStatus.REGISTERED] * (3 * limit)
        assert sandbox.refusals == 0
        assert sandbox.max_calls_in_window() <= limit
        assert sandbox.register_calls == 3 * limit


def test_hooks_on_one_account_share_one_budget_in_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    with Sandbox(rate_limit_calls=10, rate_limit_period=1.0) as sandbox:
        conn_id = connect(monkeypatch, sandbox, rate_limit_calls=10, rate_limit_period_seconds=1)
        first, second = LeadSquaredHook(conn_id), LeadSquaredHook(conn_id)
        assert first.rate_limiter is second.rate_limiter
        for i in range(8):
            first.register_portal_user({"EmailAddress": f"a{i}@example.com"}, "Samplepassword@123")
            second.register_portal_user({"EmailAddress": f"b{i}@example.com"}, "Samplepassword@123")
        assert sandbox.refusals == 0
        assert sandbox.max_calls_in_window() <= 10


def test_daily_cap_stops_calls_without_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    with Sandbox(rate_limit_calls=100, rate_limit_period=1.0) as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, daily_call_limit=4, rate_limit_calls=99))
        outcomes = list(
            hook.register_portal_users((str(i), {"EmailAddress": f"d{i}@x.org"}) for i in range(5))
        )
        by_status = sorted(o.status.value for o in outcomes)
        assert by_status == ["failed", "failed", "failed", "registered", "registered"]
        failed = [o for o in outcomes if o.status is RegistrationStatus.FAILED]
        assert all(o.retryable and o.error_type == "DailyCallLimitReached" for o in failed)
        assert len(sandbox.calls) == 4  # two token calls, two registrations; nothing sent past the cap
        with pytest.raises(LeadSquaredDailyLimitError, match="daily call limit of 4"):
            hook.request("GET", "/api/Access/PublicToken")


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
    prefix, count = sys.argv[1], int(sys.argv[2])
    hook = LeadSquaredHook("lsq_shared")
    hook.config  # read the connection before the start line, so all workers fire together
    print("ready", flush=True)
    sys.stdin.readline()  # the start line: every worker has imported Airflow and read its connection
    leads = ((f"{prefix}{i}", {"EmailAddress": f"{prefix}{i}@example.com"}) for i in range(count))
    print(json.dumps([o.status.value for o in hook.register_portal_users(leads, max_workers=8)]))
    """
)


def _run_three_workers(
    sandbox: Sandbox, tmp_path: Path, extra: dict[str, str], per_worker: int, workers: int = 3
) -> list[str]:
    conn = json.loads(sandbox.connection_json())
    conn["extra"].update({"retry_wait_seconds": 0.01, "max_retries": 8, **extra})
    env = {**os.environ, "AIRFLOW_CONN_LSQ_SHARED": json.dumps(conn)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"w{n}-", str(per_worker)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(workers)
    ]
    for proc in procs:  # a start line once all are ready, not a guessed import time
        assert proc.stdout is not None and _read_until(proc.stdout, "ready")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    statuses: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        statuses += json.loads(out.strip().splitlines()[-1])
    return statuses


def test_default_settings_share_one_budget_across_three_processes(tmp_path: Path) -> None:
    """No storage configured: the machine's SQLite file is shared, so processes at once are never refused.

    The control: the same processes with ``rate_limit_storage: memory`` (one budget each) overrun it.
    """
    limit, per_worker = 10, 12
    with Sandbox(rate_limit_calls=limit, rate_limit_period=1.0, latency=0.02) as sandbox:
        statuses = _run_three_workers(sandbox, tmp_path, {}, per_worker)
        assert statuses == ["registered"] * (3 * per_worker)
        assert sandbox.refusals == 0
        assert sandbox.max_calls_in_window() <= limit

    with Sandbox(rate_limit_calls=limit, rate_limit_period=1.0) as sandbox:
        _run_three_workers(sandbox, tmp_path, {"rate_limit_storage": "memory"}, per_worker)
        assert sandbox.refusals > 0


# -- the window's rule, on a clock the test controls ---------------------------------------------------


def _policy(cap: int = 5, period: float = 1.0, **kwargs: Any) -> Policy:
    values: dict[str, Any] = {"margin": 0.0, "hold": 31.0, "recovery_per_second": 0.25, **kwargs}
    return Policy(cap=cap, period=period, **values)


def test_any_network_delay_never_puts_more_calls_in_an_api_window_than_the_cap() -> None:
    """The provable bound: calls admitted by the leases, each reaching the API at a random moment
    between its send and its answer (round trips up to 3 windows long), never exceed the cap in any
    of the API's windows."""
    rng = random.Random(7)
    policy, state = _policy(cap=5, period=1.0), WindowState()
    now, arrivals, in_flight = 0.0, [], []  # in_flight: (answer time, lease id)
    for n in range(4000):
        now += rng.expovariate(20.0)
        for answer, lease in [f for f in in_flight if f[0] <= now]:
            state.settle(policy, answer, lease)  # settled at its answer time, not later
            in_flight.remove((answer, lease))
        grant = state.acquire(policy, now, f"l{n}")
        if grant.lease_id is None:
            continue
        answer = now + rng.choice([0.001, 0.05, rng.uniform(0, 3.0)])
        arrivals.append(rng.uniform(now, answer))
        in_flight.append((answer, grant.lease_id))
    arrivals.sort()
    start = 0
    for end, at in enumerate(arrivals):
        while at - arrivals[start] >= policy.period:
            start += 1
        assert end - start + 1 <= policy.cap
    assert len(arrivals) > 500  # and the window was kept busy, not starved


def test_a_lease_ends_one_period_after_its_answer() -> None:
    policy, state = _policy(cap=1, period=1.0), WindowState()
    assert state.acquire(policy, 0.0, "a").lease_id == "a"
    refused = state.acquire(policy, 0.5, "b")
    assert refused.lease_id is None and refused.wait == pytest.approx(31.0 - 0.5)  # in flight: held
    state.settle(policy, 2.0, "a")  # answered after 2 s
    assert state.acquire(policy, 2.9, "b").lease_id is None
    assert state.acquire(policy, 3.0, "b").lease_id == "b"


def test_a_refusal_pauses_everyone_lowers_once_per_lockout_and_recovers() -> None:
    policy, state = _policy(cap=20, period=5.0, recovery_per_second=0.05), WindowState()
    state.refused(policy, now=10.0, sent_at=9.9)
    assert state.acquire(policy, 12.0, "x").wait == pytest.approx(3.0)  # paused until 15
    assert state.limit(policy, 10.0) == 15  # 75% of 20
    state.refused(policy, now=10.2, sent_at=9.8)  # the same lockout's other refusals: no second cut
    assert state.limit(policy, 10.2) == 15
    assert state.limit(policy, 10.0 + 40) == 17  # + 0.05 call/s
    assert state.limit(policy, 10.0 + 1000) == 20  # never above the cap


def test_calls_are_spread_out_only_while_the_account_is_known_busy() -> None:
    """At the cap (nobody refused us) a whole window may go at once; after a refusal, while the rate
    recovers, calls leave at least half the spacing apart, so a lockout catches few of ours in flight."""
    policy, state = _policy(cap=10, period=1.0, recovery_per_second=0.01), WindowState()
    assert all(state.acquire(policy, 0.0, f"a{i}").lease_id for i in range(10))
    for i in range(10):
        state.settle(policy, 0.1, f"a{i}")
    state.refused(policy, now=0.1, sent_at=0.0)  # allowed: 7
    later = 5.0  # past the pause and every lease
    assert state.acquire(policy, later, "b1").lease_id == "b1"
    second = state.acquire(policy, later, "b2")
    assert second.lease_id is None and second.wait == pytest.approx(0.5 / 7)
    assert state.acquire(policy, later + 0.5 / 7, "b2").lease_id == "b2"


def test_stores_on_one_file_share_the_pause_the_lowered_rate_and_the_day(tmp_path: Path) -> None:
    policy = _policy(cap=10, period=5.0, daily_limit=3)
    first, second = SqliteLeaseStore(tmp_path / "a.db", "acct"), SqliteLeaseStore(tmp_path / "a.db", "acct")
    other_account = SqliteLeaseStore(tmp_path / "a.db", "other")
    assert [first.acquire(policy, f"l{i}").lease_id for i in range(2)] == ["l0", "l1"]
    assert second.acquire(policy, "l2").lease_id == "l2"
    assert second.acquire(policy, "l3").daily_spent  # the day's 3 calls were spent through both
    assert other_account.acquire(policy, "o1").lease_id == "o1"  # accounts never share
    first.refused(policy, sent_at=0.0)
    snapshot = second.snapshot()
    assert snapshot["paused_for"] > 0 and snapshot["allowed"] == 7  # 75% of 10, seen by the other
    assert snapshot["live_leases"] == 3 and snapshot["daily_calls"] == 3
    assert second.acquire(policy, "l4").wait > 0


def test_a_file_from_an_earlier_version_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(
            "CREATE TABLE state (account TEXT PRIMARY KEY, allowed REAL, allowed_at REAL, "
            "decreased_at REAL, paused_until REAL);"
            "INSERT INTO state VALUES ('acct', 3, 0, 0, 0);"
        )
    store = SqliteLeaseStore(path, "acct")
    assert store.acquire(_policy(cap=5), "l1").lease_id == "l1"
    assert store.snapshot()["allowed"] == 3  # the old file's state is kept


# -- across real processes ----------------------------------------------------------------------------

PAUSED_WORKER = textwrap.dedent(
    """
    import sys
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
    hook = LeadSquaredHook("lsq_shared")
    hook.rate_limiter  # open the shared store before the go
    print("ready", flush=True)
    sys.stdin.readline()
    hook.request("GET", "/api/Access/PublicToken")
    print("done", flush=True)
    """
)


def _read_until(stream: IO[str], word: str) -> bool:
    """Read the worker's output up to a line that is ``word`` (Airflow 2 logs to stdout too)."""
    return any(line.strip() == word for line in stream)  # stops at the first match


def test_a_refusal_pauses_a_second_process(tmp_path: Path) -> None:
    """A refusal in this process pauses another task process sharing the default store: its call
    reaches the account only once the lockout's window has passed."""
    period = 3.0
    with Sandbox(rate_limit_calls=50, rate_limit_period=period) as sandbox:
        conn = json.loads(sandbox.connection_json())
        conn["extra"].update({"max_retries": 0, "retry_wait_seconds": 0.01})
        env = {**os.environ, "AIRFLOW_CONN_LSQ_SHARED": json.dumps(conn)}
        script = tmp_path / "paused.py"
        script.write_text(PAUSED_WORKER)
        other = subprocess.Popen(
            [sys.executable, str(script)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert other.stdout is not None and other.stdin is not None
            assert _read_until(other.stdout, "ready")
            os.environ["AIRFLOW_CONN_LSQ_SHARED"] = env["AIRFLOW_CONN_LSQ_SHARED"]
            sandbox.inject("ratelimit")
            with pytest.raises(LeadSquaredRateLimitError):
                LeadSquaredHook("lsq_shared").request("GET", "/api/Access/PublicToken")
            refused_at = sandbox.calls[-1].at
            other.stdin.write("go\n")
            other.stdin.flush()
            assert _read_until(other.stdout, "done")
        finally:
            os.environ.pop("AIRFLOW_CONN_LSQ_SHARED", None)
            other.communicate(timeout=60)
        second = sandbox.calls[-1]
        assert second.outcome == "ok"
        assert second.at >= refused_at + period  # the other process waited the lockout out


DAILY_WORKER = textwrap.dedent(
    """
    import json
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
    leads = ((f"k{i}", {"EmailAddress": f"day{i}@example.com"}) for i in range(10))
    try:
        outcomes = list(LeadSquaredHook("lsq_shared").register_portal_users(leads, max_workers=2))
        print(json.dumps([o.status.value for o in outcomes]))
    except Exception as error:
        print(json.dumps([type(error).__name__]))
    """
)


def test_daily_cap_is_shared_by_task_processes(tmp_path: Path) -> None:
    """Two task tries, one after the other, with a cap of 6 calls: 6 calls in all reach the account
    (today each process counted its own 6)."""
    with Sandbox(rate_limit_calls=50, rate_limit_period=1.0) as sandbox:
        conn = json.loads(sandbox.connection_json())
        conn["extra"].update({"daily_call_limit": 6, "retry_wait_seconds": 0.01})
        env = {**os.environ, "AIRFLOW_CONN_LSQ_SHARED": json.dumps(conn)}
        script = tmp_path / "daily.py"
        script.write_text(DAILY_WORKER)
        runs = [
            json.loads(
                subprocess.run(
                    [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
                ).stdout.splitlines()[-1]
            )
            for _ in range(2)
        ]
        assert len(sandbox.calls) == 6  # 2 token calls and 4 registrations, all by the first try
    assert sorted(runs[0]).count("registered") == 4
    assert runs[1] == ["LeadSquaredDailyLimitError"]  # the second try is refused before any call


def test_daily_cap_with_a_per_process_budget_is_refused_at_connection_time() -> None:
    conn = Connection(
        conn_id="lsq_day", conn_type="leadsquared", login="a", password="b",
        extra=json.dumps({"daily_call_limit": 100, "rate_limit_storage": "memory"}),
    )  # fmt: skip
    with pytest.raises(ValueError, match="'daily_call_limit' needs a shared rate_limit_storage"):
        LeadSquaredConfig.from_connection(conn)


def test_reserve_is_read_and_bounded() -> None:
    def config(**extra: Any) -> LeadSquaredConfig:
        conn = Connection(
            conn_id="lsq_r", conn_type="leadsquared", login="a", password="b", extra=json.dumps(extra)
        )
        return LeadSquaredConfig.from_connection(conn)

    assert config().rate_limit_reserve == 0.1
    assert policy_for(config()).cap == 22  # 25 less 10%, rounded down: 3 calls per 5 s left to others
    assert policy_for(config(rate_limit_reserve=0, rate_limit_calls=10)).cap == 10
    assert policy_for(config(rate_limit_reserve=0.5, rate_limit_calls=1)).cap == 1
    assert config(rate_limit_reserve=0.9).rate_limit_reserve == 0.9  # the form's bound
    for beyond in (0.95, 1):
        with pytest.raises(ValueError, match="'rate_limit_reserve' is the share of the plan"):
            config(rate_limit_reserve=beyond)


# -- Redis, through an Airflow connection of the official ``redis`` type --------------------------------

REDIS_PASSWORD = "lsq-redis-pw-5f3a9c"


def _redis_conn(redis_url: str, password: str | None = None) -> str:
    from urllib.parse import urlsplit

    url = urlsplit(redis_url)
    conn: dict[str, Any] = {
        "conn_type": "redis", "host": url.hostname, "port": url.port,
        "extra": {"db": int(url.path.strip("/") or 0)},
    }  # fmt: skip
    if password:
        conn["password"] = password
    return json.dumps(conn)


@pytest.mark.redis
def test_redis_connection_shares_one_budget_across_three_processes(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("airflow.providers.redis", reason="needs apache-airflow-providers-redis")
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_REDIS", _redis_conn(redis_url))
    limit, per_worker = 10, 12
    with Sandbox(rate_limit_calls=limit, rate_limit_period=1.0, latency=0.02) as sandbox:
        extra = {"rate_limit_redis_conn_id": "lsq_redis", "rate_limit_reserve": "0"}
        statuses = _run_three_workers(sandbox, tmp_path, extra, per_worker)
        assert statuses == ["registered"] * (3 * per_worker)
        assert sandbox.refusals == 0
        assert sandbox.max_calls_in_window() <= limit


@pytest.mark.redis
def test_redis_store_shares_pause_rate_and_day_between_clients(redis_url: str) -> None:
    import redis

    policy = _policy(cap=4, period=5.0, daily_limit=3)
    account = f"test-{random.getrandbits(32):x}"
    first = RedisLeaseStore(redis.Redis.from_url(redis_url), account, "Redis")
    second = RedisLeaseStore(redis.Redis.from_url(redis_url), account, "Redis")
    grants = [first.acquire(policy, "a"), second.acquire(policy, "b"), first.acquire(policy, "c")]
    assert [g.lease_id for g in grants] == ["a", "b", "c"]
    assert second.acquire(policy, "d").daily_spent
    first.settle(policy, "a")
    first.refused(policy, sent_at=grants[2].at)
    snapshot = second.snapshot()
    assert snapshot["paused_for"] > 0 and snapshot["allowed"] == 3 and snapshot["daily_calls"] == 3
    assert snapshot["live_leases"] == 3


@pytest.mark.redis
def test_redis_password_is_masked_and_never_in_an_error(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis connection's password is registered with Airflow's masker, and neither a working call's
    logs nor an unreachable server's error show it."""
    pytest.importorskip("airflow.providers.redis", reason="needs apache-airflow-providers-redis")
    from airflow_provider_lsq.version_compat import redact

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_REDIS_PW", _redis_conn(redis_url, REDIS_PASSWORD))
    down = json.loads(_redis_conn("redis://127.0.0.1:9/0", REDIS_PASSWORD))  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_REDIS_DOWN", json.dumps(down))
    with Sandbox() as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, rate_limit_redis_conn_id="lsq_redis_pw"))
        refused = ""
        try:
            # Our Redis has no password: redis-py 7+ lets the AUTH through; older (the 5.x and 6.x that
            # the 3.0 and 2.11 constraints pin) is refused, and that error must not show it either.
            hook.request("GET", "/api/Access/PublicToken")
        except LeadSquaredBudgetUnavailableError as error:
            assert "AuthenticationError" in str(error), error
            refused = f"{error} {error!r}"
        broken = LeadSquaredHook(
            connect(monkeypatch, sandbox, "lsq_test_down", rate_limit_redis_conn_id="lsq_redis_down")
        )
        with pytest.raises(Exception) as err:
            broken.request("GET", "/api/Access/PublicToken")
    assert "127.0.0.1:9" in str(err.value) or "Connection refused" in str(err.value)
    for text in (str(err.value), repr(err.value), caplog.text, repr(hook.config), refused):
        assert REDIS_PASSWORD not in text
    assert REDIS_PASSWORD not in str(redact(f"password={REDIS_PASSWORD}"))  # Airflow's masker knows it


@pytest.mark.redis
def test_deprecated_redis_uri_extra_still_shares_the_budget_with_a_warning(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.exceptions import AirflowProviderDeprecationWarning

    with Sandbox(rate_limit_calls=5, rate_limit_period=1.0) as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, rate_limit_storage=redis_url))
        with pytest.warns(AirflowProviderDeprecationWarning, match="rate_limit_redis_conn_id"):
            limiter = hook.rate_limiter
        assert isinstance(limiter.store, RedisLeaseStore)
        hook.request("GET", "/api/Access/PublicToken")
        assert limiter.store.snapshot()["live_leases"] == 1


def test_a_stop_while_the_account_is_paused_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_kill`` during the pause after a refusal: the rows waiting for the window are not sent.

    They end ``NotSent`` (the engine puts their ledger rows back), instead of going out after the
    task was told to stop, where a SIGKILL could lose their outcomes.
    """
    import threading

    from airflow_provider_lsq.hooks.leadsquared import REGISTER_PATH
    from airflow_provider_lsq.outcomes import NOT_SENT
    from tests.helpers import calls_to

    with Sandbox(rate_limit_calls=25, rate_limit_period=5.0) as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, rate_limit_storage="memory"))
        hook.get_registration_token()
        hook.get_public_auth_key()
        limiter = hook.rate_limiter
        limiter.store.refused(limiter.policy, sent_at=0.0)  # the account is locked out for a window
        leads = [(f"k{i}", {"EmailAddress": f"stop{i}@example.com"}) for i in range(6)]
        threading.Timer(0.5, hook.stopping.set).start()
        outcomes = list(hook.register_portal_users(iter(leads), max_workers=3))
        assert sorted(outcome.key for outcome in outcomes) == sorted(key for key, _ in leads)
        assert {outcome.error_type for outcome in outcomes} == {NOT_SENT}
        assert calls_to(sandbox, REGISTER_PATH) == 0


def _store(kind: str, account: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A lease store of ``kind`` (memory, file or redis) for ``account``."""
    from airflow_provider_lsq.hooks.rate_limit.stores import MemoryLeaseStore

    if kind == "memory":
        return MemoryLeaseStore()
    if kind == "file":
        return SqliteLeaseStore(tmp_path / "budget.sqlite3", account)
    import redis

    return RedisLeaseStore(redis.Redis.from_url(request.getfixturevalue("redis_url")), account, "Redis")


def _answers(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.mark.parametrize("kind", ["memory", "file", pytest.param("redis", marks=pytest.mark.redis)])
def test_after_the_pause_every_store_admits_at_the_lowered_rate_spaced_out(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The three stores keep one rule: after a refusal's pause, calls come back at the lowered rate,
    spread out (a Redis store once failed right here, on a missing script argument)."""
    policy = _policy(cap=4, period=0.2)
    account = f"test-{random.getrandbits(32):x}"
    store = _store(kind, account, tmp_path, request)
    first = store.acquire(policy, "a")
    store.refused(policy, sent_at=first.at)
    assert store.acquire(policy, "b").wait > 0  # paused
    deadline = time.monotonic() + 10
    granted = store.acquire(policy, "b")
    while granted.lease_id is None and time.monotonic() < deadline:
        time.sleep(max(0.01, granted.wait))
        granted = store.acquire(policy, "b")
    assert granted.lease_id == "b"
    assert store.snapshot()["allowed"] == 3  # 75% of 4
    spaced = store.acquire(policy, "c")
    assert spaced.lease_id is None and spaced.wait > 0  # the next call waits its turn


@pytest.mark.parametrize("kind", ["memory", "file", pytest.param("redis", marks=pytest.mark.redis)])
def test_stamps_far_ahead_in_a_store_never_stall_a_caller_past_the_pause_or_hold(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Another local user writes ``paused_until=2e9`` and a lease held till then into the shared
    file (or the clock steps back, as when a VM is restored): the next wait is at most the pause, then
    the planted lease counts for at most the hold, and the account's calls go again."""
    import sqlite3

    policy = _policy(cap=1, period=0.2, hold=0.5)
    account = f"test-{random.getrandbits(32):x}"
    store = _store(kind, account, tmp_path, request)
    store.snapshot()  # the file's tables made
    far = 2e9 if kind != "memory" else time.time() + 1e6
    if kind == "memory":
        state = store._state
        state.paused_until = state.allowed_at = state.decreased_at = state.last_grant = far
        state.allowed, state.leases = 1.0, {"planted": far}
    elif kind == "file":
        with contextlib.closing(sqlite3.connect(store.path)) as conn:
            conn.execute(
                "REPLACE INTO state VALUES (?, 'garbage', ?, ?, ?, ?)", (account, far, far, far, far)
            )
            conn.execute("INSERT INTO leases VALUES (?, 'planted', ?)", (account, far))
            conn.commit()
    else:
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        prefix = f"{{leadsquared:{account}}}"
        client.hset(f"{prefix}:state", mapping={"paused_until": far, "allowed": 1, "allowed_at": far})
        client.hset(f"{prefix}:state", mapping={"decreased_at": far, "last_grant": far})
        client.zadd(f"{prefix}:leases", {"planted": far})
    first = store.acquire(policy, "mine")
    assert first.lease_id is None and 0 < first.wait <= policy.pause + 0.01
    granted, deadline = first, time.monotonic() + 10
    while granted.lease_id is None and time.monotonic() < deadline:
        assert granted.wait <= policy.hold + 0.01
        time.sleep(max(0.01, granted.wait))
        granted = store.acquire(policy, "mine")
    assert granted.lease_id == "mine"


@pytest.mark.redis
def test_redis_lost_mid_run_loses_no_outcome_of_a_call_made(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Redis budget server that dies mid-run stops the run, naming the budget; every call LeadSquared
    answered keeps its outcome (a lost lease update never discards an answer)."""
    import shutil
    import socket

    from airflow_provider_lsq.exceptions import LeadSquaredBudgetUnavailableError

    server_binary = shutil.which("redis-server")
    if server_binary is None:
        pytest.skip("redis-server is not installed: this test runs a Redis server of its own to stop it")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [server_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 60  # a loaded machine starts a server slowly
        while not _answers(client):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the test's own redis-server on port {port} did not start")
            time.sleep(0.05)
        monkeypatch.setenv(
            "AIRFLOW_CONN_LSQ_TEST_REDIS_DOWN",
            json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": port}),
        )
        with Sandbox(rate_limit_calls=20, rate_limit_period=1.0, latency=0.05) as sandbox:
            hook = LeadSquaredHook(
                connect(
                    monkeypatch,
                    sandbox,
                    rate_limit_redis_conn_id="lsq_test_redis_down",
                    max_retries=1,
                    retry_wait_seconds=0.01,
                )
            )
            leads = [(f"k{i}", {"EmailAddress": f"redis-down{i}@example.com"}) for i in range(60)]
            outcomes: dict[str, Any] = {}
            with pytest.raises(LeadSquaredBudgetUnavailableError, match="rate-limit budget \\(Redis"):
                for outcome in hook.register_portal_users(iter(leads), max_workers=4):
                    outcomes[outcome.key] = outcome
                    if len(outcomes) == 3:  # the run is going and calls are in flight: the server dies
                        server.kill()
            registered_in_sandbox = {
                key for key, lead in leads if sandbox.find_lead("EmailAddress", lead["EmailAddress"])
            }
    finally:
        server.kill()
        server.wait()
    assert registered_in_sandbox  # the run got going before the server died
    assert len(registered_in_sandbox) < len(leads)  # and stopped sending when it did
    for key in registered_in_sandbox:  # no call LeadSquared answered is lost
        assert outcomes[key].status is RegistrationStatus.REGISTERED, outcomes[key]


@pytest.mark.parametrize("kind", ["memory", "file", pytest.param("redis", marks=pytest.mark.redis)])
def test_first_refusal_at_the_cap_drops_far_later_ones_a_little(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Other traffic appearing after a calm spell costs one lockout to learn (a large step down); once
    the account is known busy, a refusal means the level was nearly right (a small step), even when
    the count has climbed back to the cap."""
    values = {"first_decrease": 0.5, "decrease": 0.9, "calm": 3600.0}
    policy = _policy(cap=10, period=0.1, recovery_per_second=0.0, **values)
    climbing = _policy(cap=10, period=0.1, recovery_per_second=1000.0, **values)  # back at the cap at once
    account = f"test-{random.getrandbits(32):x}"
    store = _store(kind, account, tmp_path, request)

    def refused_after_the_pause() -> None:
        deadline = time.monotonic() + 10
        granted = store.acquire(policy, f"l{random.getrandbits(32):x}")
        while granted.lease_id is None and time.monotonic() < deadline:
            time.sleep(max(0.01, granted.wait))
            granted = store.acquire(policy, f"l{random.getrandbits(32):x}")
        assert granted.lease_id is not None
        store.refused(policy, sent_at=granted.at)

    refused_after_the_pause()
    assert store.snapshot()["allowed"] == 5  # at the cap, nothing refused before: 50% of 10
    refused_after_the_pause()
    assert store.snapshot()["allowed"] == 4  # below it: 90% of 5, rounded down
    policy = climbing
    refused_after_the_pause()
    assert store.snapshot()["allowed"] == 9  # at the cap again, but the last decrease was recent


def test_default_adaptation_keeps_the_other_integrations_refusals_within_target() -> None:
    """The default policy against the sandbox's exact rule, simulated (seeded, no wall clock) for two
    hours with another integration at 20% of the plan: at most 2 refusals a minute in all and 10% of
    its calls refused, while we still take most of what it leaves."""
    from bench.coexistence_frontier import LimiterClient, limiter_policy, simulate

    policy = limiter_policy()
    result = simulate("default", lambda sim: LimiterClient(sim, policy), hours=2, warmup=300)
    assert result.refusals_per_minute <= 2.0
    assert result.their_refused_share <= 0.10
    assert result.share_of_left >= 0.55


# -- one machine, several Unix users: one budget ------------------------------------------------------


def _as_another_user(action: Any) -> str:
    """Run ``action()`` in a child process under the ``nobody`` user (uid/gid 65534): the kernel's
    permission checks are real. Returns what it returned, or ``"<ExceptionType>: message"``."""
    if not hasattr(os, "fork") or os.geteuid() != 0:
        pytest.skip("acting as a second Unix user needs root (fork, then setuid to nobody)")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = str(action())
        except BaseException as error:
            result = f"{type(error).__name__}: {error}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.fixture
def machine_temp_dir(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in for the system temp dir (mode 1777, like /tmp), made the default's parent."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="lsq-coexist-machine-")
    os.chmod(base, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", base)
    monkeypatch.delenv("LSQ_RATE_LIMIT_DIR", raising=False)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_every_unix_user_on_the_machine_shares_the_default_budget(machine_temp_dir: str) -> None:
    """With nothing configured, a task of another Unix user spends the same budget: it makes the
    directory like /tmp (1777) and the file world-writable, and each user sees the other's calls
    and pause."""
    import stat

    from airflow_provider_lsq.hooks.rate_limit.stores import default_storage_dir

    policy = _policy(cap=5, period=5.0)
    path = default_storage_dir() / "acct.sqlite3"

    def nobody_takes_a_place() -> str:
        store = SqliteLeaseStore(path, "acct")
        return str(store.acquire(policy, "theirs").lease_id)

    assert _as_another_user(nobody_takes_a_place) == "theirs"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o1777
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    ours = SqliteLeaseStore(path, "acct")
    assert ours.snapshot()["live_leases"] == 1  # nobody's call counts in our window
    granted = ours.acquire(policy, "ours")
    ours.refused(policy, sent_at=granted.at)

    def nobody_looks() -> str:
        snapshot = SqliteLeaseStore(path, "acct").snapshot()
        return f"{snapshot['live_leases']} {snapshot['paused_for'] > 0} {snapshot['daily_calls']}"

    assert _as_another_user(nobody_looks) == "2 True 2"  # our pause holds them too


def test_a_budget_another_user_cannot_write_stops_the_run_by_name(
    machine_temp_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory another user made private (as an earlier build did): never a silent budget of
    one's own, but an error naming the path, the user and the fixes; its owner's next run repairs it."""
    from airflow_provider_lsq.hooks.rate_limit.stores import default_storage_dir

    directory = default_storage_dir()
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    path = directory / "acct.sqlite3"
    answer = _as_another_user(lambda: SqliteLeaseStore(path, "acct"))
    assert answer.startswith("BudgetLocationError: ")
    for words in (str(path), "'nobody'", "owner root, mode 0755", "chmod 1777", "LSQ_RATE_LIMIT_DIR"):
        assert words in answer
    SqliteLeaseStore(path, "acct")  # the owner's task: makes it shared
    assert _as_another_user(lambda: SqliteLeaseStore(path, "acct").snapshot()["live_leases"]) == "0"


def test_a_symlink_in_place_of_the_shared_directory_is_refused(machine_temp_dir: str) -> None:
    """Anyone can put a symlink in the system temp dir: the budget never follows one elsewhere."""
    from pathlib import Path

    from airflow_provider_lsq.hooks.rate_limit.stores import BudgetLocationError, default_storage_dir

    elsewhere = Path(machine_temp_dir) / "elsewhere"
    elsewhere.mkdir()
    default_storage_dir().symlink_to(elsewhere)
    with pytest.raises(BudgetLocationError, match="a symlink"):
        SqliteLeaseStore(default_storage_dir() / "acct.sqlite3", "acct")
    assert list(elsewhere.iterdir()) == []


def test_an_unusable_budget_location_fails_the_hook_before_any_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LSQ_RATE_LIMIT_DIR naming a place no directory can be made: the connection error names the
    path and the setting; the sandbox saw no call."""
    from airflow_provider_lsq.exceptions import LeadSquaredConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LSQ_RATE_LIMIT_DIR", str(blocker / "budget"))
    with Sandbox() as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, conn_id="lsq_unusable_budget"))
        with pytest.raises(LeadSquaredConfigError) as caught:
            hook.register_portal_user({"EmailAddress": "a@example.com"}, "Samplepassword@123")
        assert caught.value.field == "rate_limit_storage"
        assert str(blocker / "budget") in str(caught.value) and "LSQ_RATE_LIMIT_DIR" in str(caught.value)
        assert sandbox.calls == []


@pytest.mark.parametrize("planted", ["", "-wal", "after the look"])
def test_a_symlink_planted_as_the_budget_file_is_never_followed(
    machine_temp_dir: str, planted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another local user links ``<account>.sqlite3`` (or its ``-wal``) in the shared directory to a
    database only the task's user may write (Airflow's, say), or to a name not yet made: the store
    refuses by name before writing anything, and the target is left as it was; also for a link
    swapped in after the store looked (what SQLite opened is checked)."""
    import sqlite3
    from pathlib import Path

    from airflow_provider_lsq.hooks.rate_limit import stores
    from airflow_provider_lsq.hooks.rate_limit.stores import BudgetLocationError, default_storage_dir

    if planted == "after the look":
        looked: set[Path] = set()
        real_look = stores._refuse_links
        monkeypatch.setattr(
            stores, "_refuse_links", lambda path: looked.add(path) if path not in looked else real_look(path)
        )
        planted = ""

    victim = Path(machine_temp_dir) / "airflow.db"
    with contextlib.closing(sqlite3.connect(victim)) as conn:
        conn.execute("CREATE TABLE dag (x)")
        conn.commit()
    before = victim.read_bytes()
    SqliteLeaseStore(default_storage_dir() / "first.sqlite3", "first")  # the directory, as made in use
    for account, target in (("acct", victim), ("dangling", Path(machine_temp_dir) / "made-by-us.db")):
        path = default_storage_dir() / f"{account}.sqlite3"
        if planted:
            SqliteLeaseStore(path, account)._conn.close()
        Path(f"{path}{planted}").unlink(missing_ok=True)
        Path(f"{path}{planted}").symlink_to(target)
        with pytest.raises(BudgetLocationError, match=r"symlink to|leads to") as caught:
            SqliteLeaseStore(path, account)
        assert f"{path}{planted}" in str(caught.value) and "rm " in str(caught.value)
    assert victim.read_bytes() == before
    assert not (Path(machine_temp_dir) / "made-by-us.db").exists()


# -- where the file budget cannot reach: Kubernetes pods, several workers ----------------------------


@pytest.fixture
def deployment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No deployment hint of this machine's own (a CI runner may be a pod), a fresh budget directory."""
    from airflow_provider_lsq.hooks.rate_limit import placement

    for name in (placement.K8S_SERVICE_ENV, placement.K8S_EXECUTOR_POD_ENV, placement.FILE_SHARED_ENV):
        monkeypatch.delenv(name, raising=False)
    budgets = tmp_path / "budgets"
    monkeypatch.setenv("LSQ_RATE_LIMIT_DIR", str(budgets))
    return budgets


@pytest.mark.parametrize(
    ("executor", "environ", "how", "named"),
    [
        ("LocalExecutor", {}, None, None),
        ("SequentialExecutor", {}, None, None),
        ("KubernetesExecutor", {}, "certain", "KubernetesExecutor"),
        ("LocalExecutor, KubernetesExecutor", {}, "certain", "KubernetesExecutor"),  # 2.10+ lists
        ("CeleryKubernetesExecutor", {}, "certain", "CeleryKubernetesExecutor"),
        ("airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor", {}, "certain", "Ecs"),
        ("CeleryExecutor", {}, "possible", "CeleryExecutor"),
        (
            "LocalExecutor,fast:airflow.providers.celery.executors.celery_executor.CeleryExecutor",
            {},
            "possible",
            "CeleryExecutor",
        ),
        ("my_company.executors.SshExecutor", {}, "possible", "SshExecutor"),  # unknown: may be anywhere
        ("LocalExecutor", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "possible", "KUBERNETES_SERVICE_HOST"),
        ("LocalExecutor", {"AIRFLOW_IS_K8S_EXECUTOR_POD": "True"}, "certain", "AIRFLOW_IS_K8S_EXECUTOR_POD"),
        ("KubernetesExecutor", {"LSQ_RATE_LIMIT_FILE_SHARED": "1"}, None, None),  # a shared volume, said so
        ("CeleryExecutor", {"LSQ_RATE_LIMIT_FILE_SHARED": "true"}, None, None),  # one worker, said so
        ("CeleryExecutor", {"LSQ_RATE_LIMIT_FILE_SHARED": "0"}, "possible", "CeleryExecutor"),
    ],
)
def test_what_shows_that_the_file_budget_cannot_reach_every_task(
    executor: str, environ: dict[str, str], how: str | None, named: str | None
) -> None:
    from airflow_provider_lsq.hooks.rate_limit.placement import unshared

    finding = unshared(executor, environ)
    assert (finding.how if finding else None) == how
    if finding is not None:
        assert named is not None and named in finding.why


BUDGET_WARNING = "rate-limit budget is a file"


@pytest.mark.parametrize("executor", ["KubernetesExecutor", "LocalExecutor,KubernetesExecutor"])
def test_kubernetes_executor_refuses_the_file_budget_before_any_call_naming_redis(
    executor: str, deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow's real configuration says each task is a pod of its own: the hook fails before the
    first call (and before making the file), naming the executor, rate_limit_redis_conn_id and the
    opt-out; the Test button says the same."""
    from airflow_provider_lsq.exceptions import LeadSquaredConfigError

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    with Sandbox() as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, conn_id="lsq_k8s"))
        with pytest.raises(LeadSquaredConfigError) as caught:
            hook.register_portal_user({"EmailAddress": "pod@example.com"}, "Samplepassword@123")
        message = str(caught.value)
        assert caught.value.field == "rate_limit_redis_conn_id"
        assert "'lsq_k8s'" in message and "KubernetesExecutor" in message
        assert "rate_limit_redis_conn_id" in message and "LSQ_RATE_LIMIT_FILE_SHARED=1" in message
        assert sandbox.calls == []
        assert not deployment.exists()
        works, said = LeadSquaredHook("lsq_k8s").test_connection()
        assert not works and "rate_limit_redis_conn_id" in said and "KubernetesExecutor" in said


def test_a_kubernetes_executor_pod_is_refused_whatever_its_executor_setting_reads(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker pod whose configuration reads the default executor: KubernetesExecutor's own
    AIRFLOW_IS_K8S_EXECUTOR_POD still shows it."""
    from airflow_provider_lsq.exceptions import LeadSquaredConfigError

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    monkeypatch.setenv("AIRFLOW_IS_K8S_EXECUTOR_POD", "True")
    with Sandbox() as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, conn_id="lsq_k8s_pod"))
        with pytest.raises(LeadSquaredConfigError, match="KubernetesExecutor pod"):
            hook.register_portal_user({"EmailAddress": "pod@example.com"}, "Samplepassword@123")
        assert sandbox.calls == []


@pytest.mark.parametrize(
    ("executor", "pod"), [("CeleryExecutor", False), ("LocalExecutor", True)], ids=["celery", "pod"]
)
def test_workers_that_may_be_several_machines_are_warned_before_the_first_call(
    executor: str, pod: bool, deployment: Path, monkeypatch: pytest.MonkeyPatch, task_log: TaskLog
) -> None:
    """Celery (one worker or several?), or a pod running LocalExecutor (one scheduler or several?): the
    run goes on, after a warning logged before any call that names rate_limit_redis_conn_id."""
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    if pod:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with Sandbox() as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, conn_id="lsq_pool"))
        warned_at_first_send: list[bool] = []
        real_send = hook._send

        def send(*args: Any, **kwargs: Any) -> Any:
            if not warned_at_first_send:
                warned_at_first_send.append(BUDGET_WARNING in task_log())
            return real_send(*args, **kwargs)

        monkeypatch.setattr(hook, "_send", send)
        result = hook.register_portal_user({"EmailAddress": "w@example.com"}, "Samplepassword@123")
        assert result.lead_id and sandbox.register_calls == 1
        assert warned_at_first_send == [True]
        assert task_log.count(BUDGET_WARNING) == 1
        # One warning (counted above), which Airflow 2 writes to both sources, each in its own format.
        lines = {line for line in task_log().splitlines() if BUDGET_WARNING in line}
        assert lines
        for warning in lines:
            assert "rate_limit_redis_conn_id" in warning and "LSQ_RATE_LIMIT_FILE_SHARED=1" in warning
            assert ("CeleryExecutor" if not pod else "KUBERNETES_SERVICE_HOST") in warning
            assert_no_secret(warning, named_sandbox_secrets(sandbox), "the budget warning")


@pytest.mark.redis
def test_a_stated_shared_file_or_a_redis_budget_is_neither_refused_nor_warned(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, task_log: TaskLog, redis_url: str
) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "KubernetesExecutor")
    with Sandbox() as sandbox:
        with monkeypatch.context() as shared:
            shared.setenv("LSQ_RATE_LIMIT_FILE_SHARED", "1")
            hook = LeadSquaredHook(connect(monkeypatch, sandbox, conn_id="lsq_shared_volume"))
            hook.register_portal_user({"EmailAddress": "v@example.com"}, "Samplepassword@123")
        assert deployment.exists()  # the file budget was used
        monkeypatch.setenv("AIRFLOW_CONN_LSQ_TEST_REDIS", _redis_conn(redis_url))
        hook = LeadSquaredHook(
            connect(monkeypatch, sandbox, conn_id="lsq_k8s_redis", rate_limit_redis_conn_id="lsq_test_redis")
        )
        hook.register_portal_user({"EmailAddress": "r@example.com"}, "Samplepassword@123")
        assert sandbox.register_calls == 2
    assert task_log.count(BUDGET_WARNING) == 0


def test_two_pods_with_a_budget_each_are_refused_and_the_warning_names_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_log: TaskLog
) -> None:
    """What KubernetesExecutor does to the default budget: two pods, two files, one account. The
    account refuses them, and the refusal (the limiter's warning and the retried error) names
    rate_limit_redis_conn_id, not only the reserve; every lead still ends registered."""
    import threading

    limit = 4
    with Sandbox(rate_limit_calls=limit, rate_limit_period=1.0) as sandbox:
        hooks = [
            LeadSquaredHook(
                connect(
                    monkeypatch,
                    sandbox,
                    conn_id=f"lsq_pod_{pod}",
                    rate_limit_calls=limit,
                    rate_limit_period_seconds=1,
                    rate_limit_reserve=0,
                    rate_limit_storage=str(tmp_path / f"pod-{pod}.sqlite3"),
                    max_retries=10,
                )
            )
            for pod in "ab"
        ]
        results: dict[str, list[Any]] = {}

        def run(pod: int) -> None:
            leads = ((str(i), {"EmailAddress": f"p{pod}-{i}@example.com"}) for i in range(2 * limit))
            results[str(pod)] = list(hooks[pod].register_portal_users(leads, max_workers=limit))

        threads = [threading.Thread(target=run, args=(pod,)) for pod in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sandbox.refusals > 0
    outcomes = [o for pod in results.values() for o in pod]
    assert [o.status for o in outcomes] == [RegistrationStatus.REGISTERED] * (4 * limit)
    lines = task_log().splitlines()
    refused = [line for line in lines if "refused a call" in line]
    assert refused and all("rate_limit_redis_conn_id" in line and "pod-" in line for line in refused)
    retried = [line for line in lines if "rate limit was exceeded" in line]
    assert retried and all("rate_limit_redis_conn_id" in line for line in retried)
