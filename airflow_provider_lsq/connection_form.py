"""The ``leadsquared`` connection form, in LeadSquared's words.

Airflow 3.2+ reads it from the provider info (``conn-fields``, ``ui-field-behaviour``); 2.11 to 3.1 ask
the hook (:func:`connection_form_widgets`). Both are built from these two dicts, so the keys are the
same everywhere. This module imports nothing at import time, so provider discovery stays cheap.

Placeholders: Airflow 2.11 shows ``UI_FIELD_BEHAVIOUR["placeholders"]`` inside every field. Every
Airflow 3 form (3.0 and 3.1 too) shows those for the built-in fields (host, login, password) only. It
builds extra fields from their JSON Schema, and shows a placeholder in a text field only when its
schema has ``examples``, which it also offers as the field is typed in. So a field whose example is a
value worth picking (``memory``, ``redis_default``) has ``examples``; every extra field's example also
sits in its ``description``, shown under the field (a portal id example would be a wrong value to pick).
"""

from __future__ import annotations

from typing import Any

CONN_FIELDS: dict[str, dict[str, Any]] = {
    "portal_id": {
        "label": "Portal Id",
        "description": (
            "Needed to register portal users. In LeadSquared: Workflow > Manage Portals, open the portal; "
            "the id is in the page URL (e.g. 8d4f1a2b-...)."
        ),
        "schema": {"type": ["string", "null"]},
    },
    "rate_limit_calls": {
        "label": "Rate Limit Calls",
        "description": "API calls your plan allows per window (25, 20, 15, 10, 5 or 2).",
        "schema": {"type": ["integer", "null"], "default": 25, "minimum": 1},
    },
    "rate_limit_period_seconds": {
        "label": "Rate Limit Period (seconds)",
        "description": "Length of your plan's rate-limit window (5 seconds on the documented plans).",
        "schema": {"type": ["number", "null"], "default": 5, "minimum": 0.1, "maximum": 86400},
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
        "description": (
            "Optional: the id of an Airflow 'redis' connection (e.g. redis_default) that shares the budget "
            "across machines."
        ),
        # ``examples``: Airflow 3.2+ shows a placeholder in the field and offers them as it is typed in.
        "schema": {"type": ["string", "null"], "examples": ["redis_default"]},
    },
    "rate_limit_storage": {
        "label": "Rate Limit Storage",
        "description": (
            "Empty: a file shared by this machine's tasks. 'memory': this process only. Or a file path "
            "(e.g. /shared/lsq-budget). "
            "Across machines, use Rate Limit Redis Connection Id instead."
        ),
        "schema": {"type": ["string", "null"], "examples": ["memory"]},
    },
    "timeout_seconds": {
        "label": "Timeout (seconds)",
        "description": "Seconds each HTTP call to LeadSquared may take (1 to 3600; default 30).",
        "schema": {"type": ["number", "null"], "default": 30, "minimum": 1, "maximum": 3600},
    },
    "max_retries": {
        "label": "Max Retries",
        "description": (
            "Retries of a rate-limit refusal or transient failure, per call (0 to 100; default 5; "
            "0 turns retries off)."
        ),
        "schema": {"type": ["integer", "null"], "default": 5, "minimum": 0, "maximum": 100},
    },
    "api_host": {
        "label": "Lead API Host",
        "description": (
            "Optional: the lead API host (e.g. api-us11.leadsquared.com). Empty: the portal host's region "
            "(portalapi-us11 -> api-us11), or the portal host itself when it is not LeadSquared's."
        ),
        "schema": {"type": ["string", "null"]},
    },
    "bulk_rate_limit_calls": {
        "label": "Bulk Rate Limit Calls",
        "description": "Bulk lead calls your plan allows per bulk window (older docs: 1; newer: 5 or 10).",
        "schema": {"type": ["integer", "null"], "default": 1, "minimum": 1},
    },
    "bulk_rate_limit_period_seconds": {
        "label": "Bulk Rate Limit Period (seconds)",
        "description": "Length of the bulk call's own rate-limit window (5 seconds in the docs).",
        "schema": {"type": ["number", "null"], "default": 5, "minimum": 0.1, "maximum": 86400},
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


def connection_form_widgets() -> dict[str, Any]:
    """The extra fields as WTForms fields, for the Flask form of Airflow 2.11 to 3.1.

    Built from :data:`CONN_FIELDS`: a ``password`` format becomes a masked field, an integer an
    ``IntegerField`` with its minimum, anything else a text field. Imports Flask lazily.
    """
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import IntegerField, PasswordField, StringField
    from wtforms.validators import NumberRange, Optional

    widgets: dict[str, Any] = {}
    for name, spec in CONN_FIELDS.items():
        label = lazy_gettext(spec["label"])
        description = lazy_gettext(spec["description"]) if spec.get("description") else ""
        schema = spec["schema"]
        kinds = schema["type"]
        if schema.get("format") == "password":
            widgets[name] = PasswordField(label, widget=BS3PasswordFieldWidget(), description=description)
        elif "integer" in kinds:
            widgets[name] = IntegerField(
                label,
                validators=[Optional(), NumberRange(min=schema.get("minimum"), max=schema.get("maximum"))],
                widget=BS3TextFieldWidget(),
                default=schema.get("default"),
                description=description,
            )
        else:
            widgets[name] = StringField(
                label, widget=BS3TextFieldWidget(), default=schema.get("default"), description=description
            )
    return widgets
