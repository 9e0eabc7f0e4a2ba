"""OpenLineage from a real DAG run: the transfer against the sandbox and a real PostgreSQL warehouse,
with Airflow's OpenLineage provider writing its events to a file (its ``file`` transport).

The run happens in a child process: the OpenLineage provider decides at plugin load whether it is
enabled (from its transport setting), and this test process may have loaded Airflow's plugins already.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers import assert_no_secret, named_sandbox_secrets, silent_server
from tests.test_transfer_sql import BOMB, applicants, context, make_warehouse, transfer

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_provider_lsq.sandbox import Sandbox

AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
ROOT = Path(__file__).resolve().parents[1]  # the child imports tests.helpers from here
LOGICAL_DATE = "2026-03-01T00:00:00+00:00"

DAG_FILE = """
import pendulum
from airflow_provider_lsq.version_compat import DAG
from airflow_provider_lsq.assets import portal_asset
from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    SqlToLeadSquaredPortalOperator(
        task_id="register",
        sql={sql!r},
        sql_conn_id="lsq_ol_wh",
        key_column="applicant_id",
        ledger_table={ledger!r},
        max_failure_ratio=0.5,
        batch_size={batch_size},
        outlets=[portal_asset({host!r}, {portal_id!r})],
    )
"""

RUNNER = """
import datetime as dt, json, os, sys
from airflow.models import Connection, DagBag
from airflow.utils.session import create_session
# Connections stored in the metadata database (the UI's and the CLI's), not in environment variables.
stored = json.loads(os.environ.get("LSQ_STORED_CONNECTIONS", "{{}}"))
with create_session() as session:
    for conn_id, fields in stored.items():
        session.query(Connection).filter(Connection.conn_id == conn_id).delete()
        session.add(Connection(conn_id=conn_id, **fields))
try:
    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[sys.argv[2]]
    date = dt.datetime.fromisoformat(sys.argv[3])
    sys.path.insert(0, {root!r})
    from tests.helpers import dag_test
    run = dag_test(dag, date)
    print(f"STATE {{run.state}}", flush=True)  # one write: a thread's log line cannot split it
finally:  # the metadata DB is shared by the session's tests: a stored leadsquared_default would answer theirs
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id.in_(list(stored))).delete()
"""


def _events(path: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """The events in the transport's file, once the task's COMPLETE (or FAIL) event is in it."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if any(e.get("eventType") in ("COMPLETE", "FAIL") and _is_task(e) for e in events):
                return events
        time.sleep(0.5)
    raise AssertionError(f"no task COMPLETE event in {path} after {timeout}s: {events}")


def _is_task(event: dict[str, Any]) -> bool:
    return str(event.get("job", {}).get("name", "")).endswith(".register")


def _run_with_lineage(
    tmp_path: Path,
    folder: Path,
    dag_id: str,
    sb: Sandbox,
    postgres_server: str,
    state: str,
    stored_connections: bool = False,
) -> list[dict[str, Any]]:
    """``dag.test()`` of ``dag_id`` (in ``folder``) in a child process with the OpenLineage provider's
    file transport, the sandbox as ``leadsquared_default`` and the database as ``lsq_ol_wh`` (in
    environment variables, or with ``stored_connections`` in the metadata database); checks the run
    ended in ``state`` and returns the events."""
    events_file = tmp_path / "openlineage.jsonl"
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    warehouse = postgres_server.replace("postgresql://", "postgres://", 1)
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    if stored_connections:
        conn["extra"] = json.dumps(conn["extra"])
        connections = {
            "LSQ_STORED_CONNECTIONS": json.dumps(
                {"leadsquared_default": conn, "lsq_ol_wh": {"uri": warehouse}}
            )
        }
    else:
        connections = {
            "AIRFLOW_CONN_LEADSQUARED_DEFAULT": json.dumps(conn),
            "AIRFLOW_CONN_LSQ_OL_WH": warehouse,
        }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")},
        **connections,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "lsq_lineage_test",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(
            [
                {"name": "dags-folder", "classpath": local, "kwargs": {}},
                {"name": f"lsq-lineage-{dag_id}", "classpath": local, "kwargs": {"path": str(folder)}},
            ]
        ),
    }
    runner = textwrap.dedent(RUNNER.format(root=str(ROOT)))
    proc = subprocess.run(
        [sys.executable, "-c", runner, str(folder), dag_id, LOGICAL_DATE],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = proc.stdout + proc.stderr
    ended = output.replace(f"DagRunState.{state.upper()}", state)
    assert proc.returncode == 0 and f"STATE {state}" in ended, output[-5000:]
    return _events(events_file)


def _dag_folder(
    tmp_path: Path, prefix: str, sql: str, schema: str, sb: Sandbox, batch_size: int
) -> tuple[Path, str]:
    """A DAG folder holding one transfer DAG (``DAG_FILE``) reading ``sql`` into ``<schema>.lsq_ledger``;
    returns the folder and the DAG's id."""
    dag_id = f"{prefix}_{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / f"{dag_id}.py").write_text(
        DAG_FILE.format(
            dag_id=dag_id,
            sql=sql,
            ledger=f"{schema}.lsq_ledger",
            host=sb.url,
            portal_id=sb.portal_id,
            batch_size=batch_size,
        )
    )
    return folder, dag_id


