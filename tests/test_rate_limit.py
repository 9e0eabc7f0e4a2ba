"""The account's rate limit, kept client-side: bursts the sandbox never refuses, across threads and
processes (a real Redis shares one budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest

from airflow_provider_lsq.exceptions import LeadSquaredDailyLimitError
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.sandbox import Sandbox
from tests.helpers import connect

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
    prefix, count, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    hook = LeadSquaredHook("lsq_shared")
    hook.config  # read the connection before the start line, so all workers fire together
    time.sleep(max(0.0, start_at - time.time()))
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
    start_at = time.time() + 8  # time for three interpreters to import Airflow
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"w{n}-", str(per_worker), str(start_at)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(workers)
    ]
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
