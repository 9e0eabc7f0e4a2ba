"""Connection input that cannot trip a run: every value read and checked once, when the connection is read.

Pasted whitespace is removed; a value no request can carry is refused naming the field and the
connection; a request that cannot be built is never retried as a transient failure; ``test_connection``
makes one attempt and says when ``portal_id`` is missing.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.exceptions import LeadSquaredConfigError, LeadSquaredRequestError
from airflow_provider_lsq.hooks.leadsquared import PUBLIC_TOKEN_PATH, REGISTER_PATH, LeadSquaredHook
from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.sandbox import Sandbox
from tests.helpers import calls_to, connect

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PASSWORD = "Samplepassword@123"
KEYS = {"login": "u$r-access-key", "password": "s3cr3t-secret-key"}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(rate_limit_calls=100, rate_limit_period=1.0) as sb:
        yield sb


def _conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> LeadSquaredHook:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "leadsquared", **fields}))
    return LeadSquaredHook(conn_id)


def _sandbox_conn(sandbox: Sandbox, **changes: Any) -> dict[str, Any]:
    conn: dict[str, Any] = json.loads(sandbox.connection_json())
    extra = {"retry_wait_seconds": 0.01, **conn.pop("extra"), **changes.pop("extra", {})}
    return {**conn, **changes, "extra": extra}


# -- whitespace ---------------------------------------------------------------------------------------


def test_pasted_whitespace_is_removed_and_registration_works_first_time(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: portal_id with a leading space and a trailing newline, keys and host too."""
    conn = _sandbox_conn(
        sandbox,
        host=f" {sandbox.url}\n",
        login=f"{sandbox.access_key}\n",
        password=f"\t{sandbox.secret_key} ",
        extra={"portal_id": f" {sandbox.portal_id}\n"},
    )
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_PASTED", json.dumps(conn))
    hook = LeadSquaredHook("lsq_pasted")
    assert hook.config.portal_id == sandbox.portal_id
    assert (hook.config.access_key, hook.config.secret_key) == (sandbox.access_key, sandbox.secret_key)

    result = hook.register_portal_user({"EmailAddress": "asha@example.com"}, PASSWORD)
    assert result.attempts == 1
    assert calls_to(sandbox, REGISTER_PATH) == 1


def test_numbers_as_text_with_whitespace_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _conn(
        monkeypatch, "lsq_numbers", **KEYS, extra={"rate_limit_calls": " 10\n", "timeout_seconds": "7.5"}
    )
    assert (hook.config.rate_limit_calls, hook.config.timeout_seconds) == (10, 7.5)


