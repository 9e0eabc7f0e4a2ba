"""RegisterPortalUserOperator: register a list of leads as LeadSquared portal users.

The operator stays thin: the hook registers (concurrently, within the account's rate limit), the
operator names the rows, counts the outcomes and decides whether the task failed. For warehouse-sized
inputs, or when personal data must stay out of XCom, use ``SqlToLeadSquaredPortalOperator``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.engine.duplicates import SeenRows, lead_identity
from airflow_provider_lsq.engine.rows import row_key
from airflow_provider_lsq.engine.run import RegistrationRun
from airflow_provider_lsq.engine.sinks import MemorySink
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.lineage import portal_lineage, read_portal_parts
from airflow_provider_lsq.log_caps import LogCap
from airflow_provider_lsq.operators.base import PortalRegistrationBaseOperator
from airflow_provider_lsq.version_compat import AirflowException

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_lsq.engine.rows import Row
    from airflow_provider_lsq.lineage import PreparedLineage
    from airflow_provider_lsq.progress import RegistrationProgress
    from airflow_provider_lsq.version_compat import Context

MAX_LOGGED_DUPLICATES = 50  # duplicate rows logged one by one, then only counted


class RegisterPortalUserOperator(PortalRegistrationBaseOperator):
    """Register leads as portal users of the connection's portal; return counts by status.

    Each row ends in one outcome (registered, already_registered, invalid, failed or unconfirmed:
    sent, and no answer said what happened). The list of
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
    :param preflight: check the leads' keys and values against the account's lead fields
        (``LeadsMetaData.Get``, once) before any row is sent, a dry run too; an account whose key may
        not read them logs a WARNING and registers unchecked (see ``docs/preflight.md``). Off by default.
    :param max_failure_ratio: fail the task when more than this share of rows is invalid or failed.
    :param dry_run: validate and map every row; make no call at all.
    :param max_workers: concurrent calls (default: the hook's choice from the rate limit).
    :param leadsquared_conn_id: the LeadSquared connection. Templated.
    :param flush_interval_seconds: how often outcomes are handed to XCom's list at the latest.

    One lead, one registration: a row whose key, or whose lead (the identifier sent first, e-mail
    addresses without regard to case), an earlier row of the list already has is not sent, since
    registering a lead again resets the password the first call set. It is counted in the summary's
    ``duplicates``, logged at WARNING with both row keys, and has no entry in ``outcomes`` (the first
    row's entry is the lead's).

    Any ``unconfirmed`` row fails the task, whatever ``max_failure_ratio``, without an Airflow retry
    (``AirflowFailException``): a retry would send every row again, those with new passwords. Its
    outcome in ``outcomes`` says what happened; a person decides whether to send it again.

    ``on_kill`` (Airflow stopping the task) stops taking rows, lets the calls in flight finish and
    pushes every outcome made so far to XCom; the task then fails.
    """

    template_fields: Sequence[str] = ("leads", "leadsquared_conn_id")

    def __init__(
        self,
        *,
        leads: Any,
        identifier_attribute: str | None = "EmailAddress",
        key_field: str | None = None,
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        preflight: bool = False,
        max_failure_ratio: float = 0.0,
        dry_run: bool = False,
        max_workers: int | None = None,
        leadsquared_conn_id: str = LeadSquaredHook.default_conn_name,
        flush_interval_seconds: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            identifier_attribute=identifier_attribute,
            only_new_leads=only_new_leads,
            password_callable=password_callable,
            preflight=preflight,
            max_failure_ratio=max_failure_ratio,
            dry_run=dry_run,
            max_workers=max_workers,
            leadsquared_conn_id=leadsquared_conn_id,
            flush_interval_seconds=flush_interval_seconds,
            **kwargs,
        )
        key = key_field or identifier_attribute
        if key is None:
            raise ValueError("set key_field (or identifier_attribute) so every row has a name in outcomes")
        self.leads = leads
        self.key_field = key

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
        self.start_execution()  # first: a task failing below still has its lineage
        leads = self._rendered_leads()
        started = time.monotonic()
        sink = MemorySink()
        self._run = run = RegistrationRun.for_operator(
            self,
            hook=LeadSquaredHook(leadsquared_conn_id=self.leadsquared_conn_id),
            sink=sink,
            total=len(leads),
        )
        progress = run.progress
        self.log.info(
            "%s %d leads as portal users (connection %r).",
            "Validating (dry run)" if self.is_dry_run else "Registering",
            len(leads),
            self.leadsquared_conn_id,
        )
        rows = self._keyed(leads, progress)
        columns = _columns(leads)

        def body() -> None:
            if columns:
                run.operation.preflight(run.hook, columns)  # the account's checks, before any row
            run.dry_run(rows) if self.is_dry_run else run.send(rows)

        try:
            with progress:
                run.execute(body)
        finally:  # a run stopped by a bad login or a kill still shows what it finished
            context["ti"].xcom_push(key="outcomes", value=sink.outcomes)
        return run.finish(
            self.is_dry_run,
            time.monotonic() - started,
            self.max_failure_ratio,
            on_summary=lambda summary: self.publish_counts(context, summary),
            name_rows=False,  # keys are lead values; the exception reaches lineage and callbacks
        )

    def read_lineage(self, seconds: float, *, look_up_now: bool) -> PreparedLineage:
        """The portal's name (see :mod:`airflow_provider_lsq.lineage`)."""
        return read_portal_parts(self, seconds, look_up_now=look_up_now)

    def operator_lineage(self) -> OperatorLineage | None:
        """The portal as output, with the run's counts."""
        return portal_lineage(self)

    def _keyed(self, leads: Iterable[Any], progress: RegistrationProgress) -> Iterator[Row]:
        with contextlib.closing(SeenRows(on_disk=False)) as seen:  # the list is in memory already
            yield from self._keyed_rows(leads, progress, seen)

    def _keyed_rows(
        self, leads: Iterable[Any], progress: RegistrationProgress, seen: SeenRows
    ) -> Iterator[Row]:
        reported = LogCap(MAX_LOGGED_DUPLICATES)
        for position, row in enumerate(leads, 1):
            key, outcome = row_key(position, row, self.key_field)
            if outcome is not None:
                yield outcome  # no usable key: named by position, never sent
                continue
            lead = lead_identity(row, self.identifier_attribute)
            if key in seen:
                earlier, why = key, "the same row key"
            elif lead is not None and (holder := seen.lead_holder(lead[1])) is not None:
                earlier, why = holder, f"the same lead (same {lead[0]})"
            else:
                earlier = None
            if earlier is not None:
                progress.add_duplicate()
                if reported.take():
                    self.log.warning(
                        "Row %s (position %d) is not sent: %s as row %s earlier in the list; "
                        "registering it again would reset that lead's portal password.",
                        key,
                        position,
                        why,
                        earlier,
                    )
                elif reported.first_over:
                    self.log.warning("Further duplicate rows are counted in the summary, not logged.")
                continue
            seen.add(key)
            if lead is not None:
                seen.add_lead(lead[1], key)
            yield key, row


def _columns(leads: Iterable[Any]) -> list[str]:
    """Every attribute the leads name, in the order first met (the run's columns)."""
    names: dict[str, None] = {}
    for lead in leads:
        if isinstance(lead, Mapping):
            names.update((str(name), None) for name in lead)
    return list(names)
