"""Issues 6 and 7 under a real Airflow scheduler: LocalExecutor, PostgreSQL metadata DB and warehouse.

One deployment (see :mod:`tests.scheduler_deployment`) serves the module: a scheduler that runs each
task in its own process, retries it by its own ``retries``, and shares nothing between task processes
but what the provider shares itself. The warehouse (applicants and ledgers) is a fresh PostgreSQL
database; LeadSquared is one sandbox per test (its own account and keys, so its own budget file under
the deployment's ``LSQ_RATE_LIMIT_DIR``).

The hard kill is the one an OOM killer or a lost node deals: SIGKILL to the process that runs the
operator (Airflow 3: the task process the supervisor forked; Airflow 2.11: the ``--raw`` task runner),
found as the one process connected to the sandbox. Its supervisor (Airflow 3) or local task job
(Airflow 2) survives, reports the task failed, and the scheduler retries it after ``retry_delay``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import textwrap
import uuid
from importlib.metadata import version
from typing import TYPE_CHECKING

import pytest

from airflow_provider_lsq.sandbox import Sandbox
from tests.conftest import POSTGRES_HOST, POSTGRES_PORT, ROOT, _port_open, _service_missing
from tests.helpers import sandbox_secrets
from tests.scheduler_deployment import Deployment
from tests.test_transfer_sql import email

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psutil

pytestmark = [pytest.mark.postgres, pytest.mark.deployment]

N = 200  # applicants for each kill test
SHARED_N = 100  # applicants split between the two DAGs of the shared-budget test
WORKERS = 8
FLUSH_INTERVAL = 2.0  # the operator's default flush_interval_seconds, set explicitly in the DAGs
KILL_RATE = (20, 1.0)  # the kill tests' sandbox: 20 calls per 1 s, 0.3 s per answer
SHARED_RATE = (10, 1.0)  # tight: two tasks with a budget each would send up to twice this

DAG_FILE = """
import datetime as dt

import pendulum
from airflow_provider_lsq.version_compat import DAG

from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

SQL = 'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstName" FROM applicants'


def registering(dag_id, conn_id, ledger, where=""):
    # Daily, no catch-up: unpausing creates the latest day's run at once. One retry, soon.
    with DAG(
        dag_id=dag_id,
        schedule="@daily",
        start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={{"retries": 1, "retry_delay": dt.timedelta(seconds=5)}},
    ) as dag:
        SqlToLeadSquaredPortalOperator(
            task_id="register",
            sql=SQL + where,
            sql_conn_id="lsq_sched_wh",
            key_column="applicant_id",
            ledger_table=ledger,
            leadsquared_conn_id=conn_id,
            max_workers={workers},
            flush_interval_seconds={flush},
        )
    return dag


kill = registering("lsq_sched_kill", "lsq_sched_kill", "ledger_kill")
term = registering("lsq_sched_term", "lsq_sched_term", "ledger_term")
# Two DAGs on one account and one ledger table, default settings (no rate_limit_storage).
shared_even = registering(
    "lsq_sched_shared_even", "lsq_sched_shared", "ledger_shared",
    " WHERE applicant_id <= {shared} AND applicant_id % 2 = 0",
)
shared_odd = registering(
    "lsq_sched_shared_odd", "lsq_sched_shared", "ledger_shared",
    " WHERE applicant_id <= {shared} AND applicant_id % 2 = 1",
)
"""
DAG_IDS = ["lsq_sched_kill", "lsq_sched_term", "lsq_sched_shared_even", "lsq_sched_shared_odd"]


class Scheduled:
    """The module's deployment, its warehouse and one sandbox per test."""

    def __init__(self, deployment: Deployment, warehouse_uri: str, sandboxes: dict[str, Sandbox]) -> None:
        self.deployment = deployment
        self.warehouse_uri = warehouse_uri
        self.sandboxes = sandboxes

    def ledger(self, table: str) -> dict[str, tuple[str, str | None, str | None]]:
        import psycopg2

        db = psycopg2.connect(self.warehouse_uri)
        try:
            with db.cursor() as cur:
                cur.execute(f"SELECT row_key, status, lead_id, run_id FROM {table}")
                rows = cur.fetchall()
        finally:
            db.close()
        assert len({row[0] for row in rows}) == len(rows)
        return {str(key): (status, lead_id, run_id) for key, status, lead_id, run_id in rows}


