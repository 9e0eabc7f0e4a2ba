"""Ledger claims belong to one execution, not to a DAG run (issue 6 follow-up), over the sandbox and real
SQLite and PostgreSQL.

Executions that share a ``dag_id`` and ``run_id``: two tries of one task instance at once (a zombie try
still running while Airflow starts the retry), two tasks of one DAG run whose queries overlap, mapped
task instances. Each registers every lead once, each task's verdict counts its own rows only, and
rows left ``pending`` by executions that ended are sent first (or reported when the query no longer
returns them). Two task processes are played by two threads of this process, each running the
operator's own ``execute`` with its own task instance.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types
from typing import TYPE_CHECKING, Any

import pytest

from airflow_provider_lsq.outcomes import RegistrationOutcome
from airflow_provider_lsq.passwords import generate_password
from airflow_provider_lsq.transfers import ledger as ledger_module
from airflow_provider_lsq.transfers.executions import Execution, _this_process_space, holder_is_gone
from airflow_provider_lsq.transfers.ledger import LedgerUnavailableError, RegistrationLedger
from airflow_provider_lsq.transfers.ledger import dialects as ledger_dialects
from airflow_provider_lsq.transfers.ledger import rows as ledger_rows
from airflow_provider_lsq.transfers.ledger import store as ledger_store
from airflow_provider_lsq.transfers.sql_to_leadsquared import LedgerSink, get_db_hook
from airflow_provider_lsq.version_compat import AirflowException
from tests import test_transfer_sql as base
from tests.helpers import call_execute
from tests.test_transfer_sql import Warehouse, applicants, context, email, transfer

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from airflow_provider_lsq.sandbox import Sandbox
    from tests.helpers import TaskLog

# The transfer tests' fixtures: a fast sandbox as the default connection, and the warehouses.
lsq, warehouse, sqlite_warehouse = base.lsq, base.warehouse, base.sqlite_warehouse


def registrations(sb: Sandbox) -> dict[str, int]:
    """Email -> register calls that reached the lead, for every lead the sandbox made a portal user."""
    return {lead.fields["EmailAddress"]: lead.registrations for lead in sb.leads if lead.portal_user}


def run_at_once(jobs: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run each job on its own thread, started together; each one's result (or the error it raised)."""
    start = threading.Barrier(len(jobs))
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        start.wait()
        results[name] = jobs[name]()

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def dead_pid() -> int:
    """The PID of a process of this machine that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


def ledger_of(wh: Warehouse, sb: Sandbox) -> RegistrationLedger:
    ledger = RegistrationLedger(get_db_hook(wh.conn_id, "x"), wh.ledger_table, sb.portal_id)
    ledger.ensure_table()
    return ledger


# -- 1. claims name the execution -------------------------------------------------------------------------

# Who runs at once: two executions of one task instance (a zombie try and its retry), two tasks of one
# DAG run, or two mapped instances of one task. Each: (task_id, map_index, try_number, where) per side.
SIDES = {
    "same-task-instance": (("register", -1, 1, ""), ("register", -1, 2, "")),
    "two-tasks-overlapping": (
        ("register_a", -1, 1, "WHERE applicant_id <= 40"),
        ("register_b", -1, 1, "WHERE applicant_id > 20"),
    ),
    "mapped-0-and-1": (("register", 0, 1, ""), ("register", 1, 1, "")),
}


@pytest.mark.parametrize("sides", list(SIDES), ids=list(SIDES))
def test_executions_sharing_a_dag_run_at_once_register_each_lead_once(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], sides: str
) -> None:
    sb = lsq(latency=0.05)
    warehouse.seed(applicants(60))

    def job(task_id: str, map_index: int, try_number: int, where: str) -> Callable[[], Any]:
        op = transfer(warehouse, task_id=task_id, sql=warehouse.sql(where=where), max_workers=4)
        ctx = context("scheduled__1", task_id=task_id, map_index=map_index, try_number=try_number)
        return lambda: call_execute(op, ctx)

    results = run_at_once({f"side{i}": job(*side) for i, side in enumerate(SIDES[sides])})

    assert all(isinstance(result, dict) for result in results.values()), results
    assert sum(result["registered"] for result in results.values()) == 60
    assert len(registrations(sb)) == 60 and set(registrations(sb).values()) == {1}
    assert sb.register_calls == 60  # no lead sent twice, not even one the other side held
    ledger = warehouse.ledger()
    assert len(ledger) == 60 and {row["status"] for row in ledger.values()} == {"registered"}


def test_a_zombie_try_and_its_retry_running_together_register_each_lead_once(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Try 1 is still sending (Airflow lost it, it did not stop) when try 2 of the same run starts."""
    sb = lsq(latency=0.2)
    sqlite_warehouse.seed(applicants(40))
    zombie_op = transfer(sqlite_warehouse, max_workers=4)
    results: dict[str, Any] = {}
    zombie = threading.Thread(
        target=lambda: results.update(zombie=call_execute(zombie_op, context("scheduled__1", try_number=1)))
    )
    zombie.start()
    deadline = time.monotonic() + 60
    while sb.register_calls < 8 and time.monotonic() < deadline:  # the zombie holds claims in flight now
        time.sleep(0.02)
    retry = transfer(sqlite_warehouse, max_workers=4).execute(context("scheduled__1", try_number=2))
    zombie.join()

    assert isinstance(results["zombie"], dict), results
    assert results["zombie"]["registered"] + retry["registered"] == 40
    assert len(registrations(sb)) == 40 and set(registrations(sb).values()) == {1}
    assert sb.register_calls == 40


