"""A real Airflow deployment for tests: scheduler + LocalExecutor on a PostgreSQL metadata database.

Started the way a data team runs Airflow on one machine, each component its own process group:

- Airflow 3: ``airflow api-server --apps execution`` (the execution API the task supervisor talks
  to), ``airflow dag-processor`` and ``airflow scheduler`` with the LocalExecutor. The UI, the core
  REST API and the triggerer are left out: the tests need none of them.
- Airflow 2.11: ``airflow scheduler`` alone (it parses the DAG files itself) with the LocalExecutor.

Every setting is an environment variable (``AIRFLOW__...`` and ``AIRFLOW_CONN_...``), given to every
component and inherited by every task process. The metadata database is a fresh PostgreSQL database,
migrated with ``airflow db migrate`` and dropped at the end. DAGs start paused; a test unpauses its own
(the ``UPDATE`` ``airflow dags unpause`` runs, without paying for a CLI process) and the scheduler
creates the latest daily run at once (``catchup=False``). :meth:`Deployment.stop` kills every process
group and every descendant left, whatever happened in the test.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from pathlib import Path

AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """Airflow's processes for one test module; ``meta`` is an autocommit psycopg2 connection."""

    def __init__(self, home: Path, metadata_uri: str, env: dict[str, str]) -> None:
        self.home = home
        self.metadata_uri = metadata_uri
        self.port = free_port()
        self.env = {
            **os.environ,
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_uri.replace(
                "postgresql://", "postgresql+psycopg2://", 1
            ),
            "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
            # Fast loops: the scheduler looks for work every 0.5 s.
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__CORE__PARALLELISM": "4",
            # A task marked failed learns it at its next heartbeat: every second (Airflow 3's supervisor).
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            # Airflow 3: the execution API on a free port, tokens signed with a per-deployment secret.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # The DAG file never changes: parse it once (Airflow 3's dag-processor, Airflow 2's scheduler).
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        }
        self.env.pop("AIRFLOW_CONFIG", None)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.meta: Any = None

    # --- lifecycle -----------------------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 300) -> None:
        """One ``airflow`` CLI command, to completion; its output in the failure message."""
        done = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed ({done.returncode}):\n"
                f"{(done.stdout + done.stderr).decode(errors='replace')[-4000:]}"
            )

    def start(self, dag_ids: list[str]) -> None:
        import psycopg2

        self.airflow("db", "migrate")
        components = [["scheduler"]]
        if AIRFLOW_3:
            components = [
                ["api-server", "--apps", "execution", "--workers", "1", "--port", str(self.port)],
                ["dag-processor"],
                ["scheduler"],
            ]
        for args in components:
            name = args[0]
            with (self.home / f"{name}.log").open("wb") as out:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "airflow", *args],
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as one in stop()
                )
        self.meta = psycopg2.connect(self.metadata_uri)
        self.meta.autocommit = True
        self.wait_for(
            lambda: (
                len(self.query("SELECT dag_id FROM dag WHERE dag_id = ANY(%s)", (dag_ids,))) == len(dag_ids)
            ),
            "every DAG parsed and in the metadata database",
            timeout=240,
        )
        if AIRFLOW_3:
            self.wait_for(self._api_up, "the execution API answering", timeout=120)

    def _api_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Kill every process group started, and any descendant that left its group (task runners do)."""
        found: dict[int, psutil.Process] = {}
        for process in self.processes.values():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(process.pid)
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(list(found.values()), timeout=15)
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        if self.meta is not None:
            self.meta.close()
            self.meta = None

    # --- looking at it -------------------------------------------------------------------------------

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.meta.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

    def unpause(self, *dag_ids: str) -> None:
        """What ``airflow dags unpause`` does: the scheduler then creates the latest daily run."""
        with self.meta.cursor() as cur:
            cur.execute("UPDATE dag SET is_paused = false WHERE dag_id = ANY(%s)", (list(dag_ids),))

    def mark_failed(self, dag_id: str, task_id: str = "register") -> None:
        """What "Mark failed" does to a running task instance; its heartbeat then finds it failed."""
        with self.meta.cursor() as cur:
            cur.execute(
                "UPDATE task_instance SET state = 'failed', end_date = now() "
                "WHERE dag_id = %s AND task_id = %s AND state = 'running'",
                (dag_id, task_id),
            )
            assert cur.rowcount == 1, f"{dag_id}.{task_id} was not running"

    def task_log(self, dag_id: str, attempt: int, task_id: str = "register") -> str:
        """The text of the task's log for one try (one file per try on Airflow 2.11 and 3)."""
        (path,) = (self.home / "logs" / f"dag_id={dag_id}").glob(
            f"run_id=*/task_id={task_id}/attempt={attempt}.log"
        )
        return path.read_text(errors="replace")

    def task(self, dag_id: str, task_id: str = "register") -> tuple[str | None, int] | None:
        """(state, try_number) of the DAG's task in its only run, or None before the run exists."""
        rows = self.query(
            "SELECT state, try_number FROM task_instance WHERE dag_id = %s AND task_id = %s",
            (dag_id, task_id),
        )
        assert len(rows) <= 1, rows
        return (rows[0][0], int(rows[0][1] or 0)) if rows else None

    def task_times(self, dag_id: str, task_id: str = "register") -> tuple[Any, Any]:
        ((start, end),) = self.query(
            "SELECT start_date, end_date FROM task_instance WHERE dag_id = %s AND task_id = %s",
            (dag_id, task_id),
        )
        return start, end

    def wait_for(self, condition: Any, what: str, timeout: float = 180, every: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"airflow {name} exited ({process.returncode}):\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(every)

    def wait_for_task(self, dag_id: str, states: set[str], timeout: float = 240) -> tuple[str | None, int]:
        self.wait_for(
            lambda: (found := self.task(dag_id)) is not None and found[0] in states,
            f"{dag_id}'s task in {sorted(states)}",
            timeout=timeout,
        )
        found = self.task(dag_id)
        assert found is not None
        return found

    def task_processes(self, sandbox_port: int) -> list[psutil.Process]:
        """The processes that run an operator: the ones connected to the sandbox's port.

        Airflow 3: the task process the supervisor forked; Airflow 2: the ``--raw`` task runner.
        """
        found = []
        for process in self.processes.values():
            with contextlib.suppress(psutil.Error):
                for proc in psutil.Process(process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if any(
                            conn.raddr and conn.raddr.port == sandbox_port
                            for conn in getattr(proc, "net_connections", proc.connections)(kind="tcp")
                        ):
                            found.append(proc)
        return found

    def logs(self, tail: int = 3000) -> str:
        """The tail of every component's log and of every task log, for failure messages."""
        parts = []
        for path in sorted(self.home.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        for path in sorted((self.home / "logs").rglob("*.log")):
            if "dag_id=" in str(path):
                parts.append(f"--- {path.relative_to(self.home)}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
