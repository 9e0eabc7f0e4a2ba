"""What happened to a registration: one result per call, one outcome per row."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

NOT_SENT = "NotSent"  # error type of a row the run stopped before sending
SAME_LEAD = "SameLead"  # error type of a row whose lead another row key registered: no call made


class RegistrationStatus(str, Enum):
    """Where a row ended. Every row ends in exactly one of these."""

    REGISTERED = "registered"
    ALREADY_REGISTERED = "already_registered"  # only_new_leads was set and the lead existed
    INVALID = "invalid"  # failed the client-side checks: no call was made
    FAILED = "failed"  # the API refused it, or retries ran out
    # Sent, and no answer said what happened (a timeout after sending, a dropped connection, an empty
    # or unreadable 2xx): the lead may be a portal user with this run's password. Never re-sent
    # without a person deciding (re-sending would reset that password).
    UNCONFIRMED = "unconfirmed"
    # The lead-update transfer's own ends (SqlToLeadSquaredLeadOperator); never a registration's.
    UPDATED = "updated"  # the lead's fields were sent and LeadSquared updated it
    CREATED = "created"  # upsert or create only: LeadSquared created the lead
    EXISTS = "exists"  # create only: the lead was there and was left as it is
    NOT_FOUND = "not_found"  # update only: no such lead, and none was created
    UNCHANGED = "unchanged"  # the fields last sent for this key are the same: no call

    def __str__(self) -> str:
        return self.value


# The statuses a registration's row ends in (its summary's and metrics' keys); the lead-update
# transfer's are LEAD_SYNC_STATUSES.
REGISTRATION_STATUSES = (
    RegistrationStatus.REGISTERED,
    RegistrationStatus.ALREADY_REGISTERED,
    RegistrationStatus.INVALID,
    RegistrationStatus.FAILED,
    RegistrationStatus.UNCONFIRMED,
)
LEAD_SYNC_STATUSES = (
    RegistrationStatus.UPDATED,
    RegistrationStatus.CREATED,
    RegistrationStatus.EXISTS,
    RegistrationStatus.NOT_FOUND,
    RegistrationStatus.UNCHANGED,
    RegistrationStatus.INVALID,
    RegistrationStatus.FAILED,
)
_OK = frozenset(
    {
        RegistrationStatus.REGISTERED,
        RegistrationStatus.ALREADY_REGISTERED,
        RegistrationStatus.UPDATED,
        RegistrationStatus.CREATED,
        RegistrationStatus.EXISTS,
    }
)


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
    failures that outlasted the retries); permanent refusals, invalid rows and unconfirmed rows are
    not retryable.
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
        """The row's lead is as the run wanted it: registered, or (lead updates) updated, created or
        left as it was by a create-only run."""
        return self.status in _OK

    # -- the one place outcome records are built ------------------------------------------------

    @classmethod
    def invalid(cls, key: str, message: str, error_type: str = "ValidationError") -> RegistrationOutcome:
        """A row that failed the client-side checks: no call was made."""
        return cls(key, RegistrationStatus.INVALID, error_type=error_type, error_message=message)

    @classmethod
    def registered(cls, key: str, lead_id: str, attempts: int) -> RegistrationOutcome:
        return cls(key, RegistrationStatus.REGISTERED, lead_id=lead_id, attempts=attempts)

    @classmethod
    def already_registered(
        cls, key: str, error_type: str, message: str, attempts: int
    ) -> RegistrationOutcome:
        """``only_new_leads``: the lead found by the identifier sent first exists; it was left alone."""
        return cls(
            key,
            RegistrationStatus.ALREADY_REGISTERED,
            error_type=error_type,
            error_message=message,
            attempts=attempts,
        )

    @classmethod
    def same_lead(
        cls, key: str, *, other_key: str, attribute: str, lead_id: str | None, registered: bool = True
    ) -> RegistrationOutcome:
        """A row whose lead (found by ``attribute``, the identifier sent first) another row key holds.

        ``registered``: the other key registered it (else it was recorded ``already_registered``).
        No call is made and no password generated: registering again would reset the password.
        """
        how = (
            "is a portal user already, registered"
            if registered
            else "exists already, recorded as already registered"
        )
        return cls(
            key,
            RegistrationStatus.ALREADY_REGISTERED,
            lead_id=lead_id,
            error_type=SAME_LEAD,
            error_message=f"the lead {how} by row key {other_key} (same {attribute})",
        )

    @classmethod
    def failed(
        cls, key: str, error_type: str, message: str, attempts: int, *, retryable: bool
    ) -> RegistrationOutcome:
        """The API refused the row, or retries ran out (``retryable``: a later run may succeed)."""
        return cls(
            key,
            RegistrationStatus.FAILED,
            error_type=error_type,
            error_message=message,
            attempts=attempts,
            retryable=retryable,
        )

    @classmethod
    def unconfirmed(cls, key: str, error_type: str, message: str, attempts: int) -> RegistrationOutcome:
        """Sent (every attempt with the same password), and no answer proved what happened.

        Not retryable: a later run must not send it again with a new password unless a person says so.
        """
        return cls(
            key,
            RegistrationStatus.UNCONFIRMED,
            error_type=error_type,
            error_message=f"{message} The lead may be a portal user: check it in LeadSquared before "
            "sending it again (a new registration resets its password).",
            attempts=attempts,
            retryable=False,
        )

    @classmethod
    def recorded(
        cls,
        key: str,
        status: str,
        *,
        lead_id: str | None,
        error_type: str | None,
        error_message: str | None,
        retryable: bool,
    ) -> RegistrationOutcome:
        """An outcome an earlier try of the same run recorded, counted again without a call."""
        return cls(
            key,
            RegistrationStatus(status),
            lead_id=lead_id,
            error_type=error_type,
            error_message=error_message,
            retryable=retryable,
        )

    @classmethod
    def lead(
        cls, key: str, status: RegistrationStatus, lead_id: str | None, attempts: int
    ) -> RegistrationOutcome:
        """A lead-update row's end: ``updated``, ``created``, ``exists``, ``not_found`` or ``unchanged``."""
        return cls(key, status, lead_id=lead_id, attempts=attempts)

    @classmethod
    def not_sent(cls, key: str) -> RegistrationOutcome:
        """A row handed over for a call that the run stopped before making: retryable, no call made."""
        return cls.failed(
            key,
            NOT_SENT,
            "the run stopped before this row was sent; the next run sends it",
            0,
            retryable=True,
        )

    @property
    def sent(self) -> bool:
        """A call was made for this row (so LeadSquared may hold its registration)."""
        return self.attempts > 0 or self.status in (
            RegistrationStatus.REGISTERED,
            RegistrationStatus.ALREADY_REGISTERED,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for XCom and logs."""
        data = asdict(self)
        data["status"] = self.status.value
        return data
