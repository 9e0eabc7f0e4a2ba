"""SqlToLeadSquaredLeadOperator over real HTTP (the sandbox) and real SQLite and PostgreSQL warehouses.

The lead-update transfer: updates never touch a portal password, unchanged rows make no call, the
run's columns are checked against the account before any call, NULLs never blank a field unless
asked, a bulk answer's per-record results reach their rows, update-only never creates, and a stop
records every outcome it finished.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.transfers.ledger.lead_sync import fields_fingerprint
from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator
from airflow_provider_lsq.transfers.sql_to_leadsquared_leads import SqlToLeadSquaredLeadOperator
from airflow_provider_lsq.version_compat import AirflowException, AirflowFailException
from tests.test_transfer_sql import FAST, Warehouse, context, email, make_warehouse

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

LEAD_API = "/v2/LeadManagement.svc/"
UPDATE = LEAD_API + "Lead.Update"
BULK = LEAD_API + "Lead/Bulk/CreateOrUpdate"
METADATA = LEAD_API + "LeadsMetaData.Get"
GET_BY_EMAIL = LEAD_API + "Leads.GetByEmailaddress"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    return make_warehouse(request.param, request, tmp_path, monkeypatch)


@pytest.fixture
def sqlite_warehouse(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Warehouse:
    return make_warehouse("sqlite", request, tmp_path, monkeypatch)


@pytest.fixture
def lsq(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Sandbox]:
    def make(conn_extra: dict[str, Any] | None = None, **kwargs: Any) -> Sandbox:
        sb = leadsquared_sandbox_factory(**{**FAST, **kwargs})
        conn = json.loads(sb.connection_json())
        conn["extra"].update({"retry_wait_seconds": 0.01, **(conn_extra or {})})
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
        return sb

    return make


def seed(wh: Warehouse, rows: list[tuple[Any, ...]]) -> None:
    """applicants(applicant_id, email, first_name, program, city, phone)."""
    wh.execute(
        f"CREATE TABLE {wh.table('applicants')} (applicant_id INTEGER, email TEXT, first_name TEXT, "
        "program TEXT, city TEXT, phone TEXT)"
    )
    wh.execute(f"INSERT INTO {wh.table('applicants')} VALUES (?, ?, ?, ?, ?, ?)", rows)


def people(n: int) -> list[tuple[Any, ...]]:
    return [(i, email(i), f"First{i}", "BSc Physics", "Pune", None) for i in range(1, n + 1)]


SELECT = (
    'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstName", '
    'program AS "mx_Program", city AS "mx_City"'
)


def lead_sql(wh: Warehouse, columns: str = SELECT) -> str:
    return f"{columns} FROM {wh.table('applicants')} ORDER BY applicant_id"


def sync(wh: Warehouse, **kwargs: Any) -> SqlToLeadSquaredLeadOperator:
    options: dict[str, Any] = {
        "task_id": "sync_leads",
        "sql": lead_sql(wh),
        "sql_conn_id": wh.conn_id,
        "key_column": "applicant_id",
        "ledger_table": wh.table("lsq_lead_sync_ledger"),
        "registration_ledger_table": wh.table("lsq_portal_registrations"),
        "batch_size": 10,
    }
    options.update(kwargs)
    return SqlToLeadSquaredLeadOperator(**options)


def register(wh: Warehouse) -> dict[str, Any]:
    return SqlToLeadSquaredPortalOperator(
        task_id="register",
        sql=f'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstName" '
        f"FROM {wh.table('applicants')}",
        sql_conn_id=wh.conn_id,
        key_column="applicant_id",
        ledger_table=wh.table("lsq_portal_registrations"),
        batch_size=10,
    ).execute(context("register__1"))


def lead_ledger(wh: Warehouse) -> dict[str, dict[str, Any]]:
    names = ("status", "lead_id", "fields_fingerprint", "error_type", "retryable", "synced_at")
    rows = wh.query(f"SELECT row_key, {', '.join(names)} FROM {wh.table('lsq_lead_sync_ledger')}")
    return {str(row[0]): dict(zip(names, row[1:], strict=True)) for row in rows}


def calls(sb: Sandbox, path: str) -> int:
    return sum(1 for call in sb.calls if call.path.split("?")[0] == path)


def lead_calls(sb: Sandbox) -> list[str]:
    """The lead-API calls made (paths), the fields' metadata read left out."""
    return [c.path for c in sb.calls if c.path.startswith(LEAD_API) and not c.path.startswith(METADATA)]


# -- passwords, and changed rows only ----------------------------------------------------------------


