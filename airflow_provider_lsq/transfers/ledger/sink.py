"""The engine's sink for the SQL transfer: outcomes go to the ledger, and claims stay alive.

Claims mark rows ``pending`` for this execution just before their calls; a keeper thread (besides
every write) refreshes the claims still in flight, and learns which another execution took over.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_lsq.engine.sinks import OutcomeSink
from airflow_provider_lsq.transfers.ledger.rows import DEFAULT_PENDING_TIMEOUT, LedgerRow
from airflow_provider_lsq.transfers.ledger.store import RegistrationLedger

if TYPE_CHECKING:
    import datetime as dt

    from airflow_provider_lsq.outcomes import RegistrationOutcome
    from airflow_provider_lsq.transfers.executions import Execution

log = logging.getLogger("airflow_provider_lsq.transfers.sql_to_leadsquared")  # its name before the move


class LedgerState(NamedTuple):
    """What the sink needs to claim and record a planned row (the transfer's planner makes it)."""

    previous: LedgerRow | None  # the ledger's row as the planner read it (None: absent, or not to send)
    fingerprint: str | None  # the lead's lead_fingerprint, written with the claim and the record


class LedgerSink(OutcomeSink):
    """The engine's records go to the ledger; claims mark rows ``pending`` for this execution before
    their calls, and a keeper thread (besides every write) refreshes the claims still in flight.

    The keeper has its own ledger connection, so a slow warehouse fetch or a long flush on the run's
    thread never lets a live execution's claims look abandoned. It also learns which claims another
    execution took over (one that judged this one dead: frozen, or cut off from the ledger past
    ``pending_timeout``): :meth:`may_send` withdraws those rows, and rows whose claim has not been
    confirmed for half of ``pending_timeout`` (by this process's monotonic clock), just before each
    call. Their outcomes are not recorded over the new holder's.
    """

    def __init__(
        self,
        ledger: RegistrationLedger,
        execution: Execution,
        *,
        pending_timeout: dt.timedelta = DEFAULT_PENDING_TIMEOUT,
        keep_interval: float = 2.0,
        logger: Any = None,
    ) -> None:
        self.ledger = ledger
        self.log = logger if logger is not None else log  # the task's log
        self.execution = execution
        self.pending_timeout = pending_timeout
        self.known: dict[str, LedgerRow | None] = {}  # what the ledger held for rows about to be claimed
        self.claimed: dict[str, LedgerRow | None] = {}  # claimed rows not yet recorded: their previous rows
        self.identifiers: dict[str, str | None] = {}  # lead_identifier of rows handed over, until recorded
        self.lost: set[str] = set()  # claims another execution took over: never sent, never recorded
        self.keep_interval = min(keep_interval, pending_timeout.total_seconds() / 4)
        self._fresh_for = pending_timeout.total_seconds() / 2
        self._lock = threading.Lock()
        self._confirmed_at = time.monotonic()  # when the keeper last confirmed every claim held then
        self._claimed_at: dict[str, float] = {}
        self._confirmed = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._keeper: threading.Thread | None = None

    def planned(self, key: str, state: LedgerState) -> None:
        self.identifiers[key] = state.fingerprint  # until its record
        if state.previous is not None:
            self.known[key] = state.previous  # until its claim or its record

    def claim(self, keys: list[str]) -> set[str]:
        previous = {key: self.known.pop(key, None) for key in keys}
        started = time.monotonic()
        claimed = self.ledger.claim(
            previous,
            execution=self.execution,
            identifiers={key: self.identifiers.get(key) for key in keys},
            in_flight_for=self.pending_timeout,
            pending_timeout=self.pending_timeout,
        )
        with self._lock:
            self.claimed.update((key, previous[key]) for key in claimed)
            self._claimed_at.update((key, started) for key in claimed)
        for key in keys:
            if key not in claimed:
                self.identifiers.pop(key, None)
        if claimed and self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="lsq-ledger-keeper", daemon=True)
            self._keeper.start()
        return claimed

    def heartbeat(self) -> None:
        with self._lock:
            held = list(self.claimed)
        self.ledger.refresh(held, execution=self.execution)

    def may_send(self, key: str) -> bool:
        """True when this execution's claim of ``key`` is confirmed recently enough to make its call.

        A claim unconfirmed for half of ``pending_timeout`` waits (up to a quarter of it) for the
        keeper's next confirmation; a claim another execution took over is never sent.
        """
        deadline = time.monotonic() + self.pending_timeout.total_seconds() / 4
        with self._confirmed:
            while True:
                if key in self.lost or self._closed.is_set():
                    return False
                confirmed = max(self._confirmed_at, self._claimed_at.get(key, 0.0))
                now = time.monotonic()
                if now - confirmed < self._fresh_for:
                    return True
                if now >= deadline:
                    return False
                self._confirmed.wait(min(1.0, deadline - now))

    def _keep(self) -> None:
        """The keeper thread: refresh the claims held, on a connection of its own, and learn which
        were lost. A failure is logged once; claims then go unconfirmed, so no new call is made."""
        keeper = RegistrationLedger(
            self.ledger.db_hook,
            self.ledger.table,
            self.ledger.portal_id,
            write_timeout=min(self.ledger.write_timeout, self._fresh_for),
        )
        failing = False
        try:
            while not self._closed.wait(self.keep_interval):
                started = time.monotonic()
                with self._lock:
                    held = list(self.claimed)
                try:
                    mine = keeper.keep(held, execution=self.execution)
                except Exception as error:
                    if not failing:
                        self.log.warning(
                            "Refreshing this run's claims failed (%s): rows are not sent until it works.",
                            type(error).__name__,
                        )
                    failing = True
                    continue
                failing = False
                with self._confirmed:
                    lost = {key for key in held if key not in mine and key in self.claimed}
                    if lost - self.lost:
                        self.log.warning(
                            "%d rows this run had claimed were taken over by another execution (this one "
                            "looked dead to it: frozen, or cut off from the ledger): they are not sent "
                            "or recorded by this run.",
                            len(lost - self.lost),
                        )
                    self.lost |= lost
                    self._confirmed_at = started
                    self._confirmed.notify_all()
        finally:
            keeper.close_quietly()

    def close(self) -> None:
        self._closed.set()
        with self._confirmed:
            self._confirmed.notify_all()
        if self._keeper is not None:
            self._keeper.join(timeout=self.ledger.write_timeout + self.keep_interval)

    def release_unrecorded(self, keep: set[str]) -> None:
        with self._lock:
            released = {key: row for key, row in self.claimed.items() if key not in keep}
        self.ledger.release(released, execution=self.execution)
        with self._lock:
            for key in released:
                del self.claimed[key]
                self._claimed_at.pop(key, None)
                self.identifiers.pop(key, None)

    def _record(self, outcomes: list[RegistrationOutcome], **kwargs: Any) -> None:
        """One batch into the ledger (:meth:`RegistrationLedger.record`); a subclass adds its columns."""
        self.ledger.record(outcomes, **kwargs)

    def write(self, outcomes: list[RegistrationOutcome]) -> None:
        with self._lock:
            lost = {o.key for o in outcomes if o.key in self.lost}
            held = list(self.claimed)
        mine = [o for o in outcomes if o.key not in lost]
        identifiers = {o.key: self.identifiers[o.key] for o in mine if o.key in self.identifiers}
        self._record(
            mine,
            execution=self.execution,
            identifiers=identifiers,
            refresh=held,
            claimed=[o.key for o in mine if o.key in held],
        )
        taken = self.ledger.taken_over
        if taken:
            self.log.warning(
                "%d rows this run sent were taken over by another execution meanwhile (this one looked "
                "dead to it: frozen, or cut off from the ledger): their records are that execution's.",
                len(taken),
            )
        with self._lock:
            self.lost |= taken
            for outcome in outcomes:
                self.claimed.pop(outcome.key, None)
                self._claimed_at.pop(outcome.key, None)
                self.known.pop(outcome.key, None)  # invalid rows are recorded without a claim
                self.identifiers.pop(outcome.key, None)