def _applicants_schema(postgres_server: str, prefix: str, rows: list[tuple[Any, ...]]) -> str:
    """A new schema holding ``applicants (applicant_id, email, first_name)`` with ``rows``; its name."""
    import psycopg2

    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    db = psycopg2.connect(postgres_server)
    with db, db.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"CREATE TABLE {schema}.applicants (applicant_id INTEGER, email TEXT, first_name TEXT)")
        cur.executemany(f"INSERT INTO {schema}.applicants VALUES (%s, %s, %s)", rows)
    db.close()
    return schema


@pytest.mark.postgres
@pytest.mark.airflow_db
@pytest.mark.parametrize("stored_connections", [False, True], ids=["env-connections", "stored-connections"])
def test_the_transfer_reports_query_inputs_ledger_and_portal_outputs_and_counts_without_secrets(
    airflow_db: Path,
    postgres_server: str,
    leadsquared_sandbox_factory: Callable[..., Sandbox],
    tmp_path: Path,
    stored_connections: bool,
) -> None:
    """With connections in environment variables, and in the metadata database: on Airflow 3 the
    OpenLineage listener reports from a forked process, where a ``dag.test()`` run cannot look a
    stored connection up (it waited until the listener's timeout and the COMPLETE event was lost)."""

    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    rows = [(i, f"lineage{i}@example.edu", f"Lineagefirst{i}") for i in range(1, 6)]
    rows.append((6, None, "Lineagenoemail"))  # invalid: no identifier
    schema = _applicants_schema(postgres_server, "ol", rows)

    sql = (
        f'SELECT CAST(applicant_id AS TEXT) AS applicant_id, email AS "EmailAddress", '
        f'first_name AS "FirstName" FROM {schema}.applicants'
    )
    folder, dag_id = _dag_folder(tmp_path, "lsq_lineage", sql, schema, sb, batch_size=500)
    events = _run_with_lineage(
        tmp_path, folder, dag_id, sb, postgres_server, "success", stored_connections=stored_connections
    )
    complete = next(e for e in events if e["eventType"] == "COMPLETE" and _is_task(e))
    database = postgres_server.rsplit("/", 1)[1]
    inputs = {(d["namespace"], d["name"]) for d in complete["inputs"]}
    outputs = {(d["namespace"], d["name"]): d for d in complete["outputs"]}
    assert ("postgres://127.0.0.1:5432", f"{database}.{schema}.applicants") in inputs
    assert ("postgres://127.0.0.1:5432", f"{database}.{schema}.lsq_ledger") in outputs
    portal = outputs[(f"leadsquared://127.0.0.1:{sb.port}", f"portal/{sb.portal_id}")]
    counts = portal["outputFacets"]["leadsquaredRegistration"]
    assert {k: counts[k] for k in ("registered", "alreadyRegistered", "invalid", "failed", "total")} == {
        "registered": 5,
        "alreadyRegistered": 0,
        "invalid": 1,
        "failed": 0,
        "total": 6,
    }
    assert counts["_schemaURL"].endswith("#/$defs/LeadSquaredRegistrationOutputDatasetFacet")
    assert portal["outputFacets"]["outputStatistics"]["rowCount"] == 5
    assert "sql" in complete["job"]["facets"]  # the query, as common-sql's operators report it

    text = json.dumps(events)
    assert_no_secret(text, named_sandbox_secrets(sb), "a lineage event")
    for i in range(1, 7):
        assert f"lineage{i}@example.edu" not in text and f"Lineagefirst{i}" not in text
    assert "Lineagenoemail" not in text


