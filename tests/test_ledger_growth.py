"""A grown ledger does not make runs slow: the database leaves out the rows the ledger holds as settled.

The statements each run sends are counted through the transfer's own hooks (a trace of every SQLite
statement; a counting proxy of each PostgreSQL connection), on real SQLite and PostgreSQL: the read's
cost follows the rows that may need a call, not the ledger's size.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest

from airflow_provider_lsq.hooks.payload import lead_fingerprint
from airflow_provider_lsq.passwords import generate_password
from airflow_provider_lsq.transfers import sql_to_leadsquared
from airflow_provider_lsq.transfers.ledger import RegistrationLedger
from tests import test_transfer_sql as base
from tests.test_transfer_sql import Warehouse, applicants, context, email, transfer

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

lsq, warehouse, sqlite_warehouse = base.lsq, base.warehouse, base.sqlite_warehouse
LOOKUP = re.compile(r"WHERE portal_id = \S+ AND \(\(?(row_key|lead_identifier) IN", re.IGNORECASE)


class _Cursor:
    def __init__(self, cursor: Any, log: list[str]) -> None:
        self._cursor, self._log = cursor, log

    def execute(self, sql: str, *args: Any) -> Any:
        self._log.append(sql)
        return self._cursor.execute(sql, *args)

    def fetchmany(self, *args: Any) -> Any:
        if getattr(self._cursor, "name", None):  # a server-side cursor: each fetch is a round trip
            self._log.append("FETCH")
        return self._cursor.fetchmany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Connection:
    def __init__(self, conn: Any, log: list[str]) -> None:
        self._conn, self._log = conn, log

    def cursor(self, *args: Any, **kwargs: Any) -> _Cursor:
        return _Cursor(self._conn.cursor(*args, **kwargs), self._log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the transfer's database hooks send (SQLite: its trace; PostgreSQL: each execute,
    and each fetch of a server-side cursor as ``FETCH``)."""
    log: list[str] = []
    real = sql_to_leadsquared.get_db_hook

    def counted(conn_id: str, parameter: str) -> Any:
        hook = real(conn_id, parameter)
        get_conn = hook.get_conn

        def connect() -> Any:
            conn = get_conn()
            if isinstance(conn, sqlite3.Connection):  # kept as is: the ledger needs a real one
                conn.set_trace_callback(log.append)
                return conn
            return _Connection(conn, log)

        hook.get_conn = connect  # type: ignore[method-assign]
        return hook

    monkeypatch.setattr(sql_to_leadsquared, "get_db_hook", counted)
    return log


def lookups(log: list[str]) -> int:
    return sum(1 for sql in log if LOOKUP.search(sql))


def reads(log: list[str]) -> list[str]:
    """The statements that read the query: its count and the read itself (every pass)."""
    return [sql for sql in log if "applicants" in sql]


def settle(
    wh: Warehouse,
    portal_id: str,
    keys: range,
    *,
    status: str = "registered",
    key: Callable[[int], str] = str,
) -> None:
    """Rows an earlier DAG recorded as ``status``, with their lead's fingerprint, as a grown ledger holds."""
    ledger = RegistrationLedger(sql_to_leadsquared.get_db_hook(wh.conn_id, "c"), wh.ledger_table, portal_id)
    with ledger:
        ledger.ensure_table()
    retryable = "0" if wh.kind == "sqlite" else "FALSE"
    wh.execute(
        f"INSERT INTO {wh.ledger_table} (portal_id, row_key, lead_id, status, attempts, dag_id, run_id, "
        f"task_id, map_index, execution_id, retryable, lead_identifier) "
        f"VALUES (?, ?, ?, ?, 1, 'older_dag', 'scheduled__0', 'register', -1, 'gone', {retryable}, ?)",
        [(portal_id, key(i), f"lead-{i}", status, lead_fingerprint("EmailAddress", email(i))) for i in keys],
    )


@pytest.mark.parametrize("settled", [40, 400])
def test_the_read_costs_the_same_whatever_the_ledger_holds(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], statements: list[str], settled: int
) -> None:
    """5 new rows behind 40 or 400 settled ones: the same statements, one count of the rows left."""
    sb = lsq()
    warehouse.seed(applicants(settled + 5))
    settle(warehouse, sb.portal_id, range(1, settled + 1))

    summary = transfer(warehouse, batch_size=10).execute(context())

    assert summary["registered"] == summary["total"] == 5 and sb.register_calls == 5
    assert summary["skipped"] == 0
    read = reads(statements)
    # One count (of the anti-joined query, not of the whole query), one read, one fetch past the end.
    counts = [sql for sql in read if "COUNT(*)" in sql]
    assert len(counts) == 1 and "NOT EXISTS" in counts[0]
    assert len(read) == 2 and "NOT EXISTS" in read[1]
    assert statements.count("FETCH") == (2 if warehouse.kind == "postgres" else 0)
    assert lookups(statements) == 1  # one batch of 5 rows: one ledger read


def test_one_ledger_read_per_batch(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], statements: list[str]
) -> None:
    sb = lsq()
    warehouse.seed(applicants(25))

    summary = transfer(warehouse, batch_size=10).execute(context())

    assert summary["registered"] == 25 and sb.register_calls == 25
    assert lookups(statements) == 3  # batches of 10, 10 and 5 rows
    assert statements.count("FETCH") == (4 if warehouse.kind == "postgres" else 0)


