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

The package: :mod:`.rows` (a row and its statuses), :mod:`.schema` (the table, its index and its
migration), :mod:`.dialects` (every difference between databases), :mod:`.store`
(:class:`RegistrationLedger`: connections, retries, reads, claims, writes) and :mod:`.sink` (the
engine's records and claims, kept alive while a run lives). Every name importable from this
package's former module, ``airflow_provider_lsq.transfers.ledger``, still is.

Statuses: the outcomes' (``registered``, ``already_registered``, ``invalid``, ``failed``,
``unconfirmed``: sent, and no answer said what happened; never re-sent without a person deciding) and
``pending``, written before a row is handed over for its call, so a run that dies without warning
leaves its in-flight rows visible. Every write retries with backoff (and a busy timeout on SQLite)
for up to ``write_timeout`` seconds before it raises :class:`LedgerUnavailableError`.
"""

from __future__ import annotations

import datetime as dt  # noqa: F401 - the module's former name (a test swaps it for a clock)

from airflow_provider_lsq.transfers.ledger.dialects import (
    LOOKUP_CHUNK as _LOOKUP_CHUNK,
)
from airflow_provider_lsq.transfers.ledger.dialects import (
    PG_LOCK_TIMEOUT,
    SQLITE_BUSY_TIMEOUT_MS,
    Dialect,
)
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
from airflow_provider_lsq.transfers.ledger.store import LedgerUnavailableError, RegistrationLedger

__all__ = [
    "ADDED_COLUMNS",
    "COLUMNS",
    "DEFAULT_PENDING_TIMEOUT",
    "IDENTIFIER_COLUMN",
    "LEAD_HOLDER_STATUSES",
    "OK_STATUSES",
    "PENDING",
    "PG_LOCK_TIMEOUT",
    "POSITION_COLUMN",
    "SETTLED_STATUSES",
    "SQLITE_BUSY_TIMEOUT_MS",
    "UNCONFIRMED",
    "_LOOKUP_CHUNK",
    "Dialect",
    "LedgerRow",
    "LedgerUnavailableError",
    "RegistrationLedger",
    "validate_table_name",
]
