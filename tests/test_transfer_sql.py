"""SqlToLeadSquaredPortalOperator over real HTTP (the sandbox) and real SQLite and PostgreSQL warehouses.

Most tests execute the operator directly with a minimal context; ``test_dag_test_*`` runs a tiny DAG
with ``dag.test()`` on the migrated metadata database. The ledger lives next to the warehouse (the
same SQLite file, or the same PostgreSQL database), as it does by default.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import uuid
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.exceptions import LeadSquaredAuthenticationError
from airflow_provider_lsq.passwords import generate_password
from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator
from airflow_provider_lsq.version_compat import AirflowException, AirflowFailException
from tests.helpers import (
    RecordingPasswords,
    assert_no_secret,
    dag_test,
    fetch_all,
    named_sandbox_secrets,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
REGISTER = "/api/Authentication/v2/Register"
FAST = {"rate_limit_calls": 100, "rate_limit_period": 1.0}
N = 40


# -- helpers -------------------------------------------------------------------------------------------


class FakeTI:
    """Enough of a task instance for ``execute``: records XCom pushes."""

    dag_id = "lsq_transfer_test"
    try_number = 1

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def context(run_id: str = "manual__1", **ti: Any) -> dict[str, Any]:
    """A task's context for ``run_id``; ``ti`` sets the task instance's attributes (e.g. ``dag_id``)."""
    task_instance = FakeTI()
    for name, value in ti.items():
        setattr(task_instance, name, value)
    return {"ti": task_instance, "run_id": run_id}


def email(i: int) -> str:
    return f"applicant{i}@example.edu"


def first_name(i: int) -> str:
    return f"Firstname{i}"


class Warehouse:
    """An applicants table behind an Airflow connection (SQLite file or a PostgreSQL schema)."""

    def __init__(self, kind: str, conn_id: str, connect: Callable[[], Any], schema: str | None) -> None:
        self.kind = kind
        self.conn_id = conn_id
        self.connect = connect
        self.schema = schema

    def table(self, name: str) -> str:
        return f"{self.schema}.{name}" if self.schema else name

    @property
    def ledger_table(self) -> str:
        return self.table("lsq_ledger")

    def execute(self, sql: str, rows: list[tuple[Any, ...]] | None = None) -> None:
        db = self.connect()
        try:
            cur = db.cursor()
            if rows is None:
                cur.execute(sql)
            else:
                mark = "?" if self.kind == "sqlite" else "%s"
                cur.executemany(sql.replace("?", mark), rows)
            db.commit()
        finally:
            db.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return fetch_all(self.connect(), sql)

    def seed(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows of (applicant_id, email, first_name, bogus): no primary key, so duplicates are allowed."""
        self.execute(
            f"CREATE TABLE {self.table('applicants')} "
            "(applicant_id INTEGER, email TEXT, first_name TEXT, bogus TEXT)"
        )
        self.execute(f"INSERT INTO {self.table('applicants')} VALUES (?, ?, ?, ?)", rows)

    def sql(self, extra_columns: str = "", where: str = "") -> str:
        return (
            'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstName"'
            f"{extra_columns} FROM {self.table('applicants')} {where}"
        )

    def ledger(self) -> dict[str, dict[str, Any]]:
        names = (
            "status",
            "lead_id",
            "error_type",
            "error_message",
            "attempts",
            "retryable",
            "run_id",
            "execution_id",
        )
        rows = self.query(f"SELECT row_key, {', '.join(names)} FROM {self.ledger_table}")
        ledger = {str(row[0]): dict(zip(names, row[1:], strict=True)) for row in rows}
        assert len(ledger) == len(rows)
        return ledger

    def ledger_cells(self) -> list[str]:
        return [str(cell) for row in self.query(f"SELECT * FROM {self.ledger_table}") for cell in row]


