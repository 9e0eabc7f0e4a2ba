"""The shipped example DAGs, end to end: parsed by a DagBag, run with ``dag.test()`` against a sandbox.

``lsq_register_new_applicants`` runs on a seeded SQLite warehouse and on a PostgreSQL one, with the
same SQL. The ledger it writes is checked row by row against what the sandbox registered, and a second
run must make no register call. The seed script is tested on its own too.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.sandbox import Sandbox
from tests.helpers import dag_test

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

from airflow_provider_lsq.example_dags import seed_warehouse

EXAMPLE_DAGS = Path(seed_warehouse.__file__).resolve().parent  # the copies a pip install ships

AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
NEW_APPLICANTS = "lsq_register_new_applicants"
FROM_UPSTREAM = "lsq_register_from_upstream"
LEDGER = "lsq_portal_registrations"
# The run's logical date: its data interval ends at this midnight on Airflow 2 (@daily, cron data
# intervals) and 3 (cron trigger: the interval is the logical date itself).
LOGICAL_DATE = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
FAST = {"rate_limit_calls": 100, "rate_limit_period": 1.0}


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture
def dagbag() -> Any:
    """A fresh parse per test: an in-process ``dag.test()`` leaves its run conf in the DAG's params."""
    from airflow.models import DagBag

    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def run_dag(dag: Any, conf: dict[str, Any] | None = None, logical_date: dt.datetime = LOGICAL_DATE) -> Any:
    """``dag.test()`` for one logical date, as each Airflow needs it (``tests.helpers.dag_test``)."""
    return dag_test(dag, logical_date, run_conf=conf)


def return_value(dag_run: Any, task_id: str, key: str = "return_value") -> Any:
    ti = dag_run.get_task_instance(task_id)
    assert ti is not None, f"no task instance {task_id} in {dag_run.run_id}"
    return ti.xcom_pull(task_ids=task_id, key=key)


def task_state(dag_run: Any, task_id: str) -> str:
    ti = dag_run.get_task_instance(task_id)
    return str(ti.state) if ti is not None else "missing"


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """A fast sandbox, exported as the ``leadsquared_default`` connection."""
    with Sandbox(**FAST) as sb:
        conn = json.loads(sb.connection_json())
        conn["extra"]["retry_wait_seconds"] = 0.05
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
        yield sb


class Warehouse:
    """A seeded warehouse behind an Airflow connection, with plain DB-API reads for assertions."""

    def __init__(self, kind: str, target: str, conn: dict[str, Any], connect: Callable[[], Any]) -> None:
        self.kind = kind
        self.target = target
        self.conn = conn
        self.connect = connect

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        db = self.connect()
        try:
            cur = db.cursor()
            cur.execute(sql)
            rows = cur.fetchall()
            cur.close()
            return rows
        finally:
            db.close()

    def execute(self, sql: str) -> None:
        db = self.connect()
        try:
            cur = db.cursor()
            cur.execute(sql)
            db.commit()
        finally:
            db.close()

    def ledger(self) -> dict[str, dict[str, Any]]:
        rows = self.query(
            f"SELECT row_key, status, lead_id, error_type, error_message, attempts FROM {LEDGER}"
        )
        names = ("status", "lead_id", "error_type", "error_message", "attempts")
        return {str(row[0]): dict(zip(names, row[1:], strict=True)) for row in rows}

    def created_between(self, start: dt.datetime, end: dt.datetime) -> set[str]:
        fmt = "%Y-%m-%d %H:%M:%S"
        rows = self.query(
            f"SELECT applicant_id FROM applicants WHERE created_at >= '{start:{fmt}}' "
            f"AND created_at < '{end:{fmt}}'"
        )
        return {str(row[0]) for row in rows}


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    """A warehouse seeded with the demo applicants (ending at the logical date), as ``lsq_warehouse``."""
    if request.param == "sqlite":
        path = tmp_path / "warehouse.db"
        conn: dict[str, Any] = {"conn_type": "sqlite", "host": str(path)}
        wh = Warehouse("sqlite", str(path), conn, lambda: sqlite3.connect(path))
    else:
        import psycopg2

        uri = request.getfixturevalue("postgres_server")
        name = uri.rsplit("/", 1)[1]
        conn = {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": 5432,
            "login": "postgres",
            "schema": name,
        }
        wh = Warehouse("postgres", uri, conn, lambda: psycopg2.connect(uri))
        wh.execute(f"DROP TABLE IF EXISTS {LEDGER}")  # the database lives for the whole session
    seed_warehouse.seed(wh.target, end=LOGICAL_DATE)
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_WAREHOUSE", json.dumps(wh.conn))
    return wh


