"""Test helpers: a sandbox behind an Airflow connection, and the task log as tests read it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pytest

    from airflow_provider_lsq.sandbox import Sandbox

# Keys full of the characters that break a client which forgets to URL-encode them.
NASTY_ACCESS_KEY = "u$r+AK/9=x&y$$1"
NASTY_SECRET_KEY = "s3cr$t+/==&amp;z+Q$"


def connect(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, conn_id: str = "lsq_test", **extra: Any
) -> str:
    """Point connection ``conn_id`` at ``sandbox`` (fast retries unless overridden); return the id."""
    conn = json.loads(sandbox.connection_json())
    conn["extra"] = {"retry_wait_seconds": 0.01, **conn["extra"], **extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def secret_forms(*secrets: str) -> set[str]:
    """Each secret as text may carry it: raw and in both URL encodings (a logged URL holds those)."""
    return {form for s in secrets for form in (s, quote(s, safe=""), quote_plus(s, safe="")) if form}


def sandbox_secrets(sandbox: Sandbox) -> set[str]:
    """Every form of the sandbox's keys and tokens."""
    return secret_forms(
        sandbox.access_key, sandbox.secret_key, sandbox.public_auth_key, sandbox.registration_token
    )


class RecordingPasswords:
    """A ``password_callable`` that makes real random passwords and keeps them, for leak checks."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, lead: Any) -> str:
        from airflow_provider_lsq.passwords import generate_password

        password = generate_password()
        with self._lock:
            self.made.append(password)
        return password


def fetch_all(db: Any, sql: str) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a fresh DB-API connection ``db``, return every row, and close it."""
    try:
        cur = db.cursor()
        cur.execute(sql)
        return list(cur.fetchall())
    finally:
        db.close()


def calls_to(sandbox: Sandbox, path: str) -> int:
    return sum(1 for call in sandbox.calls if call.path == path)


class TaskLog:
    """The task's log output: stdlib records (caplog) and console lines (structlog on Airflow 3)."""

    def __init__(self, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
        self.caplog = caplog
        self.capsys = capsys
        self.console = ""

    def sources(self) -> list[str]:
        out = self.capsys.readouterr()
        self.console += out.out + out.err
        return [self.caplog.text, self.console]

    def __call__(self) -> str:
        return "\n".join(self.sources())

    def count(self, text: str) -> int:
        """Occurrences of ``text`` in the log (Airflow 2 writes each line to both sources)."""
        return max(source.count(text) for source in self.sources())


def call_execute(op: Any, context: Any) -> Any:
    """Run ``op``'s own ``execute`` (as a task process would); its result, or the exception it raised.

    For operators run on threads: Airflow 2's executor safeguard keeps per-thread state set up on the
    main thread only, so the wrapped ``execute`` is called directly.
    """
    execute = getattr(type(op).execute, "__wrapped__", type(op).execute)
    try:
        return execute(op, context)
    except BaseException as error:
        return error


@contextlib.contextmanager
def silent_server(drop_after: float | None = None) -> Iterator[tuple[int, list[float]]]:
    """A TCP server on loopback that accepts every connection and never answers (a hung database or
    host); with ``drop_after``, it closes each connection that many seconds after accepting it.
    Yields its port and the monotonic times it accepted connections at."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[float] = []
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn = server.accept()[0]
            except OSError:
                continue
            accepted.append(time.monotonic())
            held.append(conn)
            if drop_after is not None:
                threading.Timer(drop_after, conn.close).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