def test_a_blank_portal_id_is_no_portal_id(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _conn(monkeypatch, "lsq_blank", **KEYS, extra={"portal_id": " \n"})
    assert hook.config.portal_id is None


# -- refused values name the field and the connection ----------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"extra": {"portal_id": "abc def"}}, "portal_id"),
        ({"extra": {"portal_id": "abc\ndef"}}, "portal_id"),
        ({"extra": {"portal_id": "pörtal"}}, "portal_id"),
        ({"extra": {"portal_id": ["a"]}}, "portal_id"),
        ({"host": "portal api.leadsquared.com"}, "host"),
        ({"host": "ftp://portalapi.leadsquared.com"}, "host"),
        ({"host": "http://127.0.0.1:port"}, "host"),
        ({"host": "https://admin:S3cretPw@portalapi.leadsquared.com"}, "host"),  # shown in every error
        ({"host": "https://portalapi.leadsquared.com/?region=us"}, "host"),  # paths went after the query
        ({"extra": {"api_host": "https://api.leadsquared.com#x"}}, "api_host"),
        ({"host": "127.0.0.1", "port": 99999}, "port"),  # was "field 'request'" on every row
        ({"host": "127.0.0.1", "port": -1}, "port"),
        ({"extra": {"api_host": "api\tus11.leadsquared.com"}}, "api_host"),
        ({"extra": {"rate_limit_calls": "2.5"}}, "rate_limit_calls"),
        ({"extra": {"rate_limit_calls": True}}, "rate_limit_calls"),
        ({"extra": {"rate_limit_period_seconds": "inf"}}, "rate_limit_period_seconds"),
        ({"extra": {"timeout_seconds": "nan"}}, "timeout_seconds"),
        ({"extra": {"max_retries": -1}}, "max_retries"),
        ({"extra": {"rate_limit_storage": "localhost:6379"}}, "rate_limit_storage"),
        ({"extra": {"rate_limit_storage": "/shared/lsq\x00budget"}}, "rate_limit_storage"),
        ({"extra": {"rate_limit_storage": "/shared/lsq\nbudget"}}, "rate_limit_storage"),
        # Past about 1e9 s a duration overflowed the socket's timeout (a raw OverflowError stopped the
        # run) or the Redis budget's stamps ("could not be reached"); a tiny period overflowed the
        # worker count. Each number is held to its form field's bounds, however it was set.
        ({"extra": {"timeout_seconds": 1e30}}, "timeout_seconds"),
        ({"extra": {"timeout_seconds": "0.001"}}, "timeout_seconds"),
        ({"extra": {"rate_limit_period_seconds": 1e308}}, "rate_limit_period_seconds"),
        ({"extra": {"rate_limit_period_seconds": 5e-324}}, "rate_limit_period_seconds"),
        ({"extra": {"rate_limit_margin_seconds": "1e300"}}, "rate_limit_margin_seconds"),
        ({"extra": {"retry_wait_seconds": 1e300}}, "retry_wait_seconds"),
        ({"extra": {"max_retries": 10**30}}, "max_retries"),
    ],
)
def test_values_no_request_can_carry_are_refused_naming_field_and_connection(
    fields: dict[str, Any], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = _conn(monkeypatch, "lsq_refused", **KEYS, **fields)
    with pytest.raises(LeadSquaredConfigError) as err:
        hook.config  # noqa: B018
    assert err.value.field == field and err.value.conn_id == "lsq_refused"
    assert f"'{field}'" in str(err.value) and "'lsq_refused'" in str(err.value)
    assert isinstance(err.value, ValueError)  # what callers of 0.1.0 caught


@pytest.mark.parametrize("field", ["login", "password"])
def test_a_key_with_an_inner_newline_is_refused_without_showing_it(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cr3t\nrest-of-key"
    hook = _conn(monkeypatch, "lsq_key", **{**KEYS, field: secret})
    with pytest.raises(LeadSquaredConfigError) as err:
        hook.config  # noqa: B018
    assert err.value.field == field
    assert "s3cr3t" not in str(err.value) and "rest-of-key" not in str(err.value)


def test_a_bad_connection_stops_a_bulk_run_before_any_call(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = _sandbox_conn(sandbox, extra={"portal_id": "sandbox portal"})
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_BAD_PORTAL", json.dumps(conn))
    hook = LeadSquaredHook("lsq_bad_portal")
    leads = [(str(i), {"EmailAddress": f"a{i}@example.com"}) for i in range(3)]
    with pytest.raises(LeadSquaredConfigError, match="portal_id"):
        list(hook.register_portal_users(leads))
    assert sandbox.calls == []


# -- a request that cannot be built is permanent -------------------------------------------------------


def test_an_unbuildable_request_is_never_retried_and_names_the_header(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, max_retries=5))
    for value in ("café€", "line\nbreak", " leading"):
        with pytest.raises(LeadSquaredRequestError) as err:
            hook.request("GET", PUBLIC_TOKEN_PATH, headers={"X-Custom": value})
        assert err.value.field == "X-Custom" and err.value.attempts == 1
        assert value.strip() not in str(err.value)
    assert sandbox.calls == []


def test_rows_whose_request_cannot_be_built_end_invalid_naming_the_field(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were a bad portal_id to get past the connection's checks, each row ends invalid, not retryable."""
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, max_retries=5))
    hook.__dict__["config"] = dataclasses.replace(hook.config, portal_id=" sandbox-portal\n")
    leads = [(str(i), {"EmailAddress": f"a{i}@example.com"}) for i in range(3)]
    outcomes = list(hook.register_portal_users(leads))
    assert {o.status for o in outcomes} == {RegistrationStatus.INVALID}
    for outcome in outcomes:
        assert outcome.error_message is not None and "'portal_id'" in outcome.error_message
        assert not outcome.retryable and outcome.error_type == "RequestError"
    assert sandbox.register_calls == 0


# -- test_connection --------------------------------------------------------------------------------


def test_test_connection_makes_one_attempt_on_a_failing_host(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full retries with backoff made the UI's Test button hang for ~40 s: now one attempt answers."""
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, max_retries=5, retry_wait_seconds=5))
    sandbox.inject(502, 502, 502, 502, 502, 502)
    ok, message = hook.test_connection()
    assert not ok and "502" in message
    assert calls_to(sandbox, PUBLIC_TOKEN_PATH) == 1


