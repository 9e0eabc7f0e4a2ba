"""No secret in a task's log at DEBUG, on every supported Airflow: a real ``airflow dags test`` process.

At DEBUG, Airflow's own task machinery logs more than the provider does: Airflow 3's task runner talks
to its supervisor in messages (the connection it asked for, each value it is told to mask), and the
in-process supervisor that ``dags test`` and ``dag.test()`` use logs each message it is sent. The
provider masks the LeadSquared keys, the public auth key, the registration token and every portal
password; this test runs the operator in a child ``airflow dags test`` with
``AIRFLOW__LOGGING__LOGGING_LEVEL=DEBUG`` against the sandbox and looks for each of them (every form a
URL or JSON would show) in everything the process wrote.

What Airflow 3 itself writes, and no provider can prevent: every Airflow 3 tested (3.0.6, 3.1.8,
3.2.2, 3.3) logs, in ``InProcessSupervisorComms.send`` (``airflow/sdk/execution_time/supervisor.py``),
``Sending request msg=MaskSecret(value='...')`` at DEBUG for each mask its task runner registers,
including the one Airflow's own ``_get_connection`` registers for the connection's password (the
LeadSquared secret key) as the task reads the connection, before any provider code runs. So on
Airflow 3 the test allows the secret key in exactly those lines, says so in a warning, and allows
nothing else. (A real task process's supervisor leaves the body of ``MaskSecret`` out of its log;
only ``dags test`` and ``dag.test()`` use the in-process one.) The provider's own masks (both keys'
other forms, the public auth key, the token, each password) do not pass through that log
(``airflow_provider_lsq.masking``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from typing import TYPE_CHECKING

import pytest

from airflow_provider_lsq.sandbox import Sandbox
from tests.helpers import sandbox_secrets, secret_forms, without_airflow_mask_lines

if TYPE_CHECKING:
    from pathlib import Path

DAG_FILE = """
import pendulum

from airflow_provider_lsq.operators.portal import RegisterPortalUserOperator
from airflow_provider_lsq.passwords import generate_password
from airflow_provider_lsq.version_compat import DAG


def password(lead):
    made = generate_password()
    with open({passwords!r}, "a") as out:  # the test looks for each one in the log
        out.write(made + "\\n")
    return made


with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    RegisterPortalUserOperator(
        task_id="register",
        leads=[{{"EmailAddress": f"debug{{i}}@example.edu", "FirstName": "Debug"}} for i in range(3)],
        leadsquared_conn_id="lsq_debug",
        password_callable=password,
    )
"""


@pytest.mark.airflow_db
def test_no_secret_in_a_dag_test_run_logged_at_debug(airflow_db: Path, tmp_path: Path) -> None:
    dag_id = f"lsq_debug_{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "dags"
    folder.mkdir()
    passwords = tmp_path / "passwords.txt"
    (folder / f"{dag_id}.py").write_text(DAG_FILE.format(dag_id=dag_id, passwords=str(passwords)))
    with Sandbox(rate_limit_calls=100, rate_limit_period=1.0) as sb:
        env = {
            **os.environ,
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "DEBUG",
            "AIRFLOW__CORE__DAGS_FOLDER": str(folder),  # Airflow 3's dags-folder bundle is this folder
            "AIRFLOW_CONN_LSQ_DEBUG": sb.connection_json(),
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", dag_id, "2026-03-01"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )
        output = result.stdout
        registered = [lead for lead in sb.leads if lead.portal_user]
        named = {
            "access key": sb.access_key,
            "secret key": sb.secret_key,
            "public auth key": sb.public_auth_key,
            "registration token": sb.registration_token,
        }
        secrets = sandbox_secrets(sb)
    assert result.returncode == 0, output[-4000:]
    assert len(registered) == 3, output[-4000:]  # the task really ran, and talked to LeadSquared
    made = passwords.read_text().split()
    assert len(made) == 3
    secrets |= secret_forms(*made)
    # DEBUG was on: Airflow's own debug lines are there (structlog's "[debug" on 3, "DEBUG -" on 2).
    assert "[debug" in output.lower() or " DEBUG - " in output, output[-4000:]
    output = without_airflow_mask_lines(output, named["secret key"])
    leaked = sorted({secret for secret in secrets if secret in output}, key=len, reverse=True)
    lines = []
    for line in output.splitlines():
        if any(secret in line for secret in leaked):
            for secret in leaked:  # the failure names where, never what
                line = line.replace(secret, "<SECRET>")
            lines.append(textwrap.shorten(line, 300))
    named.update({f"portal password {i + 1}": password for i, password in enumerate(made)})
    which = sorted(name for name, value in named.items() if any(f in output for f in secret_forms(value)))
    if leaked:  # pytest.fail, not assert: an assertion's message would show the secrets it compared
        pytest.fail(
            f"{', '.join(which)} ({len(leaked)} forms) reached the DEBUG log, in these lines: {lines}"
        )