# -- parsing -------------------------------------------------------------------------------------------


def test_dagbag_has_both_dags_without_import_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert {NEW_APPLICANTS, FROM_UPSTREAM} <= set(dagbag.dag_ids)

    dag = dagbag.dags[NEW_APPLICANTS]
    assert [task.task_id for task in dag.tasks] == ["register_new_applicants"]
    assert dag.catchup is False
    assert dag.start_date.tzinfo is not None
    assert "leadsquared" in dag.tags
    assert dag.params["lookback_days"] == 1
    assert dag.params["warehouse_conn_id"] == "lsq_warehouse"
    task = dag.get_task("register_new_applicants")
    assert task.sql_conn_id == "{{ params.warehouse_conn_id }}"
    assert task.leadsquared_conn_id == "{{ params.leadsquared_conn_id }}"
    assert "{{ params.applicants_table }}" in task.sql

    upstream = dagbag.dags[FROM_UPSTREAM]
    assert {task.task_id for task in upstream.tasks} >= {"collect_signups", "register_portal_users"}


# -- lsq_register_new_applicants ----------------------------------------------------------------------


@pytest.mark.airflow_db
@pytest.mark.postgres
def test_new_applicants_registers_the_window_then_nobody_twice(
    airflow_db: Path, dagbag: Any, sandbox: Sandbox, warehouse: Warehouse
) -> None:
    dag = dagbag.dags[NEW_APPLICANTS]

    # Default lookback (1 day): exactly the daily interval [end - 1 day, end).
    last_day = warehouse.created_between(LOGICAL_DATE - dt.timedelta(days=1), LOGICAL_DATE)
    assert 5 < len(last_day) < 150
    dag_run = run_dag(dag)
    assert str(dag_run.state) == "success", task_state(dag_run, "register_new_applicants")
    assert set(warehouse.ledger()) == last_day

    # A week back: everyone else, and the rows already registered are left out by the query.
    registered_before = sandbox.register_calls
    dag_run = run_dag(dag, {"lookback_days": 7})
    assert str(dag_run.state) == "success", task_state(dag_run, "register_new_applicants")
    summary = return_value(dag_run, "register_new_applicants")
    ledger = warehouse.ledger()
    # The second of the shared-email pair is one lead with the first: met in the same run, it waits for
    # the next run (which records it already_registered); met in a later run, it is recorded now.
    first, second = (str(i) for i in seed_warehouse.DUPLICATE_EMAIL_IDS)
    assert set(ledger) | {second} == {str(i) for i in range(1, 151)}
    assert summary["registered"] + summary["invalid"] + summary["failed"] <= 150 - len(last_day) + 2
    assert sandbox.register_calls - registered_before < 150 - len(last_day) + 2

    # The bad rows end with reasons that name the field or attribute at fault.
    no_email = ledger[str(seed_warehouse.NO_EMAIL_ID)]
    assert no_email["status"] == "invalid"
    assert "EmailAddress" in no_email["error_message"]
    unknown = ledger[str(seed_warehouse.UNKNOWN_ATTRIBUTE_ID)]
    assert unknown["status"] == "failed"
    assert "mx_Favourite_Colour" in unknown["error_message"]
    assert "does not exist" in unknown["error_message"]

    # Every other row is registered, with the lead id LeadSquared (the sandbox) gave its email.
    emails = {str(row[0]): row[1] for row in warehouse.query("SELECT applicant_id, email FROM applicants")}
    bad = {str(seed_warehouse.NO_EMAIL_ID), str(seed_warehouse.UNKNOWN_ATTRIBUTE_ID), second}
    for key, row in ledger.items():
        if key in bad:
            continue
        assert row["status"] == "registered", (key, row)
        lead = sandbox.find_lead("EmailAddress", emails[key])
        assert lead is not None and lead.portal_user
        assert row["lead_id"] == lead.lead_id, key

    # The two applications sharing an email are one lead, registered once (again would reset its password).
    assert sandbox.find_lead("EmailAddress", emails[first]).registrations == 1  # type: ignore[union-attr]
    assert sum(1 for lead in sandbox.leads if lead.portal_user) == 150 - 2 - 1
    assert sandbox.refusals == 0

    # Again: the ledger holds everyone who can be registered; no register call is made.
    sandbox.reset_calls()
    dag_run = run_dag(dag, {"lookback_days": 7})
    assert str(dag_run.state) == "success", task_state(dag_run, "register_new_applicants")
    assert sandbox.register_calls == 0
    summary = return_value(dag_run, "register_new_applicants")
    assert summary["registered"] == 0
    ledger = warehouse.ledger()
    assert ledger[str(seed_warehouse.UNKNOWN_ATTRIBUTE_ID)]["status"] == "failed"
    assert set(ledger) == {str(i) for i in range(1, 151)}
    assert ledger[second]["status"] == "already_registered"
    assert ledger[second]["lead_id"] == ledger[first]["lead_id"]
    assert {lead.registrations for lead in sandbox.leads if lead.portal_user} == {1}