def test_test_connection_on_a_closed_port_fails_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _conn(monkeypatch, "lsq_closed", host="http://127.0.0.1:9", **KEYS, extra={"max_retries": 5})
    ok, message = hook.test_connection()
    assert not ok and "127.0.0.1:9" in message and KEYS["password"] not in message


def test_test_connection_says_when_portal_id_is_missing(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = _sandbox_conn(sandbox)
    conn["extra"].pop("portal_id")
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_NO_PORTAL", json.dumps(conn))
    ok, message = LeadSquaredHook("lsq_no_portal").test_connection()
    assert not ok and "portal_id" in message and "keys were accepted" in message

    ok, message = LeadSquaredHook(connect(monkeypatch, sandbox)).test_connection()
    assert ok, message


def test_test_connection_names_a_refused_field(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _conn(monkeypatch, "lsq_tc_bad", **KEYS, extra={"portal_id": "a b"})
    ok, message = hook.test_connection()
    assert not ok and "'portal_id'" in message and "'lsq_tc_bad'" in message


def test_test_connection_with_wrong_keys_fails(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = _sandbox_conn(sandbox, password="wrong-secret-key")
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_WRONG", json.dumps(conn))
    ok, message = LeadSquaredHook("lsq_wrong").test_connection()
    assert not ok and "wrong-secret-key" not in message
    assert calls_to(sandbox, PUBLIC_TOKEN_PATH) == 1


@pytest.mark.parametrize("where", ["file-under-a-file", "missing-redis-connection"])
def test_a_budget_storage_that_cannot_be_opened_names_the_field_and_sends_nothing(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, where: str
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the budget's folder should be")
    if where == "file-under-a-file":
        extra, field = {"rate_limit_storage": str(blocker / "budget.sqlite3")}, "rate_limit_storage"
    else:
        extra, field = {"rate_limit_redis_conn_id": "no_such_redis_conn"}, "rate_limit_redis_conn_id"
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, "lsq_storage", **extra))
    with pytest.raises(LeadSquaredConfigError, match=f"'lsq_storage': field '{field}'") as raised:
        hook.get_public_auth_key()
    assert raised.value.field == field
    assert not sandbox.calls  # nothing is sent without the budget
    if field == "rate_limit_redis_conn_id":  # advice that works: rate_limit_storage cannot override it
        assert "connection 'no_such_redis_conn' exists (type redis)" in raised.value.message
        assert "memory" not in raised.value.message


def test_a_malformed_deprecated_redis_uri_never_shows_its_password(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unencoded ``/`` in the password makes redis-py quote part of it as the 'port'."""
    import warnings

    password = "R3d$Pw+/=&x"
    storage = f"redis://:{password}@127.0.0.1:6379/0"
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, "lsq_bad_uri", rate_limit_storage=storage))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LeadSquaredConfigError, match="'rate_limit_storage'") as raised:
            hook.get_public_auth_key()
    error = raised.value
    texts = [
        str(error),
        repr(error.__cause__),
        repr(error.__context__) if not error.__suppress_context__ else "",
    ]
    for fragment in ("R3d$Pw+", "R3d", password):
        assert all(fragment not in text for text in texts), texts
    assert not sandbox.calls


def test_only_a_redis_uri_in_rate_limit_storage_is_treated_as_a_secret(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``memory`` or a file path is no secret: masking it hid the word in every later log line and
    error (``or '***' (this process only)``). A deprecated Redis URI's password still is."""
    import warnings

    memory = LeadSquaredHook(connect(monkeypatch, sandbox, "lsq_memory", rate_limit_storage="memory"))
    assert memory.config.rate_limit_storage == "memory"
    assert memory.redact("storage: memory") == "storage: memory"

    uri = "redis://:S3cretPw@127.0.0.1:6379/0"
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, "lsq_uri", rate_limit_storage=uri))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hook.config.rate_limit_storage == uri
    assert "S3cretPw" not in hook.redact(f"password S3cretPw in {uri}")


def test_every_bound_the_form_shows_is_the_one_the_connection_is_held_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The form's JSON Schema (Airflow 3.2+ checks it) and the reader (CLI, env, secrets) agree."""
    from airflow_provider_lsq.connection_form import CONN_FIELDS

    checked = 0
    for name, spec in CONN_FIELDS.items():
        schema = spec["schema"]
        for bound, step in (("minimum", -1), ("maximum", +1)):
            if bound not in schema or name == "rate_limit_reserve":
                continue
            limit = schema[bound]
            ok = _conn(monkeypatch, f"lsq_{name}_{bound}_ok", **KEYS, extra={name: limit})
            assert getattr(ok.config, name) == limit
            outside = limit + step * (0.05 if "number" in schema["type"] else 1)
            if outside <= 0:
                continue  # below zero has its own message
            bad = _conn(monkeypatch, f"lsq_{name}_{bound}_bad", **KEYS, extra={name: outside})
            with pytest.raises(LeadSquaredConfigError, match=f"'{name}' must be from") as err:
                bad.config  # noqa: B018
            assert err.value.field == name
            checked += 1
    assert checked >= 5


def test_a_budget_file_path_may_hold_spaces_and_any_letter(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A path such as ``/mnt/Shared Drive/lsq`` was refused as a value "no request can carry"."""
    folder = tmp_path / "Shared Drive" / "bütçe"
    folder.mkdir(parents=True)
    hook = LeadSquaredHook(connect(monkeypatch, sandbox, "lsq_spaced", rate_limit_storage=f" {folder}\n"))
    assert hook.config.rate_limit_storage == str(folder)
    hook.get_public_auth_key()
    assert list(folder.glob("*.sqlite3")), "the budget file is in the folder named"


def test_memory_storage_in_any_case_is_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """``Memory`` was a file of that name in the task's working directory."""
    monkeypatch.chdir(tmp_path)
    hook = _conn(monkeypatch, "lsq_memory_case", **KEYS, extra={"rate_limit_storage": "Memory"})
    assert hook.config.rate_limit_storage == "memory"
    assert type(hook.rate_limiter.store).__name__ == "MemoryLeaseStore"
    assert list(tmp_path.iterdir()) == []


def test_test_connection_answers_in_time_when_the_server_trickles_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """requests' timeout bounds each wait for a byte, not the exchange: a host that answers a byte at a
    time kept the Test button waiting for as long as it trickled (minutes)."""
    import socket
    import threading
    import time

    from airflow_provider_lsq.hooks import leadsquared

    monkeypatch.setattr(leadsquared, "TEST_TIMEOUT_SECONDS", 1.0)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"x" * 200:
                if stop.wait(0.3):
                    return
                conn.sendall(bytes([byte]))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    hook = _conn(monkeypatch, "lsq_trickle", host=host, **KEYS, extra={"portal_id": "p"})
    started = time.monotonic()
    try:
        ok, message = hook.test_connection()
    finally:
        stop.set()
        server.close()
    assert time.monotonic() - started < 4
    assert not ok and "did not answer within 2 s" in message and f"127.0.0.1:{port}" in message
    assert KEYS["password"] not in message


@pytest.mark.parametrize(
    "extra", ['{"portal_id": "p1", "rate_limit_calls": 10,}', "{not json", "portal_id=p1"]
)
def test_an_extra_that_is_not_json_is_refused_naming_the_field_and_connection(extra: str) -> None:
    """Airflow reads invalid JSON as no extra at all (it only logs): every extra silently took its
    default, e.g. 25 calls per 5 s on a plan of 10, and the portal id went missing."""
    from airflow_provider_lsq.hooks.config import LeadSquaredConfig
    from airflow_provider_lsq.version_compat import Connection

    conn = Connection(
        conn_id="lsq_bad_json", conn_type="leadsquared", login="ak-1", password="sk-1", extra=extra
    )
    with pytest.raises(
        LeadSquaredConfigError, match="'lsq_bad_json': field 'extra' is not valid JSON"
    ) as err:
        LeadSquaredConfig.from_connection(conn)
    assert err.value.field == "extra" and "p1" not in str(err.value)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"extra": '{"portal_id": "p1", "rate_limit_calls": 10,}'}, "extra"),
        ({"extra": "{not json"}, "extra"),
        ('{"conn_type": "leadsquared", "login": "ak-1", "password": "s3cr3t-secret-key",}', None),
        ({"port": "80a"}, None),  # Airflow's own read of the variable fails: a port that is no number
        ({"pasword": "s3cr3t-secret-key"}, None),  # a misspelt key
        ("leadsquared://ak-1:s3cr3t-secret-key@portal.example:80a/?portal_id=p1", None),
    ],
)
def test_an_environment_connection_that_is_not_json_is_refused_naming_the_variable_on_every_airflow(
    monkeypatch: pytest.MonkeyPatch, value: dict[str, str] | str, field: str | None
) -> None:
    """Airflow 3.0 and 3.1 read an AIRFLOW_CONN_ variable whose JSON (or extra) does not parse as no
    connection: the task said "isn't defined" and was retried. 3.2+ hands it over and the reader names
    the field. Either way the error names the connection and the field, never the text."""
    variable = "AIRFLOW_CONN_LSQ_ENV_JSON"
    if isinstance(value, dict):
        value = json.dumps(
            {"conn_type": "leadsquared", "login": "ak-1", "password": KEYS["password"], **value}
        )
    monkeypatch.setenv(variable, value)
    with pytest.raises(
        LeadSquaredConfigError, match=r"'lsq_env_json': (field 'extra'|the value of AIRFLOW_CONN)"
    ) as err:
        LeadSquaredHook("lsq_env_json").config  # noqa: B018
    message = str(err.value)
    assert "is not valid JSON" in message or "cannot be read as a connection" in message
    assert "p1" not in message and KEYS["password"] not in message and "80a" not in message
    assert err.value.field == (field or variable)
    if field is None:  # no Airflow reads it: the variable is named
        assert variable in message


