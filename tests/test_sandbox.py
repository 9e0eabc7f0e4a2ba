"""The LeadSquared sandbox over real HTTP on loopback: contract, failure modes, rate limit, CLI, plugin."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from airflow_provider_lsq.sandbox import CallRecord, Sandbox
from tests.helpers import assert_no_secret

if TYPE_CHECKING:
    from collections.abc import Iterator

REGISTER = "/api/Authentication/v2/Register"
PUBLIC_TOKEN = "/api/Access/PublicToken"
REGISTER_TOKEN = "/api/Access/GetRegisterToken"
PASSWORD = "Samplepassword@123"
ROOT = Path(__file__).resolve().parents[1]


def lead_fields(*pairs: tuple[str, str], password: str = PASSWORD, confirm: str | None = None) -> list[dict]:
    fields = [{"Attribute": a, "Value": v} for a, v in pairs]
    fields.append({"Attribute": "mx_Portal_Password", "Value": password})
    fields.append(
        {"Attribute": "mx_Portal_Confirm_Password", "Value": password if confirm is None else confirm}
    )
    return fields


class Client:
    """A minimal, correct client: keys URL-encoded by requests, the three documented headers."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.session = requests.Session()
        self.params = {"accessKey": sb.access_key, "secretKey": sb.secret_key}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.sb.url + path, params=self.params, timeout=10, **kwargs)

    def headers(self, overrides: dict[str, str | None] | None = None) -> dict[str, str]:
        """The documented Register headers; an override of None drops that header."""
        headers: dict[str, str | None] = {
            "Authorization": self.sb.public_auth_key,
            "x-lsq-registertoken": self.sb.registration_token,
            "x-lsq-portalid": self.sb.portal_id,
            **(overrides or {}),
        }
        return {k: v for k, v in headers.items() if v is not None}

    def register(
        self,
        fields: list[dict[str, str]],
        only_new: bool | None = None,
        headers: dict[str, str | None] | None = None,
    ) -> requests.Response:
        body: dict[str, Any] = {"LeadFields": fields}
        if only_new is not None:
            body["RegisterOnlyNewLead"] = only_new
        return self.session.post(
            self.sb.url + REGISTER,
            params=self.params,
            headers=self.headers(headers),
            json=body,
            timeout=10,
        )


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def client(sb: Sandbox) -> Client:
    return Client(sb)


