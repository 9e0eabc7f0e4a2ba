"""Failures stay visible and no row is lost or sent twice: ledger outages, retries, reruns, concurrent
runs, wrong-case columns and ``only_new_leads`` duplicates (issue 6), over the sandbox and real SQLite
and PostgreSQL. Each small input of the issue is a test here."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.exceptions import LeadSquaredLeadExistsError
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.version_compat import AirflowException, AirflowFailException
from tests import test_transfer_sql as base
from tests.helpers import call_execute
from tests.test_transfer_sql import Warehouse, applicants, context, email, first_name, transfer

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

SIBLING_MOBILE = "+91-9000000001"
# The transfer tests' fixtures: a fast sandbox as the default connection, and the warehouses.
lsq, warehouse, sqlite_warehouse = base.lsq, base.warehouse, base.sqlite_warehouse


def registrations(sb: Sandbox) -> dict[str, int]:
    return {lead.fields["EmailAddress"]: lead.registrations for lead in sb.leads if lead.portal_user}


# -- 2. the ledger cannot be written for a while ---------------------------------------------------------


def test_a_ledger_locked_by_another_writer_loses_nothing_and_sends_nothing_meanwhile(
    sqlite_warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
    tmp_path: Path,
) -> None:
    """60 applicants, ledger in the same SQLite file, batch 10, 4 workers, latency 0.15 s; after the first
    ledger write another connection holds BEGIN IMMEDIATE on the file for 8 s."""
    sb = lsq(latency=0.15)
    sqlite_warehouse.seed(applicants(60))
    path = tmp_path / "warehouse.db"
    calls_during_hold: list[int] = []
    ready = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None, timeout=60)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    done = db.execute(
                        f"SELECT COUNT(*) FROM {sqlite_warehouse.ledger_table} WHERE status <> 'pending'"
                    ).fetchone()[0]
                except sqlite3.OperationalError:
                    done = 0  # no table yet
                if done:
                    break
                time.sleep(0.01)
            db.execute("BEGIN IMMEDIATE")
            before = sb.register_calls
            ready.set()
            time.sleep(8)
            calls_during_hold.append(sb.register_calls - before)
            db.execute("COMMIT")
        finally:
            db.close()

    holder = threading.Thread(target=hold)
    holder.start()
    summary = transfer(sqlite_warehouse, batch_size=10, max_workers=4).execute(context())
    holder.join()

    assert ready.is_set()
    # Unblocked, 4 workers at 0.15 s would send all 60 rows within the 8 s hold. Blocked, the run sends
    # only what it had handed over when its next write (a claim, every 2 rows per worker, or a flush)
    # met the lock: the pool's two rows per worker plus one claimed chunk.
    assert calls_during_hold[0] <= 2 * (2 * 4)
    assert summary["registered"] == 60
    ledger = sqlite_warehouse.ledger()
    assert len(ledger) == 60 and {row["status"] for row in ledger.values()} == {"registered"}
    assert set(registrations(sb).values()) == {1}
    assert sb.register_calls == 60


@pytest.mark.postgres
def test_a_postgres_ledger_connection_dropped_midway_is_reopened_and_loses_nothing(
    lsq: Callable[..., Sandbox],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PostgreSQL restart or a network blip drops the ledger's connection between two writes."""
    import psycopg2

    wh = base.make_warehouse("postgres", request, tmp_path, monkeypatch)
    sb = lsq(latency=0.1)
    wh.seed(applicants(60))
    uri = request.getfixturevalue("postgres_server")
    dropped: list[int] = []

    def drop() -> None:
        admin = psycopg2.connect(uri)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                deadline = time.monotonic() + 60
                while not dropped and time.monotonic() < deadline:
                    # Every other connection to this database but the warehouse's stream (its query and
                    # its named cursor's FETCHes) is the ledger's; wait until it has written something.
                    try:
                        cur.execute(f"SELECT COUNT(*) FROM {wh.ledger_table} WHERE status <> 'pending'")
                        written = cur.fetchone()[0]
                    except psycopg2.errors.UndefinedTable:
                        written = 0
                    if not written:
                        time.sleep(0.02)
                        continue
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND query NOT LIKE %s AND query NOT LIKE %s",
                        ("%applicants%", "%lsq_transfer%"),
                    )
                    dropped.extend(1 for (ok,) in cur.fetchall() if ok)
        finally:
            admin.close()

    dropper = threading.Thread(target=drop)
    dropper.start()
    summary = transfer(wh, batch_size=10, max_workers=4).execute(context())
    dropper.join()

    assert dropped  # the ledger's connection was killed mid-run
    assert summary["registered"] == 60
    ledger = wh.ledger()
    assert len(ledger) == 60 and {row["status"] for row in ledger.values()} == {"registered"}
    assert set(registrations(sb).values()) == {1} and sb.register_calls == 60


