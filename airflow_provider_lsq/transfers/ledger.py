"""The registration ledger: one row per (portal, warehouse row key), in a table next to the data.

It is what makes the SQL transfer safe to rerun: a row the ledger holds as registered is never sent
again, a transient failure is retried on the next run, a permanent one only when asked. It holds keys,
lead ids, statuses and error messages: never a password and no other lead data. It also holds, per
row, a fingerprint of the lead identifier LeadSquared finds the lead by (``lead_identifier``: a sha256,
see :func:`~airflow_provider_lsq.hooks.payload.lead_fingerprint`), so that two row keys of one lead
are known to be one person.

Each row names the execution that last wrote it (``dag_id``, ``run_id``, ``task_id``, ``map_index``
and ``execution_id``, the token of one ``execute()`` call: see
:mod:`airflow_provider_lsq.transfers.executions`). A claim (``pending``) belongs to that execution
alone, and a live execution refreshes its claims' ``last_attempt_at`` at every flush (a heartbeat).

A table made by an earlier release, without ``lead_identifier`` or the execution columns, is migrated
in place by :meth:`RegistrationLedger.ensure_table` (``ALTER TABLE ... ADD COLUMN``).

Plain DB-API, portable across SQLite and PostgreSQL (and kept generic for other databases): writes
are a DELETE of the batch's keys then an INSERT, in one transaction, with the hook's placeholder and
dialect (common-sql's ``DbApiHook.placeholder`` and ``dialect_name``).

Statuses: the outcomes' (``registered``, ``already_registered``, ``invalid``, ``failed``,
``unconfirmed``: sent, and no answer said what happened; never re-sent without a person deciding) and
``pending``, written before a row is handed over for its call, so a run that dies without warning
leaves its in-flight rows visible. Every write retries with backoff (and a busy timeout on SQLite)
for up to ``write_timeout`` seconds before it raises :class:`LedgerUnavailableError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import re
import sqlite3
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.transfers.executions import holder_is_gone
from airflow_provider_lsq.version_compat import AirflowException

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from types import TracebackType

    from airflow.providers.common.sql.hooks.sql import DbApiHook

    from airflow_provider_lsq.outcomes import RegistrationOutcome
    from airflow_provider_lsq.transfers.executions import Execution

T = TypeVar("T")
log = logging.getLogger(__name__)
PENDING = "pending"  # handed over for a call whose outcome is not recorded yet
UNCONFIRMED = RegistrationStatus.UNCONFIRMED.value  # sent; no answer said whether it was carried out
# A row of another key in one of these holds its lead: registered, maybe registered, or being sent.
LEAD_HOLDER_STATUSES = frozenset(
    {RegistrationStatus.REGISTERED.value, RegistrationStatus.ALREADY_REGISTERED.value, PENDING, UNCONFIRMED}
)
# How long after its holder's last heartbeat a pending row is judged abandoned (see the transfer's
# ``pending_timeout``).
DEFAULT_PENDING_TIMEOUT = dt.timedelta(minutes=2)
SQLITE_BUSY_TIMEOUT_MS = 10_000
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S"
_LOOKUP_CHUNK = 400  # keys per SELECT/DELETE: well under SQLite's oldest 999-parameter limit
# Parameters per batch lookup (keys and fingerprints in one SELECT): SQLite since 3.32 takes 32766,
# PostgreSQL's psycopg interpolates them client-side; other databases keep the oldest limit.
_BATCH_PARAMETERS = {
    "sqlite": 32_000 if sqlite3.sqlite_version_info >= (3, 32) else 990,
    "postgresql": 30_000,
}
# Text a value may have to be written into the anti-join's SQL as a literal ('' doubled): no backslash
# (an escape in MySQL), no % (psycopg's placeholder mark when the query has parameters), no control.
_UNSAFE_LITERAL = re.compile(r"[\\%\x00-\x1f\x7f]")
_INSERT_CHUNK = 50  # rows per INSERT: 17 columns, 850 parameters (under SQLite's oldest 999)
PG_LOCK_TIMEOUT = "5s"  # a migration waits this long for the table's lock, then retries (backoff)
OK_STATUSES = frozenset({RegistrationStatus.REGISTERED.value, RegistrationStatus.ALREADY_REGISTERED.value})
# Settled: a later run neither sends the row nor needs to read it again, so the transfer leaves it out
# of its query in the database (see RegistrationLedger.anti_join). The one place to add a status to.
SETTLED_STATUSES = OK_STATUSES
POSITION_COLUMN = "lsq_row_position"  # the anti-join's numbering of an ordered query's rows (not sent)
COLUMNS = (
    "portal_id",
    "row_key",
    "lead_id",
    "status",
    "error_type",
    "error_message",
    "attempts",
    "first_attempt_at",
    "last_attempt_at",
    "registered_at",
    "dag_id",
    "run_id",
    "retryable",
    "lead_identifier",
    "task_id",
    "map_index",
    "execution_id",
)
IDENTIFIER_COLUMN = "lead_identifier"
# Columns added since the first release, in order: a table without them gets them (ALTER TABLE).
# The value is the column's type: "text" (the dialect's key type) or "integer".
ADDED_COLUMNS = {IDENTIFIER_COLUMN: "text", "task_id": "text", "map_index": "integer", "execution_id": "text"}
# Column types per dialect: (key/text, timestamp, boolean, false literal).
_TYPES = {
    "sqlite": ("TEXT", "TEXT", "INTEGER", "0"),
    "postgresql": ("TEXT", "TIMESTAMP", "BOOLEAN", "FALSE"),
    "generic": ("VARCHAR(255)", "TIMESTAMP", "BOOLEAN", "FALSE"),
}


class LedgerUnavailableError(AirflowException):
    """The ledger could not be written within its ``write_timeout``, retries included."""


def validate_table_name(table: str) -> str:
    """``table`` if it is a plain identifier, optionally schema-qualified; ValueError otherwise."""
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ValueError(
            f"ledger table {table!r} is not a plain table name (letters, digits and underscores, "
            "optionally prefixed by a schema and a dot)"
        )
    return table


@dataclass(frozen=True)
class LedgerRow:
    """What the ledger knows about one row key. Timestamps are UTC (timezone-aware)."""

    row_key: str
    status: str
    lead_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    attempts: int = 0
    first_attempt_at: dt.datetime | None = None
    last_attempt_at: dt.datetime | None = None
    registered_at: dt.datetime | None = None
    dag_id: str | None = None
    run_id: str | None = None
    retryable: bool = False
    lead_identifier: str | None = None  # see lead_fingerprint; None when the row had no identifier
    task_id: str | None = None  # the execution that last wrote the row (None: an earlier release)
    map_index: int | None = None
    execution_id: str | None = None  # the token of that execute() call (see executions.Execution)
    read_at: dt.datetime | None = None  # the ledger database's clock when the row was read

    @property
    def registered(self) -> bool:
        """The lead is a portal user: registered now or earlier (``already_registered``)."""
        return self.status in OK_STATUSES

    @property
    def pending(self) -> bool:
        """Handed over for a call by a run that has not recorded its outcome (yet, or ever)."""
        return self.status == PENDING

    def held_by_another(self, execution: Execution, timeout: dt.timedelta) -> bool:
        """Pending for another execution that may still be sending it (its claim must be left alone).

        True when another execution's heartbeat (``last_attempt_at``) is younger than ``timeout`` and
        that execution is not known to have ended (see :func:`~.executions.holder_is_gone`). The age
        is read on the ledger database's clock (``read_at``), the clock every heartbeat is stamped
        with, so workers whose own clocks disagree still agree on it.
        """
        if not self.pending or (self.execution_id or "") == execution.token:
            return False
        last = self.last_attempt_at or dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        now = self.read_at or dt.datetime.now(dt.timezone.utc)
        if now - last >= timeout:
            return False
        return not holder_is_gone(self.execution_id)

    def written_by(self, execution: Execution) -> bool:
        """Last written by ``execution``'s task instance: this execution or an earlier try of it."""
        return execution.same_task_instance(self.dag_id, self.run_id, self.task_id, self.map_index)


