"""The sandbox account's state: leads, call log, rate window and scripted faults.

Everything here is guarded by one lock so the threaded HTTP server can share it. No HTTP lives here:
the server asks :meth:`SandboxState.admit` what to do with a call that arrived, sleeps outside the
lock, then runs :meth:`SandboxState.register` and records the answer with :meth:`SandboxState.record`.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import threading
import uuid
from collections import deque
from dataclasses import dataclass

PASSWORD = "mx_Portal_Password"
CONFIRM_PASSWORD = "mx_Portal_Confirm_Password"
DEFAULT_UNIQUE_ATTRIBUTES: tuple[str, ...] = ("EmailAddress", "Phone", "Mobile", "mx_PAN_Number")
DEFAULT_KNOWN_ATTRIBUTES: tuple[str, ...] = (
    "FirstName",
    "LastName",
    "EmailAddress",
    "Phone",
    "Mobile",
    "mx_PAN_Number",
    "mx_Program",
    "mx_Intake",
    "mx_City",
    "mx_Date_Of_Birth",
    "mx_Application_Number",
    "Source",
    PASSWORD,
    CONFIRM_PASSWORD,
)
REFUSAL_FORMS = ("429", "403", "200", "cycle")
OURS, BACKGROUND = "ours", "background"  # who spent the account's budget: HTTP clients, or the sandbox
_CYCLE = (429, 403, 200)
GATEWAY_STATUSES = (500, 502, 503, 504)


@dataclass(frozen=True)
class SandboxLead:
    """A snapshot of one lead. Only a sha256 of the last portal password is kept, never the password."""

    lead_id: str
    fields: dict[str, str]
    portal_user: bool = False
    registrations: int = 0
    password_sha256: str | None = None


@dataclass(frozen=True)
class CallRecord:
    """One call as the sandbox saw it; ``at`` is ``time.monotonic()`` on arrival, before any latency."""

    at: float
    method: str
    path: str
    status: int
    outcome: str  # "ok", "refused", "fault", "lost", "empty", "html", "dropped", "error", "unauthorized"


class ApiError(Exception):
    """An application error the API answers with the ``MX...`` envelope (HTTP 500)."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


@dataclass(frozen=True)
class Decision:
    """What to do with an admitted call: refuse it, fault it, lose its answer, or serve it.

    ``kind`` is "refuse", "fault", "lost", "empty", "html", "drop" or "serve"; the last four and
    "lost" carry the call out first ("lost" then answers a gateway's 502, "empty" a 200 with no body,
    "html" a 200 with an HTML page, "drop" hangs up without an answer); ``status`` is the HTTP status
    for a refusal or a fault; ``html`` says whether a fault carries an HTML body; ``delay`` is the
    sleep before answering.
    """

    kind: str
    status: int = 200
    message: str = ""
    html: bool = True
    delay: float = 0.0


# Scripted faults after which the call is carried out but the answer does not say so: the fault's
# name is the decision's kind ("lost": a gateway's 502; "empty": a 200 without a body; "html": a 200
# with an HTML page; "drop": the connection closed without any answer).
AFTER_ACTING = ("lost", "empty", "html", "drop")


def parse_fault(fault: str | int) -> str:
    """Normalise an injectable fault to its canonical string, or raise ValueError.

    A fault may end in ``+slow:<seconds>`` ("drop+slow:1.6"): the call is carried out and its
    answer (or the hang-up) comes that much later.
    """
    text = str(fault).strip().lower()
    base, plus, delay = text.partition("+")
    if plus:
        if base not in AFTER_ACTING or not delay.startswith("slow:"):
            raise ValueError(f"unknown fault {fault!r}: only {AFTER_ACTING} take '+slow:<seconds>'")
        return f"{base}+{parse_fault(delay)}"
    if text in {str(s) for s in GATEWAY_STATUSES} or text in {*AFTER_ACTING, "ratelimit"}:
        return text
    if text.startswith("slow:"):
        seconds = float(text[5:])
        if seconds < 0:
            raise ValueError(f"negative delay in fault {fault!r}")
        return f"slow:{seconds}"
    raise ValueError(
        f"unknown fault {fault!r}: use 500/502/503/504, 'lost', 'empty', 'html', 'drop', 'ratelimit' "
        "or 'slow:<seconds>' (the four that carry the call out may add '+slow:<seconds>')"
    )