def test_new_applicants_sql_has_only_warehouse_columns(dagbag: Any) -> None:
    """Every column is aliased to an attribute schema name, quoted so PostgreSQL keeps its case."""
    sql = dagbag.dags[NEW_APPLICANTS].get_task("register_new_applicants").sql
    for attribute in ("EmailAddress", "FirstName", "LastName", "Mobile", "mx_Program", "mx_City"):
        assert f'AS "{attribute}"' in sql
    assert "NOT EXISTS" in sql


# -- the window ----------------------------------------------------------------------------------------

DAY = dt.timedelta(days=1)


def render_window(
    dagbag: Any,
    *,
    data_interval_end: dt.datetime | None,
    run_after: dt.datetime,
    prev_end: dt.datetime | None = None,
    lookback_days: int = 1,
) -> tuple[dt.datetime, dt.datetime]:
    """The ``[start, end)`` the DAG's SQL selects, rendered by the DAG's own Jinja environment."""
    import re
    from types import SimpleNamespace

    dag = dagbag.dags[NEW_APPLICANTS]
    task = dag.get_task("register_new_applicants")
    connections = SimpleNamespace(get=lambda _id: SimpleNamespace(extra_dejson={"portal_id": "p"}))
    context: dict[str, Any] = {
        "data_interval_end": data_interval_end,
        "prev_data_interval_end_success": prev_end,
        "dag_run": SimpleNamespace(run_after=run_after),
        "macros": SimpleNamespace(timedelta=dt.timedelta),  # Airflow's macros.timedelta is this
        "params": {**{k: dag.params[k] for k in dag.params}, "lookback_days": lookback_days},
        "conn": connections,
    }
    sql = dag.get_template_env().from_string(task.sql).render(**context)
    found = re.search(r"created_at >= '([^']+)'\s+AND a.created_at < '([^']+)'", sql)
    assert found, sql
    start, end = (dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc) for text in found.groups())
    return start, end


def test_window_of_a_scheduled_run_is_its_day(dagbag: Any) -> None:
    end = LOGICAL_DATE
    assert render_window(dagbag, data_interval_end=end, run_after=end, prev_end=end - DAY) == (end - DAY, end)
    assert render_window(dagbag, data_interval_end=end, run_after=end) == (end - DAY, end)  # first run
    window = render_window(dagbag, data_interval_end=end, run_after=end, prev_end=end - DAY, lookback_days=7)
    assert window == (end - 7 * DAY, end)


def test_window_reaches_back_to_the_last_successful_run(dagbag: Any) -> None:
    """Failed runs, a paused DAG or runs skipped without catchup leave no applicant behind."""
    end = LOGICAL_DATE
    window = render_window(dagbag, data_interval_end=end, run_after=end, prev_end=end - 4 * DAY)
    assert window == (end - 4 * DAY, end)


def test_window_of_a_manual_run_without_data_interval_ends_when_it_was_triggered(dagbag: Any) -> None:
    """Airflow 3's manual run: ``[run_after - lookback_days, run_after)``, whatever ran before."""
    triggered = LOGICAL_DATE + dt.timedelta(hours=15, minutes=30)
    assert render_window(dagbag, data_interval_end=None, run_after=triggered) == (triggered - DAY, triggered)
    window = render_window(dagbag, data_interval_end=None, run_after=triggered, lookback_days=3)
    assert window == (triggered - 3 * DAY, triggered)


