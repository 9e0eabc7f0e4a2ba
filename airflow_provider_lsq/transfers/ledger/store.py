"""The ledger's store: reading and writing the table through a common-sql hook's DB-API connection.

One connection, opened lazily; every write one transaction, retried with backoff (reconnecting)
for up to ``write_timeout`` seconds before it raises :class:`LedgerUnavailableError`. Reads of a
batch's rows and the leads other keys hold; the claim protocol (``pending`` rows, their heartbeat,
taking over an abandoned claim, releasing unsent ones); and writes merging each outcome into what
the row held. Writes are a DELETE of the batch's keys then an INSERT, with the hook's placeholder.
What differs between databases is the dialect's (:mod:`.dialects`), the table itself the schema's
(:mod:`.schema`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from airflow_provider_lsq.transfers.ledger import schema
from airflow_provider_lsq.transfers.ledger.dialects import LOOKUP_CHUNK, Dialect
from airflow_provider_lsq.transfers.ledger.rows import (
    DEFAULT_PENDING_TIMEOUT,
    LEAD_HOLDER_STATUSES,
    OK_STATUSES,
    PENDING,
    SETTLED_STATUSES,
    UNCONFIRMED,
    LedgerRow,
)
from airflow_provider_lsq.transfers.ledger.schema import (
    ADDED_COLUMNS,
    COLUMNS,
    IDENTIFIER_COLUMN,
    POSITION_COLUMN,
    validate_table_name,
)
from airflow_provider_lsq.version_compat import AirflowException

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from types import TracebackType

    from airflow.providers.common.sql.hooks.sql import DbApiHook

    from airflow_provider_lsq.outcomes import RegistrationOutcome
    from airflow_provider_lsq.transfers.executions import Execution

T = TypeVar("T")
log = logging.getLogger("airflow_provider_lsq.transfers.ledger")  # the name it logged under before
# Text a value may have to be written into the anti-join's SQL as a literal ('' doubled): no backslash
# (an escape in MySQL), no % (psycopg's placeholder mark when the query has parameters), no control.
_UNSAFE_LITERAL = re.compile(r"[\\%\x00-\x1f\x7f]")
_INSERT_CHUNK = 50  # rows per INSERT: 17 columns, 850 parameters (under SQLite's oldest 999)


class LedgerUnavailableError(AirflowException):
    """The ledger could not be written within its ``write_timeout``, retries included."""


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

    #: The table's columns, in order (a subclass's table, e.g. the lead-update ledger's, has its own:
    #: :meth:`_row` and :meth:`_values` read and write them).
    columns: tuple[str, ...] = COLUMNS
    #: Columns added since the table's first release (name: "text" or "integer"): migrated in place.
    added_columns: Mapping[str, str] = ADDED_COLUMNS

    def __init__(
        self, db_hook: DbApiHook, table: str, portal_id: str, *, write_timeout: float = 60.0
    ) -> None:
        self.db_hook = db_hook
        self.table = validate_table_name(table)
        self.portal_id = str(portal_id)
        self.write_timeout = write_timeout
        self._conn: Any = None
        self.taken_over: set[str] = set()  # claimed keys the last record() left to another execution
        self._rules = Dialect.of(db_hook)  # every difference between databases: see dialects.py
        self._placeholder = str(getattr(db_hook, "placeholder", None) or "%s")

    # -- connection ------------------------------------------------------------------------------

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql`` or ``generic``: from the hook's ``dialect_name``."""
        return self._dialect.name

    @property
    def _dialect(self) -> Dialect:
        return self._rules

    @_dialect.setter
    def _dialect(self, value: Dialect | str) -> None:
        """A dialect, or a dialect's name: its rules, the hook's own name kept for the anti-join (the
        tests run the generic SQL on a real database by setting ``"generic"``)."""
        if isinstance(value, str):
            value = Dialect.named(value, hook_name=self._rules.hook_name)
        self._rules = value

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self.db_hook.get_conn()
            self._dialect.prepare_connection(conn, self.write_timeout)
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
            self._dialect.begin(cursor, self.write_timeout)
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
        return self._dialect.now(cursor)

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
        self._dialect.before_create(self.conn)
        ddl = self._create_table_sql()
        with self._transaction() as cursor:
            cursor.execute(ddl)

    def _create_table_sql(self) -> str:
        """The table's ``CREATE TABLE IF NOT EXISTS`` (:func:`.schema.create_table`)."""
        return schema.create_table(self.table, self._dialect)

    def _columns(self) -> set[str]:
        """The table's column names, lower-cased: from an empty SELECT's description (any DB-API)."""
        with self._transaction() as cursor:
            cursor.execute(f"SELECT * FROM {self.table} WHERE 1 = 0")
            return {str(column[0]).lower() for column in cursor.description or ()}

    def _add_missing_columns(self) -> None:
        """Migrate a table of an earlier release: add each column of :data:`ADDED_COLUMNS` it lacks."""
        present = self._columns()
        missing = [name for name in self.added_columns if name not in present]
        if not missing:
            return
        log.info("Ledger %s: adding the columns %s (migration).", self.table, ", ".join(missing))
        with self._transaction() as cursor:
            self._dialect.migration_lock(cursor)
            for name in missing:
                kind = schema.added_column_type(name, self._dialect, self.added_columns)
                cursor.execute(self._dialect.add_column(self.table, name, kind))

    def _create_identifier_index(self) -> None:
        if not self._dialect.makes_index:
            return
        index = schema.identifier_index(self.table)
        with self._transaction() as cursor:
            self._dialect.create_index(
                cursor, self._placeholder, self.table, index, f"portal_id, {IDENTIFIER_COLUMN}"
            )

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
        columns = ", ".join(self.columns[1:])
        cursor = self.conn.cursor()
        try:
            read_at = self._db_now(cursor)
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start : start + LOOKUP_CHUNK]
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
            columns = ", ".join(self.columns[1:])
            conn = self.conn
            cursor = conn.cursor()
            try:
                read_at = self._db_now(cursor)
                for start in range(0, len(wanted), LOOKUP_CHUNK):
                    chunk = wanted[start : start + LOOKUP_CHUNK]
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
        limit = self._dialect.batch_parameters
        size = max(1, (limit - 1 - len(statuses)) // 2)
        p = self._placeholder
        clock = f", {self._dialect.clock_column}" if self._dialect.clock_column else ""
        select = f"SELECT {', '.join(self.columns[1:])}{clock} FROM {self.table} WHERE portal_id = {p} AND "
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
                        row = self._row(record[: len(self.columns) - 1], read_at)
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
        mark = self._dialect.quote_mark
        key = key_column
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", key_column):
            key = mark + key_column.replace(mark, mark * 2) + mark
        text = self._dialect.cast_text
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
        return self._dialect.to_db(value)

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
                for start in range(0, len(wanted), LOOKUP_CHUNK):
                    where, params = self._where_keys(wanted[start : start + LOOKUP_CHUNK])
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
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
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
        lock = self._dialect.row_lock
        cursor.execute(
            f"SELECT {', '.join(self.columns[1:])} FROM {self.table} "
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
        self._dialect.lock_claims(cursor, self.conn, self.table, self.portal_id, self._placeholder)

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
        if self._dialect.on_conflict_do_nothing:
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
                    f"SELECT {', '.join(self.columns[1:])} FROM {self.table} "
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

    def _merge(
        self, previous: LedgerRow | None, outcome: RegistrationOutcome, now: dt.datetime, execution: Execution
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
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[start : start + LOOKUP_CHUNK]
                where, params = self._where_keys(chunk)
                cursor.execute(f"DELETE FROM {self.table} {where}", params)
            one_row = f"({self._marks(len(self.columns))})"
            for start in range(0, len(rows), _INSERT_CHUNK):
                chunk_rows = rows[start : start + _INSERT_CHUNK]
                values: list[Any] = []
                for row in chunk_rows:
                    values.extend(self._values(row))
                cursor.execute(
                    f"INSERT INTO {self.table} ({', '.join(self.columns)}) "
                    f"VALUES {', '.join([one_row] * len(chunk_rows))}",
                    values,
                )
        finally:
            cursor.close()

    def _values(self, row: LedgerRow) -> list[Any]:
        retryable: Any = self._dialect.to_db_boolean(row.retryable)
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
