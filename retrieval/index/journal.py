"""The write-ahead journal of an index folder: ``journal.jsonl``.

Adding one image to a large index appends a line here instead of rewriting the index.
:meth:`retrieval.index.gallery.GalleryIndex.commit` appends the changes made since
``index.faiss`` and the metadata store were written, one line each, and fsyncs the file
before the store commits the change (:mod:`retrieval.index.store`) and it is acknowledged;
loading replays them into the FAISS index, and into the store when it is behind. Once the
journal outgrows :data:`JOURNAL_COMPACT_FRACTION` of ``index.faiss`` (and
:data:`JOURNAL_MIN_BYTES`) the next commit folds it into a new snapshot instead.

A line is ``SHA256 JSON\\n``: the hex SHA-256 of the JSON, a space, the JSON entry, a newline.
Entries are ``{"op": "add", "ids", "refs", "labels" (class names), "added", "dim", "vectors"
(base64 float32), optionally "sha256" and "fields" (per item)}`` and ``{"op": "remove", "ids"}``.

Damage:

- a last line without its newline, or failing its checksum with nothing after it, is one a
  crash tore while writing it: it was never acknowledged, so it is dropped (with a warning) and
  overwritten by the next commit;
- a damaged line *followed by more* is refused (:class:`JournalDamagedError`): the changes
  after it cannot be applied without the one before. :func:`repair_journal` (``retrieval index
  repair``) then keeps every valid line before the damage and says how many bytes it dropped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.atomic import fsync_dir, write_bytes
from retrieval.errors import UserError
from retrieval.index.manifest import JOURNAL_FILE, read_manifest

logger = logging.getLogger(__name__)

#: A commit writes a new snapshot instead of appending once the journal is larger than this
#: fraction of ``index.faiss`` and than :data:`JOURNAL_MIN_BYTES`.
JOURNAL_COMPACT_FRACTION = 0.25
JOURNAL_MIN_BYTES = 16 * 1024**2


class JournalDamagedError(UserError):
    """A journal line is damaged and more follows it (see the module docstring)."""


def encode_line(entry: dict) -> bytes:
    """``SHA256 JSON\\n``: one journal entry with the checksum of its JSON."""
    payload = json.dumps(entry, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest().encode() + b" " + payload + b"\n"


def parse_line(line: bytes) -> dict | None:
    """The entry of a journal line (without its newline); None when it is torn or damaged."""
    digest, _, payload = line.partition(b" ")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    try:
        entry = json.loads(payload)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def add_entry(
    ids: Sequence[int],
    refs: Sequence[str],
    labels: Sequence[str],
    added: float,
    xb: np.ndarray,
    sha256: Sequence[str | None] | None = None,
    fields: Sequence[dict[str, str]] | None = None,
) -> dict:
    """The entry of an addition: ids, references, class names, time added, vectors
    ``(n, dim)``, and (when given) content hashes and user fields per item."""
    entry = {
        "op": "add",
        "ids": [int(i) for i in ids],
        "refs": [str(r) for r in refs],
        "labels": list(labels),
        "added": added,
        "dim": int(xb.shape[1]),
        "vectors": base64.b64encode(np.ascontiguousarray(xb, np.float32).tobytes()).decode(),
    }
    if sha256 is not None and any(h is not None for h in sha256):
        entry["sha256"] = list(sha256)
    if fields is not None and any(fields):
        entry["fields"] = [{str(k): str(v) for k, v in f.items()} for f in fields]
    return entry


def entry_vectors(entry: dict, dim: int) -> np.ndarray:
    """The vectors ``(n, dim)`` of an addition.

    Raises:
        ValueError: they are not ``len(entry["ids"])`` vectors of dimension ``dim``.
    """
    xb = np.frombuffer(base64.b64decode(entry["vectors"], validate=True), dtype=np.float32)
    if int(entry["dim"]) != dim or xb.size != dim * len(entry["ids"]):
        raise ValueError(f"the line holds vectors of dimension {entry['dim']}, the index {dim}")
    return xb.reshape(-1, dim)


def _scan(data: bytes) -> tuple[list[dict], int, int | None, list[int]]:
    """The entries before the first bad line, the length of their lines in bytes, the number
    of the first bad line when more (not blank) follows it (else None), and the offset after
    each entry's line."""
    entries: list[dict] = []
    ends: list[int] = []
    good = 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines[:-1], start=1):  # the last piece has no newline
        entry = parse_line(line)
        if entry is None:
            if any(rest.strip() for rest in lines[n:]):
                return entries, good, n, ends
            break
        entries.append(entry)
        good += len(line) + 1
        ends.append(good)
    return entries, good, None, ends


