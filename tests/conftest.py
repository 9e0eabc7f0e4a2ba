"""Shared test setup: an Airflow home under the repo, and real PostgreSQL and Redis when present.

Airflow reads its configuration at import time, so the environment is set here, before any test
module imports it. Each Airflow version gets its own home: their metadata schemas differ.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import TaskLog

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_VERSION = version("apache-airflow")
AIRFLOW_HOME = ROOT / ".airflow-test" / AIRFLOW_VERSION
AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "airflow_provider_lsq" / "example_dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}"
os.environ.pop("AIRFLOW_CONN_LEADSQUARED_DEFAULT", None)
# The default shared budget files (one per sandbox account: every test sandbox has its own keys) go
# under the test home, not the system temp dir, so test runs leave nothing behind there.
os.environ.setdefault("LSQ_RATE_LIMIT_DIR", str(AIRFLOW_HOME / "rate-limits"))

REQUIRE_SERVICES = os.environ.get("LSQ_REQUIRE_SERVICES") == "1"
# LSQ_DEPLOYMENT_TESTS=0 skips the tests marked ``deployment`` (a real scheduler, real task processes
# stopped by real signals): the slowest, and one CI run of them proves what they prove.
DEPLOYMENT_TESTS = os.environ.get("LSQ_DEPLOYMENT_TESTS", "1").strip().lower() not in {"0", "false", "no"}
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deployment: a real Airflow scheduler or a real task process stopped by a signal "
        "(skipped with LSQ_DEPLOYMENT_TESTS=0)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DEPLOYMENT_TESTS:
        return
    skip = pytest.mark.skip(
        reason="LSQ_DEPLOYMENT_TESTS=0: real-scheduler and real task-process kill/stop tests are left to "
        "the CI run that has them (unset it, or set 1, to run them here)"
    )
    for item in items:
        if item.get_closest_marker("deployment"):
            item.add_marker(skip)


def _service_missing(name: str, detail: str) -> None:
    message = f"{name} is not reachable ({detail}); start it to run this test"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}. LSQ_REQUIRE_SERVICES=1 makes a missing service an error.", pytrace=False)
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata database for this Airflow version (migrated once, then reused)."""
    marker = AIRFLOW_HOME / ".migrated"
    if not marker.exists():
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            check=True,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
        )
        marker.touch()
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis server's URL (database ``LSQ_TEST_REDIS_DB``, default 15, flushed for the session).

    Give concurrent test runs on one machine different databases, or one run's flush wipes the other's
    shared budgets mid-test.
    """
    if not _port_open(REDIS_HOST, REDIS_PORT):
        _service_missing("Redis", f"{REDIS_HOST}:{REDIS_PORT}")
    import redis

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{os.environ.get('LSQ_TEST_REDIS_DB', '15')}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped after the session; yields its URI."""
    if not _port_open(POSTGRES_HOST, POSTGRES_PORT):
        _service_missing("PostgreSQL", f"{POSTGRES_HOST}:{POSTGRES_PORT}")
    import psycopg2

    name = f"lsq_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def task_log(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> TaskLog:
    """The task's log as a test reads it: caplog records plus console lines."""
    caplog.set_level("INFO")
    return TaskLog(caplog, capsys)
