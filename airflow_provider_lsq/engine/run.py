"""The engine's run: one task execution's rows through a per-row operation, each outcome recorded.

It validates rows (the operation's check), runs the dry run, hands rows to the concurrent sending
(:mod:`.concurrency`: the operation's hook call per row), records every outcome (in a sink the
operator chooses: XCom's list, or the ledger), stops cleanly on ``on_kill``, and gives the summary
and the failure-ratio verdict. The operators configure it and stay thin.

How a stop works. The run's body executes in its own thread (``lsq-registration-run``) while the
task's main thread only waits, because Airflow calls ``on_kill()`` from its SIGTERM handler in the
main thread (Airflow 3's task runner, then SIGKILL about 5 s later; Airflow 2's task instance, which
raises right after ``on_kill`` returns). ``on_kill`` therefore takes no lock the main thread could
hold: it sets the stop flag and polls, for at most ``kill_wait`` seconds, while the run's thread lets
calls in flight finish (no new row, no new retry), writes every outcome and ends.

Records reach the sink every ``batch_size`` outcomes and at least every ``flush_interval`` seconds;
in an interval with nothing to write, the sink gets a heartbeat instead (the ledger refreshes the
run's claims, so that they never look abandoned while the run lives).
A write that fails keeps its batch in memory and blocks the sending (no new row) while the sink
retries; past the sink's own bound the run stops taking rows, finishes the calls in flight, tries a
last write and fails, logging for each outcome it could not record only the row key, status and
lead id.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_provider_lsq.engine.concurrency import send_rows
from airflow_provider_lsq.engine.registration import PortalRegistration
from airflow_provider_lsq.engine.rows import PlannedRow
from airflow_provider_lsq.exceptions import LeadSquaredAuthenticationError, LeadSquaredConfigError
from airflow_provider_lsq.log_caps import log_first
from airflow_provider_lsq.outcomes import NOT_SENT, RegistrationOutcome
from airflow_provider_lsq.progress import RegistrationProgress
from airflow_provider_lsq.version_compat import AirflowException, AirflowFailException

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Generator, Iterable, Iterator, Mapping

    from airflow_provider_lsq.engine.operation import RowOperation
    from airflow_provider_lsq.engine.rows import Row
    from airflow_provider_lsq.engine.sinks import OutcomeSink
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
    from airflow_provider_lsq.operators.base import LeadSquaredBaseOperator

T = TypeVar("T")
MAX_UNRECORDED_LOGGED = 10_000  # per-row lines when outcomes cannot be recorded; beyond, only counted


class RegistrationRun:
    """One task execution's run of a per-row operation: rows in, one recorded outcome per row out.

    :param hook: the LeadSquared hook (created by the operator; its ``stopping`` flag is set on stop).
    :param sink: where outcomes are recorded.
    :param progress: counts and the steady progress line.
    :param log: the operator's logger.
    :param operation: what each row is validated with and sent by (:mod:`.operation`). Without it,
        the portal registration of ``identifier_attribute``, ``only_new_leads`` and
        ``password_callable`` (see the operators), as before operations existed.
    :param max_workers: concurrent calls (None: the hook's choice).
    :param batch_size: outcomes per write.
    :param flush_interval: seconds an outcome may wait in memory before it is written.
    :param kill_wait: seconds ``on_kill`` waits for calls in flight and their records before it
        returns (Airflow 3 sends SIGKILL about 5 s after SIGTERM).
    :param drain_timeout: seconds the main thread waits for the run to record what it finished when
        the task is interrupted (Airflow 2 raises right after ``on_kill``).
    """

    def __init__(
        self,
        *,
        hook: LeadSquaredHook,
        sink: OutcomeSink,
        progress: RegistrationProgress,
        log: Any,
        identifier_attribute: str | None = None,
        operation: RowOperation | None = None,
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        max_workers: int | None = None,
        batch_size: int = 500,
        flush_interval: float = 2.0,
        kill_wait: float = 3.5,
        drain_timeout: float = 30.0,
        on_stopped: Callable[[], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval_seconds must be positive, got {flush_interval}")
        self.hook = hook
        self.sink = sink
        self.progress = progress
        self.log = log
        self.operation: RowOperation = operation or PortalRegistration(
            identifier_attribute=identifier_attribute,
            only_new_leads=only_new_leads,
            password_callable=password_callable,
        )
        self.max_workers = max_workers
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.kill_wait = kill_wait
        self.drain_timeout = drain_timeout
        self.killed = False
        self.not_claimed = 0  # rows another run held when this one came to them
        self._unrecorded: list[RegistrationOutcome] = []
        self._unsent: list[str] = []  # keys claimed but never sent (the run stopped first)
        self.not_sent = 0
        self._last_flush = time.monotonic()
        self._stop_error: BaseException | None = None
        self._source_error: BaseException | None = None
        self._sink_failed = False  # a write gave up: hold further writes until the final one
        self._finished = False  # a plain flag: on_kill (a signal handler) must take no lock
        self._on_stopped = on_stopped  # execute() ended by an error or a kill: before it is raised

    @classmethod
    def for_operator(
        cls,
        operator: LeadSquaredBaseOperator,
        *,
        hook: LeadSquaredHook,
        sink: OutcomeSink,
        total: int | None,
        track_skips: bool = False,
        **options: Any,
    ) -> RegistrationRun:
        """The run of one of this provider's operators, set up from the parameters their base class
        (:class:`~airflow_provider_lsq.operators.base.LeadSquaredBaseOperator`) holds, with the
        operation the operator performs (its ``row_operation()``).

        Metrics are tagged by the operator's ``leadsquared_conn_id`` (dry runs send none); ``options``
        go to the constructor (e.g. ``batch_size``). A run that :meth:`execute` ends with an error or
        a kill keeps the counts it finished on the operator, for the FAIL event's lineage.
        """
        from airflow_provider_lsq.assets import keep_counts_of_stopped_run

        progress = RegistrationProgress(
            total,
            interval=operator.progress_interval,
            logger=operator.log,
            track_skips=track_skips,
            conn_id=None if operator.is_dry_run else operator.leadsquared_conn_id,
            label=operator.progress_label,
            statuses=operator.outcome_statuses,
            metric=operator.outcome_metric,
        )
        return cls(
            hook=hook,
            sink=sink,
            progress=progress,
            log=operator.log,
            operation=operator.row_operation(),
            max_workers=operator.max_workers,
            flush_interval=operator.flush_interval_seconds,
            on_stopped=lambda: keep_counts_of_stopped_run(operator, progress.summary(operator.is_dry_run)),
            **options,
        )

    @property
    def stopping(self) -> threading.Event:
        return self.hook.stopping

    # -- the thread that runs, and the stop ------------------------------------------------------

    def execute(self, body: Callable[[], T]) -> T:
        """Run ``body`` in the run's own thread; the calling (main) thread waits and re-raises.

        If the wait is interrupted (Airflow 2 raises in the main thread after ``on_kill``), the run
        is stopped and given up to ``drain_timeout`` seconds to record what it finished.
        """
        import threading

        result: list[T] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                result.append(body())
            except BaseException as error:
                errors.append(error)
            finally:
                self._finished = True

        thread = threading.Thread(target=target, name="lsq-registration-run", daemon=True)
        thread.start()
        try:
            while not self._finished:
                time.sleep(0.1)  # no lock: the SIGTERM handler runs on this thread
        except BaseException:
            self.stop()
            self._wait_finished(self.drain_timeout)
            if not self._finished:
                self._log_unrecorded("the task was interrupted before they were written")
            self._stopped()
            raise
        if errors:
            self._stopped()
            error = errors[0]
            if isinstance(error, LeadSquaredAuthenticationError | LeadSquaredConfigError):
                # Met before any row (the connection read for the worker count, a login): no retry fixes it.
                failure = AirflowFailException(self.hook.redact(error.message))
                raise failure from error
            raise error
        return result[0]

    def _stopped(self) -> None:
        if self._on_stopped is not None:
            self._on_stopped()

    def stop(self) -> None:
        """Take no further row and start no retry; calls in flight finish and are recorded."""
        self.stopping.set()

    def on_kill(self) -> None:
        """Airflow's stop: no new row, calls in flight finish, every outcome recorded; then return.

        Returns within ``kill_wait`` seconds. Runs on the main thread (from Airflow's SIGTERM
        handler) while the run's own thread does the work, so it only sets a flag and polls.
        """
        self.log.warning(
            "Stop requested: no new row is sent; waiting up to %.1f s for the calls in flight and "
            "their records.",
            self.kill_wait,
        )
        self.killed = True
        self.stop()
        self._wait_finished(self.kill_wait)
        if self._finished:
            self.log.warning("Stopped: every call made is recorded.")
        else:
            self._log_unrecorded("the task is being killed before they were written")

    def _wait_finished(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._finished and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- dry run -----------------------------------------------------------------------------------

    def dry_run(self, rows: Iterable[Row]) -> None:
        """Validate every row; make no call and record nothing but the sink's dry-run view."""
        for planned in rows:
            row = self._unpack(planned)
            if isinstance(row, RegistrationOutcome):
                self.progress.add(row)
                self.sink.dry_run(row.key, row)
                continue
            key, lead = row
            outcome = self.operation.check(key, lead)
            if outcome is None:
                self.progress.add_valid()
            else:
                self.progress.add(outcome)
            self.sink.dry_run(key, outcome)
            if self.stopping.is_set():
                return

    # -- sending -------------------------------------------------------------------------------------

    def send(self, rows: Iterable[Row]) -> None:
        """Send every valid row, record every outcome, then raise what stopped the run (if anything).

        Whatever stops it (a stream error, a failed login, the sink, a kill), every call already made
        is recorded before this returns or raises.
        """
        stream = iter(rows)
        first = self._next_chunk(stream, 1)
        if not first:
            self._flush(final=True)
            if self._stop_error is not None:
                raise self._stop_error
            if self._source_error is not None:
                raise self._source_error
            return  # nothing to send: no call at all, not even a login
        workers = self.max_workers or self.hook.default_max_workers
        claim_size = max(2 * workers, self.operation.batch_size)  # a bulk call's rows claimed together
        feed = self._feed(itertools.chain(first, stream), claim_size=claim_size)
        try:
            outcomes = send_rows(
                self.hook,
                self.operation,
                feed,
                max_workers=workers,
                on_idle=self._flush_if_due,
                idle_seconds=min(1.0, self.flush_interval),
                may_send=self.sink.may_send,
            )
            for outcome in outcomes:
                self._take(outcome)
        except (LeadSquaredAuthenticationError, LeadSquaredConfigError) as error:  # no retry can fix them
            failure = AirflowFailException(self.hook.redact(error.message))
            failure.__cause__ = error
            self._stop_because(failure)
        except Exception as error:
            self._stop_because(error)
        finally:
            feed.close()  # rows claimed but never handed over end as not sent
            self._flush(final=True)
            self._release_unsent()
            self.sink.close()
        if self._unrecorded:
            self._log_unrecorded("the ledger could not be written")
            # No Airflow retry: it would send the rows still ``pending`` again before a person could
            # record these outcomes (each of them registered a lead that a re-send would reset).
            raise AirflowFailException(
                f"{len(self._unrecorded)} outcomes could not be recorded (listed above, by row key, "
                "status and lead id): record them by hand before the next run."
            ) from self._stop_error
        if self._stop_error is not None:
            raise self._stop_error
        if self._source_error is not None:
            raise self._source_error
        if self.killed:
            raise AirflowException("The registration was stopped (on_kill); every call made is recorded.")

    register = send  # its name when the only operation was registering

    def _feed(
        self, rows: Iterator[Row], *, claim_size: int
    ) -> Generator[tuple[str, Mapping[str, Any]], None, None]:
        """Rows to send, claimed (``pending``) a few at a time just before they are handed over."""
        claimed: list[tuple[str, Mapping[str, Any]]] = []
        try:
            while not self.stopping.is_set() and self._source_error is None:
                chunk = self._next_chunk(rows, claim_size)
                if not chunk:
                    return
                keys = self.sink.claim([key for key, _ in chunk])
                claimed = [(key, lead) for key, lead in chunk if key in keys]
                self.not_claimed += len(chunk) - len(claimed)
                self.progress.add_skipped(len(chunk) - len(claimed))
                while claimed and not self.stopping.is_set():
                    yield claimed.pop(0)
        except GeneratorExit:
            raise
        except Exception as error:
            self._stop_because(error)
        finally:
            for key, _ in claimed:  # claimed, never handed over: record that no call was made
                self._take(RegistrationOutcome.not_sent(key))

    def _next_chunk(self, rows: Iterator[Row], size: int) -> list[tuple[str, Mapping[str, Any]]]:
        """Up to ``size`` valid rows; decided and invalid rows met on the way are recorded."""
        chunk: list[tuple[str, Mapping[str, Any]]] = []
        while len(chunk) < size and self._source_error is None:
            self._flush_if_due()
            try:
                row = next(rows, None)
            except Exception as error:  # the source broke: send what was read, then raise it
                self.log.error("Reading the rows failed (%s): no further row is taken.", type(error).__name__)
                self._source_error = error
                break
            if row is None:
                break
            row = self._unpack(row)
            if isinstance(row, RegistrationOutcome):
                self._take(row)
                continue
            key, lead = row
            invalid = self.operation.check(key, lead)  # no claim, no call
            if invalid is not None:
                self._take(invalid)
            else:
                chunk.append((key, lead))
        return chunk

    def _unpack(self, row: Row) -> tuple[str, Mapping[str, Any]] | RegistrationOutcome:
        """A planner's row: its state to the sink (before its claim or record), then the row itself."""
        if not isinstance(row, PlannedRow):
            return row
        if row.state is not None:
            self.sink.planned(row.key, row.state)
        return row.row

    def _take(self, outcome: RegistrationOutcome) -> None:
        if outcome.error_type == NOT_SENT:  # never sent: no outcome, the row is as if never claimed
            self._unsent.append(outcome.key)
            self.not_sent += 1
            return
        self.progress.add(outcome)
        self._unrecorded.append(outcome)
        if len(self._unrecorded) >= self.batch_size:
            self._flush()
        else:
            self._flush_if_due()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush < self.flush_interval:
            return
        if self._unrecorded:
            self._flush()  # a write refreshes the claims too
        elif not self._sink_failed:
            self._heartbeat()

    def _heartbeat(self) -> None:
        try:
            self.sink.heartbeat()
        except Exception as error:  # the claims could look abandoned: send nothing more
            self.log.error(
                "Refreshing the rows in flight failed (%s): no new row is sent.", type(error).__name__
            )
            self._sink_failed = True
            self._stop_because(error)
        self._last_flush = time.monotonic()

    def _flush(self, final: bool = False) -> None:
        """Write what is unrecorded; keep it in memory when the write fails."""
        if not self._unrecorded or (self._stop_error is not None and not final and self._sink_failed):
            return
        batch = list(self._unrecorded)
        try:
            self.sink.write(batch)
        except Exception as error:
            self.log.error(
                "Recording %d outcomes failed (%s): no new row is sent.", len(batch), type(error).__name__
            )
            self._sink_failed = True
            self._stop_because(error)
            return
        del self._unrecorded[: len(batch)]
        self._last_flush = time.monotonic()

    def _release_unsent(self) -> None:
        if self._unsent:
            self.log.warning(
                "%d rows were handed over but not sent before the run stopped: released.", len(self._unsent)
            )
        try:
            self.sink.release_unrecorded({outcome.key for outcome in self._unrecorded})
        except Exception as error:  # they stay pending: the next run sends them
            self.log.error("Releasing the unsent rows failed (%s): they stay pending.", type(error).__name__)
        self._unsent = []

    def _stop_because(self, error: BaseException) -> None:
        if self._stop_error is None:
            self._stop_error = error
        self.stop()

    def _log_unrecorded(self, why: str) -> None:
        pending = list(self._unrecorded)  # a copy: the run's thread may still be appending
        if not pending:
            return
        self.log.error(
            "%d outcomes are NOT in the ledger (%s); reconcile them by hand. Each: row key, status, lead id.",
            len(pending),
            why,
        )
        log_first(
            self.log.error,
            pending,
            MAX_UNRECORDED_LOGGED,
            "Unrecorded outcome: row %s, %s, lead id %s",
            lambda outcome: (outcome.key, outcome.status, outcome.lead_id),
            "... and %d more unrecorded outcomes.",
        )

    # -- the verdict -------------------------------------------------------------------------------

    def finish(
        self,
        dry_run: bool,
        duration: float,
        max_failure_ratio: float,
        *,
        verdict: tuple[int, int] | None = None,
        unconfirmed_rows: int | None = None,
        recorded_in: str = "XCom 'outcomes'",
        on_summary: Callable[[dict[str, Any]], None] | None = None,
        name_rows: bool = True,
        **extra: int,
    ) -> dict[str, Any]:
        """Log and return the summary (counts only); raise when a row is unconfirmed or too many failed.

        ``verdict`` is ``(considered, failures)`` when the operator knows the whole run's counts, and
        ``unconfirmed_rows`` its unconfirmed rows (default: this execution's); ``recorded_in`` names
        where outcomes are recorded. Any unconfirmed row fails the task without a retry
        (:meth:`RegistrationProgress.raise_if_unconfirmed`), whatever ``max_failure_ratio``.
        ``on_summary`` gets the summary before the verdict, so a failing run publishes its counts too.
        ``name_rows`` False: the failure's message names no row key (they are lead values).
        """
        summary = {**self.progress.summary(dry_run, duration), **extra}
        self.log.info("%s summary: %s", self.progress.label, summary)
        if on_summary is not None:
            on_summary(summary)
        if not dry_run:
            self.progress.raise_if_unconfirmed(unconfirmed_rows, where=recorded_in)
        considered, failures = verdict if verdict is not None else (None, None)
        self.progress.raise_if_too_many_failures(
            max_failure_ratio, considered=considered, failures=failures, name_rows=name_rows
        )
        return summary
