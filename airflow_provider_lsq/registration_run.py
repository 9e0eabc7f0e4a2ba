"""The registration engine's former module: every name it had is still importable from here.

The engine is the package :mod:`airflow_provider_lsq.engine` now: the run (:mod:`.engine.run`), the
sinks (:mod:`.engine.sinks`), rows (:mod:`.engine.rows`), the per-row operation
(:mod:`.engine.operation`, registration in :mod:`.engine.registration`), the concurrent sending
(:mod:`.engine.concurrency`) and the duplicate check (:mod:`.engine.duplicates`).
"""

from __future__ import annotations

from airflow_provider_lsq.engine.registration import DRY_RUN_PASSWORD, check_lead
from airflow_provider_lsq.engine.rows import VALID, Row, row_key, valid_outcome_dict
from airflow_provider_lsq.engine.run import MAX_UNRECORDED_LOGGED, RegistrationRun
from airflow_provider_lsq.engine.sinks import MemorySink, OutcomeSink

__all__ = [
    "DRY_RUN_PASSWORD",
    "MAX_UNRECORDED_LOGGED",
    "VALID",
    "MemorySink",
    "OutcomeSink",
    "RegistrationRun",
    "Row",
    "check_lead",
    "row_key",
    "valid_outcome_dict",
]