class RegistrationLedger:
    """Read and write the ledger table through a common-sql hook's plain DB-API connection.

    One connection is opened lazily and kept until :meth:`close` (or the end of a ``with`` block).
    Use it from one thread.

    :param db_hook: any common-sql ``DbApiHook`` (SQLite and PostgreSQL are tested).
    :param table: the ledger table, optionally schema-qualified; checked to be a plain identifier.
    :param portal_id: the portal whose registrations this ledger tracks (part of the primary key).
    :param write_timeout: seconds a write keeps retrying (with backoff, reconnecting) before it raises
        :class:`LedgerUnavailableError`.
    """

    def __init__(
        self, db_hook: DbApiHook, table: str, portal_id: str, *, write_timeout: float = 60.0
    ) -> None:
        self.db_hook = db_hook
        self.table = validate_table_name(table)
        self.portal_id = str(portal_id)
        self.write_timeout = write_timeout
        self._conn: Any = None
        self.taken_over: set[str] = set()  # claimed keys the last record() left to another execution
        name = str(getattr(db_hook, "dialect_name", "") or "")
        self._dialect = name if name in _TYPES else "generic"
        self._dialect_name = name  # the hook's own (mysql, mssql, ...): for the anti-join's SQL
        self._placeholder = str(getattr(db_hook, "placeholder", None) or "%s")

    # -- connection ------------------------------------------------------------------------------

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql`` or ``generic``: from the hook's ``dialect_name``."""
        return self._dialect

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self.db_hook.get_conn()
            if isinstance(conn, sqlite3.Connection):
                # Wait out other writers' locks (within the write bound) instead of failing at once.
                busy_ms = int(min(SQLITE_BUSY_TIMEOUT_MS, self.write_timeout * 1000))
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._conn = conn
        return self._conn

    def _with_retries(self, what: str, write: Callable[[], T]) -> T:
        """Run ``write`` (one transaction), retrying with backoff for up to ``write_timeout`` seconds.

        Between attempts the transaction is rolled back and the connection reopened (a restarted
        PostgreSQL drops it). Raises :class:`LedgerUnavailableError` when time runs out.
        """

        def reset(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "Ledger %s on %s failed (attempt %d: %s); retrying.",
                what,
                self.table,
                state.attempt_number,
                type(error).__name__,
            )
            try:
                self._conn.rollback()
            except Exception:
                self.close_quietly()

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(self.write_timeout),
            wait=tenacity.wait_exponential(multiplier=0.2, max=5) + tenacity.wait_random(0, 0.2),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=reset,
            reraise=True,
        )
        started = time.monotonic()
        try:
            return retrying(write)
        except Exception as error:
            self.close_quietly()
            waited = max(time.monotonic() - started, self.write_timeout)
            conn_id = getattr(self.db_hook, getattr(self.db_hook, "conn_name_attr", ""), None)
            where = f" (connection {conn_id!r})" if isinstance(conn_id, str) else ""
            raise LedgerUnavailableError(
                f"The ledger {self.table}{where} could not be written for {waited:.0f} s "
                f"({what}; last error {type(error).__name__}). A database that accepts connections "
                "and never answers holds each attempt until its driver's connect timeout: set one in "
                "the connection's extra (PostgreSQL: connect_timeout, in seconds)."
            ) from error

    def close_quietly(self) -> None:
        try:
            self.close()
        except Exception:
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def __enter__(self) -> RegistrationLedger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor in one transaction: committed when the block ends, rolled back when it raises.

        On PostgreSQL a lock wait (a row or advisory lock another session holds: a frozen execution
        mid-write, say) gives up after a share of ``write_timeout``, so the write's retries, and with
        them ``write_timeout``, bound it; SQLite's busy timeout does the same there.
        """
        conn = self.conn
        cursor = conn.cursor()
        try:
            if self._dialect == "postgresql":
                wait_ms = max(100, int(min(float(PG_LOCK_TIMEOUT[:-1]), self.write_timeout / 2) * 1000))
                cursor.execute(f"SET LOCAL lock_timeout = '{wait_ms}ms'")
            yield cursor
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            cursor.close()

    def _marks(self, count: int) -> str:
        return ", ".join([self._placeholder] * count)

    def _db_now(self, cursor: Any) -> dt.datetime:
        """The ledger database's clock, UTC, to the second: what claims, heartbeats and records are
        stamped with and ages are judged by, so that executions on machines whose clocks disagree
        still agree on a claim's age. PostgreSQL's ``clock_timestamp()``; SQLite is a file on this
        machine, so this machine's clock; other databases the local clock too (keep it in step).
        """
        if self._dialect == "postgresql":
            cursor.execute("SELECT timezone('UTC', clock_timestamp())")
            value = cursor.fetchone()[0]
            now = value.replace(tzinfo=dt.timezone.utc)
        else:
            now = dt.datetime.now(dt.timezone.utc)
        return now.replace(microsecond=0)

    def _where_keys(self, keys: Sequence[str]) -> tuple[str, list[Any]]:
        """The WHERE clause (and its parameters) that picks this portal's rows for ``keys``."""
        where = f"WHERE portal_id = {self._placeholder} AND row_key IN ({self._marks(len(keys))})"
        return where, [self.portal_id, *keys]

    # -- schema ----------------------------------------------------------------------------------

    def ensure_table(self) -> None:
        """Create the table if needed (committed at once, so a query may anti-join it right after).

        A table of an earlier release gets the columns it lacks (``lead_identifier``, ``task_id``,
        ``map_index``, ``execution_id``: ``ALTER TABLE ... ADD COLUMN``, NULL for its rows);
        on SQLite and PostgreSQL an index on ``(portal_id, lead_identifier)`` is created too (not on
        other databases). Runs doing it at once all succeed: a step that loses the race is retried
        and then finds the work done. On SQLite the file is switched to WAL, so that the transfer's
        streaming read of a warehouse in the same file does not lock out the ledger's writes.
        """

        def ensure() -> None:
            self._create_table()
            self._add_missing_columns()
            self._create_identifier_index()

        self._with_retries("table creation", ensure)

    def _create_table(self) -> None:
        # Two runs creating the table at once on PostgreSQL: one may fail on the catalog's unique
        # index; its retry then finds the table.
        conn = self.conn
        text, timestamp, boolean, false = _TYPES[self._dialect]
        if self._dialect == "sqlite":
            conn.execute("PRAGMA journal_mode=WAL")
        ddl = f"""
            CREATE TABLE IF NOT EXISTS {self.table} (
                portal_id {text} NOT NULL,
                row_key {text} NOT NULL,
                lead_id {text},
                status {text} NOT NULL,
                error_type {text},
                error_message {"TEXT" if self._dialect != "generic" else "VARCHAR(2000)"},
                attempts INTEGER NOT NULL DEFAULT 0,
                first_attempt_at {timestamp},
                last_attempt_at {timestamp},
                registered_at {timestamp},
                dag_id {text},
                run_id {text},
                retryable {boolean} NOT NULL DEFAULT {false},
                {IDENTIFIER_COLUMN} {text},
                task_id {text},
                map_index INTEGER,
                execution_id {text},
                PRIMARY KEY (portal_id, row_key)
            )
        """
        with self._transaction() as cursor:
            cursor.execute(ddl)

    def _columns(self) -> set[str]:
        """The table's column names, lower-cased: from an empty SELECT's description (any DB-API)."""
        with self._transaction() as cursor:
            cursor.execute(f"SELECT * FROM {self.table} WHERE 1 = 0")
            return {str(column[0]).lower() for column in cursor.description or ()}

    def _add_missing_columns(self) -> None:
        """Migrate a table of an earlier release: add each column of :data:`ADDED_COLUMNS` it lacks."""
        present = self._columns()
        missing = [name for name in ADDED_COLUMNS if name not in present]
        if not missing:
            return
        log.info("Ledger %s: adding the columns %s (migration).", self.table, ", ".join(missing))
        with self._transaction() as cursor:
            if self._dialect == "postgresql":
                # Wait a little for the table's lock (another run may be reading it), then retry, rather
                # than queue every other run's writes behind this ALTER.
                cursor.execute(f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT}'")
            for name in missing:
                kind = _TYPES[self._dialect][0] if ADDED_COLUMNS[name] == "text" else "INTEGER"
                if self._dialect == "postgresql":
                    cursor.execute(f"ALTER TABLE {self.table} ADD COLUMN IF NOT EXISTS {name} {kind}")
                else:  # a concurrent run that added it first makes this fail: the retry finds the column
                    cursor.execute(f"ALTER TABLE {self.table} ADD COLUMN {name} {kind}")

    def _create_identifier_index(self) -> None:
        if self._dialect == "generic":
            return
        schema, _, name = self.table.rpartition(".")
        index = f"{name}_lead_identifier_idx"
        with self._transaction() as cursor:
            if self._dialect == "postgresql":
                # Made already? Then take no lock at all (CREATE INDEX locks the table's writes first).
                cursor.execute(
                    f"SELECT to_regclass({self._placeholder})", [f"{schema}.{index}" if schema else index]
                )
                if cursor.fetchone()[0] is not None:
                    return
                cursor.execute(f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT}'")
                statement = (
                    f"CREATE INDEX IF NOT EXISTS {index} ON {self.table} (portal_id, {IDENTIFIER_COLUMN})"
                )
            else:  # SQLite names the schema on the index, not on the table
                qualified = f"{schema}.{index}" if schema else index
                statement = (
                    f"CREATE INDEX IF NOT EXISTS {qualified} ON {name} (portal_id, {IDENTIFIER_COLUMN})"
                )
            cursor.execute(statement)

    # -- reading ---------------------------------------------------------------------------------

    def lookup(self, keys: Iterable[str]) -> dict[str, LedgerRow]:
        """The ledger's rows for ``keys`` (absent keys are left out)."""
        wanted = list(keys)

        def read() -> dict[str, LedgerRow]:
            conn = self.conn
            try:
                return self._select(wanted)
            finally:
                conn.commit()  # end the read transaction: no snapshot or lock held between batches

        return self._with_retries("lookup", read)

    def _select(self, keys: Iterable[str]) -> dict[str, LedgerRow]:
        wanted = list(dict.fromkeys(str(key) for key in keys))
        found: dict[str, LedgerRow] = {}
        columns = ", ".join(COLUMNS[1:])
        cursor = self.conn.cursor()
        try:
            read_at = self._db_now(cursor)
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                where, params = self._where_keys(chunk)
                cursor.execute(f"SELECT {columns} FROM {self.table} {where}", params)
                for record in cursor.fetchall():
                    row = self._row(record, read_at)
                    found[row.row_key] = row
        finally:
            cursor.close()
        return found

    def _row(self, record: Sequence[Any], read_at: dt.datetime | None = None) -> LedgerRow:
        (key, lead_id, status, error_type, error_message, attempts, first, last, registered, dag_id,
         run_id, retryable, identifier, task_id, map_index, execution_id) = record  # fmt: skip
        return LedgerRow(
            row_key=str(key),
            status=str(status),
            lead_id=lead_id,
            error_type=error_type,
            error_message=error_message,
            attempts=int(attempts or 0),
            first_attempt_at=self._from_db(first),
            last_attempt_at=self._from_db(last),
            registered_at=self._from_db(registered),
            dag_id=dag_id,
            run_id=run_id,
            retryable=bool(retryable),
            lead_identifier=identifier,
            task_id=task_id,
            map_index=None if map_index is None else int(map_index),
            execution_id=execution_id,
            read_at=read_at,
        )

    def lookup_identifiers(self, fingerprints: Iterable[str]) -> dict[str, list[LedgerRow]]:
        """This portal's rows holding each fingerprint as registered, already registered, unconfirmed
        or pending.

        One query per 400 fingerprints (uses the ``(portal_id, lead_identifier)`` index); fingerprints
        no such row holds are left out. Rows of every key are returned: the caller leaves its own out.
        """
        wanted = list(dict.fromkeys(fingerprints))
        statuses = sorted(LEAD_HOLDER_STATUSES)

        def read() -> dict[str, list[LedgerRow]]:
            found: dict[str, list[LedgerRow]] = {}
            columns = ", ".join(COLUMNS[1:])
            conn = self.conn
            cursor = conn.cursor()
            try:
                read_at = self._db_now(cursor)
                for start in range(0, len(wanted), _LOOKUP_CHUNK):
                    chunk = wanted[start : start + _LOOKUP_CHUNK]
                    cursor.execute(
                        f"SELECT {columns} FROM {self.table} WHERE portal_id = {self._placeholder} "
                        f"AND {IDENTIFIER_COLUMN} IN ({self._marks(len(chunk))}) "
                        f"AND status IN ({self._marks(len(statuses))})",
                        [self.portal_id, *chunk, *statuses],
                    )
                    for record in cursor.fetchall():
                        row = self._row(record, read_at)
                        found.setdefault(str(row.lead_identifier), []).append(row)
            finally:
                cursor.close()
                conn.commit()  # end the read transaction
            return found

        if not wanted:
            return {}
        return self._with_retries("lookup of lead identifiers", read)

    def lookup_batch(
        self, keys: Iterable[str], fingerprints: Iterable[str]
    ) -> tuple[dict[str, LedgerRow], dict[str, list[LedgerRow]]]:
        """A batch's ledger rows in one read: :meth:`lookup` of ``keys`` and
        :meth:`lookup_identifiers` of ``fingerprints`` together.

        One SELECT per batch (on PostgreSQL it reads the database's clock too); more only past the
        database's parameter limit (SQLite before 3.32, and databases other than SQLite and
        PostgreSQL, take about 400 keys and 400 fingerprints a statement).
        """
        wanted = list(dict.fromkeys(str(key) for key in keys))
        prints = list(dict.fromkeys(fingerprints))
        if not wanted and not prints:
            return {}, {}
        statuses = sorted(LEAD_HOLDER_STATUSES)
        limit = _BATCH_PARAMETERS.get(self._dialect, 2 * _LOOKUP_CHUNK)
        size = max(1, (limit - 1 - len(statuses)) // 2)
        p = self._placeholder
        clock = ", timezone('UTC', clock_timestamp())" if self._dialect == "postgresql" else ""
        select = f"SELECT {', '.join(COLUMNS[1:])}{clock} FROM {self.table} WHERE portal_id = {p} AND "
        key_set, print_set, held = set(wanted), set(prints), set(statuses)

        def read() -> tuple[dict[str, LedgerRow], dict[str, list[LedgerRow]]]:
            by_key: dict[str, LedgerRow] = {}
            holders: dict[str, dict[str, LedgerRow]] = {}
            conn = self.conn
            cursor = conn.cursor()
            try:
                local_now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
                for start in range(0, max(len(wanted), len(prints)), size):
                    key_chunk, print_chunk = wanted[start : start + size], prints[start : start + size]
                    where: list[str] = []
                    params: list[Any] = [self.portal_id]
                    if key_chunk:
                        where.append(f"row_key IN ({self._marks(len(key_chunk))})")
                        params += key_chunk
                    if print_chunk:
                        where.append(
                            f"({IDENTIFIER_COLUMN} IN ({self._marks(len(print_chunk))}) "
                            f"AND status IN ({self._marks(len(statuses))}))"
                        )
                        params += [*print_chunk, *statuses]
                    cursor.execute(f"{select}({' OR '.join(where)})", params)
                    for record in cursor.fetchall():
                        read_at = local_now
                        if clock:
                            read_at = record[-1].replace(tzinfo=dt.timezone.utc, microsecond=0)
                        row = self._row(record[: len(COLUMNS) - 1], read_at)
                        if row.row_key in key_set:
                            by_key[row.row_key] = row
                        if row.lead_identifier in print_set and row.status in held:
                            holders.setdefault(str(row.lead_identifier), {})[row.row_key] = row
            finally:
                cursor.close()
                conn.commit()  # end the read transaction: no snapshot or lock held between batches
            return by_key, {fingerprint: list(rows.values()) for fingerprint, rows in holders.items()}

        return self._with_retries("lookup", read)

    def anti_join(
        self, sql: str, key_column: str, execution: Execution, *, ordered: bool = False
    ) -> str | None:
        """``sql`` wrapped so that the database leaves out the rows this portal's ledger holds as
        settled (:data:`SETTLED_STATUSES`), so a run reads only rows that may need it.

        Still returned: rows ``execution``'s task instance recorded (an earlier try: a retry counts
        them again, ``from_earlier_tries``), and settled rows without a lead fingerprint (an earlier
        release's: the run gives them one). The key is compared as the ledger stores it, as text
        (``CAST(q.<key_column> AS <text>)``). ``key_column`` is written unquoted when it is a plain
        lower-case name (a database that folds names folds it as it folded the query's unquoted
        alias), quoted as given otherwise. None when a value (the portal id, the task instance's
        names) cannot be written into SQL text safely: the caller then reads ``sql`` as written.

        ``ordered`` keeps ``sql``'s order (a hash anti-join that spills to disk does not): the rows
        are numbered as ``sql`` returns them, in a last column :data:`POSITION_COLUMN`, and the
        result is sorted by it (a sort of the rows left only).
        """
        names = (self.portal_id, execution.dag_id, execution.run_id, execution.task_id or "")
        if any(_UNSAFE_LITERAL.search(name) for name in names):
            return None

        def literal(text: str) -> str:
            return "'" + text.replace("'", "''") + "'"

        portal, dag_id, run_id, task_id = map(literal, names)
        mark = "`" if self._dialect_name == "mysql" else '"'
        key = key_column
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", key_column):
            key = mark + key_column.replace(mark, mark * 2) + mark
        text = {"sqlite": "TEXT", "postgresql": "TEXT", "mysql": "CHAR"}.get(
            self._dialect_name, "VARCHAR(255)"
        )
        settled = ", ".join(map(literal, sorted(SETTLED_STATUSES)))
        # Newlines around the query: a comment on its last line does not swallow the rest.
        inner = f"(\n{sql}\n) q"
        if ordered:
            inner = f"(SELECT s.*, ROW_NUMBER() OVER () AS {POSITION_COLUMN} FROM (\n{sql}\n) s) q"
        return (
            f"SELECT q.* FROM {inner} WHERE NOT EXISTS (SELECT 1 FROM {self.table} l "
            f"WHERE l.portal_id = {portal} AND l.row_key = CAST(q.{key} AS {text}) "
            f"AND l.status IN ({settled}) AND l.{IDENTIFIER_COLUMN} IS NOT NULL "
            f"AND NOT (COALESCE(l.dag_id, '') = {dag_id} AND COALESCE(l.run_id, '') = {run_id} "
            f"AND COALESCE(l.task_id, '') = {task_id} AND COALESCE(l.map_index, -1) = {execution.map_index}))"
            + (f" ORDER BY q.{POSITION_COLUMN}" if ordered else "")
        )

    @staticmethod
    def _from_db(value: Any) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if isinstance(value, dt.datetime):
            return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value
        raise TypeError(f"unexpected timestamp {type(value).__name__} in the ledger")

    def _to_db(self, value: dt.datetime | None) -> Any:
        if value is None:
            return None
        naive = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return naive.strftime(_SQLITE_TIME) if self._dialect == "sqlite" else naive.replace(microsecond=0)

    # -- writing ---------------------------------------------------------------------------------

    def record(
        self,
        outcomes: Iterable[RegistrationOutcome],
        *,
        execution: Execution,
        identifiers: Mapping[str, str | None] | None = None,
        refresh: Iterable[str] = (),
        claimed: Iterable[str] = (),
    ) -> int:
        """Write a batch of outcomes in one transaction; return how many keys were written.

        ``attempts`` accumulate across runs; ``first_attempt_at`` and the first ``registered_at`` are
        kept; a known lead id is kept when the new outcome has none. ``identifiers`` gives each key's
        ``lead_identifier`` (a :func:`lead_fingerprint`, or None: the row has none now); a key it
        leaves out keeps the one recorded before. ``refresh`` names keys ``execution`` still holds
        ``pending``: their heartbeat is refreshed in the same transaction (see :meth:`refresh`).
        ``claimed`` names keys ``execution`` claimed for these calls: one whose row another execution
        has written since (it took the claim over, judging this one dead) is left as that execution
        wrote it, never overwritten; those keys are in :attr:`taken_over` after the write.
        """
        batch = list(outcomes)
        if not batch:
            return 0
        known = identifiers or {}
        held = [key for key in dict.fromkeys(refresh) if key not in {o.key for o in batch}]
        ours = set(claimed)

        def write() -> int:
            with self._transaction() as cursor:
                now = self._db_now(cursor)
                merged = self._select(outcome.key for outcome in batch)
                taken = {
                    key
                    for key in ours
                    if key in merged and (merged[key].execution_id or "") != execution.token
                }
                self.taken_over = taken
                batch_ours = [outcome for outcome in batch if outcome.key not in taken]
                for outcome in batch_ours:
                    row = self._merge(merged.get(outcome.key), outcome, now, execution)
                    if outcome.key in known:
                        row = replace(row, lead_identifier=known[outcome.key])
                    merged[outcome.key] = row
                written = [merged[key] for key in dict.fromkeys(outcome.key for outcome in batch_ours)]
                if written:
                    self._replace(written)
                self._refresh(cursor, held, execution, now)
            return len(written)

        return self._with_retries(f"write of {len(batch)} outcomes", write)

    def refresh(self, keys: Iterable[str], *, execution: Execution) -> int:
        """The heartbeat: set ``last_attempt_at`` to now on the ``keys`` ``execution`` holds ``pending``.

        A live execution calls it (or :meth:`record` with ``refresh``) at least every flush interval,
        so that its claims never look abandoned to another execution (see :meth:`claim`). Returns how
        many rows it refreshed (a key taken over by another execution is not).
        """
        held = list(dict.fromkeys(keys))
        if not held:
            return 0

        def write() -> int:
            with self._transaction() as cursor:
                return self._refresh(cursor, held, execution, self._db_now(cursor))

        return self._with_retries(f"heartbeat of {len(held)} pending rows", write)

    def keep(self, keys: Iterable[str], *, execution: Execution) -> set[str]:
        """The heartbeat that also tells which claims are still ``execution``'s: refresh them and
        return the keys whose row ``execution`` still wrote last (pending, or recorded by it since).

        A key left out was taken over by another execution (which judged this one dead: frozen, or cut
        off from the ledger for longer than its ``pending_timeout``): this execution must not send it.
        """
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        p = self._placeholder

        def write() -> set[str]:
            with self._transaction() as cursor:
                self._refresh(cursor, wanted, execution, self._db_now(cursor))
                mine: set[str] = set()
                for start in range(0, len(wanted), _LOOKUP_CHUNK):
                    where, params = self._where_keys(wanted[start : start + _LOOKUP_CHUNK])
                    cursor.execute(
                        f"SELECT row_key FROM {self.table} {where} AND execution_id = {p}",
                        [*params, execution.token],
                    )
                    mine.update(str(record[0]) for record in cursor.fetchall())
                return mine

        return self._with_retries(f"heartbeat of {len(wanted)} pending rows", write)

    def _refresh(self, cursor: Any, keys: Sequence[str], execution: Execution, now: dt.datetime) -> int:
        refreshed = 0
        p = self._placeholder
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            where, params = self._where_keys(chunk)
            cursor.execute(
                f"UPDATE {self.table} SET last_attempt_at = {p} {where} "
                f"AND status = {p} AND execution_id = {p}",
                [self._to_db(now), *params, PENDING, execution.token],
            )
            refreshed += max(cursor.rowcount, 0)
        return refreshed

    def claim(
        self,
        previous: Mapping[str, LedgerRow | None],
        *,
        execution: Execution,
        identifiers: Mapping[str, str | None] | None = None,
        in_flight_for: dt.timedelta | None = None,
        pending_timeout: dt.timedelta = DEFAULT_PENDING_TIMEOUT,
    ) -> set[str]:
        """Mark keys ``pending`` for ``execution`` before their calls; return the keys it now holds.

        A key is claimed only if its ledger row is still what ``previous`` says (absent, or the same
        status, execution and ``last_attempt_at``): another execution that claimed it first, or whose
        heartbeat refreshed its claim since ``previous`` was read, keeps it, so no row is sent twice.
        The caller decides from ``previous`` whether a ``pending`` row of another execution is
        abandoned (see :meth:`LedgerRow.held_by_another`); this check makes that decision safe.

        ``identifiers`` gives each key's :func:`lead_fingerprint`, written with the claim; a key is not
        claimed when another key of this portal holds its fingerprint as registered, already
        registered, unconfirmed (the lead may be a portal user), or pending for another execution
        within ``in_flight_for`` (the same lead, being sent right now): no lead is sent twice either.
        On SQLite (``BEGIN IMMEDIATE``) and PostgreSQL (a transaction-level advisory lock per table
        and portal) claims are serialised, so that check cannot race another execution's claim; other
        databases only narrow the window.
        """
        if not previous:
            return set()
        fingerprints = identifiers or {}
        mine = execution.token

        def write() -> set[str]:
            claimed: set[str] = set()
            p = self._placeholder
            with self._transaction() as cursor:
                self._lock_claims(cursor)
                clock = self._db_now(cursor)
                now = self._to_db(clock)
                since = self._to_db(clock - in_flight_for) if in_flight_for is not None else now
                for key, row in previous.items():
                    fingerprint = fingerprints.get(key)
                    if fingerprint is not None and self._held_elsewhere(
                        cursor, key, fingerprint, mine, since
                    ):
                        continue
                    if row is None:
                        cursor.execute(*self._insert_if_absent(key, now, execution, fingerprint))
                    elif row.pending and not self._still_abandoned(
                        cursor, row, execution, pending_timeout, clock
                    ):
                        continue  # its holder's heartbeat came in since it was read: still theirs
                    else:
                        unchanged, unchanged_params = self._unchanged(row)
                        cursor.execute(
                            f"UPDATE {self.table} SET status = {p}, last_attempt_at = {p}, dag_id = {p}, "
                            f"run_id = {p}, task_id = {p}, map_index = {p}, execution_id = {p}, "
                            f"{IDENTIFIER_COLUMN} = {p} WHERE portal_id = {p} AND row_key = {p} "
                            f"AND {unchanged}",
                            [
                                PENDING, now, execution.dag_id, execution.run_id, execution.task_id,
                                execution.map_index, mine, fingerprint or row.lead_identifier,
                                self.portal_id, key, *unchanged_params,
                            ],
                        )  # fmt: skip
                    if cursor.rowcount != 1:
                        # Ours already? (an earlier attempt of this write committed but its answer was lost)
                        cursor.execute(
                            f"UPDATE {self.table} SET last_attempt_at = {p} WHERE portal_id = {p} "
                            f"AND row_key = {p} AND status = {p} AND execution_id = {p}",
                            [now, self.portal_id, key, PENDING, mine],
                        )
                    if cursor.rowcount == 1:
                        claimed.add(key)
            return claimed

        return self._with_retries(f"claim of {len(previous)} rows", write)

    def _unchanged(self, row: LedgerRow) -> tuple[str, list[Any]]:
        """SQL (and parameters) true while a key's ledger row is still ``row``'s: same status, same
        writing execution and run. Never a timestamp match: a row edited by hand (microseconds, ISO
        text) must stay claimable. A ``pending`` row is judged again under the claim lock instead
        (see :meth:`_still_abandoned`)."""
        p = self._placeholder
        sql = f"status = {p} AND COALESCE(execution_id, '') = {p} AND COALESCE(run_id, '') = {p}"
        params: list[Any] = [row.status, row.execution_id or "", row.run_id or ""]
        return sql, params

    def _still_abandoned(
        self,
        cursor: Any,
        row: LedgerRow,
        execution: Execution,
        pending_timeout: dt.timedelta,
        clock: dt.datetime,
    ) -> bool:
        """Read ``row``'s key again under the claim lock (and, on PostgreSQL, lock the row against a
        heartbeat until the claim commits): true when it is still ``pending`` for the same holder and
        that holder still looks ended (:meth:`LedgerRow.held_by_another`, on the database's clock as
        the claim read it after taking the lock: a row-lock wait only makes the row look younger)."""
        if (row.execution_id or "") == execution.token:
            return True  # ours: an earlier attempt of this claim committed
        p = self._placeholder
        lock = " FOR UPDATE" if self._dialect == "postgresql" else ""
        cursor.execute(
            f"SELECT {', '.join(COLUMNS[1:])} FROM {self.table} "
            f"WHERE portal_id = {p} AND row_key = {p}{lock}",
            [self.portal_id, row.row_key],
        )
        record = cursor.fetchone()
        if record is None:
            return False
        now = self._row(record, clock)
        return (
            now.pending
            and (now.execution_id or "") == (row.execution_id or "")
            and not now.held_by_another(execution, pending_timeout)
        )

    def _lock_claims(self, cursor: Any) -> None:
        """Serialise claims of this table and portal (see :meth:`claim`) until the transaction ends."""
        conn = self.conn
        if self._dialect == "sqlite" and isinstance(conn, sqlite3.Connection) and not conn.in_transaction:
            cursor.execute("BEGIN IMMEDIATE")  # the write lock now, so the checks read the latest rows
        elif self._dialect == "postgresql":
            digest = hashlib.sha256(f"{self.table}\n{self.portal_id}".encode()).digest()
            cursor.execute(
                f"SELECT pg_advisory_xact_lock({self._placeholder})",
                [int.from_bytes(digest[:8], "big", signed=True)],
            )

    def _held_elsewhere(self, cursor: Any, key: str, fingerprint: str, token: str, since: Any) -> bool:
        """Another key holds ``fingerprint``: registered, unconfirmed (the lead may be a portal user),
        or pending for another execution since ``since``."""
        p = self._placeholder
        cursor.execute(
            f"SELECT row_key FROM {self.table} WHERE portal_id = {p} AND {IDENTIFIER_COLUMN} = {p} "
            f"AND row_key <> {p} AND (status IN ({p}, {p}, {p}) OR (status = {p} "
            f"AND COALESCE(execution_id, '') <> {p} AND last_attempt_at >= {p}))",
            [self.portal_id, fingerprint, key, *sorted(OK_STATUSES | {UNCONFIRMED}), PENDING, token, since],
        )
        return cursor.fetchone() is not None

    def _insert_if_absent(
        self, key: str, now: Any, execution: Execution, fingerprint: str | None = None
    ) -> tuple[str, list[Any]]:
        """The statement (and parameters) that claims an absent ``key``; a no-op when a row exists.

        SQLite and PostgreSQL say it with ``ON CONFLICT DO NOTHING``; other databases with plain SQL
        (``INSERT ... SELECT ... WHERE NOT EXISTS``), where a concurrent claim fails on the primary key
        and the write's retry then finds the row held.
        """
        columns = (
            "portal_id, row_key, status, attempts, first_attempt_at, last_attempt_at, dag_id, run_id, "
            f"{IDENTIFIER_COLUMN}, task_id, map_index, execution_id"
        )
        values = [
            self.portal_id, key, PENDING, 0, now, now, execution.dag_id, execution.run_id, fingerprint,
            execution.task_id, execution.map_index, execution.token,
        ]  # fmt: skip
        if self._dialect in ("sqlite", "postgresql"):
            return (
                f"INSERT INTO {self.table} ({columns}) VALUES ({self._marks(len(values))}) "
                "ON CONFLICT (portal_id, row_key) DO NOTHING",
                values,
            )
        where, params = self._where_keys([key])
        return (
            f"INSERT INTO {self.table} ({columns}) SELECT {self._marks(len(values))} "
            f"WHERE NOT EXISTS (SELECT 1 FROM {self.table} {where})",
            [*values, *params],
        )

    def fill_identifiers(self, identifiers: Mapping[str, str]) -> None:
        """Write ``lead_identifier`` for keys whose row has none yet (rows of an earlier release).

        Rows that have one keep it: it names the lead as it was registered, whatever the data says now.
        """
        if not identifiers:
            return

        def write() -> None:
            p = self._placeholder
            with self._transaction() as cursor:
                for key, fingerprint in identifiers.items():
                    cursor.execute(
                        f"UPDATE {self.table} SET {IDENTIFIER_COLUMN} = {p} WHERE portal_id = {p} "
                        f"AND row_key = {p} AND {IDENTIFIER_COLUMN} IS NULL",
                        [fingerprint, self.portal_id, key],
                    )

        self._with_retries(f"fill-in of {len(identifiers)} lead identifiers", write)

    def release(self, previous: Mapping[str, LedgerRow | None], *, execution: Execution) -> None:
        """Undo ``execution``'s claims of rows it never sent: each goes back to what ``previous`` says."""
        if not previous:
            return

        def write() -> None:
            p = self._placeholder
            with self._transaction() as cursor:
                restore: list[LedgerRow] = []
                for key, row in previous.items():
                    cursor.execute(
                        f"DELETE FROM {self.table} WHERE portal_id = {p} AND row_key = {p} AND status = {p} "
                        f"AND execution_id = {p}",
                        [self.portal_id, key, PENDING, execution.token],
                    )
                    if cursor.rowcount == 1 and row is not None:
                        restore.append(row)
                if restore:
                    self._replace(restore)

        self._with_retries(f"release of {len(previous)} unsent rows", write)

    def run_counts(self, *, execution: Execution) -> dict[str, int]:
        """Rows of this portal last recorded by ``execution``'s task instance, counted by status.

        The task instance is ``dag_id``, ``run_id``, ``task_id`` and ``map_index``: this execution and
        the earlier tries of the same task, not the other tasks of the same DAG run.
        """
        p = self._placeholder
        where = f"dag_id = {p} AND run_id = {p} AND COALESCE(map_index, -1) = {p}"
        params: list[Any] = [execution.dag_id, execution.run_id, execution.map_index]
        if execution.task_id is None:
            where += " AND task_id IS NULL"
        else:
            where += f" AND task_id = {p}"
            params.append(execution.task_id)
        return self._with_retries("count of the run's rows", lambda: self._count_by("status", where, params))

    def pending_rows(self) -> list[LedgerRow]:
        """This portal's rows left ``pending`` (in flight now, or when their execution ended)."""

        def read() -> list[LedgerRow]:
            conn = self.conn
            cursor = conn.cursor()
            try:
                read_at = self._db_now(cursor)
                cursor.execute(
                    f"SELECT {', '.join(COLUMNS[1:])} FROM {self.table} "
                    f"WHERE portal_id = {self._placeholder} AND status = {self._placeholder}",
                    [self.portal_id, PENDING],
                )
                return [self._row(record, read_at) for record in cursor.fetchall()]
            finally:
                cursor.close()
                conn.commit()

        return self._with_retries("read of the pending rows", read)

    def _count_by(self, column: str, where: str, params: list[Any]) -> dict[str, int]:
        """This portal's rows matching ``where``, counted by ``column``; ends the read transaction."""
        conn = self.conn
        cursor = conn.cursor()
        try:
            cursor.execute(
                f"SELECT {column}, COUNT(*) FROM {self.table} "
                f"WHERE portal_id = {self._placeholder} AND {where} GROUP BY {column}",
                [self.portal_id, *params],
            )
            return {str(value): int(count) for value, count in cursor.fetchall()}
        finally:
            cursor.close()
            conn.commit()

    @staticmethod
    def _merge(
        previous: LedgerRow | None, outcome: RegistrationOutcome, now: dt.datetime, execution: Execution
    ) -> LedgerRow:
        row = LedgerRow(
            row_key=outcome.key,
            status=outcome.status.value,
            lead_id=outcome.lead_id,
            error_type=outcome.error_type,
            error_message=outcome.error_message,
            attempts=outcome.attempts,
            first_attempt_at=now,
            last_attempt_at=now,
            registered_at=now if outcome.ok else None,
            dag_id=execution.dag_id,
            run_id=execution.run_id,
            retryable=outcome.retryable,
            task_id=execution.task_id,
            map_index=execution.map_index,
            execution_id=execution.token,
        )
        if previous is None:
            return row
        return replace(
            row,
            lead_id=row.lead_id or previous.lead_id,
            attempts=previous.attempts + row.attempts,
            first_attempt_at=previous.first_attempt_at or now,
            registered_at=previous.registered_at or row.registered_at,
            lead_identifier=previous.lead_identifier,
        )

    def _replace(self, rows: Sequence[LedgerRow]) -> None:
        cursor = self.conn.cursor()
        try:
            keys = [row.row_key for row in rows]
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                where, params = self._where_keys(chunk)
                cursor.execute(f"DELETE FROM {self.table} {where}", params)
            one_row = f"({self._marks(len(COLUMNS))})"
            for start in range(0, len(rows), _INSERT_CHUNK):
                chunk_rows = rows[start : start + _INSERT_CHUNK]
                values: list[Any] = []
                for row in chunk_rows:
                    values.extend(self._values(row))
                cursor.execute(
                    f"INSERT INTO {self.table} ({', '.join(COLUMNS)}) "
                    f"VALUES {', '.join([one_row] * len(chunk_rows))}",
                    values,
                )
        finally:
            cursor.close()

    def _values(self, row: LedgerRow) -> list[Any]:
        retryable: Any = int(row.retryable) if self._dialect == "sqlite" else row.retryable
        return [
            self.portal_id,
            row.row_key,
            row.lead_id,
            row.status,
            row.error_type,
            row.error_message,
            row.attempts,
            self._to_db(row.first_attempt_at),
            self._to_db(row.last_attempt_at),
            self._to_db(row.registered_at),
            row.dag_id,
            row.run_id,
            retryable,
            row.lead_identifier,
            row.task_id,
            row.map_index,
            row.execution_id,
        ]
