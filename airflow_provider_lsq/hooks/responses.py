"""Read a LeadSquared answer: the data on success, the right exception otherwise.

The API's error envelope can come with any status code (a rate-limit refusal has been seen as 429,
403 and even 200), so every answer is checked for it first. Gateways answer HTML or nothing at all.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from airflow_provider_lsq.exceptions import (
    LeadSquaredAPIError,
    LeadSquaredAuthenticationError,
    LeadSquaredError,
    LeadSquaredLeadExistsError,
    LeadSquaredRateLimitError,
    LeadSquaredTransientError,
    LeadSquaredUnconfirmedError,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    import requests

RATE_LIMIT_TYPE = "MXAPIRateLimitExceededException"
DUPLICATE_TYPE = "MXDuplicateEntryException"
_KEY_PARAMS = re.compile(r"((?:access|secret)Key=)[^&\s'\"]*", re.IGNORECASE)
_MAX_MESSAGE = 500


def secret_forms(secret: str) -> set[str]:
    """A secret as it may appear in text: raw and in both URL encodings."""
    return {secret, quote(secret, safe=""), quote_plus(secret, safe="")} - {""}


def redact(text: str, secrets: Iterable[str]) -> str:
    """Remove every known secret, in any of its forms, and any key query parameter from ``text``."""
    for secret in sorted({form for s in secrets if s for form in secret_forms(s)}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _KEY_PARAMS.sub(r"\1***", text)


class KeyParamsLogFilter(logging.Filter):
    """Redact ``accessKey``/``secretKey`` query parameters from a logger's records.

    urllib3 logs every request line with its URL at DEBUG (``urllib3.connectionpool``); the portal API
    takes the keys as query parameters (the API notes), so a DEBUG log level would print them. The
    filter rewrites the record's message before any handler (or Airflow's masker) sees it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _KEY_PARAMS.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_key_params_in(logger_name: str) -> None:
    """Attach :class:`KeyParamsLogFilter` to ``logger_name`` (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(existing, KeyParamsLogFilter) for existing in logger.filters):
        logger.addFilter(KeyParamsLogFilter())


def _json_body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _envelope(body: Any) -> tuple[str, str] | None:
    """``(ExceptionType, ExceptionMessage)`` when the body is LeadSquared's error envelope."""
    if isinstance(body, dict) and (body.get("Status") == "Error" or "ExceptionType" in body):
        return str(body.get("ExceptionType") or "MXUnknownException"), str(
            body.get("ExceptionMessage") or body.get("Message") or ""
        )
    return None


def parse_response(response: requests.Response, secrets: Iterable[str]) -> Any:
    """Return the decoded body of a successful answer, or raise the mapped ``LeadSquaredError``."""
    status = response.status_code
    body = _json_body(response)
    envelope = _envelope(body)
    if envelope is None and 200 <= status < 300:
        # A success that does not say what happened: the call may have been carried out, or not.
        if body is None and response.content:
            raise LeadSquaredUnconfirmedError(
                f"LeadSquared answered {status} with a body that is not JSON (a gateway may be in the "
                "way): it does not say whether the call was carried out.",
                status_code=status,
            )
        if body is None and not response.content.strip():
            raise LeadSquaredUnconfirmedError(
                f"LeadSquared answered {status} with an empty body: it does not say whether the call "
                "was carried out.",
                status_code=status,
            )
        return body

    exception_type, server_message = envelope or (None, "")
    if not server_message:
        server_message = (body if isinstance(body, str) else response.text or "").strip()
    # Redact the whole text, then cut it: cut first, a secret straddling the cut is no longer matched
    # and its first characters would reach the log, the ledger and XCom.
    server_message = redact(server_message, secrets)[:_MAX_MESSAGE]
    said = f"LeadSquared answered {status}" + (f" {exception_type}" if exception_type else "")
    said += f": {server_message}" if server_message else " with no message"
    kwargs: dict[str, Any] = {"status_code": status, "exception_type": exception_type}

    error: LeadSquaredError
    if exception_type == RATE_LIMIT_TYPE or (status == 429 and envelope is None):
        error = LeadSquaredRateLimitError(
            f"{said}. The account's rate limit was exceeded; it is shared by every integration using "
            "this account. If tasks on this account run on several machines or pods (Celery, Kubernetes), "
            "set rate_limit_redis_conn_id in the connection extra so they share one budget; otherwise "
            "raise rate_limit_reserve there if this keeps happening.",
            **kwargs,
        )
    elif status == 401:
        error = LeadSquaredAuthenticationError(
            f"{said}. Check the connection's Access Key and Secret Key (an admin user's) and its host: "
            "a wrong regional host answers 401 and names the right one.",
            **kwargs,
        )
    elif exception_type == DUPLICATE_TYPE or "already exists" in server_message.lower():
        error = LeadSquaredLeadExistsError(f"{said}.", **kwargs)
    elif envelope is not None or 400 <= status < 500:
        hint = {
            400: " The request did not match the API's format.",
            403: " The keys may belong to a user who is not an admin.",
            404: " The path is wrong, or the host is not a LeadSquared portal API host.",
        }.get(status, "")
        error = LeadSquaredAPIError(f"{said}.{hint} Retrying will not help.", **kwargs)
    elif status in (502, 504):  # a gateway forwarded the call and got no usable answer (502) or none (504)
        error = LeadSquaredUnconfirmedError(
            f"{said}. The gateway forwarded the call and got no answer it could pass on: the call may have "
            "been carried out.",
            **kwargs,
        )
    else:
        error = LeadSquaredTransientError(f"{said}.", **kwargs)
    raise error
