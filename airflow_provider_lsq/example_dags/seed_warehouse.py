"""Build the demo warehouse: an ``applicants`` table of synthetic applicants, in SQLite or PostgreSQL.

About 150 applicants spread over the ``days`` days before ``end`` (default: today, midnight UTC), with
non-ASCII names and a few rows that LeadSquared (or the provider) must refuse:

- one applicant without an email address (the unique identifier): the provider marks it ``invalid``;
- two applicants who share one email address (the same person applied twice);
- one applicant whose ``extra_attribute`` is set: the example DAG sends it as ``mx_Favourite_Colour``,
  an attribute the account does not know, so LeadSquared answers "Attribute(s) does not exist".

``created_at`` is UTC: text ``YYYY-MM-DD HH:MM:SS`` in SQLite, ``TIMESTAMP`` in PostgreSQL, so the example
DAG's SQL runs unchanged on both. The data is deterministic (seeded). Re-running re-creates only the
``applicants`` table; the provider's ledger table is never touched.

Module: ``seed("path/to/warehouse.db")`` or ``seed("postgresql://user@host/db")``.
CLI: ``python -m airflow_provider_lsq.example_dags.seed_warehouse --sqlite PATH`` or ``--postgres URI``
[``--count N --days D``].
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sqlite3
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

TABLE = "applicants"
SEED = 20261101
COLUMNS = (
    "applicant_id",
    "email",
    "first_name",
    "last_name",
    "mobile",
    "program",
    "intake",
    "city",
    "application_number",
    "extra_attribute",
    "created_at",
)
# Bad rows sit at fixed ids so tests and the demo can point at them (any count >= 8 holds them all).
NO_EMAIL_ID = 3
DUPLICATE_EMAIL_IDS = (5, 6)  # 6 reuses 5's email address
UNKNOWN_ATTRIBUTE_ID = 8
UNKNOWN_ATTRIBUTE_VALUE = "Teal"
MIN_COUNT = 8

FIRST_NAMES = (
    "Zoë",
    "José",
    "Ananyā",
    "Søren",
    "李",
    "Chloé",
    "Björn",
    "Łukasz",
    "Asha",
    "Priya",
    "Mateo",
    "Aoife",
    "Renée",
    "Kwame",
    "Siobhán",
    "Dmitrï",
    "Fatimá",
    "Noah",
    "Ingrid",
    "Raúl",
    "Yūki",
    "Amélie",
    "Omar",
    "Nguyễn Thị",
)
LAST_NAMES = (
    "Müller",
    "García",
    "Sharma",
    "Kierkegaard",
    "王",
    "Dubois",
    "Åkesson",
    "Wąsowski",
    "Iyer",
    "Ó Briain",
    "Mensah",
    "Novák",
    "Fernández",
    "Tanaka",
    "Çelik",
    "Smith",
    "Nakamura",
    "Hernández",
    "Lindqvist",
    "Reddy",
)
PROGRAMS = ("BSc Computer Science", "MBA", "BA Economics", "MSc Data Science", "BEng Mechanical", "LLB")
INTAKES = ("2027-Spring", "2027-Fall")
CITIES = ("Bengaluru", "São Paulo", "Zürich", "Kraków", "Mumbai", "Singapore", "Dublin", "Accra", "Tōkyō")


@dataclass(frozen=True)
class SeedResult:
    """What :func:`seed` wrote: the time span and where the bad rows are."""

    target: str
    count: int
    start: dt.datetime  # naive UTC, inclusive
    end: dt.datetime  # naive UTC, exclusive
    no_email_ids: tuple[int, ...] = (NO_EMAIL_ID,)
    duplicate_email_ids: tuple[int, ...] = DUPLICATE_EMAIL_IDS
    unknown_attribute_ids: tuple[int, ...] = (UNKNOWN_ATTRIBUTE_ID,)
    emails: dict[int, str | None] = field(default_factory=dict, repr=False)

    @property
    def bad_ids(self) -> tuple[int, ...]:
        return (*self.no_email_ids, *self.duplicate_email_ids, *self.unknown_attribute_ids)


_NO_DECOMPOSITION = str.maketrans({"Ł": "L", "ł": "l", "Ø": "O", "ø": "o", "Æ": "AE", "æ": "ae", "ß": "ss"})


def _ascii_slug(text: str) -> str:
    text = text.translate(_NO_DECOMPOSITION)
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return "".join(ch for ch in folded if ch.isalnum())


def _default_end() -> dt.datetime:
    today = dt.datetime.now(dt.timezone.utc).date()
    return dt.datetime(today.year, today.month, today.day)


def _naive_utc(value: dt.datetime | dt.date | str | None) -> dt.datetime:
    if value is None:
        return _default_end()
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        return dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def generate_rows(
    *, days: int = 7, count: int = 150, end: dt.datetime | dt.date | str | None = None, seed: int = SEED
) -> Iterator[tuple[Any, ...]]:
    """The applicants, in ``COLUMNS`` order, ``created_at`` as a naive UTC datetime. Lazy: any count."""
    if count < MIN_COUNT:
        raise ValueError(f"count must be at least {MIN_COUNT} (the bad rows live at fixed ids)")
    if days < 1:
        raise ValueError("days must be at least 1")
    end_at = _naive_utc(end)
    span = days * 86400
    rng = random.Random(seed)
    first_email: str | None = None
    for applicant_id in range(1, count + 1):
        first = rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        slug = f"{_ascii_slug(first) or 'applicant'}.{_ascii_slug(last) or 'x'}"
        email: str | None = f"{slug}.{applicant_id}@example.edu"
        mobile = f"+91-{rng.randrange(6_000_000_000, 9_999_999_999)}"
        created_at = end_at - dt.timedelta(seconds=rng.randrange(1, span + 1))
        extra = None
        if applicant_id == NO_EMAIL_ID:
            email = None
        elif applicant_id == DUPLICATE_EMAIL_IDS[0]:
            first_email = email
        elif applicant_id == DUPLICATE_EMAIL_IDS[1]:
            email = first_email
        elif applicant_id == UNKNOWN_ATTRIBUTE_ID:
            extra = UNKNOWN_ATTRIBUTE_VALUE
        yield (
            applicant_id,
            email,
            first,
            last,
            mobile,
            rng.choice(PROGRAMS),
            rng.choice(INTAKES),
            rng.choice(CITIES),
            f"APP-{end_at:%Y}-{applicant_id:06d}",
            extra,
            created_at.replace(microsecond=0),
        )


def _ddl(created_at_type: str) -> str:
    return f"""
        CREATE TABLE {TABLE} (
            applicant_id INTEGER PRIMARY KEY,
            email TEXT,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            mobile TEXT,
            program TEXT,
            intake TEXT,
            city TEXT,
            application_number TEXT,
            extra_attribute TEXT,
            created_at {created_at_type} NOT NULL
        )"""


def _batches(rows: Iterator[tuple[Any, ...]], size: int = 5000) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _seed_sqlite(path: str, rows: Iterator[tuple[Any, ...]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(_ddl("TEXT"))
            placeholders = ", ".join("?" * len(COLUMNS))
            sql = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({placeholders})"
            for batch in _batches(rows):
                # UTC text in the one format the DAG's literal uses, so text comparison orders correctly.
                conn.executemany(sql, [(*row[:-1], row[-1].strftime("%Y-%m-%d %H:%M:%S")) for row in batch])
    finally:
        conn.close()


class SeedError(Exception):
    """The warehouse cannot be seeded; the message says why and what to do."""


def _seed_postgres(uri: str, rows: Iterator[tuple[Any, ...]]) -> None:
    try:
        import psycopg2
        from psycopg2.extras import execute_values
    except ImportError as error:
        raise SeedError(
            "A PostgreSQL warehouse needs psycopg2, which the PostgreSQL provider installs: "
            "install the package's [postgres] extra (or apache-airflow-providers-postgres), with your "
            "Airflow's constraints file"
        ) from error

    try:
        conn = psycopg2.connect(uri)
    except psycopg2.OperationalError as error:
        # psycopg2's message names the server and the database, never the password.
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise SeedError(
            f"Cannot connect to the PostgreSQL warehouse {_without_password(uri)}: {reason}. The database "
            "must exist (createdb, or CREATE DATABASE) and accept this user."
        ) from error
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
            cur.execute(_ddl("TIMESTAMP"))
            sql = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES %s"
            for batch in _batches(rows):
                execute_values(cur, sql, batch, page_size=1000)
    finally:
        conn.close()


def _without_password(uri: str) -> str:
    """``scheme://host:port/db``: the URI without its user and password, to name it in a message."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


