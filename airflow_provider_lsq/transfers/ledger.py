"""The registration ledger: one row per (portal, warehouse row key), in a table next to the data.

It is what makes the SQL transfer safe to rerun: a row the ledger holds as registered is never sent
again, a transient failure is retried on the next run, a permanent one only when asked. It holds keys,
lead ids, statuses and error messages: never a password and no other lead data.

Plain DB-API, portable across SQLite and PostgreSQL (and kept generic for other databases): writes
are a DELETE of the batch's keys then an INSERT, in one transaction, with the hook's placeholder.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.outcomes import RegistrationStatus

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import TracebackType

    from airflow.providers.common.sql.hooks.sql import DbApiHook

    from airflow_provider_lsq.outcomes import RegistrationOutcome

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S"
_LOOKUP_CHUNK = 400  # keys per SELECT/DELETE: well under SQLite's oldest 999-parameter limit
_INSERT_CHUNK = 50  # rows per INSERT: 13 columns, 650 parameters
OK_STATUSES = frozenset({RegistrationStatus.REGISTERED.value, RegistrationStatus.ALREADY_REGISTERED.value})
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
)
# Column types per dialect: (key/text, timestamp, boolean, false literal).
_TYPES = {
    "sqlite": ("TEXT", "TEXT", "INTEGER", "0"),
    "postgresql": ("TEXT", "TIMESTAMP", "BOOLEAN", "FALSE"),
    "generic": ("VARCHAR(255)", "TIMESTAMP", "BOOLEAN", "FALSE"),
}


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

    @property
    def registered(self) -> bool:
        """The lead is a portal user: registered now or earlier (``already_registered``)."""
        return self.status in OK_STATUSES


class RegistrationLedger:
    """Read and write the ledger table through a common-sql hook's plain DB-API connection.

    One connection is opened lazily and kept until :meth:`close` (or the end of a ``with`` block).
    Use it from one thread.

    :param db_hook: any common-sql ``DbApiHook`` (SQLite and PostgreSQL are tested).
    :param table: the ledger table, optionally schema-qualified; checked to be a plain identifier.
    :param portal_id: the portal whose registrations this ledger tracks (part of the primary key).
    """

    def __init__(self, db_hook: DbApiHook, table: str, portal_id: str) -> None:
        self.db_hook = db_hook
        self.table = validate_table_name(table)
        self.portal_id = str(portal_id)
        self._conn: Any = None
        self._dialect = "generic"
        self._placeholder = "%s"

    # -- connection ------------------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self.db_hook.get_conn()
            module = type(conn).__module__.split(".")[0]
            if isinstance(conn, sqlite3.Connection):
                self._dialect = "sqlite"
            elif module in ("psycopg2", "psycopg"):
                self._dialect = "postgresql"
            self._placeholder = getattr(self.db_hook, "placeholder", None) or (
                "?" if self._dialect == "sqlite" else "%s"
            )
            self._conn = conn
        return self._conn

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

    def _marks(self, count: int) -> str:
        return ", ".join([self._placeholder] * count)

    def _where_keys(self, keys: Sequence[str]) -> tuple[str, list[Any]]:
        """The WHERE clause (and its parameters) that picks this portal's rows for ``keys``."""
        where = f"WHERE portal_id = {self._placeholder} AND row_key IN ({self._marks(len(keys))})"
        return where, [self.portal_id, *keys]

    # -- schema ----------------------------------------------------------------------------------

    def ensure_table(self) -> None:
        """Create the table if needed (committed at once, so a query may anti-join it right after).

        On SQLite the file is switched to WAL, so that the transfer's streaming read of a warehouse
        in the same file does not lock out the ledger's writes.
        """
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
                PRIMARY KEY (portal_id, row_key)
            )
        """
        cursor = conn.cursor()
        try:
            cursor.execute(ddl)
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            cursor.close()

    # -- reading ---------------------------------------------------------------------------------

    def lookup(self, keys: Iterable[str]) -> dict[str, LedgerRow]:
        """The ledger's rows for ``keys`` (absent keys are left out)."""
        conn = self.conn
        try:
            rows = self._select(keys)
        finally:
            conn.commit()  # end the read transaction: no snapshot or lock held between batches
        return rows

    def _select(self, keys: Iterable[str]) -> dict[str, LedgerRow]:
        wanted = list(dict.fromkeys(str(key) for key in keys))
        found: dict[str, LedgerRow] = {}
        columns = ", ".join(COLUMNS[1:])
        cursor = self.conn.cursor()
        try:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                where, params = self._where_keys(chunk)
                cursor.execute(f"SELECT {columns} FROM {self.table} {where}", params)
                for record in cursor.fetchall():
                    row = self._row(record)
                    found[row.row_key] = row
        finally:
            cursor.close()
        return found

    def _row(self, record: Sequence[Any]) -> LedgerRow:
        (key, lead_id, status, error_type, error_message, attempts, first, last, registered, dag_id,
         run_id, retryable) = record  # fmt: skip
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

    def record(self, outcomes: Iterable[RegistrationOutcome], *, dag_id: str, run_id: str) -> int:
        """Write a batch of outcomes in one transaction; return how many keys were written.

        ``attempts`` accumulate across runs; ``first_attempt_at`` and the first ``registered_at`` are
        kept; a known lead id is kept when the new outcome has none.
        """
        batch = list(outcomes)
        if not batch:
            return 0
        conn = self.conn
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        try:
            merged = self._select(outcome.key for outcome in batch)
            for outcome in batch:
                merged[outcome.key] = self._merge(merged.get(outcome.key), outcome, now, dag_id, run_id)
            written = [merged[key] for key in dict.fromkeys(outcome.key for outcome in batch)]
            self._replace(written)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return len(written)

    @staticmethod
    def _merge(
        previous: LedgerRow | None, outcome: RegistrationOutcome, now: dt.datetime, dag_id: str, run_id: str
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
            dag_id=dag_id,
            run_id=run_id,
            retryable=outcome.retryable,
        )
        if previous is None:
            return row
        return replace(
            row,
            lead_id=row.lead_id or previous.lead_id,
            attempts=previous.attempts + row.attempts,
            first_attempt_at=previous.first_attempt_at or now,
            registered_at=previous.registered_at or row.registered_at,
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
        ]
