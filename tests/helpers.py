"""Test helpers: a sandbox behind an Airflow connection, and the task log as tests read it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import warnings
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


def named_sandbox_secrets(sandbox: Sandbox, *passwords: str) -> dict[str, str]:
    """The sandbox's keys and tokens (and any portal ``passwords``) by name, for ``assert_no_secret``."""
    named = {
        "access key": sandbox.access_key,
        "secret key": sandbox.secret_key,
        "public auth key": sandbox.public_auth_key,
        "registration token": sandbox.registration_token,
    }
    named.update({f"portal password {i + 1}": password for i, password in enumerate(passwords)})
    return named


def assert_no_secret(text: str, named: dict[str, str], place: str = "the text") -> None:
    """Fail, naming which secrets (never their values), if any form of one (``secret_forms``) is in
    ``text``. ``pytest.fail``, not an assertion: pytest's message for an assertion would show the
    values it compared, and so print the secret it found."""
    import pytest

    text = without_airflow_mask_lines(text, named.get("secret key"))
    which = sorted(name for name, value in named.items() if any(f in text for f in secret_forms(value)))
    if which:
        pytest.fail(
            f"{', '.join(which)} reached {place}, first at:\n{_where_secret(text, named)}", pytrace=False
        )


def airflow_mask_line(line: str, secret_key: str) -> bool:
    """Whether ``line`` is Airflow 3's own DEBUG line for the mask of the connection's password.

    Airflow 3's in-process supervisor (``dags test``, ``dag.test()``) logs ``Sending request
    msg=MaskSecret(value='...')`` at DEBUG for each mask its task runner registers, among them the one
    Airflow's ``_get_connection`` registers for the connection's password (the LeadSquared secret key)
    before any provider code runs (docs/hook.md). Inside pytest, Airflow 3.0's ``dag.test()`` writes
    those lines at any logging level."""
    return "[debug" in line and "Sending request " in line and f"msg=MaskSecret(value='{secret_key}'" in line


def without_airflow_mask_lines(text: str, secret_key: str | None) -> str:
    """``text`` with the secret key taken out of Airflow 3's own mask lines for it
    (:func:`airflow_mask_line`), with a warning that says how many: only the ``MaskSecret(value=...)``
    part goes, so the rest of each line, and every other secret anywhere, is still looked at."""
    from airflow_provider_lsq.version_compat import AIRFLOW_V_3_0_PLUS

    if not (AIRFLOW_V_3_0_PLUS and secret_key):
        return text
    own = f"msg=MaskSecret(value='{secret_key}'"
    lines = text.splitlines()
    kept = [
        line.replace(own, "msg=MaskSecret(value=<Airflow's own>")
        if airflow_mask_line(line, secret_key)
        else line
        for line in lines
    ]
    dropped = sum(1 for line in lines if airflow_mask_line(line, secret_key))
    if not dropped:
        return text
    warnings.warn(
        f"Airflow's in-process supervisor logged the connection's password at DEBUG in {dropped} "
        "'Sending request msg=MaskSecret' lines (Airflow's own mask of it, before any provider code).",
        stacklevel=3,
    )
    return "\n".join(kept)


def _where_secret(text: str, named: dict[str, str]) -> str:
    """The text around the first secret found, every secret in it replaced by its name."""
    forms = sorted(
        ((form, name) for name, value in named.items() for form in secret_forms(value)),
        key=lambda pair: -len(pair[0]),
    )
    first = min(text.find(form) for form, _ in forms if form in text)
    around = text[max(0, first - 300) : first + 300]
    for form, name in forms:
        around = around.replace(form, f"<{name}>")
    return around


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


def write_dag_as_the_processor_would(dag: Any) -> None:
    """On Airflow 3.0.x, write ``dag`` to the metadata DB (its DagModel, serialized DAG and version) and
    activate its assets, as 3.0's DAG processor does when it parses the DAG's file; elsewhere nothing.

    A task may only emit events for (or read) an active asset: the task runner asks the API server,
    and an asset with no ``asset_active`` row fails the task with
    ``AirflowInactiveAssetInInletOrOutletException``. Airflow 3.1+'s ``dag.test()`` syncs the DAG's
    bundle to the DB first, and Airflow 2 has no such check; 3.0's ``dag.test()`` does neither, so a
    DAG no processor has parsed cannot emit its outlets' events there. This is the call 3.0's own
    ``DagBag.sync_to_db`` (``airflow dags reserialize``) makes, for this one DAG, under the bundle
    whose folder holds its file (``dags-folder`` otherwise).
    """
    from airflow_provider_lsq.version_compat import AIRFLOW_V_3_0_PLUS, AIRFLOW_V_3_1_PLUS

    if not AIRFLOW_V_3_0_PLUS or AIRFLOW_V_3_1_PLUS:
        return
    from pathlib import Path

    import airflow.models.dag
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.collection import update_dag_parsing_results_in_db
    from airflow.serialization.serialized_objects import LazyDeserializedDAG, SerializedDAG
    from airflow.utils.session import create_session

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    bundle_name = "dags-folder"
    fileloc = Path(dag.fileloc).resolve()
    for bundle in manager.get_all_dag_bundles():
        with contextlib.suppress(Exception):  # a bundle with no local path (git, before its clone)
            if fileloc.is_relative_to(Path(bundle.path).resolve()):
                bundle_name = bundle.name
                break
    parsed = (
        dag
        if isinstance(dag, airflow.models.dag.DAG)
        else LazyDeserializedDAG(data=SerializedDAG.to_dict(dag))
    )
    errors: dict[str, str] = {}
    with create_session() as session:
        update_dag_parsing_results_in_db(bundle_name, None, [parsed], errors, set(), session=session)
    assert not errors, f"Airflow could not serialize DAG {dag.dag_id}: {errors}"


def dag_test(dag: Any, logical_date: Any, **kwargs: Any) -> Any:
    """``dag.test()`` for one logical date, as each Airflow needs it; the DagRun it returns.

    Airflow 3 calls the date ``logical_date``, 2.x ``execution_date``. On 3.0.x the DAG is first written
    to the metadata DB as the DAG processor would (``write_dag_as_the_processor_would``), so its assets
    are active, as 3.1+'s ``dag.test()`` does itself. On Airflow 2, ``dag.test()`` first deletes an
    earlier run of the same date, which cascades to the run's notes, whose foreign key names FAB's
    ``ab_user`` table: its model must be loaded (the CLI does so).
    """
    from airflow_provider_lsq.version_compat import AIRFLOW_V_3_0_PLUS

    if AIRFLOW_V_3_0_PLUS:
        write_dag_as_the_processor_would(dag)
        return dag.test(logical_date=logical_date, **kwargs)
    import airflow.providers.fab.auth_manager.models  # noqa: F401

    return dag.test(execution_date=logical_date, **kwargs)
