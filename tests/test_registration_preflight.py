"""The registration operators' preflight (``preflight=True``): the account's lead fields checked once
before any Register call; an account whose key may not read them registers unchecked, with a WARNING."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from airflow_provider_lsq.version_compat import AirflowFailException
from tests import test_lead_sync
from tests.test_lead_sync import METADATA, seed
from tests.test_transfer_sql import REGISTER, Warehouse, context, email, transfer

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

lsq = test_lead_sync.lsq  # the fixtures: a fast sandbox, a SQLite warehouse
sqlite_warehouse = test_lead_sync.sqlite_warehouse


def test_a_misspelled_column_stops_the_registration_before_any_register_call(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    seed(sqlite_warehouse, [(i, email(i), f"First{i}", "BSc", "Pune", None) for i in range(1, 4)])
    sql = (
        'SELECT applicant_id, email AS "EmailAddress", program AS "mx_Programme" '
        f"FROM {sqlite_warehouse.table('applicants')}"
    )
    with pytest.raises(AirflowFailException) as info:
        transfer(sqlite_warehouse, sql=sql, preflight=True).execute(context())
    assert "'mx_Programme'" in str(info.value) and "'mx_Program'" in str(info.value)
    assert [c.path for c in sb.calls] == [METADATA]  # no token fetch, no Register
    assert sb.register_calls == 0


def test_a_value_its_field_cannot_hold_makes_only_its_lead_invalid(
    lsq: Callable[..., Sandbox], airflow_db: Any
) -> None:
    sb = lsq()
    leads = [
        {"EmailAddress": email(1), "mx_Intake": "2026-Fall"},
        {"EmailAddress": email(2), "mx_Intake": "2026-Autumn"},  # not one of the dropdown's options
    ]
    op = RegisterPortalUserOperator(task_id="r", leads=leads, preflight=True, max_failure_ratio=0.5)
    summary = op.execute(context())
    assert summary["registered"] == 1 and summary["invalid"] == 1
    assert sb.register_calls == 1
    assert sb.find_lead("EmailAddress", email(2)) is None


def test_an_account_that_may_not_read_its_fields_registers_unchecked(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    sb = lsq(conn_extra={"max_retries": 0})
    sb.inject(503, path=METADATA)
    seed(sqlite_warehouse, [(i, email(i), f"First{i}", "BSc", "Pune", None) for i in range(1, 4)])
    summary = transfer(sqlite_warehouse, preflight=True).execute(context())
    assert summary["registered"] == 3
    assert "Preflight skipped" in task_log()
    assert sum(1 for c in sb.calls if c.path == REGISTER) == 3


def test_registration_without_preflight_makes_no_metadata_call(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq()
    seed(sqlite_warehouse, [(i, email(i), f"First{i}", "BSc", "Pune", None) for i in range(1, 3)])
    assert transfer(sqlite_warehouse).execute(context())["registered"] == 2
    assert not any(c.path.startswith(METADATA) for c in sb.calls)
