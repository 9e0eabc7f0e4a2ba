"""Airflow names for every supported Airflow and every common-compat a constraints file pins.

Official providers import Airflow names through ``airflow.providers.common.compat.sdk``. That module
first shipped in common-compat 1.8, and ``mask_secret`` joined it only in 1.22, while the constraints
files that MWAA, Cloud Composer and company images install with pin older releases (Airflow 2.11.0's
pin 1.7.0, 3.1's 1.14.x). So, as the official providers' own ``version_compat`` modules do, each name
here is taken from common-compat's ``sdk`` when that has it, and otherwise from the Airflow module that
defines it on the running version (the same candidates, in the same order, as common-compat's ``sdk``
tries). Import Airflow names from here, never from ``airflow.*`` directly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3_0_PLUS",
    "AIRFLOW_V_3_1_PLUS",
    "AIRFLOW_V_3_2_PLUS",
    "DAG",
    "AirflowException",
    "AirflowFailException",
    "AirflowNotFoundException",
    "BaseHook",
    "BaseOperator",
    "Connection",
    "Context",
    "Param",
    "Stats",
    "conf",
    "mask_secret",
    "redact",
    "task",
]

_BASE_VERSION = Version(Version(AIRFLOW_VERSION).base_version)
AIRFLOW_V_3_0_PLUS = Version("3.0.0") <= _BASE_VERSION
AIRFLOW_V_3_1_PLUS = Version("3.1.0") <= _BASE_VERSION
AIRFLOW_V_3_2_PLUS = Version("3.2.0") <= _BASE_VERSION

# Where each name lives, newest Airflow first (as in common-compat's sdk module).
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "AirflowException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "AirflowFailException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "AirflowNotFoundException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "BaseHook": ("airflow.sdk", "airflow.hooks.base"),
    "BaseOperator": ("airflow.sdk", "airflow.models.baseoperator"),
    "Connection": ("airflow.sdk", "airflow.models.connection"),
    "Context": ("airflow.sdk", "airflow.sdk.definitions.context", "airflow.utils.context"),
    "DAG": ("airflow.sdk", "airflow.models.dag"),
    "Param": ("airflow.sdk", "airflow.models.param"),
    "Stats": ("airflow.sdk.observability.stats", "airflow.observability.stats", "airflow.stats"),
    "conf": ("airflow.sdk.configuration", "airflow.configuration"),
    "mask_secret": (
        "airflow.sdk.log",
        "airflow.sdk.execution_time.secrets_masker",
        "airflow.utils.log.secrets_masker",
    ),
    "redact": (
        "airflow.sdk.log",
        "airflow.sdk._shared.secrets_masker",
        "airflow.sdk.execution_time.secrets_masker",
        "airflow.utils.log.secrets_masker",
    ),
    "task": ("airflow.sdk", "airflow.decorators"),
}


def _resolve(name: str) -> Any:
    """``name`` from common-compat's sdk when it has it, else from the first candidate module that does.

    :raises ImportError: no candidate module defines it on this Airflow (a name added here without the
        module that holds it on some supported version).
    """
    try:
        sdk = importlib.import_module("airflow.providers.common.compat.sdk")
        return getattr(sdk, name)
    except (ImportError, AttributeError):
        pass
    for module_name in _CANDIDATES[name]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"{name} is in none of {', '.join(_CANDIDATES[name])} on Airflow {AIRFLOW_VERSION}")


if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import (
        DAG,
        AirflowException,
        AirflowFailException,
        AirflowNotFoundException,
        BaseHook,
        BaseOperator,
        Connection,
        Context,
        Param,
        Stats,
        conf,
        mask_secret,
        redact,
        task,
    )


def __getattr__(name: str) -> Any:
    """Each name is looked up on first use (PEP 562), as common-compat's sdk does: importing this module
    from a hook must not import Airflow's DAG machinery."""
    if name not in _CANDIDATES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _resolve(name)
    globals()[name] = value
    return value
