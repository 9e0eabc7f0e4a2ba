"""Register a week of synthetic applicants with the example DAG, against a local sandbox.

One command on a fresh machine, no LeadSquared account needed: ``python -m
airflow_provider_lsq.example_dags.demo`` (``make demo`` in the repository runs the same):

1. point Airflow at the example DAGs shipped in this package (``airflow_provider_lsq/example_dags``)
   and a SQLite metadata DB under ``$AIRFLOW_HOME`` (default ``./.airflow``, in the current
   directory), migrating it on the first run;
2. start the LeadSquared sandbox (25 calls / 5 s, 200 ms answers, 3% gateway faults) as a subprocess;
3. seed the SQLite warehouse ``$AIRFLOW_HOME/demo_warehouse.db`` with ~150 applicants (only the
   ``applicants`` table: the ledger of registrations survives between runs);
4. on Airflow 3.0 only, ``airflow dags reserialize`` (3.0's ``dags test`` does not activate the DAG's
   assets itself, as 3.1's does); then ``airflow dags test lsq_register_new_applicants <today> -c
   '{"lookback_days": 7}'``, its full log going to ``$AIRFLOW_HOME/demo-dag-test.log``;
5. print the ledger and the sandbox's counters, and stop the sandbox.

Run it twice: the second run finds everyone in the ledger and makes no register call.
Exits non-zero when the DAG run failed.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

from packaging.version import Version

from airflow_provider_lsq.example_dags import seed_warehouse

EXAMPLE_DAGS = Path(__file__).resolve().parent

DAG_ID = "lsq_register_new_applicants"
TASK_ID = "register_new_applicants"
LEDGER_TABLE = "lsq_portal_registrations"
LOOKBACK_DAYS = 7
# The sandbox's usual port when it is free, so the portal's asset (``leadsquared://127.0.0.1:8765/...``)
# stays the same from one demo run to the next; any free port otherwise.
SANDBOX_PORT = 8765
SANDBOX_ARGS = [
    "--rate-limit",
    "25/5",
    "--latency",
    "0.2",
    "--fault-rate",
    "0.03",
    "--seed",
    "7",
]
# The DAG run's log lines worth showing on the console (the provider's own: progress, retries, skips,
# failures) and errors; everything goes to the log file. Formats: Airflow 3 (structlog) and 2.
AIRFLOW3_LINE = re.compile(r"^\S+Z \[(?P<level>\w+)\s*\] (?P<msg>.*?)(?: \[(?P<logger>[\w.]+)\].*)?$")
AIRFLOW2_LINE = re.compile(r"^\[[^\]]+\] \{(?P<logger>[\w.]+):\d+\} (?P<level>\w+) - (?P<msg>.*)$")
# Where the provider's lines come from: its logger names (Airflow 3.1+), or the source files Airflow
# 2.x and 3.0 name instead (every module that logs to the task, since the layout split).
PROVIDER_SOURCES = (
    "airflow_provider_lsq",
    "sql_to_leadsquared.py",
    "sql_to_leadsquared_leads.py",
    "planner.py",
    "lead_planner.py",
    "row_keys.py",
    "run.py",
    "progress.py",
    "leadsquared.py",
    "lead_api.py",
    "ledger.py",
    "store.py",
    "sink.py",
    "limiter.py",
    "warehouse.py",
)
SUMMARY = re.compile(r"LeadSquared registration summary: (\{.*\})")
# The line of a traceback that names the exception and holds its message, e.g.
# ``airflow.sdk.exceptions.AirflowFailException: Connection 'leadsquared_default': ...``.
EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Exception|Error): \S")


def say(text: str = "") -> None:
    print(text, flush=True)


def airflow_env(home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE_DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def migrate(home: Path, env: dict[str, str]) -> None:
    """``airflow db migrate`` once per Airflow version (a marker file records it)."""
    marker = home / f".migrated-{version('apache-airflow')}"
    if marker.exists() and (home / "airflow.db").exists():
        return
    say(f"Migrating the Airflow metadata DB at {home / 'airflow.db'} (first run only) ...")
    log_path = home / "demo-db-migrate.log"
    with log_path.open("w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        say(f"`airflow db migrate` failed (exit {result.returncode}); see {log_path}")
        raise SystemExit(result.returncode)
    marker.touch()


def register_assets(home: Path, env: dict[str, str]) -> None:
    """On Airflow 3.0, write the DAGs to the metadata DB first, as its DAG processor would.

    A task may only emit events for an active asset (its task runner asks the API server, and an asset
    with no ``asset_active`` row fails the task with ``AirflowInactiveAssetInInletOrOutletException``).
    The DAG processor's sync activates a DAG's assets. Airflow 3.1's ``dags test`` syncs the DAGs
    folder itself before the run; 3.0's does not, so its run of a DAG no processor has parsed fails:
    ``airflow dags reserialize`` is that sync (``DagBag.sync_to_db``). Airflow 2 has no such check.
    """
    airflow_version = Version(version("apache-airflow"))
    if not Version("3.0") <= airflow_version < Version("3.1"):
        return
    log_path = home / "demo-dags-reserialize.log"
    say("Airflow 3.0: writing the DAGs (and activating their assets) as the DAG processor would ...")
    with log_path.open("w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "reserialize"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        say(f"`airflow dags reserialize` failed (exit {result.returncode}); see {log_path}")
        raise SystemExit(result.returncode)


def port_is_free(port: int) -> bool:
    """Whether ``127.0.0.1:port`` can be bound now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the sandbox's server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``proc`` prints within ``timeout`` seconds ("" if none, or if it exits first)."""
    line: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else ""


