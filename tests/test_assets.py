"""The portal as an Asset (a Dataset on 2.11), and the example DAGs seen from the outside.

``dag.test()`` runs ``lsq_register_new_applicants`` against the sandbox and a seeded SQLite warehouse:
the run records an asset event with its counts and queues ``lsq_welcome_new_portal_users``; a failing
run sends its failure email (to an SMTP server in the test) with the counts and the ledger query.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import socketserver
import sqlite3
import threading
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from airflow_provider_lsq.assets import (
    convert_asset_to_openlineage,
    portal_asset,
    portal_host,
    portal_id_of,
    portal_uri,
    sanitize_uri,
)
from airflow_provider_lsq.example_dags import seed_warehouse
from airflow_provider_lsq.get_provider_info import get_provider_info
from airflow_provider_lsq.sandbox import Sandbox
from airflow_provider_lsq.sandbox.state import DEFAULT_KNOWN_ATTRIBUTES
from airflow_provider_lsq.version_compat import AIRFLOW_V_3_1_PLUS
from tests.helpers import assert_no_secret, dag_test, named_sandbox_secrets

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]

AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
UPSTREAM = "lsq_register_new_applicants"
DOWNSTREAM = "lsq_welcome_new_portal_users"
LOGICAL_DATE = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
COUNTS = ("registered", "already_registered", "invalid", "failed", "unconfirmed")


# -- the URI scheme --------------------------------------------------------------------------------------


def test_portal_uri_names_host_and_portal_and_is_normalised() -> None:
    assert portal_host("https://PortalAPI-us11.LeadSquared.com") == "portalapi-us11.leadsquared.com"
    assert portal_host("http://127.0.0.1:8765") == "127.0.0.1:8765"
    assert portal_host("portalapi.leadsquared.com") == "portalapi.leadsquared.com"
    assert portal_host("https://portalapi.leadsquared.com:443/") == "portalapi.leadsquared.com"
    uri = portal_uri("https://portalapi-us11.leadsquared.com", "8d4f-c2")
    assert uri == "leadsquared://portalapi-us11.leadsquared.com/portal/8d4f-c2"
    assert portal_id_of(uri) == "8d4f-c2" and portal_id_of("postgres://h/db/s/t") is None

    clean = sanitize_uri(urlsplit("leadsquared://PortalAPI.leadsquared.com:443/portal/abc/"))
    assert clean.geturl() == "leadsquared://portalapi.leadsquared.com/portal/abc"
    for bad in (
        "leadsquared:///portal/abc",
        "leadsquared://h/abc",
        "leadsquared://h/portal/",
        "leadsquared://h/portal/a?x=1",
    ):
        with pytest.raises(ValueError, match="leadsquared://"):
            sanitize_uri(urlsplit(bad))
    with pytest.raises(ValueError, match="portal_id"):
        portal_uri("portalapi.leadsquared.com", "")


def test_the_scheme_is_declared_and_airflow_normalises_with_it() -> None:
    info = get_provider_info()
    for key in ("asset-uris", "dataset-uris"):
        (entry,) = info[key]
        assert entry["schemes"] == ["leadsquared"]
        assert entry["handler"] == "airflow_provider_lsq.assets.sanitize_uri"
    # Airflow found the handler through the provider's entry point, and applies it.
    asset = portal_asset("https://PortalAPI.LeadSquared.com:443", "abc", name="portal_users")
    raw = type(asset)(uri="leadsquared://PortalAPI.leadsquared.com:443/portal/abc/")
    assert raw.uri == asset.uri == "leadsquared://portalapi.leadsquared.com/portal/abc"
    if AIRFLOW_3:
        assert asset.name == "portal_users"
    if AIRFLOW_3:  # Airflow 3 refuses a URI its scheme's handler rejects; 2.11 warns
        with pytest.raises(ValueError, match="leadsquared://"):
            type(asset)(uri="leadsquared://portalapi.leadsquared.com/abc")
    else:
        with pytest.warns(UserWarning, match="leadsquared://<host>/portal/<portal_id>"):
            type(asset)(uri="leadsquared://portalapi.leadsquared.com/abc")
    dataset = convert_asset_to_openlineage(asset, None)
    assert (dataset.namespace, dataset.name) == ("leadsquared://portalapi.leadsquared.com", "portal/abc")


def test_ipv6_hosts_stray_spaces_and_bad_ports_make_uris_that_parse_back_or_a_clear_error() -> None:
    assert portal_host("http://[::1]:8765") == "[::1]:8765"
    assert portal_host("https://[2001:DB8::1]:443/") == "[2001:db8::1]"
    assert portal_host("  PortalAPI.leadsquared.com  ") == "portalapi.leadsquared.com"
    assert portal_host("https://portalapi.leadsquared.com.:443") == "portalapi.leadsquared.com"  # FQDN
    assert sanitize_uri(urlsplit("leadsquared://H.com./portal/p1")).netloc == "h.com"
    uri = portal_uri("http://[::1]:8765", "p1")
    assert uri == "leadsquared://[::1]:8765/portal/p1"
    assert sanitize_uri(urlsplit(uri)).geturl() == uri  # it parses back as itself
    assert sanitize_uri(urlsplit("leadsquared://[2001:DB8::1]:443/portal/p1")).netloc == "[2001:db8::1]"
    dataset = convert_asset_to_openlineage(portal_asset("http://[::1]:8765", "p1"), None)
    assert (dataset.namespace, dataset.name) == ("leadsquared://[::1]:8765", "portal/p1")
    for bad in ("leadsquared://h:abc/portal/p1", "leadsquared://h:99999/portal/p1"):
        with pytest.raises(ValueError, match="leadsquared://: the port is not a number"):
            sanitize_uri(urlsplit(bad))
    with pytest.raises(ValueError, match="portal API URL 'https://h:x': the port"):
        portal_host("https://h:x")


# -- the example DAGs, end to end ------------------------------------------------------------------------


@contextlib.contextmanager
def _example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **sandbox: Any) -> Iterator[Sandbox]:
    """A seeded SQLite warehouse, a sandbox, and the portal asset's env pointing at the sandbox."""
    warehouse = tmp_path / "warehouse.db"
    seed_warehouse.seed(str(warehouse), end=LOGICAL_DATE)
    conn_json = json.dumps({"conn_type": "sqlite", "host": str(warehouse)})
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_WAREHOUSE", conn_json)
    with Sandbox(rate_limit_calls=100, rate_limit_period=1.0, **sandbox) as sb:
        conn = json.loads(sb.connection_json())
        conn["extra"]["retry_wait_seconds"] = 0.05
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
        monkeypatch.setenv("LSQ_PORTAL_HOST", sb.url)
        monkeypatch.setenv("LSQ_PORTAL_ID", sb.portal_id)
        yield sb


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    with _example(tmp_path, monkeypatch) as sb:
        yield sb


