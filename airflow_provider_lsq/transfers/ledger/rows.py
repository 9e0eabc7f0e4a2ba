"""What the ledger holds about one row key (:class:`LedgerRow`), and what its statuses mean.

Statuses: the outcomes' (``registered``, ``already_registered``, ``invalid``, ``failed``,
``unconfirmed``: sent, and no answer said what happened; never re-sent without a person deciding) and
``pending``, written before a row is handed over for its call, so a run that dies without warning
leaves its in-flight rows visible.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from airflow_provider_lsq.outcomes import RegistrationStatus
from airflow_provider_lsq.transfers.executions import holder_is_gone

if TYPE_CHECKING:
    from airflow_provider_lsq.transfers.executions import Execution

PENDING = "pending"  # handed over for a call whose outcome is not recorded yet
UNCONFIRMED = RegistrationStatus.UNCONFIRMED.value  # sent; no answer said whether it was carried out
# A row of another key in one of these holds its lead: registered, maybe registered, or being sent.
LEAD_HOLDER_STATUSES = frozenset(
    {RegistrationStatus.REGISTERED.value, RegistrationStatus.ALREADY_REGISTERED.value, PENDING, UNCONFIRMED}
)
# How long after its holder's last heartbeat a pending row is judged abandoned (see the transfer's
# ``pending_timeout``).
DEFAULT_PENDING_TIMEOUT = dt.timedelta(minutes=2)
OK_STATUSES = frozenset({RegistrationStatus.REGISTERED.value, RegistrationStatus.ALREADY_REGISTERED.value})
# Settled: a later run neither sends the row nor needs to read it again, so the transfer leaves it out
# of its query in the database (see RegistrationLedger.anti_join). The one place to add a status to.
SETTLED_STATUSES = OK_STATUSES


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
    # The lead-update ledger's: sha256 of the fields last sent for the key (None elsewhere).
    fields_fingerprint: str | None = None

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
