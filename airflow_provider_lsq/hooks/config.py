"""The ``leadsquared`` connection, read into one typed object.

A user's whole configuration lives in the connection: host, keys and the extras below. Defaults follow
the API notes (25 calls per 5 seconds is the most generous documented plan).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_lsq.connection_form import CONN_FIELDS
from airflow_provider_lsq.exceptions import LeadSquaredConfigError

if TYPE_CHECKING:
    from airflow_provider_lsq.version_compat import Connection

DEFAULT_PORTAL_HOST = "portalapi.leadsquared.com"
DEFAULT_LEAD_API_HOST = "api.leadsquared.com"
# A regional portal API host and its lead API host differ by their first label (API notes, "Hosts"):
# portalapi-us11.leadsquared.com -> api-us11.leadsquared.com; portalapi.leadsquared.com -> api....
_PORTAL_HOST = re.compile(r"portalapi(-[a-z0-9]+)?\.leadsquared\.com", re.IGNORECASE)
BULK_WINDOW = "bulk"
CONN_TYPE = "leadsquared"


# Characters no HTTP header can carry and no LeadSquared key or id holds: controls (a pasted newline or
# tab), spaces inside a value, and anything outside printable ASCII.
_TOKEN = re.compile(r"[!-~]+")


def _extra(extras: dict[str, Any], name: str) -> Any:
    """Read an extra whether the UI stored it plainly or with the old ``extra__leadsquared__`` prefix."""
    value = extras.get(name)
    if value in (None, ""):
        value = extras.get(f"extra__{CONN_TYPE}__{name}")
    return None if value == "" else value


# Bounds of the numbers that only the JSON extra sets (the form's fields carry theirs in their schema).
# A duration past these is a typo, and past about 1e9 seconds it overflows the socket's timeout or the
# Redis budget's millisecond stamps, which failed as a raw OverflowError or "Redis could not be reached".
_JSON_ONLY_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "rate_limit_margin_seconds": (None, 3600),
    "retry_wait_seconds": (None, 3600),
}


def number_bounds(name: str) -> tuple[float | None, float | None]:
    """``(minimum, maximum)`` of a numeric extra: the form's JSON Schema, enforced however it was set."""
    if name in _JSON_ONLY_BOUNDS:
        return _JSON_ONLY_BOUNDS[name]
    schema = CONN_FIELDS.get(name, {}).get("schema", {})
    return schema.get("minimum"), schema.get("maximum")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_RESERVE = 0.9  # the most of the plan a connection may leave to other integrations (the form's bound)
# A storage value that cannot be meant as a file: another URI scheme, or a bare ``host:port``.
_NOT_A_PATH = re.compile(r"^(?!sqlite:///)[A-Za-z][A-Za-z0-9+.-]*://|^[A-Za-z0-9.-]+:\d+$")


def is_redis_uri(storage: str | None) -> bool:
    """Whether a ``rate_limit_storage`` value is a (deprecated) Redis URI."""
    return bool(storage) and str(storage).lower().startswith(REDIS_SCHEMES)


def base_url(host: str | None, port: int | None = None) -> str:
    """Empty -> the default portal host; a bare host -> https; a full URL is used as given.

    A bare IPv6 address (what Airflow reads from a URI's ``[::1]``) is bracketed; ``port`` is added
    after the host (not after a path) unless the host names a port itself.
    """
    host = (host or "").strip().rstrip("/") or DEFAULT_PORTAL_HOST
    if "://" not in host and host.count(":") >= 2 and not host.startswith("["):
        host = f"[{host}]"
    url = host if "://" in host else f"https://{host}"
    if not port:
        return url
    parts = urlsplit(url)
    try:
        has_port = parts.port is not None
    except ValueError:  # not a port: the connection reader refuses it, naming the field
        return url
    if has_port or not parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.netloc}:{port}"))


