"""The LeadSquared portal as an Airflow Asset (a Dataset on Airflow 2.11): ``leadsquared://`` URIs.

A registration task with the portal's asset among its ``outlets`` marks the portal as updated when it
succeeds, so a downstream DAG (one that sends welcome messages, say) can be scheduled on new portal
users. The task puts the run's counts (never lead data) in the asset event's ``extra``.

The URI names the portal API host and the portal id: ``leadsquared://<host>/portal/<portal_id>``,
e.g. ``leadsquared://portalapi-us11.leadsquared.com/portal/8d4f...c2``. The provider declares the
scheme (``asset-uris`` on Airflow 3, ``dataset-uris`` on 2.x), so Airflow normalises such URIs with
:func:`sanitize_uri` and the OpenLineage provider maps them with
:func:`convert_asset_to_openlineage` onto the same dataset the operators report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from airflow.providers.common.compat.assets import Asset

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from urllib.parse import SplitResult

    from airflow.providers.common.compat.openlineage.facet import Dataset as OpenLineageDataset

SCHEME = "leadsquared"
# What an asset event's extra carries: counts of the run, nothing about any lead.
EVENT_COUNTS = (
    "total",
    "registered",
    "already_registered",
    "invalid",
    "failed",
    "unconfirmed",
    "skipped",
    "duplicates",
    "dry_run",
)
_DEFAULT_PORTS = {"https": 443, "http": 80}


def portal_host(base_url: str) -> str:
    """The host (and port, unless the default) of a portal API base URL, lower-cased.

    ``https://PortalAPI.leadsquared.com`` -> ``portalapi.leadsquared.com``;
    ``http://127.0.0.1:8765`` -> ``127.0.0.1:8765``. ``base_url`` is :attr:`LeadSquaredConfig.base_url`.
    """
    text = base_url.strip()
    parts = urlsplit(text if "://" in text else f"https://{text}")
    host = (parts.hostname or "").lower().rstrip(".")  # "host." is the same DNS name as "host"
    if not host:
        raise ValueError(f"no host in the portal API URL {base_url!r}")
    port = _port(parts, f"the portal API URL {base_url!r}")
    return _netloc(host, None if port == _DEFAULT_PORTS.get(parts.scheme) else port)


def _port(parts: SplitResult, what: str) -> int | None:
    try:
        return parts.port
    except ValueError as error:  # "Port could not be cast to integer value as 'abc'", out of range
        raise ValueError(f"{what}: the port is not a number from 0 to 65535 ({error})") from None


def _netloc(host: str, port: int | None) -> str:
    """``host[:port]``, an IPv6 address in brackets (``[::1]:8765``) so the URI parses back."""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def portal_uri(host: str, portal_id: str) -> str:
    """``leadsquared://<host>/portal/<portal_id>``; ``host`` may also be a full base URL."""
    if not portal_id:
        raise ValueError("portal_id is required for a portal's asset URI")
    return f"{SCHEME}://{portal_host(host)}/portal/{quote(portal_id, safe='')}"


def portal_asset(host: str, portal_id: str, *, name: str | None = None, **kwargs: Any) -> Asset:
    """The Asset (Dataset on 2.11) of a portal's users, to put in a registration task's ``outlets``.

    :param host: the connection's Portal API Host (bare, e.g. ``portalapi-us11.leadsquared.com``, or a
        full URL such as a sandbox's ``http://127.0.0.1:8765``).
    :param portal_id: the connection's ``portal_id``.
    :param name: the asset's name on Airflow 3 (default: its URI). Ignored on 2.11, where Datasets
        have only a URI.
    :param kwargs: more ``Asset`` arguments (``extra``, ``group``...).
    """
    uri = portal_uri(host, portal_id)
    if name is not None and _asset_has_names():
        return Asset(name=name, uri=uri, **kwargs)
    return Asset(uri=uri, **kwargs)


def _asset_has_names() -> bool:
    from airflow_provider_lsq.version_compat import AIRFLOW_V_3_0_PLUS

    return bool(AIRFLOW_V_3_0_PLUS)