@contextlib.contextmanager
def _databases() -> Iterator[tuple[str, str]]:
    """Two fresh databases (metadata, warehouse), dropped afterwards; yields their URIs."""
    import psycopg2

    names = [f"lsq_sched_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("meta", "wh")]
    admin = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        meta, warehouse = (f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}" for name in names)
        yield meta, warehouse
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _seed(uri: str, n: int) -> None:
    import psycopg2

    db = psycopg2.connect(uri)
    try:
        with db, db.cursor() as cur:
            cur.execute(
                "CREATE TABLE applicants (applicant_id INTEGER PRIMARY KEY, email TEXT, first_name TEXT)"
            )
            cur.executemany(
                "INSERT INTO applicants VALUES (%s, %s, %s)",
                [(i, email(i), f"F{i}") for i in range(1, n + 1)],
            )
    finally:
        db.close()


def _lsq_conn(sb: Sandbox) -> str:
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.05
    return json.dumps(conn)


@pytest.fixture(scope="module")
def scheduled() -> Iterator[Scheduled]:
    if not _port_open(POSTGRES_HOST, POSTGRES_PORT):
        _service_missing("PostgreSQL", f"{POSTGRES_HOST}:{POSTGRES_PORT}")
    home = ROOT / ".airflow-test" / f"scheduler-{version('apache-airflow')}-{uuid.uuid4().hex[:6]}"
    (home / "dags").mkdir(parents=True)
    (home / "dags" / "lsq_sched_dags.py").write_text(
        textwrap.dedent(DAG_FILE.format(workers=WORKERS, flush=FLUSH_INTERVAL, shared=SHARED_N))
    )
    calls, period = KILL_RATE
    sandboxes = {
        "kill": Sandbox(rate_limit_calls=calls, rate_limit_period=period, latency=0.3),
        "term": Sandbox(rate_limit_calls=calls, rate_limit_period=period, latency=0.3),
        "shared": Sandbox(rate_limit_calls=SHARED_RATE[0], rate_limit_period=SHARED_RATE[1], latency=0.1),
    }
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        for sb in sandboxes.values():
            stack.enter_context(sb)
        metadata_uri, warehouse_uri = stack.enter_context(_databases())
        _seed(warehouse_uri, N)
        deployment = Deployment(
            home,
            metadata_uri,
            {
                "AIRFLOW_CONN_LSQ_SCHED_WH": warehouse_uri.replace("postgresql://", "postgres://", 1),
                **{f"AIRFLOW_CONN_LSQ_SCHED_{name.upper()}": _lsq_conn(sb) for name, sb in sandboxes.items()},
                # The default shared budget (a file per account) in this test's folder.
                "LSQ_RATE_LIMIT_DIR": str(home / "rate-limits"),
            },
        )
        stack.callback(deployment.stop)  # first of all: every Airflow process, even on failure
        deployment.start(DAG_IDS)
        yield Scheduled(deployment, warehouse_uri, sandboxes)


def _portal_users(sb: Sandbox) -> dict[str, int]:
    """applicant key -> times registered, for every lead the sandbox made a portal user."""
    return {
        lead.fields["EmailAddress"].split("@")[0].removeprefix("applicant"): lead.registrations
        for lead in sb.leads
        if lead.portal_user
    }


def _mid_run(scheduled: Scheduled, dag_id: str, sb: Sandbox) -> psutil.Process:
    """Unpause ``dag_id``; once its task has registered about a third of the rows, its task process."""
    deployment = scheduled.deployment
    deployment.unpause(dag_id)
    deployment.wait_for(lambda: sb.register_calls >= N // 3, f"{dag_id} registering", timeout=240)
    found: list[psutil.Process] = []

    def one_task_process() -> bool:
        found[:] = deployment.task_processes(sb.port)
        return len(found) == 1

    deployment.wait_for(one_task_process, "one process connected to the sandbox", timeout=30)
    (process,) = found
    assert sb.register_calls < N, "the task ended before it was stopped: raise the sandbox latency"
    return process


def _signal_kills_retried() -> bool:
    """Whether this Airflow retries a task whose process a signal killed: 2.x's local task job does, and
    3.1+'s supervisor (its ``_should_retry``); 3.0's fails it (apache/airflow#55753)."""
    try:
        import attrs
        from airflow.sdk.execution_time.supervisor import ActivitySubprocess
    except ImportError:  # Airflow 2: no Task SDK supervisor
        return True
    return "_should_retry" in attrs.fields_dict(ActivitySubprocess)


def test_a_sigkilled_task_retried_by_the_scheduler_resends_at_most_the_calls_in_flight_and_one_flush(
    scheduled: Scheduled,
) -> None:
    sb, deployment = scheduled.sandboxes["kill"], scheduled.deployment
    _mid_run(scheduled, "lsq_sched_kill", sb).send_signal(signal.SIGKILL)  # as the OOM killer does
    # The supervisor (or local task job) reports the failure; the retry waits retry_delay, so while the
    # task is up_for_retry nothing registers and the sandbox has answered every call in flight.
    # Airflow 3.0's supervisor fails a task killed by a signal whatever its retries (apache/airflow#55753,
    # fixed in 3.1): there the person clears it, which runs it again as a retry would.
    state_tries = deployment.wait_for_task("lsq_sched_kill", {"up_for_retry", "failed", "success"})
    if _signal_kills_retried():
        assert state_tries == ("up_for_retry", 1), deployment.logs()
    else:
        assert state_tries == ("failed", 1), deployment.logs()

    ledger = scheduled.ledger("ledger_kill")
    registered = set(_portal_users(sb))
    recorded = {key for key, (status, _, _) in ledger.items() if status == "registered"}
    pending = {key for key, (status, _, _) in ledger.items() if status == "pending"}
    unrecorded = registered - recorded
    assert 0 < len(registered) < N
    assert recorded <= registered
    assert unrecorded <= pending  # the ledger shows each registration it lacks as pending
    # What a kill with no warning can lose: the calls in flight (one per worker) and the outcomes of
    # the last flush interval, at most the sandbox's rate for that long.
    calls, period = KILL_RATE
    bound = WORKERS + int(calls / period * FLUSH_INTERVAL)
    assert len(unrecorded) <= bound, (len(unrecorded), bound)

    if not _signal_kills_retried():
        deployment.airflow("tasks", "clear", "lsq_sched_kill", "--yes")
        deployment.wait_for(
            lambda: deployment.task("lsq_sched_kill") != ("failed", 1), "the clear", timeout=60
        )
    assert deployment.wait_for_task("lsq_sched_kill", {"success", "failed"}) == ("success", 2), (
        deployment.logs()
    )
    after = _portal_users(sb)
    assert len(after) == N  # every applicant registered
    twice = {key for key, count in after.items() if count > 1}
    assert twice == unrecorded  # only the rows whose outcome the kill lost
    assert len(twice) <= bound
    final = scheduled.ledger("ledger_kill")
    assert len(final) == N  # the ledger records every row, as registered, with its lead id
    leads = {lead.fields["EmailAddress"].split("@")[0].removeprefix("applicant"): lead for lead in sb.leads}
    assert {key: row[:2] for key, row in final.items()} == {
        key: ("registered", lead.lead_id) for key, lead in leads.items()
    }


def test_a_task_marked_failed_mid_run_records_every_call_and_its_clear_registers_nobody_twice(
    scheduled: Scheduled,
) -> None:
    """Airflow's own stop: the task marked failed (as from the UI); its supervisor (Airflow 3) or local
    task job (Airflow 2) learns it at the next heartbeat and sends SIGTERM, then SIGKILL if the process
    outlives the grace period. The person then clears the task: the scheduler runs it again."""
    sb, deployment = scheduled.sandboxes["term"], scheduled.deployment
    process = _mid_run(scheduled, "lsq_sched_term", sb)
    deployment.mark_failed("lsq_sched_term")
    deployment.wait_for(lambda: not process.is_running(), "the task process to stop", timeout=120)
    log = deployment.task_log("lsq_sched_term", attempt=1)
    assert "Stop requested" in log, log[-3000:]  # Airflow's SIGTERM reached on_kill
    assert "Stopped: every call made is recorded." in log, log[-3000:]  # within the grace period
    assert deployment.task("lsq_sched_term") == ("failed", 1)

    ledger = scheduled.ledger("ledger_term")
    registered = set(_portal_users(sb))
    assert 0 < len(registered) < N
    # on_kill recorded every call made before the task failed: nothing pending, nothing lost.
    assert {key for key, (status, _, _) in ledger.items() if status == "registered"} == registered
    assert not [key for key, (status, _, _) in ledger.items() if status == "pending"]

    deployment.airflow("tasks", "clear", "lsq_sched_term", "--yes")
    deployment.wait_for(lambda: deployment.task("lsq_sched_term") != ("failed", 1), "the clear", timeout=60)
    assert deployment.wait_for_task("lsq_sched_term", {"success", "failed"}) == ("success", 2), (
        deployment.logs()
    )
    after = _portal_users(sb)
    assert len(after) == N
    assert max(after.values()) == 1  # zero registered twice
    assert sb.register_calls == N
    final = scheduled.ledger("ledger_term")
    assert len(final) == N
    assert {status for status, _, _ in final.values()} == {"registered"}


def test_two_dags_on_one_account_at_once_with_default_settings_are_never_refused(
    scheduled: Scheduled,
) -> None:
    sb, deployment = scheduled.sandboxes["shared"], scheduled.deployment
    dags = ("lsq_sched_shared_even", "lsq_sched_shared_odd")
    deployment.unpause(*dags)
    for dag_id in dags:
        assert deployment.wait_for_task(dag_id, {"success", "failed", "up_for_retry"}) == ("success", 1), (
            deployment.logs()
        )
    # The two tasks ran at once, each in its own process: their runs overlap.
    (start_a, end_a), (start_b, end_b) = (deployment.task_times(dag_id) for dag_id in dags)
    assert max(start_a, start_b) < min(end_a, end_b), ((start_a, end_a), (start_b, end_b))
    by_caller = sb.calls_by_caller()
    assert by_caller["ours"]["refused"] == 0, by_caller
    assert sb.refusals == 0
    # They shared the account's budget through the default file store, in the deployment's directory.
    assert list((deployment.home / "rate-limits").iterdir())
    after = _portal_users(sb)
    assert len(after) == SHARED_N
    assert max(after.values()) == 1
    ledger = scheduled.ledger("ledger_shared")
    assert len(ledger) == SHARED_N
    assert {status for status, _, _ in ledger.values()} == {"registered"}


def test_no_key_or_token_in_any_log_of_the_deployment(scheduled: Scheduled) -> None:
    """Every log the deployment wrote (components and task tries, killed ones included) is clean."""
    secrets = {form for sb in scheduled.sandboxes.values() for form in sandbox_secrets(sb)}
    logs = [path for path in scheduled.deployment.home.rglob("*.log") if path.is_file()]
    assert logs
    leaks = {
        str(path.relative_to(scheduled.deployment.home))
        for path in logs
        for secret in secrets
        if secret in path.read_text(errors="replace")
    }
    assert not leaks
