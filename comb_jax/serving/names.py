"""Document names and pins, in SQLite beside the store's entries (ROOT/<fingerprint[:24]>/index.sqlite).

Entries are content-addressed (`doc-` and 32 hex digits of their key); names are what clients call them. The two
namespaces never meet: a name may not have the form of a content id, and a lookup of that form is by content
only. A name maps to one document (a re-upload under it moves it, and says from which document); a pin is
"until DELETE" (until NULL) or until a Unix time (a TTL). Every change is its own transaction, committed with
synchronous=FULL, so a restarted server (even after kill -9) finds the names and pins it acknowledged.
Without a store directory the index lives in memory, like the entries.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
from pathlib import Path

CONTENT_ID = re.compile(r"doc-[0-9a-f]{32}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, doc_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pins (doc_id TEXT PRIMARY KEY, until REAL);
"""


def is_content_id(text: str) -> bool:
    return CONTENT_ID.fullmatch(text) is not None


class DocumentIndex:
    """name -> document id and document id -> pin expiry, durable when `path` is given. Thread-safe."""

    def __init__(self, path: str | Path | None = None):
        self.db = sqlite3.connect(str(path) if path is not None else ":memory:", timeout=30,
                                  check_same_thread=False, isolation_level=None)  # explicit transactions
        self.lock = threading.Lock()
        with self.lock:
            if path is not None:
                self.db.execute("PRAGMA journal_mode=WAL")  # readers (a second server) do not block writers
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
            self.db.executescript(SCHEMA)

    def _write(self, sql: str, *args):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def names(self) -> dict[str, str]:
        with self.lock:
            return dict(self.db.execute("SELECT name, doc_id FROM names"))

    def pins(self) -> dict[str, float]:
        """document id -> pinned until (a Unix time, or math.inf: until DELETE)."""
        with self.lock:
            rows = self.db.execute("SELECT doc_id, until FROM pins").fetchall()
        return {doc_id: math.inf if until is None else until for doc_id, until in rows}

    def set_name(self, name: str, doc_id: str):
        self._write("INSERT INTO names (name, doc_id) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET doc_id = excluded.doc_id", name, doc_id)

    def set_pin(self, doc_id: str, until: float):
        self._write("INSERT INTO pins (doc_id, until) VALUES (?, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                    "until = excluded.until", doc_id, None if until == math.inf else until)

    def clear_pin(self, doc_id: str):
        self._write("DELETE FROM pins WHERE doc_id = ?", doc_id)

    def close(self):
        with self.lock:
            self.db.close()
