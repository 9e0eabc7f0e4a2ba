"""Register each day's new applicants from the warehouse as LeadSquared portal users.

One task: :class:`SqlToLeadSquaredPortalOperator` runs the query below against the warehouse and
registers every row it returns, at the account's rate limit, recording each row's outcome in a ledger
table next to the applicants. The query leaves out applicants the ledger already holds as registered, so
a re-run (or an overlapping ``lookback_days``) never registers anyone twice, and a row that failed is
picked up again by a later run.

The window ends at the run's ``data_interval_end``. It starts ``lookback_days`` earlier (with
``lookback_days=1``, exactly the daily interval), or further back, at the end of the last successful
run's interval, when that is earlier: a failed run, a day the DAG was paused or a run skipped with
``catchup=False`` leaves no applicant behind. Larger ``lookback_days`` re-scan earlier days for rows
loaded late. Trigger with ``{"lookback_days": 7}`` to catch up a week.

A manual run on Airflow 3 has no data interval: its window is ``[run_after - lookback_days,
run_after)``, the days up to the moment it was triggered. It is an extra pass and never moves the mark
that scheduled runs continue from (Airflow 3 gives a run without a logical date no place among the
previous successful runs), so no applicant can fall between manual and scheduled runs; whoever both
cover is registered once, by whichever runs first (the ledger leaves them out of the other). On Airflow
2.11 a manual run gets the data interval of the last complete day and behaves like a scheduled run.

Seen from the outside: the task's outlet is the portal's asset (``leadsquared://<host>/portal/<id>``,
from ``LSQ_PORTAL_HOST`` and ``LSQ_PORTAL_ID``, which should match the connection), so each successful
run records an asset event whose ``extra`` holds the run's counts, and
``lsq_welcome_new_portal_users`` runs on it. When the task fails, ``FAILURE_EMAIL`` mails how many of
the run's rows failed or are unconfirmed (sent, and no answer said whether LeadSquared registered
them: a person must check those) and the ledger query that lists them, never a lead's data (set
``LSQ_ALERT_EMAIL`` and an ``smtp_default`` connection). With Airflow's OpenLineage provider
installed, the run also reports its lineage; with ``[metrics]`` on, the provider's metrics. See
docs/observability.md.

The SQL runs unchanged on SQLite and PostgreSQL: ``created_at`` is UTC (text ``YYYY-MM-DD HH:MM:SS`` in
SQLite, ``TIMESTAMP`` in PostgreSQL) and is compared with literals rendered in that same format.
Columns are aliased to LeadSquared attribute schema names, quoted so PostgreSQL keeps their case; NULLs
are left out of the call, so an empty column never blanks a field on an existing lead.
"""

from __future__ import annotations

import os
from typing import Any

import pendulum
from airflow.providers.smtp.notifications.smtp import SmtpNotifier

from airflow_provider_lsq.assets import portal_asset
from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator
from airflow_provider_lsq.version_compat import DAG, BaseHook, Param

# Table names and connection ids go into SQL and templates: accept plain identifiers only.
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
CONN_ID = r"^[A-Za-z0-9_.-]+$"

# The window (see the module docstring). ``data_interval_end`` is None on an Airflow 3 manual run (no
# logical date); ``prev_data_interval_end_success`` is None on a first run and on such a manual run.
# Airflow hands every time over in UTC. The ledger is keyed by portal: the anti-join only trusts
# registrations on this connection's portal. (The operator checks the ledger again before each call;
# the anti-join just saves reading the rows.)
NEW_APPLICANTS_SQL = """
{%- set scheduled = data_interval_end is defined and data_interval_end -%}
{%- set window_end = data_interval_end if scheduled else dag_run.run_after -%}
{%- set window_start = window_end - macros.timedelta(days=params.lookback_days | int) -%}
{%- set previous_end = prev_data_interval_end_success if scheduled
      and prev_data_interval_end_success is defined else None -%}
{%- if previous_end and previous_end < window_start -%}
{%- set window_start = previous_end -%}
{%- endif -%}
{%- set lsq = conn.get(params.leadsquared_conn_id).extra_dejson -%}
{%- set portal_id = lsq.get("portal_id") or lsq.get("extra__leadsquared__portal_id") or "" -%}
-- Applicants created in [{{ window_start }}, {{ window_end }}) not yet registered on the portal.
SELECT
    CAST(a.applicant_id AS TEXT) AS applicant_id,
    a.email AS "EmailAddress",
    a.first_name AS "FirstName",
    a.last_name AS "LastName",
    a.mobile AS "Mobile",
    a.program AS "mx_Program",
    a.intake AS "mx_Intake",
    a.city AS "mx_City",
    a.application_number AS "mx_Application_Number",
    a.extra_attribute AS "mx_Favourite_Colour"
FROM {{ params.applicants_table }} AS a
WHERE a.created_at >= '{{ window_start.strftime("%Y-%m-%d %H:%M:%S") }}'
  AND a.created_at < '{{ window_end.strftime("%Y-%m-%d %H:%M:%S") }}'
  AND NOT EXISTS (
      SELECT 1
      FROM {{ params.ledger_table }} AS l
      WHERE l.portal_id = '{{ portal_id | string | replace("'", "''") }}'
        AND l.row_key = CAST(a.applicant_id AS TEXT)
        AND l.status IN ('registered', 'already_registered')
  )
ORDER BY a.applicant_id
"""