def test_scheduled_and_manual_runs_leave_no_gap(dagbag: Any) -> None:
    """Daily runs, one failing, with manual runs between them: every instant is in a successful window.

    A manual run on Airflow 3 has no logical date, so it is never "the previous successful run" of a
    scheduled one: the scheduled windows join up on their own, the manual ones only overlap them.
    """
    start = LOGICAL_DATE
    covered: list[tuple[dt.datetime, dt.datetime]] = []
    last_success: dt.datetime | None = None
    for day in range(1, 8):
        end = start + day * DAY
        window = render_window(dagbag, data_interval_end=end, run_after=end, prev_end=last_success)
        if day in (3, 4):  # these runs fail: their windows register nobody for sure
            manual_at = end + dt.timedelta(hours=9)
            covered.append(render_window(dagbag, data_interval_end=None, run_after=manual_at))
            continue
        covered.append(window)
        last_success = end
    covered.sort()
    reach = start  # the first run's window starts a day before: from here every instant must be covered
    for low, high in covered:
        assert low <= reach, f"gap from {reach} to {low}"
        reach = max(reach, high)
    assert reach == start + 7 * DAY


@pytest.mark.airflow_db
@pytest.mark.skipif(not AIRFLOW_3, reason="a run without a data interval exists from Airflow 3 on")
def test_manual_run_then_scheduled_run_register_everyone_once(
    airflow_db: Path, dagbag: Any, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real manual run (no logical date) mid-day, then the scheduled run: nobody missed or sent twice."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    path = tmp_path / "warehouse.db"
    wh = Warehouse(
        "sqlite", str(path), {"conn_type": "sqlite", "host": str(path)}, lambda: sqlite3.connect(path)
    )
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_WAREHOUSE", json.dumps(wh.conn))
    day_end = LOGICAL_DATE + 40 * DAY  # later than every other test's runs of this DAG
    seed_warehouse.seed(wh.target, end=day_end, days=2, count=150)
    dag = dagbag.dags[NEW_APPLICANTS]

    def forget_runs() -> None:  # runs of other dates would widen the window (it reaches back to them)
        with create_session() as session:
            session.query(DagRun).filter(DagRun.dag_id == NEW_APPLICANTS).delete()

    forget_runs()
    try:
        triggered = day_end - dt.timedelta(hours=10)
        manual = dag_test(dag, None, run_after=triggered)
        assert str(manual.state) == "success", task_state(manual, "register_new_applicants")
        second = str(seed_warehouse.DUPLICATE_EMAIL_IDS[1])  # may wait a run: one lead with the first
        assert set(wh.ledger()) | {second} == wh.created_between(triggered - DAY, triggered) | {second}

        calls = sandbox.register_calls
        scheduled = run_dag(dag, logical_date=day_end)
        assert str(scheduled.state) == "success", task_state(scheduled, "register_new_applicants")
        ledger = wh.ledger()
        assert set(ledger) | {second} == wh.created_between(triggered - DAY, day_end) | {second}
        # The scheduled run only sent rows the manual run had not registered.
        late = wh.created_between(triggered, day_end)
        assert sandbox.register_calls - calls <= len(late) + 1
        assert {lead.registrations for lead in sandbox.leads if lead.portal_user} == {1}  # the pair too
    finally:
        forget_runs()


# -- lsq_register_from_upstream -----------------------------------------------------------------------


@pytest.mark.airflow_db
def test_from_upstream_registers_the_upstream_leads(airflow_db: Path, dagbag: Any, sandbox: Sandbox) -> None:
    dag = dagbag.dags[FROM_UPSTREAM]
    dag_run = run_dag(dag)
    assert str(dag_run.state) == "success", task_state(dag_run, "register_portal_users")

    summary = return_value(dag_run, "register_portal_users")
    assert summary["registered"] == 4  # five sign-ups, one without consent
    outcomes = return_value(dag_run, "register_portal_users", key="outcomes")
    by_email = {outcome["key"]: outcome for outcome in outcomes}
    assert set(by_email) == {
        "zoe.fairweather@example.edu",
        "jose.alvarez@example.edu",
        "ananya.rao@example.edu",
        "li.wei@example.edu",
    }
    for email, outcome in by_email.items():
        lead = sandbox.find_lead("EmailAddress", email)
        assert lead is not None and outcome["lead_id"] == lead.lead_id
    assert sandbox.find_lead("EmailAddress", "li.wei@example.edu").fields["FirstName"] == "李"  # type: ignore[union-attr]
    assert sandbox.find_lead("EmailAddress", "soren.dahl@example.edu") is None


# -- the seed script -----------------------------------------------------------------------------------


def _sqlite_rows(path: Path) -> dict[int, tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(f"SELECT {', '.join(seed_warehouse.COLUMNS)} FROM applicants").fetchall()
    return {row[0]: row for row in rows}


def test_seed_sqlite_rows_bad_rows_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "wh.db"
    result = seed_warehouse.seed(path, end="2026-11-20")
    rows = _sqlite_rows(path)
    assert len(rows) == result.count == 150
    email, extra, created = 1, 9, 10

    assert rows[seed_warehouse.NO_EMAIL_ID][email] is None
    first, second = seed_warehouse.DUPLICATE_EMAIL_IDS
    assert rows[first][email] == rows[second][email] is not None
    assert [i for i, row in rows.items() if row[extra] is not None] == [seed_warehouse.UNKNOWN_ATTRIBUTE_ID]
    assert sum(1 for row in rows.values() if row[email] is None) == 1
    assert len({row[email] for row in rows.values() if row[email]}) == 148

    # Created in the 7 days before the end, as UTC text that sorts like time.
    stamps = [row[created] for row in rows.values()]
    assert all(len(s) == 19 and "2026-11-13 00:00:00" <= s < "2026-11-20 00:00:00" for s in stamps)
    assert len({s[:10] for s in stamps}) == 7

    # Non-ASCII names round-trip unchanged.
    names = {row[2] for row in rows.values()} | {row[3] for row in rows.values()}
    assert {"Zoë", "José", "Ananyā", "Søren", "李"} & names
    assert any(not name.isascii() for name in names)
    for name in names:
        assert name in seed_warehouse.FIRST_NAMES or name in seed_warehouse.LAST_NAMES


def test_seed_is_deterministic_and_keeps_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "wh.db"
    seed_warehouse.seed(path, end="2026-11-20")
    before = _sqlite_rows(path)
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE {LEDGER} (row_key TEXT)")
        db.execute(f"INSERT INTO {LEDGER} VALUES ('1')")
        columns = "applicant_id, first_name, last_name, created_at"
        db.execute(f"INSERT INTO applicants ({columns}) VALUES (999, 'a', 'b', 'x')")
    seed_warehouse.seed(f"sqlite:///{path}", end="2026-11-20")
    assert _sqlite_rows(path) == before
    with sqlite3.connect(path) as db:
        assert db.execute(f"SELECT row_key FROM {LEDGER}").fetchall() == [("1",)]


def test_seed_cli_and_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.db"
    assert (
        seed_warehouse.main(["--sqlite", str(path), "--count", "20", "--days", "2", "--end", "2026-11-20"])
        == 0
    )
    rows = _sqlite_rows(path)
    assert len(rows) == 20
    assert all("2026-11-18 00:00:00" <= row[10] < "2026-11-20 00:00:00" for row in rows.values())
    assert "Seeded 20 applicants" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least"):
        seed_warehouse.seed(path, count=3)


@pytest.mark.postgres
def test_seed_postgres_round_trips_unicode(postgres_server: str) -> None:
    import psycopg2

    seed_warehouse.seed(postgres_server, end=dt.datetime(2026, 11, 20, 5, 30, tzinfo=dt.timezone.utc))
    with psycopg2.connect(postgres_server) as db, db.cursor() as cur:
        cur.execute("SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM applicants")
        count, low, high = cur.fetchone()
        cur.execute("SELECT first_name, last_name FROM applicants")
        names = {name for row in cur.fetchall() for name in row}
    assert count == 150
    assert dt.datetime(2026, 11, 13, 5, 30) <= low <= high < dt.datetime(2026, 11, 20, 5, 30)
    assert {"Zoë", "José", "Ananyā", "Søren", "李"} & names


def test_seed_cli_names_a_missing_postgres_database_without_its_password(
    postgres_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that does not exist yet is the usual first mistake: one line saying so, no traceback."""
    server, _, _ = postgres_server.rpartition("/")
    missing = server.replace("postgres@", "postgres:s3cret-pw@") + "/lsq_no_such_warehouse"
    assert seed_warehouse.main(["--postgres", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Not seeded: Cannot connect to the PostgreSQL warehouse postgresql://")
    assert "lsq_no_such_warehouse" in err and "createdb" in err
    assert "s3cret-pw" not in err and "Traceback" not in err
