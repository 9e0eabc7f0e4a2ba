"""RegisterPortalUserOperator against the sandbox over real HTTP."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from airflow_provider_lsq.version_compat import AirflowException
from tests.helpers import (
    RecordingPasswords,
    assert_no_secret,
    dag_test,
    named_sandbox_secrets,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

AIRFLOW_3 = int(version("apache-airflow").split(".")[0]) >= 3
FAST = {"rate_limit_calls": 100, "rate_limit_period": 1.0}


class FakeTI:
    dag_id = "lsq_operator_test"

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def run(op: RegisterPortalUserOperator) -> tuple[dict[str, Any], dict[str, dict[str, Any]], FakeTI]:
    """Execute; return the summary, the outcomes by key, and the fake task instance."""
    ti = FakeTI()
    summary = op.execute({"ti": ti, "run_id": "manual__1"})  # type: ignore[arg-type]
    return summary, {o["key"]: o for o in ti.xcom["outcomes"]}, ti


def lead(i: int, **extra: Any) -> dict[str, Any]:
    return {"EmailAddress": f"student{i}@example.edu", "FirstName": f"Student{i}", **extra}


@pytest.fixture
def sb(leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sandbox = leadsquared_sandbox_factory(**FAST)
    conn = json.loads(sandbox.connection_json())
    conn["extra"]["retry_wait_seconds"] = 0.01
    monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
    return sandbox


def test_registers_each_lead_and_pushes_outcomes(sb: Sandbox) -> None:
    leads = [lead(i) for i in range(1, 9)]
    summary, outcomes, _ = run(RegisterPortalUserOperator(task_id="register", leads=leads))

    assert summary["registered"] == 8
    assert summary["total"] == 8
    assert summary["dry_run"] is False
    assert set(summary) == {
        "total", "registered", "already_registered", "invalid", "failed", "unconfirmed", "duplicates",
        "dry_run",
        "duration_s",
    }  # fmt: skip
    assert summary["duplicates"] == 0
    for i in range(1, 9):
        key = f"student{i}@example.edu"  # the default key: the identifier attribute
        found = sb.find_lead("EmailAddress", key)
        assert found is not None and found.portal_user
        assert outcomes[key]["status"] == "registered"
        assert outcomes[key]["lead_id"] == found.lead_id


def test_invalid_rows_name_their_field(sb: Sandbox) -> None:
    leads = [
        lead(1),
        {"FirstName": "NoEmail", "mx_Application_Number": "A-2"},
        lead(3, **{"First Name": "x"}),
        lead(4, mx_Portal_Password="nope"),
        "not a dict",
    ]
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, key_field="FirstName", max_failure_ratio=1.0
    )
    summary, outcomes, _ = run(op)

    assert summary["registered"] == 1
    assert summary["invalid"] == 4
    assert "'EmailAddress'" in outcomes["NoEmail"]["error_message"]
    assert "'First Name'" in outcomes["Student3"]["error_message"]
    assert "'mx_Portal_Password'" in outcomes["Student4"]["error_message"]
    assert outcomes["#5"]["status"] == "invalid"
    assert sb.register_calls == 1


def test_a_row_without_its_key_field_is_invalid_naming_the_field(sb: Sandbox) -> None:
    leads = [lead(1, mx_Application_Number="A-1"), lead(2)]
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, key_field="mx_Application_Number", max_failure_ratio=1.0
    )
    summary, outcomes, _ = run(op)

    assert outcomes["A-1"]["status"] == "registered"
    assert outcomes["#2"]["status"] == "invalid"
    assert "'mx_Application_Number'" in outcomes["#2"]["error_message"]
    assert summary["invalid"] == 1
    assert sb.register_calls == 1


def test_only_new_leads_reports_existing_leads_as_already_registered(sb: Sandbox) -> None:
    sb.add_lead({"EmailAddress": "student2@example.edu"})
    op = RegisterPortalUserOperator(task_id="register", leads=[lead(1), lead(2)], only_new_leads=True)
    summary, outcomes, _ = run(op)

    assert summary["already_registered"] == 1 and summary["registered"] == 1
    assert outcomes["student2@example.edu"]["status"] == "already_registered"
    existing = sb.find_lead("EmailAddress", "student2@example.edu")
    assert existing is not None and not existing.portal_user


def test_dry_run_validates_every_row_and_makes_no_call(sb: Sandbox) -> None:
    leads = [lead(1), {"FirstName": "NoEmail"}, lead(3)]
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, key_field="FirstName", dry_run=True, max_failure_ratio=0.5
    )
    summary, outcomes, _ = run(op)

    assert sb.calls == []
    assert summary["valid"] == 2 and summary["invalid"] == 1 and summary["registered"] == 0
    assert summary["dry_run"] is True
    assert outcomes["Student1"]["status"] == "valid"
    assert outcomes["NoEmail"]["status"] == "invalid"
    assert "'EmailAddress'" in outcomes["NoEmail"]["error_message"]


def test_dry_run_needs_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", raising=False)
    summary, _, _ = run(RegisterPortalUserOperator(task_id="register", leads=[lead(1)], dry_run=True))
    assert summary["valid"] == 1


def test_too_many_failures_fail_the_task_after_pushing_outcomes(sb: Sandbox, task_log: TaskLog) -> None:
    leads = [lead(1), lead(2, mx_Favourite_Colour="teal"), {"FirstName": "x", "Phone": None}]
    op = RegisterPortalUserOperator(task_id="register", leads=leads, key_field="FirstName")
    ti = FakeTI()
    with pytest.raises(AirflowException) as info:
        op.execute({"ti": ti, "run_id": "manual__1"})  # type: ignore[arg-type]

    message = str(info.value)
    assert "2 of 3 rows failed" in message
    # The keys are lead values: the task log names the rows, the exception (lineage, callbacks) not.
    assert "Student" not in message and "row x" not in message
    assert "logged above at WARNING by row key" in message
    assert "row Student2: MXInvalidAttributeException:" in task_log()
    assert "row x: ValidationError: field 'EmailAddress'" in task_log()
    statuses = {o["key"]: o["status"] for o in ti.xcom["outcomes"]}
    assert statuses == {"Student1": "registered", "Student2": "failed", "x": "invalid"}


def test_empty_input_makes_no_call(sb: Sandbox) -> None:
    summary, outcomes, _ = run(RegisterPortalUserOperator(task_id="register", leads=[]))
    assert summary["total"] == 0 and outcomes == {}
    assert sb.calls == []


def test_leads_may_come_as_json_text(sb: Sandbox) -> None:
    summary, _, _ = run(RegisterPortalUserOperator(task_id="register", leads=json.dumps([lead(1)])))
    assert summary["registered"] == 1
    with pytest.raises(AirflowException, match="not JSON"):
        run(RegisterPortalUserOperator(task_id="register", leads="{{ not rendered"))
    with pytest.raises(AirflowException, match="list of dicts"):
        run(RegisterPortalUserOperator(task_id="register", leads=42))


def test_template_fields_never_hold_passwords() -> None:
    assert RegisterPortalUserOperator.template_fields == ("leads", "leadsquared_conn_id")


def test_password_callable_sets_each_password(sb: Sandbox) -> None:
    op = RegisterPortalUserOperator(
        task_id="register",
        leads=[lead(1), lead(2)],
        password_callable=lambda row: f"Pw-{row['FirstName']}-2026!",
    )
    run(op)
    for i in (1, 2):
        found = sb.find_lead("EmailAddress", f"student{i}@example.edu")
        assert found is not None
        assert found.password_sha256 == hashlib.sha256(f"Pw-Student{i}-2026!".encode()).hexdigest()


def test_default_passwords_are_fresh_per_lead(sb: Sandbox) -> None:
    run(RegisterPortalUserOperator(task_id="register", leads=[lead(i) for i in range(1, 6)]))
    hashes = {found.password_sha256 for found in sb.leads}
    assert len(hashes) == 5 and None not in hashes


def test_no_secret_in_logs_xcom_or_template_fields_and_progress_is_logged(
    sb: Sandbox, task_log: TaskLog
) -> None:
    sb.inject(503, "lost", 502)
    passwords = RecordingPasswords()
    leads = [lead(i) for i in range(1, 13)] + [lead(13, mx_Favourite_Colour="teal")]
    op = RegisterPortalUserOperator(
        task_id="register", leads=leads, password_callable=passwords, max_failure_ratio=0.5
    )
    op.progress_interval = 0.01
    summary, _, ti = run(op)

    assert summary["registered"] == 12 and summary["failed"] == 1
    secrets = named_sandbox_secrets(sb, *passwords.made)
    log = task_log()
    for place, text in {
        "task log": log,
        "XCom": json.dumps([summary, ti.xcom]),
        "template fields": json.dumps({f: getattr(op, f) for f in op.template_fields}),
    }.items():
        assert_no_secret(text, secrets, f"the {place}")
    assert "Student7" not in log  # lead data other than the key stays out of the log
    assert "LeadSquared registration: done in" in log
    assert "row student13@example.edu: MXInvalidAttributeException" in log


# -- an upstream task's output, in a real DAG run --------------------------------------------------------

DAG_FILE = """
import pendulum
from airflow_provider_lsq.version_compat import DAG, task
from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:

    @task
    def collect():
        return [{{"EmailAddress": f"upstream{{i}}@example.edu", "FirstName": "Up"}} for i in range(3)]

    RegisterPortalUserOperator(task_id="register", leads=collect())
