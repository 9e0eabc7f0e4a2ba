"""``lsq_sync_applicants`` end to end with ``dag.test()`` against the sandbox, on SQLite and PostgreSQL:
new applicants registered, then every lead's fields kept current, no portal password changed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.example_dags import seed_warehouse
from tests import test_dags
from tests.test_dags import return_value, run_dag, task_state

if TYPE_CHECKING:
    from pathlib import Path

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.test_dags import Warehouse

SYNC = "lsq_sync_applicants"
dagbag = test_dags.dagbag  # the fixtures: a fresh DagBag, a fast sandbox, a seeded warehouse
sandbox = test_dags.sandbox
warehouse = test_dags.warehouse


def test_sync_registers_then_updates_leads_without_touching_passwords(
    airflow_db: Path, dagbag: Any, sandbox: Sandbox, warehouse: Warehouse
) -> None:
    warehouse.execute("DROP TABLE IF EXISTS lsq_lead_sync_ledger")  # PostgreSQL lives for the session
    dag = dagbag.dags[SYNC]
    dag_run = run_dag(dag)
    assert str(dag_run.state) == "success", (
        task_state(dag_run, "register_new_applicants"),
        task_state(dag_run, "update_applicant_leads"),
    )
    registered = return_value(dag_run, "register_new_applicants")["registered"]
    first = return_value(dag_run, "update_applicant_leads")
    assert registered > 100
    # Every lead is sent once (the lead-update ledger was empty): the applicant without an e-mail is
    # invalid; the second application sharing an e-mail is the same lead as the first (one lead, one
    # update per run: it would overwrite the first applicant's fields), a duplicate, not sent; none is
    # created.
    assert first["invalid"] == 1 and first["not_found"] == 0 and first["created"] == 0
    assert first["duplicates"] == 1 and first["duplicate_leads"] == 1
    assert first["updated"] == 150 - 1 - 1
    hashes = {lead.lead_id: (lead.password_sha256, lead.registrations) for lead in sandbox.leads}
    register_calls = sandbox.register_calls

    warehouse.execute("UPDATE applicants SET city = 'Nagpur' WHERE applicant_id IN (10, 11)")
    sandbox.reset_calls()
    dag_run = run_dag(dag)
    assert str(dag_run.state) == "success"
    second = return_value(dag_run, "update_applicant_leads")
    assert second["updated"] == 2 and second["unchanged"] == 150 - 1 - 1 - 2
    assert second["duplicate_leads"] == 1  # not recorded, so met again, and again not sent
    update_calls = [c for c in sandbox.calls if "Lead.Update" in c.path]
    assert len(update_calls) == 2  # none for the unchanged rows
    assert sandbox.register_calls == 0 and register_calls > 0
    emails = {row[0]: row[1] for row in warehouse.query("SELECT applicant_id, email FROM applicants")}
    lead = sandbox.find_lead("EmailAddress", emails[10])
    assert lead is not None and lead.fields["mx_City"] == "Nagpur"
    for lead in sandbox.leads:
        assert (lead.password_sha256, lead.registrations) == hashes[lead.lead_id]
    assert seed_warehouse.NO_EMAIL_ID not in (10, 11)