def lead_api_url(portal_url: str, api_host: str | None = None) -> str:
    """The lead APIs' base URL for an account whose portal API is at ``portal_url``.

    ``api_host`` (the connection's ``api_host`` extra) wins when set. Otherwise a LeadSquared portal
    API host gives the same region's lead API host (API notes, "Hosts": ``portalapi-us11`` ->
    ``api-us11``, ``portalapi`` -> ``api``, the port kept), and any other host (the sandbox, a proxy,
    plain http) serves both APIs itself: the same URL.
    """
    if api_host:
        return base_url(api_host)
    parts = urlsplit(portal_url)
    hostname = parts.hostname or ""
    match = _PORTAL_HOST.fullmatch(hostname)
    if parts.scheme != "https" or match is None:
        return portal_url
    netloc = f"api{(match.group(1) or '').lower()}.leadsquared.com"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def unreadable_env_connection(conn_id: str) -> LeadSquaredConfigError | None:
    """The error for an ``AIRFLOW_CONN_<CONN_ID>`` variable Airflow cannot read as a connection, or
    None (no such variable, one Airflow reads, or a secrets backend configured ahead of it).

    Airflow's lookup (every 3.x) passes over a backend that raises: a variable whose JSON or ``extra``
    does not parse, with a misspelt key or a port that is not a number, is taken for no connection,
    and the task gets the next backend's connection of that id (one stored in the metadata database:
    another portal's settings, silently) or "The conn_id ... isn't defined", which Airflow retries.
    The test is Airflow's own: its ``EnvironmentVariablesBackend`` reads the variable. The error names
    the variable, the field (``extra``, or the variable) and, for JSON, where in it (line and column);
    for anything else only the error's type: never the text, which holds the keys. Where ``[secrets]
    backend`` (or ``[workers] secrets_backend``) is set, that backend answers before the variable is
    read, so nothing is checked here.
    """
    import os

    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    value = os.environ.get(variable, "").strip()
    if not value or _custom_secrets_backend():
        return None

    def refused(what: str, field: str, problem: str) -> LeadSquaredConfigError:
        return LeadSquaredConfigError(
            f"Connection {conn_id!r}: {what} {problem}, so Airflow reads the environment variable "
            f"{variable} as no connection (and takes another secrets backend's connection of that id, "
            "if any). Fix the variable: no retry can help.",
            field=field,
            conn_id=conn_id,
        )

    if value.startswith("{"):
        try:
            document = json.loads(value)
        except json.JSONDecodeError as error:
            return refused(f"the value of {variable}", variable, f"is not valid JSON ({_where(error)})")
        except RecursionError:
            return refused(f"the value of {variable}", variable, "is nested too deeply to read")
        extra = document.get("extra") if isinstance(document, dict) else None
        if isinstance(extra, str) and extra.strip():
            try:
                json.loads(extra)
            except json.JSONDecodeError as error:
                return refused("field 'extra'", "extra", f"is not valid JSON ({_where(error)})")
            except RecursionError:
                return refused("field 'extra'", "extra", "is nested too deeply to read")
    try:
        from airflow.secrets.environment_variables import EnvironmentVariablesBackend

        EnvironmentVariablesBackend().get_connection(conn_id)
    except ImportError:  # no such backend here: Airflow reads the variable its own way
        return None
    except Exception as error:  # its text may quote the value: only its type is shown
        return refused(
            f"the value of {variable}", variable, f"cannot be read as a connection ({type(error).__name__})"
        )
    return None


def _custom_secrets_backend() -> bool:
    """Whether a secrets backend is configured ahead of the environment variables (Vault, AWS, ...)."""
    from airflow_provider_lsq.version_compat import conf

    return any(
        str(conf.get(section, key, fallback="") or "").strip()
        for section, key in (("secrets", "backend"), ("workers", "secrets_backend"))
    )


def _where(error: json.JSONDecodeError) -> str:
    return f"{error.msg} at line {error.lineno} column {error.colno}"