@pytest.mark.postgres
@pytest.mark.airflow_db
def test_a_failed_transfer_reports_its_counts_and_no_row_value_from_the_database_error(
    airflow_db: Path,
    postgres_server: str,
    leadsquared_sandbox_factory: Callable[..., Sandbox],
    tmp_path: Path,
) -> None:
    """A warehouse error quoting a row's value (a cast of an email) fails the task: its FAIL event has
    the counts of the rows sent before it, and the value in no facet (errorMessage included)."""

    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    rows = [(i, f"olbroken{i}@example.edu", f"Olbrokenname{i}") for i in range(1, 6)]
    schema = _applicants_schema(postgres_server, "olf", rows)

    # Row 4's cast fails, quoting its email: "invalid input syntax for type integer: ...". No ORDER BY:
    # PostgreSQL would compute every row (and fail) before the first fetch.
    sql = (
        f'SELECT CAST(applicant_id AS TEXT) AS applicant_id, email AS "EmailAddress", '
        f"first_name AS \"FirstName\", CAST(CASE WHEN applicant_id = 4 THEN email ELSE '1' END "
        f'AS INTEGER) AS "mx_Intake" FROM {schema}.applicants'
    )
    folder, dag_id = _dag_folder(tmp_path, "lsq_lineage_fail", sql, schema, sb, batch_size=1)
    events = _run_with_lineage(tmp_path, folder, dag_id, sb, postgres_server, "failed")

    fail = next(e for e in events if e["eventType"] == "FAIL" and _is_task(e))
    outputs = {(d["namespace"], d["name"]): d for d in fail["outputs"]}
    portal = outputs[(f"leadsquared://127.0.0.1:{sb.port}", f"portal/{sb.portal_id}")]
    counts = portal["outputFacets"]["leadsquaredRegistration"]
    assert 1 <= counts["registered"] == sb.register_calls <= 3
    assert (counts["failed"], counts["invalid"]) == (0, 0)
    error = fail["run"]["facets"]["errorMessage"]
    assert "InvalidTextRepresentation" in error["message"] and "22P02" in error["message"]
    text = json.dumps(events)
    for i in range(1, 6):
        assert f"olbroken{i}@example.edu" not in text and f"Olbrokenname{i}" not in text, i
    assert_no_secret(text, named_sandbox_secrets(sb), "a lineage event")