def test_an_update_keeps_the_portal_password_and_only_changed_rows_make_a_call(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    seed(warehouse, people(6))
    assert register(warehouse)["registered"] == 6
    before = {i: sb.find_lead("EmailAddress", email(i)) for i in range(1, 7)}
    hashes = {i: (lead.password_sha256, lead.registrations) for i, lead in before.items() if lead}
    assert len(hashes) == 6 and all(h for h, _ in hashes.values())
    register_calls = sb.register_calls

    first = sync(warehouse).execute(context("sync__1"))
    assert first["updated"] == 6 and first["unchanged"] == 0 and first["failed"] == 0
    # Lead ids came from the registration ledger: no lookup by e-mail, one Lead.Update per row.
    assert calls(sb, GET_BY_EMAIL) == 0 and calls(sb, UPDATE) == 6

    warehouse.execute(
        f"UPDATE {warehouse.table('applicants')} SET program = 'MSc Data' WHERE applicant_id <= 2"
    )
    made = len(lead_calls(sb))
    second = sync(warehouse).execute(context("sync__2"))
    assert second["updated"] == 2 and second["unchanged"] == 4
    assert len(lead_calls(sb)) == made + 2  # none for the unchanged rows

    third = sync(warehouse).execute(context("sync__3"))
    assert third["unchanged"] == 6 and third["updated"] == 0
    assert len(lead_calls(sb)) == made + 2

    for i in range(1, 7):
        lead = sb.find_lead("EmailAddress", email(i))
        assert lead is not None
        assert (lead.password_sha256, lead.registrations) == hashes[i], i  # the password is untouched
        assert lead.fields["mx_Program"] == ("MSc Data" if i <= 2 else "BSc Physics")
    assert sb.register_calls == register_calls
    ledger = lead_ledger(warehouse)
    assert {row["status"] for row in ledger.values()} == {"updated"}
    assert ledger["1"]["lead_id"] == before[1].lead_id  # type: ignore[union-attr]
    expected = fields_fingerprint(
        [
            {"Attribute": "EmailAddress", "Value": email(3)},
            {"Attribute": "FirstName", "Value": "First3"},
            {"Attribute": "mx_Program", "Value": "BSc Physics"},
            {"Attribute": "mx_City", "Value": "Pune"},
        ]
    )
    assert ledger["3"]["fields_fingerprint"] == expected
    # The ledger holds no lead value: a fingerprint, not the fields.
    cells = [
        str(cell)
        for row in warehouse.query(f"SELECT * FROM {warehouse.table('lsq_lead_sync_ledger')}")
        for cell in row
    ]
    assert not any("Physics" in cell or "@" in cell for cell in cells)


# -- checked before any call ---------------------------------------------------------------------------


def test_a_misspelled_column_stops_the_run_before_any_row_is_sent(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    seed(warehouse, people(3))
    columns = 'SELECT applicant_id, email AS "EmailAddress", first_name AS "FirstNme"'
    with pytest.raises(AirflowFailException) as info:
        sync(warehouse, sql=lead_sql(warehouse, columns)).execute(context())
    message = str(info.value)
    assert "'FirstNme'" in message and "'FirstName'" in message
    assert lead_calls(sb) == []  # the one call made read the account's fields
    assert calls(sb, METADATA) == 1
    assert lead_ledger(warehouse) == {}


def test_a_portal_column_is_refused_before_any_call(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    seed(sqlite_warehouse, people(3))
    columns = SELECT + ', first_name AS "mx_Portal_Password"'
    with pytest.raises(AirflowFailException, match="mx_Portal_Password"):
        sync(sqlite_warehouse, sql=lead_sql(sqlite_warehouse, columns)).execute(context())
    assert sb.calls == []  # not even the account's fields


def test_a_value_its_field_cannot_hold_makes_only_its_row_invalid(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    for i in range(1, 4):
        sb.add_lead({"EmailAddress": email(i), "FirstName": "Old"})
    rows = people(3)
    rows[1] = (2, email(2), "x" * 101, "BSc", "Pune", None)  # FirstName takes 100 characters
    seed(sqlite_warehouse, rows)
    summary = sync(sqlite_warehouse, max_failure_ratio=0.5).execute(context())
    assert summary["invalid"] == 1 and summary["updated"] == 2
    ledger = lead_ledger(sqlite_warehouse)
    assert ledger["2"]["status"] == "invalid"
    assert sb.find_lead("EmailAddress", email(2)).fields["FirstName"] == "Old"  # type: ignore[union-attr]


def test_a_keyless_row_is_invalid_and_a_repeated_key_is_sent_once_naming_the_row(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    """The same key rules as registration (one reader for both transfers): a row with no key cannot be
    recorded, so it is invalid and named by its position; a key twice is one row, sent once."""
    sb = lsq()
    for i in (1, 2):
        sb.add_lead({"EmailAddress": email(i), "FirstName": "Old"})
    rows = people(2)
    rows.insert(1, (None, email(3), "NoKey", "BSc", "Pune", None))  # the query's row #2
    rows.append((2, email(2), "Again", "BSc", "Pune", None))
    seed(sqlite_warehouse, rows)
    sql = f"{SELECT} FROM {sqlite_warehouse.table('applicants')}"  # in the order seeded
    summary = sync(sqlite_warehouse, sql=sql, mode="update", max_failure_ratio=0.5).execute(context())
    assert summary["updated"] == 2 and summary["invalid"] == 1 and summary["duplicates"] == 1
    log = task_log()
    assert "Row #2 of the query has no applicant_id: not sent." in log
    assert "Row key 2 appears more than once in the query: sent once." in log
    assert sb.find_lead("EmailAddress", email(2)).fields["FirstName"] == "First2"  # type: ignore[union-attr]
    assert sb.find_lead("EmailAddress", email(3)) is None


def test_a_connection_refused_when_read_fails_the_lead_update_without_airflow_retries(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for registration: a connection value no retry can fix is AirflowFailException, not a
    LeadSquaredConfigError that Airflow retried."""
    sb = lsq()
    seed(sqlite_warehouse, people(2))
    conn = json.loads(sb.connection_json())
    for extra in ('{"portal_id": "sandbox-portal",}', {**conn["extra"], "portal_id": "sandbox portal"}):
        monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps({**conn, "extra": extra}))
        with pytest.raises(AirflowFailException, match=r"'leadsquared_default': field '(extra|portal_id)'"):
            sync(sqlite_warehouse).execute(context())
    assert sb.calls == []


# -- NULLs ---------------------------------------------------------------------------------------------


def test_a_null_never_blanks_a_field_unless_asked(warehouse: Warehouse, lsq: Callable[..., Sandbox]) -> None:
    sb = lsq()
    sb.add_lead({"EmailAddress": email(1), "FirstName": "Ann", "mx_City": "Pune", "mx_Program": "BSc"})
    seed(warehouse, [(1, email(1), "Anne", None, None, None)])

    assert sync(warehouse).execute(context("a"))["updated"] == 1
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None
    assert lead.fields["FirstName"] == "Anne"
    assert lead.fields["mx_City"] == "Pune" and lead.fields["mx_Program"] == "BSc"  # NULL: left as it was

    # Asked for one field: that one is blanked, the other NULL still left alone. The fields sent
    # differ (an empty mx_City), so the row is sent again.
    summary = sync(warehouse, blank_null_fields=["mx_City"]).execute(context("b"))
    assert summary["updated"] == 1
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None
    assert lead.fields["mx_City"] == "" and lead.fields["mx_Program"] == "BSc"


# -- modes ---------------------------------------------------------------------------------------------


def test_update_only_never_creates_a_lead(warehouse: Warehouse, lsq: Callable[..., Sandbox]) -> None:
    sb = lsq()
    sb.add_lead({"EmailAddress": email(1), "FirstName": "Old"})
    seed(warehouse, people(3))
    summary = sync(warehouse, mode="update").execute(context())
    assert summary["updated"] == 1 and summary["not_found"] == 2 and summary["created"] == 0
    assert sb.find_lead("EmailAddress", email(2)) is None and sb.find_lead("EmailAddress", email(3)) is None
    assert calls(sb, UPDATE) == 1
    ledger = lead_ledger(warehouse)
    assert ledger["2"]["status"] == ledger["3"]["status"] == "not_found"
    assert ledger["2"]["lead_id"] is None


def test_two_rows_of_one_lead_make_one_update_and_the_other_is_a_duplicate(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Two applicants sharing an email are one lead: the first row's fields are sent, the second is
    counted a duplicate and not sent, so it does not overwrite the first one's fields on that lead."""
    sb = lsq()
    sb.add_lead({"EmailAddress": email(1), "FirstName": "Old"})
    rows = people(2)
    rows[1] = (2, email(1), "Other", "MBA", "Mumbai", None)  # applicant 2 shares applicant 1's email
    seed(warehouse, rows)
    summary = sync(warehouse, mode="update").execute(context())
    assert summary["updated"] == 1 and summary["duplicates"] == 1 and summary["duplicate_leads"] == 1
    assert calls(sb, UPDATE) == 1
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None and lead.fields["FirstName"] == "First1"
    assert set(lead_ledger(warehouse)) == {"1"}  # the duplicate row is not recorded this run
    again = sync(warehouse, mode="update").execute(context())  # row 1 unchanged still holds the lead
    assert again["unchanged"] == 1 and again["duplicate_leads"] == 1 and calls(sb, UPDATE) == 1
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None and lead.fields["FirstName"] == "First1"


def test_upsert_sends_bulk_calls_and_a_record_refused_reaches_only_its_row(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(bulk_rate_limit_calls=50, bulk_rate_limit_period=1.0)
    sb.add_lead({"EmailAddress": "someone.else@example.edu", "Phone": "+91-9000000007"})
    rows = [(i, email(i), f"First{i}", "BSc", "Pune", None) for i in range(1, 31)]
    rows[6] = (7, email(7), "First7", "BSc", "Pune", "+91-9000000007")  # another lead's unique phone
    seed(warehouse, rows)
    columns = SELECT + ', phone AS "Phone"'
    summary = sync(warehouse, mode="upsert", sql=lead_sql(warehouse, columns), max_failure_ratio=0.1).execute(
        context()
    )
    assert summary["created"] == 29 and summary["failed"] == 1
    assert calls(sb, BULK) == 2  # 25 + 5 records
    assert calls(sb, UPDATE) == 0
    ledger = lead_ledger(warehouse)
    assert ledger["7"]["status"] == "failed" and ledger["7"]["error_type"] == "MXDuplicateEntryException"
    assert all(ledger[str(i)]["status"] == "created" for i in range(1, 31) if i != 7)
    assert ledger["8"]["lead_id"] == sb.find_lead("EmailAddress", email(8)).lead_id  # type: ignore[union-attr]
    assert sb.find_lead("EmailAddress", email(7)) is None

    again = sync(warehouse, mode="upsert", sql=lead_sql(warehouse, columns), max_failure_ratio=0.1).execute(
        context("again")
    )
    assert again["unchanged"] == 29 and again["skipped_failed"] == 1
    assert calls(sb, BULK) == 2  # refused for good with the same fields: not sent again


def test_a_dry_run_previews_what_would_be_sent_and_sends_nothing(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    rows = people(4)
    rows[3] = (4, email(4), "First4", "BSc", "Pune", None)
    seed(sqlite_warehouse, rows)
    for i in (1, 2):
        sb.add_lead({"EmailAddress": email(i)})
    assert sync(sqlite_warehouse).execute(context("real"))["updated"] == 2
    sqlite_warehouse.execute(
        f"UPDATE {sqlite_warehouse.table('applicants')} SET first_name = 'New' WHERE applicant_id = 1"
    )
    made = len(sb.calls)
    preview = sync(sqlite_warehouse, dry_run=True).execute(context("dry"))
    assert preview["dry_run"] is True
    assert preview["unchanged"] == 1  # applicant 2
    assert preview["would_update"] == 3 and preview["valid"] == 3  # 1 changed, 3 and 4 not found before
    assert [c.path for c in sb.calls[made:]] == [METADATA]  # the preflight's read only


# -- stops ---------------------------------------------------------------------------------------------


def test_a_stop_records_every_outcome_it_finished(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(latency=0.05)
    n = 60
    for i in range(1, n + 1):
        sb.add_lead({"EmailAddress": email(i)})
    seed(sqlite_warehouse, people(n))
    op = sync(sqlite_warehouse, max_workers=2, flush_interval_seconds=0.5)

    def stop_midway() -> None:
        deadline = time.monotonic() + 30
        while calls(sb, GET_BY_EMAIL) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        op.on_kill()

    # execute() on the main thread, as in a task process (Airflow 2.11's execute() guard keeps
    # thread-local state set up on the main thread); the stop comes from another thread.
    stopper = threading.Thread(target=stop_midway)
    stopper.start()
    with pytest.raises(AirflowException, match="on_kill"):
        op.execute(context())
    stopper.join(30)
    assert not stopper.is_alive()
    ledger = lead_ledger(sqlite_warehouse)
    updated = {key for key, row in ledger.items() if row["status"] == "updated"}
    assert 0 < len(updated) < n
    assert len(updated) == calls(sb, UPDATE)  # every update made is recorded
    assert not any(row["status"] == "pending" for row in ledger.values())
    for key in updated:
        assert sb.find_lead("EmailAddress", email(int(key))).fields["mx_Program"] == "BSc Physics"  # type: ignore[union-attr]

    summary = sync(sqlite_warehouse).execute(context("next"))  # the next run sends the rest, only
    assert summary["unchanged"] == len(updated) and summary["updated"] == n - len(updated)
