"""The on-disk format of an index folder: its file names and its manifest.

An index is a folder, written atomically (:func:`retrieval.atomic.atomic_dir`):

- ``index.faiss``: the FAISS index; its ids are the item ids;
- ``metadata.sqlite`` (:mod:`retrieval.index.store`; format 3): the metadata store, SQLite
  in WAL mode: per item its id, reference (image path or built-in reference), label, time
  added, content hash and user fields; the class names, the next free id and (HNSW only) the
  removed ids of the snapshot. While it is open SQLite keeps ``metadata.sqlite-wal`` and
  ``metadata.sqlite-shm`` beside it. Folders of format 2 kept the same in ``metadata.json``
  (read whole on open); they are migrated on the first open that may write;
- ``manifest.json`` (:class:`Manifest`): format version, metric, dimension, index type (FAISS
  factory string), item count, the SHA-256 and path of the model checkpoint that produced the
  vectors, the preprocessing, and the SHA-256 of the other files;
- ``journal.jsonl``: the changes since ``index.faiss`` was written
  (:mod:`retrieval.index.journal`), which the store applies in place as they are made;
- ``index.ivfdata`` (IVF indexes built with ``on_disk``): the inverted lists, which FAISS
  memory-maps.

This module needs neither FAISS nor numpy: the command line reads manifests cheaply.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.atomic import ensure_present
from retrieval.errors import UserError

#: Version 2 added index types, stable ids with add/remove, and the time each item was added;
#: version 3 the metadata store (``metadata.sqlite`` in place of ``metadata.json``).
FORMAT_VERSION = 3
#: ``cosine``: vectors are L2-normalised and compared by inner product; ``l2``: Euclidean.
METRICS = ("cosine", "l2")
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.json"
#: The metadata store (:mod:`retrieval.index.store`), and the files SQLite keeps beside it.
STORE_FILE = "metadata.sqlite"
STORE_SIDE_FILES = (STORE_FILE + "-wal", STORE_FILE + "-shm")
MANIFEST_FILE = "manifest.json"
#: Inverted lists of an on-disk IVF index (FAISS ``OnDiskInvertedLists``).
IVFDATA_FILE = "index.ivfdata"
#: Changes since the snapshot (:mod:`retrieval.index.journal`).
JOURNAL_FILE = "journal.jsonl"
#: Every file an index folder may hold; a folder with anything else is not replaced.
#: The match / no-match cut-points of ``retrieval calibrate``
#: (:mod:`retrieval.evaluation.calibration`), kept across snapshots.
CALIBRATION_FILE = "calibration.json"
INDEX_FILES = frozenset(
    {
        INDEX_FILE,
        METADATA_FILE,
        STORE_FILE,
        *STORE_SIDE_FILES,
        MANIFEST_FILE,
        IVFDATA_FILE,
        JOURNAL_FILE,
        CALIBRATION_FILE,
    }
)
#: Files whose checksum every manifest records (``index.ivfdata`` too when present), by
#: format: the store's checksum is that of the snapshot as written.
CHECKSUMMED_FILES = (INDEX_FILE, STORE_FILE)
LEGACY_CHECKSUMMED_FILES = (INDEX_FILE, METADATA_FILE)
#: Index type used when none is given: exact search.
DEFAULT_INDEX_TYPE = "Flat"


def check_metric(metric: str) -> None:
    """Raise a :class:`UserError` naming the choices unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


@dataclass
class Manifest:
    """What an index was built from; checked on load."""

    metric: str
    dim: int
    count: int
    model_sha256: str
    model_path: str
    preprocessing: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    checksums: dict = field(default_factory=dict)
    index_type: str = DEFAULT_INDEX_TYPE
    updated: float = field(default_factory=time.time)


def new_manifest(
    metric: str,
    dim: int,
    index_type: str,
    model_sha256: str,
    model_path: str,
    preprocessing: dict | None,
) -> Manifest:
    """The manifest of a new, still empty index."""
    return Manifest(
        metric=metric,
        dim=dim,
        count=0,
        model_sha256=model_sha256,
        model_path=model_path,
        preprocessing=dict(preprocessing or {}),
        index_type=index_type,
    )


def _check_fields(m: Manifest) -> None:
    """Raise ValueError naming the first field of the wrong type or value."""
    if m.metric not in METRICS:
        raise ValueError(f"metric {m.metric!r} is not one of {', '.join(METRICS)}")
    for name in ("dim", "count", "format_version"):
        value = getattr(m, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    for name in ("model_sha256", "model_path", "index_type"):
        if not isinstance(getattr(m, name), str):
            raise ValueError(f"{name} must be text")
    if not isinstance(m.preprocessing, dict):
        raise ValueError("preprocessing must be a mapping")
    if not isinstance(m.checksums, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in m.checksums.items()
    ):
        raise ValueError("checksums must map file names to SHA-256 digests")
    required = CHECKSUMMED_FILES if m.format_version >= 3 else LEGACY_CHECKSUMMED_FILES
    missing = [name for name in required if name not in m.checksums]
    if missing:
        raise ValueError(f"no checksum for {', '.join(missing)}")
    unknown = set(m.checksums) - INDEX_FILES
    if unknown:
        raise ValueError(f"checksums of unknown files {', '.join(sorted(unknown))}")


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of an index folder, with a clear error when it is not one.

    Every field is checked for type, and the checksums of ``index.faiss`` and the metadata
    (``metadata.sqlite``, or ``metadata.json`` before format 3) must be there: a manifest
    without them would turn verification off.

    Raises:
        UserError: no such folder, not an index folder, written by a newer version, or a
            manifest that is damaged or was edited.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    ensure_present(directory)  # a swap a crash interrupted is finished first
    if not directory.is_dir():
        raise UserError(
            f"{directory}: no such index folder (build one with `retrieval index build`)"
        )
    if not path.is_file():
        raise UserError(f"{directory} is not an index folder: it has no {MANIFEST_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("not a mapping")
        if int(raw.get("format_version", 1)) > FORMAT_VERSION:
            raise UserError(
                f"{directory} was written by a newer metric-retrieval; upgrade to read it"
            )
        manifest = Manifest(**raw)
        _check_fields(manifest)
    except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is damaged ({reason}); rebuild the index") from None
    return manifest


def is_index_folder(directory: str | os.PathLike) -> bool:
    """Whether a folder is an index folder written by this program: a manifest of ours, and no
    file an index does not have. Only such a folder is ever replaced by
    :meth:`retrieval.index.gallery.GalleryIndex.save` (a user's folder given as ``--out`` by
    mistake is refused, not emptied)."""
    directory = Path(directory)
    try:
        names = set(os.listdir(directory))
        raw = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(raw, dict)
        and {"metric", "dim", "model_sha256"} <= set(raw)
        and names <= INDEX_FILES
        and all((directory / name).is_file() for name in names)
    )
