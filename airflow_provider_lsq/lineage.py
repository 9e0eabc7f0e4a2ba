"""OpenLineage for the registration operators, reported through Airflow's OpenLineage provider.

The operators' ``get_openlineage_facets_on_complete`` delegate here; Airflow's OpenLineage provider
calls them when a task ends (and on failure, where they report what the run finished). Nothing here
imports OpenLineage until it is called, and without ``apache-airflow-providers-openlineage`` every
function returns None: nothing changes.

What is reported:

- ``SqlToLeadSquaredPortalOperator``: the datasets its query reads, parsed with the OpenLineage
  provider's ``SQLParser`` from the warehouse hook's OpenLineage database info, exactly as
  common-sql's ``SQLExecuteQueryOperator`` does (so only for databases whose common-sql hook provides
  that info, e.g. PostgreSQL, Snowflake, MySQL; not SQLite); the ``sql`` job facet; the ledger table
  as an output (same naming, from the ledger's hook); and the portal as an output.
- ``RegisterPortalUserOperator``: the portal as an output.

Connections are read while the task runs, not when the event is built: :func:`prepare_lineage`,
called from ``execute()``, computes every part that needs a connection (the parts the operator's
``read_lineage`` names) and keeps it on the operator. On Airflow 3 the OpenLineage listener builds
the COMPLETE and FAIL events in a forked process, where a connection lookup can hang (``airflow
dags test`` with connections stored in the metadata database waited there until the listener's
timeout, and the task's COMPLETE event was lost). It is called first thing, before the operator's
own checks, so a task failing those has its parts too; the warehouse's queries get at most the
listener's ``[openlineage] execution_timeout`` (see :func:`reading_timeout`).

The portal's dataset has namespace ``leadsquared://<portal API host>`` and name ``portal/<portal_id>``
(the same as its asset, :mod:`airflow_provider_lsq.assets`), the run's counts as the
``leadsquaredRegistration`` output facet and the rows registered as the standard
``outputStatistics.rowCount``. No key, token, password or lead value is in any of it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from airflow_provider_lsq.assets import SCHEME, portal_uri

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from airflow.providers.common.sql.hooks.sql import DbApiHook
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_lsq.hooks.config import LeadSquaredConfig
    from airflow_provider_lsq.operators.base import LeadSquaredBaseOperator

log = logging.getLogger(__name__)
T = TypeVar("T")


def openlineage_installed() -> bool:
    """True when Airflow's OpenLineage provider can be imported."""
    try:
        import airflow.providers.openlineage.extractors  # noqa: F401
    except ImportError:
        return False
    return True


def openlineage_enabled(operator: Any = None) -> bool:
    """True when the OpenLineage provider is installed, not turned off (``[openlineage] disabled`` or
    no transport) and, for ``operator``, neither disabled for its class (``disabled_for_operators``)
    nor left out by selective enable: only then is preparing the lineage worth its queries."""
    if not openlineage_installed():
        return False
    try:
        from airflow.providers.openlineage.conf import is_disabled
    except ImportError:  # an older provider: let it decide later, as before
        return True
    try:
        if is_disabled():
            return False
        if operator is None:
            return True
        return _emits_operator_lineage(operator)
    except Exception:  # a configuration (or provider) it cannot read: it will say so itself
        return True


def _emits_operator_lineage(operator: Any) -> bool:
    """Whether the listener will ask ``operator`` for its lineage: its emission policy (newer
    providers, where ``disabled_for_operators`` and selective enable are translated into one), else
    those two options themselves."""
    try:
        from airflow.providers.openlineage.utils.emission_policy import resolve_task_emission_policy
    except ImportError:
        from airflow.providers.openlineage.utils.utils import (
            is_operator_disabled,
            is_selective_lineage_enabled,
        )

        return not is_operator_disabled(operator) and is_selective_lineage_enabled(operator)
    controls = resolve_task_emission_policy(
        operator=operator, dag_id=operator.dag_id, task_id=operator.task_id
    )
    return bool(controls.emit and getattr(controls, "extract_operator_metadata", True))


def reading_timeout() -> float:
    """Seconds the lineage's reads may take: the OpenLineage provider's ``[openlineage]
    execution_timeout`` (default 10), the time its listener gives a whole event."""
    try:
        from airflow.providers.openlineage.conf import execution_timeout

        return max(float(execution_timeout()), 0.1)
    except Exception:
        return 10.0