def _dagbag() -> Any:
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "airflow_provider_lsq" / "example_dags"))
    assert not bag.import_errors, bag.import_errors
    return bag


def _sync_and_unpause(bag: Any, dag_id: str) -> None:
    """Write the DAGs to the metadata DB (as the DAG processor would) and unpause ``dag_id``."""
    from airflow.models import DagModel
    from airflow.utils.session import create_session

    folder = str(ROOT / "airflow_provider_lsq" / "example_dags")
    if AIRFLOW_3 and not AIRFLOW_V_3_1_PLUS:  # 3.0's DagBag writes itself (``airflow dags reserialize``)
        from airflow.dag_processing.bundles.manager import DagBundlesManager
        from airflow.models.dagbag import DagBag

        DagBundlesManager().sync_bundles_to_db()
        DagBag(folder, bundle_path=folder, include_examples=False).sync_to_db("dags-folder", None)
    elif AIRFLOW_3:
        from airflow.dag_processing.bundles.manager import DagBundlesManager

        try:  # 3.2+ moved the DAG processor's bag out of airflow.models (3.1)
            from airflow.dag_processing.dagbag import BundleDagBag, DagBag, sync_bag_to_db
        except ModuleNotFoundError:
            from airflow.models.dagbag import BundleDagBag, DagBag, sync_bag_to_db  # type: ignore[no-redef]

        DagBundlesManager().sync_bundles_to_db()
        # 3.2+ bags know their bundle's name; 3.1's take only its path
        named = "bundle_name" in inspect.signature(DagBag.__init__).parameters
        extra = {"bundle_name": "dags-folder"} if named else {}
        sync_bag_to_db(BundleDagBag(dag_folder=folder, bundle_path=folder, **extra), "dags-folder", None)
    else:
        bag.sync_to_db()
    with create_session() as session:
        session.query(DagModel).filter(DagModel.dag_id == dag_id).update({"is_paused": False})


