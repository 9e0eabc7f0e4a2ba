"""Answers that do not say what happened (issue #13, part 3): retried with the same password, then
recorded ``unconfirmed``, never re-sent by a later run unless a person says so.

Over real HTTP (the sandbox, whose faults here carry the registration out before they answer badly),
with the SQL transfer's ledger on real SQLite and PostgreSQL. A request that never left (a refused
connection) stays an ordinary retryable failure.
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.exceptions import LeadSquaredTransientError, LeadSquaredUnconfirmedError
from airflow_provider_lsq.hooks.leadsquared import REGISTER_PATH, LeadSquaredHook
from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.sandbox.state import parse_fault
from airflow_provider_lsq.version_compat import AirflowFailException
from tests import test_transfer_sql
from tests.helpers import RecordingPasswords, connect
from tests.test_transfer_sql import Warehouse, applicants, context, email, transfer

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_provider_lsq.sandbox import Sandbox

PASSWORD = "Samplepassword@123"
# The SQL transfer's tests' fixtures: a warehouse (SQLite, PostgreSQL) and a sandbox as the connection.
warehouse = test_transfer_sql.warehouse
sqlite_warehouse = test_transfer_sql.sqlite_warehouse
lsq = test_transfer_sql.lsq


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    """A loopback port nothing listens on (bound and closed again: connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StopSandboxFirst(RecordingPasswords):
    """A ``password_callable`` that stops the sandbox before the first row's call: that call, and every
    retry of it, meets a refused connection (nothing listens any more), so nothing is ever sent."""

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__()
        self.sandbox = sandbox

    def __call__(self, lead: Any) -> str:
        self.sandbox.stop()
        return super().__call__(lead)


@pytest.fixture
def sandbox(leadsquared_sandbox_factory: Callable[..., Sandbox]) -> Sandbox:
    return leadsquared_sandbox_factory(rate_limit_calls=100, rate_limit_period=1.0)


def make_hook(monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, **extra: Any) -> LeadSquaredHook:
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, **{"max_retries": 3, **extra}))
    hook.get_public_auth_key()
    hook.get_registration_token()
    return hook


# -- the sandbox's faults that carry the call out ----------------------------------------------------


@pytest.mark.parametrize("fault", ["empty", "html", "drop", "lost", "drop+slow:0.2"])
def test_sandbox_faults_after_acting_register_the_lead(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, fault: str
) -> None:
    hook = make_hook(monkeypatch, sandbox, max_retries=0)
    sandbox.inject(fault, path=REGISTER_PATH)
    with pytest.raises(LeadSquaredTransientError):
        hook.register_portal_user({"EmailAddress": "acted@example.com"}, PASSWORD)
    found = sandbox.find_lead("EmailAddress", "acted@example.com")
    assert found is not None and found.portal_user and found.registrations == 1
    assert found.password_sha256 == sha256(PASSWORD)
    outcome = {"drop": "dropped", "drop+slow:0.2": "dropped"}.get(fault, fault)
    assert [c.outcome for c in sandbox.calls if c.path == REGISTER_PATH] == [outcome]


def test_sandbox_rejects_a_delay_on_a_fault_that_does_not_act() -> None:
    assert parse_fault("EMPTY+slow:1") == "empty+slow:1.0"
    with pytest.raises(ValueError, match="take"):
        parse_fault("503+slow:1")
    with pytest.raises(ValueError, match="unknown fault"):
        parse_fault("vanish")


# -- the hook: one kind, whatever the unproven answer --------------------------------------------------


@pytest.mark.parametrize("fault", ["empty", "html", "drop", "504", "502", "lost"])
def test_an_unproven_answer_is_retried_with_the_same_password_and_a_proof_settles_it(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, fault: str
) -> None:
    hook = make_hook(monkeypatch, sandbox)
    sandbox.inject(fault, fault, path=REGISTER_PATH)
    outcomes = list(
        hook.register_portal_users(
            [("k1", {"EmailAddress": "retry@example.com"})], password_callable=lambda _: PASSWORD
        )
    )
    assert [(o.status, o.attempts) for o in outcomes] == [(RegistrationStatus.REGISTERED, 3)]
    found = sandbox.find_lead("EmailAddress", "retry@example.com")
    assert found is not None and found.password_sha256 == sha256(PASSWORD)