def test_without_the_openlineage_provider_nothing_is_imported_or_reported(tmp_path: Path) -> None:
    """Importing the operators imports no OpenLineage module; with the provider hidden, lineage is None."""
    script = textwrap.dedent(
        """
        import sys
        import airflow_provider_lsq.operators.portal, airflow_provider_lsq.transfers.sql_to_leadsquared
        import airflow_provider_lsq.lineage, airflow_provider_lsq.assets
        # Airflow's providers manager reads every provider's info, openlineage's too: nothing more.
        known = {"airflow.providers.openlineage", "airflow.providers.openlineage.get_provider_info"}
        loaded = sorted(m for m in sys.modules if "openlineage" in m and m not in known)
        assert not loaded, loaded

        class Hide:  # as if apache-airflow-providers-openlineage were not installed
            def find_spec(self, name, path=None, target=None):
                if name.startswith(("airflow.providers.openlineage", "openlineage")):
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Hide())
        from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
        from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator
        op = RegisterPortalUserOperator(task_id="r", leads=[])
        assert op.get_openlineage_facets_on_complete(None) is None
        t = SqlToLeadSquaredPortalOperator(task_id="t", sql="SELECT 1", sql_conn_id="x", key_column="k")
        assert t.get_openlineage_facets_on_complete(None) is None
        assert not [m for m in sys.modules if "openlineage" in m and m not in known]
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_register_portal_user_operator_reports_the_portal_with_its_counts(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    from openlineage.client.serde import Serde

    from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator

    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_PORTAL", json.dumps(conn))
    leads = [{"EmailAddress": f"olportal{i}@example.edu", "FirstName": "Olportalname"} for i in range(3)]
    leads.append({"FirstName": "Olportalname"})  # no key: invalid
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, leadsquared_conn_id="lsq_ol_portal", max_failure_ratio=0.5
    )

    class TI:
        def xcom_push(self, key: str, value: Any) -> None:
            pass

    assert op.get_openlineage_facets_on_complete(None).outputs[0].outputFacets == {}  # before: no counts
    op.execute({"ti": TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    lineage = op.get_openlineage_facets_on_complete(None)
    assert lineage.inputs == []
    (portal,) = lineage.outputs
    assert (portal.namespace, portal.name) == (f"leadsquared://127.0.0.1:{sb.port}", "portal/sandbox-portal")
    facet = portal.outputFacets["leadsquaredRegistration"]
    assert (facet.registered, facet.invalid, facet.failed, facet.total) == (3, 1, 0, 4)
    text = Serde.to_json(portal)
    assert_no_secret(text, named_sandbox_secrets(sb), "a lineage event")
    assert "example.edu" not in text and "Olportalname" not in text


def _portal_counts(op: Any) -> Any:
    outputs = op.get_openlineage_facets_on_complete(None).outputs
    (portal,) = [o for o in outputs if o.name.startswith("portal/")]
    return portal.outputFacets["leadsquaredRegistration"], portal.outputFacets["outputStatistics"]


def test_a_transfer_stopped_by_a_broken_read_still_reports_the_counts_it_finished(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    leadsquared_sandbox_factory: Callable[..., Sandbox],
) -> None:
    """The FAIL event's lineage (the OpenLineage provider asks the same method) has the counts."""
    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
    warehouse = make_warehouse("sqlite", request, tmp_path, monkeypatch)
    warehouse.seed(applicants())
    op = transfer(warehouse, sql=warehouse.sql(BOMB))
    with pytest.raises(Exception):  # noqa: B017  (the warehouse's own error)
        op.execute(context())
    registered = sum(1 for row in warehouse.ledger().values() if row["status"] == "registered")
    assert 0 < registered == sb.register_calls
    facet, statistics = _portal_counts(op)
    assert (facet.registered, facet.failed, facet.invalid) == (registered, 0, 0)
    assert facet.total >= registered and statistics.rowCount == registered


def test_a_killed_registration_still_reports_the_counts_it_finished(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
    from airflow_provider_lsq.version_compat import AirflowException

    sb = leadsquared_sandbox_factory(rate_limit_calls=1000, rate_limit_period=1.0, latency=0.05)
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_KILL", json.dumps(conn))
    leads = [{"EmailAddress": f"olkill{i}@example.edu"} for i in range(200)]
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, leadsquared_conn_id="lsq_ol_kill", max_workers=2
    )

    def kill_once_some_are_registered() -> None:
        deadline = time.monotonic() + 30
        while sb.register_calls < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        op.on_kill()

    killer = threading.Thread(target=kill_once_some_are_registered)
    killer.start()

    class TI:
        def xcom_push(self, key: str, value: Any) -> None:
            pass

    with pytest.raises(AirflowException, match="stopped"):
        op.execute({"ti": TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    killer.join()
    facet, statistics = _portal_counts(op)
    assert 5 <= facet.registered == sb.register_calls < len(leads)
    assert statistics.rowCount == facet.registered


def test_a_portal_registration_failing_its_ratio_names_no_lead_in_its_error_and_reports_counts(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its rows are keyed by their email (the default): the exception, which Airflow's OpenLineage
    provider puts in the FAIL event's errorMessage facet, names none of them."""
    from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
    from airflow_provider_lsq.version_compat import AirflowException

    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_RATIO", json.dumps(conn))
    leads = [{"EmailAddress": "olratio1@example.edu", "FirstName": "Olrationame"}]
    leads += [{"EmailAddress": f"olratio{i}@example.edu", "mx_Unknown": "x"} for i in range(2, 5)]
    op = RegisterPortalUserOperator(task_id="register", leads=leads, leadsquared_conn_id="lsq_ol_ratio")

    class TI:
        def xcom_push(self, key: str, value: Any) -> None:
            pass

    with pytest.raises(AirflowException, match="3 of 4 rows failed") as info:
        op.execute({"ti": TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    assert "example.edu" not in str(info.value) and "olratio" not in str(info.value)
    facet, _ = _portal_counts(op)
    assert (facet.registered, facet.failed, facet.total) == (1, 3, 4)


@pytest.mark.postgres
def test_a_warehouse_that_is_down_costs_the_query_and_ledger_datasets_not_the_portal_and_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OpenLineage provider asks for lineage when the task failed, often because the warehouse is
    down: the portal output and the counts of what the run finished are still reported."""
    from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_DOWN", f"postgres://postgres@127.0.0.1:{port}/warehouse")
    lsq = {"conn_type": "leadsquared", "host": "https://PortalAPI.leadsquared.com", "login": "u$DownKey1"}
    lsq |= {"password": "DownSecret+/=", "extra": {"portal_id": "p1"}}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_DOWN_PORTAL", json.dumps(lsq))
    op = SqlToLeadSquaredPortalOperator(
        task_id="register",
        sql="SELECT applicant_id FROM crm.applicants",
        sql_conn_id="lsq_ol_down",
        key_column="applicant_id",
        leadsquared_conn_id="lsq_ol_down_portal",
    )
    op.registration_counts = {"total": 7, "registered": 5, "failed": 0, "invalid": 0}
    try:
        facet, statistics = _portal_counts(op)
    finally:
        closed.close()
    assert (facet.registered, facet.total, statistics.rowCount) == (5, 7, 5)


@pytest.mark.postgres
def test_a_broken_leadsquared_connection_costs_the_portal_not_the_query_and_ledger(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator

    warehouse = make_warehouse("postgres", request, tmp_path, monkeypatch)
    warehouse.seed(applicants(2))
    broken = {"conn_type": "leadsquared", "host": "ftp://nowhere", "login": "u$BrokenKey1"}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_BROKEN", json.dumps({**broken, "password": "BrokenSecret+/="}))
    op = transfer(warehouse, leadsquared_conn_id="lsq_ol_broken")
    lineage = op.get_openlineage_facets_on_complete(None)
    assert [d.name.rsplit(".", 2)[1:] for d in lineage.inputs] == [[warehouse.schema, "applicants"]]
    assert [d.name.rsplit(".", 2)[1:] for d in lineage.outputs] == [[warehouse.schema, "lsq_ledger"]]
    portal = RegisterPortalUserOperator(task_id="r", leads=[], leadsquared_conn_id="lsq_ol_broken")
    assert portal.get_openlineage_facets_on_complete(None).outputs == []


@pytest.mark.postgres
@pytest.mark.airflow_db
def test_a_transfer_failing_its_own_checks_still_reports_its_datasets_with_stored_connections(
    airflow_db: Path,
    postgres_server: str,
    leadsquared_sandbox_factory: Callable[..., Sandbox],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A LeadSquared connection without portal_id fails the task before any row: its lineage was read
    only after that check, so on Airflow 3 the FAIL event looked the connections up in the listener's
    forked process, which hung there with connections in the metadata database: the event was lost."""
    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    schema = _applicants_schema(postgres_server, "olc", [(1, "olcheck1@example.edu", "Olcheckname")])
    sql = (
        f'SELECT CAST(applicant_id AS TEXT) AS applicant_id, email AS "EmailAddress" FROM {schema}.applicants'
    )
    folder, dag_id = _dag_folder(tmp_path, "lsq_lineage_check", sql, schema, sb, batch_size=500)
    with_portal = sb.connection_json()

    def without_portal_id() -> str:
        conn = json.loads(with_portal)
        del conn["extra"]["portal_id"]
        return json.dumps(conn)

    monkeypatch.setattr(sb, "connection_json", without_portal_id)
    events = _run_with_lineage(
        tmp_path, folder, dag_id, sb, postgres_server, "failed", stored_connections=True
    )
    fail = next(e for e in events if e["eventType"] == "FAIL" and _is_task(e))
    database = postgres_server.rsplit("/", 1)[1]
    assert {(d["namespace"], d["name"]) for d in fail["inputs"]} == {
        ("postgres://127.0.0.1:5432", f"{database}.{schema}.applicants")
    }
    assert ("postgres://127.0.0.1:5432", f"{database}.{schema}.lsq_ledger") in {
        (d["namespace"], d["name"]) for d in fail["outputs"]
    }
    assert "portal_id" in fail["run"]["facets"]["errorMessage"]["message"]
    text = json.dumps(events)
    assert "olcheck1@example.edu" not in text
    assert_no_secret(text, named_sandbox_secrets(sb), "a lineage event")


@pytest.fixture
def openlineage_on(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Turn the OpenLineage provider on in this process (console transport), with ``settings`` as
    further ``[openlineage]`` options; its cached configuration is read afresh."""
    from airflow.providers.openlineage import conf

    def clear() -> None:
        for value in vars(conf).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()

    def turn_on(**settings: str) -> None:
        monkeypatch.setenv("AIRFLOW__OPENLINEAGE__TRANSPORT", json.dumps({"type": "console"}))
        for name, value in settings.items():
            monkeypatch.setenv(f"AIRFLOW__OPENLINEAGE__{name.upper()}", value)
        clear()

    yield turn_on
    monkeypatch.undo()
    clear()


@pytest.fixture
def hung_warehouse(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A PostgreSQL connection ``lsq_ol_hung`` to a server that accepts and never answers."""
    with silent_server() as (port, _):
        _hung_connections(monkeypatch, port)
        yield


def _hung_connections(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """``lsq_ol_hung``: PostgreSQL at ``port``; ``lsq_ol_hung_portal``: a LeadSquared connection."""
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_HUNG", f"postgres://postgres@127.0.0.1:{port}/warehouse")
    lsq = {"conn_type": "leadsquared", "login": "u$HungKey1", "password": "HungSecret+/="}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_HUNG_PORTAL", json.dumps({**lsq, "extra": {"portal_id": "p1"}}))


def _hung_transfer() -> Any:
    from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator

    return SqlToLeadSquaredPortalOperator(
        task_id="register",
        sql="SELECT applicant_id FROM crm.applicants",
        sql_conn_id="lsq_ol_hung",
        key_column="applicant_id",
        leadsquared_conn_id="lsq_ol_hung_portal",
    )


def test_a_hung_warehouse_holds_the_lineage_reading_no_longer_than_the_listeners_timeout(
    openlineage_on: Callable[..., None], hung_warehouse: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The transfer reads its lineage in execute(): the warehouse's current schema and its
    information_schema, which have no timeout of their own. A warehouse that accepts and never answers
    (or a catalog query slow on a busy one) held the task there; now at most ``[openlineage]
    execution_timeout``, as the listener bounds the same reading, and the portal is still reported.
    Before execute() (the FAIL event of a task that never ran it) the reading gets half of that."""
    from airflow_provider_lsq.lineage import prepare_transfer_lineage

    openlineage_on(execution_timeout="2")
    op = _hung_transfer()
    # The warehouse never answers: returning at all (well before the bound a liveness check needs)
    # is what is checked, not how fast.
    assert _returns(lambda: prepare_transfer_lineage(op)), "the reading waited on the hung warehouse"
    assert (op.prepared_lineage.query, op.prepared_lineage.ledger) == (None, None)
    assert op.prepared_lineage.portal == ("leadsquared://portalapi.leadsquared.com", "portal/p1")
    assert "could not be read within 2 s" in caplog.text

    never_ran = _hung_transfer()
    events: list[Any] = []
    assert _returns(lambda: events.append(never_ran.get_openlineage_facets_on_complete(None)))
    assert [(d.namespace, d.name) for d in events[0].outputs] == [
        ("leadsquared://portalapi.leadsquared.com", "portal/p1")
    ]


def _returns(call: Callable[[], object], bound: float = 60.0) -> bool:
    """Whether ``call()`` returns within ``bound`` seconds (a liveness check against a hang)."""
    import threading

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(bound)
    return not thread.is_alive()


def test_a_lineage_reading_past_its_time_begins_no_further_part_and_reports_once(
    openlineage_on: Callable[..., None], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A warehouse that answers nothing for 3 s and then drops the connection: the reading gives up at
    its 2 s limit; the abandoned part then fails, and the parts after it (the ledger, on another
    connection to the same busy warehouse) are never begun, nor is a second warning logged."""
    from airflow_provider_lsq.lineage import prepare_transfer_lineage

    with silent_server(drop_after=3.0) as (port, accepted):
        _hung_connections(monkeypatch, port)
        openlineage_on(execution_timeout="2")
        op = _hung_transfer()
        prepare_transfer_lineage(op)
        assert "could not be read within 2 s" in caplog.text
        # Long enough for the first connection to be dropped and its part to fail, and for a next
        # part, were one begun, to connect.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(accepted) < 2:
            time.sleep(0.2)
        assert len(accepted) == 1, "a part was begun after the reading's time ran out"
        assert "could not be read (" not in caplog.text, "a part left out was reported twice"


TRANSFER_CLASS = "airflow_provider_lsq.transfers.sql_to_leadsquared.SqlToLeadSquaredPortalOperator"


@pytest.mark.parametrize(
    "setting",
    [
        {"disabled_for_operators": TRANSFER_CLASS},
        {  # the newer providers' form (what the one above is translated into)
            "emission_policy": json.dumps(
                [{"scope": {"operator": TRANSFER_CLASS}, "controls": {"extract_operator_metadata": False}}]
            )
        },
    ],
    ids=["disabled_for_operators", "emission_policy"],
)
def test_a_transfer_whose_class_openlineage_disables_reads_nothing_for_lineage(
    openlineage_on: Callable[..., None], hung_warehouse: Any, setting: dict[str, str]
) -> None:
    """OpenLineage set to ask the transfer for no lineage: execute() reads nothing (no query on the
    warehouse)."""
    from importlib.util import find_spec

    from airflow_provider_lsq.lineage import prepare_transfer_lineage

    if (
        "emission_policy" in setting
        and find_spec("airflow.providers.openlineage.utils.emission_policy") is None
    ):
        pytest.skip("this OpenLineage provider has no emission_policy")
    openlineage_on(execution_timeout="30", **setting)
    op = _hung_transfer()
    started = time.monotonic()
    prepare_transfer_lineage(op)
    assert time.monotonic() - started < 1 and op.prepared_lineage is None


def test_a_second_try_in_the_same_process_reports_none_of_the_first_tries_counts(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same operator object run again (a retry inline, as ``dag.test`` may) that fails before its
    run: its FAIL event reported the first try's counts as its own."""
    from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
    from airflow_provider_lsq.version_compat import AirflowException

    sb = leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)
    conn = json.loads(sb.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_OL_AGAIN", json.dumps(conn))
    op = RegisterPortalUserOperator(
        task_id="register",
        leads=[{"EmailAddress": "olagain@example.edu"}],
        leadsquared_conn_id="lsq_ol_again",
    )

    class TI:
        def xcom_push(self, key: str, value: Any) -> None:
            pass

    op.execute({"ti": TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    assert _portal_counts(op)[0].registered == 1
    op.leads = "not JSON"
    with pytest.raises(AirflowException, match="not JSON"):
        op.execute({"ti": TI(), "run_id": "manual__1"})  # type: ignore[arg-type]
    (portal,) = op.get_openlineage_facets_on_complete(None).outputs
    assert portal.outputFacets == {}
