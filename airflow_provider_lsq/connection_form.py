"""The ``leadsquared`` connection form, in LeadSquared's words.

Airflow 3.2+ reads it from the provider info (``conn-fields``, ``ui-field-behaviour``); 2.11 to 3.1 ask
the hook. Both are built from these two dicts, so the keys are the same everywhere. This module imports
nothing, so provider discovery stays cheap.
"""

from __future__ import annotations

from typing import Any

CONN_FIELDS: dict[str, dict[str, Any]] = {
    "portal_id": {
        "label": "Portal Id",
        "description": "From Workflow > Manage Portals in LeadSquared (it is in the page URL).",
        "schema": {"type": ["string", "null"]},
    },
    "rate_limit_calls": {
        "label": "Rate Limit Calls",
        "description": "API calls your plan allows per window (25, 20, 15, 10, 5 or 2).",
        "schema": {"type": ["integer", "null"], "default": 25, "minimum": 1},
    },
    "rate_limit_period_seconds": {
        "label": "Rate Limit Period (seconds)",
        "schema": {"type": ["number", "null"], "default": 5, "minimum": 0.1},
    },
    "daily_call_limit": {
        "label": "Daily Call Limit",
        "description": "Optional: your plan's calls per day.",
        "schema": {"type": ["integer", "null"], "minimum": 1},
    },
    "rate_limit_reserve": {
        "label": "Rate Limit Reserve",
        "description": "Share of the plan left to the account's other integrations (0 to 0.9; default 0.1).",
        "schema": {"type": ["number", "null"], "default": 0.1, "minimum": 0, "maximum": 0.9},
    },
    "rate_limit_redis_conn_id": {
        "label": "Rate Limit Redis Connection Id",
        "description": "Optional: a 'redis' connection that shares the budget across machines.",
        "schema": {"type": ["string", "null"]},
    },
    "rate_limit_storage": {
        "label": "Rate Limit Storage",
        "description": "Empty: a file shared by this machine's tasks. 'memory': this process. Or a path.",
        "schema": {"type": ["string", "null"]},
    },
    "timeout_seconds": {
        "label": "Timeout (seconds)",
        "schema": {"type": ["number", "null"], "default": 30, "minimum": 1},
    },
    "max_retries": {
        "label": "Max Retries",
        "schema": {"type": ["integer", "null"], "default": 5, "minimum": 0},
    },
    "api_host": {
        "label": "Lead API Host",
        "description": "Optional: the lead API host (e.g. api-us11.leadsquared.com) for other endpoints.",
        "schema": {"type": ["string", "null"]},
    },
}
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["schema", "port"],
    "relabeling": {"host": "Portal API Host", "login": "Access Key", "password": "Secret Key"},
    "placeholders": {
        "host": "portalapi.leadsquared.com (default), portalapi-us11.leadsquared.com, http://127.0.0.1:8765",
        "login": "u$r...",
        "password": "the admin user's Secret Key",
        "portal_id": "e.g. 8d4f...c2",
        "rate_limit_redis_conn_id": "redis_default",
        "rate_limit_storage": "(a file in the system temp dir)",
    },
}
