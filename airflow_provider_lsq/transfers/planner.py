"""The SQL transfer's row planner: the query's rows, keyed and decided against the ledger.

For each row of the warehouse's query it decides, before any call, whether the row is sent, recorded
without a call (invalid, the same lead as a registered key) or left out (registered already, failed
for good, held by another execution, a duplicate), counting each case for the summary and the log.
It yields :class:`~airflow_provider_lsq.engine.rows.PlannedRow` items for the engine, each with the
ledger state its sink needs (no write into the sink behind the engine). It reads its settings from a
:class:`TransferSettings` (the operator makes it), not from the operator.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_lsq.engine.duplicates import SeenRows, lead_identity
from airflow_provider_lsq.engine.registration import check_lead
from airflow_provider_lsq.engine.rows import PlannedRow
from airflow_provider_lsq.hooks.payload import UNIQUE_IDENTIFIERS
from airflow_provider_lsq.log_caps import LogCap, log_first
from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.transfers.ledger import POSITION_COLUMN, UNCONFIRMED, LedgerRow
from airflow_provider_lsq.transfers.ledger.sink import LedgerState
from airflow_provider_lsq.transfers.row_keys import RowKeys
from airflow_provider_lsq.version_compat import AirflowFailException
from airflow_provider_lsq.warehouse import WarehouseQuery, key_column_index

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from airflow.providers.common.sql.hooks.sql import DbApiHook

    from airflow_provider_lsq.engine.rows import Row
    from airflow_provider_lsq.engine.run import RegistrationRun
    from airflow_provider_lsq.transfers.executions import Execution
    from airflow_provider_lsq.transfers.ledger import RegistrationLedger

    EngineRow = tuple[str, Mapping[str, Any]] | RegistrationOutcome

MAX_LOGGED_KEYS = 50  # duplicate keys and leads, NULL-key positions: logged one by one, then counted
MAX_LOGGED_PENDING = 1000  # pending rows the query no longer returns: logged one by one, then counted
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)  # the query orders its rows: keep that order
# LeadSquared's standard attribute schema names: a result column equal to one but for case was folded
# (PostgreSQL lower-cases unquoted aliases) and would be refused on every row.
STANDARD_ATTRIBUTES = (
    *UNIQUE_IDENTIFIERS,
    "FirstName",
    "LastName",
    "Source",
    "SourceCampaign",
    "SourceMedium",
    "Notes",
    "OwnerId",
    "ProspectStage",
)


@dataclass(frozen=True)
class TransferSettings:
    """What the planner needs of ``SqlToLeadSquaredPortalOperator``'s parameters (see there)."""

    sql_conn_id: str
    key_column: str
    parameters: Any
    send_key_column: bool
    identifier_attribute: str | None
    is_dry_run: bool
    ledger_table: str
    ledger_conn_id: str | None
    batch_size: int
    retry_failed: bool
    resend_unconfirmed: bool
    pending_timeout: dt.timedelta


_LATEST = dt.datetime.max.replace(tzinfo=dt.timezone.utc)


class _Keyed(NamedTuple):
    """A keyed row of a batch: its lead and the identifier LeadSquared finds the lead by."""

    key: str
    lead: dict[str, Any]
    attribute: str | None  # the identifier sent first; None when the lead has none
    fingerprint: str | None  # its lead_fingerprint


