"""The account's lead fields, as ``LeadsMetaData.Get`` describes them (API notes, "Lead APIs").

No I/O here: :meth:`LeadSquaredHook.get_lead_fields
<airflow_provider_lsq.hooks.lead_api.LeadApiMixin.get_lead_fields>` fetches the answer and
:func:`parse_lead_fields` reads it, robust to the variations LeadSquared's sample answers show
(``MaxLength`` as text or a number, ``LockAfterCreate`` as a number or a boolean, ``Options`` as
objects, strings or null).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_lsq.exceptions import LeadSquaredAPIError

PORTAL_FIELD_PREFIX = "mx_Portal_"


def is_portal_field(attribute: str) -> bool:
    """Whether ``attribute`` is a portal field (``mx_Portal_*``, any case): set by Register only."""
    return attribute.lower().startswith(PORTAL_FIELD_PREFIX.lower())


@dataclass(frozen=True)
class LeadField:
    """One lead field of the account.

    :param schema_name: the name calls use (``mx_Program``).
    :param display_name: the name the LeadSquared app shows (``Program``).
    :param data_type: LeadSquared's type: ``String``, ``Email``, ``Phone``, ``Number``, ``Date``,
        ``DateTime``, ``Select``/``Dropdown`` (see ``options``), ``Boolean``, ...
    :param is_mandatory: the account requires a value when a lead is created.
    :param max_length: the most characters a value may have; None when the account gives none.
    :param options: a dropdown's allowed values (empty: not a dropdown, or fetched without them).
    :param is_lead_identifier: the field is unique on the account (a lead can be found by it).
    :param lock_after_create: the field cannot be changed once the lead exists.
    """

    schema_name: str
    display_name: str = ""
    data_type: str = "String"
    is_mandatory: bool = False
    max_length: int | None = None
    options: tuple[str, ...] = ()
    is_lead_identifier: bool = False
    lock_after_create: bool = False

    @property
    def is_dropdown(self) -> bool:
        return self.data_type.lower() in ("select", "dropdown") and bool(self.options)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _length(value: Any) -> int | None:
    try:
        length = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return length if length > 0 else None


def _options(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    options: list[str] = []
    for option in value:
        if isinstance(option, dict):
            text = option.get("Value", option.get("Text"))
            if text is not None:
                options.append(str(text))
        elif option is not None:
            options.append(str(option))
    return tuple(options)


def parse_lead_fields(body: Any) -> tuple[LeadField, ...]:
    """Read a ``LeadsMetaData.Get`` answer (a JSON array of field objects) in its order.

    An entry without a ``SchemaName`` is skipped.

    :raises LeadSquaredAPIError: the answer is not a JSON array.
    """
    if not isinstance(body, list):
        raise LeadSquaredAPIError(
            f"LeadSquared's LeadsMetaData.Get answer was not a list of fields (got {type(body).__name__})."
        )
    fields: list[LeadField] = []
    for entry in body:
        if not isinstance(entry, dict) or not isinstance(entry.get("SchemaName"), str):
            continue
        fields.append(
            LeadField(
                schema_name=entry["SchemaName"],
                display_name=str(entry.get("DisplayName") or entry["SchemaName"]),
                data_type=str(entry.get("DataType") or "String"),
                is_mandatory=_flag(entry.get("IsMandatory")),
                max_length=_length(entry.get("MaxLength")),
                options=_options(entry.get("Options")),
                is_lead_identifier=_flag(entry.get("IsLeadIdentifier")),
                lock_after_create=_flag(entry.get("LockAfterCreate")),
            )
        )
    return tuple(fields)


__all__ = ["PORTAL_FIELD_PREFIX", "LeadField", "is_portal_field", "parse_lead_fields"]