def test_a_live_execution_keeps_its_claims_by_heartbeat_though_its_calls_outlast_pending_timeout(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """The first execution's calls are held (its ``password_callable`` waits, just before each call)
    longer than ``pending_timeout``: only its heartbeat tells the second execution they are alive."""
    sb = lsq()
    sqlite_warehouse.seed(applicants(8))
    options: dict[str, Any] = {
        "max_workers": 4,
        "flush_interval_seconds": 0.5,
        "ledger_write_timeout": 1.0,
        "pending_timeout": dt.timedelta(seconds=3),
    }
    gate, entered = threading.Event(), threading.Semaphore(0)

    def held_password(lead: Any) -> str:
        entered.release()
        gate.wait(60)
        return generate_password()

    first = transfer(sqlite_warehouse, password_callable=held_password, **options)
    results: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: results.update(first=call_execute(first, context("scheduled__1", try_number=1)))
    )
    thread.start()
    try:
        for _ in range(4):  # every worker is in a call: all 8 rows are claimed
            assert entered.acquire(timeout=60)
        time.sleep(3.5)  # the claims are older than pending_timeout now; their heartbeat is not
        second = transfer(sqlite_warehouse, **options).execute(context("scheduled__1", try_number=2))
    finally:
        gate.set()
        thread.join()

    assert second["registered"] == 0 and second["skipped"] == 8  # left to the live execution
    assert isinstance(results["first"], dict) and results["first"]["registered"] == 8, results
    assert sb.register_calls == 8 and set(registrations(sb).values()) == {1}


