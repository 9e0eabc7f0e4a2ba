"""Turn a lead (a mapping of attribute schema names to values) into the Register call's ``LeadFields``.

All client-side checks live here, so that a bad row is caught before it costs an API call, and its
error names the field at fault.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

from airflow_provider_lsq.exceptions import LeadSquaredValidationError

# The standard fields LeadSquared accepts as a lead's unique identifier; accounts may mark custom
# fields unique too (pass ``identifier_attribute`` for those).
UNIQUE_IDENTIFIERS = ("EmailAddress", "Phone", "Mobile")
PASSWORD_FIELD = "mx_Portal_Password"
CONFIRM_PASSWORD_FIELD = "mx_Portal_Confirm_Password"
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CANONICAL = {name.lower(): name for name in UNIQUE_IDENTIFIERS}
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def as_python(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (``numpy.int64(3)`` -> ``3``); anything else as is.

    Dataframe rows (``to_dict("records")``, ``itertuples()``) hand over numpy scalars: ``int64``,
    ``float32``, ``bool_``, ``datetime64`` (``NaT`` becomes None). numpy is not imported: its scalars
    are recognised by module and their own ``item()``. A ``datetime64`` is taken to microseconds first,
    since ``item()`` of a nanosecond one is a bare integer. A float narrower than 64 bits
    (``float16``, ``float32``) goes as its own shortest repr (``numpy.float32(0.1)`` -> ``0.1``, not
    the ``0.10000000149011612`` its exact widening would send).
    """
    kind = type(value)
    if kind.__module__ != "numpy" or not hasattr(value, "item"):
        return value
    if getattr(value, "shape", ()) != () or kind.__name__ in ("ndarray", "matrix"):
        return value  # an array (a cell holding a list): not a scalar, refused like a list
    if kind.__name__ == "datetime64":
        value = value.astype("datetime64[us]")
        held = value.item()
        # Beyond datetime's years 1 to 9999 ``item()`` gives a bare integer: keep the numpy value,
        # which format_value refuses naming the field, rather than send that integer as the date.
        return value if isinstance(held, int) else held
    if kind.__name__ in ("float16", "float32"):
        return float(str(value))  # numpy's str is the shortest repr at the value's own precision
    return value.item()


def is_missing(value: Any) -> bool:
    """None, or a dataframe's "no value" marker: NaN (float or Decimal), ``pandas.NA``, ``pandas.NaT``,
    or a numpy scalar holding one (``numpy.float32("nan")``, ``numpy.datetime64("NaT")``).

    pandas is not imported: its markers are recognised by type (``NaT`` is a ``datetime`` subclass, so
    it must be caught before any date handling).
    """
    value = as_python(value)
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, Decimal):
        return value.is_nan()
    kind = type(value)
    return kind.__name__ in ("NAType", "NaTType") and kind.__module__.startswith("pandas")


def format_value(attribute: str, value: Any) -> str | None:
    """The string LeadSquared gets for ``value``; None means "leave the field out".

    None and empty strings are left out: sending an empty value would blank that field on an existing
    lead. So are the "no value" markers of dataframes: ``float("nan")`` (what pandas gives for an empty
    cell in ``to_dict("records")``), ``pandas.NA`` and ``pandas.NaT``. Infinities are refused. Datetimes
    go as UTC ``YYYY-MM-DD HH:MM:SS`` (naive ones are taken as UTC). numpy scalars go as the Python
    values they hold (:func:`as_python`). A value whose reading raises anything else (a numpy or
    pandas object, a broken ``tzinfo``) is refused naming the field, like any value that cannot be sent.
    """
    try:
        return _format_value(attribute, value)
    except LeadSquaredValidationError:
        raise
    except Exception as error:  # its message could quote the value: name only its type
        raise LeadSquaredValidationError(
            f"field {attribute!r}: a value of type {type(value).__name__} could not be read "
            f"({type(error).__name__})",
            field=attribute,
        ) from None


