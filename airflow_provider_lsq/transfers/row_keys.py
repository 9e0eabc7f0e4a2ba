"""Each query row's key, as both transfers read it: a NULL or empty key makes the row invalid, a key
met earlier in the run makes it a duplicate (sent once); the first few of each are logged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.hooks.payload import is_missing
from airflow_provider_lsq.log_caps import LogCap
from airflow_provider_lsq.outcomes import RegistrationOutcome

if TYPE_CHECKING:
    from airflow_provider_lsq.engine.duplicates import SeenRows
    from airflow_provider_lsq.progress import RegistrationProgress


class RowKeys:
    """The key column's reader for one run.

    :param key_column: the column named by the operator's ``key_column``.
    :param progress: the run's progress: a keyless row is counted there as ``invalid`` (``#<position>``
        stands for its key), a repeated key as a duplicate.
    :param log: the task's logger.
    :param max_logged: how many keyless rows, and how many repeated keys, are named in the log.
    """

    def __init__(self, key_column: str, progress: RegistrationProgress, log: Any, max_logged: int) -> None:
        self.key_column = key_column
        self.progress = progress
        self.log = log
        self.null_keys = 0
        self.reported_null = LogCap(max_logged)
        self.reported_duplicates = LogCap(max_logged)

    def key(self, position: int, value: Any, seen: SeenRows) -> str | None:
        """Row ``position``'s key as text (1-based), or None for a row not to send: its key is NULL, NaN
        or empty (no value, not the key 'NaN'), or ``seen`` has it already."""
        if is_missing(value) or not str(value).strip():
            message = f"column {self.key_column!r}: the row key is NULL or empty"
            self.progress.add(RegistrationOutcome.invalid(f"#{position}", message))
            self.null_keys += 1
            if self.reported_null.take():
                self.log.warning("Row #%d of the query has no %s: not sent.", position, self.key_column)
            return None
        key = str(value)
        if seen.add(key):
            return key
        self.progress.add_duplicate()
        if seen.first_report(key) and self.reported_duplicates.take():
            self.log.warning("Row key %s appears more than once in the query: sent once.", key)
        return None
