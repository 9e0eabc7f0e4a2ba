"""The sandbox's lead APIs: ``/v2/LeadManagement.svc/...`` on the same account as the portal API.

What the API notes ("Lead APIs") document, played on the sandbox's one lead store, so a lead
registered through the portal API can then be updated here and the other way round:

- ``POST Lead.Capture[?LeadUpdateBehavior=DoNotUpdate|UpdateOnlyEmptyFields|DoNotUpdateUniqueFields]``:
  an upsert; the lead is found by ``ProspectId``, then ``EmailAddress``, then ``Phone``, and a
  ``SearchBy`` attribute takes priority;
- ``POST Lead.CreateOrUpdate?postUpdatedLead=false``: an upsert found by ``SearchBy`` (default:
  ``EmailAddress``, then ``Phone``);
- ``POST Lead.Update?leadId=``: update one lead, never create;
- ``POST Lead/Bulk/CreateOrUpdate``: at most 25 records (each its own ``SearchBy``), on a separate,
  lower rate limit (:class:`BulkWindow`), one result per record;
- ``GET Leads.GetByEmailaddress?emailaddress=``: the matching leads, ``[]`` when none;
- ``GET LeadsMetaData.Get``: the account's lead fields (:class:`SandboxField`).

Where the notes are silent the sandbox decides, and ``docs/sandbox.md`` says so: the success shapes
(LeadSquared's ``{"Status": "Success", "Message": {...}}``), the per-record bulk shape, and that the
sandbox is stricter than the notes in refusing any ``mx_Portal_*`` attribute through the lead APIs
(the notes' design rule is never to send one; the sandbox makes a client that does fail loudly). A
lead-API call never changes a lead's portal password hash or its portal-user flag.

The HTTP side (keys, the account's rate limit, faults) is the server's; this module holds the rules.
State is kept on :class:`~airflow_provider_lsq.sandbox.state.SandboxState`, under its lock.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from airflow_provider_lsq.sandbox.state import (
    DEFAULT_KNOWN_ATTRIBUTES,
    DEFAULT_UNIQUE_ATTRIBUTES,
    ApiError,
    _Lead,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from airflow_provider_lsq.sandbox.state import SandboxState

PREFIX = "/v2/leadmanagement.svc/"
CAPTURE, CREATE_OR_UPDATE, UPDATE, BULK, GET_BY_EMAIL, METADATA = (
    "lead_capture",
    "lead_create_or_update",
    "lead_update",
    "lead_bulk",
    "lead_get_by_email",
    "lead_metadata",
)
_ROUTES = {
    "lead.capture": ("POST", CAPTURE),
    "lead.createorupdate": ("POST", CREATE_OR_UPDATE),
    "lead.update": ("POST", UPDATE),
    "lead/bulk/createorupdate": ("POST", BULK),
    "leads.getbyemailaddress": ("GET", GET_BY_EMAIL),
    "leadsmetadata.get": ("GET", METADATA),
}
ENDPOINTS = frozenset(endpoint for _, endpoint in _ROUTES.values())
MAX_BULK_RECORDS = 25  # the API notes: at most 25 records a call
UPDATE_BEHAVIOURS = ("DoNotUpdate", "UpdateOnlyEmptyFields", "DoNotUpdateUniqueFields")
PORTAL_PREFIX = "mx_portal_"
SEARCH_BY = "SearchBy"
PROSPECT_ID = "ProspectId"
_INVALID = "MXInvalidInputException"
_UNKNOWN = "MXInvalidAttributeException"
_DUPLICATE = "MXDuplicateEntryException"
_MANDATORY = "MXMandatoryAttributeMissingException"
_NOT_FOUND = "MXLeadNotFoundException"  # the notes name no type for it: the sandbox's choice
_CYCLE = (429, 403, 200)


@dataclass(frozen=True)
class SandboxField:
    """One lead field of the sandbox account, as ``LeadsMetaData.Get`` describes it (API notes).

    ``data_type`` is LeadSquared's: ``String``, ``Email``, ``Phone``, ``Number``, ``Date``,
    ``DateTime``, ``Select`` (a dropdown: its ``options``) or ``Boolean``. ``max_length`` is in
    characters (None: no limit). ``is_lead_identifier`` marks a unique field.
    """

    schema_name: str
    display_name: str = ""
    data_type: str = "String"
    is_mandatory: bool = False
    max_length: int | None = None
    options: tuple[str, ...] = ()
    is_lead_identifier: bool = False
    lock_after_create: bool = False

    def metadata(self) -> dict[str, Any]:
        """The field as ``LeadsMetaData.Get`` answers it: ``MaxLength`` as text, ``LockAfterCreate``
        as 0/1 and ``Options`` as ``[{"Value", "Text"}]`` (null for other types), as LeadSquared's
        documented sample answers show them."""
        return {
            "SchemaName": self.schema_name,
            "DisplayName": self.display_name or self.schema_name,
            "DataType": self.data_type,
            "IsMandatory": self.is_mandatory,
            "MaxLength": None if self.max_length is None else str(self.max_length),
            "Options": [{"Value": o, "Text": o} for o in self.options]
            if self.data_type == "Select"
            else None,
            "IsLeadIdentifier": self.is_lead_identifier,
            "LockAfterCreate": 1 if self.lock_after_create else 0,
        }


# The default account's fields: types and lengths as a university's account would have them.
_DEFAULT_SPECS: dict[str, dict[str, Any]] = {
    "FirstName": {"display_name": "First Name", "max_length": 100},
    "LastName": {"display_name": "Last Name", "max_length": 100},
    "EmailAddress": {"display_name": "Email", "data_type": "Email", "max_length": 100},
    "Phone": {"display_name": "Phone Number", "data_type": "Phone", "max_length": 50},
    "Mobile": {"display_name": "Mobile Number", "data_type": "Phone", "max_length": 50},
    "mx_PAN_Number": {"display_name": "PAN Number", "max_length": 10},
    "mx_Program": {"display_name": "Program", "max_length": 200},
    "mx_Intake": {
        "display_name": "Intake",
        "data_type": "Select",
        "max_length": 50,
        "options": ("2026-Fall", "2027-Spring", "2027-Fall"),
    },
    "mx_City": {"display_name": "City", "max_length": 100},
    "mx_Date_Of_Birth": {"display_name": "Date Of Birth", "data_type": "Date"},
    "mx_Application_Number": {"display_name": "Application Number", "max_length": 50},
    "Source": {"display_name": "Lead Source", "max_length": 100},
    "mx_Portal_Password": {"display_name": "Portal Password", "max_length": 200},
    "mx_Portal_Confirm_Password": {"display_name": "Portal Confirm Password", "max_length": 200},
}


def default_fields(
    known_attributes: Iterable[str] = DEFAULT_KNOWN_ATTRIBUTES,
    unique_attributes: Iterable[str] = DEFAULT_UNIQUE_ATTRIBUTES,
) -> tuple[SandboxField, ...]:
    """The fields of an account that knows ``known_attributes`` and marks ``unique_attributes`` unique.

    Standard and default-sandbox names get their usual type and length; any other name is a String
    without a length limit.
    """
    unique = {u.lower() for u in unique_attributes}
    return tuple(
        SandboxField(name, **_DEFAULT_SPECS.get(name, {}), is_lead_identifier=name.lower() in unique)
        for name in known_attributes
    )


def route(path: str) -> tuple[str, str] | None:
    """``(method, endpoint)`` of a lead-API path, or None when the path is not one."""
    name = path.rstrip("/").lower()
    if not name.startswith(PREFIX):
        return None
    return _ROUTES.get(name[len(PREFIX) :])


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


class BulkWindow:
    """The bulk call's own moving window: ``calls`` per ``period`` seconds, then a lockout of a period.

    The same rule as the account's window (the API notes give the bulk call "a separate, lower rate
    limit" and no other rule); a refusal takes the account's refusal form (429, 403, 200 or cycle).
    """

    def __init__(self, calls: int, period: float, refusal_form: str) -> None:
        if calls < 1 or period <= 0:
            raise ValueError("the bulk rate limit needs at least 1 call in a positive period")
        self.calls, self.period, self.refusal_form = calls, float(period), refusal_form
        self._lock = threading.Lock()
        self._window: deque[float] = deque()
        self._lockout_until: float | None = None
        self._cycle = 0
        self.refusals = 0
        self.accepted = 0

    def admit(self, at: float) -> Refusal | None:
        """None when the call at ``at`` fits the window (it is counted), else the refusal to answer."""
        with self._lock:
            if self._lockout_until is not None and at < self._lockout_until:
                return self._refuse()
            self._lockout_until = None
            while self._window and self._window[0] <= at - 2 * self.period:
                self._window.popleft()
            recent = len(self._window) - bisect.bisect_right(self._window, at - self.period)
            if recent >= self.calls:
                self._lockout_until = at + self.period
                return self._refuse()
            bisect.insort(self._window, at)
            self.accepted += 1
            return None

    def _refuse(self) -> Refusal:
        self.refusals += 1
        if self.refusal_form == "cycle":
            status = _CYCLE[self._cycle % len(_CYCLE)]
            self._cycle += 1
        else:
            status = int(self.refusal_form)
        shown = int(self.period) if self.period.is_integer() else self.period
        return Refusal(status, f"API calls exceeded the limit of {self.calls} in {shown} second(s)")

    def reset(self) -> None:
        with self._lock:
            self._window.clear()
            self._lockout_until = None
            self._cycle = self.refusals = self.accepted = 0


class _BadRequest(ValueError):
    """A body or query not per the API's format: answered 400."""