def _is_postgres(target: str) -> bool:
    return target.split("://", 1)[0] in ("postgres", "postgresql")


def _sqlite_path(target: str) -> str:
    # sqlite:///relative.db and sqlite:////absolute/path.db, as SQLAlchemy spells them
    return target[len("sqlite:///") :] if target.startswith("sqlite:///") else target


def seed(
    conn_uri_or_path: str | Path,
    *,
    days: int = 7,
    count: int = 150,
    end: dt.datetime | dt.date | str | None = None,
    seed: int = SEED,
) -> SeedResult:
    """(Re-)create the ``applicants`` table in a SQLite file or a PostgreSQL database.

    ``conn_uri_or_path``: a file path or ``sqlite:///path`` URI, or a ``postgresql://`` URI. The
    applicants are created within ``[end - days, end)``; ``end`` defaults to today, midnight UTC.
    """
    target = str(conn_uri_or_path)
    end_at = _naive_utc(end)
    rows = generate_rows(days=days, count=count, end=end_at, seed=seed)
    emails: dict[int, str | None] = {}

    def tracked() -> Iterator[tuple[Any, ...]]:
        for row in rows:
            if row[0] <= MIN_COUNT:
                emails[row[0]] = row[1]
            yield row

    if _is_postgres(target):
        _seed_postgres(target, tracked())
    else:
        _seed_sqlite(_sqlite_path(target), tracked())
    return SeedResult(
        target=target, count=count, start=end_at - dt.timedelta(days=days), end=end_at, emails=emails
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_lsq.example_dags.seed_warehouse",
        description=__doc__.split("\n\n")[0],
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sqlite", metavar="PATH", help="SQLite warehouse file (created if missing)")
    where.add_argument("--postgres", metavar="URI", help="postgresql://user@host:port/database")
    parser.add_argument("--count", type=int, default=150, help="number of applicants (default 150)")
    parser.add_argument("--days", type=int, default=7, help="spread over this many days (default 7)")
    parser.add_argument("--end", default=None, help="exclusive end, ISO date/time in UTC (default: today)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        result = seed(
            args.sqlite or args.postgres, days=args.days, count=args.count, end=args.end, seed=args.seed
        )
    except SeedError as error:
        print(f"Not seeded: {error}", file=sys.stderr)
        return 1
    where_to = args.sqlite or _without_password(args.postgres)  # never print a password from the URI
    print(
        f"Seeded {result.count} applicants into {TABLE} at {where_to}, created in "
        f"[{result.start:%Y-%m-%d %H:%M}, {result.end:%Y-%m-%d %H:%M}) UTC; bad rows: no email "
        f"{list(result.no_email_ids)}, duplicate email {list(result.duplicate_email_ids)}, unknown "
        f"attribute {list(result.unknown_attribute_ids)}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