class _ConnectionReader:
    """Reads each value of one connection once, with errors that name the field and the connection.

    Text is stripped of surrounding whitespace (a pasted newline or space is never meant); a value that
    still cannot go into a request (a space, a control character or a non-ASCII character inside a key
    or id; a host that is not a URL) raises :class:`~airflow_provider_lsq.exceptions.LeadSquaredConfigError`.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.conn_id = conn.conn_id
        raw = conn.extra
        if isinstance(raw, str) and raw.strip():
            # Airflow reads invalid JSON as no extra at all (it only logs): every extra would silently
            # take its default, e.g. 25 calls per 5 s on a smaller plan. Its text is not shown: it may
            # hold a deprecated Redis URI's password.
            try:
                json.loads(raw)
            except json.JSONDecodeError as error:
                raise self.error("extra", f"is not valid JSON ({_where(error)})") from None
        extras = conn.extra_dejson
        if not isinstance(extras, dict):
            raise self.error("extra", "must be a JSON object")
        self.extras: dict[str, Any] = extras

    def error(self, name: str, problem: str) -> LeadSquaredConfigError:
        return LeadSquaredConfigError(
            f"Connection {self.conn_id!r}: field {name!r} {problem}.", field=name, conn_id=self.conn_id
        )

    def _stripped(self, name: str, value: Any) -> str | None:
        """``value`` (text, or an integer written as text) stripped; None when missing or empty."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(name, f"must be text, got {type(value).__name__}")
        return str(value).strip() or None

    def text(self, name: str, value: Any, *, secret: bool = False) -> str | None:
        """``value`` stripped; None when empty. ``secret`` values never appear in the message."""
        text = self._stripped(name, value)
        if text is None:
            return None
        if not _TOKEN.fullmatch(text):
            shown = "" if secret else f" (got {text!r})"
            raise self.error(
                name,
                "holds a space, a control character or a non-ASCII character that no request can carry"
                + shown,
            )
        return text

    def storage(self) -> str | None:
        """``rate_limit_storage``: a file path may hold spaces and any letter (``/mnt/Shared Drive/lsq``),
        not a control character; ``memory`` in any case; a Redis URI is checked like a key."""
        value = _extra(self.extras, "rate_limit_storage")
        if isinstance(value, str) and is_redis_uri(value.strip()):
            return self.text("rate_limit_storage", value, secret=True)  # it may hold a password
        text = self._stripped("rate_limit_storage", value)
        if text is None:
            return None
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise self.error("rate_limit_storage", f"holds a control character (got {text!r})")
        return "memory" if text.lower() == "memory" else text

    def other_conn_id(self, name: str) -> str | None:
        """An Airflow connection id: it is looked up, never sent, so any letter Airflow allows in one
        (``rédis_prod``) is fine; whitespace or a control character inside is refused."""
        text = self._stripped(name, _extra(self.extras, name))
        if text is None:
            return None
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise self.error(
                name, f"must be a connection id, without spaces or control characters (got {text!r})"
            )
        return text

    def extra_text(self, name: str, *, secret: bool = False) -> str | None:
        return self.text(name, _extra(self.extras, name), secret=secret)

    def host(self, name: str, value: str | None) -> str | None:
        host = self.text(name, value)
        if host is None:
            return None
        url = base_url(host)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError as error:
            raise self.error(name, f"is not a host name or URL ({error})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.error(name, f"must be a host name or an http(s) URL, got {host!r}")
        if "@" in parts.netloc:  # a user or password would be shown wherever the URL is (errors, logs)
            raise self.error(name, "must not hold a user or password: the keys go in login and password")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise self.error(
                name, f"must not hold a query or fragment (every call's path is added to it), got {host!r}"
            )
        return host

    def number(
        self,
        name: str,
        kind: type[int] | type[float],
        default: Any,
        *,
        allow_zero: bool = False,
        bounded: bool = True,
    ) -> Any:
        """The extra ``name`` as a number: finite, not negative, within :func:`number_bounds` if
        ``bounded`` (the caller checks and explains the bounds itself otherwise)."""
        value = _extra(self.extras, name)
        if isinstance(value, str):
            value = value.strip() or None
        if value is None:
            return default
        try:
            if isinstance(value, bool):
                raise TypeError
            result = float(value)
            if kind is int:
                if not result.is_integer():
                    raise ValueError
                result = int(result)
        except (TypeError, ValueError, OverflowError):
            raise self.error(
                name, f"must be a{'n integer' if kind is int else ' number'}, got {value!r}"
            ) from None
        if not math.isfinite(result):
            raise self.error(name, f"must be a finite number, got {value!r}")
        if result < 0 or (result == 0 and not allow_zero):
            raise self.error(name, f"must be {'zero or more' if allow_zero else 'positive'}, got {value!r}")
        low, high = number_bounds(name) if bounded else (None, None)
        if (low is not None and result < low) or (high is not None and result > high):
            bounds = f"from {low} to {high}" if low is not None else f"at most {high}"
            raise self.error(name, f"must be {bounds}, got {value!r}")
        return result


@dataclass(frozen=True)
class LeadSquaredConfig:
    """Everything a hook needs to talk to one LeadSquared account. Secrets stay out of ``repr``."""

    base_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    portal_id: str | None = None
    rate_limit_calls: int = 25
    rate_limit_period_seconds: float = 5.0
    rate_limit_margin_seconds: float | None = None
    rate_limit_reserve: float = 0.1
    daily_call_limit: int | None = None
    rate_limit_storage: str | None = field(default=None, repr=False)  # a Redis URI may hold a password
    rate_limit_redis_conn_id: str | None = None
    timeout_seconds: float = 30.0
    max_retries: int = 5
    retry_wait_seconds: float = 1.0
    api_host: str | None = None
    bulk_rate_limit_calls: int = 1
    bulk_rate_limit_period_seconds: float = 5.0
    # Which of the account's windows a limiter keeps: "" the account's calls, BULK_WINDOW the bulk call's.
    budget_window: str = ""

    @property
    def lead_api_url(self) -> str:
        """The lead APIs' base URL: ``api_host`` when set, else derived from the portal host
        (:func:`lead_api_url`)."""
        return lead_api_url(self.base_url, self.api_host)

    def bulk_budget(self) -> LeadSquaredConfig:
        """This account's bulk window as a configuration of its own, for a second limiter.

        ``Lead/Bulk/CreateOrUpdate`` has "a separate, lower rate limit" (API notes, "Lead APIs"):
        ``bulk_rate_limit_calls`` per ``bulk_rate_limit_period_seconds``, less the same reserve,
        kept in the same storage under another name (:attr:`account_id`). The daily cap stays with
        the account's window, which a bulk call also takes.
        """
        return replace(
            self,
            rate_limit_calls=self.bulk_rate_limit_calls,
            rate_limit_period_seconds=self.bulk_rate_limit_period_seconds,
            daily_call_limit=None,
            budget_window=BULK_WINDOW,
        )

    @property
    def margin_seconds(self) -> float:
        """Seconds a call is counted past its answer plus the period: 0 unless the user asks for more.

        No margin is needed: each call is counted from its send until its answer plus the period, which
        covers whenever it reached the API (see ``hooks/rate_limit/window.py``). A margin only covers a
        server whose clock or window differs from its documentation.
        """
        return self.rate_limit_margin_seconds or 0.0

    @property
    def account_id(self) -> str:
        """A stable, non-secret name for the account's window: shared rate-limit budgets are keyed by it.

        The bulk window (:meth:`bulk_budget`) has a name of its own, so it is kept apart.
        """
        window = f"\n{self.budget_window}" if self.budget_window else ""
        digest = hashlib.sha256(f"{self.base_url}\n{self.access_key}{window}".encode()).hexdigest()
        return digest[:16]

    @classmethod
    def from_connection(cls, conn: Connection) -> LeadSquaredConfig:
        """Read and check every value of ``conn`` once.

        Surrounding whitespace is removed from every text value.

        :raises LeadSquaredConfigError: (a ``ValueError``) naming the field and the connection, when a
            value is missing, of the wrong kind, or one no request can carry.
        """
        read = _ConnectionReader(conn)
        access_key = read.text("login", conn.login, secret=True)
        secret_key = read.text("password", conn.password, secret=True)
        if not access_key or not secret_key:
            missing = "login" if not access_key else "password"
            raise LeadSquaredConfigError(
                f"Connection {conn.conn_id!r} needs the LeadSquared Access Key (login) and Secret Key "
                "(password) of an admin user.",
                field=missing,
                conn_id=conn.conn_id,
            )
        host = read.host("host", conn.host)
        port = conn.port
        if port and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535):
            raise read.error("port", f"must be a TCP port from 1 to 65535, got {port!r}")
        storage = read.storage()
        redis_conn_id = read.other_conn_id("rate_limit_redis_conn_id")
        if storage and not is_redis_uri(storage) and _NOT_A_PATH.match(storage):
            raise read.error(
                "rate_limit_storage",
                "must be empty (a file shared by this machine's tasks), 'memory', or a file path; to share "
                "the budget through Redis, set rate_limit_redis_conn_id to an Airflow 'redis' connection",
            )
        if is_redis_uri(storage) and importlib.util.find_spec("redis") is None:
            raise read.error(
                "rate_limit_storage",
                "names a Redis server, but the redis package is missing: install the provider's "
                "redis extra (pip install 'airflow-provider-leadsquared[redis]', which installs "
                "apache-airflow-providers-redis)",
            )
        reserve = read.number("rate_limit_reserve", float, 0.1, allow_zero=True, bounded=False)
        if reserve > MAX_RESERVE:
            raise read.error(
                "rate_limit_reserve",
                f"is the share of the plan left to other integrations, from 0 to {MAX_RESERVE} (e.g. 0.2), "
                f"got {reserve!r}",
            )
        daily = read.number("daily_call_limit", int, None)
        if daily is not None and storage == "memory" and not redis_conn_id:
            raise read.error(
                "daily_call_limit",
                "needs a shared rate_limit_storage; with 'memory' each task process would count its own "
                "day. Remove rate_limit_storage (a file shared on this machine) or set "
                "rate_limit_redis_conn_id",
            )
        return cls(
            base_url=base_url(host, port),
            access_key=access_key,
            secret_key=secret_key,
            portal_id=read.extra_text("portal_id"),
            rate_limit_calls=read.number("rate_limit_calls", int, 25),
            rate_limit_period_seconds=read.number("rate_limit_period_seconds", float, 5.0),
            rate_limit_margin_seconds=read.number("rate_limit_margin_seconds", float, None, allow_zero=True),
            rate_limit_reserve=reserve,
            daily_call_limit=daily,
            rate_limit_storage=storage,
            rate_limit_redis_conn_id=redis_conn_id,
            timeout_seconds=read.number("timeout_seconds", float, 30.0),
            max_retries=read.number("max_retries", int, 5, allow_zero=True),
            retry_wait_seconds=read.number("retry_wait_seconds", float, 1.0),
            api_host=read.host("api_host", _extra(read.extras, "api_host")),
            bulk_rate_limit_calls=read.number("bulk_rate_limit_calls", int, 1),
            bulk_rate_limit_period_seconds=read.number("bulk_rate_limit_period_seconds", float, 5.0),
        )
