"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_lsq import __version__
from airflow_provider_lsq.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR

_PORTAL_URIS = {
    "schemes": ["leadsquared"],
    "handler": "airflow_provider_lsq.assets.sanitize_uri",
    "factory": "airflow_provider_lsq.assets.create_asset",
    "to_openlineage_converter": "airflow_provider_lsq.assets.convert_asset_to_openlineage",
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-leadsquared",
        "name": "LeadSquared",
        "description": "Register leads from your warehouse as LeadSquared portal users.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "LeadSquared",
                "external-doc-url": "https://apidocs.leadsquared.com/",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "LeadSquared",
                "python-modules": ["airflow_provider_lsq.hooks.leadsquared"],
            }
        ],
        "operators": [
            {
                "integration-name": "LeadSquared",
                "python-modules": ["airflow_provider_lsq.operators.portal"],
            }
        ],
        "transfers": [
            {
                "source-integration-name": "Common SQL",
                "target-integration-name": "LeadSquared",
                "python-module": "airflow_provider_lsq.transfers.sql_to_leadsquared",
            },
            {
                "source-integration-name": "Common SQL",
                "target-integration-name": "LeadSquared",
                "python-module": "airflow_provider_lsq.transfers.sql_to_leadsquared_leads",
            },
        ],
        # The portal as an Asset (Airflow 3) or Dataset (2.x): scheme, normaliser, factory, OpenLineage.
        "asset-uris": [_PORTAL_URIS],
        "dataset-uris": [_PORTAL_URIS],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_lsq.hooks.leadsquared.LeadSquaredHook",
                "hook-name": "LeadSquared",
                "connection-type": "leadsquared",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": {
                    "hidden-fields": UI_FIELD_BEHAVIOUR["hidden_fields"],
                    "relabeling": UI_FIELD_BEHAVIOUR["relabeling"],
                    "placeholders": UI_FIELD_BEHAVIOUR["placeholders"],
                },
            }
        ],
    }
