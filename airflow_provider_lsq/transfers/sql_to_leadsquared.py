"""SqlToLeadSquaredPortalOperator: register a warehouse query's rows as portal users, in one task.

Rows stream from the warehouse to LeadSquared inside the task, so applicants' personal data never
passes through XCom or the metadata database; the task returns counts only. A ledger table records
each row key's outcome, which makes reruns and retries safe and cheap.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, BaseHook, BaseOperator
from airflow.providers.common.sql.hooks.sql import DbApiHook

from airflow_provider_lsq.assets import add_counts_to_portal_events
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.lineage import transfer_lineage
from airflow_provider_lsq.operators.portal import check_lead, invalid_outcome
from airflow_provider_lsq.progress import RegistrationProgress, check_failure_ratio
from airflow_provider_lsq.transfers.ledger import RegistrationLedger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_lsq.outcomes import RegistrationOutcome

MAX_LOGGED_KEYS = 50  # duplicate keys and NULL-key positions logged one by one, then only counted


def get_db_hook(conn_id: str, parameter: str) -> DbApiHook:
    """The common-sql hook of connection ``conn_id``, or a clear error naming ``parameter``."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not isinstance(hook, DbApiHook):
        raise AirflowException(
            f"{parameter}={conn_id!r}: its hook, {type(hook).__name__}, is not a common-sql DbApiHook "
            "(use a database connection such as postgres or sqlite)."
        )
    return hook


class _SeenKeys:
    """The row keys met so far in this run, in a private temporary SQLite file: memory stays flat."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "" = a temporary on-disk database, deleted on close
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, reported INTEGER NOT NULL DEFAULT 0)")

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was already there."""
        return self._db.execute("INSERT OR IGNORE INTO seen (key) VALUES (?)", (key,)).rowcount == 1

    def first_report(self, key: str) -> bool:
        """True the first time a duplicate ``key`` is reported."""
        return (
            self._db.execute("UPDATE seen SET reported = 1 WHERE key = ? AND reported = 0", (key,)).rowcount
            == 1
        )

    def close(self) -> None:
        self._db.close()


