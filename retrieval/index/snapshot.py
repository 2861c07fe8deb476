"""The snapshot of an index folder: ``index.faiss``, ``metadata.json`` and ``manifest.json``.

:func:`write_snapshot` writes the three (and moves in ``index.ivfdata``) as one new folder,
atomically; :func:`read_snapshot` reads them back, verifying the checksums, cross-checking the
manifest against the FAISS file and the metadata, and (when given) the model and dimension the
caller will embed queries with. Changes made since are in the journal
(:mod:`retrieval.index.journal`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss

from retrieval.atomic import atomic_dir, file_sha256, real_path
from retrieval.errors import UserError
from retrieval.index.factory import stdout_to_stderr
from retrieval.index.manifest import (
    CALIBRATION_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    IVFDATA_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    Manifest,
    is_index_folder,
    read_manifest,
)

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
    items: list[Item]
    class_names: list[str]
    manifest: Manifest
    next_id: int | None
    tombstones: list[int]
    #: ``index.ivfdata`` of an on-disk IVF index, else None.
    lists_file: Path | None = None


def write_snapshot(directory: Path, snap: Snapshot) -> None:
    """Write the snapshot as the folder ``directory`` (a real path), atomically; updates the
    manifest's count, format version, time and checksums.

    Raises:
        UserError: ``directory`` is a file or a folder that is not an index folder
            (:func:`~retrieval.index.manifest.is_index_folder`); it is left untouched.
    """
    with atomic_dir(directory, owned=is_index_folder, what="an index folder") as tmp:
        files = [INDEX_FILE, METADATA_FILE]
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
        meta = {
            "class_names": snap.class_names,
            "next_id": snap.next_id,
            "tombstones": sorted(snap.tombstones),
            "items": [asdict(it) for it in snap.items],
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
        snap.manifest.count = len(snap.items)
        snap.manifest.format_version = FORMAT_VERSION
        snap.manifest.updated = time.time()
        snap.manifest.checksums = {name: file_sha256(tmp / name) for name in files}
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(asdict(snap.manifest), indent=2) + "\n", encoding="utf-8"
        )


def read_snapshot(
    directory: Path, model_sha256: str | None = None, dim: int | None = None, mmap: bool = False
) -> Snapshot:
    """Read and check a folder's snapshot (see :meth:`retrieval.index.gallery.GalleryIndex.load`).

    Raises:
        UserError: not an index folder, damaged or edited files, or built with another model.
    """
    manifest = read_manifest(directory)
    for name, digest in manifest.checksums.items():
        if not (directory / name).is_file() or file_sha256(directory / name) != digest:
            raise UserError(
                f"{directory / name} is missing or damaged (checksum mismatch); "
                "rebuild the index with `retrieval index build`"
            )
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
    try:
        with stdout_to_stderr() if on_disk else contextlib.nullcontext():
            index = faiss.read_index(str(directory / INDEX_FILE), flags)
        items, class_names, next_id, tombstones = _read_metadata(directory, manifest)
    except (RuntimeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{directory} is damaged ({str(exc)[:200]}); rebuild the index") from None
    _check_snapshot(directory, manifest, index, len(items), len(tombstones))
    lists = directory / IVFDATA_FILE if on_disk else None
    return Snapshot(index, items, class_names, manifest, next_id, tombstones, lists)


def _read_metadata(
    directory: Path, manifest: Manifest
) -> tuple[list[Item], list[str], int | None, list[int]]:
    """Items, class names, next id and tombstones of ``metadata.json``.

    Raises:
        UserError: a label that names no class (it would fail every search that finds it).
    """
    meta = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    class_names = [str(name) for name in meta["class_names"]]
    items = [
        Item(
            int(it["id"]),
            str(it["ref"]),
            int(it["label"]),
            float(it.get("added", manifest.created)),
        )
        for it in meta["items"]
    ]
    bad = next((it for it in items if not 0 <= it.label < len(class_names)), None)
    if bad is not None:
        raise UserError(
            f"{directory / METADATA_FILE} is damaged: item {bad.id} has label {bad.label}, but "
            f"there are {len(class_names)} classes; rebuild the index"
        )
    next_id = meta.get("next_id")
    tombstones: Sequence = meta.get("tombstones", [])
    return (
        items,
        class_names,
        None if next_id is None else int(next_id),
        [int(i) for i in tombstones],
    )


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