@dataclass(frozen=True)
class PreparedLineage:
    """What a registration's lineage needs from its connections, read while the task runs.

    ``query``: the query's inputs and SQL facets (None: none could be read); ``ledger``: the ledger
    table as an output (None: none); ``portal``: the portal's ``(namespace, name)`` (None: no portal).
    """

    query: OperatorLineage | None = None
    ledger: OperatorLineage | None = None
    portal: tuple[str, str] | None = None
    leads: tuple[str, str] | None = None  # the lead-update transfer's: the account's leads


def prepare_lineage(operator: LeadSquaredBaseOperator) -> None:
    """Read the operator's lineage parts from its connections and keep them on ``operator`` (as
    ``prepared_lineage``), for the events built after ``execute()`` started.

    Called first thing in ``execute()``, so a task failing on its own checks (a connection value
    refused, no portal_id) has its parts too: the FAIL event then needs no connection lookup, which
    on Airflow 3 happens in a forked process where it can hang. The warehouse queries (its current
    schema, ``information_schema``) take at most :func:`reading_timeout` seconds: a busy or hung
    warehouse costs the query's and the ledger's datasets, never the run's time. Does nothing when
    OpenLineage is not installed or turned off; never raises (what cannot be read is left out with a
    warning). Which parts are read is the operator's :meth:`~LeadSquaredBaseOperator.read_lineage`:
    :func:`read_transfer_parts` for the transfer, :func:`read_portal_parts` for the list operator.
    """
    operator.prepared_lineage = None
    if not openlineage_enabled(operator):
        return
    operator.prepared_lineage = operator.read_lineage(reading_timeout(), look_up_now=True)


# The names of releases before the operators' base class: the same function for either operator.
prepare_transfer_lineage = prepare_lineage
prepare_portal_lineage = prepare_lineage


def _portal_name(config: LeadSquaredConfig) -> tuple[str, str] | None:
    return portal_dataset_name(config.base_url, config.portal_id) if config.portal_id else None


def portal_dataset_name(base_url: str, portal_id: str) -> tuple[str, str]:
    """``(namespace, name)`` of a portal: ``("leadsquared://<host>", "portal/<portal_id>")``."""
    parts = urlsplit(portal_uri(base_url, portal_id))
    return f"{SCHEME}://{parts.netloc}", parts.path.lstrip("/")


def portal_output(portal: tuple[str, str] | None, counts: Mapping[str, Any] | None) -> Any:
    """The portal ``(namespace, name)`` as an OpenLineage output dataset, with the run's counts when
    there are any; None without a portal."""
    from airflow.providers.common.compat.openlineage.facet import (
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
    )

    from airflow_provider_lsq.lineage_facets import FACET_NAME, LeadSquaredRegistrationOutputDatasetFacet

    if portal is None:
        return None
    namespace, name = portal
    facets: dict[str, Any] = {}
    if counts:
        facets[FACET_NAME] = LeadSquaredRegistrationOutputDatasetFacet(
            registered=int(counts.get("registered", 0)),
            alreadyRegistered=int(counts.get("already_registered", 0)),
            invalid=int(counts.get("invalid", 0)),
            failed=int(counts.get("failed", 0)),
            total=int(counts.get("total", 0)),
            skipped=int(counts.get("skipped", 0)),
            duplicates=int(counts.get("duplicates", 0)),
            dryRun=bool(counts.get("dry_run", False)),
            unconfirmed=int(counts.get("unconfirmed", 0)),
        )
        facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(
            rowCount=int(counts.get("registered", 0))
        )
    return OutputDataset(namespace=namespace, name=name, outputFacets=facets)


def portal_lineage(operator: Any) -> OperatorLineage | None:
    """``RegisterPortalUserOperator``'s lineage: the portal as output, with the run's counts."""
    if not openlineage_installed():
        return None
    from airflow.providers.openlineage.extractors import OperatorLineage

    counts = getattr(operator, "registration_counts", None)
    prepared = _prepared(operator)
    output = _guarded("the portal", lambda: portal_output(prepared.portal, counts))
    return OperatorLineage(outputs=[output] if output is not None else [])


def _prepared(operator: LeadSquaredBaseOperator) -> PreparedLineage:
    """The parts ``execute()`` prepared, or, for an event built before it did (a task that failed
    before ``execute()``), the same parts read now. On Airflow 3 that is in the listener's forked
    process, where a connection lookup can hang: the reading gets half of the listener's time, so
    the event is still sent, without what could not be read in time."""
    prepared = getattr(operator, "prepared_lineage", None)
    if isinstance(prepared, PreparedLineage):
        return prepared
    return operator.read_lineage(reading_timeout() / 2, look_up_now=False)