@pytest.mark.parametrize("fault", ["empty", "html", "drop", "lost"])
def test_an_answer_that_never_proves_the_outcome_ends_unconfirmed_not_failed(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, fault: str
) -> None:
    hook = make_hook(monkeypatch, sandbox)  # 4 attempts
    sandbox.inject(*[fault] * 4, path=REGISTER_PATH)
    passwords = RecordingPasswords()
    (outcome,) = hook.register_portal_users(
        [("k1", {"EmailAddress": "unproven@example.com"})], password_callable=passwords
    )
    assert outcome.status is RegistrationStatus.UNCONFIRMED
    assert not outcome.retryable and not outcome.ok and outcome.attempts == 4
    found = sandbox.find_lead("EmailAddress", "unproven@example.com")
    assert found is not None and found.portal_user
    assert found.registrations == 4  # every attempt was carried out ...
    assert len(passwords.made) == 1  # ... with the one password made for the row
    assert found.password_sha256 == sha256(passwords.made[0])
    assert passwords.made[0] not in json.dumps(outcome.to_dict())


def test_an_unproven_attempt_is_not_forgotten_when_later_attempts_prove_nothing(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox
) -> None:
    """The first attempt registers the lead and its answer is lost; gateway faults and a refusal
    (which say nothing about that call) follow: the row is unconfirmed, not a retryable failure."""
    hook = make_hook(monkeypatch, sandbox)
    sandbox.inject("drop", 503, "ratelimit", 500, path=REGISTER_PATH)
    with pytest.raises(LeadSquaredUnconfirmedError) as err:
        hook.register_portal_user({"EmailAddress": "first@example.com"}, PASSWORD)
    assert err.value.attempts == 4
    assert "1 of 4 attempts" in err.value.message
    found = sandbox.find_lead("EmailAddress", "first@example.com")
    assert found is not None and found.registrations == 1


def test_gateway_faults_alone_stay_retryable_failures(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox
) -> None:
    """500/503 without LeadSquared's envelope (the gateway did not pass the call on) on every
    attempt: an ordinary retryable failure, as before."""
    hook = make_hook(monkeypatch, sandbox)
    sandbox.inject(503, 500, 503, 500, path=REGISTER_PATH)
    (outcome,) = hook.register_portal_users([("k1", {"EmailAddress": "gw@example.com"})])
    assert (outcome.status, outcome.retryable) == (RegistrationStatus.FAILED, True)
    assert sandbox.find_lead("EmailAddress", "gw@example.com") is None


def test_a_bad_gateway_on_every_attempt_is_unconfirmed(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox
) -> None:
    """A 502 is a gateway that forwarded the call and got no answer it could pass on; a lost answer
    looks exactly like it. Whether LeadSquared acted (``"lost"``) or not (``502``), the row is not a
    retryable failure that a later run would send with a new password."""
    hook = make_hook(monkeypatch, sandbox)
    sandbox.inject(502, "lost", 502, 502, path=REGISTER_PATH)
    (outcome,) = hook.register_portal_users([("k1", {"EmailAddress": "bad-gw@example.com"})])
    assert (outcome.status, outcome.retryable) == (RegistrationStatus.UNCONFIRMED, False)
    found = sandbox.find_lead("EmailAddress", "bad-gw@example.com")
    assert found is not None and found.registrations == 1  # the "lost" attempt was carried out


def test_a_refused_connection_was_never_sent_and_stays_a_retryable_failure(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox
) -> None:
    hook = make_hook(monkeypatch, sandbox)
    sandbox.stop()  # the tokens are fetched; now nothing listens on the sandbox's port
    (outcome,) = hook.register_portal_users([("k1", {"EmailAddress": "never@example.com"})])
    assert (outcome.status, outcome.retryable, outcome.attempts) == (RegistrationStatus.FAILED, True, 4)
    assert outcome.error_type == "LeadSquaredTransientError"
    assert "nothing was sent" in str(outcome.error_message)
    assert sandbox.register_calls == 0


