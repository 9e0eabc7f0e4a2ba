"""One lead, one registration: two warehouse rows with different keys but the same lead identifier are
one LeadSquared lead, and registering it again would reset its portal password. Over the sandbox and
real SQLite and PostgreSQL ledgers, including a ledger table made by the previous release."""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.hooks.payload import first_identifier, lead_fingerprint
from airflow_provider_lsq.transfers.executions import Execution
from airflow_provider_lsq.transfers.ledger import ADDED_COLUMNS, RegistrationLedger
from airflow_provider_lsq.transfers.sql_to_leadsquared import get_db_hook
from tests import test_transfer_sql as base
from tests.helpers import call_execute
from tests.test_transfer_sql import Warehouse, applicants, context, email, first_name, transfer

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

lsq, warehouse, sqlite_warehouse = base.lsq, base.warehouse, base.sqlite_warehouse


def ordered(wh: Warehouse) -> str:
    return wh.sql(where="ORDER BY applicant_id")


def fingerprint_of(address: str) -> str:
    return hashlib.sha256(f"EmailAddress\n{address.strip().lower()}".encode()).hexdigest()


def identifiers(wh: Warehouse) -> dict[str, str | None]:
    return {
        str(key): value for key, value in wh.query(f"SELECT row_key, lead_identifier FROM {wh.ledger_table}")
    }


def assert_no_raw_identifier(wh: Warehouse, addresses: list[str]) -> None:
    cells = "\n".join(wh.ledger_cells()).lower()
    for address in addresses:
        assert address.strip().lower() not in cells, "a lead's e-mail address reached the ledger"


# -- the fingerprint -----------------------------------------------------------------------------------


def test_the_fingerprint_is_of_the_identifier_sent_first_normalised() -> None:
    lead = {"FirstName": "Bob", "Mobile": " 9000000001 ", "EmailAddress": " Bob@Example.EDU "}
    assert first_identifier(lead, "EmailAddress") == ("EmailAddress", " Bob@Example.EDU ")
    assert first_identifier(lead, None) == ("Mobile", " 9000000001 ")  # the lead's own order
    assert first_identifier({"EmailAddress": None, "Phone": 12345}, None) == ("Phone", "12345")
    assert first_identifier({"FirstName": "x"}, "EmailAddress") is None
    assert first_identifier({"EmailAddress": "bad\x01"}, "EmailAddress") is None  # invalid: not sendable
    same = lead_fingerprint("EmailAddress", "bob@example.edu")
    assert lead_fingerprint("EmailAddress", " Bob@Example.EDU ") == same == fingerprint_of("bob@example.edu")
    assert lead_fingerprint("emailaddress", "BOB@example.edu") == same
    assert lead_fingerprint("Mobile", " 9000000001 ") == lead_fingerprint("Mobile", "9000000001")
    assert lead_fingerprint("Mobile", "9000000001") != lead_fingerprint("Phone", "9000000001")
    assert lead_fingerprint("mx_PAN_Number", "ABCDE1234F") != lead_fingerprint("mx_PAN_Number", "abcde1234f")
    assert len(same) == 64 and "bob" not in same


# -- within one run ------------------------------------------------------------------------------------


