"""RegistrationLedger on real SQLite files and the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.transfers.executions import Execution
from airflow_provider_lsq.transfers.ledger import (
    LedgerRow,
    LedgerUnavailableError,
    RegistrationLedger,
    validate_table_name,
)
from airflow_provider_lsq.version_compat import BaseHook
from tests.helpers import fetch_all, silent_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from airflow.providers.common.sql.hooks.sql import DbApiHook

PORTAL = "portal-1"
REGISTERED = RegistrationStatus.REGISTERED
FAILED = RegistrationStatus.FAILED


def outcome(key: str, status: RegistrationStatus = REGISTERED, **kwargs: Any) -> RegistrationOutcome:
    if status is REGISTERED:
        kwargs.setdefault("lead_id", f"lead-{key}")
    kwargs.setdefault("attempts", 1)
    return RegistrationOutcome(key, status, **kwargs)


class Db:
    def __init__(
        self, kind: str, hook: Callable[[], DbApiHook], connect: Callable[[], Any], table: str
    ) -> None:
        self.kind = kind
        self.hook = hook
        self.connect = connect
        self.table = table

    def ledger(self, portal_id: str = PORTAL) -> RegistrationLedger:
        return RegistrationLedger(self.hook(), self.table, portal_id)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return fetch_all(self.connect(), sql)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    conn_id = f"lsq_ledger_{uuid.uuid4().hex[:8]}"
    env = f"AIRFLOW_CONN_{conn_id.upper()}"

    def hook() -> DbApiHook:
        return BaseHook.get_connection(conn_id).get_hook()  # type: ignore[no-any-return]

    if request.param == "sqlite":
        path = tmp_path / "ledger.db"
        monkeypatch.setenv(env, json.dumps({"conn_type": "sqlite", "host": str(path)}))
        yield Db("sqlite", hook, lambda: sqlite3.connect(path), "lsq_ledger")
        return
    import psycopg2

    uri = request.getfixturevalue("postgres_server")
    monkeypatch.setenv(env, uri.replace("postgresql://", "postgres://", 1))
    schema = f"led_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(uri)
    with admin.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    admin.commit()
    admin.close()
    yield Db("postgres", hook, lambda: psycopg2.connect(uri), f"{schema}.lsq_ledger")


def test_ensure_table_is_idempotent_and_lookup_of_unknown_keys_is_empty(db: Db) -> None:
    with db.ledger() as ledger:
        ledger.ensure_table()
        ledger.ensure_table()
        assert ledger.lookup(["a", "b"]) == {}
        assert ledger.lookup([]) == {}


def test_record_then_lookup_round_trips(db: Db) -> None:
    with db.ledger() as ledger:
        ledger.ensure_table()
        transient = outcome("b", FAILED, error_type="LeadSquaredTransientError", error_message="503")
        invalid = outcome(
            "c", RegistrationStatus.INVALID, error_type="ValidationError", attempts=0,
            error_message="field 'EmailAddress': missing",
        )  # fmt: skip
        written = ledger.record(
            [outcome("a", attempts=2), replace(transient, retryable=True), invalid],
            execution=Execution("dag", "run-1"),
        )
        assert written == 3
        rows = ledger.lookup(["a", "b", "c", "zzz"])
    assert set(rows) == {"a", "b", "c"}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a.registered and a.lead_id == "lead-a" and a.attempts == 2 and not a.retryable
    assert a.dag_id == "dag" and a.run_id == "run-1"
    assert a.registered_at is not None and a.registered_at.tzinfo is not None
    assert a.first_attempt_at == a.last_attempt_at == a.registered_at
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((now - a.last_attempt_at).total_seconds()) < 3600  # UTC, not local time  # type: ignore[operator]
    assert not b.registered and b.retryable and b.registered_at is None and b.error_message == "503"
    assert c.status == "invalid" and c.attempts == 0 and c.error_message == "field 'EmailAddress': missing"


def test_attempts_accumulate_and_first_times_and_lead_id_are_kept(db: Db) -> None:
    with db.ledger() as ledger:
        ledger.ensure_table()
        ledger.record([outcome("k", FAILED, retryable=True, attempts=3)], execution=Execution("d", "r1"))
        first = ledger.lookup(["k"])["k"]
        ledger.record([outcome("k", attempts=1)], execution=Execution("d", "r2"))
        second = ledger.lookup(["k"])["k"]
        ledger.record([outcome("k", FAILED, attempts=2, lead_id=None)], execution=Execution("d", "r3"))
        third = ledger.lookup(["k"])["k"]
    assert second.attempts == 4 and second.status == "registered" and not second.retryable
    assert second.first_attempt_at == first.first_attempt_at
    assert second.run_id == "r2"
    assert third.attempts == 6
    assert third.lead_id == "lead-k"  # known lead id kept when the new outcome has none
    assert third.registered_at == second.registered_at  # the first registration time is kept
    assert db.query(f"SELECT COUNT(*) FROM {db.table}") == [(1,)]


def test_a_batch_is_one_transaction_and_repeated_keys_merge(db: Db) -> None:
    with db.ledger() as ledger:
        ledger.ensure_table()
        assert (
            ledger.record([outcome("x", FAILED, retryable=True), outcome("x")], execution=Execution("d", "r"))
            == 1
        )
        row = ledger.lookup(["x"])["x"]
    assert row.status == "registered" and row.attempts == 2


def test_large_batches_are_chunked(db: Db) -> None:
    keys = [f"key-{i}" for i in range(1234)]
    with db.ledger() as ledger:
        ledger.ensure_table()
        assert ledger.record([outcome(k) for k in keys], execution=Execution("d", "r")) == len(keys)
        assert len(ledger.lookup(keys)) == len(keys)
        ledger.record([outcome(k, attempts=1) for k in keys], execution=Execution("d", "r2"))
        rows = ledger.lookup(keys)
    assert {row.attempts for row in rows.values()} == {2}
    assert db.query(f"SELECT COUNT(*) FROM {db.table}") == [(len(keys),)]


def test_portals_are_kept_apart(db: Db) -> None:
    with db.ledger("portal-a") as a, db.ledger("portal-b") as b:
        a.ensure_table()
        a.record([outcome("k")], execution=Execution("d", "r"))
        assert b.lookup(["k"]) == {}
        b.record([outcome("k", FAILED)], execution=Execution("d", "r"))
        assert a.lookup(["k"])["k"].registered
        assert not b.lookup(["k"])["k"].registered


def test_a_failed_write_rolls_back(db: Db) -> None:
    class Boom(RegistrationOutcome):
        @property
        def ok(self) -> bool:
            raise RuntimeError("boom")

    with db.ledger() as ledger:
        ledger.write_timeout = 0.5  # every retry fails the same way: give up soon
        ledger.ensure_table()
        ledger.record([outcome("a")], execution=Execution("d", "r1"))
        with pytest.raises(LedgerUnavailableError) as info:
            ledger.record([outcome("b"), Boom("a", FAILED)], execution=Execution("d", "r2"))
        assert isinstance(info.value.__cause__, RuntimeError)
        rows = ledger.lookup(["a", "b"])
    assert set(rows) == {"a"} and rows["a"].run_id == "r1"


def test_column_types(db: Db) -> None:
    with db.ledger() as ledger:
        ledger.ensure_table()
        ledger.record([outcome("a")], execution=Execution("d", "r"))
    if db.kind == "sqlite":
        (registered_at, retryable) = db.query(f"SELECT registered_at, retryable FROM {db.table}")[0]
        assert isinstance(registered_at, str) and dt.datetime.strptime(registered_at, "%Y-%m-%d %H:%M:%S")
        assert retryable == 0
        assert db.query("PRAGMA journal_mode") == [("wal",)]
    else:
        schema, table = db.table.split(".")
        types = dict(
            db.query(
                "SELECT column_name, data_type FROM information_schema.columns "
                f"WHERE table_schema = '{schema}' AND table_name = '{table}'"
            )
        )
        assert types["registered_at"] == "timestamp without time zone"
        assert types["retryable"] == "boolean"
        assert types["attempts"] == "integer"
        pk = db.query(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            f"AND a.attnum = ANY(i.indkey) WHERE i.indrelid = '{db.table}'::regclass AND i.indisprimary"
        )
        assert {name for (name,) in pk} == {"portal_id", "row_key"}


def test_sqlite_writes_while_a_stream_reads_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transfer reads the warehouse on one connection while the ledger writes on another."""
    path = tmp_path / "same.db"
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_SAME", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE applicants (id INTEGER)")
    setup.executemany("INSERT INTO applicants VALUES (?)", [(i,) for i in range(5000)])
    setup.commit()
    setup.close()
    ledger = RegistrationLedger(BaseHook.get_connection("lsq_same").get_hook(), "lsq_ledger", PORTAL)
    ledger.ensure_table()  # switches the file to WAL
    reader = sqlite3.connect(path, timeout=0.5)
    cursor = reader.execute("SELECT id FROM applicants")
    try:
        for batch in range(3):
            rows = cursor.fetchmany(100)  # the read is open, mid-result
            ledger.record([outcome(str(r[0])) for r in rows], execution=Execution("d", "r"))
            assert len(ledger.lookup(str(r[0]) for r in rows)) == 100, batch
    finally:
        cursor.close()
        reader.close()
        ledger.close()


