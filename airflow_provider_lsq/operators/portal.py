"""RegisterPortalUserOperator: register a list of leads as LeadSquared portal users.

The operator stays thin: the hook registers (concurrently, within the account's rate limit), the
operator names the rows, counts the outcomes and decides whether the task failed. For warehouse-sized
inputs, or when personal data must stay out of XCom, use ``SqlToLeadSquaredPortalOperator``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, BaseOperator

from airflow_provider_lsq.assets import add_counts_to_portal_events
from airflow_provider_lsq.exceptions import LeadSquaredValidationError
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.hooks.payload import build_lead_fields
from airflow_provider_lsq.lineage import portal_lineage
from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationStatus
from airflow_provider_lsq.progress import RegistrationProgress, check_failure_ratio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from airflow.providers.common.compat.sdk import Context

# Stands in for the password in dry runs, so they validate exactly like real runs. Never sent.
DRY_RUN_PASSWORD = "DryRun-Placeholder-1!"
VALID = "valid"  # a dry run's status for a row that would be sent


def check_lead(key: str, lead: Any, identifier_attribute: str | None) -> RegistrationOutcome | None:
    """Validate a lead as the hook would, without any call: an ``invalid`` outcome, or None if valid."""
    try:
        build_lead_fields(lead, DRY_RUN_PASSWORD, identifier_attribute=identifier_attribute)
    except LeadSquaredValidationError as error:
        return invalid_outcome(key, error.message)
    return None


def invalid_outcome(key: str, message: str) -> RegistrationOutcome:
    """An ``invalid`` outcome with the client-side validation error type."""
    return RegistrationOutcome(
        key, RegistrationStatus.INVALID, error_type="ValidationError", error_message=message
    )


def valid_outcome_dict(key: str) -> dict[str, Any]:
    """A dry run's record of a row that passed validation (shaped like ``RegistrationOutcome.to_dict``)."""
    blank = {field.name: field.default for field in fields(RegistrationOutcome)}
    return {**blank, "key": key, "status": VALID}


def row_key(position: int, row: Any, key_field: str) -> tuple[str, RegistrationOutcome | None]:
    """The key naming ``row`` in outcomes; with an ``invalid`` outcome when the row has none.

    Rows without a usable key are named by their 1-based position, ``#<position>``.
    """
    fallback = f"#{position}"
    if not isinstance(row, Mapping):
        message = f"a lead must be a mapping of attribute names, got {type(row).__name__}"
        return fallback, invalid_outcome(fallback, message)
    value = row.get(key_field)
    if value is None or not str(value).strip():
        message = f"field {key_field!r}: the row key is missing or empty"
        return fallback, invalid_outcome(fallback, message)
    return str(value), None


