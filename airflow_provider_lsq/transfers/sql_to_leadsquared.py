"""SqlToLeadSquaredPortalOperator: register a warehouse query's rows as portal users, in one task.

Rows stream from the warehouse to LeadSquared inside the task, so applicants' personal data never
passes through XCom or the metadata database; the task returns counts only. A ledger table records
each row key's outcome, which makes reruns and retries safe and cheap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow.providers.common.sql.hooks.sql import DbApiHook

from airflow_provider_lsq.assets import publish_counts
from airflow_provider_lsq.exceptions import LeadSquaredConfigError, WarehouseReadError
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.hooks.payload import (
    UNIQUE_IDENTIFIERS,
    first_identifier,
    is_missing,
    lead_fingerprint,
)
from airflow_provider_lsq.lineage import prepare_transfer_lineage, transfer_lineage
from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.progress import check_failure_ratio
from airflow_provider_lsq.registration_run import OutcomeSink, RegistrationRun, check_lead
from airflow_provider_lsq.transfers.executions import Execution
from airflow_provider_lsq.transfers.ledger import (
    DEFAULT_PENDING_TIMEOUT,
    POSITION_COLUMN,
    UNCONFIRMED,
    LedgerRow,
    RegistrationLedger,
)
from airflow_provider_lsq.version_compat import AirflowFailException, BaseHook, BaseOperator

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from airflow_provider_lsq.registration_run import Row
    from airflow_provider_lsq.version_compat import Context

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


def get_db_hook(conn_id: str, parameter: str) -> DbApiHook:
    """The common-sql hook of connection ``conn_id``, or a clear error naming ``parameter``."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not isinstance(hook, DbApiHook):
        raise AirflowFailException(
            f"{parameter}={conn_id!r}: its hook, {type(hook).__name__}, is not a common-sql DbApiHook "
            "(use a database connection such as postgres or sqlite)."
        )
    return hook