@pytest.mark.airflow_db
def test_an_unreadable_environment_connection_never_falls_through_to_a_stored_one(
    airflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow 3.0 and 3.1 answered an unreadable AIRFLOW_CONN_ variable with the metadata database's
    connection of the same id: the run took another portal's settings, and said nothing."""
    from airflow.models import Connection as StoredConnection
    from airflow.utils.session import create_session

    conn_id = "lsq_env_and_stored"
    with create_session() as session:
        session.query(StoredConnection).filter(StoredConnection.conn_id == conn_id).delete()
        session.add(
            StoredConnection(
                conn_id=conn_id,
                conn_type="leadsquared",
                login="stored-ak",
                password="stored-sk",
                extra=json.dumps({"portal_id": "stored-portal"}),
            )
        )
    try:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            json.dumps({"conn_type": "leadsquared", "login": "ak-1", "extra": '{"portal_id": "p1",}'}),
        )
        with pytest.raises(LeadSquaredConfigError, match=f"'{conn_id}': field 'extra' is not valid JSON"):
            LeadSquaredHook(conn_id).config  # noqa: B018
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}")
        from airflow_provider_lsq.version_compat import AirflowNotFoundException

        try:  # alone, the stored one is what Airflow answers with (where this process reads the DB)
            stored = LeadSquaredHook(conn_id).config.portal_id
        except AirflowNotFoundException:  # 3.1+ outside a task: only a task's supervisor reads the DB
            stored = None
        assert stored in {None, "stored-portal"}
    finally:
        with create_session() as session:
            session.query(StoredConnection).filter(StoredConnection.conn_id == conn_id).delete()


