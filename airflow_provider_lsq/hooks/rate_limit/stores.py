"""Where an account's window lives: this process's memory, or a SQLite file every process shares.

Why our own small store rather than pyrate-limiter's buckets: a pyrate-limiter item is stamped once,
when it is admitted, and cannot be moved. The provable bound (see :mod:`.window`) needs a call to hold
its place from its send until its answer plus the period, an expiry known only when the answer comes.
The window's rule lives once, in :class:`~.window.WindowState`; each store only makes it atomic.

The SQLite file is the default: every task process on a machine shares one budget with no server to
run. Each operation is one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock on the file), so
processes and threads take turns; a few rows per account keep each one well under a millisecond.

Every Unix user on the machine shares it too (the account's limit does not care which user calls):
the default directory is made like ``/tmp`` itself (mode 1777: anyone may add a file, only its owner
may remove it) and its files world-writable (SQLite gives its ``-wal`` and ``-shm`` files the
database's mode). Since anyone may add a file there, a symlink (or anything but a regular file) at
the database's name or its ``-wal``/``-shm``/``-journal`` is never followed. A location that is not
a plain file or cannot be written raises :class:`BudgetLocationError` naming the path, the user and
the fix: a silent per-user or per-process budget would get the account refused, for the other
integrations on it too.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sqlite3
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

from airflow_provider_lsq.hooks.rate_limit.window import Grant, Policy, WindowState

if TYPE_CHECKING:
    from collections.abc import Iterator

STORAGE_DIR_ENV = "LSQ_RATE_LIMIT_DIR"
DEFAULT_DIR_NAME = "airflow-provider-leadsquared"
SHARED_DIR_MODE = 0o1777  # like /tmp: every user adds files, only a file's owner removes it
SHARED_FILE_MODE = 0o666  # every user of the machine spends the one budget
CONFIGURED_FILE_MODE = 0o664  # a directory an admin names: its group shares it (setgid dirs)
_SIDE_FILES = ("-wal", "-shm")
_LINK_CHECKED = ("", *_SIDE_FILES, "-journal")  # every name SQLite opens next to the database


class BudgetLocationError(PermissionError):
    """The rate-limit file cannot be opened and written by this process's user: nothing was sent.

    The message names the path, the user, what is wrong (owner and mode) and how to fix it.
    """


class _NotARegularFile(OSError):
    """A name the store would open is a symlink, a directory or a device: never followed."""


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

    The system temp dir is the one place every task process on a machine sees, whatever its user,
    ``AIRFLOW_HOME`` or working directory; the files hold call times and counts, never a secret.
    """
    configured = os.environ.get(STORAGE_DIR_ENV)
    return Path(configured) if configured else shared_temp_dir()


def shared_temp_dir() -> Path:
    """``<system temp dir>/airflow-provider-leadsquared``: the default when nothing is configured."""
    return Path(tempfile.gettempdir()) / DEFAULT_DIR_NAME


def _user() -> str:
    uid = _euid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _describe(path: Path) -> str:
    """``path``'s owner and mode, as ``ls -l`` would tell an admin."""
    try:
        info = path.lstat()
    except OSError:
        return f"{path} is missing"
    try:
        import pwd

        owner = pwd.getpwuid(info.st_uid).pw_name
    except (ImportError, KeyError):
        owner = f"uid {info.st_uid}"
    if stat.S_ISLNK(info.st_mode):
        kind = f"a symlink to {os.readlink(path)}"
    else:
        kind = (
            "directory"
            if stat.S_ISDIR(info.st_mode)
            else "file"
            if stat.S_ISREG(info.st_mode)
            else "special file"
        )
    return f"{path} ({kind}, owner {owner}, mode {stat.S_IMODE(info.st_mode):04o})"


def _make_shared_dir(directory: Path) -> None:
    """Create ``directory`` with mode 1777 (whatever the umask), or repair one this user owns.

    Made under a temporary name and renamed into place, so another user's process never finds it
    half made (mode still cut by the umask).
    """
    if not directory.exists():
        scratch = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DIR_NAME}-", dir=directory.parent))
        os.chmod(scratch, SHARED_DIR_MODE)
        try:
            os.rename(scratch, directory)
        except OSError:  # another process made it first
            scratch.rmdir()
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):  # a symlink in a world-writable dir: anyone's, pointing anywhere
        raise NotADirectoryError(f"{directory} is not a directory")
    mine = info.st_uid == _euid()
    if mine and stat.S_IMODE(info.st_mode) != SHARED_DIR_MODE:
        os.chmod(directory, SHARED_DIR_MODE)  # one made by an earlier build, or by hand


