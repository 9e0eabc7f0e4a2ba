"""A local LeadSquared portal API and lead APIs for tests, the demo and users without an account.

``with Sandbox() as sb:`` serves on loopback; ``sb.connection_json()`` is the Airflow connection for it.
"""

from __future__ import annotations

from airflow_provider_lsq.sandbox.lead_api import SandboxField
from airflow_provider_lsq.sandbox.server import Sandbox
from airflow_provider_lsq.sandbox.state import CallRecord, SandboxLead

__all__ = ["CallRecord", "Sandbox", "SandboxField", "SandboxLead"]