@dataclass
class _Lead:
    lead_id: str
    fields: dict[str, str]
    portal_user: bool = False
    registrations: int = 0
    password_sha256: str | None = None

    def snapshot(self) -> SandboxLead:
        return SandboxLead(
            self.lead_id, dict(self.fields), self.portal_user, self.registrations, self.password_sha256
        )


@dataclass(frozen=True)
class SandboxConfig:
    """The account's plan and the sandbox's misbehaviour settings."""

    rate_limit_calls: int = 25
    rate_limit_period: float = 5.0
    daily_call_limit: int | None = None
    refusal_form: str = "429"
    latency: float = 0.0
    latency_jitter: float = 0.0
    background_rate: float = 0.0
    fault_rate: float = 0.0
    lost_response_rate: float = 0.0
    unique_attributes: tuple[str, ...] = DEFAULT_UNIQUE_ATTRIBUTES
    known_attributes: tuple[str, ...] = DEFAULT_KNOWN_ATTRIBUTES

    def __post_init__(self) -> None:
        if self.refusal_form not in REFUSAL_FORMS:
            raise ValueError(f"refusal_form must be one of {REFUSAL_FORMS}, not {self.refusal_form!r}")
        if self.rate_limit_calls < 1 or self.rate_limit_period <= 0:
            raise ValueError("the rate limit needs at least 1 call in a positive period")
        if self.background_rate < 0:
            raise ValueError("background_rate must be zero or positive (calls per second)")
        for name in ("fault_rate", "lost_response_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


class SandboxState:
    """Thread-safe state of one sandbox account (see the module docstring for the call flow)."""

    def __init__(self, config: SandboxConfig, seed: int | None = None) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._wrong_region_host: str | None = None
        self._leads: dict[str, _Lead] = {}
        self._calls: list[CallRecord] = []
        self._window: deque[float] = deque()  # accepted arrivals within the last period
        self._accepted: list[float] = []  # every accepted arrival, for inspection
        self._lockout_until: float | None = None
        self._daily_count = 0
        self._refusals = 0
        self._by_caller = self._zero_by_caller()
        self._register_calls = 0
        self._cycle_index = 0
        self._faults: list[tuple[str, str | None]] = []

    @staticmethod
    def _zero_by_caller() -> dict[str, dict[str, int]]:
        return {caller: {"calls": 0, "accepted": 0, "refused": 0} for caller in (OURS, BACKGROUND)}

    # --- rate limit, faults and latency -------------------------------------------------------------

    def admit(self, at: float, path: str) -> Decision:
        """Decide, at arrival time ``at``, whether a call is refused, faulted, lost or served."""
        cfg = self.config
        with self._lock:
            self._by_caller[OURS]["calls"] += 1
            refusal = self._rate_refusal(at, OURS)
            if refusal is not None:
                return refusal
            scripted = self._pop_fault(path)
            if scripted == "ratelimit":
                return self._refuse(self._limit_message(), OURS)
            self._accept(at, OURS)
            if scripted is not None:
                if scripted.startswith("slow:"):
                    return Decision("serve", delay=float(scripted[5:]))
                kind, _, slow = scripted.partition("+slow:")
                if kind in AFTER_ACTING:
                    return Decision(kind, status=502 if kind == "lost" else 200, delay=float(slow or 0))
                status = int(scripted)
                return Decision("fault", status=status, html=status != 500)
            if cfg.fault_rate and self._rng.random() < cfg.fault_rate:
                status = self._rng.choice((502, 503))
                return Decision("fault", status=status, html=self._rng.random() < 0.5)
            is_register = path.rstrip("/").lower().endswith("/register")
            if is_register and cfg.lost_response_rate and self._rng.random() < cfg.lost_response_rate:
                return Decision("lost", status=502)
            return Decision("serve")

    def admit_background(self, at: float) -> bool:
        """One call of the account's other integrations (``background_rate``): True if it was accepted.

        It spends the same budget as ours, and is refused and locked out the same way. Scripted faults
        are left for our calls.
        """
        with self._lock:
            self._by_caller[BACKGROUND]["calls"] += 1
            if self._rate_refusal(at, BACKGROUND) is not None:
                return False
            self._accept(at, BACKGROUND)
            return True

    def _accept(self, at: float, caller: str) -> None:
        bisect.insort(self._window, at)
        self._accepted.append(at)
        self._daily_count += 1
        self._by_caller[caller]["accepted"] += 1

    def latency_delay(self) -> float:
        """Seconds to wait before answering: the fixed latency plus a random jitter."""
        cfg = self.config
        if not cfg.latency_jitter:
            return cfg.latency
        with self._lock:
            return cfg.latency + self._rng.uniform(0.0, cfg.latency_jitter)

    def _rate_refusal(self, at: float, caller: str) -> Decision | None:
        cfg = self.config
        if self._lockout_until is not None:
            if at < self._lockout_until:
                return self._refuse(self._limit_message(), caller)
            self._lockout_until = None
        # Arrivals are stamped before the lock, so threads can enter out of order: keep the window sorted,
        # count every accepted arrival after ``at - period`` (later ones too), and prune only far back.
        while self._window and self._window[0] <= at - 2 * cfg.rate_limit_period:
            self._window.popleft()
        recent = len(self._window) - bisect.bisect_right(self._window, at - cfg.rate_limit_period)
        if recent >= cfg.rate_limit_calls:
            self._lockout_until = at + cfg.rate_limit_period
            return self._refuse(self._limit_message(), caller)
        if cfg.daily_call_limit is not None and self._daily_count >= cfg.daily_call_limit:
            self._refusals += 1
            self._by_caller[caller]["refused"] += 1
            message = f"API calls exceeded the daily limit of {cfg.daily_call_limit}"
            return Decision("refuse", status=429, message=message)
        return None

    def _limit_message(self) -> str:
        period = self.config.rate_limit_period
        shown = int(period) if float(period).is_integer() else period
        return f"API calls exceeded the limit of {self.config.rate_limit_calls} in {shown} second(s)"

    def _refuse(self, message: str, caller: str) -> Decision:
        self._refusals += 1
        self._by_caller[caller]["refused"] += 1
        form = self.config.refusal_form
        if form == "cycle":
            status = _CYCLE[self._cycle_index % len(_CYCLE)]
            self._cycle_index += 1
        else:
            status = int(form)
        return Decision("refuse", status=status, message=message)

    def _pop_fault(self, path: str) -> str | None:
        for index, (fault, fault_path) in enumerate(self._faults):
            if fault_path is None or fault_path.rstrip("/").lower() == path.rstrip("/").lower():
                del self._faults[index]
                return fault
        return None

    def inject(self, faults: tuple[str | int, ...], path: str | None) -> None:
        """Queue scripted faults, consumed in order by calls to ``path`` (None: any path).

        Only calls that pass the keys and the rate limit consume one; a consumed "ratelimit" is refused.
        """
        parsed = [parse_fault(f) for f in faults]
        with self._lock:
            self._faults.extend((f, path) for f in parsed)

    # --- leads ----------------------------------------------------------------------------------------

    def register(self, lead_fields: list[tuple[str, str]], only_new: bool) -> str:
        """Run a Register call's business rules; return the lead id or raise :class:`ApiError`."""
        cfg = self.config
        known = {a.lower(): a for a in cfg.known_attributes}
        unknown = [a for a, _ in lead_fields if a.lower() not in known]
        if unknown:
            raise ApiError(
                "MXInvalidAttributeException", f"Attribute(s) does not exist - {','.join(unknown)}"
            )
        values: dict[str, str] = {}
        for attribute, value in lead_fields:
            values[known[attribute.lower()]] = value
        missing = [a for a in (PASSWORD, CONFIRM_PASSWORD) if not values.get(a)]
        uniques = {u.lower() for u in cfg.unique_attributes}
        identifier = next(
            ((known[a.lower()], v) for a, v in lead_fields if a.lower() in uniques and v.strip()), None
        )
        if identifier is None:
            missing.append("a unique lead identifier (" + ", ".join(cfg.unique_attributes) + ")")
        if missing:
            raise ApiError(
                "MXMandatoryAttributeMissingException",
                "Mandatory attribute(s) missing - " + ", ".join(missing),
            )
        if values[PASSWORD] != values[CONFIRM_PASSWORD]:
            raise ApiError("MXInvalidInputException", "Password and Confirm Password do not match")
        assert identifier is not None
        password_hash = hashlib.sha256(values[PASSWORD].encode()).hexdigest()
        fields = {a: v for a, v in values.items() if a not in (PASSWORD, CONFIRM_PASSWORD)}
        with self._lock:
            lead = self._find(*identifier)
            if lead is not None and only_new:
                raise ApiError("MXDuplicateEntryException", "User already exists.")
            # Uniqueness is wider than the identifier sent first: any unique field's value held by
            # another lead is a duplicate (API notes, "Field behaviour worth designing for").
            for attribute, value in fields.items():
                if attribute.lower() in uniques and value.strip() and attribute != identifier[0]:
                    holder = self._find(attribute, value)
                    if holder is not None and holder is not lead:
                        raise ApiError(
                            "MXDuplicateEntryException", f"A lead with the same {attribute} already exists."
                        )
            if lead is None:
                lead = _Lead(str(uuid.uuid4()), {})
                self._leads[lead.lead_id] = lead
            lead.fields.update(fields)
            lead.portal_user = True
            lead.registrations += 1
            lead.password_sha256 = password_hash
            return lead.lead_id

    def count_register_call(self) -> None:
        """Count a Register call that reached processing (was neither refused nor faulted)."""
        with self._lock:
            self._register_calls += 1

    def _find(self, attribute: str, value: str) -> _Lead | None:
        if attribute.lower() == "emailaddress":
            wanted = value.strip().casefold()
            for lead in self._leads.values():
                if lead.fields.get("EmailAddress", "").strip().casefold() == wanted:
                    return lead
            return None
        for lead in self._leads.values():
            if lead.fields.get(attribute) == value:
                return lead
        return None

    def find_lead(self, attribute: str, value: str) -> SandboxLead | None:
        """Snapshot of the first lead whose ``attribute`` equals ``value`` (EmailAddress ignores case)."""
        with self._lock:
            lead = self._find(attribute, value)
            return lead.snapshot() if lead else None

    def add_lead(self, fields: dict[str, str]) -> str:
        """Create an existing (non portal user) lead and return its id."""
        lead = _Lead(str(uuid.uuid4()), dict(fields))
        with self._lock:
            self._leads[lead.lead_id] = lead
        return lead.lead_id

    def leads(self) -> list[SandboxLead]:
        with self._lock:
            return [lead.snapshot() for lead in self._leads.values()]

    # --- call log -------------------------------------------------------------------------------------

    def record(self, call: CallRecord) -> None:
        with self._lock:
            self._calls.append(call)

    def calls(self) -> list[CallRecord]:
        with self._lock:
            return sorted(self._calls, key=lambda c: c.at)

    def counters(self) -> tuple[int, int]:
        """(register_calls, refusals)."""
        with self._lock:
            return self._register_calls, self._refusals

    def by_caller(self) -> dict[str, dict[str, int]]:
        """Per caller (``ours``: HTTP clients; ``background``: the other integrations the sandbox plays):
        calls that reached the rate limit, accepted and refused."""
        with self._lock:
            return {caller: dict(counts) for caller, counts in self._by_caller.items()}

    def summary(self) -> dict[str, object]:
        """Counts for the ``/_sandbox/state`` endpoint."""
        with self._lock:
            return {
                "leads": len(self._leads),
                "portal_users": sum(1 for lead in self._leads.values() if lead.portal_user),
                "register_calls": self._register_calls,
                "refusals": self._refusals,
                "calls": len(self._calls),
                "by_caller": {caller: dict(counts) for caller, counts in self._by_caller.items()},
            }

    def max_calls_in_window(self) -> int:
        """Most accepted arrivals that fall within any span shorter than the rate period."""
        with self._lock:
            times = sorted(self._accepted)
        period = self.config.rate_limit_period
        best = start = 0
        for end, at in enumerate(times):
            while at - times[start] >= period:
                start += 1
            best = max(best, end - start + 1)
        return best

    def reset_calls(self) -> None:
        """Forget calls, counters, the rate window, the lockout and pending faults (not leads)."""
        with self._lock:
            self._calls.clear()
            self._window.clear()
            self._accepted.clear()
            self._lockout_until = None
            self._daily_count = 0
            self._refusals = 0
            self._by_caller = self._zero_by_caller()
            self._register_calls = 0
            self._cycle_index = 0
            self._faults.clear()

    def set_wrong_region(self, host: str | None) -> None:
        with self._lock:
            self._wrong_region_host = host

    def wrong_region(self) -> str | None:
        with self._lock:
            return self._wrong_region_host


def snapshot_without_password(lead: SandboxLead) -> dict[str, object]:
    """A lead as the ``/_sandbox/leads`` endpoint shows it: no password hash."""
    return {
        "lead_id": lead.lead_id,
        "fields": lead.fields,
        "portal_user": lead.portal_user,
        "registrations": lead.registrations,
    }


__all__ = [
    "ApiError",
    "CallRecord",
    "Decision",
    "SandboxConfig",
    "SandboxLead",
    "SandboxState",
    "parse_fault",
]
