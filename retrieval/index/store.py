"""The metadata store of an index folder: SQLite (standard library ``sqlite3``, WAL mode).

One row per live item — id, reference, label (class name), time added, content hash and user
fields — with indexes on the columns filters use (:mod:`retrieval.index.filters`), so a filter
or a look-up by id reads only the rows it needs instead of the whole ``metadata.json``.

**Agreement with the journal.** The journal (:mod:`retrieval.index.journal`) stays the record
of changes: a change is appended and fsync'd there first, then applied here in one transaction
that also stores how many bytes of the journal the store now reflects (``meta.applied``). A
writer killed between the two leaves the store behind the journal, never ahead of it;
:meth:`MetadataStore.catch_up` applies the lines after ``applied`` on the next open, so the
two agree again. A transaction cut by a crash is rolled back by SQLite as a whole.

Not yet used by :class:`~retrieval.index.gallery.GalleryIndex`: the store and its recovery are
complete and tested on their own; the index folder still reads ``metadata.json``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import UserError
from retrieval.index import journal as wal

#: The file's name in an index folder.
STORE_FILE = "metadata.sqlite"
#: The columns a filter may name besides user fields.
COLUMNS = ("id", "ref", "label", "sha256")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    ref TEXT NOT NULL,
    label TEXT NOT NULL,
    added REAL NOT NULL,
    sha256 TEXT
);
CREATE INDEX IF NOT EXISTS items_label ON items (label);
CREATE INDEX IF NOT EXISTS items_ref ON items (ref);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE TABLE IF NOT EXISTS fields (
    id INTEGER NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (id, name)
);
CREATE INDEX IF NOT EXISTS fields_name_value ON fields (name, value);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Record:
    """One item's row: id, reference, label name, time added (seconds since the epoch),
    content hash (hex SHA-256 or None) and user fields."""

    id: int
    ref: str
    label: str
    added: float
    sha256: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


class MetadataStore:
    """The items of an index in SQLite (see the module docstring).

    Args:
        path: the database file (created when missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # one connection, used under the caller's locks (the service's read/write lock)
        self._con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")  # a committed change survives power loss
        self._con.execute("PRAGMA foreign_keys=ON")
        self._con.executescript(_SCHEMA)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------- reading

    @property
    def journal_mode(self) -> str:
        return self._con.execute("PRAGMA journal_mode").fetchone()[0]

    @property
    def applied(self) -> int:
        """Bytes of the journal this store reflects."""
        row = self._con.execute("SELECT value FROM meta WHERE key = 'applied'").fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        return self._con.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def get(self, ids: Iterable[int]) -> list[Record]:
        """The records of these ids that exist, in the order given."""
        ids = [int(i) for i in ids]
        found: dict[int, Record] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._con.execute(
                f"SELECT id, ref, label, added, sha256 FROM items WHERE id IN ({marks})", chunk
            ):
                found[row[0]] = Record(*row)
            for i, name, value in self._con.execute(
                f"SELECT id, name, value FROM fields WHERE id IN ({marks})", chunk
            ):
                found[i].fields[name] = value
        return [found[i] for i in ids if i in found]

    def label_counts(self) -> dict[str, int]:
        rows = self._con.execute("SELECT label, COUNT(*) FROM items GROUP BY label ORDER BY label")
        return dict(rows.fetchall())

    def field_names(self) -> list[str]:
        """The filterable names: the columns and every user field in use."""
        rows = self._con.execute("SELECT DISTINCT name FROM fields ORDER BY name")
        return list(COLUMNS) + [r[0] for r in rows]

    def matching_ids(self, where: Mapping[str, object]) -> np.ndarray:
        """Sorted ids of the items matching a filter (:mod:`retrieval.index.filters`: AND
        across fields, OR within a field's values); columns and user fields alike, by their
        indexes.

        Raises:
            UserError: a field that is neither a column nor a user field in use.
        """
        clauses, params = [], []
        names = self.field_names()
        for name, given in where.items():
            values = list(given) if isinstance(given, list | tuple | set) else [given]
            if name not in names:
                raise UserError(f"cannot filter on {name!r}; the fields are: {', '.join(names)}")
            marks = ",".join("?" * len(values))
            if name in COLUMNS:
                clauses.append(f"{name} IN ({marks})")
                params += [int(v) for v in values] if name == "id" else [str(v) for v in values]
            else:
                clauses.append(
                    f"id IN (SELECT id FROM fields WHERE name = ? AND value IN ({marks}))"
                )
                params += [name] + [str(v) for v in values]
        sql = "SELECT id FROM items" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        rows = self._con.execute(sql + " ORDER BY id", params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    # ---------------------------------------------------------------------------- changes

    def insert(self, records: Sequence[Record], applied: int | None = None) -> None:
        """Add records (and set ``applied``) in one transaction."""
        with self._transaction():
            self._insert(records)
            if applied is not None:
                self._set_applied(applied)

    def delete(self, ids: Sequence[int], applied: int | None = None) -> None:
        """Remove records by id (and set ``applied``) in one transaction."""
        with self._transaction():
            self._con.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
            if applied is not None:
                self._set_applied(applied)

    def catch_up(self, journal: str | os.PathLike) -> int:
        """Apply the journal's entries after :attr:`applied`, each in its own transaction with
        its end offset; returns how many were applied. A torn last line is left alone (it was
        never acknowledged).

        Raises:
            UserError: the journal is shorter than :attr:`applied` (another journal), or holds
                a damaged line with more after it.
        """
        journal = Path(journal)
        data = journal.read_bytes() if journal.is_file() else b""
        pos = self.applied
        if pos > len(data):
            raise UserError(
                f"{self.path} reflects {pos} bytes of {journal}, which has {len(data)}: they "
                "belong to different indexes; rebuild the index"
            )
        n = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break  # torn: never acknowledged
            entry = wal.parse_line(data[pos:end])
            if entry is None:
                if end + 1 < len(data):  # more after it: damage, not a torn last line
                    raise UserError(
                        f"{journal} is damaged at byte {pos}; run retrieval index repair"
                    )
                break
            self.apply(entry, end + 1)
            pos, n = end + 1, n + 1
        return n

    def apply(self, entry: dict, applied: int) -> None:
        """One journal entry (``add`` or ``remove``) and the offset after it, in one
        transaction."""
        if entry["op"] == "add":
            records = [
                Record(int(i), str(r), str(lab), float(entry["added"]))
                for i, r, lab in zip(entry["ids"], entry["refs"], entry["labels"], strict=True)
            ]
            self.insert(records, applied)
        elif entry["op"] == "remove":
            self.delete(entry["ids"], applied)
        else:
            raise UserError(f"unknown journal operation {entry['op']!r}; rebuild the index")

    def import_metadata(self, metadata_json: str | os.PathLike) -> int:
        """Fill an empty store from a ``metadata.json`` (index folders of format 2); returns
        the number of items."""
        meta = json.loads(Path(metadata_json).read_text(encoding="utf-8"))
        names = meta["class_names"]
        records = [
            Record(int(it["id"]), str(it["ref"]), names[int(it["label"])], float(it["added"]))
            for it in meta["items"]
        ]
        with self._transaction():
            if self._con.execute("SELECT COUNT(*) FROM items").fetchone()[0]:
                raise UserError(f"{self.path} is not empty; it cannot import {metadata_json}")
            self._insert(records)
            self._set_applied(0)
        return len(records)

    def _insert(self, records: Sequence[Record]) -> None:
        self._con.executemany(
            "INSERT INTO items (id, ref, label, added, sha256) VALUES (?, ?, ?, ?, ?)",
            [(r.id, r.ref, r.label, r.added, r.sha256) for r in records],
        )
        self._con.executemany(
            "INSERT INTO fields (id, name, value) VALUES (?, ?, ?)",
            [(r.id, k, str(v)) for r in records for k, v in r.fields.items()],
        )

    def _set_applied(self, applied: int) -> None:
        self._con.execute(
            "INSERT INTO meta (key, value) VALUES ('applied', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(int(applied)),),
        )

    def _transaction(self):
        return _Transaction(self._con)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an exception."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *rest) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")
