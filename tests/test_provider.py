"""The provider as Airflow sees it: discovery, the connection type and its form, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from airflow_provider_lsq.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR
from airflow_provider_lsq.get_provider_info import get_provider_info
from airflow_provider_lsq.hooks.config import LeadSquaredConfig
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook
from airflow_provider_lsq.version_compat import AIRFLOW_V_3_0_PLUS, AIRFLOW_V_3_1_PLUS, AIRFLOW_V_3_2_PLUS


def _wtforms_importable() -> bool:
    return all(importlib.util.find_spec(name) for name in ("wtforms", "flask_babel", "flask_appbuilder"))


def test_providers_manager_knows_the_package_and_the_connection_type() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-leadsquared" in manager.providers
    hook_info = manager.hooks["leadsquared"]
    assert hook_info is not None
    assert hook_info.hook_class_name == "airflow_provider_lsq.hooks.leadsquared.LeadSquaredHook"
    assert hook_info.connection_type == "leadsquared"
    widgets = {name.split("__")[-1] for name in manager.connection_form_widgets if "__leadsquared__" in name}
    if AIRFLOW_V_3_2_PLUS or _wtforms_importable():
        # 3.2+: from the provider info's conn-fields; 2.11 (and 3.0/3.1 with FAB): the hook's WTForms fields.
        assert set(CONN_FIELDS) <= widgets
        behaviour = manager.field_behaviours["leadsquared"]
        assert behaviour["relabeling"]["login"] == "Access Key"
        assert "schema" in behaviour["hidden_fields"]
    else:
        # 3.0/3.1 without FAB: the manager cannot build WTForms fields (nor, with them, the hook's field
        # behaviour); the UI's form asks the hook under Airflow's own stand-ins instead
        # (test_connection_form_in_the_ui_follows_the_airflow_version).
        assert widgets == set()
        assert "leadsquared" not in manager.field_behaviours


def test_provider_info_and_hook_form_declare_the_same_fields() -> None:
    pytest.importorskip("wtforms", reason="the hook-declared form (Airflow 2.11 to 3.1) needs wtforms")
    pytest.importorskip("flask_appbuilder", reason="the hook-declared form needs Flask-AppBuilder")
    info = get_provider_info()["connection-types"][0]
    assert set(info["conn-fields"]) == set(LeadSquaredHook.get_connection_form_widgets())
    behaviour = LeadSquaredHook.get_ui_field_behaviour()
    assert info["ui-field-behaviour"]["hidden-fields"] == behaviour["hidden_fields"]
    assert info["ui-field-behaviour"]["relabeling"] == behaviour["relabeling"]
    # Airflow 2.11's form renders a password-format extra empty and drops it on save: secrets (a Redis
    # password) live in their own connection instead (rate_limit_redis_conn_id).
    assert not [name for name, spec in CONN_FIELDS.items() if spec["schema"].get("format") == "password"]
    assert UI_FIELD_BEHAVIOUR["relabeling"]["password"] == "Secret Key"


# What the Airflow 3 UI's connection form is built from, computed as the API server does it: in a fresh
# process, since Airflow caches the providers' hooks once per process (a test that read them first would
# decide what this one sees) and 3.0/3.1 put stand-ins for WTForms into sys.modules to read them.
_HOOK_META = """
import json
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

