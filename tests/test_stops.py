"""Whatever stops the task, every registration made is recorded (issue 6), over real HTTP and databases.

The kill tests stop a real task process with a real signal. The task process is a child Python that
runs a one-task DAG with ``dag.test()``, so Airflow's own task runner executes the operator and
installs Airflow's own SIGTERM handler (Airflow 3: ``task_runner.run`` in process, whose handler calls
``on_kill()``; Airflow 2: ``TaskInstance._run_raw_task``, whose handler calls ``on_kill()`` and then
raises). The test sends SIGTERM, then SIGKILL 5 s later if the process is still there, as Airflow's
supervisor does. The task's retry (same run id) then runs in-process. The transfer's SIGTERM test runs
on a PostgreSQL warehouse and its SIGKILL test on a SQLite one, the ledger in it; the same stops under
a real scheduler (PostgreSQL, Airflow's own retries) are in ``test_scheduler.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.sandbox import Sandbox
from tests.helpers import fetch_all
from tests.test_transfer_sql import Warehouse, context, email, transfer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.deployment  # every test here stops a real task process with a real signal
AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
REGISTER = "/api/Authentication/v2/Register"
SQL = 'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstName" FROM applicants'
LEDGER = "lsq_ledger"

CHILD = """
import datetime as dt
import sys

from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

try:
    from airflow.sdk import DAG
except ImportError:
    from airflow import DAG

with DAG(dag_id={dag_id!r}, schedule=None, start_date=dt.datetime(2025, 1, 1), catchup=False) as dag:
    SqlToLeadSquaredPortalOperator(
        task_id="register",
        sql={sql!r},
        sql_conn_id="lsq_stop_wh",
        key_column="applicant_id",
        ledger_table={ledger!r},
        leadsquared_conn_id="lsq_stop",
        max_workers={workers},
    )

    RegisterPortalUserOperator(
        task_id="register_list",
        leads=[{{"EmailAddress": f"listed{{i}}@example.edu"}} for i in range({list_rows})],
        leadsquared_conn_id="lsq_stop",
        max_workers={workers},
    ) if {list_rows} else None

if __name__ == "__main__":
    when = dt.datetime.now(dt.timezone.utc)
    try:
        dag.test(logical_date=when)
    except TypeError:  # Airflow 2
        import airflow.providers.fab.auth_manager.models  # noqa: F401

        dag.test(execution_date=when)
"""


def _seed(path: Path, n: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE applicants (applicant_id INTEGER, email TEXT, first_name TEXT)")
    db.executemany(
        "INSERT INTO applicants VALUES (?, ?, ?)", [(i, email(i), f"F{i}") for i in range(1, n + 1)]
    )
    db.commit()
    db.close()


def _ledger(path: Path) -> dict[str, tuple[str, str | None, str | None]]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(f"SELECT row_key, status, lead_id, run_id FROM {LEDGER}").fetchall()
    finally:
        db.close()
    return {str(key): (status, lead_id, run_id) for key, status, lead_id, run_id in rows}


def _portal_users(sb: Sandbox) -> dict[str, int]:
    """applicant key -> times registered, for every lead the sandbox made a portal user."""
    return {
        lead.fields["EmailAddress"].split("@")[0].removeprefix("applicant"): lead.registrations
        for lead in sb.leads
        if lead.portal_user
    }


class StopWarehouse:
    """The task's warehouse (applicants and ledger): the SQLite file, or a fresh PostgreSQL database."""

    def __init__(self, tmp_path: Path, uri: str | None = None) -> None:
        self.path, self.uri = tmp_path / "wh.db", uri
        sqlite = json.dumps({"conn_type": "sqlite", "host": str(self.path)})
        self.conn = uri.replace("postgresql://", "postgres://", 1) if uri else sqlite

    def seed(self, n: int) -> None:
        if not self.uri:
            return _seed(self.path, n)
        import psycopg2

        db = psycopg2.connect(self.uri)
        try:
            with db, db.cursor() as cur:
                cur.execute("CREATE TABLE applicants (applicant_id INTEGER, email TEXT, first_name TEXT)")
                cur.executemany(
                    "INSERT INTO applicants VALUES (%s, %s, %s)",
                    [(i, email(i), f"F{i}") for i in range(1, n + 1)],
                )
        finally:
            db.close()

    def ledger(self) -> dict[str, tuple[str, str | None, str | None]]:
        if not self.uri:
            return _ledger(self.path)
        import psycopg2

        rows = fetch_all(psycopg2.connect(self.uri), f"SELECT row_key, status, lead_id, run_id FROM {LEDGER}")
        return {str(key): (status, lead_id, run_id) for key, status, lead_id, run_id in rows}


POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)


@pytest.fixture(params=["sqlite", POSTGRES])
def stop_warehouse(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StopWarehouse]:
    """The warehouse the task process and its retry use (``AIRFLOW_CONN_LSQ_STOP_WH``)."""
    if request.param == "sqlite":
        wh = StopWarehouse(tmp_path)
        monkeypatch.setenv("AIRFLOW_CONN_LSQ_STOP_WH", wh.conn)
        yield wh
        return
    import psycopg2

    server = request.getfixturevalue("postgres_server")
    name = f"lsq_stops_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(server)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        wh = StopWarehouse(tmp_path, server.rsplit("/", 1)[0] + f"/{name}")
        monkeypatch.setenv("AIRFLOW_CONN_LSQ_STOP_WH", wh.conn)
        yield wh
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _warehouse_conn(tmp_path: Path) -> str:
    """The warehouse :func:`stop_warehouse` set up, else the SQLite file."""
    default = json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "wh.db")})
    return os.environ.get("AIRFLOW_CONN_LSQ_STOP_WH") or default


@pytest.fixture
def stop_sandbox(airflow_db: Path) -> Iterator[Sandbox]:
    """The issue's sandbox: 20 calls per second, 0.2 s per answer."""
    with Sandbox(rate_limit_calls=20, rate_limit_period=1.0, latency=0.2) as sb:
        yield sb


def _dag_id(tmp_path: Path) -> str:
    """The test's own DAG id: a DAG id met again in one metadata DB with other tasks keeps its first
    serialized version on Airflow 3.1 (``dag.test()`` then finds no ``register_list``)."""
    return f"lsq_stop_{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"


def _start_task(
    tmp_path: Path, sb: Sandbox, workers: int, list_rows: int = 0
) -> tuple[subprocess.Popen[bytes], Path]:
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.05
    env = {
        **os.environ,
        "AIRFLOW_CONN_LSQ_STOP": json.dumps(conn),
        "AIRFLOW_CONN_LSQ_STOP_WH": _warehouse_conn(tmp_path),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path),  # dag.test() runs the DAG its bundle holds
    }
    dag_file = tmp_path / "lsq_stop_dag.py"
    dag_file.write_text(
        textwrap.dedent(
            CHILD.format(
                dag_id=_dag_id(tmp_path), sql=SQL, ledger=LEDGER, workers=workers, list_rows=list_rows
            )
        )
    )
    log = tmp_path / "task.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(dag_file)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return process, log


def _wait_for_calls(sb: Sandbox, process: subprocess.Popen[bytes], calls: int, log: Path) -> None:
    deadline = time.monotonic() + 180  # the child imports Airflow first: generous under load
    while sb.register_calls < calls:
        if process.poll() is not None:
            pytest.fail(f"the task process ended early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the task made no progress:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _retry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sb: Sandbox, run_id: str) -> dict[str, Any]:
    """The task's retry: same run id, in process."""
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.05
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_STOP", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_STOP_WH", _warehouse_conn(tmp_path))
    op = transfer(
        Warehouse("sqlite", "lsq_stop_wh", lambda: None, None),
        sql=SQL,
        ledger_table=LEDGER,
        leadsquared_conn_id="lsq_stop",
        batch_size=500,
    )
    return op.execute(context(run_id, dag_id=_dag_id(tmp_path)))  # the killed try's task instance


