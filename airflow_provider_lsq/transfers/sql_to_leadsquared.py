"""SqlToLeadSquaredPortalOperator: register a warehouse query's rows as portal users, in one task.

Rows stream from the warehouse to LeadSquared inside the task, so applicants' personal data never
passes through XCom or the metadata database; the task returns counts only. A ledger table records
each row key's outcome, which makes reruns and retries safe and cheap.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.engine.run import RegistrationRun
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.lineage import read_transfer_parts, transfer_lineage
from airflow_provider_lsq.operators.base import PortalRegistrationBaseOperator
from airflow_provider_lsq.transfers.executions import Execution
from airflow_provider_lsq.transfers.ledger import (
    DEFAULT_PENDING_TIMEOUT,
    RegistrationLedger,
)
from airflow_provider_lsq.transfers.ledger.sink import LedgerSink
from airflow_provider_lsq.transfers.planner import (
    MAX_LOGGED_KEYS,
    MAX_LOGGED_PENDING,
    STANDARD_ATTRIBUTES,
    RowPlanner,
    TransferSettings,
)
from airflow_provider_lsq.warehouse import get_db_hook, statement_text

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Callable, Mapping, Sequence

    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_lsq.lineage import PreparedLineage
    from airflow_provider_lsq.version_compat import Context

# Names this module had before the planner, the ledger's sink and the warehouse reader moved out.
__all__ = [
    "MAX_LOGGED_KEYS",
    "MAX_LOGGED_PENDING",
    "STANDARD_ATTRIBUTES",
    "LedgerSink",
    "SqlToLeadSquaredPortalOperator",
    "get_db_hook",
]


class SqlToLeadSquaredPortalOperator(PortalRegistrationBaseOperator):
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
      person resolves it in the ledger (see ``docs/operators.md``, "Answers that do not say what
      happened") or sets ``resend_unconfirmed``.
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
    :param preflight: check the query's columns and each row's values against the account's lead
        fields (``LeadsMetaData.Get``, once) before any row is sent, a dry run too; an account whose
        key may not read them logs a WARNING and registers unchecked (see ``docs/preflight.md``).
        Off by default.
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
        preflight: bool = False,
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
        super().__init__(
            identifier_attribute=identifier_attribute,
            only_new_leads=only_new_leads,
            password_callable=password_callable,
            preflight=preflight,
            max_failure_ratio=max_failure_ratio,
            dry_run=dry_run,
            max_workers=max_workers,
            leadsquared_conn_id=leadsquared_conn_id,
            flush_interval_seconds=flush_interval_seconds,
            **kwargs,
        )
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
        self.ledger_table = ledger_table
        self.ledger_conn_id = ledger_conn_id
        self.batch_size = batch_size
        self.retry_failed = retry_failed
        self.resend_unconfirmed = resend_unconfirmed
        self.ledger_write_timeout = ledger_write_timeout
        self.pending_timeout = pending_timeout

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.monotonic()
        # First: a task failing on its checks below still has its lineage (see lineage.py).
        self.start_execution()
        sql = statement_text(self.sql)
        sql_hook = get_db_hook(self.sql_conn_id, "sql_conn_id")
        ledger_hook = get_db_hook(self.ledger_conn_id or self.sql_conn_id, "ledger_conn_id")
        lsq_hook = LeadSquaredHook(leadsquared_conn_id=self.leadsquared_conn_id)
        portal_id = self.require_portal_id(lsq_hook, needed_by="the ledger and the registration need it")
        execution = Execution.of_task(context, self.dag_id, self.task_id)
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
        transfer = RowPlanner(self._planner_settings(), ledger, run, execution, self.log)
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
            on_summary=lambda summary: self.publish_counts(context, summary),
        )

    def read_lineage(self, seconds: float, *, look_up_now: bool) -> PreparedLineage:
        """The query's tables, the ledger table and the portal (see :mod:`airflow_provider_lsq.lineage`)."""
        return read_transfer_parts(self, seconds, look_up_now=look_up_now)

    def operator_lineage(self) -> OperatorLineage | None:
        """Query inputs, ledger and portal outputs, counts."""
        return transfer_lineage(self)

    def _planner_settings(self) -> TransferSettings:
        return TransferSettings(
            sql_conn_id=self.sql_conn_id,
            key_column=self.key_column,
            parameters=self.parameters,
            send_key_column=self.send_key_column,
            identifier_attribute=self.identifier_attribute,
            is_dry_run=self.is_dry_run,
            ledger_table=self.ledger_table,
            ledger_conn_id=self.ledger_conn_id,
            batch_size=self.batch_size,
            retry_failed=self.retry_failed,
            resend_unconfirmed=self.resend_unconfirmed,
            pending_timeout=self.pending_timeout,
        )
