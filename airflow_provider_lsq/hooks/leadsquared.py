"""LeadSquaredHook: the one way this provider talks to LeadSquared's portal API.

It owns the connection, the auth flow (public auth key and registration token, each fetched once),
the account's rate limit, retries and the mapping of answers to errors a person can act on.
"""

from __future__ import annotations

import socket
import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import requests
import tenacity
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError

from airflow_provider_lsq import __version__, metrics
from airflow_provider_lsq.connection_form import UI_FIELD_BEHAVIOUR, connection_form_widgets
from airflow_provider_lsq.exceptions import (
    LeadSquaredAPIError,
    LeadSquaredBudgetUnavailableError,
    LeadSquaredConfigError,
    LeadSquaredDailyLimitError,
    LeadSquaredError,
    LeadSquaredRateLimitError,
    LeadSquaredRequestError,
    LeadSquaredStoppedError,
    LeadSquaredTransientError,
    LeadSquaredUnconfirmedError,
)
from airflow_provider_lsq.hooks.config import (
    LeadSquaredConfig,
    base_url,
    is_redis_uri,
    unreadable_env_connection,
)
from airflow_provider_lsq.hooks.lead_api import LeadApiMixin
from airflow_provider_lsq.hooks.payload import UNIQUE_IDENTIFIERS, build_lead_fields
from airflow_provider_lsq.hooks.rate_limit import AccountRateLimiter, placement
from airflow_provider_lsq.hooks.rate_limit.storage import file_budget_path
from airflow_provider_lsq.hooks.rate_limit.stores import BudgetLocationError
from airflow_provider_lsq.hooks.responses import (
    parse_response,
    redact,
    redact_key_params_in,
    secret_forms,
)
from airflow_provider_lsq.masking import mask
from airflow_provider_lsq.outcomes import RegistrationOutcome, RegistrationResult
from airflow_provider_lsq.version_compat import BaseHook

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

    from airflow_provider_lsq.hooks.rate_limit import Lease
    from airflow_provider_lsq.hooks.rate_limit.paired import CallBudget

T = TypeVar("T")
PUBLIC_TOKEN_PATH = "/api/Access/PublicToken"
REGISTER_TOKEN_PATH = "/api/Access/GetRegisterToken"
REGISTER_PATH = "/api/Authentication/v2/Register"
_RETRYABLE = (LeadSquaredRateLimitError, LeadSquaredTransientError)
RETRYABLE_ERRORS = _RETRYABLE  # errors a later attempt (or run) may get past by itself
# The Register call's answer to a portal id the account does not have: every row would meet it.
INVALID_PORTAL_ERROR = "MXInvalidPortalException"
TEST_TIMEOUT_SECONDS = 5.0  # test_connection's one attempt: the UI's Test button must answer quickly
TEST_BUDGET_SECONDS = 3.0  # test_connection's read of the shared rate-limit budget
# What requests and http.client raise for a request that cannot be built: it was never sent.
_UNBUILDABLE = (
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidJSONError,
    UnicodeError,
    ValueError,
)
# The connection field behind each part of a request, and what to do about it.
_FIX_HINTS = {
    "host": "Fix the connection's host.",
    "login": "Fix the connection's login (Access Key).",
    "password": "Fix the connection's password (Secret Key).",
    "portal_id": "Fix the connection's portal_id extra.",
}
_HEADER_FIELDS = {"x-lsq-portalid": "portal_id"}
_QUERY_FIELDS = {"accessKey": "login", "secretKey": "password"}


def _carriable(value: Any) -> bool:
    """Whether HTTP can carry ``value`` in a header: latin-1 text, no control characters at the ends."""
    text = str(value)
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return text == text.strip() and not any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _unsendable_part(url: str, query: Mapping[str, Any], headers: Mapping[str, str] | None) -> str:
    """The field (or header) that made a request unbuildable: the first value HTTP cannot carry."""
    for name, value in (headers or {}).items():
        if not _carriable(value):
            return _HEADER_FIELDS.get(name, name)
    for name, value in query.items():
        if not _carriable(value):
            return _QUERY_FIELDS.get(name, name)
    return "host" if not _carriable(url) or " " in url else "request"


