"""The code the docs show, run as tests: each snippet sits between ``[START name]`` and ``[END name]``.

``docs/*.md`` include these blocks with ``literalinclude`` (``start-after``/``end-before``), so a snippet
that stops working fails here before it can mislead a reader.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from airflow_provider_lsq.exceptions import LeadSquaredConfigError
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.outcomes import RegistrationStatus

if TYPE_CHECKING:
    from airflow_provider_lsq.sandbox import Sandbox
    from airflow_provider_lsq.testing.pytest_plugin import SandboxFactory


def test_connection_from_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # [START connection_env]
    connection = {
        "conn_type": "leadsquared",
        "host": "portalapi-us11.leadsquared.com",
        "login": "u$r-access-key",
        "password": "the-secret-key",
        "extra": {"portal_id": "8d4f1a2b-portal", "rate_limit_calls": 25, "rate_limit_period_seconds": 5},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(connection))
    # [END connection_env]
    config = LeadSquaredHook().config
    assert config.base_url == "https://portalapi-us11.leadsquared.com"
    assert (config.portal_id, config.rate_limit_calls) == ("8d4f1a2b-portal", 25)


def test_connection_value_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_LSQ_DOCS",
        json.dumps(
            {"conn_type": "leadsquared", "login": "u$r-k", "password": "s-k", "extra": {"portal_id": "a b"}}
        ),
    )
    with pytest.raises(LeadSquaredConfigError) as err:
        LeadSquaredHook("lsq_docs").config  # noqa: B018
    # What the troubleshooting page quotes:
    assert str(err.value) == (
        "Connection 'lsq_docs': field 'portal_id' holds a space, a control character or a non-ASCII "
        "character that no request can carry (got 'a b')."
    )


def test_hook_usage(leadsquared_conn: Sandbox) -> None:
    rows = [{"id": "42", "lead": {"EmailAddress": "ravi@example.com", "FirstName": "Ravi"}}]
    # [START hook_usage]
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook

    hook = LeadSquaredHook("leadsquared_default")  # no network I/O until the first call
    ok, message = hook.test_connection()  # one attempt, a 5 s timeout: what the UI's Test button runs

    result = hook.register_portal_user(
        {"EmailAddress": "asha@example.com", "FirstName": "Asha", "mx_Program": "MBA"},
        password="Samplepassword@123",
    )
    print(result.lead_id, result.message)

    # Many leads: a small thread pool shares the hook's session and its one rate-limit budget, and
    # yields one outcome per lead as each call ends.
    for outcome in hook.register_portal_users((row["id"], row["lead"]) for row in rows):
        print(outcome.key, outcome.status, outcome.lead_id, outcome.error_message)
    # [END hook_usage]
    assert ok, message
    assert result.message == "Registration Successful"
    assert outcome.status == RegistrationStatus.REGISTERED
    assert leadsquared_conn.find_lead("EmailAddress", "ravi@example.com") is not None


def test_hook_errors(leadsquared_conn: Sandbox) -> None:
    # [START hook_errors]
    from airflow_provider_lsq.exceptions import (
        LeadSquaredAPIError,
        LeadSquaredRateLimitError,
        LeadSquaredTransientError,
        LeadSquaredValidationError,
    )

    hook = LeadSquaredHook()
    try:
        hook.register_portal_user({"FirstName": "No identifier"}, password="Samplepassword@123")
    except LeadSquaredValidationError as error:  # no call was made: fix the row
        print(f"invalid: {error.field}: {error.message}")
    except LeadSquaredAPIError as error:  # LeadSquared refused this lead: retrying will not help
        print(f"refused: {error.exception_type}: {error.message}")
    except (LeadSquaredRateLimitError, LeadSquaredTransientError) as error:  # try again later
        print(f"gave up after {error.attempts} attempts: {error.message}")
    # [END hook_errors]
    assert leadsquared_conn.register_calls == 0


# [START pytest_plugin]
def test_registers_against_the_sandbox(leadsquared_conn: Sandbox) -> None:
    """``leadsquared_conn``: a started sandbox, exported as ``AIRFLOW_CONN_LEADSQUARED_DEFAULT``."""
    LeadSquaredHook().register_portal_user({"EmailAddress": "asha@example.com"}, "Samplepassword@123")
    lead = leadsquared_conn.find_lead("EmailAddress", "asha@example.com")
    assert lead is not None and lead.portal_user


@pytest.mark.leadsquared_sandbox(rate_limit_calls=5, refusal_form="403")
def test_with_a_stricter_account(leadsquared_conn: Sandbox) -> None:
    assert leadsquared_conn.config.rate_limit_calls == 5


def test_two_accounts(leadsquared_sandbox_factory: SandboxFactory) -> None:
    slow = leadsquared_sandbox_factory(latency=0.05, fault_rate=0.1, seed=1)
    fast = leadsquared_sandbox_factory()
    assert slow.url != fast.url


@pytest.mark.leadsquared_sandbox(background_rate=1.0)  # the account's other integrations, 1 call/s
def test_leaves_room_for_other_integrations(leadsquared_conn: Sandbox) -> None:
    LeadSquaredHook().register_portal_user({"EmailAddress": "ravi@example.com"}, "Samplepassword@123")
    assert leadsquared_conn.refusals_by_caller.get("background", 0) == 0
    assert leadsquared_conn.calls_by_caller()["ours"]["accepted"] >= 1


# [END pytest_plugin]