def assert_envelope(response: requests.Response, status: int, exception_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["Status"] == "Error"
    assert body["ExceptionType"] == exception_type
    return str(body["ExceptionMessage"])


# --- tokens and credentials --------------------------------------------------------------------------


def test_token_endpoints(sb: Sandbox, client: Client) -> None:
    response = client.get(PUBLIC_TOKEN)
    assert response.status_code == 200
    assert response.json() == {"PublicAuthKey": sb.public_auth_key}
    response = client.get(REGISTER_TOKEN)
    assert response.status_code == 200
    assert response.text.startswith('"')  # a bare JSON string, not an object
    assert response.json() == sb.registration_token
    assert int(response.headers["Content-Length"]) == len(response.content)


def test_default_keys_hold_characters_that_need_encoding(sb: Sandbox) -> None:
    for key in (sb.access_key, sb.secret_key):
        assert set("$+/=&") <= set(key)
    assert Sandbox().access_key != sb.access_key


def test_unencoded_keys_are_refused(sb: Sandbox) -> None:
    raw = f"{sb.url}{PUBLIC_TOKEN}?accessKey={sb.access_key}&secretKey={sb.secret_key}"
    message = assert_envelope(requests.get(raw, timeout=10), 401, "MXUnAuthorisedException")
    assert_no_secret(message, {"secret key": sb.secret_key}, "the 401 answer")
    assert sb.calls[-1].outcome == "unauthorized"
    assert "?" not in sb.calls[-1].path


def test_header_credentials_and_wrong_keys(sb: Sandbox) -> None:
    headers = {"x-LSQ-AccessKey": sb.access_key, "x-LSQ-SecretKey": sb.secret_key}
    assert requests.get(sb.url + PUBLIC_TOKEN, headers=headers, timeout=10).status_code == 200
    wrong = {"accessKey": sb.access_key, "secretKey": sb.secret_key + "x"}
    response = requests.get(sb.url + PUBLIC_TOKEN, params=wrong, timeout=10)
    assert_envelope(response, 401, "MXUnAuthorisedException")
    assert_envelope(requests.get(sb.url + REGISTER_TOKEN, timeout=10), 401, "MXUnAuthorisedException")


def test_unknown_path_and_wrong_method(client: Client) -> None:
    assert client.get("/api/Access/Nope").status_code == 404
    response = client.session.post(client.sb.url + PUBLIC_TOKEN, params=client.params, timeout=10)
    assert response.status_code in (404, 405)
    assert client.get(REGISTER).status_code in (404, 405)


# --- Register: headers and body ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "status", "exception_type"),
    [
        ({"Authorization": "Bearer {key}"}, 401, "MXUnAuthorisedException"),
        ({"Authorization": None}, 401, "MXUnAuthorisedException"),
        ({"x-lsq-registertoken": "wrong"}, 401, "MXUnAuthorisedException"),
        ({"x-lsq-registertoken": None}, 401, "MXUnAuthorisedException"),
        ({"x-lsq-portalid": "other-portal"}, 500, "MXInvalidPortalException"),
        ({"x-lsq-portalid": None}, 500, "MXInvalidPortalException"),
    ],
)
def test_register_header_checks(
    sb: Sandbox, client: Client, overrides: dict[str, str | None], status: int, exception_type: str
) -> None:
    headers = {k: v.format(key=sb.public_auth_key) if v else v for k, v in overrides.items()}
    response = client.register(lead_fields(("EmailAddress", "asha@example.com")), headers=headers)
    assert_envelope(response, status, exception_type)
    assert sb.leads == []


def test_register_needs_json_content_type(sb: Sandbox, client: Client) -> None:
    response = client.session.post(
        sb.url + REGISTER,
        params=client.params,
        headers={**client.headers(), "Content-Type": "text/plain"},
        data=json.dumps({"LeadFields": lead_fields(("EmailAddress", "asha@example.com"))}),
        timeout=10,
    )
    assert response.status_code == 400
    assert sb.leads == []


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"LeadFields": {"EmailAddress": "a@b.c"}}',
        '{"LeadFields": [{"Attribute": "EmailAddress", "Value": 5}]}',
        '{"LeadFields": [], "RegisterOnlyNewLead": "yes"}',
    ],
)
def test_register_body_not_per_spec(sb: Sandbox, client: Client, body: str) -> None:
    response = client.session.post(
        sb.url + REGISTER,
        params=client.params,
        headers={**client.headers(), "Content-Type": "application/json"},
        data=body,
        timeout=10,
    )
    assert response.status_code == 400


# --- Register: business rules ------------------------------------------------------------------------


def test_register_creates_then_upserts(sb: Sandbox, client: Client) -> None:
    first = client.register(lead_fields(("EmailAddress", "asha@example.com"), ("FirstName", "Asha")))
    assert first.status_code == 200
    assert first.json()["Message"] == "Registration Successful"
    lead_id = first.json()["LeadId"]
    again = client.register(lead_fields(("EmailAddress", "ASHA@Example.com"), ("mx_City", "Pune")))
    assert again.json()["LeadId"] == lead_id
    lead = sb.find_lead("EmailAddress", "asha@EXAMPLE.com")
    assert lead is not None and lead.lead_id == lead_id
    assert lead.portal_user and lead.registrations == 2
    assert lead.fields["FirstName"] == "Asha" and lead.fields["mx_City"] == "Pune"
    assert len(sb.leads) == 1 and sb.register_calls == 2


def test_register_existing_lead_becomes_portal_user(sb: Sandbox, client: Client) -> None:
    lead_id = sb.add_lead({"EmailAddress": "ravi@example.com", "FirstName": "Ravi"})
    assert not sb.leads[0].portal_user
    response = client.register(lead_fields(("EmailAddress", "ravi@example.com")))
    assert response.json()["LeadId"] == lead_id
    assert sb.leads[0].portal_user