@pytest.mark.parametrize("name", ["lsq_ledger", "Ledger_2", "_x", "warehouse.lsq_ledger", "s_1.t_2"])
def test_plain_table_names_pass(name: str) -> None:
    assert validate_table_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "a-b", "a b", "x; DROP TABLE y", "a.b.c", '"quoted"', "t--", "a.", ".a", "é"],
)
def test_other_table_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a plain table name"):
        validate_table_name(name)


def test_ledger_row_registered() -> None:
    assert LedgerRow("k", "registered").registered
    assert LedgerRow("k", "already_registered").registered
    assert not LedgerRow("k", "failed").registered
    assert not LedgerRow("k", "invalid").registered


@pytest.mark.parametrize("generic_sql", [False, True], ids=["native", "generic-sql"])
def test_a_key_is_claimed_by_one_run_only_and_released_back(db: Db, generic_sql: bool) -> None:
    """Claims mark rows ``pending``; a second run cannot take them; a release restores the old row.

    ``generic-sql`` runs the plain-SQL claim that databases without ``ON CONFLICT`` get, on the same
    real database.
    """
    first, second = db.ledger(), db.ledger()
    first.ensure_table()
    first.record([outcome("old", FAILED, retryable=True)], execution=Execution("d", "before"))
    if generic_sql:
        first._dialect = second._dialect = "generic"
    known = first.lookup(["new", "old"])
    previous = {"new": known.get("new"), "old": known.get("old")}
    run_1, run_2 = Execution("d", "run-1", "t"), Execution("d", "run-2", "t")
    assert first.claim(previous, execution=run_1) == {"new", "old"}
    assert second.claim(previous, execution=run_2) == set()  # held by run-1
    assert {row.row_key: (row.status, row.run_id) for row in second.lookup(["new", "old"]).values()} == {
        "new": ("pending", "run-1"),
        "old": ("pending", "run-1"),
    }
    assert first.claim(previous, execution=run_1) == {"new", "old"}  # a retried claim: ours
    # The same task instance's next try (same dag, run and task: another token) cannot take them either.
    assert second.claim(previous, execution=Execution("d", "run-1", "t")) == set()
    first.release(previous, execution=run_1)
    after = second.lookup(["new", "old"])
    assert "new" not in after
    assert (after["old"].status, after["old"].run_id, after["old"].retryable) == ("failed", "before", True)
    first.close()
    second.close()


def test_a_warehouse_that_accepts_and_never_answers_is_named_with_the_time_really_waited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each attempt waits on the driver (here until the server drops the connection, 2 s in), which can
    outlast ``write_timeout``: the error names the connection, says how long it really waited and how
    to bound an attempt (the driver's connect timeout)."""
    with silent_server(drop_after=2.0) as (port, _):
        monkeypatch.setenv("AIRFLOW_CONN_LSQ_SILENT_WH", f"postgres://postgres@127.0.0.1:{port}/warehouse")
        hook = BaseHook.get_connection("lsq_silent_wh").get_hook()
        ledger = RegistrationLedger(hook, "lsq_ledger", PORTAL, write_timeout=0.5)
        with pytest.raises(LedgerUnavailableError) as caught:
            ledger.ensure_table()
    message = str(caught.value)
    waited = re.search(
        r"^The ledger lsq_ledger \(connection 'lsq_silent_wh'\) could not be written for (\d+) s", message
    )
    assert waited is not None, message
    assert int(waited.group(1)) >= 2  # the time really waited, not write_timeout's 0.5 s
    assert "connect_timeout" in message
