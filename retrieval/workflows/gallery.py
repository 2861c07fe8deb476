"""Embedding a source, and building, changing and describing an index."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import UserError
from retrieval.workflows._common import ProgressFactory, _no_progress, embed, open_images

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    from retrieval.index.gallery import GalleryIndex

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ embed


def embed_to_file(
    model_path: str | os.PathLike,
    source: str,
    out: str | os.PathLike,
    split: str | None = None,
    classes: str | None = None,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    labels: str = "from-folders",
    image_size: int | None = None,
) -> tuple[Path, Path, tuple[int, ...]]:
    """Embed a source into ``OUT.npy`` and ``OUT.ids.json``; returns both paths and the shape."""
    from retrieval.atomic import write_json, write_npy
    from retrieval.model.resolve import resolve_model

    e = resolve_model(model_path, image_size)
    ds = open_images(source, split, classes, data_root, e.image_size, labels)
    emb = embed(e.model, ds, e.preprocessing, device, source, progress)
    out = Path(out)
    out = out if out.suffix == ".npy" else out.with_suffix(".npy")
    write_npy(out, emb)
    ids_path = out.with_suffix(".ids.json")
    items = [{"ref": r, "label": int(y)} for r, y in zip(ds.refs, ds.labels, strict=True)]
    write_json(ids_path, {"class_names": ds.class_names, "items": items})
    return out, ids_path, tuple(emb.shape)


def embed_shard_of_source(
    model_path: str | os.PathLike,
    source: str,
    shards: str | os.PathLike,
    split: str | None = None,
    classes: str | None = None,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    labels: str = "from-folders",
    image_size: int | None = None,
) -> Path:
    """This process's shard of a source under ``torchrun`` (:mod:`retrieval.index.shards`)."""
    from retrieval.index.shards import BACKEND, embed_shard, shard_range
    from retrieval.model.embed import pick_device
    from retrieval.model.resolve import resolve_model
    from retrieval.training.distributed import process_group, rank_device, rank_from_env

    rank = rank_from_env()
    e = resolve_model(model_path, image_size)
    ds = open_images(source, split, classes, data_root, e.image_size, labels)
    ds = ds.with_transform(e.transform())
    dev = pick_device(device)
    dev = rank_device(dev, rank) if dev.type == "cuda" else dev  # one GPU per process
    with process_group(rank, BACKEND):
        done = (progress or _no_progress)(
            f"embedding {source} (rank {rank.rank})", len(shard_range(len(ds), rank))
        )
        return embed_shard(
            e.model,
            ds,
            shards,
            rank,
            e.sha256,
            e.spec,
            source,
            device=dev,
            on_batch=done,
        )


# ------------------------------------------------------------------------------------ index


@dataclass
class BuildSpec:
    """How to build an index (everything but the gallery): ``retrieval index build`` options."""

    metric: str = "cosine"
    index_type: str = "Flat"
    memory_budget: str | int = "2GB"
    nprobe: int | None = None
    ef_search: int | None = None
    on_disk: bool = False
    overwrite: bool = False


