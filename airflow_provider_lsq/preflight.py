"""Check a run against the account's lead fields before it spends the quota (issue #14, item 2).

The account's fields come from ``LeadsMetaData.Get`` (API notes, "Lead APIs"; fetched once per hook
by :meth:`~airflow_provider_lsq.hooks.lead_api.LeadApiMixin.get_lead_fields`). Two levels:

- **columns** (:meth:`Preflight.check_columns`, :meth:`Preflight.require_columns`): a column no row
  could ever send (an unknown or misspelled attribute, with the closest real field named; a portal
  field through the lead API; an identifier the account does not mark unique; a mandatory field
  with no column when leads are created). One :class:`LeadSquaredPreflightError` lists them all,
  before any row is sent.
- **values** (:meth:`Preflight.check_lead`): a value its field cannot hold (type by ``DataType``,
  ``MaxLength``, a dropdown's ``Options``, a mandatory field left empty when creating). Only that
  row is invalid; each message names the field.

No I/O here: give it the fields (:meth:`Preflight.from_hook` fetches them).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.exceptions import LeadSquaredValidationError
from airflow_provider_lsq.hooks.payload import UNIQUE_IDENTIFIERS, format_value
from airflow_provider_lsq.lead_fields import LeadField, is_portal_field

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from airflow_provider_lsq.hooks.lead_api import LeadApiMixin

# Attributes every account knows that LeadsMetaData.Get need not list: the lead's id.
_ALWAYS_KNOWN = ("ProspectId", "ProspectID")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE = re.compile(r"\+?[0-9 ()./-]{3,}")
_BOOLEAN = {"true", "false", "1", "0", "yes", "no"}


@dataclass(frozen=True)
class ColumnProblem:
    """A column no row can be sent with.

    :param column: the column (attribute) as the run names it.
    :param problem: what is wrong, in words.
    :param closest: the account's field the column most likely means (schema name), if any.
    """

    column: str
    problem: str
    closest: str | None = None

    def __str__(self) -> str:
        hint = f" (did you mean {self.closest!r}?)" if self.closest else ""
        return f"column {self.column!r}: {self.problem}{hint}"


class LeadSquaredPreflightError(LeadSquaredValidationError):
    """Columns of a run that no row could be sent with: raised before any row is sent.

    ``problems`` lists every one (:class:`ColumnProblem`); ``field`` is the first column at fault.
    """

    def __init__(self, problems: Sequence[ColumnProblem]) -> None:
        listed = "; ".join(str(p) for p in problems)
        super().__init__(
            f"The run's columns do not fit the account's lead fields (LeadsMetaData.Get): {listed}. "
            "Nothing was sent.",
            field=problems[0].column if problems else None,
        )
        self.problems = tuple(problems)
        self.exception_type = "PreflightError"


class Preflight:
    """The checks of a run against one account's lead fields (see the module docstring).

    :param fields: the account's lead fields, as :meth:`get_lead_fields` returns them.
    """

    def __init__(self, fields: Iterable[LeadField]) -> None:
        self.fields = tuple(fields)
        self._by_name = {f.schema_name: f for f in self.fields}
        self._by_lower = {f.schema_name.lower(): f for f in self.fields}
        # Names a column may be a misspelling of: schema names and display names, compared lower-cased.
        self._spellings: dict[str, str] = {}
        for f in self.fields:
            self._spellings.setdefault(f.schema_name.lower(), f.schema_name)
        for f in self.fields:
            if f.display_name:
                self._spellings.setdefault(f.display_name.lower(), f.schema_name)
                self._spellings.setdefault(re.sub(r"\W+", "_", f.display_name.lower()), f.schema_name)

    @classmethod
    def from_hook(cls, hook: LeadApiMixin) -> Preflight:
        """The checks for the hook's account (one ``LeadsMetaData.Get`` per hook, then cached)."""
        return cls(hook.get_lead_fields())

    @property
    def unique_fields(self) -> tuple[str, ...]:
        """The account's unique fields (``IsLeadIdentifier``), in its order."""
        return tuple(f.schema_name for f in self.fields if f.is_lead_identifier)

    def field(self, attribute: str) -> LeadField | None:
        """The account's field of this exact schema name, or None."""
        return self._by_name.get(attribute)

    def closest(self, attribute: str) -> str | None:
        """The account's field ``attribute`` most likely means: the same name in another case, else
        the closest schema or display name (difflib, ratio 0.6 or more), else None."""
        lowered = attribute.lower()
        if lowered in self._by_lower:
            return self._by_lower[lowered].schema_name
        if lowered in self._spellings:
            return self._spellings[lowered]
        matches = difflib.get_close_matches(lowered, list(self._spellings), n=1, cutoff=0.6)
        return self._spellings[matches[0]] if matches else None

    # -- columns ---------------------------------------------------------------------------------

    def check_columns(
        self,
        columns: Iterable[str],
        *,
        identifier_attribute: str | None = None,
        creating: bool = False,
        lead_api: bool = True,
    ) -> list[ColumnProblem]:
        """Every column-level problem of a run (empty: none).

        :param columns: the attributes the run sends (its query's column aliases), in order.
        :param identifier_attribute: the attribute the lead is found by; None: the first of
            EmailAddress, Phone, Mobile among the columns (as the hook chooses it).
        :param creating: leads may be created (upsert, create only, registration): every mandatory
            field needs a column.
        :param lead_api: the run uses the lead APIs, through which no ``mx_Portal_*`` field is ever
            sent; False for registration, whose password the operator adds itself.
        """
        names = list(columns)
        problems: list[ColumnProblem] = []
        for column in names:
            if lead_api and is_portal_field(column):
                problems.append(
                    ColumnProblem(
                        column, "portal fields are never sent through the lead API (registration sets them)"
                    )
                )
            elif column in self._by_name or column in _ALWAYS_KNOWN:
                continue
            else:
                closest = self.closest(column)
                if closest is not None and closest.lower() == column.lower():
                    problem = f"the account spells this field {closest!r}"
                else:
                    problem = "the account has no such lead field"
                problems.append(ColumnProblem(column, problem, closest))
        unique = self.unique_fields
        unique_text = ", ".join(unique) or "none"
        identifier = identifier_attribute or next((c for c in names if c in UNIQUE_IDENTIFIERS), None)
        if identifier is None:
            if not any(c in unique for c in names):
                problems.append(
                    ColumnProblem(
                        "(identifier)",
                        "no column is a unique field of the account, so no lead can be found "
                        f"(unique: {unique_text})",
                    )
                )
        elif identifier_attribute is not None and identifier_attribute not in names:
            problems.append(
                ColumnProblem(identifier_attribute, "the identifier attribute is not among the columns")
            )
        elif identifier in self._by_name and not self._by_name[identifier].is_lead_identifier:
            problems.append(
                ColumnProblem(
                    identifier,
                    "the identifier is not unique on the account (IsLeadIdentifier is false; "
                    f"unique: {unique_text})",
                )
            )
        if creating:
            for f in self.fields:
                if f.is_mandatory and f.schema_name not in names and not is_portal_field(f.schema_name):
                    problems.append(
                        ColumnProblem(
                            f.schema_name,
                            "the account makes this field mandatory to create a lead, and no column holds it",
                        )
                    )
        return problems

    def require_columns(
        self,
        columns: Iterable[str],
        *,
        identifier_attribute: str | None = None,
        creating: bool = False,
        lead_api: bool = True,
    ) -> None:
        """:meth:`check_columns`, raising when anything is wrong.

        :raises LeadSquaredPreflightError: listing every problem, the first column as ``field``.
        """
        problems = self.check_columns(
            columns, identifier_attribute=identifier_attribute, creating=creating, lead_api=lead_api
        )
        if problems:
            raise LeadSquaredPreflightError(problems)

    # -- values ----------------------------------------------------------------------------------

    def check_lead(self, lead: Mapping[str, Any], *, creating: bool = False) -> list[str]:
        """Every value problem of one row, each message naming its field (empty: the row is fine).

        Values are read as the hook sends them (``format_value``); a missing value is left out, so
        only a mandatory field when ``creating`` must hold one. Attributes the account does not know
        are the columns' problem (:meth:`check_columns`) and are skipped here.
        """
        problems: list[str] = []
        for attribute, raw in lead.items():
            field = self._by_name.get(attribute) if isinstance(attribute, str) else None
            if field is None:
                continue
            try:
                value = format_value(attribute, raw)
            except LeadSquaredValidationError as error:
                problems.append(error.message)
                continue
            if value is None:
                continue
            problem = _value_problem(field, value)
            if problem:
                problems.append(f"field {attribute!r}: {problem}")
        if creating:
            for f in self.fields:
                if f.is_mandatory and not is_portal_field(f.schema_name) and f.schema_name in lead:
                    try:
                        empty = format_value(f.schema_name, lead[f.schema_name]) is None
                    except LeadSquaredValidationError:
                        continue  # already reported above
                    if empty:
                        problems.append(f"field {f.schema_name!r}: mandatory to create a lead, and empty")
        return problems

    def lead_problem(self, lead: Mapping[str, Any], *, creating: bool = False) -> str | None:
        """:meth:`check_lead`'s problems as one message (for a row's ``invalid`` outcome), or None."""
        problems = self.check_lead(lead, creating=creating)
        return "; ".join(problems) if problems else None