def _run(dag: Any, conf: dict[str, Any] | None = None) -> Any:
    return dag_test(dag, LOGICAL_DATE, run_conf=conf)


def _events_and_queue(uri: str, run_id: str) -> tuple[list[dict[str, Any]], set[str]]:
    """The asset events the run recorded on ``uri`` (their extras) and the DAG ids queued by them."""
    from airflow.utils.session import create_session

    if AIRFLOW_3:
        from airflow.models.asset import AssetDagRunQueue as Queue
        from airflow.models.asset import AssetEvent as Event
        from airflow.models.asset import AssetModel as Model

        asset_id, queue_id = Event.asset_id, Queue.asset_id
    else:
        from airflow.models.dataset import (
            DatasetDagRunQueue as Queue,
        )
        from airflow.models.dataset import (
            DatasetEvent as Event,
        )
        from airflow.models.dataset import (
            DatasetModel as Model,
        )

        asset_id, queue_id = Event.dataset_id, Queue.dataset_id
    with create_session() as session:
        model = session.query(Model).filter(Model.uri == uri).one()
        extras = [
            dict(event.extra or {})
            for event in session.query(Event).filter(asset_id == model.id, Event.source_run_id == run_id)
        ]
        queued = {row.target_dag_id for row in session.query(Queue).filter(queue_id == model.id)}
    return extras, queued


@pytest.mark.airflow_db
def test_a_run_records_the_portal_asset_event_with_counts_and_queues_the_downstream_dag(
    airflow_db: Path, example: Sandbox
) -> None:
    bag = _dagbag()
    _sync_and_unpause(bag, DOWNSTREAM)
    upstream = bag.dags[UPSTREAM]
    (outlet,) = upstream.get_task("register_new_applicants").outlets
    assert outlet.uri == portal_uri(example.url, example.portal_id)

    dag_run = _run(upstream, {"lookback_days": 7})
    assert str(dag_run.state) == "success"
    summary = dag_run.get_task_instance("register_new_applicants").xcom_pull(
        task_ids="register_new_applicants", key="return_value"
    )
    assert summary["registered"] > 100 and summary["failed"] == 1 and summary["invalid"] == 1

    extras, queued = _events_and_queue(outlet.uri, dag_run.run_id)
    assert len(extras) == 1
    assert {key: extras[0][key] for key in COUNTS} == {key: summary[key] for key in COUNTS}
    assert extras[0]["total"] == summary["total"] and extras[0]["dry_run"] is False
    assert set(extras[0]) <= {"total", *COUNTS, "skipped", "duplicates", "dry_run"}  # counts, nothing else
    assert DOWNSTREAM in queued
    text = json.dumps(extras)
    assert "@" not in text
    assert_no_secret(text, named_sandbox_secrets(example), "the asset event")