meta = {m.connection_type: m for m in HookMetaService.hook_meta_data()}["leadsquared"]
host = meta.standard_fields.host.model_dump() if meta.standard_fields else None
print(json.dumps({"extra": meta.extra_fields, "host": host}))
"""


def test_connection_form_in_the_ui_follows_the_airflow_version() -> None:
    """Every Airflow 3 form shows a field's description under it; where it comes from follows the version.

    3.2+ builds extra fields from the provider info's JSON Schema, and a text field whose schema has
    ``examples`` gets a placeholder and offers them. 3.0 and 3.1 ask the hook for its WTForms fields under
    Airflow's stand-ins (3.1 always, 3.0 only when Flask-AppBuilder and WTForms are installed, as the FAB
    provider installs them: without, 3.0's form has no extra field for any provider) and keep only the
    label, description, type and default. Airflow 3's form shows ``placeholders`` only for the built-in
    fields (2.11 shows them in every field), so every example also sits in the description.
    """
    if not AIRFLOW_V_3_0_PLUS:
        pytest.skip("Airflow 2.11's form is the Flask one: test_hook_form_widgets_carry_the_descriptions")
    done = subprocess.run(
        [sys.executable, "-c", _HOOK_META], capture_output=True, text=True, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    extra = meta["extra"]
    if not (AIRFLOW_V_3_1_PLUS or _wtforms_importable()):
        # 3.0 without the FAB provider: no extra field and no relabelled built-in one, for every provider;
        # docs/connection.md says so, and what to do.
        assert (extra, meta["host"]) == (None, None)
        return
    assert meta["host"]["placeholder"].startswith("portalapi.leadsquared.com")
    assert meta["host"]["title"] == "Portal API Host"
    assert extra is not None
    assert set(extra) == set(CONN_FIELDS)
    for name, spec in CONN_FIELDS.items():
        assert extra[name]["description"] == spec["description"], name  # every field says what it is
        assert extra[name]["schema"]["title"] == spec["label"]
    assert "Manage Portals" in extra["portal_id"]["description"]
    for name in ("portal_id", "rate_limit_storage", "rate_limit_redis_conn_id"):
        assert "e.g." in extra[name]["description"], name
        assert UI_FIELD_BEHAVIOUR["placeholders"][name]  # what Airflow 2.11 shows inside the field
    # No password-format extra: Airflow 2.11's form renders it empty and drops it on save.
    assert all(field["schema"].get("format") != "password" for field in extra.values())
    assert extra["rate_limit_calls"]["value"] == 25  # numbers show their default
    if AIRFLOW_V_3_2_PLUS:
        assert extra["rate_limit_storage"]["schema"]["examples"] == ["memory"]
        assert extra["rate_limit_redis_conn_id"]["schema"]["examples"] == ["redis_default"]
    else:  # the hook's fields carry no examples: the description holds them
        assert "examples" not in extra["rate_limit_storage"]["schema"]


def test_hook_form_widgets_carry_the_descriptions() -> None:
    """The Flask form (Airflow 2.11, or 3.0/3.1 with the FAB provider) gets real WTForms fields."""
    if not _wtforms_importable():
        pytest.skip("no WTForms here: the Airflow 3 form is built without them, tested above")
    widgets = LeadSquaredHook.get_connection_form_widgets()
    for name, spec in CONN_FIELDS.items():
        assert str(widgets[name].kwargs["description"]) == spec["description"], name


def _airflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow", *args], capture_output=True, text=True, env=os.environ.copy()
    )


@pytest.mark.airflow_db
def test_cli_lists_the_provider_and_adds_a_leadsquared_connection(airflow_db: object) -> None:
    listed = _airflow("providers", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert "airflow-provider-leadsquared" in listed.stdout

    conn_id = f"lsq_cli_{uuid.uuid4().hex[:8]}"  # new each run: no CLI call to clear a leftover first
    added = _airflow(
        "connections",
        "add",
        conn_id,
        "--conn-type",
        "leadsquared",
        "--conn-host",
        "portalapi-us11.leadsquared.com",
        "--conn-login",
        "u$r+AK/9=x",
        "--conn-password",
        "s3cr$t&+",
        "--conn-extra",
        json.dumps({"portal_id": "p-123", "rate_limit_calls": 10}),
    )
    assert added.returncode == 0, added.stderr
    try:
        shown = _airflow("connections", "get", conn_id, "--output", "json")
        assert shown.returncode == 0, shown.stderr
        # The JSON document, after any log line Airflow's logging sends to stdout first (3.2.2 with its
        # pinned alembic logs "setup plugin alembic..." at INFO there).
        start = re.search(r"^\[\s*\{", shown.stdout, re.MULTILINE)
        assert start is not None, shown.stdout[-2000:]
        stored = json.loads(shown.stdout[start.start() :])[0]
        assert stored["conn_type"] == "leadsquared"
        # The connection as the metadata DB holds it, read back by Airflow's own CLI.
        from airflow_provider_lsq.version_compat import Connection

        conn = Connection(
            conn_id=conn_id,
            conn_type=stored["conn_type"],
            host=stored["host"],
            login=stored["login"],
            password=stored["password"],
            extra=json.dumps(stored["extra_dejson"]),
        )
        config = LeadSquaredConfig.from_connection(conn)
        assert config.base_url == "https://portalapi-us11.leadsquared.com"
        assert (config.access_key, config.secret_key) == ("u$r+AK/9=x", "s3cr$t&+")
        assert (config.portal_id, config.rate_limit_calls, config.rate_limit_period_seconds) == (
            "p-123",
            10,
            5,
        )
        assert "s3cr$t" not in repr(config)
    finally:
        _airflow("connections", "delete", conn_id)


# Realistic keys: Airflow 2.11 masks any registered secret, even "a", in every later log line.
KEYS = {"login": "u$r-access-key", "password": "s3cr3t-secret-key"}


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "https://portalapi.leadsquared.com"),
        ("portalapi-in21.leadsquared.com", "https://portalapi-in21.leadsquared.com"),
        ("http://127.0.0.1:8765/", "http://127.0.0.1:8765"),
    ],
)
def test_host_forms(host: str | None, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {"conn_type": "leadsquared", "host": host, **KEYS}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_HOSTS", json.dumps(conn))
    assert LeadSquaredHook("lsq_hosts").config.base_url == url


def test_bad_extras_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = {"conn_type": "leadsquared", **KEYS, "extra": {"rate_limit_calls": "lots"}}
    monkeypatch.setenv("AIRFLOW_CONN_LSQ_BAD_EXTRA", json.dumps(conn))
    with pytest.raises(ValueError, match="rate_limit_calls"):
        LeadSquaredHook("lsq_bad_extra").config  # noqa: B018
