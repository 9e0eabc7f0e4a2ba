"""Whether the default file budget reaches every task process that spends the account.

The file budget (:class:`~.stores.SqliteLeaseStore`) is shared by the processes of one machine. Where
tasks run on several machines or in a pod each, every one of them would count its own calls, put more
in the account's window than the plan allows, and get the account refused, for its other integrations
too. What says so:

- ``AIRFLOW_IS_K8S_EXECUTOR_POD`` in the task's environment (KubernetesExecutor sets it in every pod it
  starts), or an executor in Airflow's ``[core] executor`` (a comma list on Airflow 2.10+, items
  ``alias:module.path.Class``) that runs each task in its own pod or container: certain, so the hook
  refuses before the first call (:data:`CERTAIN`);
- an executor with a pool of workers (Celery, Edge, any this module does not know), or a Kubernetes
  pod (``KUBERNETES_SERVICE_HOST``) whose executor reads local: shared only if there is one worker or
  one pod, so the hook warns before the first call (:data:`POSSIBLE`).

``LSQ_RATE_LIMIT_FILE_SHARED=1`` states that the file reaches every such process (one worker, or
``LSQ_RATE_LIMIT_DIR`` on a volume every worker mounts): no refusal, no warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Mapping

FILE_SHARED_ENV = "LSQ_RATE_LIMIT_FILE_SHARED"
K8S_EXECUTOR_POD_ENV = "AIRFLOW_IS_K8S_EXECUTOR_POD"  # set by KubernetesExecutor in each worker pod
K8S_SERVICE_ENV = "KUBERNETES_SERVICE_HOST"  # set by Kubernetes in every pod
CERTAIN: Literal["certain"] = "certain"
POSSIBLE: Literal["possible"] = "possible"
# Executors that run every task on the scheduler's machine, as processes of its own.
_LOCAL = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})
# Words in the class names of executors that start a pod or a container for each task.
_POD_PER_TASK = ("Kubernetes", "Ecs", "Batch", "Lambda")
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class Unshared:
    """Why task processes may not share the file budget: ``how`` sure, and the evidence in words."""

    how: Literal["certain", "possible"]
    why: str


def executor_names(setting: str) -> list[str]:
    """The class names in a ``[core] executor`` value: ``"a:pkg.mod.CeleryExecutor, LocalExecutor"``
    gives ``["CeleryExecutor", "LocalExecutor"]``."""
    names = []
    for item in setting.split(","):
        path = item.strip().rpartition(":")[2].strip()
        if path:
            names.append(path.rpartition(".")[2])
    return names


def unshared(executor_setting: str, environ: Mapping[str, str]) -> Unshared | None:
    """Why a file budget on this machine may miss other task processes of the deployment, or None."""
    if environ.get(FILE_SHARED_ENV, "").strip().lower() in _TRUE:
        return None
    names = executor_names(executor_setting)
    shown = f"Airflow's [core] executor is {executor_setting.strip()!r}"
    if environ.get(K8S_EXECUTOR_POD_ENV):
        return Unshared(
            CERTAIN, f"this task runs in a KubernetesExecutor pod ({K8S_EXECUTOR_POD_ENV} is set)"
        )
    per_task = [name for name in names if any(word in name for word in _POD_PER_TASK)]
    if per_task:
        return Unshared(CERTAIN, f"{shown}: {per_task[0]} runs each task in a pod or container of its own")
    pooled = [name for name in names if name not in _LOCAL]
    if pooled:
        return Unshared(
            POSSIBLE, f"{shown}: {pooled[0]} runs tasks on its workers, which may be several machines"
        )
    if environ.get(K8S_SERVICE_ENV):
        return Unshared(
            POSSIBLE,
            f"this task runs in a Kubernetes pod ({K8S_SERVICE_ENV} is set) and {shown}: only the "
            "task processes of this pod share its files, not those of another scheduler or worker pod",
        )
    return None


def executor_setting() -> str:
    """Airflow's ``[core] executor`` as this process reads it (its config file and environment)."""
    try:
        from airflow_provider_lsq.version_compat import conf

        return str(conf.get("core", "executor", fallback="") or "")
    except Exception:  # a configuration that cannot be read shows nothing; the environment still may
        return ""


def check() -> Unshared | None:
    """:func:`unshared` for this process: its Airflow configuration and its environment."""
    return unshared(executor_setting(), os.environ)


def advice(finding: Unshared, where: str) -> str:
    """The message for ``finding`` about the file budget at ``where``, naming the fixes."""
    return (
        f"The rate-limit budget is a file on this machine ({where}), but {finding.why}: each machine or "
        "pod would count only its own calls, together put more in the account's window than the plan "
        "allows, and get the account refused (its other integrations too). Set rate_limit_redis_conn_id "
        "in the connection's extra to an Airflow 'redis' connection that every worker reaches, so they "
        f"share one budget; or, if every task on this account does reach this file (one worker, or "
        f"LSQ_RATE_LIMIT_DIR on a volume every worker mounts), set {FILE_SHARED_ENV}=1 in the workers' "
        "environment."
    )