# What requests raises when no connection was made: the request never left (refused, DNS, connect
# timeout, the TLS handshake, the proxy). urllib3's NewConnectionError and NameResolutionError are
# ConnectTimeoutErrors too.
_NEVER_SENT = (
    requests.exceptions.ConnectTimeout,
    requests.exceptions.SSLError,
    requests.exceptions.ProxyError,
)


def _never_sent(error: requests.RequestException) -> bool:
    """Whether ``error`` happened before the request left: else LeadSquared may have carried it out
    (a read timeout, a connection dropped after sending, a body cut short)."""
    if isinstance(error, _NEVER_SENT):
        return True
    if not isinstance(error, requests.exceptions.ConnectionError):
        return False
    cause: BaseException | None = error
    for _ in range(4):  # requests' ConnectionError(MaxRetryError(reason=NewConnectionError(...)))
        reason = getattr(cause, "reason", None)
        if reason is None and cause is not None and cause.args and isinstance(cause.args[0], BaseException):
            reason = cause.args[0]
        if not isinstance(reason, BaseException):
            return False
        if isinstance(reason, ConnectTimeoutError):
            return True
        cause = reason
    return False


def _proves_nothing(error: LeadSquaredError) -> bool:
    """An attempt's error that says nothing about an earlier attempt's unproven call: a refusal, a
    failure before sending, a gateway's error, a stop. LeadSquared's own answer (an ``MX...``
    refusal, a 4xx) is proof of what it did with the call."""
    return not isinstance(error, LeadSquaredAPIError)


def _has_lead_id(body: Any) -> None:
    """A Register answer proves the registration only with the lead's id: anything else is unproven."""
    if not (isinstance(body, dict) and body.get("LeadId")):
        raise LeadSquaredUnconfirmedError(
            "LeadSquared answered the registration without a LeadId: it does not say whether the lead "
            "was registered."
        )


def _should_retry(error: BaseException) -> bool:
    """Refusals and transient failures retry; a spent daily cap will not lift within the retries."""
    return isinstance(error, _RETRYABLE) and not isinstance(error, LeadSquaredDailyLimitError)


# How LeadSquared names a standard field in its messages besides its schema name.
_FIELD_WORDS = {"EmailAddress": ("email",), "Phone": ("phone",), "Mobile": ("mobile",)}


def _field_words(attribute: str) -> tuple[str, ...]:
    return (attribute.lower(), *_FIELD_WORDS.get(attribute, ()))


def duplicate_is_first_identifier(
    message: str, lead: Mapping[str, Any], identifier_attribute: str | None
) -> bool:
    """Whether a duplicate refusal is about the lead found by the identifier sent first.

    LeadSquared answers ``MXDuplicateEntryException`` both when ``RegisterOnlyNewLead`` meets an
    existing lead ("User already exists.") and when another unique field's value (a sibling's mobile
    number, say) belongs to a different lead; only the message tells them apart (API notes, "Field
    behaviour"). Conservative: a message naming any other field of the lead is not "the lead exists".
    """
    text = message.lower()
    first = identifier_attribute or next((a for a in lead if a in UNIQUE_IDENTIFIERS), None)
    others = [a for a in lead if isinstance(a, str) and a != first and lead[a] not in (None, "")]
    if any(word in text for other in others for word in _field_words(other)):
        return False
    return "user already exists" in text or (
        first is not None and any(word in text for word in _field_words(first))
    )


# The Test button runs where the UI (or CLI) does, not on the workers: a firewall may let only the latter
# reach Redis. The check still fails (as official providers' tests of a database do), saying where it ran.
_FROM_HERE = (
    f"from {socket.gethostname()!r}, where the test ran (tasks read it from their workers, which may "
    "reach it when this machine cannot)"
)