# Each transfer stop runs on one warehouse: the stop path is the same on both, and each dialect's
# ledger is met by one kind of stop. SIGTERM's last flush crosses a network connection (PostgreSQL);
# SIGKILL leaves whatever the dead process held (a SQLite file's lock and journal) to its retry.
@pytest.mark.parametrize("stop_warehouse", [POSTGRES], indirect=True)
def test_sigterm_records_every_call_made_and_the_retry_registers_nobody_twice(
    tmp_path: Path, stop_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, stop_warehouse: StopWarehouse
) -> None:
    sb, n = stop_sandbox, 300
    stop_warehouse.seed(n)
    process, log = _start_task(tmp_path, sb, workers=32)
    _wait_for_calls(sb, process, 60, log)  # about 3 s of registering
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)  # Airflow's grace period, then SIGKILL (dag.test's own ending may be slow)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "Stop requested" in text, text[-3000:]  # Airflow's own handler called on_kill
    # on_kill returned only once every call made was recorded, inside the grace period.
    assert "Stopped: every call made is recorded." in text, text[-3000:]

    ledger = stop_warehouse.ledger()
    registered = _portal_users(sb)
    assert 0 < len(registered) < n
    # Every lead registered is in the ledger as registered, with its lead id; nothing left pending.
    recorded = {key for key, (status, _, _) in ledger.items() if status == "registered"}
    assert recorded == set(registered)
    assert not [key for key, (status, _, _) in ledger.items() if status == "pending"]
    for lead in sb.leads:
        key = lead.fields["EmailAddress"].split("@")[0].removeprefix("applicant")
        assert ledger[key][1] == lead.lead_id
    run_id = next(iter(ledger.values()))[2]
    assert run_id

    summary = _retry(monkeypatch, tmp_path, sb, str(run_id))
    assert summary["registered"] == n - len(registered)
    assert summary["skipped"] == summary["from_earlier_tries"] == len(registered)
    after = _portal_users(sb)
    assert len(after) == n
    assert max(after.values()) == 1  # zero rows registered twice
    assert sb.register_calls == n


@pytest.mark.parametrize("stop_warehouse", ["sqlite"], indirect=True)
def test_sigkill_resends_at_most_the_calls_in_flight_and_the_last_flush_interval(
    tmp_path: Path, stop_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, stop_warehouse: StopWarehouse
) -> None:
    sb, n, workers, flush_interval, per_second = stop_sandbox, 300, 8, 2.0, 20
    stop_warehouse.seed(n)
    process, log = _start_task(tmp_path, sb, workers=workers)
    _wait_for_calls(sb, process, 80, log)
    process.send_signal(signal.SIGKILL)  # no warning at all
    process.wait()

    ledger = stop_warehouse.ledger()
    registered = set(_portal_users(sb))
    recorded = {key for key, (status, _, _) in ledger.items() if status == "registered"}
    pending = {key for key, (status, _, _) in ledger.items() if status == "pending"}
    unrecorded = registered - recorded
    assert recorded <= registered
    # The ledger shows every registration it lacks as pending: a person can see them.
    assert unrecorded <= pending
    bound = workers + per_second * flush_interval
    assert len(unrecorded) <= bound, (len(unrecorded), bound)
    run_id = str(next(iter(ledger.values()))[2])

    summary = _retry(monkeypatch, tmp_path, sb, run_id)
    assert summary["resent_pending"] == len(pending)
    after = _portal_users(sb)
    assert len(after) == n
    twice = {key for key, count in after.items() if count > 1}
    assert twice == unrecorded  # only the rows whose outcome the kill lost
    assert len(twice) <= bound
    assert not [key for key, (status, _, _) in stop_warehouse.ledger().items() if status != "registered"]


def test_sigterm_on_the_list_operator_pushes_every_outcome_made(
    tmp_path: Path, stop_sandbox: Sandbox, airflow_db: Path
) -> None:
    """The DAG's second task (a list of 200 leads) runs alongside the transfer of an empty warehouse."""
    sb = stop_sandbox
    _seed(tmp_path / "wh.db", 0)
    process, log = _start_task(tmp_path, sb, workers=16, list_rows=200)
    _wait_for_calls(sb, process, 40, log)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "Stopped: every call made is recorded." in text, text[-3000:]

    db = sqlite3.connect(airflow_db / "airflow.db")
    try:
        (value,) = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = 'register_list' "
            "AND key = 'outcomes' ORDER BY timestamp DESC LIMIT 1",
            (_dag_id(tmp_path),),
        ).fetchone()
    finally:
        db.close()
    outcomes = json.loads(value)
    if isinstance(outcomes, str):  # stored JSON-encoded twice on some versions
        outcomes = json.loads(outcomes)
    registered = {lead.fields["EmailAddress"] for lead in sb.leads if lead.portal_user}
    assert 0 < len(registered) < 200
    assert {o["key"] for o in outcomes if o["status"] == "registered"} == registered
