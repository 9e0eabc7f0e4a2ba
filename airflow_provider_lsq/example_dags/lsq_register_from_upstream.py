"""Register leads produced by an upstream task: the pattern for leads that do not live in a table.

``collect_signups`` stands for any source (an API, a file, a form export): it cleans the raw sign-ups
and returns lead dicts keyed by LeadSquared attribute schema names. ``RegisterPortalUserOperator`` takes
that output as an XComArg, registers each lead and pushes the per-lead outcomes under the XCom key
``outcomes``; ``report`` reads them back.

Trigger it with your own sign-ups: ``{"signups": [{"email": "...", "name": "First Last", ...}]}``.
"""

from __future__ import annotations

from typing import Any

import pendulum

from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from airflow_provider_lsq.version_compat import DAG, Param, task

DEFAULT_SIGNUPS = [
    {"email": " Zoe.Fairweather@Example.edu ", "name": "Zoë Fairweather", "city": "Zürich", "consent": True},
    {"email": "jose.alvarez@example.edu", "name": "José Álvarez", "city": "São Paulo", "consent": True},
    {"email": "ananya.rao@example.edu", "name": "Ananyā Rao", "city": "Bengaluru", "consent": True},
    {"email": "soren.dahl@example.edu", "name": "Søren Dahl", "city": "Aarhus", "consent": False},
    {"email": "li.wei@example.edu", "name": "李 伟", "city": "Singapore", "consent": True},
]

with DAG(
    dag_id="lsq_register_from_upstream",
    description="Register portal users from an upstream task's output (an XComArg).",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["leadsquared", "portal", "example"],
    doc_md=__doc__,
    params={
        "signups": Param(DEFAULT_SIGNUPS, type="array", description="Raw sign-ups to register."),
        "program": Param("Open Day 2026", type="string", description="Sent as mx_Program."),
        "leadsquared_conn_id": Param("leadsquared_default", type="string"),
    },
) as dag:

    @task
    def collect_signups(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Clean raw sign-ups into lead dicts: consented, one per email, attribute names as keys."""
        leads: dict[str, dict[str, Any]] = {}
        for signup in (params or {}).get("signups", []):
            email = str(signup.get("email") or "").strip().lower()
            if not email or not signup.get("consent"):
                continue
            first, _, last = str(signup.get("name") or "").strip().partition(" ")
            leads[email] = {
                "EmailAddress": email,
                "FirstName": first or None,
                "LastName": last or None,
                "mx_City": signup.get("city"),
                "mx_Program": (params or {}).get("program"),
            }
        return list(leads.values())

    @task
    def report(summary: dict[str, Any], ti: Any = None) -> dict[str, Any]:
        """Log each lead's outcome (pushed by the register task under the XCom key "outcomes")."""
        outcomes = ti.xcom_pull(task_ids="register_portal_users", key="outcomes") or []
        for outcome in outcomes:
            detail = outcome.get("lead_id") or outcome.get("error_message")
            print(f"{outcome['key']}: {outcome['status']} {detail}")
        return summary

    register = RegisterPortalUserOperator(
        task_id="register_portal_users",
        leads=collect_signups(),
        identifier_attribute="EmailAddress",
        key_field="EmailAddress",
        leadsquared_conn_id="{{ params.leadsquared_conn_id }}",
        max_failure_ratio=0.0,
    )
    report(register.output)  # type: ignore[arg-type]  # the XComArg is the summary dict at run time
