"""The lead APIs of :class:`~airflow_provider_lsq.hooks.leadsquared.LeadSquaredHook` (a mixin).

Lead updates never go through Register, which (re)sets the portal password (API notes, "Field
behaviour"): they use the lead APIs under ``{lead API host}/v2/LeadManagement.svc/`` (API notes,
"Lead APIs"), through the hook's one call path (keys, the account's rate limit, retries, error
mapping). No method here ever sends an ``mx_Portal_*`` field: a lead holding one is refused before
any call, naming the field.

The lead is found by the first unique identifier, as Register finds it: ``identifier_attribute``
when given, else the first of EmailAddress, Phone, Mobile in the lead's order; it goes first in the
body and is named in ``SearchBy``.

- upsert: :meth:`~LeadApiMixin.create_or_update_lead` (``Lead.CreateOrUpdate?postUpdatedLead=false``);
- create only: :meth:`~LeadApiMixin.create_lead` (``Lead.Capture?LeadUpdateBehavior=DoNotUpdate``:
  an existing lead is left as it is and reported ``exists``);
- update only: :meth:`~LeadApiMixin.update_lead` (``Lead.Update?leadId=``, the lead id known or found
  with ``Leads.GetByEmailaddress``: no documented call never creates otherwise);
- bulk upsert of at most 25: :meth:`~LeadApiMixin.bulk_create_or_update_leads`
  (``Lead/Bulk/CreateOrUpdate``, its own window as well as the account's);
- :meth:`~LeadApiMixin.get_lead_by_email`, :meth:`~LeadApiMixin.get_lead_fields`
  (``LeadsMetaData.Get``, fetched once per hook).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.exceptions import (
    LeadSquaredAPIError,
    LeadSquaredConfigError,
    LeadSquaredError,
    LeadSquaredValidationError,
)
from airflow_provider_lsq.hooks.payload import UNIQUE_IDENTIFIERS, attribute_values, no_identifier_error
from airflow_provider_lsq.hooks.rate_limit import AccountRateLimiter
from airflow_provider_lsq.hooks.rate_limit.paired import PairedLimiter
from airflow_provider_lsq.lead_fields import LeadField, is_portal_field, parse_lead_fields

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from airflow_provider_lsq.hooks.config import LeadSquaredConfig
    from airflow_provider_lsq.hooks.rate_limit.paired import CallBudget

LEAD_API_PATH = "/v2/LeadManagement.svc/"
CAPTURE_PATH = LEAD_API_PATH + "Lead.Capture"
CREATE_OR_UPDATE_PATH = LEAD_API_PATH + "Lead.CreateOrUpdate"
UPDATE_PATH = LEAD_API_PATH + "Lead.Update"
BULK_CREATE_OR_UPDATE_PATH = LEAD_API_PATH + "Lead/Bulk/CreateOrUpdate"
GET_BY_EMAIL_PATH = LEAD_API_PATH + "Leads.GetByEmailaddress"
METADATA_PATH = LEAD_API_PATH + "LeadsMetaData.Get"
MAX_BULK_RECORDS = 25  # API notes, "Lead APIs": at most 25 records a bulk call
SEARCH_BY = "SearchBy"
CREATED, UPDATED, EXISTS, NOT_FOUND, FAILED, INVALID = (
    "created",
    "updated",
    "exists",
    "not_found",
    "failed",
    "invalid",
)


@dataclass(frozen=True)
class LeadResult:
    """What one lead call did.

    :param lead_id: the lead's id (None when ``action`` is ``not_found``).
    :param action: ``created``, ``updated``, ``exists`` (create only: the lead was there and was left
        as it is) or ``not_found`` (update only: no such lead; nothing was created).
    :param attempts: HTTP attempts made in all (a find and an update count both).
    """

    lead_id: str | None
    action: str
    attempts: int = 1


@dataclass(frozen=True)
class BulkLeadResult:
    """One record's result in a bulk call, in the order the records were given.

    :param index: the record's position in the list given (0-based).
    :param action: ``created``, ``updated``, ``failed`` (LeadSquared refused this record: its
        ``error_type`` and ``message``; or the answer held no result for it, ``retryable``) or
        ``invalid`` (refused before the call, not sent).
    """

    index: int
    action: str
    lead_id: str | None = None
    error_type: str | None = None
    message: str | None = None
    retryable: bool = False


def build_lead_api_fields(
    lead: Mapping[str, Any],
    *,
    identifier_attribute: str | None = None,
    blank: Collection[str] = (),
    search_by: bool = True,
) -> list[dict[str, str]]:
    """Validate ``lead`` and build a lead-API body: ``[{"Attribute", "Value"}]``, identifier first.

    A missing value (None, empty text, NaN, ...) leaves the field out, so it is never blanked on the
    lead, unless its attribute is in ``blank`` (then it is sent empty). ``SearchBy`` names the
    identifier when ``search_by``.

    :raises LeadSquaredValidationError: naming the field, before any call: an ``mx_Portal_*`` field
        (portal fields are Register's alone), a ``SearchBy`` key (the hook sets it), a name that is not
        a schema name, a value that cannot be sent, or no unique identifier.
    """
    if not isinstance(lead, Mapping):
        raise LeadSquaredValidationError(
            f"a lead must be a mapping of attribute names, got {type(lead).__name__}"
        )
    refuse_portal_fields(lead)
    fields: list[dict[str, str]] = []
    for attribute, value in attribute_values(lead, _refuse_search_by):
        if value is None and attribute in blank:
            value = ""
        if value is not None:
            fields.append({"Attribute": attribute, "Value": value})
    identifier = identifier_attribute or next(
        (f["Attribute"] for f in fields if f["Attribute"] in UNIQUE_IDENTIFIERS and f["Value"]), None
    )
    if identifier is None:
        raise no_identifier_error()
    if not any(f["Attribute"] == identifier and f["Value"] for f in fields):
        raise LeadSquaredValidationError(
            f"field {identifier!r}: the unique identifier is missing or empty", field=identifier
        )
    fields.sort(key=lambda f: f["Attribute"] != identifier)  # stable: only moves it first
    if search_by:
        fields.append({"Attribute": SEARCH_BY, "Value": identifier})
    return fields


def _refuse_search_by(attribute: str) -> None:
    if attribute.lower() == SEARCH_BY.lower():
        raise LeadSquaredValidationError(
            f"field {attribute!r}: SearchBy is set by the hook (the identifier attribute)", field=attribute
        )


def refuse_portal_fields(lead: Mapping[str, Any]) -> None:
    """Raise before any call when ``lead`` holds an ``mx_Portal_*`` field (any case).

    The API notes' design rule: nothing documented says a lead update keeps the portal password if a
    portal field is sent, so none ever is; portal fields are set by Register only.

    :raises LeadSquaredValidationError: naming the first such field.
    """
    for attribute in lead:
        if isinstance(attribute, str) and is_portal_field(attribute):
            raise LeadSquaredValidationError(
                f"field {attribute!r}: portal fields (mx_Portal_*) are never sent through the lead API; "
                "a portal password is set by registration only",
                field=attribute,
            )


class LeadApiMixin:
    """The lead APIs, mixed into :class:`~airflow_provider_lsq.hooks.leadsquared.LeadSquaredHook`."""

    if TYPE_CHECKING:
        leadsquared_conn_id: str

        @property
        def config(self) -> LeadSquaredConfig: ...

        @property
        def rate_limiter(self) -> AccountRateLimiter: ...

        def redact(self, text: str) -> str: ...

        def _call(
            self,
            method: str,
            path: str,
            *,
            params: Mapping[str, Any] | None = None,
            json: Any = None,
            headers: Mapping[str, str] | None = None,
            host: str | None = None,
            secrets: Iterable[str] = (),
            may_send: Callable[[], bool] | None = None,
            budget: CallBudget | None = None,
        ) -> tuple[Any, int]: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lead_fields_lock = threading.Lock()
        self._lead_fields: tuple[LeadField, ...] | None = None
        self._bulk_budget: PairedLimiter | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def _lead_call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, int]:
        """One lead-API call on the lead API host, through the hook's call path."""
        return self._call(method, path, params=params, json=json, host=self.config.lead_api_url, **kwargs)

    @property
    def bulk_budget(self) -> PairedLimiter:
        """The bulk call's budget: its own window (``bulk_rate_limit_calls`` per
        ``bulk_rate_limit_period_seconds``, in the same storage as the account's) paired with the
        account's window. Opened once per hook; the limiters are shared per process and account.

        :raises LeadSquaredConfigError: the storage cannot be opened (as :attr:`rate_limiter`).
        """
        if self._bulk_budget is None:
            account = self.rate_limiter  # opens (and checks) the storage first, with its errors
            try:
                bulk = AccountRateLimiter.for_account(self.config.bulk_budget())
            except LeadSquaredError:
                raise
            except Exception as error:
                raise LeadSquaredConfigError(
                    f"Connection {self.leadsquared_conn_id!r}: the bulk call's rate-limit window could not "
                    f"be opened ({type(error).__name__}: {self.redact(str(error))}).",
                    field="bulk_rate_limit_calls",
                    conn_id=self.leadsquared_conn_id,
                ) from None
            self._bulk_budget = PairedLimiter(bulk, account)
        return self._bulk_budget

    # -- the account's fields --------------------------------------------------------------------

    def get_lead_fields(self) -> tuple[LeadField, ...]:
        """The account's lead fields (``LeadsMetaData.Get``, API notes "Lead APIs"), fetched once per
        hook and kept: one call whatever the number of rows checked against them.

        :returns: the fields in the account's order (:class:`~airflow_provider_lsq.lead_fields.LeadField`).
        :raises LeadSquaredError: the call failed (``LeadSquaredAPIError`` for an answer that is not a
            list of fields).
        """
        with self._lead_fields_lock:
            if self._lead_fields is None:
                body, _ = self._lead_call("GET", METADATA_PATH)
                self._lead_fields = parse_lead_fields(body)
            return self._lead_fields

    def get_lead_by_email(self, email: str) -> dict[str, Any] | None:
        """The lead with this e-mail address (``Leads.GetByEmailaddress``), or None (it answers ``[]``).

        :returns: the lead's fields by schema name, with its id under ``ProspectID``.
        """
        if not isinstance(email, str) or not email.strip():
            raise LeadSquaredValidationError(
                "field 'EmailAddress': the e-mail address is empty", field="EmailAddress"
            )
        body, _ = self._lead_call("GET", GET_BY_EMAIL_PATH, params={"emailaddress": email.strip()})
        return self._first_lead(body)

    @staticmethod
    def _first_lead(body: Any) -> dict[str, Any] | None:
        if not isinstance(body, list):
            raise LeadSquaredAPIError("LeadSquared's Leads.GetByEmailaddress answer was not a list of leads.")
        leads = [lead for lead in body if isinstance(lead, dict)]
        return leads[0] if leads else None

    # -- one lead --------------------------------------------------------------------------------

    def create_or_update_lead(
        self,
        lead: Mapping[str, Any],
        *,
        identifier_attribute: str | None = None,
        blank: Collection[str] = (),
    ) -> LeadResult:
        """Upsert one lead (``Lead.CreateOrUpdate?postUpdatedLead=false``), found by ``SearchBy`` = the
        first unique identifier. Its portal password, if it is a portal user, is not touched.

        :raises LeadSquaredValidationError: before any call (see :func:`build_lead_api_fields`).
        :raises LeadSquaredError: the call failed (``LeadSquaredLeadExistsError`` for a unique value of
            another lead).
        """
        fields = build_lead_api_fields(lead, identifier_attribute=identifier_attribute, blank=blank)
        body, attempts = self._lead_call(
            "POST", CREATE_OR_UPDATE_PATH, params={"postUpdatedLead": "false"}, json=fields
        )
        lead_id, created = self._upsert_answer(body, "Lead.CreateOrUpdate", attempts)
        return LeadResult(lead_id, CREATED if created else UPDATED, attempts)

    def create_lead(
        self,
        lead: Mapping[str, Any],
        *,
        identifier_attribute: str | None = None,
        blank: Collection[str] = (),
    ) -> LeadResult:
        """Create one lead, never update one: ``Lead.Capture?LeadUpdateBehavior=DoNotUpdate`` with
        ``SearchBy`` (API notes, "Lead APIs"). A lead found by the identifier is left as it is and the
        result's action is ``exists``.

        :raises LeadSquaredValidationError: before any call.
        :raises LeadSquaredAPIError: the answer does not say whether the lead was created.
        """
        fields = build_lead_api_fields(lead, identifier_attribute=identifier_attribute, blank=blank)
        body, attempts = self._lead_call(
            "POST", CAPTURE_PATH, params={"LeadUpdateBehavior": "DoNotUpdate"}, json=fields
        )
        lead_id, created = self._upsert_answer(body, "Lead.Capture", attempts)
        return LeadResult(lead_id, CREATED if created else EXISTS, attempts)

    def update_lead(
        self,
        lead: Mapping[str, Any],
        *,
        lead_id: str | None = None,
        identifier_attribute: str | None = None,
        blank: Collection[str] = (),
    ) -> LeadResult:
        """Update one existing lead, never create one: ``Lead.Update?leadId=``.

        No documented call updates by identifier without creating when the lead is missing, so the
        lead id is needed: ``lead_id`` when known (e.g. from the registration ledger), else found with
        ``Leads.GetByEmailaddress`` (the only lookup the notes document), so without ``lead_id`` the
        identifier must be ``EmailAddress``. A lead not found is ``not_found``: nothing is sent.

        :raises LeadSquaredValidationError: before any call, also when there is no ``lead_id`` and the
            identifier is not ``EmailAddress``.
        """
        fields = build_lead_api_fields(
            lead, identifier_attribute=identifier_attribute, blank=blank, search_by=False
        )
        attempts = 0
        if lead_id is None:
            identifier = fields[0]
            if identifier["Attribute"] != "EmailAddress":
                raise LeadSquaredValidationError(
                    f"field {identifier['Attribute']!r}: an update-only call finds the lead by EmailAddress "
                    "(Leads.GetByEmailaddress) or needs its lead id; no documented call finds it by "
                    f"{identifier['Attribute']} without creating one",
                    field=identifier["Attribute"],
                )
            body, attempts = self._lead_call(
                "GET", GET_BY_EMAIL_PATH, params={"emailaddress": identifier["Value"]}
            )
            found = self._first_lead(body)
            lead_id = str(found.get("ProspectID") or found.get("ProspectId") or "") if found else ""
            if not lead_id:
                return LeadResult(None, NOT_FOUND, attempts)
        _, more = self._lead_call("POST", UPDATE_PATH, params={"leadId": lead_id}, json=fields)
        return LeadResult(lead_id, UPDATED, attempts + more)

    @staticmethod
    def _upsert_answer(body: Any, call: str, attempts: int) -> tuple[str, bool]:
        """``(lead id, created)`` from ``{"Status": "Success", "Message": {"Id", "IsCreated"}}``."""
        message = body.get("Message") if isinstance(body, dict) else None
        lead_id = message.get("Id") if isinstance(message, dict) else None
        created = message.get("IsCreated") if isinstance(message, dict) else None
        if not lead_id or not isinstance(created, bool):
            raise LeadSquaredAPIError(
                f"LeadSquared answered {call} without the lead's Id and IsCreated.", attempts=attempts
            )
        return str(lead_id), created

    # -- bulk ------------------------------------------------------------------------------------

    def bulk_create_or_update_leads(
        self,
        leads: Sequence[Mapping[str, Any]],
        *,
        identifier_attribute: str | None = None,
        blank: Collection[str] = (),
    ) -> list[BulkLeadResult]:
        """Upsert at most 25 leads in one ``Lead/Bulk/CreateOrUpdate`` call, each with its own
        ``SearchBy``; one result per lead, in the order given.

        The call waits for a place in the bulk call's own window (the connection's
        ``bulk_rate_limit_calls`` per ``bulk_rate_limit_period_seconds``) and in the account's. A lead
        that fails the client-side checks is ``invalid`` and left out of the call (no call at all when
        none is left); a lead LeadSquared refuses is ``failed`` with its error; a lead the answer holds
        no result for is ``failed`` and ``retryable`` (an upsert can be sent again).

        :raises LeadSquaredValidationError: before any call: more than 25 leads, or any lead holding an
            ``mx_Portal_*`` field.
        :raises LeadSquaredError: the call as a whole failed (every lead is then unsent or unknown).
        """
        if len(leads) > MAX_BULK_RECORDS:
            raise LeadSquaredValidationError(
                f"a bulk call takes at most {MAX_BULK_RECORDS} leads (API notes, 'Lead APIs'), got "
                f"{len(leads)}; split them into calls of {MAX_BULK_RECORDS}"
            )
        for lead in leads:
            if isinstance(lead, Mapping):
                refuse_portal_fields(lead)
        results: dict[int, BulkLeadResult] = {}
        sent: list[int] = []
        records: list[list[dict[str, str]]] = []
        for index, lead in enumerate(leads):
            try:
                records.append(
                    build_lead_api_fields(lead, identifier_attribute=identifier_attribute, blank=blank)
                )
            except LeadSquaredValidationError as error:
                results[index] = BulkLeadResult(
                    index, INVALID, error_type=error.error_type, message=error.message
                )
                continue
            sent.append(index)
        if records:
            body, _ = self._lead_call(
                "POST", BULK_CREATE_OR_UPDATE_PATH, json=records, budget=self.bulk_budget
            )
            results.update(self._bulk_answer(body, sent))
        return [results[index] for index in range(len(leads))]

    def _bulk_answer(self, body: Any, sent: list[int]) -> dict[int, BulkLeadResult]:
        """Each sent record's result, by its index: by ``RowNumber`` (1-based) when given, else by
        position in the answer."""
        entries = body if isinstance(body, list) else []
        results: dict[int, BulkLeadResult] = {}
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            row = entry.get("RowNumber")
            slot = row - 1 if isinstance(row, int) and not isinstance(row, bool) else position
            if not 0 <= slot < len(sent) or sent[slot] in results:
                continue
            index = sent[slot]
            lead_id = entry.get("LeadId")
            error_type = entry.get("ExceptionType")
            if error_type or not lead_id:
                message = self.redact(str(entry.get("ExceptionMessage") or "no lead id in the result"))
                results[index] = BulkLeadResult(
                    index, FAILED, error_type=str(error_type or "MissingLeadId"), message=message[:500]
                )
            else:
                action = CREATED if entry.get("LeadCreated") is True else UPDATED
                results[index] = BulkLeadResult(index, action, lead_id=str(lead_id))
        for index in sent:
            if index not in results:
                results[index] = BulkLeadResult(
                    index,
                    FAILED,
                    error_type="MissingResult",
                    message="LeadSquared's bulk answer held no result for this lead; it may or may not "
                    "have been applied, and sending it again is safe (an upsert).",
                    retryable=True,
                )
        return results


__all__ = [
    "MAX_BULK_RECORDS",
    "BulkLeadResult",
    "LeadApiMixin",
    "LeadResult",
    "build_lead_api_fields",
    "refuse_portal_fields",
]
