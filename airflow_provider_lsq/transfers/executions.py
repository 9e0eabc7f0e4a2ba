"""Who holds a ledger claim: one ``execute()`` call of one task instance, and whether it still lives.

A claim (a ``pending`` ledger row) belongs to an :class:`Execution`: the task instance (``dag_id``,
``run_id``, ``task_id``, ``map_index``) and a token made once per ``execute()`` call. The token tells
apart executions that share every Airflow name: a zombie try still running while Airflow starts the
retry, or two threads of one test. Its form is ``<process>.<pid>.<uuid4 hex>``, where ``<process>``
names the machine and PID namespace the execution ran in (a digest of the host name, the kernel's
boot id and the PID namespace; empty where they cannot be read).

That lets another execution on the same machine and PID namespace tell that a claim's holder has
died (its process is gone), and resolve the claim at once, instead of waiting ``pending_timeout``
after the holder's last heartbeat. A holder on another machine is judged by its heartbeat only. The
check errs one way only: a reused PID makes a dead holder look alive (its rows wait for the timeout);
a live holder never looks dead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping


@functools.cache
def _this_process_space() -> str:
    """A digest naming this machine's boot and PID namespace; "" where it cannot be told (not Linux)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    text = f"{socket.gethostname()}\n{boot_id}\n{pid_namespace}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def new_token() -> str:
    """A token unique to one execution: ``<process space>.<pid>.<uuid4 hex>``."""
    return f"{_this_process_space()}.{os.getpid()}.{uuid.uuid4().hex}"


def holder_is_gone(token: str | None) -> bool:
    """True only when ``token``'s execution certainly ended: its process, on this machine and PID
    namespace, no longer exists. False when unsure (another machine, an unreadable token, a live PID).
    """
    if not token:
        return False
    space, _, rest = token.partition(".")
    pid_text, _, _ = rest.partition(".")
    here = _this_process_space()
    if not here or space != here or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process: another thread's execution, alive as far as we can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return _defunct(pid)


def _defunct(pid: int) -> bool:
    """The process has exited but its parent has not reaped it yet (state ``Z``, or ``X``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]  # after "(command)": the command may hold spaces
    return state in (["Z"], ["X"])


@dataclass(frozen=True)
class Execution:
    """One ``execute()`` call of one task instance: what a ledger claim and record name.

    :param dag_id: the DAG.
    :param run_id: the DAG run.
    :param task_id: the task (None for callers outside a task, e.g. scripts).
    :param map_index: the mapped task's index; -1 when the task is not mapped (Airflow's own value).
    :param token: unique to this execution (see :func:`new_token`); made when not given.
    """

    dag_id: str
    run_id: str
    task_id: str | None = None
    map_index: int = -1
    token: str = field(default_factory=new_token)

    @classmethod
    def of_task(cls, context: Mapping[str, Any], dag_id: str, task_id: str) -> Execution:
        """This ``execute()`` call of the task instance in ``context`` (Airflow's task context), with a
        fresh token; ``dag_id`` and ``task_id`` (the operator's) stand in where the context has no
        task instance, and the run id is ``manual`` where it has no run."""
        dag_run = context.get("dag_run")
        ti = context.get("ti")
        run_id = context.get("run_id") or getattr(dag_run, "run_id", None) or "manual"
        map_index = getattr(ti, "map_index", None)
        return cls(
            dag_id=str(getattr(ti, "dag_id", None) or dag_id),
            run_id=str(run_id),
            task_id=str(getattr(ti, "task_id", None) or task_id),
            map_index=map_index if isinstance(map_index, int) else -1,
        )

    def same_task_instance(
        self, dag_id: str | None, run_id: str | None, task_id: str | None, map_index: int | None
    ) -> bool:
        """Whether those names are this execution's task instance (an earlier try of it, or itself)."""
        return (dag_id, run_id, task_id, -1 if map_index is None else map_index) == (
            self.dag_id,
            self.run_id,
            self.task_id,
            self.map_index,
        )