def _euid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else -1


def _refuse_links(path: Path) -> None:
    """Raise :class:`_NotARegularFile` when the database or a file SQLite opens beside it is not a
    regular file: in a directory every user may add to, a symlink there is anyone's, pointing anywhere
    (say, Airflow's own database), and SQLite would follow it and write its tables there."""
    for file in (path.with_name(path.name + suffix) for suffix in _LINK_CHECKED):
        try:
            info = file.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            raise _NotARegularFile(f"{file} is not a regular file; it is not followed")


def _connect(path: Path) -> sqlite3.Connection:
    """Open the existing database at ``path``, never through a symlink.

    Python's ``sqlite3`` cannot pass SQLite's ``SQLITE_OPEN_NOFOLLOW`` flag (and ``nofollow`` is no
    URI parameter), so: ``mode=rw`` never creates a file (a link planted since :func:`_refuse_links`
    looked cannot make SQLite create one where it points), and the name SQLite resolved and opened
    (``PRAGMA database_list``) must be ``path`` itself, checked before anything is written. SQLite
    opens the ``-wal`` and ``-shm`` files with ``O_NOFOLLOW`` itself.
    """
    absolute = os.path.abspath(path)
    resolved = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    try:
        conn = sqlite3.connect(
            f"{Path(absolute).as_uri()}?mode=rw",
            uri=True,
            timeout=60,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.OperationalError:
        _refuse_links(path)  # say so when a link planted since the look is why (a dangling one)
        raise
    opened = conn.execute("PRAGMA database_list").fetchone()[2]
    if opened not in (absolute, resolved):
        conn.close()
        raise _NotARegularFile(f"{path} leads to {opened}; it is not followed")
    return conn


def _create_file(path: Path, mode: int, repair: bool) -> None:
    """Create the database file with ``mode`` (not cut by the umask); ``repair``: widen our own files.

    Made under a temporary name and linked into place, so no process ever opens it with the umask's
    mode (SQLite would silently open a file it cannot write read-only).
    """
    if not os.path.lexists(path):
        scratch = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}")
        fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        try:
            os.fchmod(fd, mode)
            os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(scratch, path)
        finally:
            scratch.unlink()
        return
    if repair:
        for file in (path, *(path.with_name(path.name + side) for side in _SIDE_FILES)):
            with contextlib.suppress(OSError):  # missing, or another user's: checked when opened
                info = file.lstat()
                mine = stat.S_ISREG(info.st_mode) and info.st_uid == _euid()
                if mine and stat.S_IMODE(info.st_mode) != mode:
                    os.chmod(file, mode)


def _location_error(path: Path, shared: bool, error: BaseException) -> BudgetLocationError:
    directory = path.parent
    if isinstance(error, _NotARegularFile):
        found = [_describe(file) for file in (path.with_name(path.name + s) for s in _LINK_CHECKED)]
        return BudgetLocationError(
            f"The shared rate-limit budget {path} is not a plain file of its own ({error}); nothing was "
            f"sent and nothing written. Found: {'; '.join(f for f in found if 'is missing' not in f)}. "
            f"When other users may add files to {directory} (the default directory: anyone), a link "
            "there may be another local user's attempt to make tasks write to a file only they may "
            "(Airflow's database, say). Find out who made it, "
            f"then remove it (`rm {path}*` as its owner or root): the next task re-makes a regular file. "
            f"Or set {STORAGE_DIR_ENV} in every worker's environment to a directory only they can write, "
            "or share the budget through Redis (rate_limit_redis_conn_id)."
        )
    problems = [_describe(directory)]
    for file in (path, *(path.with_name(path.name + side) for side in _SIDE_FILES)):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            problems.append(_describe(file))
    if shared:
        fix = (
            f"Every Unix user that runs LeadSquared tasks on this machine must share this one budget, or "
            f"the account gets refused, its other integrations too. Let the owner run `chmod 1777 "
            f"{directory}` and `chmod 666 {directory}/*` (or remove the directory: it is re-made shared), "
            f"or set {STORAGE_DIR_ENV} in every worker's environment to a directory all of them can "
            "write, or share the budget through Redis (rate_limit_redis_conn_id)."
        )
    else:
        fix = (
            f"Make it writable by every Unix user that runs LeadSquared tasks (e.g. a directory of their "
            f"common group with mode 2770), or point {STORAGE_DIR_ENV} or rate_limit_storage elsewhere, or "
            "share the budget through Redis (rate_limit_redis_conn_id)."
        )
    return BudgetLocationError(
        f"The shared rate-limit budget {path} cannot be opened and written by user {_user()} "
        f"({type(error).__name__}: {error}); nothing was sent. Found: {'; '.join(problems)}. {fix}"
    )


