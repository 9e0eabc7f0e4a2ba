"""Where an account's window lives: this process's memory, or a SQLite file every process shares.

Why our own small store rather than pyrate-limiter's buckets: a pyrate-limiter item is stamped once,
when it is admitted, and cannot be moved. The provable bound (see :mod:`.window`) needs a call to hold
its place from its send until its answer plus the period, an expiry known only when the answer comes.
The window's rule lives once, in :class:`~.window.WindowState`; each store only makes it atomic.

The SQLite file is the default: every task process on a machine shares one budget with no server to
run. Each operation is one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock on the file), so
processes and threads take turns; a few rows per account keep each one well under a millisecond.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from airflow_provider_lsq.hooks.rate_limit.window import Grant, Policy, WindowState

if TYPE_CHECKING:
    from collections.abc import Iterator

STORAGE_DIR_ENV = "LSQ_RATE_LIMIT_DIR"


class LeaseStore(Protocol):
    """Atomic operations on one account's shared window (see :class:`~.window.WindowState`)."""

    description: str  # where the window lives, with no secret in it (for logs)

    def acquire(self, policy: Policy, lease_id: str) -> Grant: ...

    def settle(self, policy: Policy, lease_id: str) -> None: ...

    def refused(self, policy: Policy, sent_at: float) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


def _snapshot(state: WindowState, now: float) -> dict[str, Any]:
    return {
        "live_leases": sum(1 for expiry in state.leases.values() if expiry > now),
        "allowed": state.allowed,
        "paused_for": max(0.0, state.paused_until - now),
        "daily_calls": state.daily_calls(now),
    }


class MemoryLeaseStore:
    """One process's window: shared by every thread and hook on the account in this process only."""

    def __init__(self) -> None:
        self.description = "this process's memory"
        self._state = WindowState()
        self._lock = threading.Lock()

    def acquire(self, policy: Policy, lease_id: str) -> Grant:
        with self._lock:
            return self._state.acquire(policy, time.time(), lease_id)

    def settle(self, policy: Policy, lease_id: str) -> None:
        with self._lock:
            self._state.settle(policy, time.time(), lease_id)

    def refused(self, policy: Policy, sent_at: float) -> None:
        with self._lock:
            self._state.refused(policy, time.time(), sent_at)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return _snapshot(self._state, time.time())


def default_storage_dir() -> Path:
    """``$LSQ_RATE_LIMIT_DIR``, else ``<system temp dir>/airflow-provider-leadsquared``.

    The system temp dir is the one place every task process on a machine sees, whatever its
    ``AIRFLOW_HOME`` or working directory; the files hold call times and counts, never a secret.
    """
    configured = os.environ.get(STORAGE_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "airflow-provider-leadsquared"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (account TEXT, lease TEXT, expiry REAL, PRIMARY KEY (account, lease));
CREATE TABLE IF NOT EXISTS state (account TEXT PRIMARY KEY, allowed REAL, allowed_at REAL,
                                  decreased_at REAL, paused_until REAL, last_grant REAL);
CREATE TABLE IF NOT EXISTS daily (account TEXT, hour INTEGER, calls INTEGER, PRIMARY KEY (account, hour));
"""


class SqliteLeaseStore:
    """The window in a SQLite file: every process on the machine that opens the file shares it."""

    def __init__(self, path: Path, account: str) -> None:
        self.path = path
        self.account = account
        self.description = f"the file {path}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        # WAL: one fsync per checkpoint, not per call. Switching to it needs the file to itself for a
        # moment, and SQLite does not wait for that: when other processes are opening it too, retry.
        for attempt in range(200):
            try:
                with self._lock:
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                    self._conn.executescript(_SCHEMA)
                    self._migrate()
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or attempt == 199:
                    raise
                time.sleep(random.uniform(0.01, 0.05))

    def _migrate(self) -> None:
        """Add the columns a file made by an earlier version lacks (another process may race us)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(state)")}
        if "last_grant" not in columns:
            try:
                self._conn.execute("ALTER TABLE state ADD COLUMN last_grant REAL")
            except sqlite3.OperationalError as error:
                if "duplicate column" not in str(error):
                    raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[tuple[WindowState, float]]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()  # read under the write lock: stamps stay in order across processes
                state = self._load(cur)
                yield state, now
                self._save(cur, state)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _load(self, cur: sqlite3.Cursor) -> WindowState:
        state = WindowState()
        rows = cur.execute("SELECT lease, expiry FROM leases WHERE account = ?", (self.account,))
        state.leases = {lease: expiry for lease, expiry in rows}
        row = cur.execute(
            "SELECT allowed, allowed_at, decreased_at, paused_until, last_grant FROM state WHERE account = ?",
            (self.account,),
        ).fetchone()
        if row is not None:
            state.allowed, state.allowed_at, state.decreased_at, state.paused_until, last_grant = row
            state.last_grant = last_grant or 0.0
        rows = cur.execute("SELECT hour, calls FROM daily WHERE account = ?", (self.account,))
        state.daily = {hour: calls for hour, calls in rows}
        return state

    def _save(self, cur: sqlite3.Cursor, state: WindowState) -> None:
        account = self.account
        cur.execute("DELETE FROM leases WHERE account = ?", (account,))
        cur.executemany(
            "INSERT INTO leases VALUES (?, ?, ?)", [(account, k, e) for k, e in state.leases.items()]
        )
        cur.execute(
            "INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?, ?)",
            (
                account,
                state.allowed,
                state.allowed_at,
                state.decreased_at,
                state.paused_until,
                state.last_grant,
            ),
        )
        cur.execute("DELETE FROM daily WHERE account = ?", (account,))
        cur.executemany(
            "INSERT INTO daily VALUES (?, ?, ?)", [(account, h, c) for h, c in state.daily.items()]
        )

    def acquire(self, policy: Policy, lease_id: str) -> Grant:
        with self._transaction() as (state, now):
            return state.acquire(policy, now, lease_id)

    def settle(self, policy: Policy, lease_id: str) -> None:
        with self._transaction() as (state, now):
            state.settle(policy, now, lease_id)

    def refused(self, policy: Policy, sent_at: float) -> None:
        with self._transaction() as (state, now):
            state.refused(policy, now, sent_at)

    def snapshot(self) -> dict[str, Any]:
        with self._transaction() as (state, now):
            return _snapshot(state, now)