def test_two_rows_of_one_lead_in_one_run_are_sent_once_and_the_next_run_records_the_second(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    """The tester's repro: rows #5 and #6 with the same e-mail; and a third key of lead 2 batches later."""
    sb = lsq()
    rows = applicants(25)
    rows[5] = (6, f"  {email(5).upper()} ", first_name(6), None)  # lead 5 again, in the same batch
    rows[21] = (22, email(2), first_name(22), None)  # lead 2 again, two batches later
    warehouse.seed(rows)

    summary = transfer(warehouse, sql=ordered(warehouse)).execute(context("r1"))

    assert sb.register_calls == 23  # one call per lead
    assert summary["registered"] == 23
    assert summary["duplicates"] == summary["duplicate_leads"] == 2
    assert summary["total"] == 25
    for i in (2, 5):
        lead = sb.find_lead("EmailAddress", email(i))
        assert lead is not None and lead.registrations == 1
    ledger = warehouse.ledger()
    assert set(ledger) == {str(i) for i in range(1, 26)} - {"6", "22"}  # left out this run
    assert task_log.count("Row key 6 is the same lead as row key 5 of this run (same EmailAddress)") == 1
    assert task_log.count("Row key 22 is the same lead as row key 2 of this run (same EmailAddress)") == 1
    assert email(5) not in task_log() and email(2) not in task_log()
    found = identifiers(warehouse)
    assert found["5"] == fingerprint_of(email(5)) and found["2"] == fingerprint_of(email(2))

    # The next run finds the first rows' registrations: the second rows are recorded, without a call.
    second = transfer(warehouse, sql=ordered(warehouse)).execute(context("r2"))
    assert sb.register_calls == 23
    # The 23 registered rows are left out by the database (the ledger's anti-join).
    assert second["already_registered"] == second["total"] == 2
    assert second["skipped"] == second["registered"] == 0
    ledger = warehouse.ledger()
    for key, first in (("6", "5"), ("22", "2")):
        assert ledger[key]["status"] == "already_registered"
        assert ledger[key]["lead_id"] == ledger[first]["lead_id"]
        assert ledger[key]["error_type"] == "SameLead"
        assert ledger[key]["error_message"] == (
            f"the lead is a portal user already, registered by row key {first} (same EmailAddress)"
        )
        assert ledger[key]["attempts"] == 0
    assert identifiers(warehouse)["6"] == fingerprint_of(email(5))
    assert_no_raw_identifier(warehouse, [email(i) for i in range(1, 26)])


def test_a_second_row_of_a_lead_whose_first_row_failed_is_sent_by_the_next_run(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    rows = applicants(4)
    rows.append((5, email(1), first_name(5), None))  # lead 1 again
    rows[0] = (1, email(1), first_name(1), "teal")  # row 1 is refused by the API (unknown attribute)
    sqlite_warehouse.seed(rows)
    sql = sqlite_warehouse.sql(', bogus AS "mx_Favourite_Colour"', "ORDER BY applicant_id")

    first = transfer(sqlite_warehouse, sql=sql, max_failure_ratio=1.0).execute(context("r1"))
    assert (first["registered"], first["failed"], first["duplicate_leads"]) == (3, 1, 1)
    assert sb.find_lead("EmailAddress", email(1)) is None

    second = transfer(sqlite_warehouse, sql=sql, max_failure_ratio=1.0).execute(context("r2"))
    assert second["registered"] == 1 and second["skipped_failed"] == 1
    assert sqlite_warehouse.ledger()["5"]["status"] == "registered"
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None and lead.registrations == 1


# -- across runs ---------------------------------------------------------------------------------------


def test_a_new_key_for_a_registered_lead_is_recorded_already_registered_without_a_call(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    """The tester's repro: Bob registered as row key 2 in run 1; run 2 meets row key 9 with his e-mail."""
    sb = lsq()
    warehouse.seed(applicants(5))
    assert transfer(warehouse).execute(context("r1"))["registered"] == 5
    bob = sb.find_lead("EmailAddress", email(2))
    assert bob is not None and bob.registrations == 1 and bob.password_sha256

    warehouse.execute(
        f"INSERT INTO {warehouse.table('applicants')} VALUES (?, ?, ?, ?)",
        [(9, f" {email(2).title()}", "Robert", None), (10, email(10), first_name(10), None)],
    )
    calls = sb.register_calls
    dry = transfer(warehouse, dry_run=True).execute(context("dry"))  # foretells it, writes nothing
    assert dry["already_registered"] == 1 and dry["valid"] == 1 and "9" not in warehouse.ledger()
    summary = transfer(warehouse).execute(context("r2"))

    assert sb.register_calls - calls == 1  # applicant 10 only
    assert summary["already_registered"] == 1 and summary["registered"] == 1
    assert summary["total"] == 2 and summary["skipped"] == 0  # the 5 registered rows: left out
    after = sb.find_lead("EmailAddress", email(2))
    assert after is not None and after.lead_id == bob.lead_id
    assert after.registrations == 1 and after.password_sha256 == bob.password_sha256  # not locked out
    assert after.fields["FirstName"] == first_name(2)  # nothing of row 9 was sent
    ledger = warehouse.ledger()
    assert ledger["9"]["status"] == "already_registered" and ledger["9"]["lead_id"] == bob.lead_id
    assert ledger["9"]["error_message"] == (
        "the lead is a portal user already, registered by row key 2 (same EmailAddress)"
    )
    assert ledger["2"]["status"] == "registered" and ledger["2"]["run_id"] == "r1"
    assert identifiers(warehouse)["9"] == identifiers(warehouse)["2"] == fingerprint_of(email(2))
    assert task_log.count("Row key 9 is the lead of row key 2 (same EmailAddress)") == 2  # dry run too
    assert_no_raw_identifier(warehouse, [email(i) for i in range(1, 11)])

    # Later runs skip both keys: still one registration.
    third = transfer(warehouse).execute(context("r3"))
    assert third["total"] == 0 and sb.register_calls - calls == 1  # all settled: left out


def test_a_lead_another_run_is_sending_under_another_key_is_skipped(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Row key 2 is pending for another run (in flight now); this run meets row key 9 of the same lead."""
    sb = lsq()
    sqlite_warehouse.seed([(9, email(2), "Robert", None), (3, email(3), first_name(3), None)])
    ledger = RegistrationLedger(
        get_db_hook(sqlite_warehouse.conn_id, "x"), sqlite_warehouse.ledger_table, sb.portal_id
    )
    ledger.ensure_table()
    ledger.claim(
        {"2": None}, execution=Execution("other", "other_run"), identifiers={"2": fingerprint_of(email(2))}
    )
    ledger.close()

    summary = transfer(sqlite_warehouse).execute(context("r1"))
    assert summary["registered"] == 1 and summary["skipped"] == 1
    assert sb.find_lead("EmailAddress", email(2)) is None
    assert "9" not in sqlite_warehouse.ledger()


def test_two_runs_at_once_with_different_keys_of_the_same_leads_register_each_lead_once(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Run A has keys 1-30, run B keys 101-130 for the same 30 people; they start together."""
    sb = lsq(latency=0.03)
    warehouse.seed(applicants(30) + [(100 + i, email(i), first_name(i), None) for i in range(1, 31)])
    sqls = {
        "run_a": warehouse.sql(where="WHERE applicant_id <= 30"),
        "run_b": warehouse.sql(where="WHERE applicant_id > 100"),
    }
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def run(run_id: str) -> None:
        op = transfer(warehouse, sql=sqls[run_id], batch_size=5, max_workers=4)
        start.wait()
        results[run_id] = call_execute(op, context(run_id))

    threads = [threading.Thread(target=run, args=(run_id,)) for run_id in sqls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(isinstance(result, dict) for result in results.values()), results
    assert sb.register_calls == 30
    assert {lead.registrations for lead in sb.leads} == {1} and len(sb.leads) == 30

    # A later run over both key sets records every row, with no call.
    summary = transfer(warehouse).execute(context("later"))
    assert sb.register_calls == 30 and summary["registered"] == 0
    ledger = warehouse.ledger()
    assert len(ledger) == 60
    statuses = [row["status"] for row in ledger.values()]
    assert statuses.count("registered") == 30 and statuses.count("already_registered") == 30
    for i in range(1, 31):
        assert ledger[str(i)]["lead_id"] == ledger[str(100 + i)]["lead_id"]


# -- a ledger table of the previous release --------------------------------------------------------------


def old_ledger_ddl(wh: Warehouse) -> str:
    """The CREATE TABLE of the release before ``lead_identifier`` (commit 6caae2c)."""
    text, timestamp, boolean, false = (
        ("TEXT", "TEXT", "INTEGER", "0") if wh.kind == "sqlite" else ("TEXT", "TIMESTAMP", "BOOLEAN", "FALSE")
    )
    return f"""
        CREATE TABLE IF NOT EXISTS {wh.ledger_table} (
            portal_id {text} NOT NULL,
            row_key {text} NOT NULL,
            lead_id {text},
            status {text} NOT NULL,
            error_type {text},
            error_message TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            first_attempt_at {timestamp},
            last_attempt_at {timestamp},
            registered_at {timestamp},
            dag_id {text},
            run_id {text},
            retryable {boolean} NOT NULL DEFAULT {false},
            PRIMARY KEY (portal_id, row_key)
        )
    """


def columns(wh: Warehouse) -> list[str]:
    db = wh.connect()
    try:
        cursor = db.cursor()
        cursor.execute(f"SELECT * FROM {wh.ledger_table} WHERE 1 = 0")
        return [str(column[0]) for column in cursor.description]
    finally:
        db.close()


def has_identifier_index(wh: Warehouse) -> bool:
    if wh.kind == "sqlite":
        names = [row[1] for row in wh.query("PRAGMA index_list(lsq_ledger)")]
    else:
        names = [
            name
            for (name,) in wh.query(
                "SELECT indexname FROM pg_indexes "
                f"WHERE schemaname = '{wh.schema}' AND tablename = 'lsq_ledger'"
            )
        ]
    return "lsq_ledger_lead_identifier_idx" in names


def test_a_ledger_table_of_the_previous_release_is_migrated_and_used(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    # The previous release registered applicants 1-3 (Bob is 2); the applicant has since chosen a password.
    hook = LeadSquaredHook()
    lead_ids = {
        i: hook.register_portal_user({"EmailAddress": email(i)}, f"Own-pass-{i}!").lead_id for i in (1, 2, 3)
    }
    bob = sb.find_lead("EmailAddress", email(2))
    assert bob is not None
    warehouse.execute(old_ledger_ddl(warehouse))
    stamp = "2026-01-01 00:00:00"
    warehouse.execute(
        f"INSERT INTO {warehouse.ledger_table} (portal_id, row_key, lead_id, status, attempts, "
        "first_attempt_at, last_attempt_at, registered_at, dag_id, run_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (sb.portal_id, str(i), lead_ids[i], "registered", 1, stamp, stamp, stamp, "old", "old_run")
            for i in (1, 2, 3)
        ],
    )
    assert "lead_identifier" not in columns(warehouse)
    rows = applicants(5)
    rows.append((9, email(2).upper(), "Robert", None))  # a new key for Bob, after his old row
    warehouse.seed(rows)
    calls = sb.register_calls

    summary = transfer(warehouse, sql=ordered(warehouse)).execute(context("r1"))

    assert columns(warehouse)[-4:] == ["lead_identifier", "task_id", "map_index", "execution_id"]
    assert has_identifier_index(warehouse)
    assert sb.register_calls - calls == 2  # applicants 4 and 5
    assert summary["registered"] == 2 and summary["skipped"] == 3 and summary["already_registered"] == 1
    after = sb.find_lead("EmailAddress", email(2))
    assert after is not None and after.registrations == 1 and after.password_sha256 == bob.password_sha256
    ledger = warehouse.ledger()
    assert ledger["9"]["status"] == "already_registered" and ledger["9"]["lead_id"] == bob.lead_id
    assert ledger["2"]["run_id"] == "old_run"  # the old rows are kept, only given their identifier
    found = identifiers(warehouse)
    assert {key: found[key] for key in ("1", "2", "9")} == {
        "1": fingerprint_of(email(1)),
        "2": fingerprint_of(email(2)),
        "9": fingerprint_of(email(2)),
    }
    assert_no_raw_identifier(warehouse, [email(i) for i in range(1, 6)])


def test_runs_migrating_the_same_old_table_at_once_all_succeed(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    warehouse.execute(old_ledger_ddl(warehouse))
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def migrate() -> None:
        ledger = RegistrationLedger(get_db_hook(warehouse.conn_id, "x"), warehouse.ledger_table, sb.portal_id)
        try:
            start.wait()
            ledger.ensure_table()
        except BaseException as error:
            errors.append(error)
        finally:
            ledger.close()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [columns(warehouse).count(name) for name in ADDED_COLUMNS] == [1, 1, 1, 1]
    assert has_identifier_index(warehouse)


@pytest.mark.parametrize("generic_sql", [False, True], ids=["native", "generic-sql"])
def test_the_generic_path_migrates_without_an_index(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], generic_sql: bool
) -> None:
    sb = lsq()
    sqlite_warehouse.execute(old_ledger_ddl(sqlite_warehouse))
    ledger = RegistrationLedger(
        get_db_hook(sqlite_warehouse.conn_id, "x"), sqlite_warehouse.ledger_table, sb.portal_id
    )
    if generic_sql:
        ledger._dialect = "generic"
    ledger.ensure_table()
    ledger.ensure_table()  # idempotent
    ledger.close()
    assert columns(sqlite_warehouse)[-4:] == list(ADDED_COLUMNS)
    assert has_identifier_index(sqlite_warehouse) is not generic_sql