class RowPlanner:
    """One execution's stream: the query's rows, keyed, checked against the ledger, for the engine.

    Each row it yields is a :class:`~airflow_provider_lsq.engine.rows.PlannedRow` carrying its
    :class:`~airflow_provider_lsq.transfers.ledger.sink.LedgerState` (what the ledger held for it
    and its lead's fingerprint), which the engine hands to the ledger's sink as it takes the row.
    """

    def __init__(
        self,
        settings: TransferSettings,
        ledger: RegistrationLedger,
        run: RegistrationRun,
        execution: Execution,
        log: Any,
    ) -> None:
        self.settings = settings
        self.log = log
        self.warehouse = WarehouseQuery(settings.sql_conn_id, settings.parameters, log)
        self.ledger = ledger
        self.engine = run
        self.progress = run.progress
        self.execution = execution
        self.run_id = execution.run_id
        self.verdict: tuple[int, int] | None = None  # (considered, failures) of the whole task instance
        self.unconfirmed: int | None = None  # unconfirmed rows of the whole task instance
        self.skipped_unconfirmed = self.resent_unconfirmed = 0
        self.reported_unconfirmed = LogCap(MAX_LOGGED_KEYS)
        self.keys = RowKeys(settings.key_column, self.progress, log, MAX_LOGGED_KEYS)
        self.skipped_done = self.skipped_failed = self.earlier_tries = 0
        self.resent_pending = self.pending_elsewhere = self.pending_not_returned = 0
        self.duplicate_leads = self.same_lead = 0  # rows of a lead met earlier in this run / held by a key
        self.reported_duplicate_leads, self.reported_same_lead = (
            LogCap(MAX_LOGGED_KEYS),
            LogCap(MAX_LOGGED_KEYS),
        )
        self.filled_identifiers = 0  # registered rows of an earlier release given their lead identifier
        self.rows_read = 0  # rows the query returned, every pass
        # Why the database does not leave the settled rows out (None: it does; see _left_out_settled).
        self.not_left_out: str | None = None
        self.positioned = False  # the query read numbers its rows in a last column (not sent)

    # -- the whole run (in the engine's thread: database connections stay in it) -------------------

    def run(self, sql_hook: DbApiHook, sql: str, portal_id: str) -> None:
        with self.ledger, contextlib.closing(SeenRows()) as seen:
            self.ledger.ensure_table()  # first: the query may anti-join it
            orphans = self._pending_rows()
            conn = sql_hook.get_conn()
            cursors: list[Any] = []
            # A named cursor is server-side on psycopg: rows come batch by batch. sqlite3 is lazy.
            server_side = self.ledger.dialect == "postgresql" or sql_hook.dialect_name == "postgresql"
            read, counted = self._left_out_settled(sql)

            def query(name: str) -> Any:
                nonlocal read
                cursor = self.warehouse.cursor(conn, name, server_side=server_side)
                cursors.append(cursor)
                try:
                    self.warehouse.execute(cursor, read)
                except Exception as error:
                    if read == sql:
                        raise self.warehouse.read_failed(error, 0) from None
                    self._anti_join_failed(error, conn, cursor)
                    read, self.positioned = sql, False
                    return query(name)
                return cursor

            try:
                self.progress.total = self.warehouse.count(conn, counted)
                self.log.info(
                    "%s rows of %r as portal users of portal %r (%s rows%s; ledger %s on %r).",
                    "Validating (dry run)" if self.settings.is_dry_run else "Registering",
                    self.settings.sql_conn_id,
                    portal_id,
                    "unknown" if self.progress.total is None else self.progress.total,
                    "" if self.not_left_out else ", those the ledger holds as registered left out",
                    self.settings.ledger_table,
                    self.settings.ledger_conn_id or self.settings.sql_conn_id,
                )
                if self.settings.is_dry_run:
                    self.engine.dry_run(self._rows(query("lsq_transfer"), seen))
                    return
                if orphans:
                    remaining = set(orphans)
                    first = self._rows(query("lsq_transfer_pending"), seen, only=remaining)
                    rows = self._pending_first(first, orphans, remaining, query, cursors, seen)
                else:
                    rows = self._rows(query("lsq_transfer"), seen)
                self.engine.send(rows)
                self.verdict, self.unconfirmed = self._run_verdict()
            finally:
                for cursor in cursors:
                    with contextlib.suppress(Exception):
                        cursor.close()
                with contextlib.suppress(Exception):
                    conn.rollback()  # only read: end the transaction (and a server-side cursor)
                with contextlib.suppress(Exception):
                    conn.close()
                self._log_skips()

    def _left_out_settled(self, sql: str) -> tuple[str, str]:
        """The query to read and the query to count: ``sql`` with the rows the ledger holds as
        settled left out by the database (an anti-join, see :meth:`RegistrationLedger.anti_join`), so
        a run's cost follows the rows that may need it, not the ledger's size. ``sql`` itself when
        the ledger is on another connection (the database cannot join it) or a name cannot be written
        into SQL text; the rows are then left out here, each read and skipped (a warning says so when
        they are most of the query)."""
        op = self.settings
        if (op.ledger_conn_id or op.sql_conn_id) != op.sql_conn_id:
            self.not_left_out = "the ledger is on another connection (ledger_conn_id)"
            return sql, sql
        ordered = bool(_ORDER_BY.search(sql))
        read = self.ledger.anti_join(sql, op.key_column, self.execution, ordered=ordered)
        counted = self.ledger.anti_join(sql, op.key_column, self.execution)
        if read is None or counted is None:
            self.not_left_out = (
                "the portal id or the task instance's names hold a backslash, a % or a control "
                "character, which the transfer does not write into SQL text"
            )
            return sql, sql
        self.positioned = ordered
        return read, counted

    def _anti_join_failed(self, error: Exception, conn: Any, cursor: Any) -> None:
        """The query with the ledger's anti-join failed: end the transaction, say why (the error's
        type only: its message may quote the query), and read the query as written from then on."""
        with contextlib.suppress(Exception):
            cursor.close()
        with contextlib.suppress(Exception):
            conn.rollback()  # PostgreSQL: the failed statement aborted the transaction
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        self.not_left_out = (
            f"the database refused the query wrapped in the ledger's anti-join ({type(error).__name__})"
        )
        self.log.warning(
            "The database refused the query wrapped in the ledger's anti-join (%s%s): reading the query "
            "as written; rows the ledger holds as registered are read and skipped. key_column %r must "
            "be the column's name as the database spells it.",
            type(error).__name__,
            f", {code}" if code else "",
            self.settings.key_column,
        )

    def _run_verdict(self) -> tuple[tuple[int, int], int]:
        """``((considered, failures), unconfirmed)`` over every row this task instance recorded, in
        this try or an earlier one (not the rows of the DAG run's other tasks).

        Read from the ledger, so a retry ends the way the first try did even when the query leaves out
        the rows registered by then (an anti-join on the ledger). Rows without a key count too.
        """
        counts = self.ledger.run_counts(execution=self.execution)
        failures = counts.get("invalid", 0) + counts.get("failed", 0) + self.keys.null_keys
        unconfirmed = counts.get(UNCONFIRMED, 0)
        done = counts.get("registered", 0) + counts.get("already_registered", 0)
        considered = failures + unconfirmed + done
        return (considered, failures), unconfirmed

    def _pending_rows(self) -> dict[str, LedgerRow]:
        """The ``pending`` rows that executions of this task left when they ended (by key): this run
        resolves them first, and reports those its query no longer returns.

        Rows pending for an execution still alive are left to it; rows other tasks left are sent again
        when this query meets them (in its order), and reported by their own task. All are logged.
        """
        pending = self.ledger.pending_rows()
        timeout = self.settings.pending_timeout
        alive = [row for row in pending if row.held_by_another(self.execution, timeout)]
        orphans = {row.row_key: row for row in pending if not row.held_by_another(self.execution, timeout)}
        if alive:
            self.log.info(
                "%d rows are pending for executions still running (a heartbeat within %s): left to them.",
                len(alive),
                timeout,
            )
        if orphans:
            by_run: dict[str, int] = {}
            for row in orphans.values():
                by_run[str(row.run_id)] = by_run.get(str(row.run_id), 0) + 1
            self.log.warning(
                "The ledger holds %d rows left pending by executions that ended (in flight when they "
                "stopped: %s). %s (their registration may or may not have happened).",
                len(orphans),
                ", ".join(f"{run}: {count}" for run, count in sorted(by_run.items())),
                "A dry run sends nothing"
                if self.settings.is_dry_run
                else "Each is sent again first, if the query still returns it",
            )
        if self.settings.is_dry_run:
            return {}
        others = len(orphans)
        orphans = {key: row for key, row in orphans.items() if self._left_by_this_task(row)}
        others -= len(orphans)
        if others:
            self.log.info(
                "%d of them were left by other tasks: each is sent again when this query meets it; "
                "the task that left it reports it if its own query no longer returns it.",
                others,
            )
        return orphans

    def _left_by_this_task(self, row: LedgerRow) -> bool:
        """``row`` was written by this task (any run, any try; this map index): its query is the one
        expected to return it. A row of an earlier release, which names no task, counts as this DAG's."""
        if row.dag_id != self.execution.dag_id:
            return False
        if row.task_id is None:
            return True
        map_index = -1 if row.map_index is None else row.map_index
        return row.task_id == self.execution.task_id and map_index == self.execution.map_index

    def _pending_first(
        self,
        first: Iterator[Row],
        orphans: Mapping[str, LedgerRow],
        remaining: set[str],
        query: Callable[[str], Any],
        cursors: list[Any],
        seen: SeenRows,
    ) -> Iterator[Row]:
        """The abandoned ``pending`` rows (``first``, a pass over the query that stops once it has met
        them all), then every other row of a second pass. Rows the first pass met are not met again."""
        yield from first
        with contextlib.suppress(Exception):
            cursors[0].close()
        met = set(orphans) - remaining
        if remaining:
            self._report_not_returned([orphans[key] for key in sorted(remaining)])
        yield from self._rows(query("lsq_transfer"), seen, skip=met)

    def _report_not_returned(self, rows: Sequence[LedgerRow]) -> None:
        """Abandoned ``pending`` rows the query no longer returns: logged (key and lead id), counted, kept."""
        self.pending_not_returned = len(rows)
        self.log.warning(
            "%d rows left pending by executions that ended are no longer returned by the query: they stay "
            "pending in the ledger (LeadSquared may or may not have registered them); reconcile them by "
            "hand. Each: row key, lead id.",
            len(rows),
        )
        log_first(
            self.log.warning,
            rows,
            MAX_LOGGED_PENDING,
            "Pending, not returned: row %s, lead id %s",
            lambda row: (row.row_key, row.lead_id),
            "... and %d more (status 'pending' in the ledger).",
        )

    # -- the stream ------------------------------------------------------------------------------

    def _rows(
        self, cursor: Any, seen: SeenRows, *, only: set[str] | None = None, skip: set[str] | None = None
    ) -> Iterator[Row]:
        """Rows for the engine, read lazily batch by batch; the columns are checked before any call.

        ``only``: take only rows of these keys, removing each as it is met, and stop once none is
        left. ``skip``: leave out the first row of each of these keys (met by an earlier pass).
        """
        try:
            records = cursor.fetchmany(self.settings.batch_size)
        except Exception as error:
            raise self.warehouse.read_failed(error, 0) from None
        if not records:
            return iter(())
        columns = [str(column[0]) for column in cursor.description]  # psycopg: known after a fetch
        width = None
        if self.positioned and columns[-1].lower() == POSITION_COLUMN:
            columns = columns[:-1]  # the anti-join's numbering: not a lead attribute
            width = len(columns)
        key_index = key_column_index(columns, self.settings.key_column)
        self._check_columns(columns, key_index)
        keep_key = self.settings.send_key_column
        attributes = [column for index, column in enumerate(columns) if index != key_index or keep_key]
        self.engine.operation.preflight(self.engine.hook, attributes)  # the account's checks, once
        return self._stream(cursor, records, columns, key_index, seen, only=only, skip=skip, width=width)

    def _stream(
        self,
        cursor: Any,
        records: Sequence[Any],
        columns: list[str],
        key_index: int,
        seen: SeenRows,
        *,
        only: set[str] | None = None,
        skip: set[str] | None = None,
        width: int | None = None,
    ) -> Iterator[Row]:
        position = 0
        skip = set(skip or ())
        while records:
            keyed: list[_Keyed] = []
            self.rows_read += len(records)
            for row in records:
                position += 1
                record = tuple(row.values()) if isinstance(row, Mapping) else row  # dict cursors too
                if width is not None:
                    record = record[:width]
                value = record[key_index]
                if only is not None or skip:
                    text = None if value is None else str(value)
                    if only is not None:
                        if text not in only:
                            continue
                        only.discard(text)
                    elif text in skip:
                        skip.discard(text)  # met by the first pass; a second row of it is a duplicate
                        continue
                key = self.keys.key(position, value, seen)
                if key is not None:
                    keyed.append(self._keyed(key, self._lead(columns, key_index, record)))
            # One ledger read per batch: the rows' keys, and the leads other keys hold.
            known, holders = self.ledger.lookup_batch(
                (item.key for item in keyed), (item.fingerprint for item in keyed if item.fingerprint)
            )
            self._fill_identifiers(keyed, known, holders)
            for item in keyed:
                previous = known.get(item.key)
                if not self._wanted(item.key, item.lead, previous):
                    continue
                decided = self._same_lead(item, previous, holders, seen)
                if decided is None:
                    continue
                yield self._planned(item, previous, decided)
            if only is not None and not only:
                return  # every row wanted is met: the rest of the query is not read
            try:
                records = cursor.fetchmany(self.settings.batch_size)
            except Exception as error:
                raise self.warehouse.read_failed(error, position) from None

    def _planned(self, item: _Keyed, previous: LedgerRow | None, decided: EngineRow) -> PlannedRow:
        """``decided`` with what the ledger's sink needs for it: the lead's fingerprint (written with
        its claim and its record) and, for a row to send, the ledger's row as read (its claim checks
        it is unchanged). A dry run writes nothing: no state."""
        if self.settings.is_dry_run:
            return PlannedRow(decided)
        to_send = not isinstance(decided, RegistrationOutcome)
        return PlannedRow(decided, LedgerState(previous if to_send else None, item.fingerprint))

    def _fill_identifiers(
        self, keyed: list[_Keyed], known: Mapping[str, LedgerRow], holders: dict[str, list[LedgerRow]]
    ) -> None:
        """Give rows an earlier release recorded as registered their lead's fingerprint (no call).

        From then on another key of the same lead is recorded ``already_registered`` instead of sent;
        in this batch too: each such row joins ``holders`` (read before it had its fingerprint).
        Not in a dry run (it writes nothing).
        """
        missing = {
            item.key: item.fingerprint
            for item in keyed
            if item.fingerprint is not None
            and (row := known.get(item.key)) is not None
            and row.registered
            and row.lead_identifier is None
        }
        if missing and not self.settings.is_dry_run:
            self.ledger.fill_identifiers(missing)
            self.filled_identifiers += len(missing)
            for key, fingerprint in missing.items():
                holders.setdefault(fingerprint, []).append(replace(known[key], lead_identifier=fingerprint))

    def _keyed(self, key: str, lead: dict[str, Any]) -> _Keyed:
        identity = lead_identity(lead, self.settings.identifier_attribute)
        if identity is None:
            return _Keyed(key, lead, None, None)
        return _Keyed(key, lead, *identity)

    def _same_lead(
        self,
        item: _Keyed,
        previous: LedgerRow | None,
        holders: Mapping[str, list[LedgerRow]],
        seen: SeenRows,
    ) -> EngineRow | None:
        """The row for the engine once its lead is checked, or None when it is not sent this run.

        - invalid: its ``invalid`` outcome (a duplicate or not, it cannot be sent);
        - its lead was handed over by an earlier row of this run: a duplicate, not recorded this run
          (the next run finds that row's outcome);
        - another key holds the lead as registered (or already registered): ``already_registered``
          with that key's lead id, no call (a call would reset the portal password);
        - another run is sending the lead under another key right now: skipped, like its pending row.
        """
        invalid = check_lead(item.key, item.lead, self.settings.identifier_attribute)
        if invalid is not None:
            return invalid
        if item.fingerprint is None or item.attribute is None:
            return item.key, item.lead  # cannot happen for a valid lead: it has an identifier
        first = seen.add_lead(item.fingerprint, item.key)
        if first is not None:
            self.duplicate_leads += 1
            self.progress.add_duplicate()
            if self.reported_duplicate_leads.take():
                self.log.warning(
                    "Row key %s is the same lead as row key %s of this run (same %s): not sent, not "
                    "recorded this run (the next run records it from row key %s's outcome).",
                    item.key,
                    first,
                    item.attribute,
                    first,
                )
            return None
        others = [row for row in holders.get(item.fingerprint, ()) if row.row_key != item.key]
        done = sorted(
            (row for row in others if row.registered),
            key=lambda row: (row.status != "registered", row.registered_at or _LATEST, row.row_key),
        )
        if done:
            holder = done[0]
            self.same_lead += 1
            if self.reported_same_lead.take():
                self.log.warning(
                    "Row key %s is the lead of row key %s (same %s), %s already: recorded "
                    "already_registered, not sent.",
                    item.key,
                    holder.row_key,
                    item.attribute,
                    "a portal user" if holder.status == "registered" else "recorded as registered",
                )
            return RegistrationOutcome.same_lead(
                item.key,
                other_key=holder.row_key,
                attribute=item.attribute,
                lead_id=holder.lead_id,
                registered=holder.status == "registered",
            )
        unconfirmed = [row for row in others if row.status == UNCONFIRMED]
        if unconfirmed and not self.settings.resend_unconfirmed:
            self._skip_unconfirmed(
                item.key,
                f"the same lead (same {item.attribute}) as row key {unconfirmed[0].row_key}, "
                "whose registration is unconfirmed",
            )
            return None
        if any(self._in_flight_elsewhere(row) for row in others):
            self.pending_elsewhere += 1  # another execution is sending this lead under another key
            self.progress.add_skipped()
            return None
        if previous is not None and previous.pending:
            self.resent_pending += 1
        return item.key, item.lead

    def _in_flight_elsewhere(self, row: LedgerRow) -> bool:
        """``row`` is pending for another execution that is alive: being sent right now."""
        return row.held_by_another(self.execution, self.settings.pending_timeout)

    def _wanted(self, key: str, lead: dict[str, Any], previous: LedgerRow | None) -> bool:
        """Whether a row the ledger knows as ``previous`` goes to the engine (validation, maybe a call)."""
        if previous is None:
            return True
        own = previous.written_by(self.execution)  # this task instance: this try or an earlier one
        if previous.status == "invalid" and not own:
            # Invalid in an earlier run: validated again (no call), sent if the data was fixed; still
            # invalid, it is reported like a permanent failure, not counted against this run.
            if check_lead(key, lead, self.settings.identifier_attribute) is None:
                return True
            self.skipped_failed += 1
            self.progress.add_skipped()
            return False
        if previous.status == "invalid":
            return True  # this run's own invalid row: validated and counted again
        if previous.status == UNCONFIRMED:
            return self._wanted_unconfirmed(previous, own)
        if own and previous.registered:
            self.earlier_tries += 1  # an earlier try of this run registered it (the verdict counts it)
            self.skipped_done += 1
            self.progress.add_skipped()
            return False
        if own and not (previous.pending or previous.retryable or self.settings.retry_failed):
            # An earlier try of this run failed it for good: it counts again, without a call, so a retry
            # ends the way the first try did (a failed run stays failed until its rows are fixed).
            self.earlier_tries += 1
            self.progress.add(
                RegistrationOutcome.recorded(
                    previous.row_key,
                    previous.status,
                    lead_id=previous.lead_id,
                    error_type=previous.error_type,
                    error_message=previous.error_message,
                    retryable=previous.retryable,
                )
            )
            return False
        if previous.registered:
            self.skipped_done += 1
            self.progress.add_skipped()
            return False
        if previous.pending:
            if self._in_flight_elsewhere(previous):
                self.pending_elsewhere += 1  # another execution holds it right now
                self.progress.add_skipped()
                return False
            return True  # counted in resent_pending once it is sent
        if previous.retryable or self.settings.retry_failed:
            return True
        self.skipped_failed += 1
        self.progress.add_skipped()
        return False

    def _wanted_unconfirmed(self, previous: LedgerRow, own: bool) -> bool:
        """An ``unconfirmed`` row: sent again only with ``resend_unconfirmed`` (a person decided). An
        earlier try of this run's counts again, without a call; another run's is skipped."""
        if self.settings.resend_unconfirmed:
            self.resent_unconfirmed += 1
            return True
        if own:
            self.earlier_tries += 1
            self.progress.add(
                RegistrationOutcome.recorded(
                    previous.row_key,
                    RegistrationStatus.UNCONFIRMED.value,
                    lead_id=previous.lead_id,
                    error_type=previous.error_type,
                    error_message=previous.error_message,
                    retryable=False,
                )
            )
            return False
        self._skip_unconfirmed(previous.row_key, "its registration is unconfirmed")
        return False

    def _skip_unconfirmed(self, key: str, why: str) -> None:
        self.skipped_unconfirmed += 1
        self.progress.add_skipped()
        if self.reported_unconfirmed.take():
            self.log.warning(
                "Row key %s is not sent: %s (it was sent and no answer said whether LeadSquared "
                "registered it). Resolve it in the ledger, or set resend_unconfirmed=True.",
                key,
                why,
            )

    def _check_columns(self, columns: list[str], key_index: int) -> None:
        """Fail before any call on a column that names a LeadSquared attribute in the wrong case."""
        known = {
            name.lower(): name for name in (*STANDARD_ATTRIBUTES, self.settings.identifier_attribute or "")
        }
        for index, column in enumerate(columns):
            if index == key_index and not self.settings.send_key_column:
                continue
            meant = known.get(column.lower())
            if meant and column != meant:
                raise AirflowFailException(
                    f"The query's column {column!r} looks like the attribute {meant!r} in the wrong case "
                    f'(found {column}: quote the alias, e.g. AS "{meant}"; PostgreSQL folds unquoted '
                    "names to lower case). Nothing was sent."
                )

    def _lead(self, columns: list[str], key_index: int, record: Sequence[Any]) -> dict[str, Any]:
        return {
            column: value
            for index, (column, value) in enumerate(zip(columns, record, strict=True))
            if index != key_index or self.settings.send_key_column
        }

    def _log_skips(self) -> None:
        if self.skipped_done:
            self.log.info("%d rows skipped: the ledger has them registered.", self.skipped_done)
        settled_read = self.skipped_done - self.filled_identifiers  # filled: read once, to fill them
        if settled_read >= self.settings.batch_size and settled_read * 2 > self.rows_read:
            why = self.not_left_out or (
                "the database's text of key_column differs from the ledger's row_key (the key as "
                "Python writes it, e.g. 1.0 for a float): return the key as text, e.g. "
                "CAST(id AS TEXT) AS applicant_id"
            )
            self.log.warning(
                "%d of the %d rows the query returned are registered in the ledger already: each was read "
                "and skipped, so runs slow down as the ledger grows. The database did not leave them out "
                "because %s. Leave them out in the query (NOT EXISTS on the ledger, see the docs) or "
                "narrow it to the rows that may be new.",
                settled_read,
                self.rows_read,
                why,
            )
        if self.skipped_failed:
            self.log.warning(
                "%d rows skipped: an earlier run recorded them as failed for good or invalid (and they still "
                "are), so they are not portal users (fix them; failed ones need retry_failed=True).",
                self.skipped_failed,
            )
        if self.skipped_unconfirmed:
            self.log.warning(
                "%d rows skipped: recorded unconfirmed by an earlier run (or the same lead as such a row). "
                "They may or may not be portal users: check them in LeadSquared and resolve them in the "
                "ledger (status 'unconfirmed'), or set resend_unconfirmed=True to send them again with "
                "new passwords.",
                self.skipped_unconfirmed,
            )
        if self.resent_unconfirmed:
            self.log.warning(
                "%d rows recorded unconfirmed were sent again (resend_unconfirmed=True).",
                self.resent_unconfirmed,
            )
        if self.earlier_tries:
            self.log.warning(
                "%d rows were recorded by an earlier try of this run (%s): counted again, without a call.",
                self.earlier_tries,
                self.run_id,
            )
        if self.resent_pending:
            self.log.warning(
                "%d rows left pending by an execution that ended were sent again.", self.resent_pending
            )
        if self.pending_elsewhere or self.engine.not_claimed:
            self.log.warning(
                "%d rows skipped: another execution (another run, task, mapped task or try) was "
                "registering them at the same time.",
                self.pending_elsewhere + self.engine.not_claimed,
            )
        if self.keys.reported_duplicates.full:
            self.log.warning("More duplicate keys were counted but not logged.")
        if self.filled_identifiers:
            self.log.info(
                "%d registered rows recorded by an earlier release got their lead identifier.",
                self.filled_identifiers,
            )
        if self.same_lead:
            self.log.warning(
                "%d rows recorded already_registered without a call: another row key holds the same lead "
                "(same identifier).",
                self.same_lead,
            )
        if self.duplicate_leads:
            self.log.warning(
                "%d rows not sent: the same lead as an earlier row of this run (counted in duplicates).",
                self.duplicate_leads,
            )
