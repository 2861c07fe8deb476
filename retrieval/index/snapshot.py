"""The snapshot of an index folder: ``index.faiss``, ``metadata.sqlite`` and ``manifest.json``.

:func:`write_snapshot` writes the three (and moves in ``index.ivfdata``) as one new folder,
atomically — the store as a consistent copy made by SQLite's backup API; :func:`read_snapshot`
reads them back, verifying the checksums, cross-checking the manifest against the FAISS file
and the store, and (when given) the model and dimension the caller will embed queries with.
Changes made since are in the journal (:mod:`retrieval.index.journal`), and applied in place in
the store as they are made (:mod:`retrieval.index.store`): the store's checksum is verified
while it is unchanged since its snapshot.

Folders of format 2 keep their metadata in ``metadata.json``: :func:`read_snapshot` reads it
into a private in-memory store, and :func:`migrate_folder` writes it as ``metadata.sqlite``
(the first open that may write does; a read-only open leaves the folder as it is).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss

from retrieval.atomic import atomic_dir, atomic_path, file_sha256, real_path, write_text
from retrieval.errors import UserError
from retrieval.index.factory import stdout_to_stderr
from retrieval.index.manifest import (
    CALIBRATION_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    IVFDATA_FILE,
    JOURNAL_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    STORE_FILE,
    Manifest,
    is_index_folder,
    read_manifest,
)
from retrieval.index.store import MetadataStore, Record, SnapshotMeta, open_in_this_process

_FAISS_METRIC = {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass
class Item:
    """One indexed image: its stable id, reference, label (index into class names), and when
    it was added (seconds since the epoch)."""

    id: int
    ref: str
    label: int
    added: float


@dataclass
class Snapshot:
    """What an index folder's snapshot holds."""

    index: faiss.Index
    store: MetadataStore
    class_names: list[str]
    manifest: Manifest
    next_id: int
    tombstones: list[int]
    #: live items
    count: int
    #: ``index.ivfdata`` of an on-disk IVF index, else None.
    lists_file: Path | None = None
    #: the metadata came from a ``metadata.json`` (format 2) into a private in-memory store
    legacy: bool = False


def write_snapshot(directory: Path, snap: Snapshot, staged: list[dict] | None = None) -> None:
    """Write the snapshot as the folder ``directory`` (a real path), atomically; updates the
    manifest's count, format version, time and checksums. ``staged``: the journal entries of
    the changes in the store's open transaction (see
    :meth:`~retrieval.index.store.MetadataStore.write_snapshot`).

    Raises:
        UserError: ``directory`` is a file or a folder that is not an index folder
            (:func:`~retrieval.index.manifest.is_index_folder`); it is left untouched.
    """
    with atomic_dir(directory, owned=is_index_folder, what="an index folder") as tmp:
        files = [INDEX_FILE, STORE_FILE]
        if snap.lists_file is not None:
            # the lists move (a rename: keep the work folder on the index's file system);
            # the index file records their name, found beside it (IO_FLAG_ONDISK_SAME_DIR)
            if real_path(snap.lists_file.parent) == directory:
                raise UserError("an on-disk index cannot be saved again; rebuild it")
            os.replace(snap.lists_file, tmp / IVFDATA_FILE)
            files.append(IVFDATA_FILE)
        faiss.write_index(snap.index, str(tmp / INDEX_FILE))
        calibration = directory / CALIBRATION_FILE
        if calibration.is_file():  # a calibration stays with its index (not checksummed)
            shutil.copy2(calibration, tmp / CALIBRATION_FILE)
        meta = SnapshotMeta(snap.class_names, snap.next_id, snap.tombstones, snap.count)
        snap.store.write_snapshot(tmp / STORE_FILE, meta, staged or [])
        snap.manifest.count = snap.count
        snap.manifest.format_version = FORMAT_VERSION
        snap.manifest.updated = time.time()
        snap.manifest.checksums = {name: file_sha256(tmp / name) for name in files}
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(asdict(snap.manifest), indent=2) + "\n", encoding="utf-8"
        )


def read_snapshot(
    directory: Path, model_sha256: str | None = None, dim: int | None = None, mmap: bool = False
) -> Snapshot:
    """Read and check a folder's snapshot (see :meth:`retrieval.index.gallery.GalleryIndex.load`);
    ``mmap``, or a folder this process cannot write, opens the store read-only.

    Raises:
        UserError: not an index folder, damaged or edited files, or built with another model.
    """
    manifest = read_manifest(directory)
    legacy = STORE_FILE not in manifest.checksums
    for name, digest in manifest.checksums.items():
        if name != STORE_FILE:
            _verify(directory, name, digest)
    if dim is not None and dim != manifest.dim:
        raise UserError(
            f"{directory} holds {manifest.dim}-dimensional vectors but the model makes "
            f"{dim}-dimensional ones; rebuild the index with this model"
        )
    if model_sha256 is not None and model_sha256 != manifest.model_sha256:
        raise UserError(
            f"{directory} was built with another model (checkpoint "
            f"{manifest.model_path or '?'}, sha256 {manifest.model_sha256[:12]}); searching "
            "it with this model would compare different embedding spaces. Use that "
            "checkpoint, or rebuild the index with `retrieval index build`."
        )
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    on_disk = IVFDATA_FILE in manifest.checksums
    if on_disk:
        flags |= faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists beside index.faiss, wherever
    store = None
    try:
        with stdout_to_stderr() if on_disk else contextlib.nullcontext():
            index = faiss.read_index(str(directory / INDEX_FILE), flags)
        if legacy:
            store, meta = _read_metadata_json(directory, manifest)
        else:
            # a folder this process cannot write (a read-only mount) is read as mmap reads
            read_only = mmap or not os.access(directory, os.W_OK)
            store, meta = _open_store(directory, manifest, read_only=read_only)
    except (
        RuntimeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        sqlite3.DatabaseError,
    ) as exc:
        if store is not None:
            store.close()
        raise UserError(f"{directory} is damaged ({str(exc)[:200]}); rebuild the index") from None
    _check_snapshot(directory, manifest, index, meta.count, len(meta.tombstones))
    lists = directory / IVFDATA_FILE if on_disk else None
    return Snapshot(
        index,
        store,
        meta.class_names,
        manifest,
        meta.next_id,
        meta.tombstones,
        meta.count,
        lists,
        legacy,
    )