def check_index_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that holds something not ours, or an index when
    ``overwrite`` is not given."""
    from retrieval.atomic import check_replaceable, real_path
    from retrieval.index.gallery import is_index_folder

    if is_index_folder(out) and not overwrite:
        raise UserError(
            f"{out} holds an index already; pass --overwrite to replace it, or choose another --out"
        )
    check_replaceable(real_path(out), is_index_folder, "an index folder")


def build_index(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    spec: BuildSpec,
    source: str | None = None,
    from_shards: str | os.PathLike | None = None,
    split: str | None = None,
    classes: str | None = None,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    labels: str = "from-folders",
    image_size: int | None = None,
) -> GalleryIndex:
    """Embed a gallery (or read embedded shards) and save an index folder at ``out``."""
    from retrieval.atomic import content_hashes, real_path
    from retrieval.index.gallery import METRICS, GalleryIndex, is_index_folder, parse_memory
    from retrieval.index.lock import index_lock
    from retrieval.model.resolve import resolve_model

    if spec.metric not in METRICS:
        raise UserError(f"unknown metric {spec.metric!r}; choose one of {', '.join(METRICS)}")
    budget = parse_memory(spec.memory_budget)
    if (source is None) == (from_shards is None):
        raise UserError("give either a gallery SOURCE or --from-shards DIR")
    if from_shards is not None and (split is not None or classes is not None):
        raise UserError(
            "--split and --classes apply when embedding; the shards are already embedded"
        )
    check_index_out(out, spec.overwrite)
    e = resolve_model(model_path, image_size)
    built_with = dict(
        metric=spec.metric,
        **e.index_fields(),
        index_type=spec.index_type,
        memory_budget=budget,
    )
    work = None
    if spec.on_disk:  # lists are merged here, then renamed into OUT: the same file system
        real_out = real_path(out)
        real_out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{real_out.name}.lists-", dir=real_out.parent))
    try:
        if from_shards is not None:
            from retrieval.index.shards import build_index_from_shards

            index = build_index_from_shards(from_shards, **built_with, on_disk=work)
        else:
            ds = open_images(source, split, classes, data_root, e.image_size, labels)
            emb = embed(e.model, ds, e.preprocessing, device, source, progress)
            index = GalleryIndex.build(
                emb,
                ds.refs,
                ds.labels,
                ds.class_names,
                **built_with,
                on_disk=work,
                sha256=content_hashes(ds.refs),
                fields=user_fields(source, ds.refs),
            )
        index.set_search_defaults(nprobe=spec.nprobe, ef_search=spec.ef_search)
        with index_lock(out):
            if is_index_folder(out) and not spec.overwrite:  # built by another process meanwhile
                raise UserError(f"{out} holds an index already; pass --overwrite to replace it")
            index.save(out)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return index


def user_fields(source: str, refs: Sequence[str]) -> list[dict[str, str]] | None:
    """Each item's user fields: the extra columns of a CSV manifest (None for other sources)."""
    if not str(source).lower().endswith(".csv"):
        return None
    from data.datasets import manifest_fields

    by_ref = manifest_fields(source)
    return [by_ref.get(ref, {}) for ref in refs]


def add_to_index(
    index_dir: str | os.PathLike,
    sources: Sequence[str],
    label: str | None = None,
    model_path: str | os.PathLike | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    labels: str = "from-folders",
) -> tuple[list[int], int]:
    """Embed images (files, folders, CSV manifests, built-in references) and add them to an
    index under the writer lock; returns their new ids and the index's new size."""
    import numpy as np

    from data.datasets import BUILTIN, load_files, open_source
    from retrieval.atomic import content_hashes
    from retrieval.index.lock import index_lock
    from retrieval.serving.service import UNLABELLED, SearchService

    def is_source(src: str) -> bool:
        return Path(src).is_dir() or src.lower().endswith(".csv") or src.startswith(BUILTIN)

    with index_lock(index_dir):
        service = SearchService(index_dir, model_path, device=device)
        vectors, refs, names, extra = [], [], [], []
        files = [src for src in sources if not is_source(src)]
        if files:  # single images: unreadable ones skipped with one warning, as in folders
            ds = load_files(files, draft_size=service.image_size, source="the added files")
            vectors.append(service.embed([ds.image(i) for i in range(len(ds))]))
            refs += [str(Path(r).resolve()) for r in ds.refs]
            names += [label or UNLABELLED] * len(ds)
            extra += [{} for _ in range(len(ds))]
        for src in sources:
            if is_source(src):
                ds = open_source(src, draft_size=service.image_size, labels=labels)
                done = (progress or _no_progress)(f"embedding {src}", len(ds))
                from retrieval.model.embed import embed_dataset

                vectors.append(
                    embed_dataset(
                        service.model,
                        ds.with_transform(service.transform),
                        device=service.device,
                        on_batch=done,
                    )
                )
                refs += ds.refs
                names += [label or ds.class_names[y] for y in ds.labels]
                extra += user_fields(src, ds.refs) or [{} for _ in range(len(ds))]
        ids = service.add_vectors(np.concatenate(vectors), refs, names, content_hashes(refs), extra)
    return ids, len(service)


def remove_from_index(index_dir: str | os.PathLike, ids: Sequence[int]) -> tuple[int, int]:
    """Remove items by id under the writer lock; returns how many and the new size."""
    from retrieval.index.gallery import GalleryIndex
    from retrieval.index.lock import index_lock

    with index_lock(index_dir):
        index = GalleryIndex.load(index_dir)
        n = index.remove(ids)
        index.commit(index_dir)
    return n, len(index)