"""


@pytest.mark.airflow_db
def test_leads_from_an_upstream_task_in_a_dag_run(
    airflow_db: Path, sb: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.models import DagBag

    dag_id = f"lsq_operator_{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / f"{dag_id}.py").write_text(DAG_FILE.format(dag_id=dag_id))
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = [
        {"name": "dags-folder", "classpath": local, "kwargs": {}},
        {"name": "lsq-operator-tests", "classpath": local, "kwargs": {"path": str(folder)}},
    ]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
    dag = DagBag(dag_folder=str(folder)).dags[dag_id]
    logical_date = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    dag_run = dag_test(dag, logical_date)

    assert str(dag_run.state) == "success"
    ti = dag_run.get_task_instance("register")
    outcomes = ti.xcom_pull(task_ids="register", key="outcomes")
    assert sorted(o["status"] for o in outcomes) == ["registered"] * 3
    assert ti.xcom_pull(task_ids="register")["registered"] == 3
    for i in range(3):
        found = sb.find_lead("EmailAddress", f"upstream{i}@example.edu")
        assert found is not None and found.portal_user


def test_a_connection_without_portal_id_fails_the_task_for_good_before_any_call(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No row can be registered without a portal: the task fails without Airflow's retries."""
    from airflow_provider_lsq.version_compat import AirflowFailException

    sandbox = leadsquared_sandbox_factory(**FAST)
    conn = json.loads(sandbox.connection_json())
    conn["extra"].pop("portal_id")
    monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
    with pytest.raises(AirflowFailException, match="no portal_id"):
        run(RegisterPortalUserOperator(task_id="register", leads=[lead(1), lead(2)]))
    assert not sandbox.calls


