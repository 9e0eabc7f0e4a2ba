"""Reading the warehouse: the common-sql hook of a connection, and a query's rows.

Both the transfer and its lineage need the warehouse's hook; this module gives it to both, so neither
imports the other. Only common-sql's ``DbApiHook`` is used: any database with a common-sql provider
(PostgreSQL, SQLite, Snowflake, MySQL...) works.
"""

from __future__ import annotations

from airflow.providers.common.sql.hooks.sql import DbApiHook

from airflow_provider_lsq.version_compat import AirflowFailException, BaseHook


def get_db_hook(conn_id: str, parameter: str) -> DbApiHook:
    """The common-sql hook of connection ``conn_id``, or a clear error naming ``parameter``."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not isinstance(hook, DbApiHook):
        raise AirflowFailException(
            f"{parameter}={conn_id!r}: its hook, {type(hook).__name__}, is not a common-sql DbApiHook "
            "(use a database connection such as postgres or sqlite)."
        )
    return hook
