"""A row as the engine sees it: its key (or an outcome decided before any call), and a dry run's record.

A planner (the SQL transfer's) hands the engine :class:`PlannedRow` items: each carries what the sink
must know to claim and record it (its ``state``), so nothing is written into the sink behind the
engine's back; the engine gives each item's state to the sink as it takes the item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from airflow_provider_lsq.exceptions import LeadSquaredValidationError
from airflow_provider_lsq.hooks.payload import format_value
from airflow_provider_lsq.outcomes import RegistrationOutcome

VALID = "valid"  # a dry run's status for a row that would be sent


@dataclass(frozen=True)
class PlannedRow:
    """A planner's row: ``row`` (``(key, lead)`` to send, or its outcome decided without a call) and
    ``state``, what the sink needs to claim and record it (opaque to the engine; None: nothing)."""

    row: tuple[str, Mapping[str, Any]] | RegistrationOutcome
    state: Any = None

    @property
    def key(self) -> str:
        return self.row.key if isinstance(self.row, RegistrationOutcome) else self.row[0]


# A row for the engine: ``(key, lead)`` to send, or an outcome already decided (e.g. no key), or
# either of them planned with its sink state.
Row = tuple[str, Mapping[str, Any]] | RegistrationOutcome | PlannedRow


def valid_outcome_dict(key: str) -> dict[str, Any]:
    """A dry run's record of a row that passed validation (shaped like ``RegistrationOutcome.to_dict``)."""
    blank = {field.name: field.default for field in fields(RegistrationOutcome)}
    return {**blank, "key": key, "status": VALID}


def row_key(position: int, row: Any, key_field: str) -> tuple[str, RegistrationOutcome | None]:
    """The key naming ``row`` in outcomes; with an ``invalid`` outcome when the row has none.

    Rows without a usable key are named by their 1-based position, ``#<position>``. The key is the
    text sent for the field (:func:`~airflow_provider_lsq.hooks.payload.format_value`): a dataframe's
    integer id column holding an empty cell is a float column, and its ``5.0`` is the key ``5``.
    """
    fallback = f"#{position}"
    if not isinstance(row, Mapping):
        message = f"a lead must be a mapping of attribute names, got {type(row).__name__}"
        return fallback, RegistrationOutcome.invalid(fallback, message)
    try:
        text = format_value(key_field, row.get(key_field))
    except LeadSquaredValidationError as error:
        return fallback, RegistrationOutcome.invalid(fallback, error.message)
    if text is None:  # None, blank, or a dataframe's empty cell (NaN, pandas.NA, NaT)
        message = f"field {key_field!r}: the row key is missing or empty"
        return fallback, RegistrationOutcome.invalid(fallback, message)
    return text, None
