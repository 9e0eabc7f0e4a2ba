"""What happened to a registration: one result per call, one outcome per row."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class RegistrationStatus(str, Enum):
    """Where a row ended. Every row ends in exactly one of these."""

    REGISTERED = "registered"
    ALREADY_REGISTERED = "already_registered"  # only_new_leads was set and the lead existed
    INVALID = "invalid"  # failed the client-side checks: no call was made
    FAILED = "failed"  # the API refused it, or retries ran out

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RegistrationResult:
    """A successful Register call: the lead LeadSquared registered and what it said."""

    lead_id: str
    message: str
    attempts: int = 1


@dataclass(frozen=True)
class RegistrationOutcome:
    """The end state of one row of a bulk registration. Never holds the password.

    ``retryable`` is true for failures that a later run may fix by itself (rate limit or transient
    failures that outlasted the retries); permanent refusals and invalid rows are not retryable.
    """

    key: str
    status: RegistrationStatus
    lead_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    attempts: int = 0
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.status in (RegistrationStatus.REGISTERED, RegistrationStatus.ALREADY_REGISTERED)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for XCom and logs."""
        data = asdict(self)
        data["status"] = self.status.value
        return data
