"""Register new applicants as portal users and, in the same DAG, keep every applicant's lead current.

Two tasks, one after the other, on the same warehouse table:

1. ``register_new_applicants`` (:class:`SqlToLeadSquaredPortalOperator`): applicants the registration
   ledger does not hold yet become portal users (Register sets their portal password, once).
2. ``update_applicant_leads`` (:class:`SqlToLeadSquaredLeadOperator`, ``mode="update"``): every
   applicant's fields (name, mobile, programme, intake, city) go to their lead through the lead API,
   never through Register, so no portal password changes. Only rows whose fields changed since they
   were last sent make a call (its own ledger, ``lsq_lead_sync_ledger``, keeps a fingerprint of the
   fields sent); the lead id comes from the registration ledger for the same ``applicant_id``, else
   the lead is found by e-mail; an applicant with no lead is ``not_found`` (nothing is created). The
   account's lead fields are checked first: a misspelled column fails the task before any call.

It runs after registration even when a few rows failed there (``all_done``): those rows' leads may
still exist and need their fields. A NULL in the warehouse never blanks a field on the lead.

The SQL runs unchanged on SQLite (the demo's warehouse, ``seed_warehouse``) and PostgreSQL.
"""

from __future__ import annotations

import pendulum

from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator
from airflow_provider_lsq.transfers.sql_to_leadsquared_leads import SqlToLeadSquaredLeadOperator
from airflow_provider_lsq.version_compat import DAG, Param

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
CONN_ID = r"^[A-Za-z0-9_.-]+$"

# New applicants: the transfer leaves out those its ledger holds as registered (it wraps the query
# in an anti-join against its ledger itself).
REGISTER_SQL = """
SELECT
    CAST(a.applicant_id AS TEXT) AS applicant_id,
    a.email AS "EmailAddress",
    a.first_name AS "FirstName",
    a.last_name AS "LastName"
FROM {{ params.applicants_table }} AS a
ORDER BY a.applicant_id
"""

# Every applicant's fields, as the lead should hold them (aliases are the account's schema names).
LEAD_FIELDS_SQL = """
SELECT
    CAST(a.applicant_id AS TEXT) AS applicant_id,
    a.email AS "EmailAddress",
    a.first_name AS "FirstName",
    a.last_name AS "LastName",
    a.mobile AS "Mobile",
    a.program AS "mx_Program",
    a.intake AS "mx_Intake",
    a.city AS "mx_City"
FROM {{ params.applicants_table }} AS a
ORDER BY a.applicant_id
"""

with DAG(
    dag_id="lsq_sync_applicants",
    description="Register new applicants as portal users, then keep every applicant's lead current.",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # both tasks share the account's rate limit and the ledgers
    tags=["leadsquared", "portal", "leads", "example"],
    doc_md=__doc__,
    params={
        "warehouse_conn_id": Param("lsq_warehouse", type="string", pattern=CONN_ID),
        "applicants_table": Param("applicants", type="string", pattern=IDENTIFIER),
        "leadsquared_conn_id": Param("leadsquared_default", type="string", pattern=CONN_ID),
    },
) as dag:
    register = SqlToLeadSquaredPortalOperator(
        task_id="register_new_applicants",
        sql=REGISTER_SQL,
        sql_conn_id="{{ params.warehouse_conn_id }}",
        key_column="applicant_id",
        leadsquared_conn_id="{{ params.leadsquared_conn_id }}",
        ledger_table="lsq_portal_registrations",
        max_failure_ratio=0.1,  # a few bad rows stay in the ledger with their reasons
    )
    update = SqlToLeadSquaredLeadOperator(
        task_id="update_applicant_leads",
        sql=LEAD_FIELDS_SQL,
        sql_conn_id="{{ params.warehouse_conn_id }}",
        key_column="applicant_id",
        mode="update",
        leadsquared_conn_id="{{ params.leadsquared_conn_id }}",
        registration_ledger_table="lsq_portal_registrations",
        ledger_table="lsq_lead_sync_ledger",
        max_failure_ratio=0.1,
        trigger_rule="all_done",
    )
    register >> update
