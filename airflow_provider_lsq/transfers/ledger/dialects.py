"""Where the ledger's databases differ: the one place for SQLite, PostgreSQL and the generic rest.

The ledger speaks plain DB-API with the hook's placeholder; what its databases do differently is
here, one class per dialect: column types, the database's clock, how a transaction bounds its lock
waits, how claims are serialised, how an absent row is inserted, timestamps and booleans as stored,
how many parameters a statement takes, and how the migration adds columns and the index. A database
other than SQLite or PostgreSQL is :class:`GenericDialect` (standard SQL only); its common-sql name
still picks the quoting and text type of the transfer's anti-join.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
from typing import Any, ClassVar

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_LOCK_TIMEOUT = "5s"  # a migration waits this long for the table's lock, then retries (backoff)
LOOKUP_CHUNK = 400  # keys per SELECT/DELETE: well under SQLite's oldest 999-parameter limit
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S"


class Dialect:
    """What the ledger needs to know about its database (this base: standard SQL, no extension).

    :param hook_name: the hook's own ``dialect_name`` (``mysql``, ``mssql``...), for the anti-join.
    """

    name: ClassVar[str] = "generic"
    #: Column types: the key and text columns, timestamps, booleans and the false literal.
    text: ClassVar[str] = "VARCHAR(255)"
    timestamp: ClassVar[str] = "TIMESTAMP"
    boolean: ClassVar[str] = "BOOLEAN"
    false: ClassVar[str] = "FALSE"
    long_text: ClassVar[str] = "VARCHAR(2000)"  # error_message
    #: Parameters one batch lookup may bind (keys and fingerprints in one SELECT).
    batch_parameters: ClassVar[int] = 2 * LOOKUP_CHUNK
    #: ``INSERT ... ON CONFLICT (portal_id, row_key) DO NOTHING`` is understood.
    on_conflict_do_nothing: ClassVar[bool] = False
    #: What a SELECT appends to lock the rows it reads until the transaction ends.
    row_lock: ClassVar[str] = ""
    #: A select-list item reading the database's clock (UTC) with each row; "" when it has none.
    clock_column: ClassVar[str] = ""
    #: The ``(portal_id, lead_identifier)`` index is made (:meth:`create_index`).
    makes_index: ClassVar[bool] = False

    def __init__(self, hook_name: str = "") -> None:
        self.hook_name = hook_name

    @staticmethod
    def of(db_hook: Any) -> Dialect:
        """The dialect of a common-sql hook, from its ``dialect_name``."""
        name = str(getattr(db_hook, "dialect_name", "") or "")
        return Dialect.named(name, hook_name=name)

    @staticmethod
    def named(name: str, *, hook_name: str) -> Dialect:
        """The rules of dialect ``name`` (``sqlite``, ``postgresql``; anything else: generic)."""
        return _DIALECTS.get(name, Dialect)(hook_name)

    # -- connections and transactions --------------------------------------------------------------

    def prepare_connection(self, conn: Any, write_timeout: float) -> None:
        """A new connection: an sqlite3 one waits out other writers' locks (within the write bound)
        instead of failing at once."""
        if isinstance(conn, sqlite3.Connection):
            busy_ms = int(min(SQLITE_BUSY_TIMEOUT_MS, write_timeout * 1000))
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")

    def begin(self, cursor: Any, write_timeout: float) -> None:
        """At the start of each transaction (bound its lock waits: see the store's ``_transaction``)."""

    def now(self, cursor: Any) -> dt.datetime:
        """The database's clock, UTC, to the second (this base: the local clock; keep it in step)."""
        return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    def lock_claims(self, cursor: Any, conn: Any, table: str, portal_id: str, placeholder: str) -> None:
        """Serialise the claims of ``table`` and ``portal_id`` until the transaction ends (this base:
        not at all, which only narrows the window)."""

    # -- values as stored ----------------------------------------------------------------------

    def to_db(self, value: dt.datetime | None) -> Any:
        """A UTC timestamp as this database stores it."""
        if value is None:
            return None
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None, microsecond=0)

    def to_db_boolean(self, value: bool) -> Any:
        return value

    # -- schema and migration --------------------------------------------------------------------

    def before_create(self, conn: Any) -> None:
        """Before the table is created (SQLite: the file switched to WAL)."""

    def migration_lock(self, cursor: Any) -> None:
        """Before a migration's ALTER: how long it waits for the table's lock (PostgreSQL)."""

    def add_column(self, table: str, name: str, kind: str) -> str:
        """The statement adding column ``name`` (a concurrent run that added it first makes it fail:
        the write's retry then finds the column)."""
        return f"ALTER TABLE {table} ADD COLUMN {name} {kind}"

    def create_index(self, cursor: Any, placeholder: str, table: str, index: str, columns: str) -> None:
        """Create ``index`` on ``table`` if it is not there (this base: no index at all)."""

    # -- the transfer's anti-join ----------------------------------------------------------------

    @property
    def quote_mark(self) -> str:
        """How a name is quoted in the anti-join: by the hook's own dialect (MySQL's backquote)."""
        return "`" if self.hook_name == "mysql" else '"'

    @property
    def cast_text(self) -> str:
        """The type a key is cast to, to compare it with the ledger's text ``row_key``."""
        return {"sqlite": "TEXT", "postgresql": "TEXT", "mysql": "CHAR"}.get(self.hook_name, "VARCHAR(255)")