def read_portal_parts(operator: Any, seconds: float, *, look_up_now: bool) -> PreparedLineage:
    """The portal's name, read within ``seconds`` (``RegisterPortalUserOperator``'s parts)."""
    parts = {"the portal": _part(look_up_now, lambda: _lsq_config(operator), _portal_name)}
    return PreparedLineage(portal=_within(seconds, parts).get("the portal"))


def read_transfer_parts(operator: Any, seconds: float, *, look_up_now: bool) -> PreparedLineage:
    """The transfer's parts, read within ``seconds``; with ``look_up_now`` its connections are looked
    up in the calling thread (a task's, where Airflow 3's lookups are made) and only the warehouse's
    queries run in the reading thread."""
    from airflow_provider_lsq.warehouse import get_db_hook  # common-sql: only when there is a query

    sql = operator.sql.strip().rstrip(";").strip()
    ledger_conn_id = operator.ledger_conn_id or operator.sql_conn_id
    parts = {
        "the portal": _part(look_up_now, lambda: _lsq_config(operator), _portal_name),
        "the query's tables": _part(
            look_up_now,
            lambda: _with_connection(get_db_hook(operator.sql_conn_id, "sql_conn_id")),
            lambda hook: _sql_lineage(hook, sql, use_connection=None),
        ),
        "the ledger table": _part(
            look_up_now,
            lambda: _with_connection(get_db_hook(ledger_conn_id, "ledger_conn_id")),
            lambda hook: _ledger_lineage(hook, operator.ledger_table),
        ),
    }
    read = _within(seconds, parts)
    return PreparedLineage(
        query=read.get("the query's tables"),
        ledger=read.get("the ledger table"),
        portal=read.get("the portal"),
    )


def _lsq_config(operator: Any) -> LeadSquaredConfig:
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook

    return LeadSquaredHook(operator.leadsquared_conn_id).config


def _with_connection(hook: DbApiHook) -> DbApiHook:
    """``hook`` with its connection looked up (common-sql's hooks keep it, so their queries look up
    nothing more)."""
    _connection(hook)
    return hook


def _connection(hook: DbApiHook) -> Any:
    try:
        return hook.connection
    except AttributeError:  # a hook without common-sql's cached ``connection``
        return hook.get_connection(hook.get_conn_id())


def _part(
    look_up_now: bool, look_up: Callable[[], Any], use: Callable[[Any], T | None]
) -> Callable[[], T | None]:
    """``use(look_up())`` as one part to read; with ``look_up_now`` the lookup is done here and now
    (an error it raises is raised again when the part is read, and reported there)."""
    if not look_up_now:
        return lambda: use(look_up())
    try:
        found = look_up()
    except Exception as error:
        failure = error

        def fail() -> T | None:
            raise failure

        return fail
    return lambda: use(found)