def test_connection_refused_from_the_start_is_not_unconfirmed(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {
        "conn_type": "leadsquared",
        "host": f"http://127.0.0.1:{free_port()}",
        "login": "ak",
        "password": "sk",
        "extra": {"portal_id": "p", "max_retries": 1, "retry_wait_seconds": 0.01},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_REFUSED", json.dumps(conn))
    with pytest.raises(LeadSquaredTransientError) as err:
        LeadSquaredHook("lsq_refused").get_public_auth_key()
    assert not isinstance(err.value, LeadSquaredUnconfirmedError)
    assert "nothing was sent" in err.value.message


# -- RegisterPortalUserOperator ----------------------------------------------------------------------


class FakeTI:
    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def test_operator_records_an_empty_200_as_unconfirmed_and_fails_without_a_retry(
    lsq: Callable[..., Sandbox],
) -> None:
    sb = lsq(conn_extra={"max_retries": 2})
    sb.inject("empty", "empty", "empty", path=REGISTER_PATH)  # every attempt of the first row
    leads = [{"EmailAddress": f"s{i}@example.edu"} for i in range(1, 4)]
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, max_workers=1, max_failure_ratio=1.0, password_callable=None
    )
    ti = FakeTI()
    with pytest.raises(AirflowFailException, match="1 rows are unconfirmed") as err:
        op.execute({"ti": ti, "run_id": "manual__1"})  # type: ignore[arg-type]
    assert "s1@example.edu" not in str(err.value)  # row keys are lead values
    by_key = {o["key"]: o for o in ti.xcom["outcomes"]}
    assert by_key["s1@example.edu"]["status"] == "unconfirmed"
    assert by_key["s1@example.edu"]["retryable"] is False
    assert by_key["s1@example.edu"]["attempts"] == 3
    assert {by_key[f"s{i}@example.edu"]["status"] for i in (2, 3)} == {"registered"}
    counts = op.registration_counts or {}
    assert (counts.get("unconfirmed"), counts.get("registered"), counts.get("failed")) == (1, 2, 0)
    found = sb.find_lead("EmailAddress", "s1@example.edu")
    assert found is not None and found.registrations == 3


# -- SqlToLeadSquaredPortalOperator and its ledger ---------------------------------------------------


def test_empty_200_to_register_is_unconfirmed_in_the_ledger_and_never_resent(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Issue #13's first input: a 200 with an empty body to Register (the lead is a portal user)."""
    sb = lsq()  # max_retries 5: six attempts
    warehouse.seed(applicants(3))
    sb.inject(*["empty"] * 6, path=REGISTER_PATH)
    passwords = RecordingPasswords()
    sql = warehouse.sql(where="ORDER BY applicant_id")
    op = transfer(warehouse, sql=sql, max_workers=1, password_callable=passwords)
    with pytest.raises(AirflowFailException, match="1 rows are unconfirmed"):
        op.execute(context("r1"))
    assert (op.registration_counts or {}).get("unconfirmed") == 1

    row = warehouse.ledger()["1"]
    assert (row["status"], bool(row["retryable"]), row["attempts"]) == ("unconfirmed", False, 6)
    assert "empty body" in row["error_message"]
    first = sb.find_lead("EmailAddress", email(1))
    assert first is not None and first.portal_user and first.registrations == 6
    assert len(passwords.made) == 3  # one per row: the six attempts of row 1 shared one
    assert first.password_sha256 in {sha256(p) for p in passwords.made}
    assert not [p for p in passwords.made if p in " ".join(warehouse.ledger_cells())]

    calls = sb.register_calls
    second = transfer(warehouse, sql=sql).execute(context("r2"))
    assert sb.register_calls == calls  # nothing sent for row 1 (nor for 2 and 3, registered)
    # Rows 2 and 3 are settled: the database leaves them out. Row 1 is read, and skipped.
    assert (second["skipped_unconfirmed"], second["unconfirmed"], second["skipped"]) == (1, 0, 1)
    after = sb.find_lead("EmailAddress", email(1))
    assert after is not None and (after.registrations, after.password_sha256) == (6, first.password_sha256)
    assert warehouse.ledger()["1"]["status"] == "unconfirmed"

    # A retry_failed run does not send it either; a person's resend_unconfirmed does, once.
    transfer(warehouse, sql=sql, retry_failed=True).execute(context("r3"))
    assert sb.register_calls == calls
    third = transfer(warehouse, sql=sql, resend_unconfirmed=True).execute(context("r4"))
    assert (third["registered"], third["resent_unconfirmed"], sb.register_calls) == (1, 1, calls + 1)
    assert warehouse.ledger()["1"]["status"] == "registered"


def test_a_read_timeout_after_acting_is_unconfirmed_and_the_next_day_sends_nothing(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Issue #13's second input: the server registers, then answers in 1.6 s; timeout_seconds is 1;
    so for every attempt (six)."""
    sb = lsq(conn_extra={"timeout_seconds": 1})
    sqlite_warehouse.seed(applicants(1))
    sb.inject(*["slow:1.6"] * 6, path=REGISTER_PATH)
    passwords = RecordingPasswords()
    op = transfer(sqlite_warehouse, password_callable=passwords)
    with pytest.raises(AirflowFailException, match="unconfirmed"):
        op.execute(context("day1"))

    row = sqlite_warehouse.ledger()["1"]
    assert (row["status"], bool(row["retryable"]), row["attempts"]) == ("unconfirmed", False, 6)
    assert "ReadTimeout" in row["error_message"] and "may have carried it out" in row["error_message"]
    lead = sb.find_lead("EmailAddress", email(1))
    assert lead is not None and lead.registrations == 6
    assert passwords.made and lead.password_sha256 == sha256(passwords.made[0])
    assert len(passwords.made) == 1  # the same password on every attempt

    calls = sb.register_calls
    day2 = transfer(sqlite_warehouse, password_callable=passwords).execute(context("day2"))
    assert sb.register_calls == calls and len(passwords.made) == 1  # no call, no new password
    assert day2["skipped_unconfirmed"] == 1
    again = sb.find_lead("EmailAddress", email(1))
    assert again is not None and again.password_sha256 == lead.password_sha256


def test_a_retry_of_the_same_run_counts_its_unconfirmed_rows_again_without_a_call(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(conn_extra={"max_retries": 0})
    sqlite_warehouse.seed(applicants(2))
    sb.inject("drop", path=REGISTER_PATH)
    sql = sqlite_warehouse.sql(where="ORDER BY applicant_id")
    with pytest.raises(AirflowFailException):
        transfer(sqlite_warehouse, sql=sql, max_workers=1).execute(context("r1"))
    calls = sb.register_calls
    with pytest.raises(AirflowFailException, match="1 rows are unconfirmed"):
        transfer(sqlite_warehouse, sql=sql).execute(context("r1"))  # the same run: a cleared task
    assert sb.register_calls == calls


def test_another_key_of_an_unconfirmed_lead_is_not_sent(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(conn_extra={"max_retries": 0})
    sqlite_warehouse.seed([(1, email(1), "A", None)])
    sb.inject("empty", path=REGISTER_PATH)
    with pytest.raises(AirflowFailException):
        transfer(sqlite_warehouse).execute(context("r1"))
    sqlite_warehouse.execute(
        f"INSERT INTO {sqlite_warehouse.table('applicants')} VALUES (?, ?, ?, ?)", [(2, email(1), "A", None)]
    )
    calls = sb.register_calls
    summary = transfer(sqlite_warehouse).execute(context("r2"))
    assert sb.register_calls == calls
    assert summary["skipped_unconfirmed"] == 2  # row 1 itself, and row 2 (the same lead)
    assert "2" not in sqlite_warehouse.ledger()


def test_a_refused_connection_in_the_transfer_is_a_retryable_failure_the_next_run_sends(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    sb = lsq(conn_extra={"max_retries": 1})
    warehouse.seed(applicants(1))
    summary = transfer(warehouse, password_callable=StopSandboxFirst(sb), max_failure_ratio=1.0).execute(
        context("r1")
    )
    assert (summary["failed"], summary["unconfirmed"]) == (1, 0)
    row = warehouse.ledger()["1"]
    assert (row["status"], bool(row["retryable"])) == ("failed", True)
    assert "nothing was sent" in row["error_message"]
    assert sb.register_calls == 0

    fresh = lsq()
    second = transfer(warehouse).execute(context("r2"))
    assert second["registered"] == 1 and fresh.register_calls == 1
    assert warehouse.ledger()["1"]["status"] == "registered"