@overload
def _number(value: Any, default: float) -> float: ...
@overload
def _number(value: Any, default: None) -> float | None: ...
def _number(value: Any, default: float | None) -> float | None:
    """``value`` as a float (infinities too: :meth:`WindowState.bound` caps them), else ``default``."""
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return default


_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (account TEXT, lease TEXT, expiry REAL, PRIMARY KEY (account, lease));
CREATE TABLE IF NOT EXISTS state (account TEXT PRIMARY KEY, allowed REAL, allowed_at REAL,
                                  decreased_at REAL, paused_until REAL, last_grant REAL);
CREATE TABLE IF NOT EXISTS daily (account TEXT, hour INTEGER, calls INTEGER, PRIMARY KEY (account, hour));
"""


class SqliteLeaseStore:
    """The window in a SQLite file: every process on the machine that opens the file shares it."""

    def __init__(self, path: Path, account: str, *, shared: bool | None = None) -> None:
        """Open (creating if needed) the file at ``path`` for ``account``.

        :param shared: make the directory and file writable by every user of the machine (mode 1777
            and 666); by default, when ``path`` is in :func:`shared_temp_dir`. Elsewhere a new file is
            group-writable (664) and directories are left as they are.
        :raises BudgetLocationError: this user cannot write the file or its directory, or the file (or
            its ``-wal``, ``-shm`` or ``-journal``) is a symlink or anything but a regular file.
        """
        self.path = path
        self.account = account
        self.description = f"the file {path}"
        self._lock = threading.Lock()
        shared = path.parent == shared_temp_dir() if shared is None else shared
        try:
            if shared:
                _make_shared_dir(path.parent)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
            _refuse_links(path)
            _create_file(path, SHARED_FILE_MODE if shared else CONFIGURED_FILE_MODE, repair=shared)
            self._conn = _connect(path)
            self._setup()
        except (OSError, sqlite3.DatabaseError) as error:
            raise _location_error(path, shared, error) from error

    def _setup(self) -> None:
        # WAL: one fsync per checkpoint, not per call. Switching to it needs the file to itself for a
        # moment, and SQLite does not wait for that: when other processes are opening it too, retry.
        for attempt in range(200):
            try:
                with self._lock:
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                    self._conn.executescript(_SCHEMA)
                    self._migrate()
                    # Every operation writes: find out now, not at the first call, if this user can't
                    # (SQLite opens a file it may not write read-only, silently).
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        self._conn.execute("INSERT INTO daily VALUES ('', -1, 0)")
                    finally:
                        self._conn.execute("ROLLBACK")
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
        """The account's state; a value that is no finite number (the file is anyone's to write) is
        read as unset (a lease as held for the policy's whole hold: :meth:`WindowState.bound`)."""
        state = WindowState()
        rows = cur.execute("SELECT lease, expiry FROM leases WHERE account = ?", (self.account,))
        state.leases = {str(lease): _number(expiry, math.inf) for lease, expiry in rows}
        row = cur.execute(
            "SELECT allowed, allowed_at, decreased_at, paused_until, last_grant FROM state WHERE account = ?",
            (self.account,),
        ).fetchone()
        if row is not None:
            allowed, allowed_at, decreased_at, paused_until, last_grant = row
            state.allowed = None if allowed is None else _number(allowed, None)
            state.allowed_at, state.decreased_at = _number(allowed_at, 0.0), _number(decreased_at, 0.0)
            state.paused_until, state.last_grant = _number(paused_until, 0.0), _number(last_grant, 0.0)
        rows = cur.execute("SELECT hour, calls FROM daily WHERE account = ?", (self.account,))
        for hour, calls in rows:
            if isinstance(hour, int) and isinstance(calls, int):
                state.daily[hour] = calls
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
