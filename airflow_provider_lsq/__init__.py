"""Apache Airflow provider for LeadSquared's portal API."""

from __future__ import annotations

__version__ = "0.1.0"
