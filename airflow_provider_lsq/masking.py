"""Registering a secret with Airflow's masker without handing it to a DEBUG log line on the way.

Airflow 3's task runner registers a mask in its own process and sends it to its supervisor (a
``MaskSecret`` message), which masks what it writes. The supervisor of a real task process leaves that
message's body out of its DEBUG log; the in-process one that ``airflow dags test`` and ``dag.test()``
use (``InProcessSupervisorComms.send``) logs every message at DEBUG, the value in clear, and on Airflow
3.0 before the task's own masker has it. Its supervisor is the same process, so the task's masker is
the supervisor's too: there, the mask goes to that masker directly, which is all the message would
have done. Everywhere else (a real task process, Airflow 2) Airflow's ``mask_secret`` is called.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from airflow_provider_lsq.version_compat import mask_secret

# Where the task's own masker lives: the Task SDK 1.1+ (Airflow 3.1+), then 1.0 (Airflow 3.0).
_MASKER_MODULES = ("airflow.sdk._shared.secrets_masker", "airflow.sdk.execution_time.secrets_masker")


def _in_process_masker() -> Any | None:
    """The masker to use directly when the task's supervisor is in this process, else None."""
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    comms = getattr(runner, "SUPERVISOR_COMMS", None)
    if type(comms).__name__ != "InProcessSupervisorComms":
        return None
    for name in _MASKER_MODULES:
        try:
            return importlib.import_module(name)._secrets_masker()
        except (ImportError, AttributeError):
            continue
    return None


def mask(secret: str) -> None:
    """Mask ``secret`` in every log Airflow writes for this task (see the module's docstring)."""
    if not secret:
        return
    masker = _in_process_masker()
    if masker is not None:
        masker.add_mask(secret)
    else:
        mask_secret(secret)