def _within(seconds: float, parts: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each part read in turn (guarded) in a daemon thread; what was read within ``seconds``. A part
    still being read then is left out with a warning, its thread abandoned (a database call has no
    bound of its own: a hung warehouse would hold the task, or the listener, with it)."""
    read: dict[str, Any] = {}
    over = threading.Event()  # past ``seconds``: the parts not begun yet are not begun at all

    def work() -> None:
        for what, compute in parts.items():
            if over.is_set():
                return
            value = _guarded(what, compute, quiet=over)
            read[what] = value

    thread = threading.Thread(target=work, name="lsq-openlineage", daemon=True)
    thread.start()
    thread.join(seconds)
    over.set()
    done = dict(read)
    if thread.is_alive():
        late = [what for what in parts if what not in done]
        log.warning("OpenLineage: %s could not be read within %g s: left out.", ", ".join(late), seconds)
    return done


def _ledger_lineage(hook: DbApiHook, table: str) -> OperatorLineage | None:
    """The ledger's dataset, named by the same parser: a statement writing to it, parsed, never run."""
    return _sql_lineage(hook, f"INSERT INTO {table} (row_key) VALUES ('')", False)


def transfer_lineage(operator: Any) -> OperatorLineage | None:
    """``SqlToLeadSquaredPortalOperator``'s lineage: query inputs, ledger and portal outputs, counts."""
    if not openlineage_installed():
        return None
    from airflow.providers.openlineage.extractors import OperatorLineage

    # Each part on its own: a warehouse that is down (the very reason a task fails) costs the query's
    # inputs, not the portal and the counts of what the run finished.
    prepared = _prepared(operator)
    query, ledger = prepared.query, prepared.ledger
    outputs: list[Any] = list(ledger.outputs) if ledger is not None else []
    counts = getattr(operator, "registration_counts", None)
    portal = _guarded("the portal", lambda: portal_output(prepared.portal, counts))
    if portal is not None:
        outputs.append(portal)
    if query is None:
        return OperatorLineage(outputs=outputs)
    return OperatorLineage(
        inputs=list(query.inputs),
        outputs=outputs,
        run_facets=query.run_facets,
        job_facets=query.job_facets,
    )


def _guarded(what: str, compute: Callable[[], T | None], quiet: threading.Event | None = None) -> T | None:
    """``compute()``, or None (logged by error type only: a database's message may quote data; not
    logged once ``quiet`` is set: the part was already reported as left out when its time ran out)."""
    try:
        return compute()
    except Exception as error:
        if quiet is None or not quiet.is_set():
            log.warning("OpenLineage: %s could not be read (%s): left out.", what, type(error).__name__)
        return None


def _sql_lineage(hook: DbApiHook, sql: str, use_connection: bool | None) -> OperatorLineage | None:
    """The OpenLineage of ``sql`` as common-sql's ``SQLExecuteQueryOperator`` computes it, or None when
    the hook gives no OpenLineage database info (SQLite, for one).

    ``use_connection`` None: as the OpenLineage provider decides (it may read the columns' schema).
    """
    from airflow.providers.openlineage.sqlparser import SQLParser
    from airflow.providers.openlineage.utils.utils import should_use_external_connection

    connection = _connection(hook)
    try:
        database_info = hook.get_openlineage_database_info(connection)
    except AttributeError:
        database_info = None
    if database_info is None:
        log.debug("%s gives no OpenLineage database info: no SQL datasets.", type(hook).__name__)
        return None
    parser = SQLParser(
        dialect=hook.get_openlineage_database_dialect(connection),
        default_schema=hook.get_openlineage_default_schema(),
    )
    return parser.generate_openlineage_metadata_from_sql(
        sql=sql,
        hook=hook,
        database_info=database_info,
        sqlalchemy_engine=hook.get_sqlalchemy_engine(),
        use_connection=should_use_external_connection(hook) if use_connection is None else use_connection,
    )


# -- the lead-update transfer -------------------------------------------------------------------------


def leads_dataset_name(config: LeadSquaredConfig) -> tuple[str, str]:
    """``(namespace, name)`` of an account's leads: ``("leadsquared://<lead API host>", "leads")``."""
    return f"{SCHEME}://{urlsplit(config.lead_api_url).netloc.lower()}", "leads"


def read_lead_sync_parts(operator: Any, seconds: float, *, look_up_now: bool) -> PreparedLineage:
    """``SqlToLeadSquaredLeadOperator``'s parts: the query's tables, its ledger table, the leads."""
    transfer = read_transfer_parts(operator, seconds, look_up_now=look_up_now)
    leads = _within(
        seconds, {"the leads": _part(look_up_now, lambda: _lsq_config(operator), leads_dataset_name)}
    )
    return PreparedLineage(query=transfer.query, ledger=transfer.ledger, leads=leads.get("the leads"))


def lead_sync_lineage(operator: Any) -> OperatorLineage | None:
    """``SqlToLeadSquaredLeadOperator``'s lineage: the query's inputs; its ledger table and the
    account's leads as outputs (the leads with ``outputStatistics.rowCount``: rows updated or created)."""
    if not openlineage_installed():
        return None
    from airflow.providers.common.compat.openlineage.facet import (
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
    )
    from airflow.providers.openlineage.extractors import OperatorLineage

    prepared = _prepared(operator)
    outputs: list[Any] = list(prepared.ledger.outputs) if prepared.ledger is not None else []
    counts = getattr(operator, "registration_counts", None) or {}
    if prepared.leads is not None:
        namespace, name = prepared.leads
        facets: dict[str, Any] = {}
        if counts:
            sent = int(counts.get("updated", 0)) + int(counts.get("created", 0))
            facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=sent)
        outputs.append(OutputDataset(namespace=namespace, name=name, outputFacets=facets))
    query = prepared.query
    if query is None:
        return OperatorLineage(outputs=outputs)
    return OperatorLineage(
        inputs=list(query.inputs), outputs=outputs, run_facets=query.run_facets, job_facets=query.job_facets
    )