def test_a_connection_value_refused_when_read_fails_the_task_for_good(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value no retry can fix (a reserve above 0.9), met when the run sizes its workers from the
    connection: AirflowFailException, naming the field, before any call."""
    from airflow_provider_lsq.version_compat import AirflowFailException

    sandbox = leadsquared_sandbox_factory(**FAST)
    conn = json.loads(sandbox.connection_json())
    conn["extra"]["rate_limit_reserve"] = 5
    monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
    with pytest.raises(AirflowFailException, match="field 'rate_limit_reserve'"):
        run(RegisterPortalUserOperator(task_id="register", leads=[lead(1)]))
    assert not sandbox.calls


def test_a_portal_id_lsq_does_not_know_stops_the_run_for_good_after_the_calls_in_flight(
    leadsquared_sandbox_factory: Callable[..., Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row would be refused the same way: the run stops at the first answer (naming the field
    and the connection) instead of spending the account's budget on every row."""
    from airflow_provider_lsq.version_compat import AirflowFailException

    sandbox = leadsquared_sandbox_factory(**FAST)
    conn = json.loads(sandbox.connection_json())
    conn["extra"]["portal_id"] = "not-this-accounts-portal"
    monkeypatch.setenv("AIRFLOW_CONN_LEADSQUARED_DEFAULT", json.dumps(conn))
    op = RegisterPortalUserOperator(task_id="register", leads=[lead(i) for i in range(60)], max_workers=2)
    with pytest.raises(AirflowFailException, match="does not know the portal_id of connection") as info:
        run(op)
    assert "'leadsquared_default'" in str(info.value) and "Manage Portals" in str(info.value)
    assert sandbox.register_calls <= 2 * 2  # the calls already handed to the two workers, no more


def test_one_lead_twice_in_the_list_is_registered_once(sb: Sandbox, task_log: TaskLog) -> None:
    """A second row of a lead (the same key, or the same e-mail in another case under another key) is
    not sent: registering it again would reset the password the first call set."""
    leads = [
        lead(1, mx_Application_Number="A-1"),
        lead(2, mx_Application_Number="A-2"),
        {
            **lead(1),
            "EmailAddress": " STUDENT1@Example.edu ",
            "mx_Application_Number": "A-3",
        },  # the same lead
        lead(3, mx_Application_Number="A-2"),  # the same row key as the second row, another lead
        lead(4, mx_Application_Number="A-4"),
    ]
    op = RegisterPortalUserOperator(task_id="register", leads=leads, key_field="mx_Application_Number")
    summary, outcomes, _ = run(op)

    assert summary["registered"] == 3 and summary["duplicates"] == 2 and summary["total"] == 5
    assert set(outcomes) == {"A-1", "A-2", "A-4"}
    for i in (1, 2, 4):
        found = sb.find_lead("EmailAddress", f"student{i}@example.edu")
        assert found is not None and found.portal_user
    assert sb.find_lead("EmailAddress", "student3@example.edu") is None  # its row was not sent
    assert sb.register_calls == 3
    log = task_log()
    assert "Row A-3 (position 3) is not sent: the same lead (same EmailAddress) as row A-1" in log
    assert "Row A-2 (position 4) is not sent: the same row key as row A-2" in log


def test_dataframe_records_with_empty_cells_and_an_array_cell(sb: Sandbox, task_log: TaskLog) -> None:
    """``to_dict("records")``: an empty key cell is NaN, which was the row key ``nan`` (so a second row
    without one was dropped as a duplicate of the first), and a cell holding an array raised numpy's
    ValueError, which stopped the run. Each is now one invalid row naming its field."""
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {
            "EmailAddress": ["a@example.edu", None, None, "d@example.edu", "e@example.edu"],
            "Phone": ["1", "2", "3", None, None],
            "mx_Courses": [None, None, None, np.array(["x", "y"]), None],
            "FirstName": [np.nan, "B", pd.NA, "D", "E"],  # empty cells: left out
        }
    )
    op = RegisterPortalUserOperator(
        task_id="register", leads=frame.to_dict("records"), key_field="Phone", max_failure_ratio=1.0
    )
    summary, outcomes, _ = run(op)
    assert summary["duplicates"] == 0 and summary["total"] == 5
    assert outcomes["1"]["status"] == "registered"
    for key in ("2", "3"):  # no e-mail: invalid, each under its own key
        assert outcomes[key]["status"] == "invalid" and "'EmailAddress'" in outcomes[key]["error_message"]
    assert outcomes["#4"]["status"] == outcomes["#5"]["status"] == "invalid"
    assert "'Phone'" in outcomes["#4"]["error_message"]
    assert "nan" not in outcomes


