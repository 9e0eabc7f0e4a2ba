"""The lead-update transfer's row planner: the query's rows, keyed and decided against its ledger.

For each row it decides, before any call, whether the row is sent, recorded without a call
(invalid), counted without a call (``unchanged``: the fields last sent for its key are the same) or
left out (another execution holds it; create only: the key's lead was created or found already; a
permanent failure whose fields did not change). It finds each row's lead id where it is known (this
ledger's, else the registration ledger's for the same key) and yields
:class:`~airflow_provider_lsq.engine.rows.PlannedRow` items carrying the fingerprint of the fields
the call sends, which the ledger records with an accepted outcome. The account's preflight runs on
the query's columns once the first batch is read, before any row is sent (and in a dry run).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_lsq.engine.duplicates import SeenRows, lead_identity
from airflow_provider_lsq.engine.lead_sync import LeadRow
from airflow_provider_lsq.engine.rows import PlannedRow
from airflow_provider_lsq.log_caps import LogCap
from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.transfers.ledger.lead_sync import SENT_STATUSES, fields_fingerprint
from airflow_provider_lsq.transfers.ledger.store import RegistrationLedger
from airflow_provider_lsq.transfers.row_keys import RowKeys
from airflow_provider_lsq.warehouse import WarehouseQuery, key_column_index

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator, Sequence

    from airflow.providers.common.sql.hooks.sql import DbApiHook

    from airflow_provider_lsq.engine.lead_sync import LeadSync
    from airflow_provider_lsq.engine.rows import Row
    from airflow_provider_lsq.engine.run import RegistrationRun
    from airflow_provider_lsq.transfers.executions import Execution
    from airflow_provider_lsq.transfers.ledger.lead_sync import LeadSyncLedger
    from airflow_provider_lsq.transfers.ledger.rows import LedgerRow

MAX_LOGGED_KEYS = 50
_CREATE_SETTLED = frozenset({*SENT_STATUSES, RegistrationStatus.EXISTS.value})


@dataclass(frozen=True)
class LeadSyncSettings:
    """What the planner needs of ``SqlToLeadSquaredLeadOperator``'s parameters (see there)."""

    sql_conn_id: str
    key_column: str
    parameters: Any
    send_key_column: bool
    is_dry_run: bool
    batch_size: int
    mode: str
    registration_ledger_table: str | None
    retry_failed: bool
    pending_timeout: dt.timedelta


class LeadSyncState(NamedTuple):
    """What the sink needs for a planned row: the ledger's row as read, no lead identifier (the
    lead-update ledger does not hold one), and the fingerprint of the fields the call sends."""

    previous: LedgerRow | None
    fingerprint: str | None
    fields: str | None