class LeadApi:
    """The lead APIs' rules over the sandbox account's leads and fields."""

    def __init__(
        self,
        state: SandboxState,
        fields: Sequence[SandboxField],
        bulk_window: BulkWindow,
    ) -> None:
        self.state = state
        self.fields = tuple(fields)
        self.bulk_window = bulk_window
        self._by_name = {f.schema_name.lower(): f for f in self.fields}
        self._unique = [f.schema_name for f in self.fields if f.is_lead_identifier]

    def metadata(self) -> list[dict[str, Any]]:
        return [f.metadata() for f in self.fields]

    # --- HTTP entry -----------------------------------------------------------------------------------

    def handle(self, endpoint: str, query: str, body: bytes, content_type: str) -> tuple[int, Any, str]:
        """Answer one admitted lead-API call: ``(status, JSON payload, call-log outcome)``."""
        params = {k.lower(): v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        try:
            if endpoint == METADATA:
                return 200, self.metadata(), "ok"
            if endpoint == GET_BY_EMAIL:
                email = params.get("emailaddress", "").strip()
                if not email:
                    raise _BadRequest("the emailaddress query parameter is required")
                return 200, self.get_by_email(email), "ok"
            if content_type != "application/json":
                return 400, {"Message": "The request content type must be application/json."}, "error"
            data = _json(body)
            if endpoint == BULK:
                records = _records(data)
                if len(records) > MAX_BULK_RECORDS:
                    raise ApiError(
                        _INVALID,
                        f"A bulk call takes at most {MAX_BULK_RECORDS} leads; this one held {len(records)}.",
                    )
                return 200, self.bulk(records), "ok"
            pairs = _pairs(data)
            if endpoint == CAPTURE:
                behaviour = params.get("leadupdatebehavior") or None
                if behaviour is not None and behaviour not in UPDATE_BEHAVIOURS:
                    raise ApiError(
                        _INVALID,
                        f"Invalid LeadUpdateBehavior '{behaviour}': use " + ", ".join(UPDATE_BEHAVIOURS),
                    )
                lead_id, created, affected = self.upsert(pairs, capture=True, behaviour=behaviour)
                message = {"Id": lead_id, "IsCreated": created, "AffectedRows": affected}
                return 200, {"Status": "Success", "Message": message}, "ok"
            if endpoint == CREATE_OR_UPDATE:
                lead_id, created, affected = self.upsert(pairs, capture=False, behaviour=None)
                message = {"Id": lead_id, "IsCreated": created, "AffectedRows": affected}
                return 200, {"Status": "Success", "Message": message}, "ok"
            lead_id = params.get("leadid", "").strip()
            if not lead_id:
                raise _BadRequest("the leadId query parameter is required")
            self.update(lead_id, pairs)
            return 200, {"Status": "Success", "Message": {"AffectedRows": 1}}, "ok"
        except _BadRequest as exc:
            return 400, {"Message": f"The request body is not per spec: {exc}"}, "error"
        except ApiError as exc:
            envelope = {
                "Status": "Error",
                "ExceptionType": exc.exception_type,
                "ExceptionMessage": exc.message,
            }
            return 500, envelope, "error"

    # --- rules ----------------------------------------------------------------------------------------

    def _check(self, pairs: list[tuple[str, str]]) -> tuple[dict[str, str], str | None, str | None]:
        """Refuse what no lead-API call may carry; return ``(fields, SearchBy, ProspectId)``.

        Unknown attributes are refused all at once (``Attribute(s) does not exist - X,Y``), any
        ``mx_Portal_*`` attribute before anything else, and every value is checked against its field.
        """
        portal = [a for a, _ in pairs if a.lower().startswith(PORTAL_PREFIX)]
        if portal:
            raise ApiError(
                _INVALID,
                "Attribute(s) not accepted through the lead API - " + ",".join(portal) + " (the sandbox "
                "refuses portal fields here: they are set by the portal's Register call only)",
            )
        unknown = [
            a
            for a, _ in pairs
            if a.lower() not in self._by_name and a.lower() not in (SEARCH_BY.lower(), PROSPECT_ID.lower())
        ]
        if unknown:
            raise ApiError(_UNKNOWN, f"Attribute(s) does not exist - {','.join(unknown)}")
        fields: dict[str, str] = {}
        search_by = prospect_id = None
        for attribute, value in pairs:
            name = attribute.lower()
            if name == SEARCH_BY.lower():
                search_by = value.strip()
                continue
            if name == PROSPECT_ID.lower():
                prospect_id = value.strip() or None
                continue
            field = self._by_name[name]
            _check_value(field, value)
            fields[field.schema_name] = value
        return fields, search_by, prospect_id

    def _search_field(self, search_by: str, fields: dict[str, str]) -> str:
        field = self._by_name.get(search_by.lower())
        if field is None or not field.is_lead_identifier:
            raise ApiError(
                _INVALID,
                f"SearchBy '{search_by}' is not a unique lead field (unique: {', '.join(self._unique)})",
            )
        if not fields.get(field.schema_name, "").strip():
            raise ApiError(_INVALID, f"SearchBy names {field.schema_name}, which the lead has no value for")
        return field.schema_name

    def _match(
        self, fields: dict[str, str], search_by: str | None, prospect_id: str | None, capture: bool
    ) -> _Lead | None:
        state = self.state
        if search_by:
            attribute = self._search_field(search_by, fields)
            return state._find(attribute, fields[attribute])
        if capture and prospect_id:
            lead = state._leads.get(prospect_id)
            email = fields.get("EmailAddress", "").strip().casefold()
            if lead is not None and (
                not email or lead.fields.get("EmailAddress", "").strip().casefold() == email
            ):
                return lead
        for attribute in ("EmailAddress", "Phone"):
            if fields.get(attribute, "").strip():
                lead = state._find(attribute, fields[attribute])
                if lead is not None:
                    return lead
        return None

    def _apply(
        self, lead: _Lead | None, fields: dict[str, str], behaviour: str | None
    ) -> tuple[_Lead, bool, int]:
        """Create or update under the state's lock; a lead's portal password hash is never touched."""
        state = self.state
        if lead is not None and behaviour == "DoNotUpdate":
            return lead, False, 0
        changes = dict(fields)
        if lead is not None and behaviour == "UpdateOnlyEmptyFields":
            changes = {a: v for a, v in changes.items() if not lead.fields.get(a, "").strip()}
        if lead is not None and behaviour == "DoNotUpdateUniqueFields":
            changes = {a: v for a, v in changes.items() if not self._by_name[a.lower()].is_lead_identifier}
        for attribute, value in changes.items():
            if self._by_name[attribute.lower()].is_lead_identifier and value.strip():
                holder = state._find(attribute, value)
                if holder is not None and holder is not lead:
                    raise ApiError(_DUPLICATE, f"A lead with the same {attribute} already exists.")
        if lead is None:
            missing = [
                f.schema_name
                for f in self.fields
                if f.is_mandatory and not changes.get(f.schema_name, "").strip()
            ]
            if missing:
                raise ApiError(_MANDATORY, "Mandatory attribute(s) missing - " + ", ".join(missing))
            lead = _Lead(str(uuid.uuid4()), {})
            state._leads[lead.lead_id] = lead
            lead.fields.update(changes)
            return lead, True, 1
        lead.fields.update(changes)
        return lead, False, 1

    def upsert(
        self, pairs: list[tuple[str, str]], *, capture: bool, behaviour: str | None
    ) -> tuple[str, bool, int]:
        """Lead.Capture (``capture``) or Lead.CreateOrUpdate: ``(lead id, created, affected rows)``."""
        fields, search_by, prospect_id = self._check(pairs)
        with self.state._lock:
            lead = self._match(fields, search_by, prospect_id, capture)
            lead, created, affected = self._apply(lead, fields, behaviour)
            return lead.lead_id, created, affected

    def update(self, lead_id: str, pairs: list[tuple[str, str]]) -> None:
        """Lead.Update: change the fields of lead ``lead_id``; never creates one."""
        fields, _, _ = self._check(pairs)
        with self.state._lock:
            lead = self.state._leads.get(lead_id)
            if lead is None:
                raise ApiError(_NOT_FOUND, f"No lead exists with the id {lead_id}.")
            self._apply(lead, fields, None)

    def bulk(self, records: list[list[tuple[str, str]]]) -> list[dict[str, Any]]:
        """Lead/Bulk/CreateOrUpdate: each record on its own; one result per record, in order."""
        results: list[dict[str, Any]] = []
        for number, pairs in enumerate(records, start=1):
            try:
                lead_id, created, _ = self.upsert(pairs, capture=False, behaviour=None)
            except ApiError as exc:
                results.append(
                    {
                        "RowNumber": number,
                        "LeadId": None,
                        "LeadCreated": False,
                        "LeadUpdated": False,
                        "ExceptionType": exc.exception_type,
                        "ExceptionMessage": exc.message,
                    }
                )
                continue
            results.append(
                {"RowNumber": number, "LeadId": lead_id, "LeadCreated": created, "LeadUpdated": not created}
            )
        return results

    def get_by_email(self, email: str) -> list[dict[str, Any]]:
        """Leads.GetByEmailaddress: ``[{"ProspectID": ..., <fields>}]``, ``[]`` when none matches."""
        with self.state._lock:
            lead = self.state._find("EmailAddress", email)
            return [] if lead is None else [{"ProspectID": lead.lead_id, **lead.fields}]


def _check_value(field: SandboxField, value: str) -> None:
    """Refuse a value its field cannot hold: longer than ``MaxLength``, not a dropdown option, not a
    number, date or e-mail address for those types. An empty value is always accepted (it blanks)."""
    text = value.strip()
    if not text:
        return
    name = field.display_name or field.schema_name
    if field.max_length is not None and len(value) > field.max_length:
        raise ApiError(
            _INVALID,
            f"{name} ({field.schema_name}) takes at most {field.max_length} characters, got {len(value)}",
        )
    kind = field.data_type.lower()
    problem = None
    if kind == "select" and text not in field.options:
        problem = "is not one of its options"
    elif kind == "number":
        try:
            float(text)
        except ValueError:
            problem = "is not a number"
    elif kind in ("date", "datetime"):
        try:
            dt.datetime.strptime(text[:10], "%Y-%m-%d")
        except ValueError:
            problem = "is not a date (YYYY-MM-DD)"
    elif kind == "email" and ("@" not in text or text.startswith("@") or text.endswith("@")):
        problem = "is not an e-mail address"
    if problem:
        raise ApiError(_INVALID, f"The value of {name} ({field.schema_name}) {problem}")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest("not valid JSON") from exc


def _pairs(data: Any) -> list[tuple[str, str]]:
    """A lead body, ``[{"Attribute", "Value"}]``, as its pairs."""
    if not isinstance(data, list):
        raise _BadRequest('expected a JSON array of {"Attribute", "Value"} objects')
    pairs: list[tuple[str, str]] = []
    for item in data:
        if not isinstance(item, dict):
            raise _BadRequest("each entry must be an object")
        attribute, value = item.get("Attribute"), item.get("Value")
        if not isinstance(attribute, str) or not isinstance(value, str):
            raise _BadRequest("each entry needs string Attribute and Value")
        pairs.append((attribute, value))
    return pairs


def _records(data: Any) -> list[list[tuple[str, str]]]:
    if not isinstance(data, list):
        raise _BadRequest("expected a JSON array of leads, each an array of Attribute/Value objects")
    return [_pairs(record) for record in data]


__all__ = ["MAX_BULK_RECORDS", "BulkWindow", "LeadApi", "SandboxField", "default_fields", "route"]