def test_register_only_new_lead_on_existing(sb: Sandbox, client: Client) -> None:
    sb.add_lead({"EmailAddress": "ravi@example.com"})
    response = client.register(lead_fields(("EmailAddress", "ravi@example.com")), only_new=True)
    assert assert_envelope(response, 500, "MXDuplicateEntryException") == "User already exists."
    assert not sb.leads[0].portal_user
    fresh = client.register(lead_fields(("EmailAddress", "new@example.com")), only_new=True)
    assert fresh.status_code == 200


def test_first_unique_identifier_finds_the_lead(sb: Sandbox, client: Client) -> None:
    existing = sb.add_lead({"EmailAddress": "old@example.com", "Phone": "9876543210"})
    by_email = client.register(lead_fields(("EmailAddress", "other@example.com"), ("Phone", "9000000000")))
    assert by_email.json()["LeadId"] != existing
    by_phone = client.register(lead_fields(("Phone", "9876543210"), ("EmailAddress", "third@example.com")))
    assert by_phone.json()["LeadId"] == existing
    assert len(sb.leads) == 2


def test_a_unique_value_held_by_another_lead_is_a_duplicate(sb: Sandbox, client: Client) -> None:
    """Uniqueness is wider than the identifier sent first (API notes): a sibling's phone is refused."""
    existing = sb.add_lead({"EmailAddress": "old@example.com", "Phone": "9876543210"})
    answer = client.register(lead_fields(("EmailAddress", "other@example.com"), ("Phone", "9876543210")))
    message = assert_envelope(answer, 500, "MXDuplicateEntryException")
    assert "Phone" in message
    assert [lead.lead_id for lead in sb.leads] == [existing]


def test_unknown_attributes(client: Client) -> None:
    fields = lead_fields(("EmailAddress", "a@example.com"), ("mx_Foo", "1"), ("mx_Bar", "2"))
    message = assert_envelope(client.register(fields), 500, "MXInvalidAttributeException")
    assert message == "Attribute(s) does not exist - mx_Foo,mx_Bar"


def test_mandatory_attributes(sb: Sandbox, client: Client) -> None:
    no_password = [{"Attribute": "EmailAddress", "Value": "a@example.com"}]
    message = assert_envelope(client.register(no_password), 500, "MXMandatoryAttributeMissingException")
    assert "mx_Portal_Password" in message and "mx_Portal_Confirm_Password" in message
    no_identifier = lead_fields(("EmailAddress", ""), ("FirstName", "Asha"))
    message = assert_envelope(client.register(no_identifier), 500, "MXMandatoryAttributeMissingException")
    assert "EmailAddress" in message
    assert sb.leads == []
    assert sb.register_calls == 2  # they reached processing


def test_password_mismatch(sb: Sandbox, client: Client) -> None:
    fields = lead_fields(("EmailAddress", "a@example.com"), confirm="Different@123")
    message = assert_envelope(client.register(fields), 500, "MXInvalidInputException")
    assert message == "Password and Confirm Password do not match"
    assert sb.leads == []


def test_password_is_never_stored(sb: Sandbox, client: Client) -> None:
    client.register(lead_fields(("EmailAddress", "a@example.com")))
    (lead,) = sb.leads
    assert lead.password_sha256 == hashlib.sha256(PASSWORD.encode()).hexdigest()
    assert PASSWORD not in repr(lead)
    assert "mx_Portal_Password" not in lead.fields
    listing = requests.get(sb.url + "/_sandbox/leads", timeout=10)
    assert PASSWORD not in listing.text and lead.password_sha256 not in listing.text
    assert listing.json()[0]["lead_id"] == lead.lead_id