def test_a_ledger_on_another_connection_reads_every_row_and_warns(
    sqlite_warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
    statements: list[str],
    task_log: TaskLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database cannot join a ledger it does not hold: every settled row is read and skipped, one
    ledger read per batch, and the run says why it is slow."""
    sb = lsq()
    sqlite_warehouse.seed(applicants(45))
    settle(sqlite_warehouse, sb.portal_id, range(1, 41))
    path = sqlite_warehouse.query("PRAGMA database_list")[0][2]  # the same file, another connection
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_LEDGER_ELSEWHERE", json.dumps({"conn_type": "sqlite", "host": path}))

    summary = transfer(sqlite_warehouse, batch_size=10, ledger_conn_id="lsq_ledger_elsewhere").execute(
        context()
    )

    assert summary["registered"] == 5 and sb.register_calls == 5
    assert summary["total"] == 45 and summary["skipped"] == 40
    assert not [sql for sql in reads(statements) if "NOT EXISTS" in sql]
    assert lookups(statements) == 5  # 45 rows in batches of 10
    log = task_log()
    assert "40 of the 45 rows the query returned are registered in the ledger already" in log
    assert "the ledger is on another connection (ledger_conn_id)" in log


def test_a_key_whose_text_differs_in_the_database_is_left_out_here_and_warned_about(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    """A float key: the ledger holds Python's text of it ("3.0"). SQLite's CAST agrees, so the database
    leaves the settled rows out; PostgreSQL's says "3", so they are read, skipped here, and warned about."""
    sb = lsq()
    warehouse.seed(applicants(25))
    kind = "REAL" if warehouse.kind == "sqlite" else "DOUBLE PRECISION"
    sql = warehouse.sql().replace(
        "SELECT applicant_id,", f"SELECT CAST(applicant_id AS {kind}) AS applicant_id,"
    )
    settle(warehouse, sb.portal_id, range(1, 21), key=lambda i: str(float(i)))

    summary = transfer(warehouse, sql=sql, batch_size=10).execute(context())

    assert summary["registered"] == 5 and sb.register_calls == 5  # the ledger decides either way
    warned = "20 of the 25 rows the query returned are registered in the ledger already" in task_log()
    if warehouse.kind == "sqlite":
        assert summary["total"] == 5 and not warned
    else:
        assert summary["total"] == 25 and summary["skipped"] == 20 and warned
        assert "the database's text of key_column differs from the ledger's row_key" in task_log()


def test_an_ordered_query_is_read_in_its_order_without_the_numbering_column(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash anti-join that spills to disk reorders rows (PostgreSQL with a small work_mem and no
    nested loop or merge join): the transfer numbers the rows as the query returns them, keeps that
    order, and sends no numbering column."""
    sb = lsq()
    rows = 3000
    warehouse.seed(applicants(rows))
    settle(warehouse, sb.portal_id, range(1, rows + 1))
    warehouse.execute(f"DELETE FROM {warehouse.ledger_table} WHERE CAST(row_key AS INTEGER) % 100 = 0")
    if warehouse.kind == "postgres":
        env = f"AIRFLOW_CONN_{warehouse.conn_id.upper()}"
        options = "-c work_mem=64kB -c enable_nestloop=off -c enable_mergejoin=off"
        monkeypatch.setenv(env, os.environ[env] + "?options=" + quote(options, safe=""))
    sent: list[dict[str, Any]] = []

    def password(lead: Any) -> str:
        sent.append(dict(lead))
        return generate_password()

    summary = transfer(
        warehouse,
        sql=warehouse.sql(where="ORDER BY applicant_id DESC"),
        batch_size=7,
        max_workers=1,
        password_callable=password,
    ).execute(context())

    assert summary["registered"] == summary["total"] == rows // 100
    order = [int(lead["FirstName"][len("Firstname") :]) for lead in sent]
    assert order == sorted(order, reverse=True) and len(order) == rows // 100
    assert all(set(lead) == {"EmailAddress", "FirstName"} for lead in sent)


def test_a_query_the_anti_join_cannot_wrap_is_read_as_written(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    """key_column in another case than the column (PostgreSQL keeps a quoted alias's case): the
    wrapped query is refused, so the run reads the query as written, says why, and loses nothing."""
    sb = lsq()
    warehouse.seed(applicants(12))
    settle(warehouse, sb.portal_id, range(1, 11))
    sql = warehouse.sql().replace("SELECT applicant_id,", 'SELECT applicant_id AS "ApplicantId",')

    summary = transfer(warehouse, sql=sql, key_column="applicantid", batch_size=10).execute(context())

    assert summary["registered"] == 2 and sb.register_calls == 2
    refused = "The database refused the query wrapped in the ledger's anti-join" in task_log()
    if warehouse.kind == "sqlite":  # names are not case-sensitive: the anti-join applies
        assert summary["total"] == 2 and not refused
    else:
        assert summary["total"] == 12 and summary["skipped"] == 10 and refused
        assert "10 of the 12 rows the query returned are registered in the ledger already" in task_log()


@pytest.mark.parametrize(
    "ending", [";", " ;\n", "; -- the end", " -- the end\n;", "; /* done */ ;", ";\n-- a; b\n"]
)
def test_a_query_ending_in_semicolons_and_comments_is_still_anti_joined(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], statements: list[str], task_log: TaskLog, ending: str
) -> None:
    """A query pasted from an SQL editor (``...; -- done``): the anti-join and the count still wrap
    it, so the settled rows are left out in the database, not read and skipped one by one."""
    sb = lsq()
    warehouse.seed(applicants(15))
    settle(warehouse, sb.portal_id, range(1, 11))

    summary = transfer(warehouse, sql=warehouse.sql() + ending, batch_size=10).execute(context())

    assert summary["registered"] == summary["total"] == 5 and sb.register_calls == 5
    assert summary["skipped"] == 0
    assert "refused the query wrapped" not in task_log() and "Could not count" not in task_log()
    assert all("NOT EXISTS" in sql for sql in reads(statements))