def create_asset(*, host: str, portal_id: str, extra: dict[str, Any] | None = None) -> Asset:
    """The provider's asset factory (``asset-uris`` ``factory``): :func:`portal_asset`."""
    return portal_asset(host, portal_id, extra=extra) if extra else portal_asset(host, portal_id)


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Normalise a ``leadsquared://`` URI (Airflow calls it for the declared scheme).

    The host is lower-cased and loses an explicit 443; the path must be ``/portal/<portal_id>`` (a
    trailing slash is dropped); a query or fragment is refused. Raises ValueError on anything else.
    """
    hostname = (uri.hostname or "").lower().rstrip(".")  # "host." is the same DNS name as "host"
    if not uri.netloc or not hostname:
        raise ValueError("URI format leadsquared:// must contain the portal API host")
    if uri.query or uri.fragment:
        raise ValueError("URI format leadsquared:// takes no query or fragment")
    parts = uri.path.rstrip("/").split("/")
    if len(parts) != 3 or parts[1] != "portal" or not parts[2]:
        raise ValueError("URI format leadsquared:// must be leadsquared://<host>/portal/<portal_id>")
    port = _port(uri, "URI format leadsquared://")
    host = _netloc(hostname, None if port == 443 else port)
    return uri._replace(scheme=SCHEME, netloc=host, path="/".join(parts))


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any) -> OpenLineageDataset:
    """The OpenLineage dataset of a portal asset: namespace ``leadsquared://<host>``, name ``portal/<id>``."""
    from airflow.providers.common.compat.openlineage.facet import Dataset as OpenLineageDataset

    parts = urlsplit(asset.uri)
    return OpenLineageDataset(namespace=f"{SCHEME}://{parts.netloc}", name=parts.path.lstrip("/"))


def portal_id_of(uri: str) -> str | None:
    """The portal id in a ``leadsquared://`` URI, or None for another URI."""
    parts = urlsplit(uri)
    if parts.scheme != SCHEME:
        return None
    segments = parts.path.strip("/").split("/")
    return unquote(segments[1]) if len(segments) == 2 and segments[0] == "portal" else None


def add_counts_to_portal_events(
    context: Mapping[str, Any],
    outlets: Iterable[Any],
    summary: Mapping[str, Any],
    *,
    leadsquared_conn_id: str,
    log: Any,
) -> dict[str, Any]:
    """Put the run's counts in the asset event of every ``leadsquared://`` outlet; return the counts.

    Only the keys in :data:`EVENT_COUNTS` are copied from ``summary`` (the operators' return value).
    An outlet naming another portal than the connection's gets the counts too (Airflow emits its
    event anyway), with a warning. Without ``outlet_events`` in the context (a direct ``execute``)
    nothing is set.
    """
    counts = {key: summary[key] for key in EVENT_COUNTS if key in summary}
    outlet_events = context.get("outlet_events")
    portal_outlets = [
        outlet
        for outlet in outlets or ()
        if isinstance(getattr(outlet, "uri", None), str) and urlsplit(outlet.uri).scheme == SCHEME
    ]
    if outlet_events is None or not portal_outlets:
        return counts
    from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook

    config = LeadSquaredHook(leadsquared_conn_id).config
    expected = portal_uri(config.base_url, config.portal_id) if config.portal_id else None
    for outlet in portal_outlets:
        if expected is not None and outlet.uri != expected:
            log.warning(
                "Outlet %s is not the portal of connection %r (%s): its event gets this run's counts.",
                outlet.uri,
                leadsquared_conn_id,
                expected,
            )
        event = outlet_events[outlet]
        event.extra = {**(event.extra or {}), **counts}
    return counts


def keep_counts_of_stopped_run(operator: Any, summary: Mapping[str, Any]) -> None:
    """The counts of a run stopped before its summary (a kill, a broken read, a ledger outage, a bad
    login), for its lineage: what it finished. Airflow records no asset event for a failed task.

    Sets ``operator.registration_counts`` (:data:`EVENT_COUNTS` keys only), which
    :mod:`airflow_provider_lsq.lineage` reads; a FAIL event's portal output then has the counts too.
    """
    operator.registration_counts = {key: summary[key] for key in EVENT_COUNTS if key in summary}


def publish_counts(operator: Any, context: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
    """A registration operator's counts, to its portal outlets' asset events and to its lineage.

    Sets ``operator.registration_counts``, which :mod:`airflow_provider_lsq.lineage` reads. Counts
    only: never lead data.
    """
    operator.registration_counts = add_counts_to_portal_events(
        context,
        operator.outlets,
        summary,
        leadsquared_conn_id=operator.leadsquared_conn_id,
        log=operator.log,
    )