def test_a_claim_refreshed_after_it_was_read_is_not_taken_over(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Another execution read the row when its heartbeat looked old; the holder refreshed it since."""
    sb = lsq()
    holder, other = Execution("d", "r", "t"), Execution("d", "r", "t")
    ledger = ledger_of(warehouse, sb)
    try:
        assert ledger.claim({"k": None}, execution=holder) == {"k"}
        warehouse.execute(
            f"UPDATE {warehouse.ledger_table} SET last_attempt_at = '2020-01-01 00:00:00' WHERE row_key = 'k'"
        )
        seen = ledger.lookup(["k"])["k"]
        assert not seen.held_by_another(other, dt.timedelta(minutes=2))  # looks abandoned
        assert ledger.refresh(["k"], execution=holder) == 1  # the heartbeat
        assert ledger.claim({"k": seen}, execution=other) == set()
        assert ledger.lookup(["k"])["k"].execution_id == holder.token
        assert ledger.refresh(["k"], execution=other) == 0  # not its claim
    finally:
        ledger.close()


@pytest.mark.postgres
def test_a_claimant_whose_clock_runs_ahead_still_sees_a_live_claim_as_live(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    lsq: Callable[..., Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ages are judged on the ledger database's clock (PostgreSQL's, shared by every worker): a worker
    whose own clock is an hour ahead neither reads a fresh heartbeat as old nor takes the claim over."""
    sb = lsq()
    holder, other = Execution("d", "r", "t", token="another-machine.1.a"), Execution("d", "r", "t")
    ledger = ledger_of(base.make_warehouse("postgres", request, tmp_path, monkeypatch), sb)
    try:
        assert ledger.claim({"k": None}, execution=holder) == {"k"}

        real = dt.datetime

        class Datetimes(type):
            def __instancecheck__(cls, value: object) -> bool:
                return isinstance(value, real)  # what the database hands back is still a datetime

        class AheadClock(real, metaclass=Datetimes):
            @classmethod
            def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
                return real.now(tz) + dt.timedelta(hours=1)

        clock = types.SimpleNamespace(datetime=AheadClock, timezone=dt.timezone, timedelta=dt.timedelta)
        for module in (ledger_module, ledger_dialects, ledger_rows, ledger_store):
            monkeypatch.setattr(module, "dt", clock)  # this worker's clock only
        seen = ledger.pending_rows()[0]
        assert seen.held_by_another(other, dt.timedelta(minutes=2))  # fresh, on the database's clock
        assert ledger.claim({"k": seen}, execution=other) == set()
        assert ledger.lookup(["k"])["k"].execution_id == holder.token
    finally:
        ledger.close()


def test_rows_set_back_by_hand_are_sent_whatever_the_form_of_their_timestamp(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """A person reconciling the ledger sets rows to failed, retryable, with a timestamp in their own
    form (microseconds; ISO text with a T on SQLite): the next run sends them, none is left behind."""
    sb = lsq()
    warehouse.seed(applicants(6))
    transfer(warehouse).execute(context("scheduled__1"))
    assert sb.register_calls == 6
    stamp = "'2026-11-29T10:11:12.345678'" if warehouse.kind == "sqlite" else "now()"
    retryable = "1" if warehouse.kind == "sqlite" else "TRUE"
    warehouse.execute(
        f"UPDATE {warehouse.ledger_table} SET status = 'failed', retryable = {retryable}, "
        f"last_attempt_at = {stamp} WHERE row_key IN ('1', '2', '3')"
    )

    summary = transfer(warehouse).execute(context("scheduled__2"))

    assert summary["registered"] == summary["total"] == 3  # 4-6, registered before: left out
    assert summary["skipped"] == 0
    assert sb.register_calls == 9
    assert {warehouse.ledger()[key]["status"] for key in ("1", "2", "3")} == {"registered"}


def test_a_holder_is_dead_only_when_its_process_on_this_machine_is_gone() -> None:
    here = _this_process_space()
    assert holder_is_gone(f"{here}.{dead_pid()}.abc")
    assert not holder_is_gone(Execution("d", "r").token)  # this process
    assert not holder_is_gone(f"another-machine.{dead_pid()}.abc")  # cannot tell: only the heartbeat
    assert not holder_is_gone(None) and not holder_is_gone("garbage")
    # Killed but not reaped yet by its parent (a defunct process): gone too.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while not holder_is_gone(f"{here}.{child.pid}.abc") and time.monotonic() < deadline:
            time.sleep(0.02)  # no poll(): it would reap the child
        assert holder_is_gone(f"{here}.{child.pid}.abc")
    finally:
        child.wait()


def test_pending_timeout_must_outlast_a_ledger_outage() -> None:
    with pytest.raises(ValueError, match="pending_timeout"):
        base.SqlToLeadSquaredPortalOperator(
            task_id="t",
            sql="SELECT 1",
            sql_conn_id="x",
            key_column="k",
            pending_timeout=dt.timedelta(seconds=30),  # ledger_write_timeout is 60 s
        )


# -- 2. the verdict counts the task's own rows ------------------------------------------------------------


def test_two_transfer_tasks_of_one_run_each_judge_their_own_rows(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Task ``bad`` has applicants 1-10 with rows 3, 6 and 9 invalid; task ``good`` has 11-20, clean."""
    sb = lsq()
    warehouse.seed(applicants(20, without_email=(3, 6, 9)))

    def task(name: str, where: str) -> Any:
        op = transfer(warehouse, task_id=name, sql=warehouse.sql(where=where), max_failure_ratio=0.1)
        return call_execute(op, context("scheduled__1", task_id=name))

    bad = task("bad", "WHERE applicant_id <= 10")
    good = task("good", "WHERE applicant_id > 10")
    assert isinstance(bad, AirflowException) and str(bad).startswith("3 of 10 rows failed")
    assert isinstance(good, dict) and good["registered"] == 10 and good["invalid"] == 0

    # Their retries (same run): the clean one stays green, the failing one fails the same way.
    assert isinstance(task("good", "WHERE applicant_id > 10"), dict)
    again = task("bad", "WHERE applicant_id <= 10")
    assert isinstance(again, AirflowException) and str(again) == str(bad)
    assert sb.register_calls == 17


# -- 3. pending rows of executions that ended are resolved first ------------------------------------------


class SendOrder:
    """A ``password_callable`` that notes each lead's email as its call is made (one worker: in order)."""

    def __init__(self) -> None:
        self.emails: list[str] = []

    def __call__(self, lead: Any) -> str:
        self.emails.append(str(lead["EmailAddress"]))
        return generate_password()


def test_pending_rows_of_ended_executions_are_sent_first_and_those_not_returned_are_reported(
    warehouse: Warehouse, lsq: Callable[..., Sandbox], task_log: TaskLog
) -> None:
    """The ledger holds, pending: 25 (its execution's heartbeat is an hour old), 28 (fresh, but its
    process on this machine is gone), 27 (fresh, another machine's live execution), 99 (stale, and
    the query no longer returns it) and 98 (stale, not returned, left by another task)."""
    sb = lsq()
    warehouse.seed(applicants(30))
    ledger = ledger_of(warehouse, sb)
    dag_id = base.FakeTI.dag_id  # the task instance the transfer below runs as
    try:
        ended = Execution(dag_id, "scheduled__0", "register")
        assert ledger.claim({"25": None, "99": None}, execution=ended) == {"25", "99"}
        dead = Execution(dag_id, "scheduled__0", "register", token=f"{_this_process_space()}.{dead_pid()}.x")
        assert ledger.claim({"28": None}, execution=dead) == {"28"}
        alive = Execution(dag_id, "scheduled__0", "other", token="another-machine.4242.y")
        assert ledger.claim({"27": None}, execution=alive) == {"27"}
        another_task = Execution(dag_id, "scheduled__0", "register_alumni")
        assert ledger.claim({"98": None}, execution=another_task) == {"98"}
    finally:
        ledger.close()
    warehouse.execute(
        f"UPDATE {warehouse.ledger_table} SET last_attempt_at = '2020-01-01 00:00:00' "
        "WHERE row_key IN ('25', '99', '98')"
    )
    order = SendOrder()

    summary = transfer(warehouse, max_workers=1, password_callable=order).execute(context("scheduled__1"))

    assert order.emails[:2] == [email(25), email(28)]  # first, before applicant 1
    assert sorted(order.emails) == sorted(email(i) for i in range(1, 31) if i != 27)
    assert summary["resent_pending"] == 2 and summary["pending_not_returned"] == 1
    assert summary["registered"] == 29 and summary["skipped"] == 1  # 27: its holder is alive
    ledger_rows = warehouse.ledger()
    assert ledger_rows["99"]["status"] == ledger_rows["27"]["status"] == "pending"  # kept, for a person
    assert ledger_rows["98"]["status"] == "pending"  # another task's: that task reports it
    assert ledger_rows["25"]["status"] == ledger_rows["28"]["status"] == "registered"
    assert set(registrations(sb).values()) == {1}
    log = task_log()
    assert "Pending, not returned: row 99, lead id None" in log
    assert "Pending, not returned: row 27" not in log and "row 98" not in log
    assert "1 of them were left by other tasks" in log
    assert "1 rows left pending by executions that ended are no longer returned by the query" in log
    assert "@" not in "".join(line for line in log.splitlines() if "ending" in line or "Pending" in line)

    # The next run has nothing left to send first; 99 is reported again until someone reconciles it.
    later = transfer(warehouse, max_workers=1).execute(context("scheduled__2"))
    assert later["pending_not_returned"] == 1 and later["registered"] == 0


def start_task(script: str, wh: Warehouse) -> subprocess.Popen[bytes]:
    """A real task process running ``script`` (its argv: the query, the warehouse, the ledger)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", script, wh.sql(), wh.conn_id, wh.ledger_table],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_calls(sb: Sandbox, task: subprocess.Popen[bytes], calls: int) -> None:
    """Until the sandbox has seen ``calls`` register calls (the child imports Airflow first)."""
    deadline = time.monotonic() + 120
    while sb.register_calls < calls and task.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


KILLED_TASK = """
import sys

from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator


class TaskInstance:
    dag_id, task_id, map_index, try_number = "lsq_kill", "register", -1, 1


op = SqlToLeadSquaredPortalOperator(
    task_id="register", sql=sys.argv[1], sql_conn_id=sys.argv[2], key_column="applicant_id",
    ledger_table=sys.argv[3], max_workers=4,
)
op.execute({"ti": TaskInstance(), "run_id": "scheduled__1"})
"""


@pytest.mark.deployment  # a real task process, a real signal
def test_after_a_sigkill_the_retry_sends_the_killed_tries_pending_rows_first(
    sqlite_warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """A real task process is SIGKILLed mid-run; its retry (same run, this machine) starts at once."""
    sb = lsq(latency=0.3)
    sqlite_warehouse.seed(applicants(24))
    wh = sqlite_warehouse
    task = start_task(KILLED_TASK, wh)
    try:
        wait_for_calls(sb, task, 8)
    finally:
        task.send_signal(signal.SIGKILL)
        task.wait()
    pending = sorted((int(key) for key, row in wh.ledger().items() if row["status"] == "pending"), key=int)
    assert pending  # the calls in flight (and rows claimed for them) when the process died
    order = SendOrder()

    summary = transfer(wh, max_workers=1, password_callable=order).execute(
        context("scheduled__1", dag_id="lsq_kill", try_number=2)
    )

    # The dead try's heartbeat is fresh, but its process is gone: no wait for pending_timeout.
    assert order.emails[: len(pending)] == [email(i) for i in pending]
    assert summary["resent_pending"] == len(pending) and summary["pending_not_returned"] == 0
    assert len(registrations(sb)) == 24
    assert {row["status"] for row in wh.ledger().values()} == {"registered"}


# -- claims hold while their execution lives; a frozen one never sends what it lost ----------------------


def test_the_keeper_holds_claims_while_the_run_thread_is_blocked_and_withdraws_lost_ones(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """Nothing on the run's thread refreshes the claims (as during a slow warehouse fetch): the keeper
    thread does, on its own connection. A claim another execution took over is withdrawn before its
    call, and its outcome is not written over the new holder's."""
    sb = lsq()
    timeout = dt.timedelta(seconds=2)
    ledger, other_ledger = ledger_of(warehouse, sb), ledger_of(warehouse, sb)
    mine, other = Execution("d", "r", "t"), Execution("d", "r", "t", token="another-machine.1.b")
    sink = LedgerSink(ledger, mine, pending_timeout=timeout, keep_interval=0.2)
    try:
        assert sink.claim(["1", "2"]) == {"1", "2"}
        time.sleep(3 * timeout.total_seconds())  # the run's thread does nothing all along
        seen = {row.row_key: row for row in other_ledger.pending_rows()}
        assert all(row.held_by_another(other, timeout) for row in seen.values())
        assert other_ledger.claim(dict(seen), execution=other, pending_timeout=timeout) == set()
        assert sink.may_send("1") and sink.may_send("2")

        warehouse.execute(  # another execution took row 2 over (it judged this one dead)
            f"UPDATE {warehouse.ledger_table} SET execution_id = '{other.token}' WHERE row_key = '2'"
        )
        deadline = time.monotonic() + 30
        while "2" not in sink.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sink.may_send("2") and sink.may_send("1")
        sink.write(
            [RegistrationOutcome.registered("1", "lead-1", 1), RegistrationOutcome.registered("2", "x", 1)]
        )
        rows = warehouse.ledger()
        assert rows["1"]["status"] == "registered"
        assert rows["2"]["status"] == "pending" and rows["2"]["execution_id"] == other.token  # theirs
    finally:
        sink.close()
        ledger.close()
        other_ledger.close()


FROZEN_TASK = """
import datetime as dt
import sys

from airflow_provider_lsq.transfers.sql_to_leadsquared import SqlToLeadSquaredPortalOperator


class TaskInstance:
    dag_id, task_id, map_index, try_number = "lsq_frozen", "register", -1, 1


op = SqlToLeadSquaredPortalOperator(
    task_id="register", sql=sys.argv[1], sql_conn_id=sys.argv[2], key_column="applicant_id",
    ledger_table=sys.argv[3], max_workers=4, flush_interval_seconds=1, ledger_write_timeout=3,
    pending_timeout=dt.timedelta(seconds=6),
)
op.execute({"ti": TaskInstance(), "run_id": "scheduled__1"})
"""


@pytest.mark.deployment  # a real task process, a real signal
def test_a_frozen_task_that_resumes_after_its_rows_were_taken_over_does_not_send_them(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """A real task process is frozen (SIGSTOP: a VM paused, a debugger) mid-run; its retry takes over
    its claims once they are older than pending_timeout and registers everyone; then the first one
    resumes (SIGCONT). Only the calls it had in flight at the freeze can reach LeadSquared twice."""
    sb = lsq(latency=0.3)
    warehouse.seed(applicants(60))
    wh = warehouse
    task = start_task(FROZEN_TASK, wh)
    try:
        wait_for_calls(sb, task, 8)
        task.send_signal(signal.SIGSTOP)
        time.sleep(8)  # past pending_timeout (6 s) on the ledger's clock: its claims look abandoned
        retry = transfer(wh, max_workers=4, pending_timeout=dt.timedelta(seconds=6), ledger_write_timeout=3)
        started = time.monotonic()
        summary = retry.execute(context("scheduled__1", dag_id="lsq_frozen", try_number=2))
        rate = summary["registered"] / (time.monotonic() - started)  # calls per second, as measured
        assert summary["resent_pending"] > 0
        calls_before_resuming = sb.register_calls
    finally:
        task.send_signal(signal.SIGCONT)
        task.wait(timeout=120)

    assert len(registrations(sb)) == 60
    assert {row["status"] for row in wh.ledger().values()} == {"registered"}
    # Once resumed, it sends none of the rows it had claimed and lost (it sent all of them before
    # this fix): at most a worker caught between its check and its send at the very freeze.
    assert sb.register_calls - calls_before_resuming <= 4
    # In all, as a hard kill: its calls in flight and the outcomes of its last flush interval (1 s).
    twice = {address: count for address, count in registrations(sb).items() if count > 1}
    assert len(twice) <= 4 + math.ceil(rate * 1), twice


def test_a_late_record_never_overwrites_the_row_of_the_execution_that_took_it_over(
    warehouse: Warehouse, lsq: Callable[..., Sandbox]
) -> None:
    """A frozen execution resumes and flushes the outcome of a call it made before the freeze, before
    its keeper has learned that the claim was taken over: the new holder's record stands."""
    sb = lsq()
    a, b = Execution("d", "r", "t"), Execution("d", "r", "t")
    ledger = ledger_of(warehouse, sb)
    try:
        assert ledger.claim({"k": None, "j": None}, execution=a) == {"k", "j"}
        taken = ledger.lookup(["k"])["k"]
        assert ledger.claim({"k": taken}, execution=b, pending_timeout=dt.timedelta(0)) == {"k"}
        ledger.record([RegistrationOutcome.registered("k", "lead-b", 1)], execution=b)

        late = [
            RegistrationOutcome.failed("k", "TransientError", "502", 1, retryable=True),
            RegistrationOutcome.registered("j", "lead-j", 1),
        ]
        assert ledger.record(late, execution=a, claimed=["k", "j"]) == 1
        assert ledger.taken_over == {"k"}
        rows = warehouse.ledger()
        assert rows["k"]["status"] == "registered" and rows["k"]["execution_id"] == b.token  # not resent
        assert rows["j"]["status"] == "registered" and rows["j"]["execution_id"] == a.token
    finally:
        ledger.close()


@pytest.mark.postgres
def test_a_row_lock_held_elsewhere_bounds_a_ledger_write_by_its_timeout(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    lsq: Callable[..., Sandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another session holds the row (a frozen execution mid-write): the write gives up within its
    retries (LedgerUnavailableError), so on_kill and the task end in bounds, instead of waiting on the
    lock for as long as it is held."""
    sb = lsq()
    wh = base.make_warehouse("postgres", request, tmp_path, monkeypatch)
    ledger = ledger_of(wh, sb)
    ledger.write_timeout = 2.0
    holder = wh.connect()
    release = threading.Timer(120, holder.rollback)  # a stuck test still ends
    try:
        assert ledger.claim({"k": None}, execution=Execution("d", "r", "t")) == {"k"}
        holder.cursor().execute(f"SELECT * FROM {wh.ledger_table} WHERE row_key = 'k' FOR UPDATE")
        release.start()
        with pytest.raises(LedgerUnavailableError):
            ledger.record([RegistrationOutcome.registered("k", "l", 1)], execution=Execution("d", "r", "t"))
        assert release.is_alive()  # it gave up while the lock was still held
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
        ledger.close()
