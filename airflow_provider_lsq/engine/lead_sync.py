"""Updating leads through the lead API, as an engine operation: never Register, never a password.

Three modes (``SqlToLeadSquaredLeadOperator``'s ``mode``):

- ``update``: update only, never create: ``Lead.Update?leadId=`` with the lead id the planner knows
  (the registration ledger's, or this ledger's), else the lead found by its e-mail address
  (:meth:`~airflow_provider_lsq.hooks.lead_api.LeadApiMixin.update_lead`). No such lead: ``not_found``;
  a lead id LeadSquared no longer knows: ``not_found`` too. Nothing is created.
- ``upsert``: ``Lead/Bulk/CreateOrUpdate``, up to 25 rows a call (:attr:`LeadSync.batch_size`), its
  own rate-limit window held with the account's; each record's own result is its row's outcome.
- ``create``: ``Lead.Capture?LeadUpdateBehavior=DoNotUpdate``, one call per row: ``created``, or
  ``exists`` (the lead was there and was left as it is).

The lead is found by the first unique identifier, as Register finds it. No ``mx_Portal_*`` field is
ever sent (the run's columns are refused before any call: :meth:`LeadSync.preflight`); a NULL value
leaves its field out unless ``blank_null_fields`` names it (or is True). Lead-API calls are idempotent
(sending the same fields twice leaves the lead as once), so an answer that proves nothing is a
retryable failure here, not ``unconfirmed``: no password is at stake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.engine.operation import RowOperation
from airflow_provider_lsq.exceptions import (
    LeadSquaredAuthenticationError,
    LeadSquaredBudgetUnavailableError,
    LeadSquaredConfigError,
    LeadSquaredError,
    LeadSquaredStoppedError,
    LeadSquaredUnconfirmedError,
    LeadSquaredValidationError,
)
from airflow_provider_lsq.hooks.lead_api import (
    CREATED,
    EXISTS,
    FAILED,
    INVALID,
    MAX_BULK_RECORDS,
    NOT_FOUND,
    UPDATED,
    build_lead_api_fields,
)
from airflow_provider_lsq.hooks.leadsquared import RETRYABLE_ERRORS
from airflow_provider_lsq.lead_fields import is_portal_field
from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.preflight import LeadSquaredPreflightError, Preflight
from airflow_provider_lsq.version_compat import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from airflow_provider_lsq.hooks.lead_api import BulkLeadResult, LeadResult
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook

MODES = ("update", "upsert", "create")
# The sandbox's (and, as far as the notes show, LeadSquared's) answer to Lead.Update of an unknown id.
LEAD_NOT_FOUND_ERROR = "MXLeadNotFoundException"
_STATUS = {
    CREATED: RegistrationStatus.CREATED,
    UPDATED: RegistrationStatus.UPDATED,
    EXISTS: RegistrationStatus.EXISTS,
    NOT_FOUND: RegistrationStatus.NOT_FOUND,
}


class LeadRow(dict[str, Any]):
    """A row's attributes, as sent, with what the planner knows of its lead (not sent): ``lead_id``."""

    lead_id: str | None = None


def refuse_portal_columns(columns: Sequence[str]) -> None:
    """``AirflowFailException`` naming every ``mx_Portal_*`` column, before any call."""
    portal = [column for column in columns if is_portal_field(column)]
    if portal:
        raise AirflowFailException(
            f"The query's columns {', '.join(repr(c) for c in portal)} are portal fields (mx_Portal_*): "
            "they are never sent through the lead API (only registration sets a portal password). "
            "Leave them out of the query. Nothing was sent."
        )