class SqliteDialect(Dialect):
    name = "sqlite"
    text = "TEXT"
    timestamp = "TEXT"
    boolean = "INTEGER"
    false = "0"
    long_text = "TEXT"
    makes_index = True
    # SQLite since 3.32 takes 32766 parameters a statement.
    batch_parameters = 32_000 if sqlite3.sqlite_version_info >= (3, 32) else 990
    on_conflict_do_nothing = True

    def lock_claims(self, cursor: Any, conn: Any, table: str, portal_id: str, placeholder: str) -> None:
        if isinstance(conn, sqlite3.Connection) and not conn.in_transaction:
            cursor.execute("BEGIN IMMEDIATE")  # the write lock now, so the checks read the latest rows

    def to_db(self, value: dt.datetime | None) -> Any:
        if value is None:
            return None
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None).strftime(_SQLITE_TIME)

    def to_db_boolean(self, value: bool) -> Any:
        return int(value)

    def before_create(self, conn: Any) -> None:
        conn.execute("PRAGMA journal_mode=WAL")

    def create_index(self, cursor: Any, placeholder: str, table: str, index: str, columns: str) -> None:
        schema, _, name = table.rpartition(".")
        qualified = f"{schema}.{index}" if schema else index  # SQLite names the schema on the index
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {qualified} ON {name} ({columns})")


class PostgresDialect(Dialect):
    name = "postgresql"
    text = "TEXT"
    timestamp = "TIMESTAMP"
    long_text = "TEXT"
    batch_parameters = 30_000  # psycopg interpolates them client-side
    on_conflict_do_nothing = True
    row_lock = " FOR UPDATE"
    makes_index = True
    clock_column = "timezone('UTC', clock_timestamp())"

    def begin(self, cursor: Any, write_timeout: float) -> None:
        wait_ms = max(100, int(min(float(PG_LOCK_TIMEOUT[:-1]), write_timeout / 2) * 1000))
        cursor.execute(f"SET LOCAL lock_timeout = '{wait_ms}ms'")

    def now(self, cursor: Any) -> dt.datetime:
        cursor.execute(f"SELECT {self.clock_column}")
        value = cursor.fetchone()[0]
        return value.replace(tzinfo=dt.timezone.utc).replace(microsecond=0)

    def lock_claims(self, cursor: Any, conn: Any, table: str, portal_id: str, placeholder: str) -> None:
        digest = hashlib.sha256(f"{table}\n{portal_id}".encode()).digest()
        cursor.execute(
            f"SELECT pg_advisory_xact_lock({placeholder})", [int.from_bytes(digest[:8], "big", signed=True)]
        )

    def migration_lock(self, cursor: Any) -> None:
        # Wait a little for the table's lock (another run may be reading it), then retry, rather than
        # queue every other run's writes behind this ALTER.
        cursor.execute(f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT}'")

    def add_column(self, table: str, name: str, kind: str) -> str:
        return f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}"

    def create_index(self, cursor: Any, placeholder: str, table: str, index: str, columns: str) -> None:
        schema, _, _name = table.rpartition(".")
        # Made already? Then take no lock at all (CREATE INDEX locks the table's writes first).
        cursor.execute(f"SELECT to_regclass({placeholder})", [f"{schema}.{index}" if schema else index])
        if cursor.fetchone()[0] is not None:
            return
        self.migration_lock(cursor)
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {table} ({columns})")


_DIALECTS: dict[str, type[Dialect]] = {"sqlite": SqliteDialect, "postgresql": PostgresDialect}
