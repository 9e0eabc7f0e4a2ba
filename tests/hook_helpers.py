"""Helpers for tests that drive LeadSquaredHook against a sandbox through an Airflow connection."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

    from airflow_provider_lsq.sandbox import Sandbox

# Keys full of the characters that break a client which forgets to URL-encode them.
NASTY_ACCESS_KEY = "u$r+AK/9=x&y$$1"
NASTY_SECRET_KEY = "s3cr$t+/==&amp;z+Q$"


def connect(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, conn_id: str = "lsq_test", **extra: Any
) -> str:
    """Point connection ``conn_id`` at ``sandbox`` (fast retries unless overridden); return the id."""
    conn = json.loads(sandbox.connection_json())
    conn["extra"] = {"retry_wait_seconds": 0.01, **conn["extra"], **extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def calls_to(sandbox: Sandbox, path: str) -> int:
    return sum(1 for call in sandbox.calls if call.path == path)