def test_an_environment_variable_behind_a_configured_secrets_backend_is_left_to_airflow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With [secrets] backend set (Vault, AWS, ...), Airflow asks that backend first and reads the
    variable only if it has no such connection: a stale variable beside it is not the provider's to
    refuse."""
    from airflow_provider_lsq.hooks.config import unreadable_env_connection

    monkeypatch.setenv("AIRFLOW_CONN_LSQ_BEHIND_VAULT", '{"conn_type": "leadsquared", "extra": "{,"}')
    assert unreadable_env_connection("lsq_behind_vault") is not None
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", "some.vault.Backend")
    assert unreadable_env_connection("lsq_behind_vault") is None
    monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND")
    monkeypatch.setenv("AIRFLOW__WORKERS__SECRETS_BACKEND", "some.vault.Backend")
    assert unreadable_env_connection("lsq_behind_vault") is None


def test_a_connection_that_is_not_defined_anywhere_is_airflows_own_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_provider_lsq.version_compat import AirflowNotFoundException

    monkeypatch.delenv("AIRFLOW_CONN_LSQ_NOWHERE", raising=False)
    with pytest.raises(AirflowNotFoundException, match="lsq_nowhere"):
        LeadSquaredHook("lsq_nowhere").config  # noqa: B018


@pytest.mark.parametrize("redis_conn", [None, {"conn_type": "redis", "host": "127.0.0.1", "port": 9}])
def test_test_connection_says_when_the_redis_budget_cannot_be_used(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, redis_conn: dict[str, Any] | None
) -> None:
    """The Test button skipped the rate-limit budget: with its Redis connection missing or down it said
    the connection works, and every run then stopped at its first call."""
    if redis_conn is not None:
        monkeypatch.setenv("AIRFLOW_CONN_LSQ_BUDGET_REDIS", json.dumps(redis_conn))
    hook = LeadSquaredHook(
        connect(monkeypatch, sandbox, "lsq_budget", rate_limit_redis_conn_id="lsq_budget_redis")
    )
    ok, message = hook.test_connection()
    assert not ok and "keys were accepted" in message
    assert "'lsq_budget': field 'rate_limit_redis_conn_id'" in message and "lsq_budget_redis" in message
    if redis_conn is not None:  # the web server may be the one machine a firewall keeps from Redis
        assert f"from {socket.gethostname()!r}, where the test ran" in message


@pytest.mark.redis
# Any letter Airflow allows in a connection id: it was refused as a value "no request can carry".
@pytest.mark.parametrize("redis_conn_id", ["lsq_budget_redis_ok", "lsq_budget_rédis:prod#2"])
def test_test_connection_passes_with_a_working_redis_budget(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_conn_id: str
) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    redis_conn = {
        "conn_type": "redis",
        "host": parts.hostname,
        "port": parts.port,
        "extra": {"db": int(parts.path[1:])},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{redis_conn_id.upper()}", json.dumps(redis_conn))
    hook = LeadSquaredHook(
        connect(monkeypatch, sandbox, "lsq_budget_ok", rate_limit_redis_conn_id=redis_conn_id)
    )
    assert hook.test_connection() == (
        True,
        "Connection to LeadSquared works: the keys were accepted and a portal is set.",
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # Airflow reads a URI's [::1] as the host '::1': it was refused as "not a host name or URL".
        ({"uri": "leadsquared://ak:sk@[::1]:8765/?portal_id=p1"}, "https://[::1]:8765"),
        ({"host": "[::1]", "port": 8765}, "https://[::1]:8765"),  # the port was dropped
        ({"host": "http://[2001:db8::5]", "port": 8080}, "http://[2001:db8::5]:8080"),
        ({"host": "http://[::1]:9000", "port": 8765}, "http://[::1]:9000"),  # the host's own port wins
        (
            {"host": "http://proxy.internal/lsq/", "port": 8080},
            "http://proxy.internal:8080/lsq",
        ),  # was .../lsq:8080
        ({"host": "portalapi.leadsquared.com", "port": 443}, "https://portalapi.leadsquared.com:443"),
    ],
)
def test_an_ipv6_host_or_a_host_with_a_path_keeps_the_connections_port(
    fields: dict[str, Any], expected: str
) -> None:
    from airflow.models import Connection

    from airflow_provider_lsq.hooks.config import LeadSquaredConfig

    if "uri" not in fields:
        fields = {"conn_type": "leadsquared", "login": "ak", "password": "sk", **fields}
    conn = Connection(conn_id="lsq_ports", **fields)
    assert LeadSquaredConfig.from_connection(conn).base_url == expected


def test_a_redis_connection_id_with_a_space_is_refused_naming_the_field() -> None:
    from airflow.models import Connection

    from airflow_provider_lsq.hooks.config import LeadSquaredConfig

    extra = json.dumps({"rate_limit_redis_conn_id": "redis default"})
    conn = Connection(conn_id="lsq_space", conn_type="leadsquared", login="ak", password="sk", extra=extra)
    with pytest.raises(
        LeadSquaredConfigError, match="'lsq_space': field 'rate_limit_redis_conn_id' must be a connection id"
    ):
        LeadSquaredConfig.from_connection(conn)