def migrate_folder(directory: Path, snap: Snapshot) -> MetadataStore:
    """Write a format-2 folder's metadata (read by :func:`read_snapshot` into ``snap.store``)
    as its ``metadata.sqlite``, then the manifest of format 3, then delete ``metadata.json``;
    returns the new store. Call it under the folder's writer lock, before the journal is
    replayed.

    Each step is atomic and the folder reads correctly after any of them: a crash before the
    manifest leaves a format-2 folder (migrated again next time), one after it a format-3
    folder with a ``metadata.json`` nothing reads any more.
    """
    meta = SnapshotMeta(snap.class_names, snap.next_id, snap.tombstones, snap.count)
    dest = directory / STORE_FILE
    with atomic_path(dest) as tmp:
        snap.store.write_snapshot(tmp, meta)
    manifest = snap.manifest
    manifest.checksums = {
        name: digest for name, digest in manifest.checksums.items() if name != METADATA_FILE
    }
    manifest.checksums[STORE_FILE] = file_sha256(dest)
    manifest.format_version = FORMAT_VERSION
    write_text(directory / MANIFEST_FILE, json.dumps(asdict(manifest), indent=2) + "\n")
    (directory / METADATA_FILE).unlink(missing_ok=True)
    return MetadataStore(dest)


def _verify(directory: Path, name: str, digest: str) -> None:
    if not (directory / name).is_file() or file_sha256(directory / name) != digest:
        raise UserError(
            f"{directory / name} is missing or damaged (checksum mismatch); "
            "rebuild the index with `retrieval index build`"
        )


def _open_store(
    directory: Path, manifest: Manifest, read_only: bool
) -> tuple[MetadataStore, SnapshotMeta]:
    """The folder's store and what its snapshot recorded.

    Its checksum is verified while no change has been applied to it since the snapshot: the
    file is read before this process connects to it, and only when no connection of this
    process is open on it already (see
    :func:`~retrieval.index.store.open_in_this_process`; that connection's opening verified
    it) and the journal is empty (else it has almost surely changed).

    Raises:
        UserError: missing, damaged, or not the snapshot the manifest describes.
    """
    path = directory / STORE_FILE
    if not path.is_file():
        _verify(directory, STORE_FILE, manifest.checksums[STORE_FILE])  # raises: missing
    journal = directory / JOURNAL_FILE
    unchanged = not journal.is_file() or journal.stat().st_size == 0
    digest = file_sha256(path) if unchanged and not open_in_this_process(path) else None
    store = MetadataStore(path, read_only=read_only)
    try:
        if digest is not None and digest != manifest.checksums[STORE_FILE] and not store.changed:
            raise UserError(
                f"{path} is missing or damaged (checksum mismatch); "
                "rebuild the index with `retrieval index build`"
            )
        meta = store.snapshot_meta()
        if meta is None:
            raise ValueError(f"{STORE_FILE} holds no snapshot")
    except BaseException:
        store.close()
        raise
    return store, meta


def _read_metadata_json(directory: Path, manifest: Manifest) -> tuple[MetadataStore, SnapshotMeta]:
    """A private in-memory store of a format-2 folder's ``metadata.json``, and its snapshot
    record.

    Raises:
        UserError: a label that names no class (it would fail every search that finds it).
    """
    meta = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    class_names = [str(name) for name in meta["class_names"]]
    records = []
    for it in meta["items"]:
        label = int(it["label"])
        if not 0 <= label < len(class_names):
            raise UserError(
                f"{directory / METADATA_FILE} is damaged: item {it['id']} has label {label}, "
                f"but there are {len(class_names)} classes; rebuild the index"
            )
        added = float(it.get("added", manifest.created))
        records.append(Record(int(it["id"]), str(it["ref"]), class_names[label], added))
    next_id = meta.get("next_id")
    if next_id is None:
        next_id = max((r.id for r in records), default=-1) + 1
    tombstones = [int(i) for i in meta.get("tombstones", [])]
    snapshot = SnapshotMeta(class_names, int(next_id), tombstones, len(records))
    store = MetadataStore(None)
    store.import_items(records, snapshot)
    return store, snapshot


def _check_snapshot(
    directory: Path, manifest: Manifest, index: faiss.Index, n_items: int, n_tombstones: int
) -> None:
    """Cross-check the manifest against the FAISS file and the metadata: an edited manifest
    (a metric changed from cosine to l2 would report similarities as distances) is refused.

    Raises:
        UserError: the metric, dimension or count disagree.
    """
    problems = []
    if index.metric_type != _FAISS_METRIC[manifest.metric]:
        problems.append(f"the manifest says metric {manifest.metric}, the FAISS index another")
    if index.d != manifest.dim:
        problems.append(f"the manifest says dimension {manifest.dim}, the FAISS index {index.d}")
    if index.ntotal != n_items + n_tombstones or manifest.count != n_items:
        problems.append(
            f"the manifest says {manifest.count} items, the FAISS index holds {index.ntotal} "
            f"vectors, the metadata {n_items} items and {n_tombstones} removed"
        )
    if problems:
        raise UserError(f"{directory} is damaged or was edited: {problems[0]}; rebuild the index")