class SandboxProcess:
    """The sandbox CLI as a subprocess: it prints the Airflow connection as one JSON line."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.connection: dict[str, Any] = {}

    def start(self, timeout: float = 30.0) -> SandboxProcess:
        # The usual port when free; any free port when it is taken, or when another process took it
        # between the check and the sandbox's bind (two demos starting at once).
        ports = [SANDBOX_PORT, 0] if port_is_free(SANDBOX_PORT) else [0]
        for port in ports:
            command = [
                sys.executable,
                "-m",
                "airflow_provider_lsq.sandbox",
                "--port",
                str(port),
                *SANDBOX_ARGS,
            ]
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            first = _first_line(self.proc, timeout)
            if first.strip():
                self.connection = json.loads(first)
                return self
            self.stop()
            errors = self.proc.stderr.read() if self.proc.stderr else ""
            if port == 0:
                raise SystemExit(f"The sandbox did not start within {timeout:.0f} s:\n{errors}")
        raise AssertionError("unreachable: the last port tried is 0")

    @property
    def url(self) -> str:
        return str(self.connection["host"]).rstrip("/")

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_sandbox/state", timeout=10) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ledger_exists(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (LEDGER_TABLE,))
    return row.fetchone() is not None


def ledger_done(warehouse: Path) -> int:
    """Rows the ledger holds as registered (or already registered) before this run."""
    if not warehouse.exists():
        return 0
    with sqlite3.connect(warehouse) as conn:
        if not ledger_exists(conn):
            return 0
        sql = f"SELECT COUNT(*) FROM {LEDGER_TABLE} WHERE status IN ('registered', 'already_registered')"
        return int(conn.execute(sql).fetchone()[0])


def console_line(line: str) -> str | None:
    """The message of a log line worth showing (with its level when not info), else None."""
    match = AIRFLOW3_LINE.match(line) or AIRFLOW2_LINE.match(line)
    if match is None:
        return line if line.startswith(("Traceback", "SystemExit", "airflow.")) else None
    level, message, logger = match["level"].lower(), match["msg"].strip(), match["logger"] or ""
    if SUMMARY.search(message):
        return None  # printed below, in words
    if any(source in logger for source in PROVIDER_SOURCES) or level in ("error", "critical"):
        return message if level == "info" else f"{level}: {message}"
    return None


def stream(proc: subprocess.Popen[str], log: IO[str]) -> tuple[list[str], dict[str, Any], str | None]:
    """Copy the child's output to the log and show the provider's lines.

    Returns a tail of the log, the summary, and the task's error in full: the lines shown as they come
    are shortened, and the tail may hold only a failure callback's traceback. That is the first line
    naming one of the provider's exceptions, else the first naming any exception (Airflow 2's CLI logs
    one of its own first when the executor's provider is missing).
    """
    tail: list[str] = []
    summary: dict[str, Any] = {}
    errors: dict[bool, str] = {}  # is it the provider's exception -> its first line
    last = None
    assert proc.stdout is not None
    for raw in proc.stdout:
        log.write(raw)
        line = raw.rstrip()
        tail = [*tail[-39:], line]
        if EXCEPTION_LINE.match(line):
            errors.setdefault(line.strip().startswith("airflow_provider_lsq."), line.strip())
        if found := SUMMARY.search(line):
            with contextlib.suppress(ValueError, SyntaxError):
                summary = ast.literal_eval(found[1])
        shown = console_line(line)
        if shown is not None and shown != last:  # Airflow 2 logs a task's lines twice, in two formats
            say("  | " + shorten(shown))
            last = shown
    return tail, summary, errors.get(True, errors.get(False))


def shorten(line: str, width: int | None = None) -> str:
    width = width or max(100, shutil.get_terminal_size((140, 20)).columns - 6)
    return line if len(line) <= width else line[: width - 3] + "..."


def table(rows: list[tuple[Any, ...]], headers: tuple[str, ...], indent: str = "  ") -> str:
    cells = [tuple("" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append(indent + "  ".join("-" * w for w in widths))
    lines += [indent + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def show_ledger(warehouse: Path) -> None:
    with sqlite3.connect(warehouse) as conn:
        if not ledger_exists(conn):
            say("The ledger table does not exist: the task did not get far enough to create it.")
            return
        say(f"Ledger {LEDGER_TABLE} in {warehouse} (all runs):")
        counts = conn.execute(
            f"SELECT status, COUNT(*), SUM(attempts) FROM {LEDGER_TABLE} GROUP BY status ORDER BY 2 DESC"
        ).fetchall()
        say(table(counts, ("status", "rows", "attempts")))
        say()
        bad = conn.execute(
            f"""SELECT l.row_key, a.first_name || ' ' || a.last_name, COALESCE(a.email, '(no email)'),
                       l.status, COALESCE(l.error_type, ''), COALESCE(l.error_message, '')
                FROM {LEDGER_TABLE} AS l
                LEFT JOIN applicants AS a ON CAST(a.applicant_id AS TEXT) = l.row_key
                WHERE l.status NOT IN ('registered', 'already_registered')
                ORDER BY CAST(l.row_key AS INTEGER)"""
        ).fetchall()
        if bad:
            say("Rows that did not register, and why:")
            for key, name, email, status, error_type, message in bad:
                say(f"  #{key} {name} <{email}>: {status} ({error_type})")
                say(f"      {message}")
            say()
        good = conn.execute(
            f"""SELECT l.row_key, a.first_name || ' ' || a.last_name, a.email, l.lead_id, l.attempts
                FROM {LEDGER_TABLE} AS l
                LEFT JOIN applicants AS a ON CAST(a.applicant_id AS TEXT) = l.row_key
                WHERE l.status IN ('registered', 'already_registered')
                ORDER BY CAST(l.row_key AS INTEGER) LIMIT 5"""
        ).fetchall()
        if good:
            say("A few registered rows:")
            say(table(good, ("row", "applicant", "email", "LeadId", "attempts")))
            shared = conn.execute(
                f"""SELECT COUNT(*), MIN(row_key), MAX(row_key), lead_id FROM {LEDGER_TABLE}
                    WHERE lead_id IS NOT NULL GROUP BY lead_id HAVING COUNT(*) > 1"""
            ).fetchall()
            for _count, low, high, lead_id in shared:
                say(
                    f"  #{low} and #{high} share an email: one lead, {lead_id}, registered once (the "
                    "other row is recorded already_registered, with no call: a second registration would "
                    "reset the applicant's password)."
                )
            say()


def main() -> int:
    started = time.monotonic()
    if importlib.util.find_spec("airflow.providers.sqlite") is None:
        say(
            "The demo's warehouse is SQLite, and the SQLite provider is not installed: "
            "install the package's [sqlite] extra (or apache-airflow-providers-sqlite), with your Airflow's "
            "constraints file"
        )
        return 2
    home = Path(os.environ.get("AIRFLOW_HOME") or ".airflow").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(home)
    warehouse = home / "demo_warehouse.db"
    today = dt.datetime.now(dt.timezone.utc).date()

    say(f"Airflow {version('apache-airflow')}, AIRFLOW_HOME={home}")
    migrate(home, env)

    sandbox = SandboxProcess()
    try:
        sandbox.start()
        say(f"LeadSquared sandbox on {sandbox.url}: 25 calls / 5 s, 200 ms latency, 3% gateway faults.")

        result = seed_warehouse.seed(warehouse, days=LOOKBACK_DAYS, count=150, end=today)
        say(
            f"Seeded {result.count} applicants created in [{result.start:%Y-%m-%d}, {result.end:%Y-%m-%d}) "
            f"into {warehouse.name}; bad rows: no email {numbers(result.no_email_ids)}, shared email "
            f"{numbers(result.duplicate_email_ids)}, unknown attribute "
            f"{numbers(result.unknown_attribute_ids)}."
        )
        already = ledger_done(warehouse)
        if already:
            say(
                f"The ledger already holds {already} registered applicants from earlier runs: the DAG's "
                "query leaves them out, so they are not registered again."
            )

        env["AIRFLOW_CONN_LEADSQUARED_DEFAULT"] = json.dumps(sandbox.connection)
        env["AIRFLOW_CONN_LSQ_WAREHOUSE"] = json.dumps({"conn_type": "sqlite", "host": str(warehouse)})
        # The DAG's outlet, the portal's asset, names the sandbox's portal (it gets the run's counts).
        env["LSQ_PORTAL_HOST"] = sandbox.connection["host"]
        env["LSQ_PORTAL_ID"] = sandbox.connection["extra"]["portal_id"]
        register_assets(home, env)
        command = [
            sys.executable, "-m", "airflow", "dags", "test", DAG_ID, today.isoformat(),
            "-c", json.dumps({"lookback_days": LOOKBACK_DAYS}),
        ]  # fmt: skip
        log_path = home / "demo-dag-test.log"
        say(f"\n$ airflow dags test {DAG_ID} {today} -c '{{\"lookback_days\": {LOOKBACK_DAYS}}}'")
        say(f"  (full log: {log_path})")
        run_started = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=home
            )
            tail, summary, first_error = stream(proc, log)
            code = proc.wait()
        run_seconds = time.monotonic() - run_started
        say()
        if code != 0:
            say(f"The DAG run FAILED (exit {code}) after {run_seconds:.1f} s.")
            if first_error is not None:
                say("The task's error, in full:")
                say(
                    textwrap.fill(
                        first_error, 100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
                    )
                )
            say("Last lines of the log:")
            for line in tail[-25:]:
                say("  " + line)
        else:
            say(f"The DAG run succeeded in {run_seconds:.1f} s.")
        if summary:
            say(describe(summary))
        say()

        show_ledger(warehouse)
        state = sandbox.state()
        calls = int(state.get("register_calls", 0))
        say(
            f"Sandbox (fresh for this run): {calls} register calls served, {state.get('refusals', 0)} "
            f"refused by its rate limit, {state.get('calls', 0)} calls in all (token fetches and retried "
            "gateway faults included)."
        )
        if code != 0:
            say(f"The DAG run failed: see {log_path}.")
        elif already and calls == 0:
            say(
                f"Second run: the ledger already held {already} registered applicants, so nobody was "
                "registered twice (0 register calls)."
            )
        elif already:
            say(f"Rerun: {calls} register calls, for applicants the ledger did not hold as registered yet.")
        else:
            say(
                "Run it again (`python -m airflow_provider_lsq.example_dags.demo`, or `make demo` in the "
                "repository): the ledger makes the second run skip everyone (0 register calls)."
            )
        say(f"Done in {time.monotonic() - started:.1f} s.")
        return 0 if code == 0 else 1
    finally:
        sandbox.stop()


def describe(summary: dict[str, Any]) -> str:
    """The task's summary in words (zero counts left out)."""
    labels = {
        "registered": "registered",
        "already_registered": "already registered",
        "invalid": "invalid",
        "failed": "failed",
        "skipped": "skipped (the ledger holds them as failed or invalid; retry_failed=True retries them)",
        "duplicates": "duplicates (a key or a lead met twice)",
    }
    parts = [f"{summary.get(name, 0)} {label}" for name, label in labels.items() if summary.get(name)]
    parts = parts or ["nothing to do"]
    return f"This run: the query returned {summary.get('total', 0)} rows: " + ", ".join(parts) + "."


def numbers(ids: tuple[int, ...]) -> str:
    return ", ".join(f"#{i}" for i in ids)


if __name__ == "__main__":
    sys.exit(main())