def test_dataframe_rows_name_the_field_of_an_array_cell(sb: Sandbox) -> None:
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"EmailAddress": ["a@example.edu", "b@example.edu"], "mx_Courses": [None, None]})
    frame["mx_Courses"] = frame["mx_Courses"].astype(object)
    frame.at[1, "mx_Courses"] = np.array(["x", "y"])
    summary, outcomes, _ = run(
        RegisterPortalUserOperator(task_id="register", leads=frame.to_dict("records"), max_failure_ratio=1.0)
    )
    assert outcomes["a@example.edu"]["status"] == "registered"
    bad = outcomes["b@example.edu"]
    assert bad["status"] == "invalid" and "field 'mx_Courses'" in bad["error_message"]
    assert summary["registered"] == 1 and summary["invalid"] == 1


def test_undecodable_bytes_in_a_value_make_that_row_invalid_not_the_run_fail(sb: Sandbox) -> None:
    """A file read with ``surrogateescape`` leaves lone surrogates: in the identifier they raised
    UnicodeEncodeError while the lead was fingerprinted, which stopped the whole run naming nothing;
    elsewhere they were sent."""
    undecodable = b"b\xff@example.edu".decode("utf-8", "surrogateescape")
    leads = [
        lead(1),
        {"EmailAddress": undecodable, "FirstName": "Bad"},
        lead(3, FirstName="Z\udc80"),
        lead(4),
    ]
    summary, outcomes, _ = run(
        RegisterPortalUserOperator(
            task_id="register", leads=leads, key_field="FirstName", max_failure_ratio=1.0
        )
    )
    assert outcomes["Student1"]["status"] == outcomes["Student4"]["status"] == "registered"
    assert outcomes["Bad"]["status"] == "invalid"
    assert "field 'EmailAddress'" in outcomes["Bad"]["error_message"]
    assert outcomes["#3"]["status"] == "invalid"  # its key is not text: named by position
    assert "field 'FirstName'" in outcomes["#3"]["error_message"]
    assert summary["registered"] == 2 and summary["invalid"] == 2
    assert sb.register_calls == 2


def test_an_integer_key_column_with_an_empty_cell_keys_rows_as_integers(sb: Sandbox) -> None:
    """pandas turns an integer column with an empty cell into floats: the keys were ``1.0`` and ``2.0``,
    which match no id the user has. A key is the text sent for its field."""
    import pandas as pd

    frame = pd.DataFrame(
        {"mx_Applicant_Id": [1, 2, None], "EmailAddress": [f"k{i}@example.edu" for i in range(3)]}
    )
    assert frame["mx_Applicant_Id"].dtype == "float64"
    _, outcomes, _ = run(
        RegisterPortalUserOperator(
            task_id="register",
            leads=frame.to_dict("records"),
            key_field="mx_Applicant_Id",
            max_failure_ratio=1.0,
        )
    )
    assert set(outcomes) == {"1", "2", "#3"}
    assert outcomes["#3"]["status"] == "invalid" and "'mx_Applicant_Id'" in outcomes["#3"]["error_message"]
