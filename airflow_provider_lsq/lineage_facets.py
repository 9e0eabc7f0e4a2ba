"""The provider's custom OpenLineage facet. Imports the OpenLineage client: import it only from
:mod:`airflow_provider_lsq.lineage`, once the OpenLineage provider is known to be installed.

Defined as the OpenLineage client and Airflow's OpenLineage provider define theirs: an ``attrs`` class
deriving from a facet base of ``openlineage.client.facet_v2``, with its JSON schema's URL. The schema
ships with the package (``airflow_provider_lsq/schemas/``).
"""

from __future__ import annotations

from typing import ClassVar

from attrs import define
from openlineage.client.facet_v2 import OutputDatasetFacet

# Where the facet's JSON schema is published (a copy is in airflow_provider_lsq/schemas/).
SCHEMA_URL = (
    "https://raw.githubusercontent.com/airflow-provider-leadsquared/airflow-provider-leadsquared/main/"
    "airflow_provider_lsq/schemas/LeadSquaredRegistrationOutputDatasetFacet.json"
    "#/$defs/LeadSquaredRegistrationOutputDatasetFacet"
)
FACET_NAME = "leadsquaredRegistration"  # the facet's key in the portal output's ``outputFacets``


@define
class LeadSquaredRegistrationOutputDatasetFacet(OutputDatasetFacet):
    """How a registration run's rows ended on the portal: counts only, never a lead's data.

    ``registered``, ``alreadyRegistered``, ``invalid``, ``failed`` and ``unconfirmed`` (sent, and no
    answer said what happened) count rows by outcome;
    ``skipped`` rows the ledger already held, ``duplicates`` rows repeating a key or a lead met
    earlier in the query (the SQL transfer only, else 0); ``total`` every row read; ``dryRun`` a
    run that made no call.
    """

    registered: int
    alreadyRegistered: int
    invalid: int
    failed: int
    total: int
    skipped: int = 0
    duplicates: int = 0
    dryRun: bool = False
    unconfirmed: int = 0

    _additional_skip_redact: ClassVar[list[str]] = [
        "registered",
        "alreadyRegistered",
        "invalid",
        "failed",
        "total",
        "skipped",
        "duplicates",
        "dryRun",
        "unconfirmed",
    ]

    @staticmethod
    def _get_schema() -> str:
        return SCHEMA_URL
