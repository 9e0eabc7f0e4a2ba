"""The sandbox's HTTP side: a threaded stdlib server that speaks LeadSquared's portal API.

A call flows: arrival time -> route (404/405) -> wrong region (401) -> keys (401) -> rate decision and
faults (:meth:`SandboxState.admit`) -> the endpoint -> latency sleep (outside the lock) -> the answer.
Processing before the sleep means a client that times out on a slow answer may still have registered
the lead, as with the real API. Every answer carries a Content-Length so keep-alive clients work.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import secrets
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from airflow_provider_lsq.sandbox import lead_api
from airflow_provider_lsq.sandbox.lead_api import BulkWindow, LeadApi, SandboxField, default_fields
from airflow_provider_lsq.sandbox.state import (
    DEFAULT_KNOWN_ATTRIBUTES,
    DEFAULT_UNIQUE_ATTRIBUTES,
    ApiError,
    CallRecord,
    SandboxConfig,
    SandboxLead,
    SandboxState,
    snapshot_without_password,
)

if TYPE_CHECKING:
    from types import TracebackType

PUBLIC_TOKEN_PATH = "/api/Access/PublicToken"
REGISTER_TOKEN_PATH = "/api/Access/GetRegisterToken"
REGISTER_PATH = "/api/Authentication/v2/Register"
_ROUTES = {
    PUBLIC_TOKEN_PATH.lower(): ("GET", "public_token"),
    REGISTER_TOKEN_PATH.lower(): ("GET", "register_token"),
    REGISTER_PATH.lower(): ("POST", "register"),
}
_MAX_BODY = 4 * 1024 * 1024


def _random_key(prefix: str) -> str:
    """A key that deliberately holds ``$ + / = &`` so a client that forgets to URL-encode fails."""
    parts = [secrets.token_hex(6) for _ in range(5)]
    return f"{prefix}{parts[0]}${parts[1]}+{parts[2]}/{parts[3]}={parts[4]}&{secrets.token_hex(3)}"


def _envelope(exception_type: str, message: str) -> dict[str, str]:
    return {"Status": "Error", "ExceptionType": exception_type, "ExceptionMessage": message}


def _gateway_body(status: int) -> bytes:
    title = f"{status} {HTTPStatus(status).phrase}"
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>".encode()


class _Answer:
    """A response to write: status, body bytes, content type and the call-log outcome."""

    def __init__(
        self, status: int, payload: Any = None, outcome: str = "ok", raw: bytes | None = None
    ) -> None:
        self.status = status
        self.outcome = outcome
        self.content_type = "application/json; charset=utf-8"
        if raw is not None:
            self.body = raw
            self.content_type = "text/html" if raw else "text/plain"
        else:
            self.body = json.dumps(payload).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up before its answer (a killed task, a timeout) is no error: stay quiet.

        The call was processed all the same (see the module docstring). Anything else is printed.
        """
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Hang up on keep-alive clients so a stopped sandbox stops answering."""
        with self._open_lock:
            open_sockets = list(self._open)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LeadSquaredSandbox/0.1"
    timeout = 120
    disable_nagle_algorithm = True  # headers and body go out as separate writes: avoid 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and the demo own the terminal
        return

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    # --- plumbing ------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """Drain the request body (Content-Length or chunked) so the connection stays usable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            return b""
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)
        self.wfile.flush()

    def _handle(self) -> None:
        at = time.monotonic()
        split = urlsplit(self.path)
        path = split.path
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            body = b""
        sandbox = self.server.sandbox
        if path.rstrip("/").lower().startswith("/_sandbox"):
            self._write(self._inspect(path))
            return
        answer, extra_delay = self._dispatch(at, path, split.query, body)
        delay = sandbox.state.latency_delay() + extra_delay
        if delay > 0:
            time.sleep(delay)
        sandbox.state.record(CallRecord(at, self.command, path, answer.status, answer.outcome))
        if answer.outcome == "dropped":  # carried out, then the connection closes without an answer
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._write(answer)

    def _dispatch(self, at: float, path: str, query: str, body: bytes) -> tuple[_Answer, float]:
        sandbox = self.server.sandbox
        state = sandbox.state
        route = _ROUTES.get(path.rstrip("/").lower()) or lead_api.route(path)
        if route is None:
            message = f"No HTTP resource was found that matches the request URI '{path}'."
            return _Answer(404, {"Message": message}, "error"), 0.0
        method, endpoint = route
        if self.command != method:
            message = f"The requested resource does not support http method '{self.command}'."
            return _Answer(405, {"Message": message}, "error"), 0.0
        correct_host = state.wrong_region()
        if correct_host:
            message = f"Invalid host for this account. Please use {correct_host} to call the API."
            return _Answer(401, _envelope("MXUnAuthorisedException", message), "unauthorized"), 0.0
        if not self._keys_ok(query):
            message = "Invalid access key or secret key"
            return _Answer(401, _envelope("MXUnAuthorisedException", message), "unauthorized"), 0.0
        if endpoint == lead_api.BULK:  # its own, lower limit first; then the account's, like any call
            refusal = sandbox.lead_api.bulk_window.admit(at)
            if refusal is not None:
                payload = _envelope("MXAPIRateLimitExceededException", refusal.message)
                return _Answer(refusal.status, payload, "refused"), 0.0
        decision = state.admit(at, path)
        if decision.kind == "refuse":
            payload = _envelope("MXAPIRateLimitExceededException", decision.message)
            return _Answer(decision.status, payload, "refused"), decision.delay
        if decision.kind == "fault":
            raw = _gateway_body(decision.status) if decision.html else b""
            return _Answer(decision.status, raw=raw, outcome="fault"), decision.delay
        if endpoint in lead_api.ENDPOINTS:
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            status, payload, outcome = sandbox.lead_api.handle(endpoint, query, body, content_type)
            answer = _Answer(status, payload, outcome)
        else:
            answer = self._endpoint(endpoint, body)
        # Carried out (the endpoint ran), then an answer that does not say so.
        if decision.kind == "lost":
            return _Answer(502, raw=_gateway_body(502), outcome="lost"), decision.delay
        if decision.kind == "empty":
            return _Answer(200, raw=b"", outcome="empty"), decision.delay
        if decision.kind == "html":
            return _Answer(200, raw=_gateway_body(200), outcome="html"), decision.delay
        if decision.kind == "drop":
            return _Answer(0, raw=b"", outcome="dropped"), decision.delay
        return answer, decision.delay

    def _keys_ok(self, query: str) -> bool:
        sandbox = self.server.sandbox
        params = parse_qs(query, keep_blank_values=True)
        in_query = (params.get("accessKey", [None])[0], params.get("secretKey", [None])[0])
        in_headers = (self.headers.get("x-LSQ-AccessKey"), self.headers.get("x-LSQ-SecretKey"))
        wanted = (sandbox.access_key, sandbox.secret_key)
        return in_query == wanted or in_headers == wanted

    # --- endpoints -----------------------------------------------------------------------------------

    def _endpoint(self, endpoint: str, body: bytes) -> _Answer:
        sandbox = self.server.sandbox
        if endpoint == "public_token":
            return _Answer(200, {"PublicAuthKey": sandbox.public_auth_key})
        if endpoint == "register_token":
            return _Answer(200, sandbox.registration_token)
        sandbox.state.count_register_call()
        return self._register(body)

    def _register(self, body: bytes) -> _Answer:
        sandbox = self.server.sandbox
        if self.headers.get("Authorization") != sandbox.public_auth_key:
            envelope = _envelope("MXUnAuthorisedException", "Invalid or missing public auth key")
            return _Answer(401, envelope, "unauthorized")
        if self.headers.get("x-lsq-registertoken") != sandbox.registration_token:
            envelope = _envelope("MXUnAuthorisedException", "Invalid or missing portal registration token")
            return _Answer(401, envelope, "unauthorized")
        if self.headers.get("x-lsq-portalid") != sandbox.portal_id:
            envelope = _envelope("MXInvalidPortalException", "Invalid or missing portal id")
            return _Answer(500, envelope, "error")
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _Answer(400, {"Message": "The request content type must be application/json."}, "error")
        try:
            lead_fields, only_new = _parse_register_body(body)
        except ValueError as exc:
            return _Answer(400, {"Message": f"The request body is not per spec: {exc}"}, "error")
        try:
            lead_id = sandbox.state.register(lead_fields, only_new)
        except ApiError as exc:
            return _Answer(500, _envelope(exc.exception_type, exc.message), "error")
        return _Answer(200, {"LeadId": lead_id, "Message": "Registration Successful"})

    def _inspect(self, path: str) -> _Answer:
        state = self.server.sandbox.state
        name = path.rstrip("/").lower()
        if self.command == "GET" and name == "/_sandbox/state":
            return _Answer(200, state.summary())
        if self.command == "GET" and name == "/_sandbox/leads":
            return _Answer(200, [snapshot_without_password(lead) for lead in state.leads()])
        return _Answer(404, {"Message": f"No sandbox resource '{path}'."}, "error")