def compact_index(index_dir: str | os.PathLike) -> int:
    """Fold the journal into a new snapshot; returns the number of items."""
    from retrieval.index.gallery import GalleryIndex
    from retrieval.index.lock import index_lock

    with index_lock(index_dir):
        index = GalleryIndex.load(index_dir)
        index.save(index_dir)
    return len(index)


def repair_index(index_dir: str | os.PathLike) -> tuple[int, int]:
    """Cut a damaged journal at its first bad line (under the writer lock); returns the changes
    kept and the bytes dropped. Never runs by itself: loading a damaged index names it."""
    from retrieval.index.journal import repair_journal
    from retrieval.index.lock import index_lock

    with index_lock(index_dir):
        return repair_journal(index_dir)


def index_info(index_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """``(field, value)`` rows describing an index folder and what it was built with."""
    from dataclasses import asdict

    from retrieval.index.gallery import JOURNAL_FILE, STORE_FILE, GalleryIndex, read_manifest

    m = read_manifest(index_dir)
    journal = Path(index_dir) / JOURNAL_FILE
    pending = journal.is_file() and journal.stat().st_size > 0  # replayed: no memory map then
    rows = []
    for key, value in asdict(m).items():
        if key == "checksums" and isinstance(value, dict):
            value = ", ".join(f"{k}: {str(v)[:12]}" for k, v in value.items())
        if key == "count" and pending:
            value = f"{value} at the last snapshot; changes since in {JOURNAL_FILE}"
        rows.append((key, str(value)))
    index = GalleryIndex.load(index_dir, mmap=not pending)
    for key, value in index.describe().items():
        if key not in ("metric", "dim", "index_type", "read_only"):
            rows.append((key, str(value)))
    store = index.store
    if store.path is None:
        rows.append(("metadata", "metadata.json (migrated on the next writable open)"))
    else:
        rows.append(
            (
                "metadata",
                f"{STORE_FILE} (SQLite, {store.journal_mode}); journal bytes applied: "
                f"{store.applied:,}",
            )
        )
    size = sum(f.stat().st_size for f in Path(index_dir).iterdir() if f.is_file())
    rows.append(("size on disk", f"{size / 1024**2:,.1f} MB"))
    return rows


def sync_index(
    index_dir: str | os.PathLike,
    folder: str | os.PathLike,
    labels: str = "from-folders",
    model_path: str | os.PathLike | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
) -> tuple[int, int, int]:
    """Make an index follow a folder: add its images the index lacks, remove the items whose
    file under the folder is gone (through the journal, under the writer lock). Items from
    elsewhere are left alone; unreadable images are skipped with one warning.

    Returns:
        ``(added, removed, total)``.
    """
    import numpy as np

    from data.datasets import open_source
    from retrieval.atomic import content_hashes, real_path
    from retrieval.index.lock import index_lock
    from retrieval.model.embed import embed_dataset
    from retrieval.serving.service import SearchService

    root = real_path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder")
    with index_lock(index_dir):
        service = SearchService(index_dir, model_path, device=device)
        inside = {}
        for item in service.index.items.values():
            if item.ref.startswith("fashion-mnist:"):
                continue
            path = real_path(item.ref)
            if root in path.parents:
                inside[path] = item.id
        ds = open_source(str(root), draft_size=service.image_size, labels=labels)
        on_disk = {real_path(ref): pos for pos, ref in enumerate(ds.refs)}
        new = sorted(pos for path, pos in on_disk.items() if path not in inside)
        gone = sorted(item_id for path, item_id in inside.items() if path not in on_disk)
        if gone:
            service.remove(gone)
        if new:
            part = ds.subset(np.array(new, dtype=np.int64))
            done = (progress or _no_progress)(f"embedding new images of {folder}", len(part))
            x = embed_dataset(
                service.model,
                part.with_transform(service.transform),
                device=service.device,
                on_batch=done,
            )
            names = [part.class_names[y] for y in part.labels]
            service.add_vectors(x, part.refs, names, content_hashes(part.refs))
    return len(new), len(gone), len(service)
