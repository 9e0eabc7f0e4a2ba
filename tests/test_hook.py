"""LeadSquaredHook against the sandbox over real HTTP: auth flow, errors, retries, secrets."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import pytest

from airflow_provider_lsq.exceptions import (
    LeadSquaredAPIError,
    LeadSquaredAuthenticationError,
    LeadSquaredLeadExistsError,
    LeadSquaredRateLimitError,
    LeadSquaredTransientError,
    LeadSquaredValidationError,
)
from airflow_provider_lsq.hooks.leadsquared import (
    PUBLIC_TOKEN_PATH,
    REGISTER_PATH,
    REGISTER_TOKEN_PATH,
    LeadSquaredHook,
)
from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.sandbox import Sandbox
from tests.helpers import (
    NASTY_ACCESS_KEY,
    NASTY_SECRET_KEY,
    assert_no_secret,
    calls_to,
    connect,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

PASSWORD = "Samplepassword@123"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(
        access_key=NASTY_ACCESS_KEY, secret_key=NASTY_SECRET_KEY, rate_limit_calls=100, rate_limit_period=1.0
    ) as sb:
        yield sb


@pytest.fixture
def hook(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> LeadSquaredHook:
    return LeadSquaredHook(connect(monkeypatch, sandbox, max_retries=3))


def test_constructor_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_NOWHERE", raising=False)
    hook = LeadSquaredHook("nowhere")  # the connection does not even exist: nothing is read yet
    assert hook.leadsquared_conn_id == "nowhere"


def test_registers_with_keys_that_need_encoding(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    result = hook.register_portal_user({"EmailAddress": "asha@example.com", "FirstName": "Āsha"}, PASSWORD)
    lead = sandbox.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None and lead.portal_user
    assert result.lead_id == lead.lead_id
    assert result.message == "Registration Successful"
    assert lead.fields["FirstName"] == "Āsha"


def test_tokens_are_fetched_once_however_many_registrations(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    for i in range(5):
        hook.register_portal_user({"EmailAddress": f"lead{i}@example.com"}, PASSWORD)
    outcomes = list(hook.register_portal_users((str(i), {"Phone": f"+91-98{i:08d}"}) for i in range(20)))
    assert all(o.status is RegistrationStatus.REGISTERED for o in outcomes)
    assert calls_to(sandbox, PUBLIC_TOKEN_PATH) == 1
    assert calls_to(sandbox, REGISTER_TOKEN_PATH) == 1
    assert calls_to(sandbox, REGISTER_PATH) == 25


def test_upsert_keeps_the_lead_and_only_new_leads_reports_it_exists(
    hook: LeadSquaredHook, sandbox: Sandbox
) -> None:
    first = hook.register_portal_user({"EmailAddress": "ravi@example.com", "FirstName": "Ravi"}, PASSWORD)
    again = hook.register_portal_user({"EmailAddress": "RAVI@example.com", "City": None}, PASSWORD)
    assert again.lead_id == first.lead_id
    with pytest.raises(LeadSquaredLeadExistsError) as err:
        hook.register_portal_user({"EmailAddress": "ravi@example.com"}, PASSWORD, only_new_leads=True)
    assert err.value.exception_type == "MXDuplicateEntryException"
    assert err.value.attempts == 1  # permanent: never retried


def test_identifier_attribute_is_sent_first(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    existing = sandbox.add_lead({"EmailAddress": "old@example.com", "mx_PAN_Number": "ABCDE1234F"})
    lead = {"EmailAddress": "new@example.com", "mx_PAN_Number": "ABCDE1234F"}
    by_pan = hook.register_portal_user(lead, PASSWORD, identifier_attribute="mx_PAN_Number")
    assert by_pan.lead_id == existing  # PAN moved first: it found the existing lead
    by_email = hook.register_portal_user({"EmailAddress": "other@example.com", "Phone": "1"}, PASSWORD)
    assert by_email.lead_id != existing


@pytest.mark.parametrize(
    ("lead", "password", "field"),
    [
        ({"FirstName": "No identifier"}, PASSWORD, "EmailAddress"),
        ({"EmailAddress": "a@example.com"}, "  ", "mx_Portal_Password"),
        ({"EmailAddress": "a@example.com", "mx_Notes": {"a": 1}}, PASSWORD, "mx_Notes"),
        ({"EmailAddress": "a@example.com", "Score": float("inf")}, PASSWORD, "Score"),
        ({"EmailAddress": "a@example.com", "first name": "x"}, PASSWORD, "first name"),
        ({"EmailAddress": "a@example.com", "mx_Portal_Password": "x"}, PASSWORD, "mx_Portal_Password"),
    ],
)
def test_client_side_checks_name_the_field_and_make_no_call(
    hook: LeadSquaredHook, sandbox: Sandbox, lead: dict, password: str, field: str
) -> None:
    with pytest.raises(LeadSquaredValidationError) as err:
        hook.register_portal_user(lead, password)
    assert err.value.field == field
    assert repr(field) in str(err.value)
    assert calls_to(sandbox, REGISTER_PATH) == 0


def test_values_are_formatted_and_nones_left_out(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    import datetime as dt

    sandbox.add_lead({"EmailAddress": "keep@example.com", "mx_City": "Pune"})
    when = dt.datetime(2026, 11, 29, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    hook.register_portal_user(
        {"EmailAddress": "keep@example.com", "mx_City": None, "mx_Date_Of_Birth": dt.date(2008, 2, 29)}
        | {"mx_Intake": when},
        PASSWORD,
    )
    lead = sandbox.find_lead("EmailAddress", "keep@example.com")
    assert lead is not None
    assert lead.fields["mx_City"] == "Pune"  # None did not blank it
    assert lead.fields["mx_Date_Of_Birth"] == "2008-02-29 00:00:00"
    assert lead.fields["mx_Intake"] == "2026-11-29 05:00:00"  # UTC


def test_wrong_keys_are_an_authentication_error(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    conn = json.loads(sandbox.connection_json())
    conn["password"] = "not-the-secret"
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_BAD", json.dumps(conn))
    hook = LeadSquaredHook("lsq_bad")
    with pytest.raises(LeadSquaredAuthenticationError) as err:
        hook.get_public_auth_key()
    assert err.value.status_code == 401
    assert err.value.attempts == 1
    ok, message = hook.test_connection()
    assert not ok and "401" in message


def test_wrong_region_message_is_surfaced(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    sandbox.set_wrong_region("portalapi-us11.leadsquared.com")
    ok, message = hook.test_connection()
    assert not ok
    assert "portalapi-us11.leadsquared.com" in message


def test_unknown_attribute_is_permanent_and_not_retried(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    with pytest.raises(LeadSquaredAPIError) as err:
        hook.register_portal_user({"EmailAddress": "a@example.com", "mx_Shoe_Size": "9"}, PASSWORD)
    assert "mx_Shoe_Size" in err.value.message
    assert err.value.exception_type == "MXInvalidAttributeException"
    assert calls_to(sandbox, REGISTER_PATH) == 1


def test_404_and_400_are_permanent(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    with pytest.raises(LeadSquaredAPIError) as err:
        hook.request("GET", "/api/No/Such/Path")
    assert err.value.status_code == 404
    headers = {
        "Authorization": hook.get_public_auth_key(),
        "x-lsq-registertoken": hook.get_registration_token(),
        "x-lsq-portalid": "sandbox-portal",
    }
    with pytest.raises(LeadSquaredAPIError) as err:
        hook.request("POST", REGISTER_PATH, json=["not", "per", "spec"], headers=headers)
    assert err.value.status_code == 400
    assert calls_to(sandbox, REGISTER_PATH) == 1


@pytest.mark.parametrize("fault", [502, 503, 504, 500])
def test_gateway_faults_retry_then_succeed(hook: LeadSquaredHook, sandbox: Sandbox, fault: int) -> None:
    hook.get_public_auth_key()
    hook.get_registration_token()
    sandbox.inject(fault, fault, path=REGISTER_PATH)
    result = hook.register_portal_user({"EmailAddress": "retry@example.com"}, PASSWORD)
    assert result.attempts == 3
    assert calls_to(sandbox, REGISTER_PATH) == 3


def test_transient_failures_give_up_after_max_retries(hook: LeadSquaredHook, sandbox: Sandbox) -> None:
    hook.get_public_auth_key()
    hook.get_registration_token()
    sandbox.inject(*[502] * 10, path=REGISTER_PATH)
    with pytest.raises(LeadSquaredTransientError) as err:
        hook.register_portal_user({"EmailAddress": "down@example.com"}, PASSWORD)
    assert err.value.attempts == 4  # max_retries=3
    assert calls_to(sandbox, REGISTER_PATH) == 4
    assert "4 attempts" in str(err.value)


@pytest.mark.parametrize("form", ["429", "403", "200"])
def test_each_refusal_form_waits_out_the_window_and_retries(
    monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    with Sandbox(rate_limit_calls=100, rate_limit_period=0.5, refusal_form=form) as sandbox:
        hook = LeadSquaredHook(connect(monkeypatch, sandbox, max_retries=2))
        hook.get_public_auth_key()
        hook.get_registration_token()
        sandbox.inject("ratelimit", path=REGISTER_PATH)
        result = hook.register_portal_user({"EmailAddress": "late@example.com"}, PASSWORD)
        assert result.attempts == 2
        refused = [c for c in sandbox.calls if c.outcome == "refused"]
        assert [c.status for c in refused] == [int(form)]

        sandbox.inject("ratelimit", "ratelimit", "ratelimit", path=REGISTER_PATH)
        with pytest.raises(LeadSquaredRateLimitError) as err:
            hook.register_portal_user({"EmailAddress": "never@example.com"}, PASSWORD)
        assert err.value.attempts == 3
        assert err.value.exception_type == "MXAPIRateLimitExceededException"


def test_unreachable_host_is_transient_and_hides_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    conn = {
        "conn_type": "leadsquared",
        "host": "http://127.0.0.1:9",  # nothing listens on the discard port
        "login": NASTY_ACCESS_KEY,
        "password": NASTY_SECRET_KEY,
        "extra": {"max_retries": 1, "retry_wait_seconds": 0.01, "timeout_seconds": 2},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_DOWN", json.dumps(conn))
    with pytest.raises(LeadSquaredTransientError) as err:
        LeadSquaredHook("lsq_down").get_public_auth_key()
    assert "accessKey=***" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert_no_secret(
        str(err.value), {"access key": NASTY_ACCESS_KEY, "secret key": NASTY_SECRET_KEY}, "the error"
    )


def test_no_secret_reaches_logs_or_errors(
    hook: LeadSquaredHook,
    sandbox: Sandbox,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Everything the hook logs, and urllib3's DEBUG lines (which carry the URL), hold no key, token or
    password: raw, and after Airflow's masker. The masker cannot be relied on for urllib3's lines (a
    DEBUG ``airflow dags test`` printed them with the keys), so the hook redacts them itself."""
    from airflow_provider_lsq.version_compat import redact

    caplog.set_level(logging.DEBUG)
    hook.register_portal_user({"EmailAddress": "quiet@example.com"}, PASSWORD)
    sandbox.inject(502, "ratelimit", path=REGISTER_PATH)
    hook.register_portal_user({"EmailAddress": "quiet2@example.com"}, PASSWORD)
    sandbox.inject(*[503] * 5, path=REGISTER_PATH)
    errors = []
    with pytest.raises(LeadSquaredTransientError) as err:
        hook.register_portal_user({"EmailAddress": "quiet3@example.com"}, PASSWORD)
    errors.append(str(err.value))
    outcomes = list(hook.register_portal_users([("k1", {"EmailAddress": "x@example.com", "mx_Bad": "1"})]))
    errors.append(str(outcomes[0].to_dict()))

    secrets = {
        "access key": NASTY_ACCESS_KEY,
        "secret key": NASTY_SECRET_KEY,
        "public auth key": sandbox.public_auth_key,
        "registration token": sandbox.registration_token,
        "portal password": PASSWORD,
    }
    assert any("accessKey" in r.getMessage() for r in caplog.records)  # the URL was logged by urllib3
    logged = "\n".join(str(redact(r.getMessage())) for r in caplog.records)
    printed = capfd.readouterr()  # Airflow 3 logs hooks through structlog to the console
    printed_lines = (printed.out + printed.err).splitlines()
    logged += "\n".join(str(redact(line)) for line in printed_lines)
    # Every line must be clean without the masker's help (it only runs inside a task), urllib3's too.
    ours = "\n".join(r.getMessage() for r in caplog.records)
    ours += "\n".join(printed_lines)
    assert "accessKey=***" in ours  # urllib3's request line, redacted by the hook's filter
    for text in (logged, ours, *errors):
        assert_no_secret(text, secrets, "a log line or an error")
    assert re.search(r"attempt 1 of 4 failed", ours)
    assert repr(hook.config).count("***") == 0 and NASTY_SECRET_KEY not in repr(hook.config)


