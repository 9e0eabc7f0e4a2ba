"""The provider as Airflow sees it: discovery, the connection type and its form, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from airflow_provider_lsq.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR
from airflow_provider_lsq.get_provider_info import get_provider_info
from airflow_provider_lsq.hooks.config import LeadSquaredConfig
from airflow_provider_lsq.hooks.leadsquared import LeadSquaredHook


def test_providers_manager_knows_the_package_and_the_connection_type() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-leadsquared" in manager.providers
    hook_info = manager.hooks["leadsquared"]
    assert hook_info is not None
    assert hook_info.hook_class_name == "airflow_provider_lsq.hooks.leadsquared.LeadSquaredHook"
    assert hook_info.connection_type == "leadsquared"
    widgets = manager.connection_form_widgets
    assert set(CONN_FIELDS) <= {
        name.split("__")[-1] for name in widgets if name.startswith("extra__leadsquared")
    }
    behaviour = manager.field_behaviours["leadsquared"]
    assert behaviour["relabeling"]["login"] == "Access Key"
    assert "schema" in behaviour["hidden_fields"]


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


def test_airflow3_form_shows_an_example_for_portal_id_and_the_rate_limit_storage() -> None:
    """Airflow 3.2+ builds extra fields from their JSON Schema: the example sits in the description.

    Airflow 3's form shows ``placeholders`` only for the built-in fields (2.11 shows them in every
    field); a text field whose schema has ``examples`` gets a placeholder and offers them.
    """
    service = pytest.importorskip("airflow.api_fastapi.core_api.services.ui.connections")
    meta = {m.connection_type: m for m in service.HookMetaService.hook_meta_data()}["leadsquared"]
    extra = meta.extra_fields
    assert extra is not None
    assert (
        "e.g." in extra["portal_id"]["description"] and "Manage Portals" in extra["portal_id"]["description"]
    )
    assert "e.g." in extra["rate_limit_storage"]["description"]
    assert "e.g. redis_default" in extra["rate_limit_redis_conn_id"]["description"]
    # A text field with ``examples`` gets a placeholder in the Airflow 3 form, and offers them.
    assert extra["rate_limit_storage"]["schema"]["examples"] == ["memory"]
    assert extra["rate_limit_redis_conn_id"]["schema"]["examples"] == ["redis_default"]
    # No password-format extra: Airflow 2.11's form renders it empty and drops it on save.
    assert all(field["schema"].get("format") != "password" for field in extra.values())
    assert extra["rate_limit_calls"]["value"] == 25  # numbers show their default
    assert meta.standard_fields.host.placeholder.startswith("portalapi.leadsquared.com")
    for name in ("portal_id", "rate_limit_storage", "rate_limit_redis_conn_id"):
        assert UI_FIELD_BEHAVIOUR["placeholders"][name]  # what Airflow 2.11 shows inside the field


def test_hook_form_widgets_carry_the_descriptions() -> None:
    pytest.importorskip("wtforms", reason="the hook-declared form (Airflow 2.11 to 3.1) needs wtforms")
    pytest.importorskip("flask_appbuilder", reason="the hook-declared form needs Flask-AppBuilder")
    widgets = LeadSquaredHook.get_connection_form_widgets()
    assert "Manage Portals" in str(widgets["portal_id"].kwargs["description"])


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
        stored = json.loads(shown.stdout)[0]
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