class LeadSquaredHook(LeadApiMixin, BaseHook):
    """Talk to LeadSquared's portal API (and its lead APIs, :class:`LeadApiMixin`) through a
    ``leadsquared`` connection.

    No network I/O happens until the first call. One pooled ``requests`` session serves every thread
    of the hook, and every call passes the account's rate limit.

    :param leadsquared_conn_id: the Airflow connection holding host, keys and extras.
    """

    conn_name_attr = "leadsquared_conn_id"
    default_conn_name = "leadsquared_default"
    conn_type = "leadsquared"
    hook_name = "LeadSquared"

    def __init__(self, leadsquared_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.leadsquared_conn_id = leadsquared_conn_id
        self._token_lock = threading.Lock()
        self._public_auth_key: str | None = None
        self._registration_token: str | None = None
        self._secrets: set[str] = set()
        # Set to stop: no retry starts after it, and register_portal_users takes no further lead.
        self.stopping = threading.Event()

    # -- connection form -------------------------------------------------------------------------

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form (Airflow 2.11 to 3.1; 3.2+ reads the provider info)."""
        return connection_form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Labels in LeadSquared's words and the fields that mean nothing here hidden."""
        return UI_FIELD_BEHAVIOUR

    # -- configuration and session ---------------------------------------------------------------

    @cached_property
    def config(self) -> LeadSquaredConfig:
        """The connection, read once; its secrets are registered with Airflow's masker."""
        # Before Airflow reads it: Airflow 3.0 and 3.1 take an AIRFLOW_CONN_ variable that does not parse
        # for no connection, and answer from the next secrets backend (a stored connection of the same
        # id) or "isn't defined", which Airflow retries.
        refusal = unreadable_env_connection(self.leadsquared_conn_id)
        if refusal is not None:
            raise refusal
        config = LeadSquaredConfig.from_connection(self.get_connection(self.leadsquared_conn_id))
        self._add_secrets(config.access_key, config.secret_key)
        storage = config.rate_limit_storage
        if storage and is_redis_uri(storage):  # the deprecated Redis URI: it may carry a password
            self._add_secrets(storage, urlsplit(storage).password or "")
        return config

    def _add_secrets(self, *secrets: str) -> None:
        for secret in secrets:
            if secret and secret not in self._secrets:
                self._secrets.add(secret)
                for form in secret_forms(secret):  # URL-encoded forms are what a logged URL would show
                    mask(form)

    @cached_property
    def rate_limiter(self) -> AccountRateLimiter:
        """The account's shared budget (opened once per process and account).

        :raises LeadSquaredConfigError: the storage the connection names cannot be opened (a file
            location that cannot be written, a missing ``redis`` connection, a Redis server down), or
            it is a file and each task runs in a pod of its own (:meth:`_file_budget_reach`).
        """
        config = self.config
        self._file_budget_reach(config)
        try:
            return AccountRateLimiter.for_account(config)
        except LeadSquaredError:
            raise
        except BudgetLocationError as error:  # its message names the path, the user and the fix
            raise LeadSquaredConfigError(
                f"Connection {self.leadsquared_conn_id!r}: field 'rate_limit_storage': {error}",
                field="rate_limit_storage",
                conn_id=self.leadsquared_conn_id,
            ) from error
        except Exception as error:
            field = "rate_limit_redis_conn_id" if config.rate_limit_redis_conn_id else "rate_limit_storage"
            # A Redis URI's parse error can quote part of its password: name the error's type only.
            detail = "" if is_redis_uri(config.rate_limit_storage) else f": {self.redact(str(error))}"
            if config.rate_limit_redis_conn_id:
                advice = (
                    f"Check that the Airflow connection {config.rate_limit_redis_conn_id!r} exists (type "
                    "redis), that its server answers, and that apache-airflow-providers-redis is installed "
                    "(the [redis] extra)."
                )
            else:
                advice = "Check the place rate_limit_storage names: a writable file, or a Redis that answers."
            failure = LeadSquaredConfigError(
                f"Connection {self.leadsquared_conn_id!r}: field {field!r}: the shared rate-limit budget "
                f"could not be opened ({type(error).__name__}{detail}). {advice}",
                field=field,
                conn_id=self.leadsquared_conn_id,
            )
            if detail:
                raise failure from error
            raise failure from None

    def _file_budget_reach(self, config: LeadSquaredConfig) -> None:
        """Before the first call: refuse a file budget where each task runs in its own pod or container
        (each would count its own calls and the account would be refused), warn where it may be, and
        name ``rate_limit_redis_conn_id`` (:mod:`~.rate_limit.placement` says what shows it)."""
        path = file_budget_path(config)
        finding = placement.check() if path is not None else None
        if finding is None:
            return
        message = f"Connection {self.leadsquared_conn_id!r}: {placement.advice(finding, str(path))}"
        if finding.how == placement.CERTAIN:
            raise LeadSquaredConfigError(
                message, field="rate_limit_redis_conn_id", conn_id=self.leadsquared_conn_id
            )
        self.log.warning("%s", message)

    def get_conn(self) -> requests.Session:
        """The hook's pooled session (created once)."""
        return self._session

    @cached_property
    def _session(self) -> requests.Session:
        redact_key_params_in("urllib3.connectionpool")  # its DEBUG request lines carry the keys
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers["User-Agent"] = f"airflow-provider-leadsquared/{__version__}"
        return session

    def redact(self, text: str) -> str:
        """``text`` with every secret this hook knows replaced by ``***``."""
        return redact(text, self._secrets)

    # -- the one path every call takes -----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        host: str | None = None,
    ) -> Any:
        """Call any LeadSquared endpoint with the keys, rate limit, retries and error mapping.

        ``host`` targets another host (e.g. the connection's ``api_host`` for the lead APIs); by default
        the portal API host. Returns the decoded JSON body; raises a ``LeadSquaredError`` subclass.
        """
        return self._call(method, path, params=params, json=json, headers=headers, host=host)[0]

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
        check: Callable[[Any], None] | None = None,
    ) -> tuple[Any, int]:
        """:meth:`request`, also returning how many attempts it took. ``secrets`` are redacted too.

        ``may_send`` is asked before every attempt, once its place in the rate limit is granted: False
        means the call must not be made now (:class:`LeadSquaredStoppedError`, never retried).
        ``budget`` replaces the account's window (:attr:`rate_limiter`), e.g. the bulk call's pair.
        ``check`` sees each decoded body and raises (e.g. :class:`LeadSquaredUnconfirmedError`) when
        it does not answer the call; its error is retried like the answer's.

        Every attempt sends the same request. Once an attempt was sent and not answered in a way
        that proves what happened (:class:`LeadSquaredUnconfirmedError`), the call ends
        :class:`LeadSquaredUnconfirmedError` unless a later attempt proves it (an answer, or
        LeadSquared's own refusal): a later refusal, a failure before sending, a stop or a spent
        budget says nothing about that earlier call.
        """
        config = self.config
        url = (base_url(host) if host else config.base_url) + "/" + path.lstrip("/")
        query = {"accessKey": config.access_key, "secretKey": config.secret_key, **(params or {})}
        extra_secrets = [*self._secrets, *secrets]
        step = config.retry_wait_seconds
        backoff = tenacity.wait_exponential(multiplier=step, max=60) + tenacity.wait_random(0, step)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, LeadSquaredRateLimitError):
                # The refusal paused every caller on the account (``_attempt``): the next acquire waits.
                return 0.0
            return backoff(state)

        def log_retry(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            metrics.retry(self.leadsquared_conn_id)
            self.log.warning(
                "LeadSquared %s %s: attempt %d of %d failed (%s); retrying.",
                method,
                path,
                state.attempt_number,
                config.max_retries + 1,
                error,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(config.max_retries + 1)
            | tenacity.stop_when_event_set(self.stopping),
            sleep=self._sleep_unless_stopping,
            retry=tenacity.retry_if_exception(_should_retry),
            wait=wait,
            before_sleep=log_retry,
            reraise=True,
        )
        attempts = unproven = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    try:
                        body = self._attempt(
                            method, url, query, json, headers, extra_secrets, may_send, budget
                        )
                        if check is not None:
                            check(body)
                    except LeadSquaredUnconfirmedError:
                        unproven += 1
                        raise
                    return body, attempts
        except LeadSquaredError as error:
            error.attempts = attempts
            if unproven and not isinstance(error, LeadSquaredUnconfirmedError) and _proves_nothing(error):
                unconfirmed = LeadSquaredUnconfirmedError(
                    f"{unproven} of {attempts} attempts were sent and not answered in a way that says "
                    f"what happened, and the last one proved nothing either ({error.message})",
                    status_code=error.status_code,  # type: ignore[arg-type]
                    attempts=attempts,
                )
                raise unconfirmed from None
            if isinstance(error, _RETRYABLE) and attempts > 1:
                error.message = f"{error.message} Gave up after {attempts} attempts."
                error.args = (error.message,)
            raise
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _sleep_unless_stopping(self, seconds: float) -> None:
        """Tenacity's backoff sleep, cut short when the hook is told to stop."""
        self.stopping.wait(seconds)

    def _attempt(
        self,
        method: str,
        url: str,
        query: Mapping[str, Any],
        json: Any,
        headers: Mapping[str, str] | None,
        secrets: Iterable[str],
        may_send: Callable[[], bool] | None = None,
        budget: CallBudget | None = None,
    ) -> Any:
        """One call inside the account's window: it holds its place from send until answer + period."""
        limiter = budget if budget is not None else self.rate_limiter
        with metrics.rate_limit_wait(self.leadsquared_conn_id):
            try:
                lease = limiter.acquire(stop=self.stopping)
            except LeadSquaredError:
                raise
            except Exception as error:  # the shared store (Redis, the file) failed: nothing was sent
                raise LeadSquaredBudgetUnavailableError(
                    f"The shared rate-limit budget ({limiter.store.description}) could not be reached "
                    f"({type(error).__name__}: {self.redact(str(error))}); nothing was sent."
                ) from None
        if may_send is not None and not may_send():
            self._tell_limiter(limiter.release, lease)
            raise LeadSquaredStoppedError("Not sent: the caller withdrew the call before it was made.")
        with metrics.api_call(self.leadsquared_conn_id):  # counts a refusal as it leaves
            try:
                response = self._send(method, url, query, json, headers, secrets)
            finally:
                self._tell_limiter(limiter.release, lease)
            try:
                return parse_response(response, secrets)
            except LeadSquaredRateLimitError:
                self._tell_limiter(limiter.refused, lease)
                raise

    def _tell_limiter(self, tell: Callable[[Lease], None], lease: Lease) -> None:
        """Tell the shared budget how a sent call went; its failure never discards the call's answer.

        A lease that cannot be settled stays held until it expires on its own (send + timeout + period),
        which only slows callers down: the answer, and so the row's outcome, matters more.
        """
        try:
            tell(lease)
        except Exception as error:
            self.log.warning(
                "Could not update the shared rate-limit budget after a call (%s: %s); its place in the "
                "window expires on its own.",
                type(error).__name__,
                self.redact(str(error)),
            )

    def _send(
        self,
        method: str,
        url: str,
        query: Mapping[str, Any],
        json: Any,
        headers: Mapping[str, str] | None,
        secrets: Iterable[str],
        *,
        timeout: float | None = None,
    ) -> requests.Response:
        """One HTTP exchange. requests puts the URL (and so the keys) in its errors: redact them.

        A request that cannot be built (a header or URL HTTP cannot carry) is never sent and never
        retried: it raises ``LeadSquaredRequestError`` naming the value at fault, without the value.
        """
        try:
            return self._session.request(
                method,
                url,
                params=query,
                json=json,
                headers=headers,
                timeout=timeout or self.config.timeout_seconds,
            )
        except _UNBUILDABLE as error:
            culprit = _unsendable_part(url, query, headers)
            raise LeadSquaredRequestError(
                f"field {culprit!r}: the request to {redact(url, secrets)} could not be built "
                f"({type(error).__name__}); nothing was sent. {_FIX_HINTS.get(culprit, '')}".rstrip(),
                field=culprit,
            ) from None
        except requests.RequestException as error:
            message = redact(f"{type(error).__name__}: {error}", secrets)
            if _never_sent(error):
                raise LeadSquaredTransientError(
                    f"Could not reach LeadSquared at {self.config.base_url} (nothing was sent): {message}"
                ) from None
            raise LeadSquaredUnconfirmedError(
                f"LeadSquared at {self.config.base_url} was sent the call but did not answer it ({message}): "
                "it may have carried it out."
            ) from None

    # -- the auth flow ---------------------------------------------------------------------------

    def get_public_auth_key(self) -> str:
        """The account's public auth key (it never expires: fetched once per hook)."""
        with self._token_lock:
            if self._public_auth_key is None:
                body = self.request("GET", PUBLIC_TOKEN_PATH)
                key = body.get("PublicAuthKey") if isinstance(body, dict) else None
                if not key:
                    raise LeadSquaredAPIError("LeadSquared's PublicToken answer held no PublicAuthKey.")
                self._add_secrets(key)
                self._public_auth_key = key
            return self._public_auth_key

    def get_registration_token(self) -> str:
        """The portal registration token (it never expires: fetched once per hook)."""
        with self._token_lock:
            if self._registration_token is None:
                body = self.request("GET", REGISTER_TOKEN_PATH)
                if not isinstance(body, str) or not body:
                    raise LeadSquaredAPIError("LeadSquared's GetRegisterToken answer was not a token string.")
                self._add_secrets(body)
                self._registration_token = body
            return self._registration_token

    def test_connection(self) -> tuple[bool, str]:
        """One call, no retries, a short timeout: the UI's Test button answers within seconds.

        It fetches the public auth key, which proves the host and the keys, and then checks that the
        connection names a portal (registration cannot work without ``portal_id``). The one call skips
        the rate limiter's queue and the retry loop (``_call``): a Test button must not wait behind a
        running bulk registration. At worst its one call tips a full window over, and the running task waits
        that refusal out like any other.
        """
        try:
            config = self.config
            url = f"{config.base_url}{PUBLIC_TOKEN_PATH}"
            query = {"accessKey": config.access_key, "secretKey": config.secret_key}
            timeout = min(TEST_TIMEOUT_SECONDS, config.timeout_seconds)
            response = self._send_within(
                timeout + 1.0,
                lambda: self._send("GET", url, query, None, None, self._secrets, timeout=timeout),
            )
            if response is None:
                return False, (
                    f"LeadSquared at {config.base_url} did not answer within {timeout + 1.0:g} s (it "
                    "accepted the connection but its answer came too slowly). Check the host."
                )
            body = parse_response(response, self._secrets)
            if not isinstance(body, dict) or not body.get("PublicAuthKey"):
                raise LeadSquaredAPIError("LeadSquared's PublicToken answer held no PublicAuthKey.")
            self._add_secrets(body["PublicAuthKey"])
        except (LeadSquaredError, ValueError) as error:
            return False, self.redact(str(error))
        except Exception as error:  # the Test button shows whatever it gets: never a key
            return False, self.redact(f"{type(error).__name__}: {error}")
        budget_problem = self._budget_problem(TEST_BUDGET_SECONDS)
        if budget_problem is not None:
            return (
                False,
                f"The keys were accepted, but the rate-limit budget cannot be used. {budget_problem}",
            )
        if not config.portal_id:
            return False, (
                "The keys were accepted, but the connection has no portal_id: registration needs it "
                "(Workflow > Manage Portals in LeadSquared, in the page URL)."
            )
        return True, "Connection to LeadSquared works: the keys were accepted and a portal is set."

    def _budget_problem(self, seconds: float) -> str | None:
        """Why the shared rate-limit budget cannot be used (every call needs it), or None.

        Opens the Redis budget the connection names and reads it once, within ``seconds``: a Redis
        connection that is missing, down or refuses its database would otherwise fail every run while
        the Test button said the connection works. A file budget is not opened: it belongs to each
        worker's machine, and the Test button runs on the web server's; but where the executor runs each
        task in a pod of its own, the runs would refuse it, and so does the Test button.
        """
        config = self.config
        if not (config.rate_limit_redis_conn_id or is_redis_uri(config.rate_limit_storage)):
            try:  # a file budget where each task is a pod of its own: every run would refuse it
                self._file_budget_reach(config)
            except LeadSquaredConfigError as error:
                return error.message
            return None
        field = "rate_limit_redis_conn_id" if config.rate_limit_redis_conn_id else "rate_limit_storage"
        where = (
            f"Redis connection {config.rate_limit_redis_conn_id!r}"
            if config.rate_limit_redis_conn_id
            else "Redis"
        )

        def read() -> None:
            nonlocal where
            store = self.rate_limiter.store
            where = getattr(store, "description", where)
            store.snapshot()

        try:
            answered = self._run_within(seconds, read)
        except LeadSquaredConfigError as error:
            return self.redact(error.message)
        except Exception as error:
            return self.redact(
                f"Connection {self.leadsquared_conn_id!r}: field {field!r}: the shared rate-limit budget "
                f"({where}) could not be read {_FROM_HERE} ({type(error).__name__}: {error})."
            )
        if answered is None:
            return (
                f"Connection {self.leadsquared_conn_id!r}: field {field!r}: the shared rate-limit budget "
                f"({where}) did not answer {_FROM_HERE} within {seconds:g} s."
            )
        return None

    @classmethod
    def _send_within(cls, seconds: float, send: Callable[[], requests.Response]) -> requests.Response | None:
        """``send()``'s answer, or None when it takes longer than ``seconds`` in all.

        requests' timeout bounds each wait for a byte, not the exchange: a server that sends its answer
        a byte at a time never trips it. The exchange runs in a daemon thread, which the caller stops
        waiting for (it ends with its connection's own timeout).
        """
        answer = cls._run_within(seconds, send)
        return None if answer is None else answer[0]

    @staticmethod
    def _run_within(seconds: float, work: Callable[[], T]) -> tuple[T] | None:
        """``(work(),)``, or None when it takes longer than ``seconds``; its error is raised."""
        outcome: list[T] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                outcome.append(work())
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=run, name="lsq-test-connection", daemon=True)
        thread.start()
        thread.join(seconds)
        if errors:
            raise errors[0]
        return (outcome[0],) if outcome else None

    # -- registration ----------------------------------------------------------------------------

    def register_portal_user(
        self,
        lead: Mapping[str, Any],
        password: str,
        *,
        only_new_leads: bool = False,
        identifier_attribute: str | None = None,
    ) -> RegistrationResult:
        """Register one lead as a portal user (an upsert, unless ``only_new_leads``).

        ``lead`` maps attribute schema names to values, in the caller's order: LeadSquared finds the
        lead by the first unique identifier (``identifier_attribute`` is moved first when given).
        Raises ``LeadSquaredValidationError`` before any call when the lead cannot be sent.
        """
        if isinstance(password, str) and password:
            mask(password)  # only the masker: this call's own errors redact it (``_register``)
        return self._register(lead, password, only_new_leads, identifier_attribute)

    def register(
        self,
        lead: Mapping[str, Any],
        password: str,
        *,
        only_new_leads: bool = False,
        identifier_attribute: str | None = None,
        may_send: Callable[[], bool] | None = None,
    ) -> RegistrationResult:
        """The Register call for the engine's rows: :meth:`register_portal_user` without handing the
        password to Airflow's masker (a run makes one per row; this call's own errors redact it).

        ``may_send`` is asked just before each attempt is sent (after its rate-limit wait): False
        withdraws the call (``LeadSquaredStoppedError``).
        """
        return self._register(lead, password, only_new_leads, identifier_attribute, may_send)

    def require_portal_id(self, *, needed_by: str = "registration needs it") -> str:
        """The connection's portal id, which every registration needs.

        :param needed_by: what the message says needs it (the SQL transfer's ledger needs it too).
        :raises LeadSquaredConfigError: naming ``portal_id`` and the connection when it is missing.
        """
        portal_id = self.config.portal_id
        if not portal_id:
            raise LeadSquaredConfigError(
                f"Connection {self.leadsquared_conn_id!r} has no portal_id in its extra: {needed_by} "
                "(Workflow > Manage Portals in LeadSquared, in the page URL).",
                field="portal_id",
                conn_id=self.leadsquared_conn_id,
            )
        return portal_id

    def _register(
        self,
        lead: Mapping[str, Any],
        password: str,
        only_new_leads: bool,
        identifier_attribute: str | None,
        may_send: Callable[[], bool] | None = None,
    ) -> RegistrationResult:
        fields = build_lead_fields(lead, password, identifier_attribute=identifier_attribute)
        portal_id = self.require_portal_id()
        headers = {
            "Authorization": self.get_public_auth_key(),
            "x-lsq-registertoken": self.get_registration_token(),
            "x-lsq-portalid": portal_id,
        }
        body, attempts = self._call(
            "POST",
            REGISTER_PATH,
            json={"RegisterOnlyNewLead": only_new_leads, "LeadFields": fields},
            headers=headers,
            secrets=(password,),
            may_send=may_send,
            check=_has_lead_id,
        )
        lead_id = body["LeadId"]
        return RegistrationResult(
            lead_id=str(lead_id), message=str(body.get("Message", "")), attempts=attempts
        )

    def register_portal_users(
        self,
        leads: Iterable[tuple[str, Mapping[str, Any]]],
        *,
        password_callable: Callable[[Mapping[str, Any]], str] | None = None,
        only_new_leads: bool = False,
        identifier_attribute: str | None = None,
        max_workers: int | None = None,
        on_idle: Callable[[], None] | None = None,
        idle_seconds: float = 1.0,
        may_send: Callable[[str], bool] | None = None,
    ) -> Iterator[RegistrationOutcome]:
        """Register many ``(key, lead)`` pairs concurrently; yield one outcome per lead as each ends.

        The engine's concurrent sending (:func:`airflow_provider_lsq.engine.concurrency.send_rows`)
        with its portal registration (:mod:`airflow_provider_lsq.engine.registration`, which maps
        each answer to its outcome); this hook makes each Register call (:meth:`register`).

        A small thread pool shares this hook's session and its one rate-limit budget, so slow answers
        do not cap throughput. Leads are read lazily (at most two per worker are in flight), and only
        while the consumer takes outcomes: a consumer that stops reading stops the sending.

        Setting :attr:`stopping` stops the run early: no lead is taken from ``leads`` after it, no
        retry is started, and leads taken but not yet sent end as ``failed`` ``NotSent`` outcomes
        (retryable, no call). A row's failure never stops the others; only an authentication failure,
        which no row can survive, stops the run. Either way the outcome of every call already made is
        yielded before the generator ends (or raises the authentication error).

        :param on_idle: called every ``idle_seconds`` while no outcome arrives (e.g. to flush records).
        :param may_send: ``may_send(key)`` is asked, from a worker thread, just before each Register
            call of a row is made (every attempt, after its rate-limit wait): False withdraws the row,
            which ends ``NotSent`` when no attempt was made, else ``failed`` (retryable). The SQL
            transfer answers False for a row whose ledger claim it cannot confirm.
        """
        from airflow_provider_lsq.engine.concurrency import send_rows
        from airflow_provider_lsq.engine.registration import PortalRegistration

        registration = PortalRegistration(
            identifier_attribute=identifier_attribute,
            only_new_leads=only_new_leads,
            password_callable=password_callable,
        )
        return send_rows(
            self,
            registration,
            leads,
            max_workers=max_workers,
            on_idle=on_idle,
            idle_seconds=idle_seconds,
            may_send=may_send,
        )

    @property
    def default_max_workers(self) -> int:
        """Enough threads to keep the window busy with answers up to ~2 s slow, within reason."""
        per_second = self.config.rate_limit_calls / self.config.rate_limit_period_seconds
        return max(4, min(32, round(per_second * 2)))