@pytest.mark.parametrize("at", [480, 490])
def test_a_secret_straddling_the_message_cut_leaves_no_prefix_in_the_error(at: int) -> None:
    """The server's message is cut to 500 characters: redacted first, so a secret echoed across the
    cut leaves not even its first characters in the error (the task log, the ledger, XCom)."""
    import json

    import requests

    from airflow_provider_lsq.hooks.responses import parse_response

    secret = "Zq7!pL9#vR2$wX5%c2VjcmV0"
    message = "x" * at + secret + " is not allowed"
    response = requests.Response()
    response.status_code = 400
    response._content = json.dumps({"Status": "Error", "ExceptionMessage": message}).encode()
    with pytest.raises(LeadSquaredAPIError) as caught:
        parse_response(response, [secret])
    assert "x" * 100 in str(caught.value)
    assert not any(secret[:k] in str(caught.value) for k in range(4, len(secret) + 1))


def test_a_bad_login_midway_stops_the_run_but_every_call_made_has_its_outcome(
    hook: LeadSquaredHook, sandbox: Sandbox
) -> None:
    def password(lead: dict) -> str:
        if lead["EmailAddress"] == "m10@example.com":
            sandbox.set_wrong_region("portalapi-us11.leadsquared.com")  # from now on every call is 401
        return PASSWORD

    seen = []
    with pytest.raises(LeadSquaredAuthenticationError):
        leads = ((str(i), {"EmailAddress": f"m{i}@example.com"}) for i in range(200))
        for outcome in hook.register_portal_users(leads, password_callable=password, max_workers=4):
            seen.append(outcome)
    registered = {lead.lead_id for lead in sandbox.leads if lead.portal_user}
    assert len(registered) >= 5
    assert {o.lead_id for o in seen if o.status is RegistrationStatus.REGISTERED} == registered
    assert calls_to(sandbox, REGISTER_PATH) < 200  # it stopped taking rows
