"""The metadata store of an index folder: SQLite (standard library ``sqlite3``, WAL mode).

One row per item — id, reference, label (class name), time added, content hash and user
fields — with indexes on the columns filters use (:mod:`retrieval.index.filters`), so a filter
or a look-up by id reads only the rows it needs: opening an index reads no row at all.

**Positions.** Each row records the journal position (:mod:`retrieval.index.journal`, bytes)
after the line that added it (``added_at``; 0 for rows of the snapshot) and after the line that
removed it (``removed_at``; NULL while it is live). A reader sees the store *as of* a position
(:attr:`MetadataStore.view`, the journal bytes its FAISS index reflects): rows added later are
not there yet, rows removed later still are. So a process that opened the folder earlier keeps
a consistent view while another process changes it, and a damaged journal cut short by
``retrieval index repair`` is matched by :meth:`MetadataStore.rollback_to`. Removed rows are
dropped for good by the next snapshot (:meth:`MetadataStore.write_snapshot`).

**Agreement with the journal.** The journal stays the record of changes: a change is staged
here in an open transaction (visible to this connection only, ``added_at`` / ``removed_at`` =
:data:`STAGED`), appended and fsync'd to the journal, then committed here in the transaction
that also stores how many bytes of the journal the store reflects (``applied``). A writer
killed between the two leaves the store behind the journal, never ahead of it: SQLite rolls the
open transaction back, and the next open that may write applies the lines after ``applied``
(:meth:`MetadataStore.apply`), so the two agree again.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import UserError
from retrieval.index.manifest import STORE_FILE, STORE_SIDE_FILES

__all__ = ["STORE_FILE", "STORE_SIDE_FILES", "MetadataStore", "Record", "SnapshotMeta"]

#: The columns a filter may name besides user fields.
COLUMNS = ("id", "ref", "label", "sha256")
#: ``added_at`` / ``removed_at`` of a change staged in the open transaction, not yet committed.
STAGED = -1
#: SQLite's limit on bound parameters per statement, with room to spare.
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    ref TEXT NOT NULL,
    label TEXT NOT NULL,
    added REAL NOT NULL,
    sha256 TEXT,
    added_at INTEGER NOT NULL DEFAULT 0,
    removed_at INTEGER
);
CREATE INDEX IF NOT EXISTS items_label ON items (label, added_at, removed_at);
CREATE INDEX IF NOT EXISTS items_ref ON items (ref, added_at, removed_at);
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
#: The indexes of the ``items`` table.
_ITEM_INDEXES = ("items_label", "items_ref", "items_sha256")
#: A row visible at the view (two parameters: the view, twice).
_LIVE = "added_at <= ? AND (removed_at IS NULL OR removed_at > ?)"

#: ``(device, inode)`` of the database files this process has connections to, with how many.
_open_here: dict[tuple[int, int], int] = {}
_open_guard = threading.Lock()


def read_only_uri(path: Path) -> str:
    """The SQLite URI that opens ``path`` read-only.

    Built by :meth:`pathlib.Path.as_uri`, which escapes the path: a folder named ``a#b`` or
    ``v?2`` would otherwise be cut at ``#`` or ``?`` and SQLite would open (or create) another
    file. In a folder this process cannot write (a read-only mount, another user's index) a
    database in WAL mode cannot make its ``-shm`` file, so it is opened ``immutable`` (no
    locks; nobody can be writing there either).

    Raises:
        UserError: that folder holds a ``-wal`` file of changes not yet folded into the
            database, which an immutable open would not see.
    """
    uri = path.resolve().as_uri() + "?mode=ro"
    if os.access(path.parent, os.W_OK):
        return uri
    wal = path.with_name(path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        raise UserError(
            f"{wal} holds changes not yet written into {path.name}, and {path.parent} cannot "
            "be written: open the index once where it can be (or copy it), then read it here"
        )
    return uri + "&immutable=1"


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _forget(key: tuple[int, int]) -> None:
    with _open_guard:
        _open_here[key] -= 1
        if not _open_here[key]:
            del _open_here[key]


def open_in_this_process(path: str | os.PathLike) -> bool:
    """Whether this process has a connection to the database file ``path``.

    Reading such a file through another file descriptor is unsafe: closing that descriptor
    drops every POSIX lock this process holds on the file, SQLite's included, and another
    process may then delete the WAL under its connections (SQLite's "How To Corrupt", 2.2).
    """
    key = _file_key(Path(path))
    with _open_guard:
        return key is not None and key in _open_here


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


@dataclass
class SnapshotMeta:
    """What a snapshot records besides its rows: the class names (label numbers are positions
    in it), the next free id, the removed ids still in an HNSW graph, and the item count."""

    class_names: list[str]
    next_id: int
    tombstones: list[int]
    count: int


def records_of_entry(entry: Mapping) -> list[Record]:
    """The records of a journal ``add`` entry (content hashes and user fields when it has
    them)."""
    n = len(entry["ids"])
    hashes = entry.get("sha256") or [None] * n
    fields = entry.get("fields") or [{}] * n
    return [
        Record(int(i), str(r), str(lab), float(entry["added"]), h, dict(f))
        for i, r, lab, h, f in zip(
            entry["ids"], entry["refs"], entry["labels"], hashes, fields, strict=True
        )
    ]


class MetadataStore:
    """The items of an index in SQLite (see the module docstring).

    One connection, shared by the caller's threads under an internal lock (the service's
    read/write lock orders changes against searches).

    Args:
        path: the database file (created when missing), or None for a private in-memory
            store (an index built but not yet saved, or a folder opened read-only that has no
            store yet).
        read_only: open the file without ever writing it.
    """

    def __init__(self, path: str | os.PathLike | None, read_only: bool = False):
        self.path = None if path is None else Path(path)
        self.read_only = read_only
        #: the journal position reads are made at (see the module docstring)
        self.view = 0
        self._lock = threading.RLock()
        if self.path is None:
            target, uri = ":memory:", False
        elif read_only:
            target, uri = read_only_uri(self.path), True
        else:
            target, uri = str(self.path), False
        self._con = sqlite3.connect(
            target, isolation_level=None, check_same_thread=False, uri=uri, timeout=30
        )
        if not read_only:
            if self.path is not None:
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
            self._con.executescript(_SCHEMA)
        self._con.execute("PRAGMA foreign_keys=ON")
        key = None if self.path is None else _file_key(self.path)
        if key is not None:
            with _open_guard:
                _open_here[key] = _open_here.get(key, 0) + 1
            self._forget = weakref.finalize(self, _forget, key)
        else:
            self._forget = None

    def close(self) -> None:
        """Close the connection; a transaction still open is rolled back."""
        with self._lock:
            self._con.close()
            if self._forget is not None:
                self._forget()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------- reading

    @property
    def journal_mode(self) -> str:
        return self._query("PRAGMA journal_mode")[0][0]

    @property
    def applied(self) -> int:
        """Bytes of the journal this store reflects (committed)."""
        value = self._meta("applied")
        return int(value) if value is not None else 0

    @property
    def changed(self) -> bool:
        """Whether rows changed since the snapshot was written (its checksum then no longer
        applies)."""
        return self._meta("changed") == "1"

    def snapshot_meta(self) -> SnapshotMeta | None:
        """What the snapshot recorded (None for a store without one)."""
        raw = self._meta("snapshot")
        if raw is None:
            return None
        doc = json.loads(raw)
        return SnapshotMeta(
            [str(c) for c in doc["class_names"]],
            int(doc["next_id"]),
            [int(i) for i in doc["tombstones"]],
            int(doc["count"]),
        )

    def get(self, ids: Iterable[int]) -> list[Record]:
        """The records of these ids visible at :attr:`view`, in the order given."""
        ids = [int(i) for i in ids]
        found: dict[int, Record] = {}
        with self._lock:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._con.execute(
                    f"SELECT id, ref, label, added, sha256 FROM items WHERE id IN ({marks}) "
                    f"AND {_LIVE}",
                    [*chunk, self.view, self.view],
                ).fetchall()
                for row in rows:
                    found[row[0]] = Record(*row)
                if rows:
                    for i, name, value in self._con.execute(
                        f"SELECT id, name, value FROM fields WHERE id IN ({marks})", chunk
                    ).fetchall():
                        if i in found:
                            found[i].fields[name] = value
        return [found[i] for i in ids if i in found]

    def live(self, ids: Iterable[int]) -> set[int]:
        """Those of ``ids`` visible at :attr:`view`."""
        ids = [int(i) for i in ids]
        out: set[int] = set()
        with self._lock:  # the view is read under the lock too (a commit moves it)
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT id FROM items WHERE id IN ({marks}) AND {_LIVE}"
                out.update(r[0] for r in self._query(sql, [*chunk, self.view, self.view]))
        return out

    def scan(self) -> Iterator[tuple[int, str, str, float]]:
        """``(id, ref, label, added)`` of every visible row, by id (reads every row: for
        exports and maintenance, never for a search)."""
        with self._lock:
            rows = self._query(
                f"SELECT id, ref, label, added FROM items WHERE {_LIVE} ORDER BY id",
                (self.view, self.view),
            )
        yield from rows

    def first_id(self) -> int | None:
        """The smallest visible id (None when there is none)."""
        with self._lock:
            rows = self._query(
                f"SELECT id FROM items WHERE {_LIVE} ORDER BY id LIMIT 1", (self.view, self.view)
            )
        return rows[0][0] if rows else None

    def label_counts(self) -> dict[str, int]:
        """Visible rows per label (read from the label index alone)."""
        with self._lock:
            rows = self._query(
                f"SELECT label, COUNT(*) FROM items WHERE {_LIVE} GROUP BY label",
                (self.view, self.view),
            )
        return dict(rows)

    def field_names(self) -> list[str]:
        """The filterable names: the columns and every user field in use."""
        rows = self._query("SELECT DISTINCT name FROM fields ORDER BY name")
        return list(COLUMNS) + [r[0] for r in rows]

    def has_field(self, name: str) -> bool:
        """Whether ``name`` is a column or a user field in use (one index seek, not the scan
        of :meth:`field_names`)."""
        if name in COLUMNS:
            return True
        return bool(self._query("SELECT 1 FROM fields WHERE name = ? LIMIT 1", (name,)))

    def matching_ids(self, where: Mapping[str, object]) -> np.ndarray:
        """Sorted ids of the visible items matching a filter (:mod:`retrieval.index.filters`:
        AND across fields, OR within a field's values); columns and user fields alike, by
        their indexes.

        Raises:
            UserError: a field that is neither a column nor a user field in use.
        """
        clauses, params = [_LIVE], [None, None]  # the view, read under the lock below
        for name, given in where.items():
            values = list(given) if isinstance(given, list | tuple | set) else [given]
            if not self.has_field(name):
                names = ", ".join(self.field_names())
                raise UserError(f"cannot filter on {name!r}; the fields are: {names}")
            if not values:
                return np.zeros(0, dtype=np.int64)
            marks = ",".join("?" * len(values))
            if name in COLUMNS:
                clauses.append(f"{name} IN ({marks})")
                params += [int(v) for v in values] if name == "id" else [str(v) for v in values]
            else:
                clauses.append(
                    f"id IN (SELECT id FROM fields WHERE name = ? AND value IN ({marks}))"
                )
                params += [name] + [str(v) for v in values]
        sql = "SELECT id FROM items WHERE " + " AND ".join(clauses) + " ORDER BY id"
        with self._lock:
            params[:2] = [self.view, self.view]
            cur = self._con.execute(sql, params)
            out = np.fromiter((r[0] for r in cur), dtype=np.int64)
        return out

    # ---------------------------------------------------------------------------- changes

    def stage_add(self, records: Sequence[Record]) -> None:
        """Insert rows in the open transaction (begun when none is), marked :data:`STAGED`
        (a private store, which follows no journal, puts them at position 0 at once)."""
        with self._lock:
            self._begin()
            self._insert(records, STAGED if self.path is not None else 0)

    def stage_remove(self, ids: Sequence[int]) -> None:
        """Mark rows removed in the open transaction (begun when none is)."""
        with self._lock:
            self._begin()
            self._con.executemany(
                "UPDATE items SET removed_at = ? WHERE id = ? AND removed_at IS NULL",
                [(STAGED, int(i)) for i in ids],
            )

    def commit(self, entries: Sequence[tuple[dict, int]], applied: int) -> None:
        """Commit the open transaction: each staged change gets the journal position after
        its line (``entries``: ``(journal entry, end offset)``), and ``applied`` is stored in
        the same transaction; :attr:`view` moves to ``applied`` at the same moment, so no
        read in between misses the changes."""
        with self._lock:
            self._begin()
            for entry, end in entries:
                column = "added_at" if entry["op"] == "add" else "removed_at"
                self._con.executemany(
                    f"UPDATE items SET {column} = ? WHERE id = ? AND {column} = ?",
                    [(int(end), int(i), STAGED) for i in entry["ids"]],
                )
            self._set_meta("applied", str(int(applied)))
            self._set_meta("changed", "1")
            self._con.execute("COMMIT")
            self.view = int(applied)

    def discard(self) -> None:
        """Roll back the open transaction (changes that never reached the journal)."""
        with self._lock:
            if self._con.in_transaction:
                self._con.execute("ROLLBACK")

    @property
    def staging(self) -> bool:
        """Whether a transaction with staged changes is open."""
        return self._con.in_transaction

    def apply(self, entry: dict, applied: int) -> None:
        """One journal entry (``add`` or ``remove``) and the offset after it, in one
        transaction (catching up with the journal).

        Raises:
            UserError: an unknown operation.
        """
        if entry["op"] == "add":
            self.stage_add(records_of_entry(entry))
        elif entry["op"] == "remove":
            self.stage_remove(entry["ids"])
        else:
            raise UserError(f"unknown journal operation {entry['op']!r}; rebuild the index")
        self.commit([(entry, applied)], applied)

    def begin_catch_up(self) -> int:
        """Begin a write transaction (waiting for another writer's to end) and return
        :attr:`applied` as read inside it: what the store lacks is decided there."""
        with self._lock:
            self._begin()
            return self.applied

    def rollback_to(self, position: int) -> None:
        """Make the store reflect the journal's first ``position`` bytes only (after the
        journal was cut there): later additions are deleted, later removals undone."""
        with self._lock:
            self._begin()
            self._con.execute("DELETE FROM items WHERE added_at > ?", (position,))
            self._con.execute(
                "UPDATE items SET removed_at = NULL WHERE removed_at > ?", (position,)
            )
            self._set_meta("applied", str(int(position)))
            self._set_meta("changed", "1")
            self._con.execute("COMMIT")

    def import_items(self, records: Sequence[Record], meta: SnapshotMeta) -> None:
        """Fill an empty store with a snapshot's rows (migration from ``metadata.json``).

        Raises:
            UserError: the store is not empty.
        """
        with self._lock:
            self._begin()
            try:
                if self._con.execute("SELECT COUNT(*) FROM items").fetchone()[0]:
                    raise UserError(f"{self.path} is not empty; it cannot import other items")
                for name in _ITEM_INDEXES:  # built once after the rows: faster than row by row
                    self._con.execute(f"DROP INDEX {name}")
                self._insert(records, 0)
                for statement in _SCHEMA.split(";"):
                    if "CREATE INDEX" in statement and "ON items " in statement:
                        self._con.execute(statement)
                self._set_snapshot(meta)
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def write_snapshot(self, dest: Path, meta: SnapshotMeta, staged: Sequence[dict] = ()) -> None:
        """Write the store as seen at :attr:`view`, plus the ``staged`` journal entries (the
        changes of the open transaction), to the new file ``dest``: a consistent copy made
        by SQLite's backup API (never a byte copy of a live database), removed rows dropped,
        positions reset to 0 for a new, empty journal, closed (checkpointed) when it returns.
        """
        with self._lock:
            if self.path is None:
                if self._con.in_transaction:  # a private store: nothing to agree with
                    self._con.execute("COMMIT")
                source = self._con
            else:  # the committed state; the open transaction's changes are ``staged``
                source = sqlite3.connect(read_only_uri(self.path), uri=True, timeout=30)
                staged_here = list(staged)
            try:
                out = sqlite3.connect(dest, isolation_level=None)
                source.backup(out)
            finally:
                if source is not self._con:
                    source.close()
        copy = MetadataStore.__new__(MetadataStore)
        copy.path, copy.read_only, copy.view, copy._lock, copy._con, copy._forget = (
            dest,
            False,
            self.view,
            threading.RLock(),
            out,
            None,
        )
        try:
            out.execute("PRAGMA journal_mode=WAL")
            out.execute("PRAGMA foreign_keys=ON")
            out.executescript(_SCHEMA)
            out.execute("BEGIN IMMEDIATE")
            out.execute("DELETE FROM items WHERE added_at > ?", (self.view,))
            out.execute("UPDATE items SET removed_at = NULL WHERE removed_at > ?", (self.view,))
            out.execute("COMMIT")
            if self.path is not None:
                for entry in staged_here:
                    if entry["op"] == "add":
                        copy.stage_add(records_of_entry(entry))
                    else:
                        copy.stage_remove(entry["ids"])
                if out.in_transaction:
                    out.execute("COMMIT")
            out.execute("BEGIN IMMEDIATE")
            out.execute("DELETE FROM items WHERE removed_at IS NOT NULL")
            out.execute("UPDATE items SET added_at = 0 WHERE added_at != 0")
            out.execute("DELETE FROM meta")
            copy._set_snapshot(meta)
            out.execute("COMMIT")
        finally:
            out.close()

    # ---------------------------------------------------------------------------- internals

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, params).fetchall()

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def _begin(self) -> None:
        if self.read_only:
            raise UserError(f"{self.path} was opened read-only")
        if not self._con.in_transaction:
            self._con.execute("BEGIN IMMEDIATE")

    def _insert(self, records: Sequence[Record], added_at: int) -> None:
        self._con.executemany(
            "INSERT INTO items (id, ref, label, added, sha256, added_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(r.id, r.ref, r.label, r.added, r.sha256, added_at) for r in records],
        )
        self._con.executemany(
            "INSERT INTO fields (id, name, value) VALUES (?, ?, ?)",
            [(r.id, k, str(v)) for r in records for k, v in r.fields.items()],
        )

    def _set_snapshot(self, meta: SnapshotMeta) -> None:
        doc = {
            "class_names": list(meta.class_names),
            "next_id": int(meta.next_id),
            "tombstones": sorted(int(i) for i in meta.tombstones),
            "count": int(meta.count),
        }
        self._set_meta("snapshot", json.dumps(doc))
        self._set_meta("applied", "0")
        self._set_meta("changed", "0")

    def _set_meta(self, key: str, value: str) -> None:
        self._con.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
