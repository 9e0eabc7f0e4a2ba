"""Where a run's outcomes go: :class:`OutcomeSink` (the protocol, keeping nothing) and
:class:`MemorySink` (XCom's list). The SQL transfer's sink is the ledger's
(:class:`~airflow_provider_lsq.transfers.ledger.sink.LedgerSink`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.engine.rows import valid_outcome_dict

if TYPE_CHECKING:
    from airflow_provider_lsq.outcomes import RegistrationOutcome


class OutcomeSink:
    """Where a run's outcomes go. This base keeps nothing; subclasses record somewhere.

    ``claim`` runs before rows are handed over for their calls (the ledger writes ``pending``);
    ``write`` gets each batch once and must raise if it could not record it (it is kept and
    written again); ``heartbeat`` runs every flush interval in which nothing was written (the ledger
    refreshes the claims still in flight); ``may_send`` can withdraw a row just before its call;
    ``close`` ends the registration; ``dry_run`` sees each row of a dry run; ``planned`` gets
    each planned row's state as the engine takes the row.
    """

    def claim(self, keys: list[str]) -> set[str]:
        """The keys this run may send now (default: all)."""
        return set(keys)

    def write(self, outcomes: list[RegistrationOutcome]) -> None:
        """Record a batch of outcomes durably, or raise."""

    def heartbeat(self) -> None:
        """Say the run is alive (default: nothing); raise if that could not be recorded."""

    def may_send(self, key: str) -> bool:
        """Asked from a worker thread just before each call of ``key`` is made (default: yes)."""
        return True

    def close(self) -> None:
        """The run has ended: stop whatever the sink runs besides (default: nothing)."""

    def release_unrecorded(self, keep: set[str]) -> None:
        """Undo the claims of rows that got no outcome (never sent, or refused at login), but ``keep``."""

    def dry_run(self, key: str, outcome: RegistrationOutcome | None) -> None:
        """A dry run's row: its ``invalid`` outcome, or None when it would be sent."""

    def planned(self, key: str, state: Any) -> None:
        """The engine takes a planner's row ``key`` (:class:`~.rows.PlannedRow`): ``state`` is what
        its planner says the sink needs to claim and record it (default: nothing to keep)."""


class MemorySink(OutcomeSink):
    """Outcomes as JSON-ready dicts in a list (what ``RegisterPortalUserOperator`` pushes to XCom)."""

    def __init__(self) -> None:
        self.outcomes: list[dict[str, Any]] = []

    def write(self, outcomes: list[RegistrationOutcome]) -> None:
        self.outcomes.extend(outcome.to_dict() for outcome in outcomes)

    def dry_run(self, key: str, outcome: RegistrationOutcome | None) -> None:
        self.outcomes.append(valid_outcome_dict(key) if outcome is None else outcome.to_dict())
