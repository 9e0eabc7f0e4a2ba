"""Progress of a bulk registration: counts by status, a steady progress line, and the failure check.

Memory stays flat however many rows pass: only counters and the first few failures are kept. Lines
name rows by their key only, never by any other lead data, and never carry a password.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq import metrics
from airflow_provider_lsq.outcomes import REGISTRATION_STATUSES, RegistrationStatus
from airflow_provider_lsq.version_compat import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

    from airflow_provider_lsq.outcomes import RegistrationOutcome

MAX_FAILURES_KEPT = 10
_FAILED = (RegistrationStatus.INVALID, RegistrationStatus.FAILED)
_LOGGED = (*_FAILED, RegistrationStatus.UNCONFIRMED)  # outcomes logged by row key (the first few)


def check_failure_ratio(max_failure_ratio: float) -> float:
    """``max_failure_ratio`` when it is a share of rows (0 to 1); ValueError otherwise."""
    if not 0.0 <= max_failure_ratio <= 1.0:
        raise ValueError(f"max_failure_ratio must be within [0, 1], got {max_failure_ratio}")
    return max_failure_ratio


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RegistrationProgress:
    """Count outcomes as they arrive and log a progress line every ``interval`` seconds.

    Use it as a context manager: a daemon thread logs a line at a steady pace (even while the API is
    slow and no outcome arrives), and leaving the block logs the final line. Calls to :meth:`add` and
    friends are thread-safe.

    :param total: rows expected, when known (gives a percentage and an ETA).
    :param interval: seconds between progress lines.
    :param logger: where lines go; operators pass their own ``self.log``.
    :param track_skips: report ``skipped`` too (the SQL transfer does); ``duplicates`` always is.
    :param label: how lines start.
    :param conn_id: the LeadSquared connection: each outcome is counted in the provider's metrics
        under it (``leadsquared.registrations.<status>``). None (dry runs) sends no metric.
    :param statuses: the statuses rows end in: the summary's counts (default: a registration's).
    :param metric: ``metric(conn_id, status)`` counts one outcome (default:
        :func:`~airflow_provider_lsq.metrics.registration`).
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        interval: float = 10.0,
        logger: Any = None,
        track_skips: bool = False,
        label: str = "LeadSquared registration",
        clock: Callable[[], float] = time.monotonic,
        conn_id: str | None = None,
        statuses: Iterable[RegistrationStatus] = REGISTRATION_STATUSES,
        metric: Callable[[str, RegistrationStatus], None] | None = None,
    ) -> None:
        self.total = total
        self._metric = metric or metrics.registration
        self.interval = interval
        self.log = logger if logger is not None else logging.getLogger(__name__)
        self.track_skips = track_skips
        self.label = label
        self._clock = clock
        self.conn_id = conn_id
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {status.value: 0 for status in statuses}
        self._valid = self._skipped = self._duplicates = self._calls = 0
        self._failures: list[str] = []
        self._started = clock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- counting --------------------------------------------------------------------------------

    def add(self, outcome: RegistrationOutcome) -> None:
        """Count one row's outcome; keep (and log) it when it is among the first failures."""
        line, last = "", False
        if self.conn_id is not None:
            self._metric(self.conn_id, outcome.status)
        with self._lock:
            self._counts[outcome.status.value] = self._counts.get(outcome.status.value, 0) + 1
            self._calls += outcome.attempts
            keep = outcome.status in _LOGGED and len(self._failures) < MAX_FAILURES_KEPT
            if keep:
                line = f"row {outcome.key}: {outcome.error_type}: {outcome.error_message}"
                self._failures.append(line)
                last = len(self._failures) == MAX_FAILURES_KEPT
        if keep:
            self.log.warning("%s: %s", self.label, line)
            if last:
                self.log.warning("%s: further failures are counted, not logged.", self.label)

    def add_valid(self, count: int = 1) -> None:
        """A dry run's row that passed validation and would be sent."""
        with self._lock:
            self._valid += count

    def add_skipped(self, count: int = 1) -> None:
        """A row the ledger says needs no call."""
        with self._lock:
            self._skipped += count

    def add_duplicate(self, count: int = 1) -> None:
        """A row whose key was already seen in this run: not sent again."""
        with self._lock:
            self._duplicates += count

    # -- reading ---------------------------------------------------------------------------------

    @property
    def done(self) -> int:
        """Rows finished so far, whatever their end."""
        with self._lock:
            return sum(self._counts.values()) + self._valid + self._skipped + self._duplicates

    @property
    def considered(self) -> int:
        """Rows that were validated or sent: the base of the failure ratio (skips and duplicates out)."""
        with self._lock:
            return sum(self._counts.values()) + self._valid

    @property
    def failures(self) -> int:
        with self._lock:
            return (
                self._counts[RegistrationStatus.INVALID.value] + self._counts[RegistrationStatus.FAILED.value]
            )

    @property
    def unconfirmed(self) -> int:
        """Rows sent whose outcome no answer proved (see ``RegistrationStatus.UNCONFIRMED``)."""
        return self.count(RegistrationStatus.UNCONFIRMED)

    @property
    def first_failures(self) -> list[str]:
        """The first few failures (unconfirmed rows too) as ``row <key>: <error_type>: <error_message>``."""
        with self._lock:
            return list(self._failures)

    def count(self, status: RegistrationStatus | str) -> int:
        with self._lock:
            return self._counts.get(RegistrationStatus(status).value, 0)

    def summary(self, dry_run: bool, duration: float | None = None) -> dict[str, Any]:
        """Counts only (no lead data): what the operators return. ``total`` is every row read."""
        elapsed = self._clock() - self._started if duration is None else duration
        with self._lock:
            counts = dict(self._counts)
            valid, skipped, duplicates = self._valid, self._skipped, self._duplicates
        total = sum(counts.values()) + valid + skipped + duplicates
        summary: dict[str, Any] = {"total": total, **counts}
        if self.track_skips:
            summary["skipped"] = skipped
        summary["duplicates"] = duplicates
        if dry_run:
            summary["valid"] = valid
        summary["dry_run"] = dry_run
        summary["duration_s"] = round(elapsed, 3)
        return summary

    def raise_if_too_many_failures(
        self,
        max_failure_ratio: float,
        *,
        considered: int | None = None,
        failures: int | None = None,
        name_rows: bool = True,
    ) -> None:
        """Fail when ``(invalid + failed) / considered`` exceeds the ratio, naming the first failures.

        ``considered`` and ``failures`` default to this progress's counts; the SQL transfer passes the
        whole run's (its earlier tries included, from the ledger). ``name_rows`` False: the message
        leaves the rows' keys out (they are lead values), pointing at the WARNING lines that name them.
        The exception travels on to lineage (the FAIL event's ``errorMessage``) and failure callbacks.
        """
        considered = self.considered if considered is None else considered
        failures = self.failures if failures is None else failures
        first = self.first_failures
        if not considered or failures / considered <= max_failure_ratio:
            return
        verdict = (
            f"{failures} of {considered} rows failed ({failures / considered:.1%}), above "
            f"max_failure_ratio={max_failure_ratio}."
        )
        if not name_rows:
            raise AirflowException(
                f"{verdict} The first failures are logged above at WARNING by row key, and every "
                "outcome is in XCom 'outcomes' (the row keys are lead values: not repeated here)."
            )
        lines = "\n".join(f"  {line}" for line in first)
        more = failures - len(first)
        tail = f"\n  ... and {more} more (see the task log and the outcomes)" if more > 0 else ""
        raise AirflowException(f"{verdict} First failures:\n{lines}{tail}")

    def raise_if_unconfirmed(self, unconfirmed: int | None = None, *, where: str) -> None:
        """Fail the task, without an Airflow retry, when any row ended ``unconfirmed``.

        Whatever ``max_failure_ratio`` allows: each such row needs a person (or a check) to decide
        whether the lead is a portal user, and a retry cannot decide it (``RegisterPortalUserOperator``'s
        would send them again with new passwords). ``unconfirmed`` defaults to this progress's count;
        ``where`` says where the rows are recorded. The message names no row.
        """
        unconfirmed = self.unconfirmed if unconfirmed is None else unconfirmed
        if not unconfirmed:
            return
        raise AirflowFailException(
            f"{unconfirmed} rows are unconfirmed: their registration was sent (every attempt with the "
            "same password) and no answer said whether LeadSquared carried it out (a timeout after "
            "sending, a dropped connection, an empty or unreadable answer, a gateway's 502 or 504). "
            "They may be portal users already, so they are not sent again: they are recorded "
            f"'unconfirmed' in {where} and logged above at WARNING by row key. Check each lead in "
            "LeadSquared and resolve it (the provider's docs, operators page, section 'Answers that do "
            "not say what happened': the ledger update to make, or resend_unconfirmed=True). No "
            "retry: a retry cannot confirm them."
        )

    # -- logging ---------------------------------------------------------------------------------

    def line(self, final: bool = False) -> str:
        """One progress line: done/total, rows and calls per second, ETA, failures so far."""
        elapsed = max(self._clock() - self._started, 1e-9)
        done, failures = self.done, self.failures
        with self._lock:
            calls, skipped, duplicates = self._calls, self._skipped, self._duplicates
        parts = []
        if self.total is not None:
            percent = f" ({done / self.total:.0%})" if self.total else ""
            parts.append(f"{done}/{self.total} rows{percent}")
        else:
            parts.append(f"{done} rows")
        parts.append(f"{done / elapsed:.1f} rows/s, {calls / elapsed:.1f} calls/s")
        if not final and self.total is not None and done and self.total > done:
            parts.append(f"ETA {_duration((self.total - done) * elapsed / done)}")
        parts.append(f"{failures} invalid or failed" + ("" if final else " so far"))
        unconfirmed = self.unconfirmed
        if unconfirmed:
            parts.append(f"{unconfirmed} unconfirmed")
        if self.track_skips:
            parts.append(f"{skipped} skipped, {duplicates} duplicates")
        head = f"{self.label}: done in {_duration(elapsed)}" if final else self.label
        return f"{head}: " + ", ".join(parts)

    def log_progress(self, final: bool = False) -> None:
        self.log.info("%s", self.line(final))

    def start(self) -> RegistrationProgress:
        """Start the clock and the thread that logs a line every ``interval`` seconds."""
        self._started = self._clock()
        if self._ticker is None and self.interval > 0:
            self._ticker = threading.Thread(target=self._tick, name="lsq-progress", daemon=True)
            self._ticker.start()
        return self

    def stop(self) -> None:
        """Stop the ticker and log the final line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        self.log_progress(final=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.log_progress()

    def __enter__(self) -> RegistrationProgress:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
