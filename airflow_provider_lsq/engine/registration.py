"""Registering portal users, as an engine operation: the Register call and what its answers mean.

The hook sends one Register call and returns its result or raises (:meth:`LeadSquaredHook.register`);
this operation turns that into the row's outcome: ``registered``, ``already_registered`` (only new
leads, and LeadSquared found the lead by the identifier sent first), ``invalid`` (refused before or
by the call), ``unconfirmed`` (sent, and no answer said what happened), ``failed`` (retryable or
not) or not sent (stopped before its call). What no row can
get past (a failed login, a portal id LeadSquared does not know) stops the run instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.engine.operation import RowDecided, RowOperation
from airflow_provider_lsq.exceptions import (
    LeadSquaredAuthenticationError,
    LeadSquaredBudgetUnavailableError,
    LeadSquaredConfigError,
    LeadSquaredError,
    LeadSquaredLeadExistsError,
    LeadSquaredStoppedError,
    LeadSquaredUnconfirmedError,
    LeadSquaredValidationError,
)
from airflow_provider_lsq.hooks.leadsquared import (
    INVALID_PORTAL_ERROR,
    RETRYABLE_ERRORS,
    duplicate_is_first_identifier,
)
from airflow_provider_lsq.hooks.payload import build_lead_fields
from airflow_provider_lsq.outcomes import RegistrationOutcome
from airflow_provider_lsq.passwords import generate_password
from airflow_provider_lsq.preflight import LeadSquaredPreflightError, Preflight
from airflow_provider_lsq.version_compat import AirflowFailException

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
    from airflow_provider_lsq.outcomes import RegistrationResult

# Stands in for the password in dry runs and pre-checks, so they validate exactly like real runs. Never sent.
DRY_RUN_PASSWORD = "DryRun-Placeholder-1!"


def check_lead(key: str, lead: Any, identifier_attribute: str | None) -> RegistrationOutcome | None:
    """Validate a lead as the hook would, without any call: an ``invalid`` outcome, or None if valid."""
    try:
        build_lead_fields(lead, DRY_RUN_PASSWORD, identifier_attribute=identifier_attribute)
    except LeadSquaredValidationError as error:
        return RegistrationOutcome.invalid(key, error.message)
    return None


class PortalRegistration(RowOperation):
    """Register each row's lead as a portal user of the connection's portal.

    :param identifier_attribute: the lead's unique identifier, sent first.
    :param only_new_leads: refuse existing leads (``already_registered``) instead of upgrading them.
    :param password_callable: ``callable(lead) -> password``; default a fresh random one per lead.
    :param preflight: check the run's columns and values against the account's lead fields first
        (see :meth:`preflight`).
    """

    thread_prefix = "lsq-register"

    def __init__(
        self,
        *,
        identifier_attribute: str | None = None,
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        preflight: bool = False,
    ) -> None:
        self.identifier_attribute = identifier_attribute
        self.only_new_leads = only_new_leads
        self.make_password = password_callable or (lambda _lead: generate_password())
        self.use_preflight = preflight
        self.checks: Preflight | None = None
        self._unchecked: tuple[LeadSquaredHook, list[str]] | None = None  # columns to check, once

    def preflight(self, hook: LeadSquaredHook, columns: Sequence[str]) -> None:
        """With ``preflight``: the run's columns, checked against the account's lead fields when the
        first row that would be sent is checked (:meth:`check`), so before any row is sent, and a run
        with nothing to send (a rerun) makes no call at all. A column no row could be registered with
        stops the run; each row's values are checked from then on.

        Registration must work on accounts whose key may not read the fields (``LeadsMetaData.Get``
        is a lead API the portal's Register does not need): a failed read logs a WARNING and the run
        goes on unchecked, as before preflight existed.
        """
        if self.use_preflight and self.checks is None:
            self._unchecked = (hook, list(columns))

    def _check_columns(self) -> None:
        if self._unchecked is None:
            return
        hook, columns = self._unchecked
        self._unchecked = None
        try:
            checks = Preflight.from_hook(hook)
        except LeadSquaredError as error:
            hook.log.warning(
                "Preflight skipped: the account's lead fields could not be read (LeadsMetaData.Get, %s). "
                "Rows are registered unchecked; LeadSquared refuses what does not fit.",
                error.error_type,
            )
            return
        try:
            checks.require_columns(
                columns, identifier_attribute=self.identifier_attribute, creating=True, lead_api=False
            )
        except LeadSquaredPreflightError as error:
            raise AirflowFailException(error.message) from None
        self.checks = checks

    def check(self, key: str, row: Mapping[str, Any]) -> RegistrationOutcome | None:
        invalid = check_lead(key, row, self.identifier_attribute)
        if invalid is not None:
            return invalid
        self._check_columns()  # the first row that would be sent: the columns first, once
        if self.checks is not None:
            problem = self.checks.lead_problem(row, creating=True)
            if problem is not None:
                return RegistrationOutcome.invalid(key, problem, error_type="PreflightError")
        return None

    def prepare(self, hook: LeadSquaredHook) -> None:
        hook.require_portal_id()
        hook.get_public_auth_key()
        hook.get_registration_token()

    def call(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], may_send: Callable[[], bool] | None
    ) -> RegistrationResult:
        try:
            password = self.make_password(row)
        except Exception as error:  # a user's callable: its message could hold anything, so leave it out
            raise RowDecided(
                RegistrationOutcome.invalid(
                    key,
                    f"field 'mx_Portal_Password': password_callable raised {type(error).__name__}",
                    error_type="PasswordCallableError",
                )
            ) from None
        return hook.register(
            row,
            password,
            only_new_leads=self.only_new_leads,
            identifier_attribute=self.identifier_attribute,
            may_send=may_send,
        )

    def outcome(self, key: str, row: Mapping[str, Any], result: RegistrationResult) -> RegistrationOutcome:
        return RegistrationOutcome.registered(key, result.lead_id, result.attempts)

    def failure(
        self, hook: LeadSquaredHook, key: str, row: Mapping[str, Any], error: LeadSquaredError
    ) -> RegistrationOutcome:
        if isinstance(error, LeadSquaredValidationError):
            return RegistrationOutcome.invalid(key, error.message, error_type=error.error_type)
        if isinstance(error, LeadSquaredUnconfirmedError):  # sent, and no answer said what happened
            return RegistrationOutcome.unconfirmed(key, error.error_type, error.message, error.attempts)
        if isinstance(error, LeadSquaredAuthenticationError | LeadSquaredBudgetUnavailableError):
            raise error  # no row can get past it: the run stops, once every call made has its outcome
        if isinstance(error, LeadSquaredStoppedError):
            if error.attempts <= 1:
                return RegistrationOutcome.not_sent(key)  # it waited for the rate limit: never sent
            return RegistrationOutcome.failed(  # an earlier attempt was sent: keep its record
                key, error.error_type, error.message, error.attempts, retryable=True
            )
        if isinstance(error, LeadSquaredLeadExistsError):
            if self.only_new_leads and duplicate_is_first_identifier(
                error.message, row, self.identifier_attribute
            ):
                return RegistrationOutcome.already_registered(
                    key, error.error_type, error.message, error.attempts
                )
            return _failed(key, error)  # a duplicate of another unique field: this row's failure
        if error.error_type == INVALID_PORTAL_ERROR:  # every row would meet it: stop the run
            raise LeadSquaredConfigError(
                f"LeadSquared does not know the portal_id of connection {hook.leadsquared_conn_id!r} "
                f"({error.message}). Copy it from Workflow > Manage Portals in LeadSquared (it is in "
                "the page URL), and check that the host is this account's region.",
                field="portal_id",
                conn_id=hook.leadsquared_conn_id,
            ) from None
        return _failed(key, error)


def _failed(key: str, error: LeadSquaredError) -> RegistrationOutcome:
    return RegistrationOutcome.failed(
        key, error.error_type, error.message, error.attempts, retryable=isinstance(error, RETRYABLE_ERRORS)
    )