def _parse_register_body(body: bytes) -> tuple[list[tuple[str, str]], bool]:
    """Check a Register body's shape; return its (Attribute, Value) pairs and RegisterOnlyNewLead."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("not valid JSON") from exc
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    only_new = data.get("RegisterOnlyNewLead", False)
    if not isinstance(only_new, bool):
        raise ValueError("RegisterOnlyNewLead must be a boolean")
    items = data.get("LeadFields")
    if not isinstance(items, list):
        raise ValueError("LeadFields must be a list")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("each LeadFields entry must be an object")
        attribute, value = item.get("Attribute"), item.get("Value")
        if not isinstance(attribute, str) or not isinstance(value, str):
            raise ValueError("each LeadFields entry needs string Attribute and Value")
        pairs.append((attribute, value))
    return pairs, only_new


class Sandbox:
    """A local LeadSquared account on loopback, for tests, the demo and users without an account.

    Faithful to the portal API contract including its failure modes: per-account moving-window rate
    limit with lockout, refusals as 429/403/200, gateway faults, lost responses and wrong-region 401s.
    The lead APIs (``/v2/LeadManagement.svc/...``, :mod:`.lead_api`) share its leads; ``lead_fields``
    sets the account's fields (default: the known attributes, typed as a university's account would
    have them) and ``bulk_rate_limit_calls``/``bulk_rate_limit_period`` the bulk call's own window.
    ``background_rate`` (calls per second, random arrivals) plays the account's other integrations:
    they spend the same budget, are locked out like us, and their refusals are counted apart
    (:attr:`refusals_by_caller`).
    """

    def __init__(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        portal_id: str = "sandbox-portal",
        rate_limit_calls: int = 25,
        rate_limit_period: float = 5.0,
        daily_call_limit: int | None = None,
        refusal_form: str = "429",
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        fault_rate: float = 0.0,
        lost_response_rate: float = 0.0,
        seed: int | None = None,
        background_rate: float = 0.0,
        unique_attributes: tuple[str, ...] | None = None,
        known_attributes: tuple[str, ...] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        lead_fields: tuple[SandboxField, ...] | None = None,
        bulk_rate_limit_calls: int = 5,
        bulk_rate_limit_period: float = 5.0,
    ) -> None:
        if lead_fields is not None:  # the account's fields say which are known and which unique
            if known_attributes is not None or unique_attributes is not None:
                raise ValueError("pass lead_fields, or known_attributes/unique_attributes, not both")
            known_attributes = tuple(f.schema_name for f in lead_fields)
            unique_attributes = tuple(f.schema_name for f in lead_fields if f.is_lead_identifier)
        known = tuple(known_attributes) if known_attributes is not None else DEFAULT_KNOWN_ATTRIBUTES
        if unique_attributes is None:
            unique_attributes = DEFAULT_UNIQUE_ATTRIBUTES
        self.config = SandboxConfig(
            rate_limit_calls=rate_limit_calls,
            rate_limit_period=float(rate_limit_period),
            daily_call_limit=daily_call_limit,
            refusal_form=str(refusal_form),
            latency=latency,
            latency_jitter=latency_jitter,
            background_rate=background_rate,
            fault_rate=fault_rate,
            lost_response_rate=lost_response_rate,
            unique_attributes=tuple(unique_attributes),
            known_attributes=known,
        )
        self.state = SandboxState(self.config, seed)
        fields = lead_fields if lead_fields is not None else default_fields(known, unique_attributes)
        self.lead_api = LeadApi(
            self.state,
            fields,
            BulkWindow(bulk_rate_limit_calls, bulk_rate_limit_period, self.config.refusal_form),
        )
        self.access_key = access_key if access_key is not None else _random_key("u$r")
        self.secret_key = secret_key if secret_key is not None else _random_key("")
        self.portal_id = portal_id
        self.public_auth_key = base64.b64encode(secrets.token_hex(24).encode()).decode()
        self.registration_token = secrets.token_hex(16)
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._background: threading.Thread | None = None
        self._background_stop = threading.Event()
        self._background_rng = random.Random(None if seed is None else seed + 1)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Bind (port 0 picks a free port) and serve in a daemon thread. Idempotent."""
        if self._server is None:
            server = _Server((self.host, self.port), self)
            self.port = server.server_address[1]
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="lsq-sandbox", daemon=True
            )
            self._server = server
            self._thread.start()
            if self.config.background_rate > 0:
                self._background_stop.clear()
                self._background = threading.Thread(
                    target=self._play_background, name="lsq-sandbox-background", daemon=True
                )
                self._background.start()
        return self

    def _play_background(self) -> None:
        """The account's other integrations: calls at random (Poisson) arrivals, ``background_rate``/s."""
        rate = self.config.background_rate
        while not self._background_stop.wait(self._background_rng.expovariate(rate)):
            self.state.admit_background(time.monotonic())

    def stop(self) -> None:
        """Stop serving, hang up on open connections and release the port. Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        self._background_stop.set()
        if self._background is not None:
            self._background.join(timeout=5)
            self._background = None
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://host:port``; the port is known once started."""
        if self.port == 0:
            raise RuntimeError("the sandbox has no port yet: call start() first")
        return f"http://{self.host}:{self.port}"

    def connection_dict(self) -> dict[str, Any]:
        """The Airflow connection (the JSON form ``AIRFLOW_CONN_<ID>`` accepts) for this sandbox."""
        return {
            "conn_type": "leadsquared",
            "host": self.url,
            "login": self.access_key,
            "password": self.secret_key,
            "extra": {
                "portal_id": self.portal_id,
                "rate_limit_calls": self.config.rate_limit_calls,
                "rate_limit_period_seconds": self.config.rate_limit_period,
                "bulk_rate_limit_calls": self.lead_api.bulk_window.calls,
                "bulk_rate_limit_period_seconds": self.lead_api.bulk_window.period,
            },
        }

    def connection_json(self) -> str:
        return json.dumps(self.connection_dict())

    # --- inspection and scripting --------------------------------------------------------------------

    @property
    def leads(self) -> list[SandboxLead]:
        return self.state.leads()

    def find_lead(self, attribute: str, value: str) -> SandboxLead | None:
        return self.state.find_lead(attribute, value)

    @property
    def calls(self) -> list[CallRecord]:
        return self.state.calls()

    @property
    def register_calls(self) -> int:
        return self.state.counters()[0]

    @property
    def refusals(self) -> int:
        """Every refusal on the account: ours and the background's."""
        return self.state.counters()[1]

    @property
    def refusals_by_caller(self) -> dict[str, int]:
        """Refusals per caller: ``ours`` (HTTP clients) and ``background`` (``background_rate``)."""
        return {caller: counts["refused"] for caller, counts in self.state.by_caller().items()}

    def calls_by_caller(self) -> dict[str, dict[str, int]]:
        """Per caller: calls that reached the rate limit, ``accepted`` and ``refused``."""
        return self.state.by_caller()

    def max_calls_in_window(self) -> int:
        return self.state.max_calls_in_window()

    def add_lead(self, fields: dict[str, str]) -> str:
        return self.state.add_lead(fields)

    def inject(self, *faults: str | int, path: str | None = None) -> None:
        """Script faults for the next matching calls (one each, in order).

        500/502/503/504 (a gateway's answer; the call is not carried out), "ratelimit" (a refusal),
        "slow:<s>" (carried out, answered ``s`` seconds late), and four that carry the call out and
        then answer without saying so: "lost" (a gateway's 502), "empty" (200, no body), "html" (200,
        an HTML page), "drop" (the connection closes, no answer). Those four take "+slow:<s>" too:
        ``inject("drop+slow:1.6")`` hangs up 1.6 s after carrying the call out.
        """
        self.state.inject(faults, path)

    def set_wrong_region(self, correct_host: str | None) -> None:
        """While set, every call answers 401 with a message naming ``correct_host``."""
        self.state.set_wrong_region(correct_host)

    def reset_calls(self) -> None:
        self.state.reset_calls()
        self.lead_api.bulk_window.reset()

    @property
    def lead_fields(self) -> tuple[SandboxField, ...]:
        """The account's lead fields, as ``LeadsMetaData.Get`` describes them."""
        return self.lead_api.fields

    @property
    def bulk_refusals(self) -> int:
        """Bulk calls refused for the bulk call's own rate limit (not counted in :attr:`refusals`)."""
        return self.lead_api.bulk_window.refusals

    def calls_to(self, endpoint_path: str) -> list[CallRecord]:
        """The calls whose path ends with ``endpoint_path`` (case-insensitive), e.g. ``"Lead.Update"``."""
        wanted = endpoint_path.rstrip("/").lower()
        return [c for c in self.calls if c.path.rstrip("/").lower().endswith(wanted)]