# --- rate limit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["429", "403", "200"])
def test_26th_call_is_refused_in_each_form(form: str) -> None:
    with Sandbox(rate_limit_calls=25, rate_limit_period=5, refusal_form=form) as sb:
        client = Client(sb)
        statuses = [client.get(REGISTER_TOKEN).status_code for _ in range(25)]
        assert statuses == [200] * 25
        refused = client.get(REGISTER_TOKEN)
        message = assert_envelope(refused, int(form), "MXAPIRateLimitExceededException")
        assert message == "API calls exceeded the limit of 25 in 5 second(s)"
        assert sb.refusals == 1
        assert sb.calls[-1].outcome == "refused"
        assert sb.max_calls_in_window() == 25


def test_cycle_form_rotates() -> None:
    with Sandbox(rate_limit_calls=1, rate_limit_period=5, refusal_form="cycle") as sb:
        client = Client(sb)
        assert client.get(PUBLIC_TOKEN).status_code == 200
        statuses = [client.get(PUBLIC_TOKEN).status_code for _ in range(4)]
        assert statuses == [429, 403, 200, 429]
        assert_envelope(client.get(PUBLIC_TOKEN), 403, "MXAPIRateLimitExceededException")
        assert sb.refusals == 5


def _sleep_until(target: float) -> None:
    while (left := target - time.monotonic()) > 0:
        time.sleep(left)


def test_lockout_outlasts_the_window() -> None:
    period = 1.0
    with Sandbox(rate_limit_calls=3, rate_limit_period=period) as sb:
        client = Client(sb)
        assert [client.get(PUBLIC_TOKEN).status_code for _ in range(3)] == [200] * 3
        last_accepted = sb.calls[-1].at
        _sleep_until(last_accepted + 0.4)
        assert client.get(PUBLIC_TOKEN).status_code == 429  # window full: lockout starts
        first_refusal = sb.calls[-1].at
        _sleep_until(last_accepted + period + 0.1)  # the accepted calls have left the window...
        assert client.get(PUBLIC_TOKEN).status_code == 429  # ...but the lockout still refuses
        assert sb.calls[-1].at < first_refusal + period
        _sleep_until(first_refusal + period + 0.05)
        assert client.get(PUBLIC_TOKEN).status_code == 200
        assert sb.refusals == 2
        assert sb.max_calls_in_window() == 3


def test_daily_cap() -> None:
    with Sandbox(daily_call_limit=3) as sb:
        client = Client(sb)
        assert [client.get(PUBLIC_TOKEN).status_code for _ in range(3)] == [200] * 3
        message = assert_envelope(client.get(PUBLIC_TOKEN), 429, "MXAPIRateLimitExceededException")
        assert "daily" in message and "3" in message


def test_concurrent_burst_respects_the_limit() -> None:
    with Sandbox(rate_limit_calls=25, rate_limit_period=5) as sb:
        statuses: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(40)

        def worker() -> None:
            client = Client(sb)
            barrier.wait()
            status = client.get(PUBLIC_TOKEN).status_code
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=worker) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert sorted(statuses) == [200] * 25 + [429] * 15
        assert sb.max_calls_in_window() == 25
        assert sb.refusals == 15
        assert requests.get(sb.url + "/_sandbox/state", timeout=10).json()["calls"] == 40


def test_max_calls_in_window_counts_accepted_calls_only(sb: Sandbox, client: Client) -> None:
    for _ in range(5):
        client.get(PUBLIC_TOKEN)
    assert sb.max_calls_in_window() == 5
    sb.inject("ratelimit")
    assert client.get(PUBLIC_TOKEN).status_code == 429
    assert sb.max_calls_in_window() == 5 and sb.refusals == 1
    sb.reset_calls()
    assert sb.calls == [] and sb.max_calls_in_window() == 0 and sb.refusals == 0


# --- faults, latency, wrong region -------------------------------------------------------------------


def test_injected_gateway_faults(sb: Sandbox, client: Client) -> None:
    sb.inject(502, 500, "504")
    bad_gateway = client.get(PUBLIC_TOKEN)
    assert bad_gateway.status_code == 502
    assert "<h1>502 Bad Gateway</h1>" in bad_gateway.text
    assert bad_gateway.headers["Content-Type"].startswith("text/html")
    empty = client.get(PUBLIC_TOKEN)
    assert empty.status_code == 500 and empty.content == b""
    assert client.get(PUBLIC_TOKEN).status_code == 504
    assert client.get(PUBLIC_TOKEN).status_code == 200
    assert [c.outcome for c in sb.calls] == ["fault", "fault", "fault", "ok"]


