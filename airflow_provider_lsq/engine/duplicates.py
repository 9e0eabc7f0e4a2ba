"""One lead, one registration: the row keys and leads a run has met, to tell a duplicate row.

Registering a lead again resets the portal password the first call set, so a run sends each row key
once and each lead once. A lead is known by the identifier sent first (:func:`lead_identity`: its
attribute and its ``lead_fingerprint``, e-mail addresses without regard to case). Both operators keep
what they met in :class:`SeenRows`; each decides when a row counts as met (the list operator before
validation, the transfer after its ledger checks).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from airflow_provider_lsq.hooks.payload import first_identifier, lead_fingerprint

if TYPE_CHECKING:
    from collections.abc import Mapping


def lead_identity(lead: Mapping[str, Any], identifier_attribute: str | None) -> tuple[str, str] | None:
    """``(attribute, fingerprint)`` of the identifier LeadSquared finds ``lead`` by; None without one."""
    identifier = first_identifier(lead, identifier_attribute)
    if identifier is None:
        return None
    return identifier[0], lead_fingerprint(*identifier)


class SeenRows:
    """The row keys and leads (their fingerprints) met so far in one run, in a private SQLite
    database: a temporary file by default (memory stays flat however many rows pass), or memory
    (``on_disk=False``, for rows that are in memory already)."""

    def __init__(self, *, on_disk: bool = True) -> None:
        # "": a temporary file, deleted on close. One thread at a time uses it, but a generator holding
        # it may be closed from another (when it is collected).
        self._db = sqlite3.connect("" if on_disk else ":memory:", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, reported INTEGER NOT NULL DEFAULT 0)")
        self._db.execute("CREATE TABLE leads (fingerprint TEXT PRIMARY KEY, key TEXT NOT NULL)")

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was already there."""
        return self._db.execute("INSERT OR IGNORE INTO seen (key) VALUES (?)", (key,)).rowcount == 1

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None

    def add_lead(self, fingerprint: str, key: str) -> str | None:
        """Remember the lead ``fingerprint`` as taken by row ``key``; the earlier row's key if any."""
        if self._db.execute(
            "INSERT OR IGNORE INTO leads (fingerprint, key) VALUES (?, ?)", (fingerprint, key)
        ).rowcount:
            return None
        return self.lead_holder(fingerprint)

    def lead_holder(self, fingerprint: str) -> str | None:
        """The key of the row that took the lead ``fingerprint``, or None."""
        first = self._db.execute("SELECT key FROM leads WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return None if first is None else str(first[0])

    def first_report(self, key: str) -> bool:
        """True the first time a duplicate ``key`` is reported."""
        return (
            self._db.execute("UPDATE seen SET reported = 1 WHERE key = ? AND reported = 0", (key,)).rowcount
            == 1
        )

    def close(self) -> None:
        self._db.close()