class LeadPlanner:
    """One execution's stream of the query's rows for the lead-update operation."""

    def __init__(
        self,
        settings: LeadSyncSettings,
        ledger: LeadSyncLedger,
        run: RegistrationRun,
        operation: LeadSync,
        execution: Execution,
        log: Any,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.engine = run
        self.operation = operation
        self.progress = run.progress
        self.execution = execution
        self.log = log
        self.warehouse = WarehouseQuery(settings.sql_conn_id, settings.parameters, log)
        self.registrations: RegistrationLedger | None = None
        self.unchanged = self.skipped_failed = self.skipped_settled = self.pending_elsewhere = 0
        self.keys = RowKeys(settings.key_column, self.progress, log, MAX_LOGGED_KEYS)
        self.ids_from_registrations = 0
        self.would = {"would_update": 0, "would_create": 0, "would_upsert": 0}
        self.duplicate_leads = 0  # rows of a lead an earlier row of this run took: not sent
        self.reported_duplicate_leads = LogCap(MAX_LOGGED_KEYS)

    # -- the whole run (in the engine's thread) --------------------------------------------------------

    def run(self, sql_hook: DbApiHook, sql: str, registration_hook: DbApiHook, portal_id: str | None) -> None:
        with self.ledger:
            self.ledger.ensure_table()
            self.registrations = self._registration_ledger(registration_hook, portal_id)
            conn = sql_hook.get_conn()
            server_side = sql_hook.dialect_name == "postgresql"
            cursor = self.warehouse.cursor(conn, "lsq_lead_sync", server_side=server_side)
            try:
                self.progress.total = self.warehouse.count(conn, sql)
                try:
                    self.warehouse.execute(cursor, sql)
                except Exception as error:
                    raise self.warehouse.read_failed(error, 0) from None
                self.log.info(
                    "%s rows of %r: mode %r (%s rows; ledger %s).",
                    "Checking (dry run)" if self.settings.is_dry_run else "Sending",
                    self.settings.sql_conn_id,
                    self.settings.mode,
                    "unknown" if self.progress.total is None else self.progress.total,
                    self.ledger.table,
                )
                rows = self._rows(cursor)  # the columns' checks run here, before any row is sent
                if self.settings.is_dry_run:
                    self.engine.dry_run(rows)
                else:
                    self.engine.send(rows)
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()
                with contextlib.suppress(Exception):
                    conn.rollback()
                with contextlib.suppress(Exception):
                    conn.close()
                if self.registrations is not None:
                    self.registrations.close_quietly()
                self._log_counts()

    def _registration_ledger(self, hook: DbApiHook, portal_id: str | None) -> RegistrationLedger | None:
        """The registration ledger to take lead ids from, when it is there (one read, no retries)."""
        table = self.settings.registration_ledger_table
        if not table or not portal_id:
            return None
        ledger = RegistrationLedger(hook, table, portal_id, write_timeout=5.0)
        try:
            conn = ledger.conn
            cursor = conn.cursor()
            try:
                cursor.execute(f"SELECT row_key, lead_id FROM {ledger.table} WHERE 1 = 0")
            finally:
                cursor.close()
                conn.commit()
        except Exception as error:
            self.log.info(
                "No registration ledger %s to take lead ids from (%s): leads are found by their identifier.",
                table,
                type(error).__name__,
            )
            ledger.close_quietly()
            return None
        return ledger

    # -- the stream ----------------------------------------------------------------------------------

    def _rows(self, cursor: Any) -> Iterator[Row]:
        """Rows for the engine, read batch by batch; the columns are checked now, before any call."""
        try:
            records = cursor.fetchmany(self.settings.batch_size)
        except Exception as error:
            raise self.warehouse.read_failed(error, 0) from None
        if not records:
            return iter(())
        columns = [str(column[0]) for column in cursor.description]
        key_index = key_column_index(columns, self.settings.key_column)
        attributes = [
            column
            for index, column in enumerate(columns)
            if index != key_index or self.settings.send_key_column
        ]
        self.operation.preflight(self.engine.hook, attributes)
        return self._stream(cursor, records, columns, key_index)

    def _stream(
        self, cursor: Any, records: Sequence[Any], columns: list[str], key_index: int
    ) -> Iterator[Row]:
        with contextlib.closing(SeenRows()) as seen:  # on disk: memory stays flat however many rows
            yield from self._read(cursor, records, columns, key_index, seen)

    def _read(
        self, cursor: Any, records: Sequence[Any], columns: list[str], key_index: int, seen: SeenRows
    ) -> Iterator[Row]:
        position = 0
        while records:
            batch: list[tuple[str, LeadRow]] = []
            for record in records:
                position += 1
                values = tuple(record.values()) if isinstance(record, dict) else tuple(record)
                key = self.keys.key(position, values[key_index], seen)
                if key is None:
                    continue
                lead = LeadRow(
                    (column, value)
                    for index, (column, value) in enumerate(zip(columns, values, strict=True))
                    if index != key_index or self.settings.send_key_column
                )
                batch.append((key, lead))
            known = self.ledger.lookup(key for key, _ in batch)
            registered = self._registered_ids([key for key, _ in batch if key not in known])
            for key, lead in batch:
                if not self._first_of_its_lead(key, lead, seen):
                    continue
                planned = self._plan(key, lead, known.get(key), registered.get(key))
                if planned is not None:
                    yield planned
            try:
                records = cursor.fetchmany(self.settings.batch_size)
            except Exception as error:
                raise self.warehouse.read_failed(error, position) from None

    def _first_of_its_lead(self, key: str, lead: LeadRow, seen: SeenRows) -> bool:
        """One lead, one update per run: a valid row whose lead (its first unique identifier) an
        earlier valid row of this run took, sent or unchanged, is a duplicate, not sent (two applicants
        sharing an email would otherwise overwrite each other's fields on one lead, in turn)."""
        if self.operation.check(key, lead) is not None:
            return True  # invalid: it takes no lead, and _plan records why
        identity = lead_identity(lead, self.operation.identifier_attribute)
        if identity is None:
            return True
        first = seen.add_lead(identity[1], key)
        if first is None:
            return True
        self.duplicate_leads += 1
        self.progress.add_duplicate()
        if self.reported_duplicate_leads.take():
            self.log.warning(
                "Row key %s is the same lead as row key %s of this run (same %s): not sent, so the "
                "fields of one row do not overwrite the other's on one lead.",
                key,
                first,
                identity[0],
            )
        return False

    def _registered_ids(self, keys: list[str]) -> dict[str, str]:
        """Lead ids the registration ledger holds for ``keys`` (registered or already registered)."""
        if self.registrations is None or not keys:
            return {}
        rows = self.registrations.lookup(keys)
        return {key: row.lead_id for key, row in rows.items() if row.registered and row.lead_id}

    def _plan(
        self, key: str, lead: LeadRow, previous: LedgerRow | None, registered_id: str | None
    ) -> PlannedRow | None:
        lead.lead_id = (previous.lead_id if previous is not None else None) or registered_id
        if registered_id and lead.lead_id == registered_id:
            self.ids_from_registrations += 1
        invalid = self.operation.check(key, lead)
        if invalid is not None:
            return self._planned(invalid, None)
        fingerprint = fields_fingerprint(self.operation.fields(lead))
        if previous is not None:
            if previous.held_by_another(self.execution, self.settings.pending_timeout):
                self.pending_elsewhere += 1
                self.progress.add_skipped()
                return None
            if self.settings.mode == "create" and previous.status in _CREATE_SETTLED:
                self.skipped_settled += 1  # create only: its lead was created, or found, already
                self.progress.add_skipped()
                return None
            same = previous.fields_fingerprint == fingerprint
            if previous.status in SENT_STATUSES and same:
                self.unchanged += 1
                self.progress.add(
                    RegistrationOutcome.lead(key, RegistrationStatus.UNCHANGED, previous.lead_id, 0)
                )
                return None
            failed_for_good = previous.status == RegistrationStatus.FAILED.value and not previous.retryable
            if failed_for_good and same and not self.settings.retry_failed:
                self.skipped_failed += 1  # refused for good with these very fields
                self.progress.add_skipped()
                return None
        if self.settings.is_dry_run:
            self._count_would(lead)
            return PlannedRow((key, lead))
        return PlannedRow((key, lead), LeadSyncState(previous, None, fingerprint))

    def _planned(self, outcome: RegistrationOutcome, previous: LedgerRow | None) -> PlannedRow:
        if self.settings.is_dry_run:
            return PlannedRow(outcome)
        return PlannedRow(outcome, LeadSyncState(previous, None, None))

    def _count_would(self, lead: LeadRow) -> None:
        mode = self.settings.mode
        if mode == "update" or (mode == "upsert" and lead.lead_id):
            self.would["would_update"] += 1
        elif mode == "create":
            self.would["would_create"] += 1
        else:
            self.would["would_upsert"] += 1  # created or updated: LeadSquared decides

    def _log_counts(self) -> None:
        if self.unchanged:
            self.log.info("%d rows unchanged since their fields were last sent: no call.", self.unchanged)
        if self.ids_from_registrations:
            self.log.info(
                "%d rows took their lead id from the registration ledger %s.",
                self.ids_from_registrations,
                self.settings.registration_ledger_table,
            )
        if self.skipped_failed:
            self.log.warning(
                "%d rows skipped: refused for good with the same fields by an earlier run (fix them, or "
                "set retry_failed=True).",
                self.skipped_failed,
            )
        if self.skipped_settled:
            self.log.info(
                "%d rows skipped: create only, and their lead was created or found.", self.skipped_settled
            )
        if self.pending_elsewhere or self.engine.not_claimed:
            self.log.warning(
                "%d rows skipped: another execution was sending them at the same time.",
                self.pending_elsewhere + self.engine.not_claimed,
            )

    def extra_counts(self) -> dict[str, Any]:
        """The summary's counts of this planner (besides the statuses'): dry-run previews too."""
        counts: dict[str, Any] = {
            "skipped_failed": self.skipped_failed,
            "duplicate_leads": self.duplicate_leads,
        }
        if self.settings.is_dry_run:
            counts.update(self.would)
        return counts