def applicants(n: int = N, *, without_email: tuple[int, ...] = ()) -> list[tuple[Any, ...]]:
    """Applicants 1 to ``n``; those numbered in ``without_email`` have a NULL email (invalid rows)."""
    return [(i, None if i in without_email else email(i), first_name(i), None) for i in range(1, n + 1)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    return make_warehouse(request.param, request, tmp_path, monkeypatch)


@pytest.fixture
def sqlite_warehouse(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Warehouse:
    return make_warehouse("sqlite", request, tmp_path, monkeypatch)


def make_warehouse(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Warehouse:
    conn_id = f"lsq_wh_{uuid.uuid4().hex[:8]}"
    env = f"AIRFLOW_CONN_{conn_id.upper()}"
    if kind == "sqlite":
        path = tmp_path / "warehouse.db"
        # The JSON form: the sqlite hook reads the file path from ``host`` on Airflow 2.11 and 3.x.
        monkeypatch.setenv(env, json.dumps({"conn_type": "sqlite", "host": str(path)}))
        return Warehouse(kind, conn_id, lambda: sqlite3.connect(path), None)
    import psycopg2

    uri = request.getfixturevalue("postgres_server")
    monkeypatch.setenv(env, uri.replace("postgresql://", "postgres://", 1))
    schema = f"wh_{uuid.uuid4().hex[:8]}"
    wh = Warehouse(kind, conn_id, lambda: psycopg2.connect(uri), schema)
    wh.execute(f"CREATE SCHEMA {schema}")
    return wh


@pytest.fixture
def lsq(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Sandbox]:
    """``make(conn_extra=None, **sandbox_kwargs)``: a fast sandbox as ``leadsquared_default``."""

    def make(conn_extra: dict[str, Any] | None = None, **kwargs: Any) -> Sandbox:
        sb = leadsquared_sandbox_factory(**{**FAST, **kwargs})
        conn = json.loads(sb.connection_json())
        conn["extra"].update({"retry_wait_seconds": 0.01, **(conn_extra or {})})
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
        return sb

    return make


def transfer(wh: Warehouse, **kwargs: Any) -> SqlToLeadSquaredPortalOperator:
    options: dict[str, Any] = {
        "task_id": "register",
        "sql": wh.sql(),
        "sql_conn_id": wh.conn_id,
        "key_column": "applicant_id",
        "ledger_table": wh.ledger_table,
        "batch_size": 10,
    }
    options.update(kwargs)
    return SqlToLeadSquaredPortalOperator(**options)


# -- the happy path, with a misbehaving API ------------------------------------------------------------


def test_every_row_ends_in_the_ledger_once_despite_faults_and_reruns_make_no_call(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    # About one call in four faults here; 11 attempts make a row that exhausts them (and would end
    # failed, retryable) a one-in-four-million event instead of one run in a hundred.
    sb = lsq(
        conn_extra={"max_retries": 10},
        latency=0.01,
        latency_jitter=0.02,
        fault_rate=0.15,
        lost_response_rate=0.1,
        seed=11,
    )
    rows = applicants()
    rows[4] = (5, None, "NoEmail", None)  # invalid: no identifier
    rows[9] = (10, "bad\x01@example.edu", "Control", None)  # invalid: control character
    warehouse.seed(rows)

    summary = transfer(warehouse, max_failure_ratio=0.1).execute(context())

    assert summary["registered"] == N - 2
    assert summary["invalid"] == 2
    assert summary["failed"] == summary["skipped"] == summary["duplicates"] == 0
    assert summary["total"] == N
    ledger = warehouse.ledger()
    assert set(ledger) == {str(i) for i in range(1, N + 1)}
    for i in range(1, N + 1):
        row = ledger[str(i)]
        if i in (5, 10):
            assert row["status"] == "invalid"
            assert row["lead_id"] is None
            assert "'EmailAddress'" in row["error_message"]
            continue
        assert row["status"] == "registered", row
        lead = sb.find_lead("EmailAddress", email(i))
        assert lead is not None and lead.portal_user
        assert row["lead_id"] == lead.lead_id
        assert row["attempts"] >= 1
    assert sb.find_lead("FirstName", "NoEmail") is None

    calls_before = len(sb.calls)
    again = transfer(warehouse).execute(context("manual__2"))
    assert len(sb.calls) == calls_before  # not even a token fetch
    # The registered rows are left out by the database (the ledger's anti-join): not even read.
    assert again["total"] == again["skipped"] == 2
    assert again["skipped_failed"] == 2  # validated again (the data may have been fixed): still invalid
    assert again["registered"] == again["invalid"] == 0


# -- killed halfway, then retried ----------------------------------------------------------------------

# Raises ("integer overflow" / "bigint out of range") when the stream reaches applicant 26: a warehouse
# that fails in the middle of the read, on SQLite and PostgreSQL alike.
BOMB = (
    ", CASE WHEN applicant_id > 25 THEN abs(-9223372036854775807 - (applicant_id - applicant_id + 1)) "
    'END AS "mx_Intake"'
)


def test_a_run_killed_midway_then_retried_registers_no_recorded_row_twice(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(latency=0.01)
    warehouse.seed(applicants())

    with pytest.raises(Exception) as info:
        transfer(warehouse, sql=warehouse.sql(BOMB)).execute(context())
    assert not isinstance(info.value, AirflowException)  # the warehouse's own error, raised at the end
    recorded = warehouse.ledger()
    assert 0 < len(recorded) < N
    assert all(row["status"] == "registered" for row in recorded.values())
    # Rows in flight when the stream broke finished and were recorded: nothing registered unrecorded.
    assert sb.register_calls == len(recorded)

    summary = transfer(warehouse).execute(context())  # the task's retry: same run id
    assert summary["from_earlier_tries"] == summary["skipped"] == len(recorded)  # in the verdict, no call
    assert summary["registered"] == N - len(recorded)
    assert sb.register_calls == N
    for i in range(1, N + 1):
        lead = sb.find_lead("EmailAddress", email(i))
        assert lead is not None and lead.registrations == 1, i
    assert len(warehouse.ledger()) == N


def test_a_hook_failing_midway_still_records_what_finished(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    sqlite_warehouse.seed(applicants())
    made = 0
    lock = threading.Lock()

    def password(lead: Any) -> str:
        nonlocal made
        with lock:
            made += 1
            if made == 15:  # the keys stop working: no row can survive that, the task stops
                sb.set_wrong_region("portalapi-us11.leadsquared.com")
        return generate_password()

    with pytest.raises(AirflowFailException) as info:  # no retry can fix bad keys
        transfer(sqlite_warehouse, password_callable=password, max_workers=2).execute(context())
    assert isinstance(info.value.__cause__, LeadSquaredAuthenticationError)
    recorded = sqlite_warehouse.ledger()
    assert recorded
    assert all(row["status"] == "registered" for row in recorded.values())

    sb.set_wrong_region(None)
    transfer(sqlite_warehouse).execute(context())
    assert len(sqlite_warehouse.ledger()) == N
    for key in recorded:
        lead = sb.find_lead("EmailAddress", email(int(key)))
        assert lead is not None and lead.registrations == 1, key


# -- outcomes by kind ----------------------------------------------------------------------------------


def test_only_new_leads_reports_an_existing_lead_as_already_registered(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    existing = sb.add_lead({"EmailAddress": email(3), "FirstName": "Existing"})
    sqlite_warehouse.seed(applicants(6))

    summary = transfer(sqlite_warehouse, only_new_leads=True).execute(context())

    assert summary["already_registered"] == 1
    assert summary["registered"] == 5
    ledger = sqlite_warehouse.ledger()
    assert ledger["3"]["status"] == "already_registered"
    assert ledger["3"]["error_type"] == "MXDuplicateEntryException"
    lead = sb.find_lead("EmailAddress", email(3))
    assert lead is not None and lead.lead_id == existing and not lead.portal_user
    calls = sb.register_calls
    again = transfer(sqlite_warehouse, only_new_leads=True).execute(context("r2"))
    assert again["total"] == again["skipped"] == 0  # all settled: left out by the database
    assert sb.register_calls == calls


def test_transient_failures_retry_next_run_permanent_ones_only_with_retry_failed(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(conn_extra={"max_retries": 0})
    rows = applicants(12)
    rows[10] = (11, email(11), first_name(11), "teal")  # an attribute the account does not have
    rows[11] = (12, email(12), first_name(12), "green")
    sqlite_warehouse.seed(rows)
    sql = sqlite_warehouse.sql(', bogus AS "mx_Favourite_Colour"', "ORDER BY applicant_id")
    sb.inject(503, 503, 503, path=REGISTER)  # one worker: the first three rows meet them

    first = transfer(sqlite_warehouse, sql=sql, max_workers=1, max_failure_ratio=1.0).execute(context("r1"))
    assert first["failed"] == 5
    assert first["registered"] == 7
    ledger = sqlite_warehouse.ledger()
    for key in ("1", "2", "3"):
        assert ledger[key]["status"] == "failed" and ledger[key]["retryable"]
    for key in ("11", "12"):
        assert ledger[key]["status"] == "failed" and not ledger[key]["retryable"]
        assert ledger[key]["error_type"] == "MXInvalidAttributeException"
        assert "mx_Favourite_Colour" in ledger[key]["error_message"]

    calls = sb.register_calls
    second = transfer(sqlite_warehouse, sql=sql, max_failure_ratio=1.0).execute(context("r2"))
    assert sb.register_calls - calls == 3
    assert second["registered"] == 3
    assert second["total"] == 5  # the 7 registered rows are left out by the database
    assert second["skipped"] == second["skipped_failed"] == 2  # failed for good: read, reported
    ledger = sqlite_warehouse.ledger()
    for key in ("1", "2", "3"):
        assert ledger[key]["status"] == "registered"
        assert ledger[key]["attempts"] == 2  # accumulated across runs
        assert ledger[key]["run_id"] == "r2"

    calls = sb.register_calls
    third = transfer(sqlite_warehouse, sql=sql, retry_failed=True, max_failure_ratio=1.0).execute(
        context("r3")
    )
    assert sb.register_calls - calls == 2
    assert third["failed"] == 2
    assert third["total"] == 2 and third["skipped"] == 0


def test_duplicate_keys_are_reported_and_sent_once_and_null_keys_are_invalid(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    sb = lsq()
    rows = applicants(25)
    rows.insert(5, (5, email(5), first_name(5), None))  # a duplicate within one batch
    rows.append((None, "nokey1@example.edu", "NoKey", None))
    rows.append((None, "nokey2@example.edu", "NoKey", None))
    sqlite_warehouse.seed(rows)
    table = sqlite_warehouse.table("applicants")
    sql = (
        f"{sqlite_warehouse.sql()} UNION ALL "  # two more duplicates, batches later
        f'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstName" FROM {table} '
        "WHERE applicant_id IN (3, 17)"
    )

    summary = transfer(sqlite_warehouse, sql=sql, max_failure_ratio=0.5).execute(context())

    assert summary["duplicates"] == 3
    assert summary["invalid"] == 2
    assert summary["registered"] == 25
    assert summary["total"] == 30
    assert sb.register_calls == 25
    for i in range(1, 26):
        lead = sb.find_lead("EmailAddress", email(i))
        assert lead is not None and lead.registrations == 1
    assert sb.find_lead("EmailAddress", "nokey1@example.edu") is None
    assert set(sqlite_warehouse.ledger()) == {str(i) for i in range(1, 26)}  # NULL keys: not recorded
    log = task_log()
    for key in ("3", "5", "17"):
        assert task_log.count(f"Row key {key} appears more than once") == 1
    assert "Row #27 of the query has no applicant_id" in log
    assert "nokey1" not in log


def test_send_key_column_sends_the_key_as_an_attribute(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    sqlite_warehouse.seed(applicants(3))
    sql = (
        'SELECT applicant_id AS "mx_Application_Number", email AS "EmailAddress" '
        f"FROM {sqlite_warehouse.table('applicants')}"
    )
    transfer(sqlite_warehouse, sql=sql, key_column="mx_Application_Number", send_key_column=True).execute(
        context()
    )
    lead = sb.find_lead("EmailAddress", email(2))
    assert lead is not None and lead.fields["mx_Application_Number"] == "2"
    assert set(sqlite_warehouse.ledger()) == {"1", "2", "3"}
    sb2_lead = sb.find_lead("EmailAddress", email(1))
    assert sb2_lead is not None


def test_key_column_is_not_sent_by_default(sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]) -> None:
    sb = lsq()  # the sandbox refuses unknown attributes: sending "applicant_id" would fail every row
    sqlite_warehouse.seed(applicants(3))
    assert transfer(sqlite_warehouse).execute(context())["registered"] == 3
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None and "applicant_id" not in lead.fields


def test_the_ledger_may_live_in_another_database(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = lsq()
    warehouse.seed(applicants(5))
    path = tmp_path / "ledger.db"
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_LEDGER_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))

    op = transfer(warehouse, ledger_conn_id="lsq_ledger_db", ledger_table="registrations")
    assert op.execute(context())["registered"] == 5
    assert (
        transfer(warehouse, ledger_conn_id="lsq_ledger_db", ledger_table="registrations").execute(
            context("r2")
        )["skipped"]
        == 5
    )
    assert sb.register_calls == 5
    with sqlite3.connect(path) as ledger:
        assert ledger.execute("SELECT COUNT(*) FROM registrations").fetchone() == (5,)


# -- dry run, failure ratio, configuration errors ------------------------------------------------------


def test_dry_run_validates_every_row_and_makes_no_call(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    rows = applicants(12)
    rows[2] = (3, None, "NoEmail", None)
    warehouse.seed(rows)

    summary = transfer(warehouse, dry_run=True, max_failure_ratio=0.5).execute(context())

    assert sb.calls == []
    assert summary["dry_run"] is True
    assert summary["valid"] == 11
    assert summary["invalid"] == 1
    assert summary["registered"] == 0
    assert warehouse.ledger() == {}  # the table exists (a query may anti-join it), empty


def test_max_failure_ratio_fails_the_task_naming_row_keys_after_recording(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    lsq()
    sqlite_warehouse.seed(applicants(10, without_email=(3, 7)))

    with pytest.raises(AirflowException) as info:
        transfer(sqlite_warehouse, max_failure_ratio=0.1).execute(context())

    message = str(info.value)
    assert "2 of 10 rows failed" in message
    assert "row 3: ValidationError: field 'EmailAddress'" in message
    assert "row 7: ValidationError: field 'EmailAddress'" in message
    ledger = sqlite_warehouse.ledger()
    assert len(ledger) == 10 and ledger["7"]["status"] == "invalid"


def test_sql_conn_id_must_be_a_database(sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]) -> None:
    lsq()
    sqlite_warehouse.seed(applicants(1))
    with pytest.raises(AirflowException, match=r"sql_conn_id='leadsquared_default'.*not a common-sql"):
        transfer(sqlite_warehouse, sql_conn_id="leadsquared_default").execute(context())


def test_a_missing_key_column_fails_clearly(sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]) -> None:
    sb = lsq()
    sqlite_warehouse.seed(applicants(2))
    with pytest.raises(AirflowException, match="key_column 'student_id' is not a column"):
        transfer(sqlite_warehouse, key_column="student_id").execute(context())
    assert sb.register_calls == 0


def test_unsafe_ledger_table_names_are_refused(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    lsq()
    sqlite_warehouse.seed(applicants(1))
    with pytest.raises(ValueError, match="not a plain table name"):
        transfer(sqlite_warehouse, ledger_table="x; DROP TABLE applicants").execute(context())
    assert sqlite_warehouse.query("SELECT COUNT(*) FROM applicants") == [(1,)]


# -- secrets and personal data -------------------------------------------------------------------------


def test_no_secret_or_lead_data_in_logs_return_value_template_fields_or_ledger(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    sb = lsq(latency=0.01, fault_rate=0.2, seed=5)
    rows = applicants(30)
    rows[3] = (4, email(4), first_name(4), "teal")  # refused by the API: its message is recorded
    rows[6] = (7, None, first_name(7), None)  # invalid
    sqlite_warehouse.seed(rows)
    passwords = RecordingPasswords()
    op = transfer(
        sqlite_warehouse,
        sql=sqlite_warehouse.sql(', bogus AS "mx_Favourite_Colour"'),
        password_callable=passwords,
        max_failure_ratio=0.5,
    )
    op.progress_interval = 0.01
    summary = op.execute(context())

    assert len(passwords.made) == 29  # the invalid row is refused before any password is made
    secrets = named_sandbox_secrets(sb, *passwords.made)
    personal = {email(i) for i in range(1, 31)} | {first_name(i) for i in range(1, 31)}
    log = task_log()
    places = {
        "task log": log,
        "return value": json.dumps(summary),
        "template fields": json.dumps({f: getattr(op, f) for f in op.template_fields}),
        "ledger": "\n".join(sqlite_warehouse.ledger_cells()),
    }
    for place, text in places.items():
        assert_no_secret(text, secrets, f"the {place}")
        if place != "template fields":  # the SQL names columns, not values
            assert not [p for p in personal if p in text], f"lead data reached the {place}"
    # Progress lines: periodic ones while registering, and the final one.
    assert "failed so far" in log  # periodic lines while registering (the rate limit makes it last)
    assert "LeadSquared registration: done in" in log
    assert "row 4: MXInvalidAttributeException" in log


# -- a real DAG run ------------------------------------------------------------------------------------


def run_dag(dag: Any, logical_date: dt.datetime) -> Any:
    return dag_test(dag, logical_date)


def stored_run_data(dag_run: Any, task_id: str) -> tuple[Any, Any]:
    """The task's return value (from the metadata DB) and its rendered template fields."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    ti = dag_run.get_task_instance(task_id)
    value = ti.xcom_pull(task_ids=task_id, key="return_value")
    with create_session() as session:
        rendered = (
            session.query(RenderedTaskInstanceFields.rendered_fields)
            .filter_by(dag_id=dag_run.dag_id, task_id=task_id, run_id=dag_run.run_id)
            .scalar()
        )
    return value, rendered


DAG_FILE = """
import pendulum
from airflow_provider_lsq.version_compat import DAG
from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    SqlToLeadSquaredPortalOperator(
        task_id="register",
        sql={sql!r},
        params={{"last_id": 15}},
        sql_conn_id={conn_id!r},
        key_column="applicant_id",
        ledger_table={ledger!r},
        batch_size=4,
    )
"""


def load_test_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dag_id: str, **values: str) -> Any:
    """Write a DAG file in its own folder and load it. Airflow 3's ``dag.test()`` runs only DAGs it
    finds in a bundle: the folder is added as one, next to the default ``dags-folder``."""
    from airflow.models import DagBag

    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / f"{dag_id}.py").write_text(DAG_FILE.format(dag_id=dag_id, **values))
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = [
        {"name": "dags-folder", "classpath": local, "kwargs": {}},
        {"name": "lsq-transfer-tests", "classpath": local, "kwargs": {"path": str(folder)}},
    ]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


@pytest.mark.airflow_db
def test_dag_test_runs_the_transfer_end_to_end(
    airflow_db: Path,
    warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
    task_log: TaskLog,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = lsq(latency=0.01, fault_rate=0.1, seed=3)
    warehouse.seed(applicants(20))
    dag_id = f"lsq_transfer_{warehouse.kind}_{uuid.uuid4().hex[:6]}"
    dag = load_test_dag(
        tmp_path,
        monkeypatch,
        dag_id,
        sql=warehouse.sql(where="WHERE applicant_id <= {{ params.last_id }}"),
        conn_id=warehouse.conn_id,
        ledger=warehouse.ledger_table,
    )

    first = run_dag(dag, dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc))
    assert str(first.state) == "success", task_log()[-3000:]
    ledger = warehouse.ledger()
    assert set(ledger) == {str(i) for i in range(1, 16)}
    for key, row in ledger.items():
        lead = sb.find_lead("EmailAddress", email(int(key)))
        assert lead is not None and row["lead_id"] == lead.lead_id
        assert row["status"] == "registered" and row["run_id"] == first.run_id
    value, rendered = stored_run_data(first, "register")
    assert value["registered"] == 15 and value["total"] == 15
    assert "WHERE applicant_id <= 15" in json.dumps(rendered)

    calls = sb.register_calls
    second = run_dag(dag, dt.datetime(2026, 2, 2, tzinfo=dt.timezone.utc))
    assert str(second.state) == "success"
    assert sb.register_calls == calls
    value, rendered = stored_run_data(second, "register")
    assert value["total"] == value["skipped"] == 0  # all registered: left out by the database

    stored = json.dumps(value) + json.dumps(rendered, default=str) + task_log()
    assert_no_secret(stored, named_sandbox_secrets(sb), "the stored run data or the task log")
    assert email(1) not in json.dumps(value)


@pytest.mark.postgres
def test_postgres_values_that_cannot_be_sent_are_invalid_rows_naming_the_field(
    lsq: Callable[..., Sandbox],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a warehouse hands over: jsonb (a dict), an array, bytea, an interval, numeric Infinity are
    invalid rows naming their column; a float NaN means no value, as NULL does."""
    wh = make_warehouse("postgres", request, tmp_path, monkeypatch)
    sb = lsq()
    wh.seed(applicants(7))
    columns = {
        2: ("mx_Json", """'{"a": 1}'::jsonb"""),
        3: ("mx_Bytes", r"'\x00ff'::bytea"),
        4: ("mx_Number", "'Infinity'::numeric"),
        5: ("mx_Float", "'NaN'::float8"),
        6: ("mx_Courses", "ARRAY[1, 2]"),
        7: ("mx_Wait", "interval '1 day'"),
    }
    extra = "".join(
        f', CASE WHEN applicant_id = {i} THEN {expr} END AS "{name}"' for i, (name, expr) in columns.items()
    )
    summary = transfer(wh, sql=wh.sql(extra_columns=extra), max_failure_ratio=1.0).execute(context())

    ledger = wh.ledger()
    assert ledger["1"]["status"] == ledger["5"]["status"] == "registered"
    for i, (name, _) in columns.items():
        if i == 5:
            continue
        assert ledger[str(i)]["status"] == "invalid", (i, ledger[str(i)])
        assert f"field '{name}'" in ledger[str(i)]["error_message"]
        assert not ledger[str(i)]["retryable"]
    assert summary["registered"] == 2 and summary["invalid"] == 5
    assert sb.register_calls == 2


@pytest.mark.postgres
def test_a_nan_key_is_no_key_not_one_shared_key_that_makes_later_rows_duplicates(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lsq: Callable[..., Sandbox],
) -> None:
    """A float key column holding NaN (PostgreSQL's 'NaN'::float8): its rows were all keyed 'NaN', the
    first sent and recorded under that key, every later one dropped as its duplicate. NaN is no value,
    as RegisterPortalUserOperator already reads it: each such row is invalid, named by position."""
    wh = make_warehouse("postgres", request, tmp_path, monkeypatch)
    sb = lsq()
    wh.seed(applicants(4))
    sql = (
        "SELECT CASE WHEN applicant_id <= 2 THEN 'NaN'::float8 ELSE applicant_id END AS applicant_id, "
        f'email AS "EmailAddress" FROM {wh.table("applicants")} ORDER BY email'
    )
    summary = transfer(wh, sql=sql, max_failure_ratio=0.9).execute(context())
    assert (summary["invalid"], summary["duplicates"], summary["registered"]) == (2, 0, 2)
    assert sb.register_calls == 2 and set(wh.ledger()) == {"3.0", "4.0"}  # a float column's text
