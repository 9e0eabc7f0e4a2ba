"""SqlToLeadSquaredLeadOperator: keep leads' fields in step with a warehouse query, through the lead API.

It never goes through Register (which sets the portal password again): an applicant who is a
portal user keeps the password they have. Rows stream from the warehouse inside the task; a ledger
table of its own records, per row key, the fingerprint of the fields last sent, so a row whose
fields did not change makes no call. See ``docs/lead-updates.md``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq import metrics
from airflow_provider_lsq.engine.lead_sync import MODES, LeadSync
from airflow_provider_lsq.engine.run import RegistrationRun
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.lineage import lead_sync_lineage, read_lead_sync_parts
from airflow_provider_lsq.operators.base import LeadSquaredBaseOperator
from airflow_provider_lsq.outcomes import LEAD_SYNC_STATUSES
from airflow_provider_lsq.transfers.executions import Execution
from airflow_provider_lsq.transfers.lead_planner import LeadPlanner, LeadSyncSettings
from airflow_provider_lsq.transfers.ledger import DEFAULT_PENDING_TIMEOUT
from airflow_provider_lsq.transfers.ledger.lead_sync import (
    DEFAULT_LEAD_LEDGER_TABLE,
    LeadSyncLedger,
    LeadSyncSink,
)
from airflow_provider_lsq.warehouse import get_db_hook

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping, Sequence

    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_lsq.lineage import PreparedLineage
    from airflow_provider_lsq.version_compat import Context


class SqlToLeadSquaredLeadOperator(LeadSquaredBaseOperator):
    """Send the changed rows of a SQL query to their leads (update, upsert or create only).

    Each row maps column names to attribute schema names (alias them, e.g. ``phone AS "Phone"``).
    Before the first call (and in a dry run) the account's lead fields are read once
    (``LeadsMetaData.Get``) and every column is checked: a column no row could be sent with (an
    unknown or misspelled attribute, an identifier the account does not mark unique, a mandatory
    field missing when leads may be created) fails the task before any row is sent, naming the
    column and the closest real field; a value its field cannot hold makes only its row ``invalid``.
    An ``mx_Portal_*`` column fails the task before any call, preflight or not.

    Outcomes, per row key, in the ledger table (``ledger_table``, its own, never the registration
    ledger):

    - ``updated`` / ``created``: sent and accepted; the fingerprint of the fields sent is kept;
    - ``unchanged``: the fields are those last sent for the key: no call (counted, not written);
    - ``exists`` (create only): the lead was there and was left as it is;
    - ``not_found`` (update only): no lead has the row's identifier (or the lead id known for the key
      is gone); none was created. The next run looks again;
    - ``invalid``: the row cannot be sent (no call); ``failed``: LeadSquared refused it, or retries
      ran out (``retryable``: the next run sends it again; for good: only once its fields change, or
      with ``retry_failed``).

    :param sql: the query (a single SELECT). Templated; ``.sql`` files work.
    :param sql_conn_id: the warehouse connection (any common-sql database). Templated.
    :param key_column: the column naming each row in the ledger (not sent unless ``send_key_column``).
        Use the registration transfer's ``key_column`` to take lead ids from its ledger.
    :param mode: ``update`` (default; update only, never create: the lead id from this ledger or the
        registration ledger for the same key, else the lead found by its ``EmailAddress``),
        ``upsert`` (``Lead/Bulk/CreateOrUpdate``, 25 rows a call) or ``create`` (create only).
    :param parameters: parameters of the query, in the driver's style. Templated.
    :param send_key_column: send ``key_column`` as a lead attribute too.
    :param identifier_attribute: the unique field the lead is found by, sent first.
    :param blank_null_fields: False (default): a NULL column leaves its field as LeadSquared has it;
        True: every NULL column blanks its field; a list of attributes: those only.
    :param preflight: check the columns and values against the account's lead fields first. A run
        that cannot read them fails (set False for a key that may not call ``LeadsMetaData.Get``).
    :param registration_ledger_table: the registration ledger to take lead ids from (same key, the
        connection's portal), on ``ledger_conn_id``; None: none. Absent tables are fine.
    :param ledger_table: this operator's ledger table (default ``lsq_lead_sync_ledger``). Templated.
    :param ledger_conn_id: where both ledgers live (default: ``sql_conn_id``). Templated.
    :param batch_size: rows fetched per batch, and outcomes written per ledger transaction.
    :param retry_failed: send rows refused for good again, even with the same fields.
    :param max_failure_ratio: the share of invalid or failed rows (of those considered) that fails the task.
    :param dry_run: check every row (preflight included) and count what would be sent; no lead call,
        no ledger write (the table is still created). Its summary has ``would_update``,
        ``would_create`` and ``would_upsert`` (upsert rows whose lead id is not known).

    Stops, claims and retries work as for ``SqlToLeadSquaredPortalOperator``: rows are claimed
    (``pending``) just before their calls; ``on_kill`` lets the calls in flight finish and records
    every outcome; a row left ``pending`` by an execution that died is sent again (an update is safe
    to send twice).
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
    progress_label = "LeadSquared lead update"
    outcome_statuses = LEAD_SYNC_STATUSES
    outcome_metric = staticmethod(metrics.lead_update)

    def __init__(
        self,
        *,
        sql: str,
        sql_conn_id: str,
        key_column: str,
        mode: str = "update",
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        send_key_column: bool = False,
        identifier_attribute: str | None = "EmailAddress",
        blank_null_fields: bool | Sequence[str] = False,
        preflight: bool = True,
        registration_ledger_table: str | None = "lsq_portal_registrations",
        ledger_table: str = DEFAULT_LEAD_LEDGER_TABLE,
        ledger_conn_id: str | None = None,
        batch_size: int = 500,
        retry_failed: bool = False,
        max_failure_ratio: float = 0.0,
        dry_run: bool = False,
        max_workers: int | None = None,
        leadsquared_conn_id: str = LeadSquaredHook.default_conn_name,
        flush_interval_seconds: float = 2.0,
        ledger_write_timeout: float = 60.0,
        pending_timeout: dt.timedelta = DEFAULT_PENDING_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            identifier_attribute=identifier_attribute,
            max_failure_ratio=max_failure_ratio,
            dry_run=dry_run,
            max_workers=max_workers,
            leadsquared_conn_id=leadsquared_conn_id,
            flush_interval_seconds=flush_interval_seconds,
            **kwargs,
        )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not key_column:
            raise ValueError("key_column is required: it names each row in the ledger")
        if pending_timeout.total_seconds() <= ledger_write_timeout + flush_interval_seconds:
            raise ValueError(
                "pending_timeout must be longer than ledger_write_timeout + flush_interval_seconds"
            )
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.key_column = key_column
        self.mode = mode
        self.parameters = parameters
        self.send_key_column = send_key_column
        self.blank_null_fields = blank_null_fields
        self.preflight = preflight
        self.registration_ledger_table = registration_ledger_table
        self.ledger_table = ledger_table
        self.ledger_conn_id = ledger_conn_id
        self.batch_size = batch_size
        self.retry_failed = retry_failed
        self.ledger_write_timeout = ledger_write_timeout
        self.pending_timeout = pending_timeout
        self._operation: LeadSync | None = None

    def row_operation(self) -> LeadSync:
        """The lead-API call of ``mode`` per row (bulk for upsert): :mod:`.engine.lead_sync`."""
        if self._operation is None:
            self._operation = LeadSync(
                mode=self.mode,
                identifier_attribute=self.identifier_attribute,
                blank_null_fields=self.blank_null_fields,
                preflight=self.preflight,
            )
        return self._operation

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.monotonic()
        self.start_execution()
        self._operation = None  # a fresh operation (and preflight) per execution
        sql = self.sql.strip().rstrip(";").strip()
        sql_hook = get_db_hook(self.sql_conn_id, "sql_conn_id")
        ledger_hook = get_db_hook(self.ledger_conn_id or self.sql_conn_id, "ledger_conn_id")
        lsq_hook = LeadSquaredHook(leadsquared_conn_id=self.leadsquared_conn_id)
        config = self.connection_config(lsq_hook)
        portal_id = config.portal_id or None
        # The ledger's account: the portal when the connection names one (the registration
        # ledger's key too), else the lead API host (one account per connection).
        account = portal_id or config.lead_api_url
        execution = Execution.of_task(context, self.dag_id, self.task_id)
        ledger = LeadSyncLedger(
            ledger_hook, self.ledger_table, account, write_timeout=self.ledger_write_timeout
        )
        sink = LeadSyncSink(
            ledger,
            execution,
            pending_timeout=self.pending_timeout,
            keep_interval=self.flush_interval_seconds,
            logger=self.log,
        )
        self._run = run = RegistrationRun.for_operator(
            self, hook=lsq_hook, sink=sink, total=None, track_skips=True, batch_size=self.batch_size
        )
        planner = LeadPlanner(self._settings(), ledger, run, self.row_operation(), execution, self.log)
        with run.progress:
            run.execute(lambda: planner.run(sql_hook, sql, ledger_hook, portal_id))
        return run.finish(
            self.is_dry_run,
            time.monotonic() - started,
            self.max_failure_ratio,
            recorded_in=f"the ledger {self.ledger_table}",
            on_summary=lambda summary: self.publish_counts(context, summary),
            **planner.extra_counts(),
        )

    def publish_counts(self, context: Context, summary: Mapping[str, Any]) -> None:
        """The run's counts for its lineage (counts only). No portal asset event: no portal changed."""
        self.registration_counts = {key: value for key, value in summary.items() if key != "duration_s"}

    def read_lineage(self, seconds: float, *, look_up_now: bool) -> PreparedLineage:
        """The query's tables, the ledger table and the account's leads."""
        return read_lead_sync_parts(self, seconds, look_up_now=look_up_now)

    def operator_lineage(self) -> OperatorLineage | None:
        """Query inputs; ledger and leads outputs."""
        return lead_sync_lineage(self)

    def _settings(self) -> LeadSyncSettings:
        return LeadSyncSettings(
            sql_conn_id=self.sql_conn_id,
            key_column=self.key_column,
            parameters=self.parameters,
            send_key_column=self.send_key_column,
            is_dry_run=self.is_dry_run,
            batch_size=self.batch_size,
            mode=self.mode,
            registration_ledger_table=self.registration_ledger_table,
            retry_failed=self.retry_failed,
            pending_timeout=self.pending_timeout,
        )
