"""Apache Airflow provider for LeadSquared's portal API."""

from __future__ import annotations

__version__ = "0.2.0.dev0"  # the next release; CHANGELOG.md "Unreleased" lists what it holds
