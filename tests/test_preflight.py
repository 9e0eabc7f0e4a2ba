"""Preflight against the sandbox account's lead fields: columns stopped before any call, rows judged."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.lead_fields import LeadField, parse_lead_fields
from airflow_provider_lsq.preflight import LeadSquaredPreflightError, Preflight
from airflow_provider_lsq.sandbox import SandboxField
from tests.helpers import connect

if TYPE_CHECKING:
    from airflow_provider_lsq.sandbox import Sandbox


@pytest.fixture
def hook(leadsquared_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> LeadSquaredHook:
    return LeadSquaredHook(connect(monkeypatch, leadsquared_sandbox, rate_limit_storage="memory"))


@pytest.fixture
def preflight(hook: LeadSquaredHook) -> Preflight:
    return Preflight.from_hook(hook)


def test_a_misspelled_column_is_stopped_before_any_lead_call(
    hook: LeadSquaredHook, leadsquared_sandbox: Sandbox
) -> None:
    columns = ["EmailAddress", "FirstName", "mx_Progam", "mx_city"]
    with pytest.raises(LeadSquaredPreflightError) as err:
        Preflight.from_hook(hook).require_columns(columns)
    problems = {p.column: p for p in err.value.problems}
    assert set(problems) == {"mx_Progam", "mx_city"}
    assert problems["mx_Progam"].closest == "mx_Program"
    assert problems["mx_city"].closest == "mx_City" and "spells" in problems["mx_city"].problem
    assert err.value.field == "mx_Progam"
    assert "did you mean 'mx_Program'?" in err.value.message
    # The one call made was the field list: no lead was sent, none created.
    assert [c.path.rsplit("/", 1)[-1] for c in leadsquared_sandbox.calls] == ["LeadsMetaData.Get"]
    assert leadsquared_sandbox.leads == []


def test_a_display_name_leads_to_its_schema_name(preflight: Preflight) -> None:
    (problem,) = preflight.check_columns(["EmailAddress", "Application Number"])
    assert problem.closest == "mx_Application_Number"
    (problem,) = preflight.check_columns(["EmailAddress", "mx_Shoe_Size"])
    assert problem.closest is None and "no such lead field" in problem.problem


def test_good_columns_pass(preflight: Preflight) -> None:
    assert preflight.check_columns(["EmailAddress", "FirstName", "mx_Program", "mx_Intake"]) == []
    assert preflight.check_columns(["mx_PAN_Number", "FirstName"], identifier_attribute="mx_PAN_Number") == []


def test_the_identifier_must_be_unique_on_the_account(
    leadsquared_sandbox_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An account that has unmarked Phone as unique, and a custom unique student id.
    sb = leadsquared_sandbox_factory(
        lead_fields=(
            SandboxField("EmailAddress", "Email", "Email", is_lead_identifier=True),
            SandboxField("Phone", "Phone Number", "Phone"),
            SandboxField("mx_Student_Id", "Student Id", is_lead_identifier=True),
            SandboxField("mx_City", "City"),
        )
    )
    preflight = Preflight.from_hook(LeadSquaredHook(connect(monkeypatch, sb, rate_limit_storage="memory")))
    (phone,) = preflight.check_columns(["Phone", "mx_City"])
    assert phone.column == "Phone" and "not unique" in phone.problem
    assert "EmailAddress, mx_Student_Id" in phone.problem
    (city,) = preflight.check_columns(["mx_City"], identifier_attribute="mx_City")
    assert "not unique" in city.problem
    (none,) = preflight.check_columns(["mx_City"])
    assert "no column is a unique field" in none.problem
    assert preflight.check_columns(["mx_Student_Id", "mx_City"]) == []  # a custom unique column
    (missing,) = preflight.check_columns(["EmailAddress"], identifier_attribute="mx_Student_Id")
    assert missing.column == "mx_Student_Id" and "not among the columns" in missing.problem


def test_portal_fields_are_a_column_problem_for_the_lead_api_only(preflight: Preflight) -> None:
    (problem,) = preflight.check_columns(["EmailAddress", "mx_Portal_Password"])
    assert problem.column == "mx_Portal_Password" and "never sent through the lead API" in problem.problem
    assert preflight.check_columns(["EmailAddress", "mx_Portal_Password"], lead_api=False) == []


def test_mandatory_fields_need_a_column_and_a_value_when_creating(
    leadsquared_sandbox_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = leadsquared_sandbox_factory(
        lead_fields=(
            SandboxField("EmailAddress", data_type="Email", is_lead_identifier=True),
            SandboxField("LastName", "Last Name", is_mandatory=True),
        )
    )
    preflight = Preflight.from_hook(LeadSquaredHook(connect(monkeypatch, sb, rate_limit_storage="memory")))
    assert preflight.check_columns(["EmailAddress"]) == []  # updating: not needed
    (problem,) = preflight.check_columns(["EmailAddress"], creating=True)
    assert problem.column == "LastName" and "mandatory" in problem.problem
    assert preflight.check_lead({"EmailAddress": "a@example.com", "LastName": None}, creating=True) == [
        "field 'LastName': mandatory to create a lead, and empty"
    ]
    assert preflight.check_lead({"EmailAddress": "a@example.com", "LastName": None}) == []


def test_values_that_break_a_rule_make_only_their_row_invalid(preflight: Preflight) -> None:
    rows = [
        {
            "EmailAddress": "asha@example.com",
            "mx_Intake": "2027-Fall",
            "mx_Date_Of_Birth": dt.date(2008, 2, 29),
        },
        {"EmailAddress": "ravi@example.com", "mx_Intake": "2027-Fal"},
        {"EmailAddress": "not-an-address", "mx_PAN_Number": "ABCDE12345X"},
        {"EmailAddress": "lia@example.com", "mx_Date_Of_Birth": "29/02/2008", "mx_City": None},
        {"EmailAddress": "kim@example.com", "Phone": "call me"},
    ]
    results = [preflight.check_lead(row) for row in rows]
    assert results[0] == []
    assert results[1] == [
        "field 'mx_Intake': '2027-Fal' is not one of the dropdown's options "
        "(2026-Fall, 2027-Spring, 2027-Fall) (did you mean '2027-Fall'?)"
    ]
    assert results[2] == [
        "field 'EmailAddress': not an e-mail address (Email)",
        "field 'mx_PAN_Number': 11 characters, more than the 10 the account allows (MaxLength)",
    ]
    assert results[3] == ["field 'mx_Date_Of_Birth': not a date (Date: YYYY-MM-DD or YYYY-MM-DD HH:MM:SS)"]
    assert results[4] == ["field 'Phone': not a phone number (Phone)"]
    assert preflight.lead_problem(rows[0]) is None
    assert preflight.lead_problem(rows[2]) == "; ".join(results[2])


def test_the_sandbox_refuses_what_preflight_flags(
    hook: LeadSquaredHook, leadsquared_sandbox: Sandbox
) -> None:
    """Preflight and the account agree: a row it flags is one the API would refuse."""
    from airflow_provider_lsq.exceptions import LeadSquaredAPIError

    row = {"EmailAddress": "ravi@example.com", "mx_Intake": "2027-Fal"}
    assert Preflight.from_hook(hook).check_lead(row)
    with pytest.raises(LeadSquaredAPIError) as err:
        hook.create_or_update_lead(row)
    assert "mx_Intake" in err.value.message


def test_metadata_in_its_documented_variations_is_read() -> None:
    fields = parse_lead_fields(
        [
            {
                "SchemaName": "Phone",
                "DataType": "Phone",
                "MaxLength": "10",
                "IsLeadIdentifier": True,
                "LockAfterCreate": 1,
            },
            {
                "SchemaName": "mx_Stage",
                "DataType": "Select",
                "Options": [{"Value": "New"}, "Won"],
                "MaxLength": 50,
            },
            {"SchemaName": "mx_Notes", "MaxLength": None, "Options": None, "IsMandatory": "true"},
            {"DisplayName": "no schema name: skipped"},
        ]
    )
    assert fields == (
        LeadField("Phone", "Phone", "Phone", max_length=10, is_lead_identifier=True, lock_after_create=True),
        LeadField("mx_Stage", "mx_Stage", "Select", max_length=50, options=("New", "Won")),
        LeadField("mx_Notes", "mx_Notes", "String", is_mandatory=True),
    )