class LeadSync(RowOperation):
    """Send each row's fields to its lead through the lead API (see the module's docstring).

    :param mode: ``update``, ``upsert`` or ``create``.
    :param identifier_attribute: the lead's unique identifier, sent first (None: the first of
        EmailAddress, Phone, Mobile in the row).
    :param blank_null_fields: True: a NULL column blanks its field; a list: those attributes only;
        False (default): a NULL leaves its field as LeadSquared has it.
    :param preflight: check the run's columns and each row's values against the account's lead
        fields (``LeadsMetaData.Get``, once per run) before any row is sent.
    """

    thread_prefix = "lsq-lead"

    def __init__(
        self,
        *,
        mode: str = "update",
        identifier_attribute: str | None = "EmailAddress",
        blank_null_fields: bool | Sequence[str] = False,
        preflight: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(blank_null_fields, bool):
            blank_null_fields = [str(name) for name in blank_null_fields]
            refuse_portal_columns(blank_null_fields)
        self.mode = mode
        self.identifier_attribute = identifier_attribute
        self.blank_null_fields = blank_null_fields
        self.use_preflight = preflight
        self.checks: Preflight | None = None
        self.batch_size = MAX_BULK_RECORDS if mode == "upsert" else 1

    @property
    def creating(self) -> bool:
        """Rows may create leads (upsert, create only): the account's mandatory fields apply."""
        return self.mode != "update"

    def blank(self, row: Mapping[str, Any]) -> Collection[str]:
        """The attributes a NULL value blanks in ``row`` (see ``blank_null_fields``)."""
        if self.blank_null_fields is True:
            return set(row)
        if self.blank_null_fields is False:
            return ()
        return set(self.blank_null_fields)

    def fields(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        """The ``[{"Attribute", "Value"}]`` pairs a call would send for ``row`` (no ``SearchBy``).

        :raises LeadSquaredValidationError: the row cannot be sent (naming the field).
        """
        return build_lead_api_fields(
            row, identifier_attribute=self.identifier_attribute, blank=self.blank(row), search_by=False
        )

    # -- before any row ------------------------------------------------------------------------------

    def preflight(self, hook: LeadSquaredHook, columns: Sequence[str]) -> None:
        """Refuse ``mx_Portal_*`` columns (always, with no call); then, with ``preflight``, fetch the
        account's fields once and refuse a column no row could be sent with. A lead-update run that
        cannot read the fields fails: it would otherwise spend the quota on rows the account refuses
        (set ``preflight=False`` for an account whose key may not call ``LeadsMetaData.Get``)."""
        refuse_portal_columns(columns)
        if not self.use_preflight:
            return
        try:
            checks = Preflight.from_hook(hook)
        except (LeadSquaredAuthenticationError, LeadSquaredConfigError) as error:
            raise AirflowFailException(
                "The account's lead fields could not be read (LeadsMetaData.Get: "
                f"{hook.redact(error.message)}); nothing was sent. Set preflight=False if this key "
                "may not read them."
            ) from None
        except LeadSquaredError as error:
            raise AirflowException(
                f"The account's lead fields could not be read (LeadsMetaData.Get, {error.error_type}: "
                f"{hook.redact(error.message)}); nothing was sent."
            ) from None
        try:
            checks.require_columns(
                columns, identifier_attribute=self.identifier_attribute, creating=self.creating
            )
        except LeadSquaredPreflightError as error:
            raise AirflowFailException(error.message) from None
        self.checks = checks

    def prepare(self, hook: LeadSquaredHook) -> None:
        """Nothing to log in to: the lead API takes the connection's keys on every call."""

    # -- each row ------------------------------------------------------------------------------------

    def check(self, key: str, row: Mapping[str, Any]) -> RegistrationOutcome | None:
        try:
            self.fields(row)
        except LeadSquaredValidationError as error:
            return RegistrationOutcome.invalid(key, error.message, error_type=error.error_type)
        if self.checks is not None:
            problem = self.checks.lead_problem(row, creating=self.creating)
            if problem is not None:
                return RegistrationOutcome.invalid(key, problem, error_type="PreflightError")
        return None

    def call(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], may_send: Callable[[], bool] | None
    ) -> LeadResult:
        if may_send is not None and not may_send():
            raise LeadSquaredStoppedError("the row's claim is no longer this run's", attempts=0)
        options: dict[str, Any] = {
            "identifier_attribute": self.identifier_attribute,
            "blank": self.blank(row),
        }
        if self.mode == "create":
            return hook.create_lead(row, **options)
        if self.mode == "upsert":
            return hook.create_or_update_lead(row, **options)
        return hook.update_lead(row, lead_id=getattr(row, "lead_id", None), **options)

    def outcome(self, key: str, row: Mapping[str, Any], result: LeadResult) -> RegistrationOutcome:
        return RegistrationOutcome.lead(key, _STATUS[result.action], result.lead_id, result.attempts)

    def failure(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], error: LeadSquaredError
    ) -> RegistrationOutcome:
        if isinstance(error, LeadSquaredValidationError):
            return RegistrationOutcome.invalid(key, error.message, error_type=error.error_type)
        if isinstance(error, LeadSquaredAuthenticationError | LeadSquaredBudgetUnavailableError):
            raise error  # no row can get past it: the run stops, once every call made has its outcome
        if isinstance(error, LeadSquaredStoppedError):
            if error.attempts <= 1:
                return RegistrationOutcome.not_sent(key)
            return _failed(key, error, retryable=True)
        if self.mode == "update" and error.error_type == LEAD_NOT_FOUND_ERROR:
            # The lead id known for the key is gone (merged or deleted): nothing was created.
            return RegistrationOutcome.lead(key, RegistrationStatus.NOT_FOUND, None, error.attempts)
        if isinstance(error, LeadSquaredUnconfirmedError):
            return _failed(key, error, retryable=True)  # idempotent: sending it again is safe
        return _failed(key, error, retryable=isinstance(error, RETRYABLE_ERRORS))

    def run_batch(
        self,
        hook: LeadSquaredHook,
        rows: Sequence[tuple[str, Mapping[str, Any]]],
        may_send: Callable[[str], bool] | None,
    ) -> list[RegistrationOutcome]:
        """Upsert: the rows in one ``Lead/Bulk/CreateOrUpdate`` call; each record's result is its row's."""
        if self.mode != "upsert":
            return super().run_batch(hook, rows, may_send)
        outcomes: dict[str, RegistrationOutcome] = {}
        send = []
        for key, row in rows:
            if may_send is not None and not may_send(key):
                outcomes[key] = RegistrationOutcome.not_sent(key)
            else:
                send.append((key, row))
        if send:
            blank: set[str] = set()
            for _, row in send:
                blank |= set(self.blank(row))
            try:
                results = hook.bulk_create_or_update_leads(
                    [row for _, row in send], identifier_attribute=self.identifier_attribute, blank=blank
                )
            except LeadSquaredError as error:
                for key, row in send:
                    outcomes[key] = self.failure(hook, key, row, error)
            else:
                for (key, _), result in zip(send, results, strict=True):
                    outcomes[key] = _bulk_outcome(key, result)
        return [outcomes[key] for key, _ in rows]


def _bulk_outcome(key: str, result: BulkLeadResult) -> RegistrationOutcome:
    """One record's result in a bulk answer, as its row's outcome."""
    if result.action == INVALID:
        return RegistrationOutcome.invalid(
            key, result.message or "refused", error_type=result.error_type or ""
        )
    if result.action == FAILED:
        return RegistrationOutcome.failed(
            key, result.error_type or "BulkRecordError", result.message or "", 1, retryable=result.retryable
        )
    return RegistrationOutcome.lead(key, _STATUS[result.action], result.lead_id, 1)


def _failed(key: str, error: LeadSquaredError, *, retryable: bool) -> RegistrationOutcome:
    return RegistrationOutcome.failed(
        key, error.error_type, error.message, error.attempts, retryable=retryable
    )