def test_a_ledger_down_past_its_bound_fails_the_task_and_logs_what_to_reconcile(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], tmp_path: Path, task_log: TaskLog
) -> None:
    sb = lsq(latency=0.05)
    sqlite_warehouse.seed(applicants(40))
    path = tmp_path / "warehouse.db"
    released = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None, timeout=60)
        try:
            while True:
                try:
                    if db.execute(f"SELECT COUNT(*) FROM {sqlite_warehouse.ledger_table}").fetchone()[0]:
                        break
                except sqlite3.OperationalError:
                    pass
                time.sleep(0.005)
            db.execute("BEGIN IMMEDIATE")
            released.wait(60)
            db.execute("COMMIT")
        finally:
            db.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        with pytest.raises(AirflowFailException, match="could not be recorded"):
            transfer(sqlite_warehouse, batch_size=10, max_workers=4, ledger_write_timeout=1.0).execute(
                context()
            )
    finally:
        released.set()
        holder.join()

    registered = {lead.fields["EmailAddress"] for lead in sb.leads if lead.portal_user}
    assert registered
    recorded = {k for k, row in sqlite_warehouse.ledger().items() if row["status"] == "registered"}
    log = task_log()
    for lead in sb.leads:
        key = lead.fields["EmailAddress"].split("@")[0].removeprefix("applicant")
        if key not in recorded:  # every registration the ledger lacks is in the log, by key and lead id
            assert f"Unrecorded outcome: row {key}, registered, lead id {lead.lead_id}" in log
    assert not any(address in log for address in registered)  # no other lead data


# -- 3. a retry ends the way the first try did ------------------------------------------------------------


def test_a_retry_of_a_failed_run_fails_again_until_the_rows_are_fixed(
    warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
    task_log: TaskLog,
) -> None:
    """Applicants 1 to 10, rows 3, 6 and 9 with NULL email; max_failure_ratio=0.1; retries."""
    sb = lsq()
    warehouse.seed(applicants(10, without_email=(3, 6, 9)))

    messages = []
    for _try in range(3):  # the first try and two retries, same run id
        with pytest.raises(AirflowException) as info:
            transfer(warehouse, max_failure_ratio=0.1).execute(context("scheduled__1"))
        messages.append(str(info.value))
    assert messages[0].startswith("3 of 10 rows failed")
    assert messages[0] == messages[1] == messages[2]
    assert sb.register_calls == 7  # the retries made no call at all
    assert task_log.count("7 rows were recorded by an earlier try of this run") >= 1

    # The data is fixed: the next run validates the invalid rows again and registers them.
    for i in (3, 6, 9):
        warehouse.execute(
            f"UPDATE {warehouse.table('applicants')} SET email = '{email(i)}' WHERE applicant_id = {i}"
        )
    summary = transfer(warehouse, max_failure_ratio=0.1).execute(context("scheduled__2"))
    assert summary["registered"] == summary["total"] == 3  # the 7 registered rows: left out
    assert summary["skipped"] == 0
    assert set(registrations(sb).values()) == {1} and len(registrations(sb)) == 10


def test_a_column_in_the_wrong_case_fails_before_any_call_or_record(
    warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
) -> None:
    """PostgreSQL folds ``email AS EmailAddress`` to ``emailaddress``."""
    sb = lsq()
    warehouse.seed(applicants(5))
    alias = "EmailAddress" if warehouse.kind == "postgres" else "emailaddress"  # SQLite keeps the case
    table = warehouse.table("applicants")
    sql = f'SELECT applicant_id, email AS {alias}, first_name AS "FirstName" FROM {table}'
    with pytest.raises(AirflowFailException, match="found emailaddress: quote the alias"):
        transfer(warehouse, sql=sql).execute(context())
    assert sb.calls == []  # not even a login
    assert warehouse.ledger() == {}