def _value_problem(field: LeadField, value: str) -> str | None:
    """Why ``value`` (as sent) does not fit ``field``, or None. Lengths are in characters."""
    if field.max_length is not None and len(value) > field.max_length:
        return f"{len(value)} characters, more than the {field.max_length} the account allows (MaxLength)"
    kind = field.data_type.lower()
    text = value.strip()
    if field.is_dropdown and text not in field.options:
        shown = ", ".join(field.options[:10]) + (", ..." if len(field.options) > 10 else "")
        closest = difflib.get_close_matches(text, field.options, n=1, cutoff=0.6)
        hint = f" (did you mean {closest[0]!r}?)" if closest else ""
        return f"{text!r} is not one of the dropdown's options ({shown}){hint}"
    if kind in ("number", "decimal", "integer"):
        try:
            float(text)
        except ValueError:
            return f"not a number ({field.data_type})"
    elif kind in ("date", "datetime"):
        try:
            dt.date.fromisoformat(text[:10])
        except ValueError:
            return f"not a date ({field.data_type}: YYYY-MM-DD or YYYY-MM-DD HH:MM:SS)"
    elif kind == "email" and not _EMAIL.fullmatch(text):
        return "not an e-mail address (Email)"
    elif kind == "phone" and not _PHONE.fullmatch(text):
        return "not a phone number (Phone)"
    elif kind == "boolean" and text.lower() not in _BOOLEAN:
        return "not a boolean (true or false)"
    return None


__all__ = ["ColumnProblem", "LeadSquaredPreflightError", "Preflight"]
