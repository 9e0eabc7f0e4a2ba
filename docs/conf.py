"""Sphinx configuration: MyST Markdown pages, the furo theme, warnings are errors (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_lsq import __version__  # noqa: E402

project = "airflow-provider-leadsquared"
author = "airflow-provider-leadsquared contributors"
copyright = "2026, airflow-provider-leadsquared contributors"
version = release = __version__

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"LeadSquared provider {__version__}"
nitpicky = True