def test_injected_faults_match_the_path_and_are_not_processed(sb: Sandbox, client: Client) -> None:
    sb.inject(503, path=REGISTER)
    assert client.get(PUBLIC_TOKEN).status_code == 200
    assert client.register(lead_fields(("EmailAddress", "a@example.com"))).status_code == 503
    assert sb.leads == [] and sb.register_calls == 0
    assert client.register(lead_fields(("EmailAddress", "a@example.com"))).status_code == 200


def test_lost_response_is_processed(sb: Sandbox, client: Client) -> None:
    sb.inject("lost", path=REGISTER)
    lost = client.register(lead_fields(("EmailAddress", "a@example.com")))
    assert lost.status_code == 502
    lead = sb.find_lead("EmailAddress", "a@example.com")
    assert lead is not None and lead.portal_user
    assert sb.calls[-1].outcome == "lost" and sb.register_calls == 1
    retry = client.register(lead_fields(("EmailAddress", "a@example.com")), only_new=True)
    assert_envelope(retry, 500, "MXDuplicateEntryException")


def test_lost_response_rate_applies_to_register_only() -> None:
    with Sandbox(lost_response_rate=1.0) as sb:
        client = Client(sb)
        assert client.get(PUBLIC_TOKEN).status_code == 200
        assert client.register(lead_fields(("EmailAddress", "a@example.com"))).status_code == 502
        assert len(sb.leads) == 1


def test_slow_fault_and_latency(sb: Sandbox, client: Client) -> None:
    sb.inject("slow:0.3")
    started = time.monotonic()
    assert client.get(PUBLIC_TOKEN).status_code == 200
    assert time.monotonic() - started >= 0.3
    with Sandbox(latency=0.2, latency_jitter=0.05, seed=3) as slow:
        started = time.monotonic()
        assert Client(slow).get(PUBLIC_TOKEN).status_code == 200
        assert time.monotonic() - started >= 0.2
        assert slow.calls[0].at <= started + 0.1  # arrival is stamped before the latency sleep


def test_fault_rate_is_reproducible_with_a_seed() -> None:
    def run() -> tuple[list[int], int, int]:
        with Sandbox(fault_rate=0.4, seed=42) as sb:
            client = Client(sb)
            statuses = [
                client.register(lead_fields(("EmailAddress", f"u{i}@example.com"))).status_code
                for i in range(20)
            ]
            return statuses, len(sb.leads), sb.register_calls

    statuses, leads, register_calls = run()
    assert run() == (statuses, leads, register_calls)
    assert set(statuses) <= {200, 502, 503} and 200 in statuses and set(statuses) - {200}
    assert leads == register_calls == statuses.count(200)  # faulted calls were not processed


def test_wrong_region_names_the_host(sb: Sandbox, client: Client) -> None:
    sb.set_wrong_region("portalapi-us11.leadsquared.com")
    message = assert_envelope(client.get(PUBLIC_TOKEN), 401, "MXUnAuthorisedException")
    assert "portalapi-us11.leadsquared.com" in message
    register = client.register(lead_fields(("EmailAddress", "a@example.com")))
    assert_envelope(register, 401, "MXUnAuthorisedException")
    sb.set_wrong_region(None)
    assert client.get(PUBLIC_TOKEN).status_code == 200


# --- inspection, connection, lifecycle ---------------------------------------------------------------


def test_state_endpoint(sb: Sandbox, client: Client) -> None:
    sb.add_lead({"EmailAddress": "x@example.com"})
    client.register(lead_fields(("EmailAddress", "a@example.com")))
    assert requests.get(sb.url + "/_sandbox/state", timeout=10).json() == {
        "leads": 2,
        "portal_users": 1,
        "register_calls": 1,
        "refusals": 0,
        "calls": 1,
        "by_caller": {
            "ours": {"calls": 1, "accepted": 1, "refused": 0},
            "background": {"calls": 0, "accepted": 0, "refused": 0},
        },
    }
    assert isinstance(sb.calls[0], CallRecord) and sb.calls[0].path == REGISTER


