"""Errors raised by the LeadSquared provider.

Every error carries what LeadSquared said (``status_code``, ``exception_type``, ``message``) and says
what to do about it. Messages are built from redacted text only: no key, token or password ever
reaches one.
"""

from __future__ import annotations

from airflow_provider_lsq.version_compat import AirflowException


class LeadSquaredError(AirflowException):
    """Base class: a call to LeadSquared, or the data for one, went wrong."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        exception_type: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code  # type: ignore[assignment]  # AirflowException's is an HTTPStatus
        self.exception_type = exception_type
        self.attempts = attempts

    @property
    def error_type(self) -> str:
        """Short name for outcome records: LeadSquared's own type when it gave one."""
        return self.exception_type or type(self).__name__


class LeadSquaredAuthenticationError(LeadSquaredError):
    """401: wrong keys, a non-admin user's keys, or the wrong regional host (the message names it)."""


class LeadSquaredValidationError(LeadSquaredError):
    """A lead failed the client-side checks before any call was made; ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, exception_type="ValidationError")
        self.field = field


class LeadSquaredConfigError(LeadSquaredError, ValueError):
    """A connection value is missing, of the wrong kind, or one no request can carry.

    Raised when the connection is read, before any call; ``field`` and ``conn_id`` name the culprit.
    Fix the connection: no retry can help.
    """

    def __init__(self, message: str, *, field: str, conn_id: str | None) -> None:
        super().__init__(message, exception_type="ConnectionConfigError")
        self.field = field
        self.conn_id = conn_id


class LeadSquaredRequestError(LeadSquaredValidationError):
    """A request could not be built (a header or URL that HTTP cannot carry): nothing was sent.

    Permanent, never retried; ``field`` names the value at fault. A row that meets it ends ``invalid``.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.exception_type = "RequestError"


class LeadSquaredAPIError(LeadSquaredError):
    """A permanent refusal: 400, 404, 403 or an ``MX...`` application error. Retrying will not help."""


class LeadSquaredLeadExistsError(LeadSquaredAPIError):
    """``RegisterOnlyNewLead`` was set and the lead already exists (or a lost response registered it)."""


class LeadSquaredRateLimitError(LeadSquaredError):
    """The account's rate limit (or daily cap) kept refusing until the retry budget was spent."""


class LeadSquaredDailyLimitError(LeadSquaredRateLimitError):
    """The daily call cap set in the connection is spent: no call is made until it frees up."""


class LeadSquaredTransientError(LeadSquaredError):
    """Connection errors, timeouts or gateway failures persisted through every retry."""


class LeadSquaredUnconfirmedError(LeadSquaredTransientError):
    """The call was sent but its answer does not say what happened: LeadSquared may have carried it out.

    A read timeout, a connection dropped after the request went out, a 2xx that is empty, not JSON or
    (for Register) without a ``LeadId``, or a gateway's 502 or 504 (the gateway forwarded the call and
    got a broken answer, or gave up waiting). Retried like a transient failure, with the same request
    (so the same password); a registration that stays unproven ends ``unconfirmed``, never re-sent by
    a later run without a person deciding. A request that was never sent (refused connection, DNS,
    connect timeout) is a plain :class:`LeadSquaredTransientError`.
    """


class LeadSquaredBudgetUnavailableError(LeadSquaredError):
    """The shared rate-limit budget (the Redis server, the file) cannot be reached: no call is sent.

    It stops a bulk run, like a bad login: every row would meet it. Calls already made keep their
    outcomes.
    """


class LeadSquaredStoppedError(LeadSquaredError):
    """The task is stopping (``on_kill``): a call still waiting for the rate limit was not sent."""


class WarehouseReadError(Exception):
    """Running the transfer's query, or reading its rows, failed in the warehouse.

    Its message names the database's error (type and SQLSTATE when the driver gives one) but not the
    database's own text, which may quote a row's values (``invalid input syntax for type integer:
    "asha@example.com"``): the exception travels on to lineage (the FAIL event's ``errorMessage``
    facet), failure callbacks and notifiers. The task log has the database's message. Not an
    ``AirflowException``: Airflow retries it like the database's own error.
    """