class SqlToLeadSquaredPortalOperator(BaseOperator):
    """Register the rows of a SQL query as portal users; record each row's outcome in a ledger table.

    Each row maps column names to attribute schema names (alias them in the query, e.g.
    ``email AS "EmailAddress"``: PostgreSQL folds unquoted aliases to lower case). The ledger table is
    created first, so the query may anti-join it. Rows then stream in batches of ``batch_size``
    (a server-side cursor on PostgreSQL), so memory stays flat however large the result:

    - a key the ledger holds as registered (or already registered) is skipped: no call;
    - a key recorded as failed or invalid is skipped unless the failure was transient
      (``retryable``) or ``retry_failed`` is set;
    - a key met twice in the query is reported (``duplicates``) and sent once;
    - a row with a NULL key is invalid (named by its position; it cannot go in the ledger).

    Outcomes are written to the ledger every ``batch_size`` rows and when the task ends, failing or
    not, so a retried task never registers again a row it had recorded. The task returns counts only
    and fails when more than ``max_failure_ratio`` of the rows sent are invalid or failed.

    :param sql: the query (a single SELECT, no trailing statement). Templated; ``.sql`` files work.
    :param sql_conn_id: the warehouse connection (any common-sql database). Templated.
    :param key_column: the column naming each row in the ledger. It is not sent to LeadSquared unless
        ``send_key_column`` is set (for a key that is itself an attribute, e.g. ``mx_Application_Number``).
    :param parameters: parameters of the query, in the driver's style. Templated.
    :param send_key_column: send ``key_column`` as a lead attribute too.
    :param identifier_attribute: the lead's unique identifier, sent first.
    :param only_new_leads: refuse existing leads (``already_registered``) instead of upgrading them.
    :param password_callable: ``callable(lead) -> password``; default a fresh random one per lead.
    :param max_failure_ratio: the share of invalid or failed rows (of those sent) that fails the task.
    :param dry_run: validate and map every row; make no call and write nothing to the ledger (its
        table is still created, so a query that anti-joins it runs).
    :param max_workers: concurrent calls (default: the hook's choice from the rate limit).
    :param leadsquared_conn_id: the LeadSquared connection. Templated.
    :param ledger_table: the ledger table, optionally schema-qualified. Templated.
    :param ledger_conn_id: where the ledger lives (default: ``sql_conn_id``). Templated.
    :param batch_size: rows fetched per batch, and outcomes written to the ledger per transaction.
    :param retry_failed: also retry rows recorded as permanently failed or invalid.
    """

    template_fields: Sequence[str] = (
        "sql",
        "parameters",
        "sql_conn_id",
        "ledger_conn_id",
        "ledger_table",
        "leadsquared_conn_id",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql", "parameters": "json"}
    ui_color = "#e8f4fd"
    progress_interval: float = 10.0  # seconds between progress lines in the task log

    def __init__(
        self,
        *,
        sql: str,
        sql_conn_id: str,
        key_column: str,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        send_key_column: bool = False,
        identifier_attribute: str | None = "EmailAddress",
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        max_failure_ratio: float = 0.0,
        dry_run: bool = False,
        max_workers: int | None = None,
        leadsquared_conn_id: str = LeadSquaredHook.default_conn_name,
        ledger_table: str = "lsq_portal_registrations",
        ledger_conn_id: str | None = None,
        batch_size: int = 500,
        retry_failed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not key_column:
            raise ValueError("key_column is required: it names each row in the ledger")
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.key_column = key_column
        self.parameters = parameters
        self.send_key_column = send_key_column
        self.identifier_attribute = identifier_attribute
        self.only_new_leads = only_new_leads
        self.password_callable = password_callable
        self.max_failure_ratio = check_failure_ratio(max_failure_ratio)
        self.is_dry_run = dry_run  # not ``self.dry_run``: that would shadow BaseOperator.dry_run()
        self.max_workers = max_workers
        self.leadsquared_conn_id = leadsquared_conn_id
        self.registration_counts: dict[str, Any] | None = None  # set by execute: lineage reads it
        self.ledger_table = ledger_table
        self.ledger_conn_id = ledger_conn_id
        self.batch_size = batch_size
        self.retry_failed = retry_failed

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.monotonic()
        sql = self.sql.strip().rstrip(";").strip()
        sql_hook = get_db_hook(self.sql_conn_id, "sql_conn_id")
        ledger_hook = get_db_hook(self.ledger_conn_id or self.sql_conn_id, "ledger_conn_id")
        lsq_hook = LeadSquaredHook(leadsquared_conn_id=self.leadsquared_conn_id)
        portal_id = lsq_hook.config.portal_id
        if not portal_id:
            raise AirflowException(
                f"Connection {self.leadsquared_conn_id!r} has no portal_id in its extra: the ledger and "
                "the registration need it (Workflow > Manage Portals in LeadSquared, in the page URL)."
            )
        dag_id, run_id = self._run_names(context)
        with (
            RegistrationLedger(ledger_hook, self.ledger_table, portal_id) as ledger,
            contextlib.closing(_SeenKeys()) as seen,
        ):
            ledger.ensure_table()  # first: the query may anti-join it
            conn = sql_hook.get_conn()
            try:
                total = self._count(conn, sql)
                progress = RegistrationProgress(
                    total,
                    interval=self.progress_interval,
                    logger=self.log,
                    track_skips=True,
                    conn_id=None if self.is_dry_run else self.leadsquared_conn_id,
                )
                self.log.info(
                    "%s rows of %r as portal users of portal %r (%s rows; ledger %s on %r).",
                    "Validating (dry run)" if self.is_dry_run else "Registering",
                    self.sql_conn_id,
                    portal_id,
                    "unknown" if total is None else total,
                    self.ledger_table,
                    self.ledger_conn_id or self.sql_conn_id,
                )
                transfer = _Transfer(self, ledger, seen, progress, dag_id=dag_id, run_id=run_id)
                with progress:
                    transfer.run(conn, sql, lsq_hook)
            finally:
                with contextlib.suppress(Exception):
                    conn.rollback()  # only read: end the transaction (and a server-side cursor)
                with contextlib.suppress(Exception):
                    conn.close()
        summary = progress.summary(self.is_dry_run, time.monotonic() - started)
        self.registration_counts = add_counts_to_portal_events(
            context, self.outlets, summary, leadsquared_conn_id=self.leadsquared_conn_id, log=self.log
        )
        self.log.info("LeadSquared registration summary: %s", summary)
        progress.raise_if_too_many_failures(self.max_failure_ratio)
        return summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage (Airflow's OpenLineage provider calls it): see :mod:`airflow_provider_lsq.lineage`."""
        return transfer_lineage(self)

    def _run_names(self, context: Context) -> tuple[str, str]:
        dag_run = context.get("dag_run")
        run_id = context.get("run_id") or getattr(dag_run, "run_id", None) or "manual"
        dag_id = getattr(context.get("ti"), "dag_id", None) or self.dag_id
        return str(dag_id), str(run_id)

    def _execute(self, cursor: Any, sql: str) -> None:
        if self.parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, self.parameters)

    def _count(self, conn: Any, sql: str) -> int | None:
        """Rows the query will return, for progress and ETA; None when the database cannot say."""
        cursor = conn.cursor()
        try:
            self._execute(cursor, f"SELECT COUNT(*) FROM ({sql}) lsq_count")
            return int(cursor.fetchone()[0])
        except Exception as error:  # the message may quote data: log its type only
            self.log.info("Could not count the rows first (%s): progress shows no ETA.", type(error).__name__)
            with contextlib.suppress(Exception):
                conn.rollback()  # PostgreSQL: the failed statement aborted the transaction
            return None
        finally:
            with contextlib.suppress(Exception):
                cursor.close()


class _Transfer:
    """One execution's state: the stream of rows to send, the outcomes to record, the counts."""

    def __init__(
        self,
        op: SqlToLeadSquaredPortalOperator,
        ledger: RegistrationLedger,
        seen: _SeenKeys,
        progress: RegistrationProgress,
        *,
        dag_id: str,
        run_id: str,
    ) -> None:
        self.op = op
        self.log = op.log
        self.ledger = ledger
        self.seen = seen
        self.progress = progress
        self.dag_id = dag_id
        self.run_id = run_id
        self.unrecorded: list[RegistrationOutcome] = []
        self.stream_error: Exception | None = None
        self.skipped_done = self.skipped_failed = 0
        self.reported_duplicates = self.reported_null = 0

    # -- the whole run ---------------------------------------------------------------------------

    def run(self, conn: Any, sql: str, hook: LeadSquaredHook) -> None:
        is_postgres = type(conn).__module__.split(".")[0] in ("psycopg2", "psycopg")
        # A named cursor is server-side on psycopg: rows come batch by batch. sqlite3 is lazy already.
        cursor = conn.cursor(name="lsq_transfer") if is_postgres else conn.cursor()
        try:
            self.op._execute(cursor, sql)
            rows = self._rows_to_send(cursor)
            if self.op.is_dry_run:
                self._dry_run(rows)
            else:
                try:
                    self._register(rows, hook)
                finally:
                    self._flush()  # whatever happened, record what finished
        finally:
            with contextlib.suppress(Exception):
                cursor.close()
        self._log_skips()
        if self.stream_error is not None:
            raise self.stream_error

    def _register(self, rows: Iterator[tuple[str, dict[str, Any]]], hook: LeadSquaredHook) -> None:
        first = next(rows, None)
        if first is None:
            return  # nothing to send: no call at all
        outcomes = hook.register_portal_users(
            itertools.chain((first,), rows),
            password_callable=self.op.password_callable,
            only_new_leads=self.op.only_new_leads,
            identifier_attribute=self.op.identifier_attribute,
            max_workers=self.op.max_workers,
        )
        for outcome in outcomes:
            self.progress.add(outcome)
            self.unrecorded.append(outcome)
            if len(self.unrecorded) >= self.op.batch_size:
                self._flush()

    def _dry_run(self, rows: Iterator[tuple[str, dict[str, Any]]]) -> None:
        for key, lead in rows:
            outcome = check_lead(key, lead, self.op.identifier_attribute)
            if outcome is None:
                self.progress.add_valid()
            else:
                self.progress.add(outcome)

    def _flush(self) -> None:
        if self.unrecorded:
            batch, self.unrecorded = self.unrecorded, []
            self.ledger.record(batch, dag_id=self.dag_id, run_id=self.run_id)

    # -- the stream ------------------------------------------------------------------------------

    def _rows_to_send(self, cursor: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, lead)`` for every row that needs a call, read lazily batch by batch.

        A failure of the warehouse stream ends the stream (so rows in flight still finish and are
        recorded) and is raised once they are.
        """
        position = 0
        columns: list[str] | None = None
        key_index = 0
        while True:
            try:
                records = cursor.fetchmany(self.op.batch_size)
            except Exception as error:
                self.log.error("Reading the query's rows failed after %d rows: stopping.", position)
                self.stream_error = error
                return
            if not records:
                return
            if columns is None:  # psycopg's named cursors describe the result after the first fetch
                columns = [str(column[0]) for column in cursor.description]
                key_index = self._key_index(columns)
            keyed: list[tuple[str, Sequence[Any]]] = []
            for row in records:
                position += 1
                record = tuple(row.values()) if isinstance(row, Mapping) else row  # dict cursors too
                key = self._key(position, record[key_index])
                if key is not None:
                    keyed.append((key, record))
            known = self.ledger.lookup(key for key, _ in keyed)
            for key, record in keyed:
                previous = known.get(key)
                if previous is not None and previous.registered:
                    self.skipped_done += 1
                    self.progress.add_skipped()
                elif previous is not None and not previous.retryable and not self.op.retry_failed:
                    self.skipped_failed += 1
                    self.progress.add_skipped()
                else:
                    yield key, self._lead(columns, key_index, record)

    def _key_index(self, columns: list[str]) -> int:
        wanted = self.op.key_column
        if wanted in columns:
            return columns.index(wanted)
        folded = [index for index, name in enumerate(columns) if name.lower() == wanted.lower()]
        if len(folded) == 1:
            return folded[0]
        raise AirflowException(
            f"key_column {wanted!r} is not a column of the query's result (columns: {', '.join(columns)})."
        )

    def _key(self, position: int, value: Any) -> str | None:
        """The row's key, or None for a row not to send (NULL key, or a duplicate)."""
        if value is None or not str(value).strip():
            message = f"column {self.op.key_column!r}: the row key is NULL or empty"
            self.progress.add(invalid_outcome(f"#{position}", message))
            if self.reported_null < MAX_LOGGED_KEYS:
                self.reported_null += 1
                self.log.warning("Row #%d of the query has no %s: not sent.", position, self.op.key_column)
            return None
        key = str(value)
        if self.seen.add(key):
            return key
        self.progress.add_duplicate()
        if self.seen.first_report(key) and self.reported_duplicates < MAX_LOGGED_KEYS:
            self.reported_duplicates += 1
            self.log.warning("Row key %s appears more than once in the query: sent once.", key)
        return None

    def _lead(self, columns: list[str], key_index: int, record: Sequence[Any]) -> dict[str, Any]:
        return {
            column: value
            for index, (column, value) in enumerate(zip(columns, record, strict=True))
            if index != key_index or self.op.send_key_column
        }

    def _log_skips(self) -> None:
        if self.skipped_done:
            self.log.info("%d rows skipped: the ledger has them registered.", self.skipped_done)
        if self.skipped_failed:
            self.log.info(
                "%d rows skipped: the ledger has them failed or invalid, not retryable "
                "(set retry_failed=True to try them again).",
                self.skipped_failed,
            )
        if self.reported_duplicates >= MAX_LOGGED_KEYS:
            self.log.warning("More duplicate keys were counted but not logged.")
