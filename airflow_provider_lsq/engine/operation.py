"""What the engine runs for each row: a :class:`RowOperation`.

An operation says how to validate a row without a call (:meth:`~RowOperation.check`, for dry runs
and before a row is claimed), what must hold before any row is sent (:meth:`~RowOperation.prepare`:
a login, a portal id), which hook call sends a row (:meth:`~RowOperation.call`: one call, a result
or an exception) and how that result or exception becomes the row's outcome
(:meth:`~RowOperation.outcome`, :meth:`~RowOperation.failure`). The engine does the rest for any
operation: concurrency within the account's rate limit, claims, records, stops and the verdict.

Registering portal users is :class:`~airflow_provider_lsq.engine.registration.PortalRegistration`;
updating leads is :class:`~airflow_provider_lsq.engine.lead_sync.LeadSync`.

An operation whose call takes several rows (a bulk call) sets :attr:`~RowOperation.batch_size` and
overrides :meth:`~RowOperation.run_batch`: the engine then hands it up to that many rows at once, one
call, and each row still gets its own outcome. :meth:`~RowOperation.preflight` runs once the run's
columns are known, before any row is sent (and in a dry run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.exceptions import LeadSquaredError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
    from airflow_provider_lsq.outcomes import RegistrationOutcome


class RowDecided(Exception):
    """Raised by :meth:`RowOperation.call` when the row's outcome is known without a call."""

    def __init__(self, outcome: RegistrationOutcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


class RowOperation:
    """One per-row LeadSquared operation (see the module's docstring). Subclasses define each step."""

    #: The name of the engine's worker threads (``lsq-register-0``...): thread dumps say what ran.
    thread_prefix = "lsq-row"
    #: Rows one call takes: 1 (a call per row, :meth:`run_row`) or more (a bulk call, :meth:`run_batch`).
    batch_size = 1

    def preflight(self, hook: LeadSquaredHook, columns: Sequence[str]) -> None:
        """Once the run's columns (the attributes it sends) are known, before any row is checked or
        sent (a dry run too): raise what no row can get past. Default: nothing."""

    def check(self, key: str, row: Mapping[str, Any]) -> RegistrationOutcome | None:
        """The row's ``invalid`` outcome when it cannot be sent, without any call; None when it can."""
        raise NotImplementedError

    def prepare(self, hook: LeadSquaredHook) -> None:
        """Before any row is taken: raise what no row can get past (a bad login, no portal id)."""

    def call(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], may_send: Callable[[], bool] | None
    ) -> Any:
        """Send the row: one hook call (with its retries); its result, or its exception.

        ``may_send`` goes to the hook: asked just before each attempt is sent. Raise
        :class:`RowDecided` when the row's outcome is known without a call.
        """
        raise NotImplementedError

    def outcome(self, key: str, row: Mapping[str, Any], result: Any) -> RegistrationOutcome:
        """The outcome of a row whose call returned ``result``."""
        raise NotImplementedError

    def failure(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], error: LeadSquaredError
    ) -> RegistrationOutcome:
        """The outcome of a row whose call raised ``error``; raise to stop the whole run instead."""
        raise NotImplementedError

    def run_row(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], may_send: Callable[[], bool] | None
    ) -> RegistrationOutcome:
        """One row, start to end: its call, and its outcome (what the engine's workers run)."""
        try:
            result = self.call(hook, key, row, may_send)
        except RowDecided as decided:
            return decided.outcome
        except LeadSquaredError as error:
            return self.failure(hook, key, row, error)
        return self.outcome(key, row, result)

    def run_batch(
        self,
        hook: LeadSquaredHook,
        rows: Sequence[tuple[str, Mapping[str, Any]]],
        may_send: Callable[[str], bool] | None,
    ) -> list[RegistrationOutcome]:
        """Up to :attr:`batch_size` rows, one outcome each (default: :meth:`run_row` for each row).

        ``may_send(key)`` is asked before a row is sent (None: always yes). A bulk operation sends the
        rows in one call and maps each row's own result to its outcome.
        """
        outcomes = []
        for key, row in rows:
            guard = (lambda key=key: may_send(key)) if may_send is not None else None
            outcomes.append(self.run_row(hook, key, row, guard))
        return outcomes
