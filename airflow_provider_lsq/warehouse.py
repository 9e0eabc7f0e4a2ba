"""Reading the warehouse: the common-sql hook of a connection, and a query's rows.

Both the transfer and its lineage need the warehouse's hook; this module gives it to both, so neither
imports the other. Only common-sql's ``DbApiHook`` is used: any database with a common-sql provider
(PostgreSQL, SQLite, Snowflake, MySQL...) works. :class:`WarehouseQuery` runs the transfer's query:
with its parameters, counted first, through a server-side cursor on PostgreSQL, and a failed read
reported without the database's message (it may quote a row's values).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from airflow.providers.common.sql.hooks.sql import DbApiHook

from airflow_provider_lsq.exceptions import WarehouseReadError
from airflow_provider_lsq.version_compat import AirflowFailException, BaseHook

if TYPE_CHECKING:
    from collections.abc import Sequence


def get_db_hook(conn_id: str, parameter: str) -> DbApiHook:
    """The common-sql hook of connection ``conn_id``, or a clear error naming ``parameter``."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not isinstance(hook, DbApiHook):
        raise AirflowFailException(
            f"{parameter}={conn_id!r}: its hook, {type(hook).__name__}, is not a common-sql DbApiHook "
            "(use a database connection such as postgres or sqlite)."
        )
    return hook


def statement_text(sql: str) -> str:
    """``sql`` without what may end it after its last token: semicolons, comments and blank space
    (``SELECT ...; -- done``), so it can be wrapped in a subquery (the ledger's anti-join, the count).

    Read with sqlparse's lexer (a common-sql dependency), so a ``;`` or ``--`` inside a string or a
    quoted name is not taken for one; a query with nothing but those is returned stripped.
    """
    from sqlparse import lexer, tokens

    parts = list(lexer.tokenize(sql))
    end = len(parts)
    while end:
        kind, text = parts[end - 1]
        if not (kind in tokens.Whitespace or kind in tokens.Comment or text == ";"):
            break
        end -= 1
    return "".join(text for _kind, text in parts[:end]).strip() or sql.strip()


def plan_for_every_row(conn: Any) -> None:
    """Plan the server-side cursor for reading every row, not the first 10% fast (PostgreSQL's
    ``cursor_tuple_fraction``): the anti-join over a grown ledger is a hash anti-join then, not an index
    probe per row (a third of the time on 1,000,000 rows). For this read's transaction only."""
    cursor = conn.cursor()
    try:
        cursor.execute("SET LOCAL cursor_tuple_fraction = 1.0")
    except Exception:  # a PostgreSQL-like database without the setting: the default plan
        with contextlib.suppress(Exception):
            conn.rollback()
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


class WarehouseQuery:
    """How the transfer's query is run on connection ``conn_id`` (with ``parameters``, in the
    driver's style) and how a failed read is told; ``log`` is the task's logger."""

    def __init__(self, conn_id: str, parameters: Any, log: Any) -> None:
        self.conn_id = conn_id
        self.parameters = parameters
        self.log = log

    def execute(self, cursor: Any, sql: str) -> None:
        if self.parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, self.parameters)

    def count(self, conn: Any, sql: str) -> int | None:
        """Rows the query will return, for progress and ETA; None when the database cannot say."""
        cursor = conn.cursor()
        try:
            # Newlines around the query: a comment on its last line does not swallow the rest.
            self.execute(cursor, f"SELECT COUNT(*) FROM (\n{sql}\n) lsq_count")
            return int(cursor.fetchone()[0])
        except Exception as error:  # the message may quote data: log its type only
            self.log.info("Could not count the rows first (%s): progress shows no ETA.", type(error).__name__)
            with contextlib.suppress(Exception):
                conn.rollback()  # PostgreSQL: the failed statement aborted the transaction
            return None
        finally:
            with contextlib.suppress(Exception):
                cursor.close()

    @staticmethod
    def cursor(conn: Any, name: str, *, server_side: bool) -> Any:
        """A cursor to read the rows with: named, so server-side on psycopg (rows come batch by batch,
        the read planned for every row), when ``server_side``; sqlite3's plain cursor is lazy."""
        if not server_side:
            return conn.cursor()
        plan_for_every_row(conn)
        return conn.cursor(name=name)

    def read_failed(self, error: Exception, rows_read: int) -> WarehouseReadError:
        """``error`` from the warehouse, logged whole (the task log), as an exception without the
        database's message, which may quote a row's values: see :class:`WarehouseReadError`."""
        self.log.error(
            "Reading the query's rows failed after %d rows: stopping. The database said:",
            rows_read,
            exc_info=error,
        )
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        code = code or getattr(error, "sqlite_errorname", None)
        kind = f"{type(error).__module__}.{type(error).__qualname__}" + (f" ({code})" if code else "")
        return WarehouseReadError(
            f"Reading the rows of the query on {self.conn_id!r} failed after {rows_read} rows: "
            f"{kind}. The database's message is in the task log (it may quote a row's values, so "
            "it is not repeated here)."
        )


def key_column_index(columns: Sequence[str], key_column: str) -> int:
    """The position of ``key_column`` in a query result's ``columns``: exact, else the one column equal
    to it but for case (PostgreSQL folds unquoted aliases to lower case).

    :raises AirflowFailException: no such column, naming the columns there are.
    """
    if key_column in columns:
        return list(columns).index(key_column)
    folded = [index for index, name in enumerate(columns) if name.lower() == key_column.lower()]
    if len(folded) == 1:
        return folded[0]
    raise AirflowFailException(
        f"key_column {key_column!r} is not a column of the query's result (columns: {', '.join(columns)})."
    )