class _SmtpServer(socketserver.ThreadingTCPServer):
    """Just enough SMTP to take one message: each DATA block is kept in ``messages``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.messages: list[str] = []
        super().__init__(("127.0.0.1", 0), _SmtpHandler)


class _SmtpHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 test SMTP\r\n")
        while line := self.rfile.readline():
            command = line.decode(errors="replace").strip().upper()
            if command.startswith(("EHLO", "HELO")):
                self.wfile.write(b"250 test\r\n")
            elif command == "DATA":
                self.wfile.write(b"354 go ahead\r\n")
                data = []
                while (part := self.rfile.readline()) not in (b".\r\n", b""):
                    data.append(part.decode(errors="replace"))
                self.server.messages.append("".join(data))  # type: ignore[attr-defined]
                self.wfile.write(b"250 queued\r\n")
            elif command == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SmtpServer]:
    server = _SmtpServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": server.server_address[1],
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@example.com"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps(conn))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.airflow_db
def test_a_failing_run_mails_how_many_rows_failed_and_the_ledger_query_without_lead_data(
    airflow_db: Path, smtp: _SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The account has no mx_Intake attribute: every row that has one fails, far above 10%.
    known = tuple(a for a in DEFAULT_KNOWN_ATTRIBUTES if a != "mx_Intake")
    with _example(tmp_path, monkeypatch, known_attributes=known) as example:
        _check_failure_email(example, smtp, tmp_path)


def _check_failure_email(example: Sandbox, smtp: _SmtpServer, tmp_path: Path) -> None:
    dag = _dagbag().dags[UPSTREAM]
    dag_run = _run(dag, {"lookback_days": 7})
    assert str(dag_run.state) == "failed"

    warehouse = tmp_path / "warehouse.db"
    db = sqlite3.connect(warehouse)
    failed = db.execute(
        "SELECT COUNT(*) FROM lsq_portal_registrations WHERE run_id = ? AND status IN ('failed', 'invalid')",
        (dag_run.run_id,),
    ).fetchone()[0]
    emails = [row[0] for row in db.execute("SELECT email FROM applicants WHERE email IS NOT NULL")]
    db.close()
    assert failed > 100
    assert len(smtp.messages) == 1, "one failure email"
    message = _body(smtp.messages[0])
    assert f"{failed} rows failed" in message
    assert (
        f"WHERE dag_id = '{UPSTREAM}' AND run_id = '{dag_run.run_id}' "
        "AND task_id = 'register_new_applicants' AND status IN ('failed', 'invalid', 'unconfirmed')"
    ) in message
    assert "FROM lsq_portal_registrations" in message
    assert not [e for e in emails if e in message]
    assert_no_secret(message, named_sandbox_secrets(example), "the email")


@pytest.mark.airflow_db
def test_a_run_with_unconfirmed_rows_fails_without_a_retry_and_mails_what_a_person_must_do(
    airflow_db: Path, smtp: _SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Register call is carried out and answered 200 with an empty body: each row is unconfirmed.
    The task fails, and the email counts them and says what to do, without any lead's data."""
    with _example(tmp_path, monkeypatch) as example:
        conn = json.loads(example.connection_json())
        conn["extra"].update({"retry_wait_seconds": 0.01, "max_retries": 0})
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
        example.inject(*["empty"] * 5000, path="/api/Authentication/v2/Register")
        message = _failed_run_email(smtp)
        db = sqlite3.connect(tmp_path / "warehouse.db")
        counts = dict(db.execute("SELECT status, COUNT(*) FROM lsq_portal_registrations GROUP BY status"))
        emails = [row[0] for row in db.execute("SELECT email FROM applicants WHERE email IS NOT NULL")]
        db.close()
        assert counts.get("unconfirmed", 0) > 100 and "registered" not in counts
        assert example.register_calls == counts["unconfirmed"]  # one call each: no retry of the task
        assert f"{counts['unconfirmed']} rows are unconfirmed" in message, message
        assert "resend_unconfirmed=True" in message
        assert "status IN ('failed', 'invalid', 'unconfirmed')" in message
        assert not [e for e in emails if e in message]
        assert_no_secret(message, named_sandbox_secrets(example), "the email")