class _SeenKeys:
    """The row keys and leads (their ``lead_identifier`` fingerprints) met so far in this run, in a
    private temporary SQLite file: memory stays flat."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "" = a temporary on-disk database, deleted on close
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, reported INTEGER NOT NULL DEFAULT 0)")
        self._db.execute("CREATE TABLE leads (fingerprint TEXT PRIMARY KEY, key TEXT NOT NULL)")

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was already there."""
        return self._db.execute("INSERT OR IGNORE INTO seen (key) VALUES (?)", (key,)).rowcount == 1

    def add_lead(self, fingerprint: str, key: str) -> str | None:
        """Remember the lead ``fingerprint`` as handed over by row ``key``; the earlier row's key if any."""
        if self._db.execute(
            "INSERT OR IGNORE INTO leads (fingerprint, key) VALUES (?, ?)", (fingerprint, key)
        ).rowcount:
            return None
        first = self._db.execute("SELECT key FROM leads WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return str(first[0])

    def first_report(self, key: str) -> bool:
        """True the first time a duplicate ``key`` is reported."""
        return (
            self._db.execute("UPDATE seen SET reported = 1 WHERE key = ? AND reported = 0", (key,)).rowcount
            == 1
        )

    def close(self) -> None:
        self._db.close()


class SqlToLeadSquaredPortalOperator(BaseOperator):
    """Register the rows of a SQL query as portal users; record each row's outcome in a ledger table.

    Each row maps column names to attribute schema names (alias them in the query, e.g.
    ``email AS "EmailAddress"``: PostgreSQL folds unquoted aliases to lower case). The ledger table is
    created first, so the query may anti-join it. Rows then stream in batches of ``batch_size``
    (a server-side cursor on PostgreSQL), so memory stays flat however large the result:

    - a key the ledger holds as registered (or already registered) is skipped: no call. When the
      ledger is on the query's connection, the database leaves those rows out (the query is wrapped
      in an anti-join on the ledger, see ``docs/operators.md``), so a grown ledger costs nothing;
    - a key recorded as invalid is validated again (the data may have been fixed): no call if still bad;
    - a key recorded as failed is skipped unless the failure was transient (``retryable``) or
      ``retry_failed`` is set; skipped ones are counted (``skipped_failed``) and logged at WARNING.
      A retry of the same run counts its own failed rows again, so it ends the way the first try did;
    - a key recorded as ``unconfirmed`` (its registration was sent and no answer said what happened:
      the lead may be a portal user with the password that call set) is never sent again by a later
      run: it is skipped, counted (``skipped_unconfirmed``) and logged at WARNING by row key, until a
      person resolves it in the ledger (see the troubleshooting guide) or sets ``resend_unconfirmed``.
      Another key of the same lead is not sent either while that holds. A retry of the same run
      counts its own unconfirmed rows again;
    - a key left ``pending`` by an execution of this task that ended (a run or try died with its
      call in flight) is sent again **first**, before the query's other rows, and logged at WARNING;
      one the query no longer returns stays ``pending``, is logged at WARNING by row key and lead id
      and counted (``pending_not_returned``); the task does not fail for it. One another task left is
      sent again when this query meets it;
    - a key ``pending`` for another execution that is still alive (its heartbeat younger than
      ``pending_timeout``) is that execution's: skipped. Executions are told apart by a token per
      ``execute()`` call, so a zombie try and its retry, two tasks of one DAG run, or two mapped
      task instances never send the same row;
    - a key met twice in the query is reported (``duplicates``) and sent once;
    - one lead, one registration: another key of this portal that holds the row's lead (the same
      ``lead_identifier``, a fingerprint of the identifier sent first) as registered makes the row
      ``already_registered`` with that lead id, no call; one holding it ``pending`` for another
      execution (within ``pending_timeout``) makes it skipped; a lead an earlier row of this run
      took makes it a duplicate (``duplicates`` and ``duplicate_leads``), not sent and not recorded this run;
    - a row with a NULL key is invalid (named by its position; it cannot go in the ledger).

    Rows are marked ``pending`` in the ledger just before they are handed over (a few at a time),
    and outcomes are written every ``batch_size`` outcomes or ``flush_interval_seconds``, whichever
    comes first, and whatever stops the task (``on_kill`` included); in an interval with nothing to
    write, the execution's ``pending`` rows get a fresh ``last_attempt_at`` (its heartbeat). The task
    returns counts only and fails when more than ``max_failure_ratio`` of the rows its task instance
    (this try and its earlier tries; not the DAG run's other tasks) recorded are invalid or failed.
    It fails without an Airflow retry (``AirflowFailException``) when any of them is ``unconfirmed``,
    whatever ``max_failure_ratio``: a person must look at those rows, and a retry cannot confirm them.
    Errors no retry can fix (bad keys, no ``portal_id``, unusable columns) raise
    ``AirflowFailException``.

    :param sql: the query (a single SELECT, no trailing statement). Templated; ``.sql`` files work.
    :param sql_conn_id: the warehouse connection (any common-sql database). Templated.
    :param key_column: the column naming each row in the ledger. It is not sent to LeadSquared unless
        ``send_key_column`` is set (for a key that is itself an attribute, e.g. ``mx_Application_Number``).
    :param parameters: parameters of the query, in the driver's style. Templated.
    :param send_key_column: send ``key_column`` as a lead attribute too.
    :param identifier_attribute: the lead's unique identifier, sent first.
    :param only_new_leads: refuse existing leads (``already_registered``) instead of upgrading them.
    :param password_callable: ``callable(lead) -> password``; default a fresh random one per lead.
    :param max_failure_ratio: the share of invalid or failed rows (of those sent) that fails the task.
    :param dry_run: validate and map every row; make no call and write nothing to the ledger (its
        table is still created, so a query that anti-joins it runs).
    :param max_workers: concurrent calls (default: the hook's choice from the rate limit).
    :param leadsquared_conn_id: the LeadSquared connection. Templated.
    :param ledger_table: the ledger table, optionally schema-qualified. Templated.
    :param ledger_conn_id: where the ledger lives (default: ``sql_conn_id``). Templated.
    :param batch_size: rows fetched per batch, and outcomes written to the ledger per transaction.
    :param retry_failed: also retry rows recorded as permanently failed (not ``unconfirmed`` ones).
    :param resend_unconfirmed: send rows recorded ``unconfirmed`` again, with a new password. Only
        after checking that those leads are not portal users, or accepting that a registration resets
        the password an applicant may have set since. Off by default.
    :param flush_interval_seconds: outcomes wait at most this long (seconds) before they are written.
    :param ledger_write_timeout: seconds a ledger write keeps retrying before the task stops and fails.
    :param pending_timeout: how long after its last heartbeat a ``pending`` row of another execution
        is still that execution's (skipped); older, it was left by an execution that died and is sent
        again, first. Default 2 minutes. A live execution refreshes its claims every
        ``flush_interval_seconds``, but its heartbeat can be late by as much as a ledger outage it is
        riding out (``ledger_write_timeout``, 60 s) or a slow warehouse fetch, so the timeout must
        exceed ``ledger_write_timeout + flush_interval_seconds`` (ValueError otherwise). It is
        shorter than Airflow's default ``retry_delay`` (5 minutes), so a retry after a hard kill on
        another machine resends the dead try's rows at once; on the same machine (and PID namespace)
        a holder whose process is gone is known dead without waiting.
    """

    template_fields: Sequence[str] = (
        "sql",
        "parameters",
        "sql_conn_id",
        "ledger_conn_id",
        "ledger_table",
        "leadsquared_conn_id",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql", "parameters": "json"}
    ui_color = "#e8f4fd"
    progress_interval: float = 10.0  # seconds between progress lines in the task log

    def __init__(
        self,
        *,
        sql: str,
        sql_conn_id: str,
        key_column: str,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        send_key_column: bool = False,
        identifier_attribute: str | None = "EmailAddress",
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        max_failure_ratio: float = 0.0,
        dry_run: bool = False,
        max_workers: int | None = None,
        leadsquared_conn_id: str = LeadSquaredHook.default_conn_name,
        ledger_table: str = "lsq_portal_registrations",
        ledger_conn_id: str | None = None,
        batch_size: int = 500,
        retry_failed: bool = False,
        resend_unconfirmed: bool = False,
        flush_interval_seconds: float = 2.0,
        ledger_write_timeout: float = 60.0,
        pending_timeout: dt.timedelta = DEFAULT_PENDING_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        heartbeat_bound = ledger_write_timeout + flush_interval_seconds
        if pending_timeout.total_seconds() <= heartbeat_bound:
            raise ValueError(
                f"pending_timeout ({pending_timeout.total_seconds():g} s) must be longer than "
                f"ledger_write_timeout + flush_interval_seconds ({heartbeat_bound:g} s): a live run's "
                "claims can go that long without a heartbeat, and another run would send them again"
            )
        if not key_column:
            raise ValueError("key_column is required: it names each row in the ledger")
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.key_column = key_column
        self.parameters = parameters
        self.send_key_column = send_key_column
        self.identifier_attribute = identifier_attribute
        self.only_new_leads = only_new_leads
        self.password_callable = password_callable
        self.max_failure_ratio = check_failure_ratio(max_failure_ratio)
        self.is_dry_run = dry_run  # not ``self.dry_run``: that would shadow BaseOperator.dry_run()
        self.max_workers = max_workers
        self.leadsquared_conn_id = leadsquared_conn_id
        self.registration_counts: dict[str, Any] | None = None  # set by execute: lineage reads it
        self.ledger_table = ledger_table
        self.ledger_conn_id = ledger_conn_id
        self.batch_size = batch_size
        self.retry_failed = retry_failed
        self.resend_unconfirmed = resend_unconfirmed
        self.flush_interval_seconds = flush_interval_seconds
        self.ledger_write_timeout = ledger_write_timeout
        self.pending_timeout = pending_timeout
        self._run: RegistrationRun | None = None

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.monotonic()
        self.registration_counts = None  # a retry in the same process: no counts of an earlier try
        # First: a task failing on its checks below still has its lineage (see lineage.py).
        prepare_transfer_lineage(self)
        sql = self.sql.strip().rstrip(";").strip()
        sql_hook = get_db_hook(self.sql_conn_id, "sql_conn_id")
        ledger_hook = get_db_hook(self.ledger_conn_id or self.sql_conn_id, "ledger_conn_id")
        lsq_hook = LeadSquaredHook(leadsquared_conn_id=self.leadsquared_conn_id)
        try:
            portal_id = lsq_hook.config.portal_id
        except LeadSquaredConfigError as error:  # a connection value no retry can fix
            raise AirflowFailException(error.message) from error
        if not portal_id:
            raise AirflowFailException(
                f"Connection {self.leadsquared_conn_id!r} has no portal_id in its extra: the ledger and "
                "the registration need it (Workflow > Manage Portals in LeadSquared, in the page URL)."
            )
        execution = self._execution(context)
        ledger = RegistrationLedger(
            ledger_hook, self.ledger_table, portal_id, write_timeout=self.ledger_write_timeout
        )
        sink = LedgerSink(
            ledger,
            execution,
            pending_timeout=self.pending_timeout,
            keep_interval=self.flush_interval_seconds,
            logger=self.log,
        )
        self._run = run = RegistrationRun.for_operator(
            self, hook=lsq_hook, sink=sink, total=None, track_skips=True, batch_size=self.batch_size
        )
        progress = run.progress
        transfer = _Transfer(self, ledger, sink, run, execution)
        with progress:
            run.execute(lambda: transfer.run(sql_hook, sql, portal_id))
        return run.finish(
            self.is_dry_run,
            time.monotonic() - started,
            self.max_failure_ratio,
            verdict=transfer.verdict,
            unconfirmed_rows=transfer.unconfirmed,
            recorded_in=f"the ledger {self.ledger_table}",
            skipped_failed=transfer.skipped_failed,
            skipped_unconfirmed=transfer.skipped_unconfirmed,
            resent_unconfirmed=transfer.resent_unconfirmed,
            resent_pending=transfer.resent_pending,
            pending_not_returned=transfer.pending_not_returned,
            duplicate_leads=transfer.duplicate_leads,
            from_earlier_tries=transfer.earlier_tries,
            on_summary=lambda summary: publish_counts(self, context, summary),
        )

    def on_kill(self) -> None:
        """Stop taking rows, let the calls in flight finish and record them; return within seconds."""
        if self._run is not None:
            self._run.on_kill()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage (Airflow's OpenLineage provider calls it): see :mod:`airflow_provider_lsq.lineage`."""
        return transfer_lineage(self)

    def _execution(self, context: Context) -> Execution:
        """This ``execute()`` call: its task instance's names and a fresh token (see Execution)."""
        dag_run = context.get("dag_run")
        ti = context.get("ti")
        run_id = context.get("run_id") or getattr(dag_run, "run_id", None) or "manual"
        dag_id = getattr(ti, "dag_id", None) or self.dag_id
        task_id = getattr(ti, "task_id", None) or self.task_id
        map_index = getattr(ti, "map_index", None)
        return Execution(
            dag_id=str(dag_id),
            run_id=str(run_id),
            task_id=str(task_id),
            map_index=map_index if isinstance(map_index, int) else -1,
        )

    def _execute(self, cursor: Any, sql: str) -> None:
        if self.parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, self.parameters)

    def _count(self, conn: Any, sql: str) -> int | None:
        """Rows the query will return, for progress and ETA; None when the database cannot say."""
        cursor = conn.cursor()
        try:
            self._execute(cursor, f"SELECT COUNT(*) FROM ({sql}) lsq_count")
            return int(cursor.fetchone()[0])
        except Exception as error:  # the message may quote data: log its type only
            self.log.info("Could not count the rows first (%s): progress shows no ETA.", type(error).__name__)
            with contextlib.suppress(Exception):
                conn.rollback()  # PostgreSQL: the failed statement aborted the transaction
            return None
        finally:
            with contextlib.suppress(Exception):
                cursor.close()


_LATEST = dt.datetime.max.replace(tzinfo=dt.timezone.utc)


def _plan_for_every_row(conn: Any) -> None:
    """Plan the server-side cursor for reading every row, not the first 10% fast (PostgreSQL's
    ``cursor_tuple_fraction``): the anti-join over a grown ledger is a hash anti-join then, not an index
    probe per row (a third of the time on 1,000,000 rows). For this read's transaction only."""
    cursor = conn.cursor()
    try:
        cursor.execute("SET LOCAL cursor_tuple_fraction = 1.0")
    except Exception:  # a PostgreSQL-like database without the setting: the default plan
        with contextlib.suppress(Exception):
            conn.rollback()
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


class _Keyed(NamedTuple):
    """A keyed row of a batch: its lead and the identifier LeadSquared finds the lead by."""

    key: str
    lead: dict[str, Any]
    attribute: str | None  # the identifier sent first; None when the lead has none
    fingerprint: str | None  # its lead_fingerprint


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
        self.log = logger if logger is not None else logging.getLogger(__name__)  # the task's log
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

    def write(self, outcomes: list[RegistrationOutcome]) -> None:
        with self._lock:
            lost = {o.key for o in outcomes if o.key in self.lost}
            held = list(self.claimed)
        mine = [o for o in outcomes if o.key not in lost]
        identifiers = {o.key: self.identifiers[o.key] for o in mine if o.key in self.identifiers}
        self.ledger.record(
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


class _Transfer:
    """One execution's stream: the query's rows, keyed, checked against the ledger, for the engine."""

    def __init__(
        self,
        op: SqlToLeadSquaredPortalOperator,
        ledger: RegistrationLedger,
        sink: LedgerSink,
        run: RegistrationRun,
        execution: Execution,
    ) -> None:
        self.op = op
        self.log = op.log
        self.ledger = ledger
        self.sink = sink
        self.engine = run
        self.progress = run.progress
        self.execution = execution
        self.run_id = execution.run_id
        self.verdict: tuple[int, int] | None = None  # (considered, failures) of the whole task instance
        self.unconfirmed: int | None = None  # unconfirmed rows of the whole task instance
        self.skipped_unconfirmed = self.resent_unconfirmed = 0
        self.reported_unconfirmed = 0
        self.null_keys = 0
        self.skipped_done = self.skipped_failed = self.earlier_tries = 0
        self.resent_pending = self.pending_elsewhere = self.pending_not_returned = 0
        self.reported_duplicates = self.reported_null = 0
        self.duplicate_leads = self.same_lead = 0  # rows of a lead met earlier in this run / held by a key
        self.reported_duplicate_leads = self.reported_same_lead = 0
        self.filled_identifiers = 0  # registered rows of an earlier release given their lead identifier
        self.rows_read = 0  # rows the query returned, every pass
        # Why the database does not leave the settled rows out (None: it does; see _left_out_settled).
        self.not_left_out: str | None = None
        self.positioned = False  # the query read numbers its rows in a last column (not sent)

    # -- the whole run (in the engine's thread: database connections stay in it) -------------------

    def run(self, sql_hook: DbApiHook, sql: str, portal_id: str) -> None:
        with self.ledger, contextlib.closing(_SeenKeys()) as seen:
            self.ledger.ensure_table()  # first: the query may anti-join it
            orphans = self._pending_rows()
            conn = sql_hook.get_conn()
            cursors: list[Any] = []
            # A named cursor is server-side on psycopg: rows come batch by batch. sqlite3 is lazy.
            is_postgres = self.ledger.dialect == "postgresql" or sql_hook.dialect_name == "postgresql"
            read, counted = self._left_out_settled(sql)

            def query(name: str) -> Any:
                nonlocal read
                if is_postgres:
                    _plan_for_every_row(conn)
                cursor = conn.cursor(name=name) if is_postgres else conn.cursor()
                cursors.append(cursor)
                try:
                    self.op._execute(cursor, read)
                except Exception as error:
                    if read == sql:
                        raise self._read_failed(error, 0) from None
                    self._anti_join_failed(error, conn, cursor)
                    read, self.positioned = sql, False
                    return query(name)
                return cursor

            try:
                self.progress.total = self.op._count(conn, counted)
                self.log.info(
                    "%s rows of %r as portal users of portal %r (%s rows%s; ledger %s on %r).",
                    "Validating (dry run)" if self.op.is_dry_run else "Registering",
                    self.op.sql_conn_id,
                    portal_id,
                    "unknown" if self.progress.total is None else self.progress.total,
                    "" if self.not_left_out else ", those the ledger holds as registered left out",
                    self.op.ledger_table,
                    self.op.ledger_conn_id or self.op.sql_conn_id,
                )
                if self.op.is_dry_run:
                    self.engine.dry_run(self._rows(query("lsq_transfer"), seen))
                    return
                if orphans:
                    remaining = set(orphans)
                    first = self._rows(query("lsq_transfer_pending"), seen, only=remaining)
                    rows = self._pending_first(first, orphans, remaining, query, cursors, seen)
                else:
                    rows = self._rows(query("lsq_transfer"), seen)
                self.engine.register(rows)
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
        op = self.op
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
            self.op.key_column,
        )

    def _run_verdict(self) -> tuple[tuple[int, int], int]:
        """``((considered, failures), unconfirmed)`` over every row this task instance recorded, in
        this try or an earlier one (not the rows of the DAG run's other tasks).

        Read from the ledger, so a retry ends the way the first try did even when the query leaves out
        the rows registered by then (an anti-join on the ledger). Rows without a key count too.
        """
        counts = self.ledger.run_counts(execution=self.execution)
        failures = counts.get("invalid", 0) + counts.get("failed", 0) + self.null_keys
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
        timeout = self.op.pending_timeout
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
                if self.op.is_dry_run
                else "Each is sent again first, if the query still returns it",
            )
        if self.op.is_dry_run:
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
        seen: _SeenKeys,
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
        for row in rows[:MAX_LOGGED_PENDING]:
            self.log.warning("Pending, not returned: row %s, lead id %s", row.row_key, row.lead_id)
        if len(rows) > MAX_LOGGED_PENDING:
            self.log.warning(
                "... and %d more (status 'pending' in the ledger).", len(rows) - MAX_LOGGED_PENDING
            )

    # -- the stream ------------------------------------------------------------------------------

    def _rows(
        self, cursor: Any, seen: _SeenKeys, *, only: set[str] | None = None, skip: set[str] | None = None
    ) -> Iterator[Row]:
        """Rows for the engine, read lazily batch by batch; the columns are checked before any call.

        ``only``: take only rows of these keys, removing each as it is met, and stop once none is
        left. ``skip``: leave out the first row of each of these keys (met by an earlier pass).
        """
        try:
            records = cursor.fetchmany(self.op.batch_size)
        except Exception as error:
            raise self._read_failed(error, 0) from None
        if not records:
            return iter(())
        columns = [str(column[0]) for column in cursor.description]  # psycopg: known after a fetch
        width = None
        if self.positioned and columns[-1].lower() == POSITION_COLUMN:
            columns = columns[:-1]  # the anti-join's numbering: not a lead attribute
            width = len(columns)
        key_index = self._key_index(columns)
        self._check_columns(columns, key_index)
        return self._stream(cursor, records, columns, key_index, seen, only=only, skip=skip, width=width)

    def _stream(
        self,
        cursor: Any,
        records: Sequence[Any],
        columns: list[str],
        key_index: int,
        seen: _SeenKeys,
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
                key = self._key(position, value, seen)
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
                if not self.op.is_dry_run:
                    self.sink.identifiers[item.key] = item.fingerprint  # until its record
                    if previous is not None and not isinstance(decided, RegistrationOutcome):
                        self.sink.known[item.key] = previous  # until its claim or its record
                yield decided
            if only is not None and not only:
                return  # every row wanted is met: the rest of the query is not read
            try:
                records = cursor.fetchmany(self.op.batch_size)
            except Exception as error:
                raise self._read_failed(error, position) from None

    def _read_failed(self, error: Exception, rows_read: int) -> WarehouseReadError:
        """``error`` from the warehouse, logged whole (the task log), as an exception without the
        database's message, which may quote a row's values: see :class:`WarehouseReadError`."""
        self.log.error(
            "Reading the query's rows failed after %d rows: stopping. The database said:",
            rows_read,
            exc_info=error,
        )
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        code = code or getattr(error, "sqlite_errorname", None)
        kind = f"{type(error).__module__}.{type(error).__qualname__}" + (f" ({code})" if code else "")
        return WarehouseReadError(
            f"Reading the rows of the query on {self.op.sql_conn_id!r} failed after {rows_read} rows: "
            f"{kind}. The database's message is in the task log (it may quote a row's values, so "
            "it is not repeated here)."
        )

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
        if missing and not self.op.is_dry_run:
            self.ledger.fill_identifiers(missing)
            self.filled_identifiers += len(missing)
            for key, fingerprint in missing.items():
                holders.setdefault(fingerprint, []).append(replace(known[key], lead_identifier=fingerprint))

    def _keyed(self, key: str, lead: dict[str, Any]) -> _Keyed:
        identifier = first_identifier(lead, self.op.identifier_attribute)
        if identifier is None:
            return _Keyed(key, lead, None, None)
        return _Keyed(key, lead, identifier[0], lead_fingerprint(*identifier))

    def _same_lead(
        self,
        item: _Keyed,
        previous: LedgerRow | None,
        holders: Mapping[str, list[LedgerRow]],
        seen: _SeenKeys,
    ) -> Row | None:
        """The row for the engine once its lead is checked, or None when it is not sent this run.

        - invalid: its ``invalid`` outcome (a duplicate or not, it cannot be sent);
        - its lead was handed over by an earlier row of this run: a duplicate, not recorded this run
          (the next run finds that row's outcome);
        - another key holds the lead as registered (or already registered): ``already_registered``
          with that key's lead id, no call (a call would reset the portal password);
        - another run is sending the lead under another key right now: skipped, like its pending row.
        """
        invalid = check_lead(item.key, item.lead, self.op.identifier_attribute)
        if invalid is not None:
            return invalid
        if item.fingerprint is None or item.attribute is None:
            return item.key, item.lead  # cannot happen for a valid lead: it has an identifier
        first = seen.add_lead(item.fingerprint, item.key)
        if first is not None:
            self.duplicate_leads += 1
            self.progress.add_duplicate()
            if self.reported_duplicate_leads < MAX_LOGGED_KEYS:
                self.reported_duplicate_leads += 1
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
            if self.reported_same_lead < MAX_LOGGED_KEYS:
                self.reported_same_lead += 1
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
        if unconfirmed and not self.op.resend_unconfirmed:
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
        return row.held_by_another(self.execution, self.op.pending_timeout)

    def _wanted(self, key: str, lead: dict[str, Any], previous: LedgerRow | None) -> bool:
        """Whether a row the ledger knows as ``previous`` goes to the engine (validation, maybe a call)."""
        if previous is None:
            return True
        own = previous.written_by(self.execution)  # this task instance: this try or an earlier one
        if previous.status == "invalid" and not own:
            # Invalid in an earlier run: validated again (no call), sent if the data was fixed; still
            # invalid, it is reported like a permanent failure, not counted against this run.
            if check_lead(key, lead, self.op.identifier_attribute) is None:
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
        if own and not (previous.pending or previous.retryable or self.op.retry_failed):
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
        if previous.retryable or self.op.retry_failed:
            return True
        self.skipped_failed += 1
        self.progress.add_skipped()
        return False

    def _wanted_unconfirmed(self, previous: LedgerRow, own: bool) -> bool:
        """An ``unconfirmed`` row: sent again only with ``resend_unconfirmed`` (a person decided). An
        earlier try of this run's counts again, without a call; another run's is skipped."""
        if self.op.resend_unconfirmed:
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
        if self.reported_unconfirmed < MAX_LOGGED_KEYS:
            self.reported_unconfirmed += 1
            self.log.warning(
                "Row key %s is not sent: %s (it was sent and no answer said whether LeadSquared "
                "registered it). Resolve it in the ledger, or set resend_unconfirmed=True.",
                key,
                why,
            )

    def _key_index(self, columns: list[str]) -> int:
        wanted = self.op.key_column
        if wanted in columns:
            return columns.index(wanted)
        folded = [index for index, name in enumerate(columns) if name.lower() == wanted.lower()]
        if len(folded) == 1:
            return folded[0]
        raise AirflowFailException(
            f"key_column {wanted!r} is not a column of the query's result (columns: {', '.join(columns)})."
        )

    def _check_columns(self, columns: list[str], key_index: int) -> None:
        """Fail before any call on a column that names a LeadSquared attribute in the wrong case."""
        known = {name.lower(): name for name in (*STANDARD_ATTRIBUTES, self.op.identifier_attribute or "")}
        for index, column in enumerate(columns):
            if index == key_index and not self.op.send_key_column:
                continue
            meant = known.get(column.lower())
            if meant and column != meant:
                raise AirflowFailException(
                    f"The query's column {column!r} looks like the attribute {meant!r} in the wrong case "
                    f'(found {column}: quote the alias, e.g. AS "{meant}"; PostgreSQL folds unquoted '
                    "names to lower case). Nothing was sent."
                )

    def _key(self, position: int, value: Any, seen: _SeenKeys) -> str | None:
        """The row's key, or None for a row not to send (NULL key, or a duplicate)."""
        if is_missing(value) or not str(value).strip():  # NaN too: no value, not the key 'NaN'
            message = f"column {self.op.key_column!r}: the row key is NULL or empty"
            self.progress.add(RegistrationOutcome.invalid(f"#{position}", message))
            self.null_keys += 1
            if self.reported_null < MAX_LOGGED_KEYS:
                self.reported_null += 1
                self.log.warning("Row #%d of the query has no %s: not sent.", position, self.op.key_column)
            return None
        key = str(value)
        if seen.add(key):
            return key
        self.progress.add_duplicate()
        if seen.first_report(key) and self.reported_duplicates < MAX_LOGGED_KEYS:
            self.reported_duplicates += 1
            self.log.warning("Row key %s appears more than once in the query: sent once.", key)
        return None

    def _lead(self, columns: list[str], key_index: int, record: Sequence[Any]) -> dict[str, Any]:
        return {
            column: value
            for index, (column, value) in enumerate(zip(columns, record, strict=True))
            if index != key_index or self.op.send_key_column
        }

    def _log_skips(self) -> None:
        if self.skipped_done:
            self.log.info("%d rows skipped: the ledger has them registered.", self.skipped_done)
        settled_read = self.skipped_done - self.filled_identifiers  # filled: read once, to fill them
        if settled_read >= self.op.batch_size and settled_read * 2 > self.rows_read:
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
        if self.reported_duplicates >= MAX_LOGGED_KEYS:
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