def read_journal(path: Path) -> tuple[list[dict], int]:
    """The entries of a journal, and the length of its good part in bytes (a torn last line
    is not part of it).

    Raises:
        JournalDamagedError: a damaged line with more after it; the message names the repair.
    """
    entries, ends = read_journal_ends(path)
    return entries, ends[-1] if ends else 0


def read_journal_ends(path: Path) -> tuple[list[dict], list[int]]:
    """The entries of a journal and the offset after each one's line (see
    :func:`read_journal`).

    Raises:
        JournalDamagedError: a damaged line with more after it; the message names the repair.
    """
    data = path.read_bytes()
    entries, good, bad, ends = _scan(data)
    if bad is not None:
        raise JournalDamagedError(
            f"{path}, line {bad} is damaged and {len(data) - good:,} bytes from there on cannot "
            f"be applied; run `retrieval index repair {path.parent}` to keep the {bad - 1} "
            "changes before it and drop the rest"
        )
    if good < len(data):
        logger.warning(
            "%s: dropped an incomplete last change (a crash while writing it; "
            "it was never acknowledged)",
            path,
        )
    return entries, ends


def append(path: Path, entries: Sequence[dict], good: int) -> int:
    """Append entries after the first ``good`` bytes (dropping a torn line there), fsync'd;
    returns the new good length. On failure nothing of them remains."""
    ends = append_entries(path, entries, good)
    return ends[-1] if ends else good


def append_entries(path: Path, entries: Sequence[dict], good: int) -> list[int]:
    """:func:`append`, returning the offset after each entry's line."""
    encoded = [encode_line(entry) for entry in entries]
    lines = b"".join(encoded)
    new = not path.exists()
    if new:
        good = 0
    with open(path, "ab" if new else "r+b") as fh:
        fh.truncate(good)  # drop a line torn by an earlier failure
        fh.seek(good)
        try:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:  # not acknowledged: leave no trace of it
            with contextlib.suppress(OSError):
                fh.truncate(good)
            raise
    if new:
        fsync_dir(path.parent)
    ends, pos = [], good
    for line in encoded:
        pos += len(line)
        ends.append(pos)
    return ends


def repair_journal(directory: str | os.PathLike) -> tuple[int, int]:
    """Cut an index folder's journal at its first damaged line: ``(kept_lines, dropped_bytes)``.

    Every valid line before the damage is kept, everything from the damage on is dropped (the
    changes after a lost one cannot be applied without it), and the journal is replaced
    atomically. Call it while holding :func:`retrieval.index.lock.index_lock`; it logs what it
    dropped, and the caller should say it too: it loses changes that were acknowledged.

    Raises:
        UserError: not an index folder.
    """
    directory = Path(directory)
    read_manifest(directory)
    path = directory / JOURNAL_FILE
    if not path.is_file():
        return 0, 0
    data = path.read_bytes()
    entries, good, _, _ = _scan(data)
    dropped = len(data) - good
    if dropped:
        write_bytes(path, data[:good])
        logger.warning(
            "%s: kept %d changes, dropped %d bytes from line %d on",
            path,
            len(entries),
            dropped,
            len(entries) + 1,
        )
    return len(entries), dropped
