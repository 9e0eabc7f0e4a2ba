"""The base classes of the provider's operators: what every LeadSquared bulk operator shares.

``LeadSquaredBaseOperator`` holds what any operator sending rows to LeadSquared one call per row has:
the connection, the identifier sent first, the failure ratio, the dry run, the worker count and the
flush interval; ``on_kill`` (it stops the run the operator's ``execute`` started); its OpenLineage
(each operator says which parts it reads, :meth:`read_lineage`, and how they make its lineage,
:meth:`operator_lineage`); and its published counts (asset events and lineage). A subclass builds its
run, hands it to ``self._run`` and stays thin.

``PortalRegistrationBaseOperator`` adds the registration's own parameters (``only_new_leads``,
``password_callable``): both ``RegisterPortalUserOperator`` and ``SqlToLeadSquaredPortalOperator``
derive from it. A lead-update operator derives from ``LeadSquaredBaseOperator`` and returns its
own operation from :meth:`~LeadSquaredBaseOperator.row_operation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.assets import publish_counts
from airflow_provider_lsq.engine.registration import PortalRegistration
from airflow_provider_lsq.exceptions import LeadSquaredConfigError
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.lineage import prepare_lineage
from airflow_provider_lsq.outcomes import REGISTRATION_STATUSES
from airflow_provider_lsq.progress import check_failure_ratio
from airflow_provider_lsq.version_compat import AirflowFailException, BaseOperator

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_lsq.engine.operation import RowOperation
    from airflow_provider_lsq.engine.run import RegistrationRun
    from airflow_provider_lsq.hooks.config import LeadSquaredConfig
    from airflow_provider_lsq.lineage import PreparedLineage
    from airflow_provider_lsq.outcomes import RegistrationStatus
    from airflow_provider_lsq.version_compat import Context


class LeadSquaredBaseOperator(BaseOperator):
    """What every LeadSquared bulk operator shares (see the module's docstring).

    :param identifier_attribute: the lead's unique identifier, sent first.
    :param max_failure_ratio: fail the task when more than this share of rows is invalid or failed.
    :param dry_run: validate and map every row; make no call at all.
    :param max_workers: concurrent calls (default: the hook's choice from the rate limit).
    :param leadsquared_conn_id: the LeadSquared connection. Templated.
    :param flush_interval_seconds: outcomes wait at most this long (seconds) before they are recorded.
    """

    ui_color = "#e8f4fd"
    progress_interval: float = 10.0  # seconds between progress lines in the task log
    progress_label = "LeadSquared registration"  # how its progress lines start
    outcome_statuses: tuple[RegistrationStatus, ...] = REGISTRATION_STATUSES  # its summary's counts
    outcome_metric: Callable[[str, RegistrationStatus], None] | None = None  # None: registrations'

    def __init__(
        self,
        *,
        identifier_attribute: str | None = "EmailAddress",
        max_failure_ratio: float = 0.0,
        dry_run: bool = False,
        max_workers: int | None = None,
        leadsquared_conn_id: str = LeadSquaredHook.default_conn_name,
        flush_interval_seconds: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.identifier_attribute = identifier_attribute
        self.max_failure_ratio = check_failure_ratio(max_failure_ratio)
        self.is_dry_run = dry_run  # not ``self.dry_run``: that would shadow BaseOperator.dry_run()
        self.max_workers = max_workers
        self.leadsquared_conn_id = leadsquared_conn_id
        self.flush_interval_seconds = flush_interval_seconds
        self._run: RegistrationRun | None = None  # the run execute() started: on_kill stops it
        self.registration_counts: dict[str, Any] | None = None  # set by execute: lineage reads it
        self.prepared_lineage: PreparedLineage | None = None  # set by execute: lineage reads it

    # -- the run ---------------------------------------------------------------------------------

    def on_kill(self) -> None:
        """Stop taking rows, let the calls in flight finish and record them; return within seconds."""
        if self._run is not None:
            self._run.on_kill()

    def row_operation(self) -> RowOperation:
        """What the engine does with each row (see :mod:`airflow_provider_lsq.engine.operation`)."""
        raise NotImplementedError

    def connection_config(self, hook: LeadSquaredHook) -> LeadSquaredConfig:
        """The hook's connection, read; a connection value refused when read (``LeadSquaredConfigError``)
        is ``AirflowFailException``: no retry fixes a connection."""
        try:
            return hook.config
        except LeadSquaredConfigError as error:
            raise AirflowFailException(error.message) from error

    def require_portal_id(self, hook: LeadSquaredHook, *, needed_by: str) -> str:
        """The connection's portal id, or ``AirflowFailException`` (no retry fixes a connection)."""
        try:
            return hook.require_portal_id(needed_by=needed_by)
        except LeadSquaredConfigError as error:
            raise AirflowFailException(error.message) from error

    # -- what the run publishes: its counts and its lineage ------------------------------------------

    def start_execution(self) -> None:
        """First thing in ``execute()``: no counts of an earlier try (a retry in the same process),
        and the lineage's parts read now, so a task failing on its checks still has its lineage."""
        self.registration_counts = None
        prepare_lineage(self)

    def publish_counts(self, context: Context, summary: Mapping[str, Any]) -> None:
        """The run's counts to the portal outlets' asset events and to the lineage (counts only)."""
        publish_counts(self, context, summary)

    def read_lineage(self, seconds: float, *, look_up_now: bool) -> PreparedLineage:
        """The lineage's parts from the connections, within ``seconds`` (see :mod:`..lineage`)."""
        raise NotImplementedError

    def operator_lineage(self) -> OperatorLineage | None:
        """The OpenLineage of this task from its prepared parts and its counts."""
        raise NotImplementedError

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage (Airflow's OpenLineage provider calls it): see :mod:`airflow_provider_lsq.lineage`."""
        return self.operator_lineage()


class PortalRegistrationBaseOperator(LeadSquaredBaseOperator):
    """A LeadSquared bulk operator that registers leads as portal users.

    :param only_new_leads: refuse existing leads (``already_registered``) instead of upgrading them.
    :param password_callable: ``callable(lead) -> password``; default a fresh random password per lead.
    :param preflight: before the first row (and in a dry run), read the account's lead fields once
        (``LeadsMetaData.Get``) and check the run's columns (a column no row could be registered with
        fails the task before any row is sent, naming the closest real field) and each row's values
        (a value its field cannot hold makes that row ``invalid``). An account whose key may not read
        the fields logs a WARNING and registers unchecked. Off by default: a registration run makes
        no call it did not make before (a dry run none at all).
    """

    def __init__(
        self,
        *,
        only_new_leads: bool = False,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        preflight: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.only_new_leads = only_new_leads
        self.password_callable = password_callable
        self.preflight = preflight

    def row_operation(self) -> PortalRegistration:
        """Each row registered as a portal user (:mod:`airflow_provider_lsq.engine.registration`):
        one operation per ``execute()`` (its preflight's fields are that run's)."""
        return PortalRegistration(
            identifier_attribute=self.identifier_attribute,
            only_new_leads=self.only_new_leads,
            password_callable=self.password_callable,
            preflight=self.preflight,
        )