def test_connection_dict(sb: Sandbox) -> None:
    conn = json.loads(sb.connection_json())
    assert conn == {
        "conn_type": "leadsquared",
        "host": sb.url,
        "login": sb.access_key,
        "password": sb.secret_key,
        "extra": {
            "portal_id": "sandbox-portal",
            "rate_limit_calls": 25,
            "rate_limit_period_seconds": 5.0,
            "bulk_rate_limit_calls": 5,
            "bulk_rate_limit_period_seconds": 5.0,
        },
    }


def test_stop_releases_keep_alive_clients() -> None:
    sb = Sandbox().start()
    client = Client(sb)
    assert client.get(PUBLIC_TOKEN).status_code == 200
    sb.stop()
    with pytest.raises(requests.ConnectionError):
        client.get(PUBLIC_TOKEN)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_cli_serves_and_stops_cleanly() -> None:
    command = [sys.executable, "-m", "airflow_provider_lsq.sandbox", "--port", "0", "--rate-limit", "5/2"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT
    )
    try:
        assert process.stdout is not None
        conn = json.loads(process.stdout.readline())
        assert conn["extra"]["rate_limit_calls"] == 5
        params = {"accessKey": conn["login"], "secretKey": conn["password"]}
        response = requests.get(conn["host"] + PUBLIC_TOKEN, params=params, timeout=10)
        assert response.status_code == 200 and "PublicAuthKey" in response.json()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "AIRFLOW_CONN_LEADSQUARED_DEFAULT=" in stderr and "(5 calls / 2 s)" in stderr


