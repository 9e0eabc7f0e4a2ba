"""The ledger table: its columns, its key and index, and the migration of an earlier release's table.

One row per (portal, warehouse row key): ``PRIMARY KEY (portal_id, row_key)``, and on SQLite and
PostgreSQL an index ``<table>_lead_identifier_idx`` on ``(portal_id, lead_identifier)``. A table made
by an earlier release, without ``lead_identifier`` or the execution columns, gets them in place
(``ALTER TABLE ... ADD COLUMN``: :data:`ADDED_COLUMNS`). Column types are the dialect's
(:mod:`.dialects`); the store runs these statements (:meth:`RegistrationLedger.ensure_table`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_provider_lsq.transfers.ledger.dialects import Dialect

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
POSITION_COLUMN = "lsq_row_position"  # the anti-join's numbering of an ordered query's rows (not sent)
COLUMNS = (
    "portal_id",
    "row_key",
    "lead_id",
    "status",
    "error_type",
    "error_message",
    "attempts",
    "first_attempt_at",
    "last_attempt_at",
    "registered_at",
    "dag_id",
    "run_id",
    "retryable",
    "lead_identifier",
    "task_id",
    "map_index",
    "execution_id",
)
IDENTIFIER_COLUMN = "lead_identifier"
# Columns added since the first release, in order: a table without them gets them (ALTER TABLE).
# The value is the column's type: "text" (the dialect's key type) or "integer".
ADDED_COLUMNS = {IDENTIFIER_COLUMN: "text", "task_id": "text", "map_index": "integer", "execution_id": "text"}


def validate_table_name(table: str) -> str:
    """``table`` if it is a plain identifier, optionally schema-qualified; ValueError otherwise."""
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ValueError(
            f"ledger table {table!r} is not a plain table name (letters, digits and underscores, "
            "optionally prefixed by a schema and a dot)"
        )
    return table


def create_table(table: str, dialect: Dialect) -> str:
    """The ``CREATE TABLE IF NOT EXISTS`` of the ledger, in ``dialect``'s types."""
    text, timestamp, boolean, false = dialect.text, dialect.timestamp, dialect.boolean, dialect.false
    return f"""
            CREATE TABLE IF NOT EXISTS {table} (
                portal_id {text} NOT NULL,
                row_key {text} NOT NULL,
                lead_id {text},
                status {text} NOT NULL,
                error_type {text},
                error_message {dialect.long_text},
                attempts INTEGER NOT NULL DEFAULT 0,
                first_attempt_at {timestamp},
                last_attempt_at {timestamp},
                registered_at {timestamp},
                dag_id {text},
                run_id {text},
                retryable {boolean} NOT NULL DEFAULT {false},
                {IDENTIFIER_COLUMN} {text},
                task_id {text},
                map_index INTEGER,
                execution_id {text},
                PRIMARY KEY (portal_id, row_key)
            )
        """


def added_column_type(name: str, dialect: Dialect, added: Mapping[str, str] = ADDED_COLUMNS) -> str:
    """The type of a column of ``added`` (default :data:`ADDED_COLUMNS`) in ``dialect``."""
    return dialect.text if added[name] == "text" else "INTEGER"


def identifier_index(table: str) -> str:
    """The name of the ``(portal_id, lead_identifier)`` index of ``table`` (without its schema)."""
    return f"{table.rpartition('.')[2]}_lead_identifier_idx"