def _format_value(attribute: str, value: Any) -> str | None:
    value = as_python(value)
    if is_missing(value):
        return None
    if isinstance(value, str):
        if _CONTROL_CHARS.search(value):
            raise LeadSquaredValidationError(
                f"field {attribute!r}: the value holds control characters that cannot be sent",
                field=attribute,
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: bytes decoded with ``surrogateescape``
            raise LeadSquaredValidationError(
                f"field {attribute!r}: the value holds bytes that are not text (read with the wrong "
                "encoding?)",
                field=attribute,
            ) from None
        return value if value.strip() else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise LeadSquaredValidationError(
                f"field {attribute!r}: {value} is not a number LeadSquared can store", field=attribute
            )
        if isinstance(value, float):
            if value.is_integer():
                return str(int(value))
            value = Decimal(repr(value))  # its shortest digits, written out: 1e-05 is 0.00001
        return format(value, "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dt.date):
        return value.strftime("%Y-%m-%d 00:00:00")
    if isinstance(value, UUID):
        return str(value)
    if type(value).__name__ == "datetime64":  # as_python kept it: outside datetime's range
        raise LeadSquaredValidationError(
            f"field {attribute!r}: {value} is outside the dates that can be sent (years 1 to 9999)",
            field=attribute,
        )
    raise LeadSquaredValidationError(
        f"field {attribute!r}: a value of type {type(value).__name__} cannot be sent "
        "(use text, numbers, booleans, dates or datetimes)",
        field=attribute,
    )


def attribute_values(
    lead: Mapping[str, Any], refuse: Callable[[str], None] | None = None
) -> Iterator[tuple[str, str | None]]:
    """Each attribute of ``lead``, in its order, with the text sent for its value (None: missing).

    ``refuse`` sees each attribute name before its value is read and raises for one the caller's call
    must not carry.

    :raises LeadSquaredValidationError: naming the field: ``lead`` is not a mapping, a name is not an
        attribute schema name, or a value cannot be sent (:func:`format_value`).
    """
    if not isinstance(lead, Mapping):
        raise LeadSquaredValidationError(
            f"a lead must be a mapping of attribute names, got {type(lead).__name__}"
        )
    for attribute, raw in lead.items():
        if not isinstance(attribute, str) or not _ATTRIBUTE_NAME.fullmatch(attribute):
            raise LeadSquaredValidationError(
                f"field {attribute!r}: not an attribute schema name (letters, digits and underscores)",
                field=str(attribute),
            )
        if refuse is not None:
            refuse(attribute)
        yield attribute, format_value(attribute, raw)


def no_identifier_error() -> LeadSquaredValidationError:
    """The error for a lead without any unique identifier to find it by."""
    return LeadSquaredValidationError(
        "field 'EmailAddress': the lead has no unique identifier; set EmailAddress, Phone or Mobile, "
        "or name a custom unique field with identifier_attribute",
        field="EmailAddress",
    )


def _refuse_password(attribute: str) -> None:
    if attribute in (PASSWORD_FIELD, CONFIRM_PASSWORD_FIELD):
        raise LeadSquaredValidationError(
            f"field {attribute!r}: pass the portal password separately, never inside the lead",
            field=attribute,
        )


def build_lead_fields(
    lead: Mapping[str, Any],
    password: str,
    *,
    identifier_attribute: str | None = None,
) -> list[dict[str, str]]:
    """Validate ``lead`` and build ``LeadFields`` in the caller's order, the identifier first.

    LeadSquared finds the lead by the first unique identifier in the list, so ``identifier_attribute``
    (when given) is moved to the front; otherwise the caller's order stands.
    """
    fields = [
        {"Attribute": attribute, "Value": value}
        for attribute, value in attribute_values(lead, _refuse_password)
        if value is not None
    ]

    present = {f["Attribute"] for f in fields}
    if identifier_attribute is not None:
        if identifier_attribute not in present:
            raise LeadSquaredValidationError(
                f"field {identifier_attribute!r}: the unique identifier is missing or empty",
                field=identifier_attribute,
            )
        fields.sort(key=lambda f: f["Attribute"] != identifier_attribute)  # stable: only moves it first
    elif not present.intersection(UNIQUE_IDENTIFIERS):
        raise no_identifier_error()

    if not isinstance(password, str) or not password.strip():
        raise LeadSquaredValidationError(
            f"field {PASSWORD_FIELD!r}: the portal password is empty", field=PASSWORD_FIELD
        )
    fields.append({"Attribute": PASSWORD_FIELD, "Value": password})
    fields.append({"Attribute": CONFIRM_PASSWORD_FIELD, "Value": password})
    return fields


def first_identifier(
    lead: Mapping[str, Any], identifier_attribute: str | None = None
) -> tuple[str, str] | None:
    """The unique identifier LeadSquared finds ``lead`` by: ``(attribute, value as sent)``, or None.

    That is the one :func:`build_lead_fields` puts first: ``identifier_attribute`` when given, else the
    first of :data:`UNIQUE_IDENTIFIERS` in the lead's order that has a value (a custom field the
    account marks unique is known only when named by ``identifier_attribute``). None when the lead has
    none, or its value cannot be sent (the lead is invalid then).
    """
    if not isinstance(lead, Mapping):
        return None
    wanted = (identifier_attribute,) if identifier_attribute is not None else UNIQUE_IDENTIFIERS
    for attribute, raw in lead.items():
        if attribute not in wanted:
            continue
        try:
            value = format_value(attribute, raw)
        except LeadSquaredValidationError:
            return None
        if value is not None:
            return attribute, value
    return None


def lead_fingerprint(attribute: str, value: str) -> str:
    """The ledger's ``lead_identifier``: sha256 hex of ``"<attribute>\n<normalised value>"``.

    ``attribute`` is the identifier LeadSquared finds the lead by (the one sent first), ``value`` the
    text sent for it. E-mail addresses are stripped and lower-cased (LeadSquared matches them without
    regard to case); other values (Phone, Mobile, custom unique fields) are stripped. Standard
    attribute names are spelled canonically (``emailaddress`` is ``EmailAddress``). The value cannot
    be read back from the fingerprint, but it is unsalted, so anyone may compute it for an address
    they know, e.g. in PostgreSQL: ``encode(sha256(convert_to('EmailAddress' || E'\n' ||
    lower(trim(email)), 'UTF8')), 'hex')``.
    """
    name = _CANONICAL.get(attribute.lower(), attribute)
    normalised = value.strip().lower() if name == "EmailAddress" else value.strip()
    return hashlib.sha256(f"{name}\n{normalised}".encode()).hexdigest()