def test_unfixable_errors_fail_without_airflow_retries(
    sqlite_warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = lsq(conn_extra={"portal_id": None})
    sqlite_warehouse.seed(applicants(2))
    with pytest.raises(AirflowFailException, match="no portal_id"):
        transfer(sqlite_warehouse).execute(context())
    # A connection value refused when read (not JSON, a portal id with a space): no retry fixes it
    # either; it raised LeadSquaredConfigError, which Airflow retried.
    for extra in ('{"portal_id": "sandbox-portal",}', {"portal_id": "sandbox portal"}):
        sb = lsq()
        conn = json.loads(sb.connection_json())
        conn["extra"] = extra if isinstance(extra, str) else {**conn["extra"], **extra}
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
        with pytest.raises(AirflowFailException, match=r"'leadsquared_default': field '(extra|portal_id)'"):
            transfer(sqlite_warehouse).execute(context())
        assert sb.calls == []  # and no ledger: it is made once the connection is read
    sb = lsq()
    with pytest.raises(AirflowFailException, match="key_column 'student_id'"):
        transfer(sqlite_warehouse, key_column="student_id").execute(context())
    assert sb.register_calls == 0


# -- 4. only_new_leads and a duplicate on another unique field ------------------------------------------


def test_sandbox_refuses_a_value_of_another_unique_field_held_by_another_lead(
    lsq: Callable[..., Sandbox],
) -> None:
    sb = lsq()
    sibling = sb.add_lead({"EmailAddress": "sibling@example.edu", "Mobile": SIBLING_MOBILE})
    hook = LeadSquaredHook()
    with pytest.raises(LeadSquaredLeadExistsError, match="Mobile"):
        hook.register_portal_user(
            {"EmailAddress": email(1), "Mobile": SIBLING_MOBILE},
            "Pass-word-1!",
            identifier_attribute="EmailAddress",
        )
    assert sb.find_lead("EmailAddress", email(1)) is None
    # The lead's own values are no duplicate: an upsert of the sibling itself works.
    assert hook.register_portal_user(
        {"EmailAddress": "sibling@example.edu", "Mobile": SIBLING_MOBILE}, "Pass-word-1!"
    )
    assert sb.find_lead("Mobile", SIBLING_MOBILE).lead_id == sibling  # type: ignore[union-attr]


def test_only_new_leads_records_a_duplicate_of_another_field_as_failed(
    warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
    task_log: TaskLog,
) -> None:
    sb = lsq()
    sb.add_lead({"EmailAddress": "sibling@example.edu", "Mobile": SIBLING_MOBILE})  # a family's phone
    sb.add_lead({"EmailAddress": email(2)})  # applicant 2 exists already
    rows = applicants(5)
    rows[0] = (1, email(1), first_name(1), SIBLING_MOBILE)
    warehouse.seed(rows)
    sql = warehouse.sql(', bogus AS "Mobile"')

    summary = transfer(warehouse, sql=sql, only_new_leads=True, max_failure_ratio=0.5).execute(context("r1"))
    assert (summary["registered"], summary["already_registered"], summary["failed"]) == (3, 1, 1)
    ledger = warehouse.ledger()
    assert ledger["2"]["status"] == "already_registered"
    assert ledger["1"]["status"] == "failed" and not ledger["1"]["retryable"]
    assert "Mobile" in ledger["1"]["error_message"]  # LeadSquared's message, for a person to see
    assert sb.find_lead("EmailAddress", email(1)) is None

    # A retry of the run counts it again; a later run skips it, says so, and the summary shows it.
    again = transfer(warehouse, sql=sql, only_new_leads=True, max_failure_ratio=0.5).execute(context("r1"))
    assert again["failed"] == 1
    later = transfer(warehouse, sql=sql, only_new_leads=True, max_failure_ratio=0.5).execute(context("r2"))
    assert later["skipped_failed"] == 1 and later["failed"] == 0
    assert task_log.count("1 rows skipped: an earlier run recorded them as failed for good") >= 1


# -- two runs on one ledger at once, from the very first run ---------------------------------------------


def test_two_transfers_on_one_new_ledger_at_once_record_every_row_once(
    warehouse: Warehouse,
    lsq: Callable[..., Sandbox],
) -> None:
    sb = lsq(latency=0.05)
    warehouse.seed(applicants(60))
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def run(run_id: str) -> None:
        op = transfer(warehouse, batch_size=10, max_workers=4)
        start.wait()  # two task processes in production; two threads here
        results[run_id] = call_execute(op, context(run_id))

    threads = [threading.Thread(target=run, args=(f"run_{i}",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(isinstance(result, dict) for result in results.values()), results
    assert sum(result["registered"] for result in results.values()) == 60
    ledger = warehouse.ledger()
    assert len(ledger) == 60 and {row["status"] for row in ledger.values()} == {"registered"}
    assert set(registrations(sb).values()) == {1} and len(registrations(sb)) == 60
    assert sb.register_calls == 60