@pytest.mark.airflow_db
def test_a_run_stopped_before_any_row_mails_that_no_row_failed_and_where_to_look(
    airflow_db: Path, smtp: _SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys LeadSquared refuses stop the task before its first row: the email must not claim "0 rows
    failed" as if that were the cause, but say no row failed and send the reader to the task log."""
    with _example(tmp_path, monkeypatch) as example:
        example.set_wrong_region("portalapi-us11.leadsquared.com")  # every call answers 401
        message = _failed_run_email(smtp)
        assert "No row of this run is recorded as failed" in message, message
        assert "its log gives" in message
        assert "rows failed" not in message
        assert "lists them" not in message and "FROM lsq_portal_registrations" not in message
        assert_no_secret(message, named_sandbox_secrets(example), "the email")


@pytest.mark.airflow_db
def test_a_run_whose_ledger_cannot_be_read_mails_so_and_the_query_for_later(
    airflow_db: Path, smtp: _SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warehouse that cannot be opened fails the task and the email's ledger count alike: the email
    says the ledger could not be read and gives the query to run once it can."""
    with _example(tmp_path, monkeypatch):
        gone = {"conn_type": "sqlite", "host": str(tmp_path / "no-such-dir" / "warehouse.db")}
        monkeypatch.setenv("AIRFLOW_CONN_LSQ_WAREHOUSE", json.dumps(gone))
        message = _failed_run_email(smtp, ledger_write_timeout=2.0)
        assert "The ledger could not be read" in message, message
        assert "Once it can be read, this query lists" in message
        assert "FROM lsq_portal_registrations" in message
        assert "rows failed" not in message


def _failed_run_email(smtp: _SmtpServer, ledger_write_timeout: float | None = None) -> str:
    """Run the main example DAG, which must fail, and return the text of its one failure email.

    ``ledger_write_timeout``: how long the transfer retries a ledger it cannot reach before it fails
    (the example's 60 s default otherwise; the failure is the same after any bound).
    """
    dag = _dagbag().dags[UPSTREAM]
    if ledger_write_timeout is not None:
        dag.get_task("register_new_applicants").ledger_write_timeout = ledger_write_timeout
    dag_run = _run(dag, {"lookback_days": 7})
    assert str(dag_run.state) == "failed"
    assert len(smtp.messages) == 1, "one failure email"
    return _body(smtp.messages[0])


def _body(raw: str) -> str:
    """The decoded text of a MIME message."""
    import email
    from email import policy

    parsed = email.message_from_string(raw, policy=policy.default)
    parts = [part.get_content() for part in parsed.walk() if part.get_content_maintype() == "text"]
    return str(parsed["Subject"]) + "\n" + "\n".join(parts)


def test_airflow_registers_the_openlineage_converter_for_the_scheme() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    if AIRFLOW_3:
        converters = manager.asset_to_openlineage_converters
    else:
        converters = manager.dataset_to_openlineage_converters
    assert converters["leadsquared"] is convert_asset_to_openlineage


class _Event:
    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args: Any) -> None:
        self.warnings.append(message % args)


def test_counts_go_to_portal_outlets_only_and_another_portal_is_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_provider_lsq.assets import add_counts_to_portal_events

    conn = {
        "conn_type": "leadsquared",
        "host": "portalapi.leadsquared.com",
        "login": "u$AssetTestAccessKey",  # realistic keys: the masker would hide a one-letter key everywhere
        "password": "AssetTestSecretKey+/=",
    }
    conn["extra"] = {"portal_id": "mine"}  # type: ignore[assignment]
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_ASSET_TEST", json.dumps(conn))
    mine = portal_asset("portalapi.leadsquared.com", "mine")
    other = portal_asset("portalapi.leadsquared.com", "other")
    table = type(mine)(uri="postgres://db:5432/warehouse/public/applicants")
    events: dict[Any, _Event] = {}

    class Events:  # keyed by the asset's URI, as Airflow's keys by name and URI (3.0's Asset is unhashable)
        def __getitem__(self, key: Any) -> _Event:
            return events.setdefault(key.uri, _Event())

    summary = {"total": 5, "registered": 3, "already_registered": 0, "invalid": 1, "failed": 1}
    summary |= {"dry_run": False, "duration_s": 1.5, "valid": 0}
    log = _Log()
    counts = add_counts_to_portal_events(
        {"outlet_events": Events()},
        [mine, other, table],
        summary,
        leadsquared_conn_id="lsq_asset_test",
        log=log,
    )
    assert counts == {k: v for k, v in summary.items() if k not in ("duration_s", "valid")}
    assert set(events) == {mine.uri, other.uri}  # the table's event is left alone
    assert events[mine.uri].extra == counts == events[other.uri].extra
    (warning,) = log.warnings
    assert other.uri in warning and "not the portal of connection 'lsq_asset_test'" in warning
    # A direct execute (no outlet_events in the context): counts returned, nothing set.
    assert add_counts_to_portal_events({}, [mine], summary, leadsquared_conn_id="x", log=log) == counts
