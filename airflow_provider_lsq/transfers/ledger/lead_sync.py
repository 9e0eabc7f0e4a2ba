"""The lead-update ledger: what ``SqlToLeadSquaredLeadOperator`` last sent for each row key.

Its own table (default ``lsq_lead_sync_ledger``), made and migrated by the same machinery as the
registration ledger (:class:`~airflow_provider_lsq.transfers.ledger.store.RegistrationLedger`: one
row per ``(portal_id, row_key)``, claims, heartbeats, retried writes, the dialects), with these
columns of its own:

- ``synced_at`` (where the registration ledger has ``registered_at``): when the row's fields were
  last sent and accepted (``updated`` or ``created``);
- ``fields_fingerprint``: a sha256 over the sorted ``(attribute, value)`` pairs last sent for the key
  and accepted (:func:`fields_fingerprint`), so that a row whose fields did not change makes no call;
  for a row refused for good, the fields it was refused with. It holds no value itself: the ledger
  never holds lead data.

Statuses: ``updated``, ``created``, ``exists`` (create only), ``not_found`` (update only),
``invalid``, ``failed`` and ``pending`` (claimed, its call not recorded yet). ``unchanged`` rows are
counted, not written: their row stays as the run that sent them left it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.transfers.ledger.schema import COLUMNS, create_table
from airflow_provider_lsq.transfers.ledger.sink import LedgerSink
from airflow_provider_lsq.transfers.ledger.store import RegistrationLedger

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable, Mapping, Sequence

    from airflow_provider_lsq.outcomes import RegistrationOutcome
    from airflow_provider_lsq.transfers.executions import Execution
    from airflow_provider_lsq.transfers.ledger.rows import LedgerRow

DEFAULT_LEAD_LEDGER_TABLE = "lsq_lead_sync_ledger"
FINGERPRINT_COLUMN = "fields_fingerprint"
LEAD_LEDGER_COLUMNS = (
    *("synced_at" if name == "registered_at" else name for name in COLUMNS),
    FINGERPRINT_COLUMN,
)
# Statuses after which the fields recorded are the lead's: the next run compares against them.
SENT_STATUSES = frozenset({RegistrationStatus.UPDATED.value, RegistrationStatus.CREATED.value})


def fields_fingerprint(fields: Iterable[Mapping[str, str]]) -> str:
    """sha256 (hex) of the ``[{"Attribute", "Value"}]`` pairs a lead-API body sends, sorted by
    attribute: the same fields give the same fingerprint whatever the columns' order."""
    pairs = sorted((str(f["Attribute"]), str(f["Value"])) for f in fields)
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


class LeadSyncLedger(RegistrationLedger):
    """The lead-update ledger's table (see the module's docstring); everything else is the store's."""

    columns = LEAD_LEDGER_COLUMNS
    added_columns: Mapping[str, str] = {}  # none yet: this table's first release

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent: Mapping[str, str] = {}  # the fingerprints of the batch being recorded

    def _create_table_sql(self) -> str:
        base = create_table(self.table, self._dialect).replace("registered_at", "synced_at")
        return base.replace(
            "PRIMARY KEY (portal_id, row_key)",
            f"{FINGERPRINT_COLUMN} {self._dialect.text},\n                PRIMARY KEY (portal_id, row_key)",
        )

    def _row(self, record: Sequence[Any], read_at: dt.datetime | None = None) -> LedgerRow:
        row = super()._row(record[: len(COLUMNS) - 1], read_at)
        extra = record[len(COLUMNS) - 1] if len(record) >= len(self.columns) - 1 else None
        return replace(row, fields_fingerprint=extra)

    def _values(self, row: LedgerRow) -> list[Any]:
        return [*super()._values(row), row.fields_fingerprint]

    def record_sent(
        self,
        outcomes: Iterable[RegistrationOutcome],
        *,
        sent: Mapping[str, str],
        **kwargs: Any,
    ) -> int:
        """:meth:`record`, with ``sent`` the fingerprint of the fields each key's call sent: kept for
        the keys that ended ``updated`` or ``created`` (a failed row keeps what was last accepted)."""
        self._sent = sent
        try:
            return self.record(outcomes, **kwargs)
        finally:
            self._sent = {}

    def _merge(
        self, previous: LedgerRow | None, outcome: RegistrationOutcome, now: dt.datetime, execution: Execution
    ) -> LedgerRow:
        row = super()._merge(previous, outcome, now, execution)
        accepted = outcome.status.value in SENT_STATUSES
        # A permanent refusal keeps the fields it was refused with: the next run sends the row again
        # only once they change (or with retry_failed).
        refused = outcome.status == RegistrationStatus.FAILED and not outcome.retryable
        last = previous.fields_fingerprint if previous is not None else None
        return replace(
            row,
            registered_at=now if accepted else (previous.registered_at if previous else None),
            fields_fingerprint=self._sent.get(outcome.key, last) if accepted or refused else last,
        )


class LeadSyncSink(LedgerSink):
    """The ledger's sink for lead updates: its records carry each sent row's fields fingerprint
    (the planner's ``state.fields``), written with an ``updated`` or ``created`` outcome."""

    ledger: LeadSyncLedger

    def __init__(self, ledger: LeadSyncLedger, execution: Execution, **kwargs: Any) -> None:
        super().__init__(ledger, execution, **kwargs)
        self.sent: dict[str, str] = {}

    def planned(self, key: str, state: Any) -> None:
        super().planned(key, state)
        fields = getattr(state, "fields", None)
        if fields is not None:
            self.sent[key] = fields

    def _record(self, outcomes: list[RegistrationOutcome], **kwargs: Any) -> None:
        sent = {o.key: self.sent[o.key] for o in outcomes if o.key in self.sent}
        self.ledger.record_sent(outcomes, sent=sent, **kwargs)
        for outcome in outcomes:
            self.sent.pop(outcome.key, None)


__all__ = [
    "DEFAULT_LEAD_LEDGER_TABLE",
    "LEAD_LEDGER_COLUMNS",
    "LeadSyncLedger",
    "LeadSyncSink",
    "fields_fingerprint",
]