def test_pytest_plugin_fixtures(tmp_path: Path) -> None:
    test_file = tmp_path / "test_user_dag.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            import pytest

            def test_plugin_does_not_import_airflow():
                assert not any(m == "airflow" or m.startswith("airflow.") for m in sys.modules)

            def test_conn(leadsquared_conn):
                conn = json.loads(os.environ["AIRFLOW_CONN_LEADSQUARED_DEFAULT"])
                assert conn["host"] == leadsquared_conn.url

            @pytest.mark.leadsquared_sandbox(rate_limit_calls=7)
            def test_marker(leadsquared_sandbox):
                assert leadsquared_sandbox.connection_dict()["extra"]["rate_limit_calls"] == 7

            @pytest.mark.parametrize("leadsquared_sandbox", [{"refusal_form": "200"}], indirect=True)
            def test_indirect(leadsquared_sandbox):
                assert leadsquared_sandbox.config.refusal_form == "200"

            def test_factory(leadsquared_sandbox_factory):
                a, b = leadsquared_sandbox_factory(), leadsquared_sandbox_factory(portal_id="p2")
                assert a.url != b.url and b.portal_id == "p2"
            """
        )
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:leadsquared",
        "-p",
        "airflow_provider_lsq.testing.pytest_plugin",
        str(test_file),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout


# --- the account's other integrations ----------------------------------------------------------------


def test_background_traffic_spends_the_budget_and_a_lockout_refuses_both_callers() -> None:
    """Other integrations at 40 calls/s on a 10 per 1 s account: they alone push it over, and the
    lockout refuses our calls too; every refusal is counted against the caller whose call it was."""
    with Sandbox(rate_limit_calls=10, rate_limit_period=1.0, background_rate=40.0, seed=3) as sandbox:
        keys = {"accessKey": sandbox.access_key, "secretKey": sandbox.secret_key}
        deadline = time.monotonic() + 30
        while sandbox.calls_by_caller()["background"]["refused"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        statuses = [
            requests.get(sandbox.url + PUBLIC_TOKEN, params=keys, timeout=10).status_code for _ in range(30)
        ]
        state = requests.get(sandbox.url + "/_sandbox/state", timeout=10).json()
    # Read the totals once the sandbox (and its background traffic) has stopped: they no longer move.
    by_caller = sandbox.calls_by_caller()
    assert by_caller["background"]["accepted"] > 0 and by_caller["background"]["refused"] > 0
    assert 429 in statuses  # the account was locked out by the others' calls: ours were refused too
    assert by_caller["ours"]["refused"] == statuses.count(429)
    assert by_caller["ours"]["calls"] == 30
    assert sandbox.refusals == by_caller["ours"]["refused"] + by_caller["background"]["refused"]
    # The state endpoint was read while the background traffic still ran: a snapshot, never above the
    # final totals, and already showing the refusals the loop above waited for.
    assert 0 < state["by_caller"]["background"]["refused"] <= by_caller["background"]["refused"]
    assert state["by_caller"]["ours"]["calls"] == 30
    assert sandbox.max_calls_in_window() <= 10  # refused calls never count in the window


def test_background_rate_is_off_by_default_and_validated() -> None:
    with Sandbox() as sandbox:
        time.sleep(0.2)
        assert sandbox.calls_by_caller()["background"]["calls"] == 0
    with pytest.raises(ValueError, match="background_rate"):
        Sandbox(background_rate=-1)


@pytest.mark.leadsquared_sandbox(rate_limit_calls=5, background_rate=50.0, seed=4)
def test_pytest_plugin_passes_background_rate(leadsquared_sandbox: Sandbox) -> None:
    deadline = time.monotonic() + 30
    while leadsquared_sandbox.refusals_by_caller["background"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leadsquared_sandbox.config.background_rate == 50.0
    assert leadsquared_sandbox.refusals_by_caller["background"] > 0
    assert leadsquared_sandbox.refusals_by_caller["ours"] == 0


def test_cli_takes_background_rate() -> None:
    from airflow_provider_lsq.sandbox.__main__ import build_parser

    assert build_parser().parse_args(["--background-rate", "1.5"]).background_rate == 1.5
    assert build_parser().parse_args([]).background_rate == 0.0


def test_a_client_that_hangs_up_before_its_answer_is_processed_quietly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A killed task leaves its calls in flight: the sandbox registers them and prints no traceback."""
    import socket

    with Sandbox(latency=0.3) as sb:
        client = Client(sb)
        request = requests.Request(
            "POST",
            sb.url + REGISTER,
            params=client.params,
            headers=client.headers(),
            json={"LeadFields": lead_fields(("EmailAddress", "gone@example.edu"))},
        ).prepare()
        head = f"POST {request.path_url} HTTP/1.1\r\nHost: {sb.host}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in request.headers.items()
        )
        body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
        sock = socket.create_connection((sb.host, sb.port))
        # Reset, not a polite close, as the kernel does for a killed process's unread socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(head.encode() + b"\r\n" + body)
        deadline = time.monotonic() + 10
        while sb.find_lead("EmailAddress", "gone@example.edu") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()
        while not sb.calls and time.monotonic() < deadline:  # recorded once the latency has passed
            time.sleep(0.01)
        time.sleep(0.1)  # the answer's write fails just after the record
    lead = sb.find_lead("EmailAddress", "gone@example.edu")
    assert lead is not None and lead.portal_user
    assert "Traceback" not in capsys.readouterr().err


def test_the_demo_sandbox_takes_any_free_port_when_its_own_is_taken_after_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two demos starting at once (CI's lanes) both found 8765 free; the second sandbox could not bind
    it and the demo stopped. It now starts on any free port instead."""
    import socket

    from airflow_provider_lsq.example_dags import demo

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(demo, "SANDBOX_PORT", port)
        monkeypatch.setattr(demo, "port_is_free", lambda _port: True)  # free when checked, taken at bind
        sandbox = demo.SandboxProcess().start(timeout=30)
        try:
            assert sandbox.url.startswith("http://127.0.0.1:")
            assert not sandbox.url.endswith(f":{port}")
            assert sandbox.state()  # it answers
        finally:
            sandbox.stop()
