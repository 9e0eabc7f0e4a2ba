"""The hook's lead APIs against the sandbox: updates keep the portal password, bulk, hosts, refusals."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.exceptions import (
    LeadSquaredConfigError,
    LeadSquaredLeadExistsError,
    LeadSquaredRateLimitError,
    LeadSquaredValidationError,
)
from airflow_provider_lsq.hooks.config import lead_api_url
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from tests.helpers import connect

if TYPE_CHECKING:
    from airflow_provider_lsq.sandbox import Sandbox

PASSWORD = "Samplepassword@123"
REGISTER = "/api/Authentication/v2/Register"


@pytest.fixture
def sandbox(leadsquared_sandbox: Sandbox) -> Sandbox:
    return leadsquared_sandbox


@pytest.fixture
def hook(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> LeadSquaredHook:
    return LeadSquaredHook(connect(monkeypatch, sandbox, rate_limit_storage="memory"))


def registered(hook: LeadSquaredHook, sandbox: Sandbox, email: str = "asha@example.com") -> tuple[str, str]:
    """Register ``email`` through the portal API; return its lead id and password hash."""
    result = hook.register_portal_user({"EmailAddress": email, "FirstName": "Asha"}, PASSWORD)
    lead = sandbox.find_lead("EmailAddress", email)
    assert lead is not None and lead.password_sha256 is not None
    sandbox.reset_calls()
    return result.lead_id, lead.password_sha256


# -- hosts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("portal", "expected"),
    [
        ("https://portalapi.leadsquared.com", "https://api.leadsquared.com"),
        ("https://portalapi-us11.leadsquared.com", "https://api-us11.leadsquared.com"),
        ("https://PortalAPI-IN21.leadsquared.com", "https://api-in21.leadsquared.com"),
        ("https://portalapi-ir31.leadsquared.com:8443", "https://api-ir31.leadsquared.com:8443"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),  # the sandbox serves both
        ("http://portalapi-us11.leadsquared.com", "http://portalapi-us11.leadsquared.com"),  # not https
        ("https://lsq-proxy.example.com/portal", "https://lsq-proxy.example.com/portal"),
    ],
)
def test_lead_api_host_follows_the_portal_hosts_region(portal: str, expected: str) -> None:
    assert lead_api_url(portal) == expected


@pytest.mark.parametrize(
    ("host", "extra", "expected"),
    [
        (None, {}, "https://api.leadsquared.com"),
        ("portalapi-us11.leadsquared.com", {}, "https://api-us11.leadsquared.com"),
        (
            "portalapi-us11.leadsquared.com",
            {"api_host": " api-ca12.leadsquared.com\n"},
            "https://api-ca12.leadsquared.com",
        ),
        ("http://127.0.0.1:9", {"api_host": "http://127.0.0.1:10"}, "http://127.0.0.1:10"),
    ],
)
def test_lead_api_host_from_the_connection(
    monkeypatch: pytest.MonkeyPatch, host: str | None, extra: dict[str, Any], expected: str
) -> None:
    conn = {"conn_type": "leadsquared", "host": host, "login": "ak", "password": "sk", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_HOSTS", json.dumps(conn))
    assert LeadSquaredHook("lsq_hosts").config.lead_api_url == expected


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"bulk_rate_limit_calls": 0}, "bulk_rate_limit_calls"),
        ({"bulk_rate_limit_calls": 2.5}, "bulk_rate_limit_calls"),
        ({"bulk_rate_limit_period_seconds": "soon"}, "bulk_rate_limit_period_seconds"),
        ({"bulk_rate_limit_period_seconds": 0.01}, "bulk_rate_limit_period_seconds"),
        ({"api_host": "api us11.leadsquared.com"}, "api_host"),
    ],
)
def test_lead_api_extras_are_checked_when_read(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], field: str
) -> None:
    conn = {"conn_type": "leadsquared", "login": "ak", "password": "sk", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_EXTRAS", json.dumps(conn))
    with pytest.raises(LeadSquaredConfigError) as err:
        LeadSquaredHook("lsq_extras").config  # noqa: B018
    assert err.value.field == field and field in err.value.message


def test_bulk_window_defaults_to_the_older_docs_one_call_per_5_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = {
        "conn_type": "leadsquared",
        "login": "ak",
        "password": "sk",
        "extra": {"rate_limit_storage": "memory"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_BULK", json.dumps(conn))
    hook = LeadSquaredHook("lsq_bulk")
    budget = hook.bulk_budget
    assert (budget.bulk.policy.cap, budget.bulk.policy.period) == (1, 5.0)
    assert budget.account is hook.rate_limiter and budget.bulk is not hook.rate_limiter
    assert budget.bulk.store is not hook.rate_limiter.store  # another window, another key


# -- fields ----------------------------------------------------------------------------------------


def test_lead_fields_are_fetched_once_per_hook(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    fields = hook.get_lead_fields()
    assert hook.get_lead_fields() is fields
    by_name = {f.schema_name: f for f in fields}
    assert by_name["mx_Intake"].options == ("2026-Fall", "2027-Spring", "2027-Fall")
    assert by_name["mx_PAN_Number"].max_length == 10 and by_name["mx_PAN_Number"].is_lead_identifier
    assert not by_name["FirstName"].is_lead_identifier
    assert len(sandbox.calls_to("LeadsMetaData.Get")) == 1


# -- one lead --------------------------------------------------------------------------------------


def test_an_updated_registered_lead_keeps_its_password(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    lead_id, password_hash = registered(hook, sandbox)
    result = hook.update_lead({"EmailAddress": "asha@example.com", "mx_City": "Pune", "Phone": "555"})
    assert (result.lead_id, result.action, result.attempts) == (lead_id, "updated", 2)
    lead = sandbox.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None
    assert (lead.fields["mx_City"], lead.fields["Phone"]) == ("Pune", "555")
    assert (lead.password_sha256, lead.portal_user, lead.registrations) == (password_hash, True, 1)
    assert [c.path.rsplit("/", 1)[-1] for c in sandbox.calls] == ["Leads.GetByEmailaddress", "Lead.Update"]
    assert sandbox.register_calls == 0


def test_update_with_a_known_lead_id_is_one_call(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    lead_id, password_hash = registered(hook, sandbox)
    result = hook.update_lead(
        {"Phone": "777", "mx_Program": "MBA"}, lead_id=lead_id, identifier_attribute="Phone"
    )
    assert (result.action, result.attempts) == ("updated", 1)
    lead = sandbox.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None and lead.fields["mx_Program"] == "MBA" and lead.password_sha256 == password_hash
    assert len(sandbox.calls_to("Lead.Update")) == 1 and len(sandbox.calls) == 1


def test_update_only_never_creates(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    result = hook.update_lead({"EmailAddress": "nobody@example.com", "FirstName": "No"})
    assert (result.lead_id, result.action) == (None, "not_found")
    assert sandbox.leads == [] and sandbox.calls_to("Lead.Update") == []


def test_update_only_by_another_identifier_needs_the_lead_id(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    with pytest.raises(LeadSquaredValidationError) as err:
        hook.update_lead(
            {"mx_PAN_Number": "ABCDE1234F", "mx_City": "Goa"}, identifier_attribute="mx_PAN_Number"
        )
    assert err.value.field == "mx_PAN_Number" and "lead id" in err.value.message
    assert sandbox.calls == []


def test_upsert_finds_the_lead_by_the_first_unique_identifier(
    hook: LeadSquaredHook, sandbox: Sandbox
) -> None:
    lead_id, password_hash = registered(hook, sandbox)
    hook.update_lead({"EmailAddress": "asha@example.com", "mx_PAN_Number": "ABCDE1234F"})
    created = hook.create_or_update_lead({"EmailAddress": "ravi@example.com", "FirstName": "Ravi"})
    assert created.action == "created" and created.lead_id != lead_id
    # A new email, found by the PAN named as the identifier: Asha's lead gets it, no new lead.
    updated = hook.create_or_update_lead(
        {"EmailAddress": "asha.new@example.com", "mx_PAN_Number": "ABCDE1234F"},
        identifier_attribute="mx_PAN_Number",
    )
    assert (updated.lead_id, updated.action) == (lead_id, "updated")
    lead = sandbox.find_lead("mx_PAN_Number", "ABCDE1234F")
    assert lead is not None and lead.fields["EmailAddress"] == "asha.new@example.com"
    assert lead.password_sha256 == password_hash and len(sandbox.leads) == 2


def test_null_values_never_blank_a_field_unless_asked(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    sandbox.add_lead({"EmailAddress": "b@example.com", "mx_City": "Pune", "FirstName": "Bo"})
    hook.create_or_update_lead({"EmailAddress": "b@example.com", "mx_City": None, "FirstName": float("nan")})
    lead = sandbox.find_lead("EmailAddress", "b@example.com")
    assert lead is not None and (lead.fields["mx_City"], lead.fields["FirstName"]) == ("Pune", "Bo")
    hook.create_or_update_lead({"EmailAddress": "b@example.com", "mx_City": None}, blank={"mx_City"})
    lead = sandbox.find_lead("EmailAddress", "b@example.com")
    assert lead is not None and lead.fields["mx_City"] == ""


def test_create_only_leaves_an_existing_lead_as_it_is(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    lead_id, password_hash = registered(hook, sandbox)
    existing = hook.create_lead({"EmailAddress": "asha@example.com", "FirstName": "Changed"})
    assert (existing.lead_id, existing.action) == (lead_id, "exists")
    lead = sandbox.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None and lead.fields["FirstName"] == "Asha" and lead.password_sha256 == password_hash
    new = hook.create_lead({"EmailAddress": "new@example.com"})
    assert new.action == "created" and sandbox.find_lead("EmailAddress", "new@example.com") is not None


def test_another_leads_unique_value_is_this_rows_failure(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    sandbox.add_lead({"EmailAddress": "sibling@example.com", "Mobile": "900"})
    with pytest.raises(LeadSquaredLeadExistsError) as err:
        hook.create_or_update_lead({"EmailAddress": "me@example.com", "Mobile": "900"})
    assert err.value.exception_type == "MXDuplicateEntryException" and err.value.attempts == 1


@pytest.mark.parametrize(
    "attribute", ["mx_Portal_Password", "mx_Portal_Confirm_Password", "MX_PORTAL_Anything"]
)
@pytest.mark.parametrize("method", ["create_or_update_lead", "create_lead", "update_lead", "bulk"])
def test_portal_fields_are_refused_before_any_call(
    hook: LeadSquaredHook, sandbox: Sandbox, attribute: str, method: str
) -> None:
    lead = {"EmailAddress": "asha@example.com", attribute: "Other@123"}
    with pytest.raises(LeadSquaredValidationError) as err:
        if method == "bulk":
            hook.bulk_create_or_update_leads([{"EmailAddress": "ok@example.com"}, lead])
        else:
            getattr(hook, method)(lead)
    assert err.value.field == attribute and attribute in err.value.message
    assert "Other@123" not in err.value.message
    assert sandbox.calls == []


# -- bulk ------------------------------------------------------------------------------------------


def test_bulk_of_more_than_25_is_refused_before_any_call(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    leads = [{"EmailAddress": f"s{i}@example.com"} for i in range(26)]
    with pytest.raises(LeadSquaredValidationError) as err:
        hook.bulk_create_or_update_leads(leads)
    assert "at most 25" in err.value.message
    assert sandbox.calls == [] and sandbox.leads == []


def test_bulk_gives_each_lead_its_result(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    lead_id, password_hash = registered(hook, sandbox)
    sandbox.add_lead({"EmailAddress": "sibling@example.com", "Mobile": "900"})
    results = hook.bulk_create_or_update_leads(
        [
            {"EmailAddress": "asha@example.com", "mx_City": "Pune"},
            {"EmailAddress": "new@example.com", "FirstName": "New"},
            {"EmailAddress": "dup@example.com", "Mobile": "900"},
            {"EmailAddress": "bad@example.com", "mx_City": ["not", "text"]},
            {"EmailAddress": "typo@example.com", "mx_Cty": "Goa"},
        ]
    )
    assert [(r.index, r.action) for r in results] == [
        (0, "updated"),
        (1, "created"),
        (2, "failed"),
        (3, "invalid"),
        (4, "failed"),
    ]
    assert results[0].lead_id == lead_id and results[1].lead_id
    assert results[2].error_type == "MXDuplicateEntryException" and not results[2].retryable
    assert results[3].error_type == "ValidationError" and "mx_City" in (results[3].message or "")
    assert results[4].message == "Attribute(s) does not exist - mx_Cty"
    assert len(sandbox.calls) == 1 and sandbox.calls[0].path.endswith("Lead/Bulk/CreateOrUpdate")
    lead = sandbox.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None and lead.fields["mx_City"] == "Pune" and lead.password_sha256 == password_hash
    assert sandbox.find_lead("EmailAddress", "bad@example.com") is None  # invalid: never sent


def test_bulk_with_every_lead_invalid_makes_no_call(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    results = hook.bulk_create_or_update_leads([{"FirstName": "no identifier"}])
    assert [r.action for r in results] == ["invalid"] and sandbox.calls == []


@pytest.mark.leadsquared_sandbox(bulk_rate_limit_calls=1, bulk_rate_limit_period=60.0, rate_limit_period=60.0)
def test_a_bulk_call_holds_both_windows_and_a_refusal_pauses_only_its_own(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection claims 3 bulk calls a minute; the account allows 1: the second is refused.
    conn_id = connect(
        monkeypatch,
        sandbox,
        rate_limit_storage="memory",
        rate_limit_reserve=0,
        bulk_rate_limit_calls=3,
        bulk_rate_limit_period_seconds=60,
        max_retries=0,
    )
    hook = LeadSquaredHook(conn_id)
    hook.bulk_create_or_update_leads([{"EmailAddress": "a@example.com"}])
    budget = hook.bulk_budget
    assert budget.bulk.store.snapshot()["live_leases"] == 1
    assert budget.account.store.snapshot()["live_leases"] == 1
    with pytest.raises(LeadSquaredRateLimitError):
        hook.bulk_create_or_update_leads([{"EmailAddress": "b@example.com"}])
    assert sandbox.bulk_refusals == 1
    assert budget.bulk.store.snapshot()["paused_for"] > 0
    assert budget.account.store.snapshot()["paused_for"] == 0
    assert hook.create_or_update_lead({"EmailAddress": "c@example.com"}).action == "created"


def test_get_lead_by_email(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    assert hook.get_lead_by_email("nobody@example.com") is None
    lead_id, _ = registered(hook, sandbox)
    found = hook.get_lead_by_email("ASHA@example.com")
    assert found is not None and found["ProspectID"] == lead_id and found["FirstName"] == "Asha"


def test_lead_calls_are_retried_through_gateway_faults(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    sandbox.inject(503, 502, path="/v2/LeadManagement.svc/Lead.CreateOrUpdate")
    result = hook.create_or_update_lead({"EmailAddress": "r@example.com"})
    assert (result.action, result.attempts) == ("created", 3)
    assert [c.outcome for c in sandbox.calls_to("Lead.CreateOrUpdate")] == ["fault", "fault", "ok"]
