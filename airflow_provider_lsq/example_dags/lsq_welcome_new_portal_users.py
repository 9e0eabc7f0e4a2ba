"""Runs whenever ``lsq_register_new_applicants`` has registered portal users: the downstream side.

Scheduled on the portal's asset (``leadsquared://<host>/portal/<id>``, from ``LSQ_PORTAL_HOST`` and
``LSQ_PORTAL_ID`` like the upstream DAG), it reads the counts the registration run put in the asset
event's ``extra`` (``registered``, ``already_registered``, ``invalid``, ``failed``...). A real DAG would
send welcome messages here, reading the new users from the ledger (``status = 'registered'`` and the
upstream ``run_id``) rather than carrying personal data through the event.
"""

from __future__ import annotations

import os
from typing import Any

import pendulum

from airflow_provider_lsq.assets import portal_asset
from airflow_provider_lsq.version_compat import DAG, task

NEW_PORTAL_USERS = portal_asset(
    os.environ.get("LSQ_PORTAL_HOST", "portalapi.leadsquared.com"),
    os.environ.get("LSQ_PORTAL_ID", "your-portal-id"),
)

with DAG(
    dag_id="lsq_welcome_new_portal_users",
    description="Welcome the portal users a registration run created (scheduled on the portal's asset).",
    schedule=[NEW_PORTAL_USERS],
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["leadsquared", "portal", "example"],
    doc_md=__doc__,
) as dag:

    @task
    def welcome(**context: Any) -> dict[str, int]:
        """Sum the counts of the asset events that triggered this run (Airflow 3 and 2.11 names)."""
        events = context.get("triggering_asset_events") or context.get("triggering_dataset_events") or {}
        totals = {"registered": 0, "already_registered": 0, "invalid": 0, "failed": 0}
        for asset_events in events.values():
            for event in asset_events:
                if (event.extra or {}).get("dry_run"):
                    continue  # a dry run registered nobody
                for key in totals:
                    totals[key] += int((event.extra or {}).get(key, 0))
        print(f"{totals['registered']} new portal users to welcome; {totals['failed']} rows failed.")
        return totals

    welcome()