# The portal this DAG registers users on, as an asset: downstream DAGs are scheduled on it.
NEW_PORTAL_USERS = portal_asset(
    os.environ.get("LSQ_PORTAL_HOST", "portalapi.leadsquared.com"),
    os.environ.get("LSQ_PORTAL_ID", "your-portal-id"),
)

# What the failure email lists: the failed task's outcomes from the ledger (its rows only: not other
# DAGs' runs with the same run id, nor the run's other tasks), counts only.
FAILED_ROWS_SQL = (
    "SELECT row_key, status, error_type, error_message FROM {table} "
    "WHERE dag_id = '{dag_id}' AND run_id = '{run_id}' AND task_id = '{task_id}' "
    "AND status IN ('failed', 'invalid', 'unconfirmed') ORDER BY row_key"
)


def ledger_counts(conn_id: str, table: str, dag_id: str, run_id: str, task_id: str) -> dict[str, int] | None:
    """The task's rows in the ledger by status, for this run (a template macro of the failure email);
    None when the ledger cannot be read (the task failed before creating it, or the warehouse is down)."""
    try:
        hook = BaseHook.get_connection(conn_id).get_hook()
        mark = hook.placeholder
        sql = (
            f"SELECT status, COUNT(*) FROM {table} WHERE dag_id = {mark} AND run_id = {mark} "
            f"AND task_id = {mark} GROUP BY status"
        )
        rows = hook.get_records(sql, parameters=(dag_id, run_id, task_id))
    except Exception as error:  # the email must still go out, saying why it has no counts
        print(f"The ledger could not be read: {type(error).__name__}")
        return None
    return {str(status): int(count) for status, count in rows}


def failed_rows_sql(table: str, dag_id: str, run_id: str, task_id: str) -> str:
    """The ledger query listing the task's failed, invalid and unconfirmed rows of this run (a template
    macro)."""

    def quoted(text: str) -> str:
        return text.replace("'", "''")

    return FAILED_ROWS_SQL.format(
        table=table, dag_id=quoted(dag_id), run_id=quoted(run_id), task_id=quoted(task_id)
    )