class RegisterPortalUserOperator(BaseOperator):
    """Register leads as portal users of the connection's portal; return counts by status.

    Each row ends in one outcome (registered, already_registered, invalid or failed). The list of
    outcome dicts is pushed to XCom under ``outcomes`` (keyed by ``key_field``: keep that in mind if
    the key is personal data). Passwords are generated per lead and stored nowhere, unless
    ``password_callable`` makes them.

    :param leads: a list of dicts mapping attribute schema names to values (or an upstream task's
        output; a JSON string is accepted too). Templated.
    :param identifier_attribute: the lead's unique identifier, sent first so LeadSquared finds the lead
        by it (None: the lead's own order, with EmailAddress, Phone or Mobile required).
    :param key_field: the value naming a row in outcomes (default: ``identifier_attribute``). A row
        without it is invalid. It is a value of the lead and is sent with it.
    :param only_new_leads: refuse existing leads (``already_registered``) instead of upgrading them.
    :param password_callable: ``callable(lead) -> password``; default a fresh random password per lead.
    :param max_failure_ratio: fail the task when more than this share of rows is invalid or failed.
    :param dry_run: validate and map every row; make no call at all.
    :param max_workers: concurrent calls (default: the hook's choice from the rate limit).
    :param leadsquared_conn_id: the LeadSquared connection. Templated.
    """

    template_fields: Sequence[str] = ("leads", "leadsquared_conn_id")
    ui_color = "#e8f4fd"
    progress_interval: float = 10.0  # seconds between progress lines in the task log

    def __init__(
        self,
        *,
        leads: Any,
        identifier_attribute: str | None = "EmailAddress",
        key_field: str | None = None,
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        max_failure_ratio: float = 0.0,
        dry_run: bool = False,
        max_workers: int | None = None,
        leadsquared_conn_id: str = LeadSquaredHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        key = key_field or identifier_attribute
        if key is None:
            raise ValueError("set key_field (or identifier_attribute) so every row has a name in outcomes")
        self.leads = leads
        self.identifier_attribute = identifier_attribute
        self.key_field = key
        self.only_new_leads = only_new_leads
        self.password_callable = password_callable
        self.max_failure_ratio = check_failure_ratio(max_failure_ratio)
        self.is_dry_run = dry_run  # not ``self.dry_run``: that would shadow BaseOperator.dry_run()
        self.max_workers = max_workers
        self.leadsquared_conn_id = leadsquared_conn_id
        self.registration_counts: dict[str, Any] | None = None  # set by execute: lineage reads it

    def _rendered_leads(self) -> Sequence[Any]:
        leads = self.leads
        if isinstance(leads, str | bytes):
            try:
                leads = json.loads(leads)
            except ValueError:
                raise AirflowException("leads is a string but not JSON: pass a list of dicts") from None
        if isinstance(leads, Mapping):
            leads = [leads]
        if not isinstance(leads, Sequence) or isinstance(leads, str | bytes):
            raise AirflowException(f"leads must be a list of dicts, got {type(leads).__name__}")
        return leads

    def execute(self, context: Context) -> dict[str, Any]:
        leads = self._rendered_leads()
        started = time.monotonic()
        outcomes: list[dict[str, Any]] = []
        progress = RegistrationProgress(
            len(leads),
            interval=self.progress_interval,
            logger=self.log,
            conn_id=None if self.is_dry_run else self.leadsquared_conn_id,
        )
        self.log.info(
            "%s %d leads as portal users (connection %r).",
            "Validating (dry run)" if self.is_dry_run else "Registering",
            len(leads),
            self.leadsquared_conn_id,
        )
        try:
            with progress:
                if self.is_dry_run:
                    self._dry_run(leads, outcomes, progress)
                else:
                    self._register(leads, outcomes, progress)
        finally:  # a run stopped by a bad login still shows what it finished
            context["ti"].xcom_push(key="outcomes", value=outcomes)
        summary = progress.summary(self.is_dry_run, time.monotonic() - started)
        self.registration_counts = add_counts_to_portal_events(
            context, self.outlets, summary, leadsquared_conn_id=self.leadsquared_conn_id, log=self.log
        )
        self.log.info("LeadSquared registration summary: %s", summary)
        progress.raise_if_too_many_failures(self.max_failure_ratio)
        return summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage (Airflow's OpenLineage provider calls it): see :mod:`airflow_provider_lsq.lineage`."""
        return portal_lineage(self)

    def _dry_run(
        self, leads: Iterable[Any], outcomes: list[dict[str, Any]], progress: RegistrationProgress
    ) -> None:
        for position, row in enumerate(leads, 1):
            key, outcome = row_key(position, row, self.key_field)
            outcome = outcome or check_lead(key, row, self.identifier_attribute)
            if outcome is None:
                progress.add_valid()
                outcomes.append(valid_outcome_dict(key))
            else:
                progress.add(outcome)
                outcomes.append(outcome.to_dict())

    def _register(
        self, leads: Iterable[Any], outcomes: list[dict[str, Any]], progress: RegistrationProgress
    ) -> None:
        def record(outcome: RegistrationOutcome) -> None:
            progress.add(outcome)
            outcomes.append(outcome.to_dict())

        def keyed() -> Iterator[tuple[str, Mapping[str, Any]]]:
            for position, row in enumerate(leads, 1):
                key, outcome = row_key(position, row, self.key_field)
                if outcome is None:
                    yield key, row
                else:
                    record(outcome)  # no usable key: named by position, never sent

        stream = keyed()
        first = next(stream, None)
        if first is None:
            return  # nothing to send: no call at all
        hook = LeadSquaredHook(leadsquared_conn_id=self.leadsquared_conn_id)
        for outcome in hook.register_portal_users(
            itertools.chain((first,), stream),
            password_callable=self.password_callable,
            only_new_leads=self.only_new_leads,
            identifier_attribute=self.identifier_attribute,
            max_workers=self.max_workers,
        ):
            record(outcome)