FAILURE_EMAIL = SmtpNotifier(
    to=os.environ.get("LSQ_ALERT_EMAIL", "data-team@example.com"),
    # The connection's from_email, given here: the SMTP provider of Airflow 2.11.0's constraints (2.1.0)
    # reads it from a connection it has not loaded yet, and then sends nothing. Empty when the extra has
    # none, so that the provider's own check says so (a rendered None would be mailed "From: None").
    from_email="{{ conn.smtp_default.extra_dejson.get('from_email') or '' }}",
    subject="LeadSquared registration failed: {{ dag.dag_id }} {{ run_id }}",
    html_content="""
{%- set counts = ledger_counts(
      params.warehouse_conn_id, params.ledger_table, dag.dag_id, run_id, ti.task_id) -%}
<p>{{ ti.task_id }} in {{ dag.dag_id }} (run {{ run_id }}) failed.</p>
{% if counts is none -%}
<p>The ledger could not be read: the task log says why the run stopped.</p>
<p>Once it can be read, this query lists the run's failed rows, if any, in {{ params.warehouse_conn_id }}:</p>
<pre>{{ failed_rows_sql(params.ledger_table, dag.dag_id, run_id, ti.task_id) }}</pre>
{%- elif counts.get("failed", 0) + counts.get("invalid", 0) + counts.get("unconfirmed", 0) == 0 -%}
<p>No row of this run is recorded as failed ({{ counts.get("registered", 0) }} registered in this run):
the task stopped for another reason, which its log gives (a refused connection, the warehouse, a stop).</p>
{%- else -%}
{%- if counts.get("unconfirmed", 0) %}
<p><b>{{ counts.get("unconfirmed", 0) }} rows are unconfirmed</b>: their registration was sent and no
answer said whether LeadSquared carried it out. They may be portal users already; no run sends them
again until a person checks each lead in LeadSquared and updates its ledger row (status 'registered'
if it is a portal user, 'failed' with retryable true if not), or a run sets resend_unconfirmed=True.</p>
{%- endif %}
{%- if counts.get("failed", 0) + counts.get("invalid", 0) %}
<p>{{ counts.get("failed", 0) + counts.get("invalid", 0) }} rows failed
({{ counts.get("failed", 0) }} failed, {{ counts.get("invalid", 0) }} invalid,
{{ counts.get("registered", 0) }} registered in this run).</p>
{%- else %}
<p>No row failed ({{ counts.get("registered", 0) }} registered in this run).</p>
{%- endif %}
<p>The ledger lists them, with the reason for each, in {{ params.warehouse_conn_id }}:</p>
<pre>{{ failed_rows_sql(params.ledger_table, dag.dag_id, run_id, ti.task_id) }}</pre>
{%- endif %}
<p>Fix the cause (the rows or the connection) and clear the task: the ledger keeps everyone registered
once.</p>
""",
)


def send_failure_email(context: Any) -> None:
    """``FAILURE_EMAIL``, when an ``smtp_default`` connection exists. Without one (the demo, a
    development machine) the email cannot go anywhere, and rendering it would only bury the task's own
    error under the notifier's traceback: say so in one line instead."""
    try:
        BaseHook.get_connection("smtp_default")
    except Exception:  # AirflowNotFoundException, whose module differs between Airflow versions
        print("No smtp_default connection: the failure email is not sent.")
        return
    FAILURE_EMAIL(context)


with DAG(
    dag_id="lsq_register_new_applicants",
    description="Register the day's new applicants from the warehouse as LeadSquared portal users.",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs share the account's rate limit and the ledger: one at a time
    tags=["leadsquared", "portal", "example"],
    doc_md=__doc__,
    user_defined_macros={"ledger_counts": ledger_counts, "failed_rows_sql": failed_rows_sql},
    params={
        "warehouse_conn_id": Param(
            "lsq_warehouse", type="string", pattern=CONN_ID, description="SQL connection of the warehouse."
        ),
        "applicants_table": Param(
            "applicants", type="string", pattern=IDENTIFIER, description="Table of applicants to register."
        ),
        "ledger_table": Param(
            "lsq_portal_registrations",
            type="string",
            pattern=IDENTIFIER,
            description="Ledger of registrations, created in the warehouse on the first run.",
        ),
        "leadsquared_conn_id": Param(
            "leadsquared_default", type="string", pattern=CONN_ID, description="LeadSquared connection."
        ),
        "lookback_days": Param(
            1,
            type="integer",
            minimum=1,
            maximum=366,
            description=(
                "Days before the interval's end to scan at least; 1 is exactly the daily interval. "
                "A scheduled run also reaches back to where the last successful run ended."
            ),
        ),
    },
) as dag:
    SqlToLeadSquaredPortalOperator(
        task_id="register_new_applicants",
        sql=NEW_APPLICANTS_SQL,
        sql_conn_id="{{ params.warehouse_conn_id }}",
        key_column="applicant_id",
        identifier_attribute="EmailAddress",
        leadsquared_conn_id="{{ params.leadsquared_conn_id }}",
        ledger_table="{{ params.ledger_table }}",
        # A few bad rows (no email, an attribute the account lacks) must not fail the day: they stay in
        # the ledger with their reasons. A systemic failure (more than 1 row in 10) fails the task.
        max_failure_ratio=0.1,
        outlets=[NEW_PORTAL_USERS],  # a successful run records an asset event with its counts
        on_failure_callback=send_failure_email,
    )
