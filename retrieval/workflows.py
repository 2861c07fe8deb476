"""What each command of ``retrieval`` does, as library functions: embed a source, build, change
and search an index, evaluate a model on a source.

Each composes the pieces of :mod:`retrieval.model`, :mod:`retrieval.index` and
:mod:`retrieval.evaluation` for one task, so that the command line only parses options, calls one
of these, and renders the result. Long work reports progress through a
:data:`ProgressFactory` (the command line passes one that draws a bar); the library itself only
logs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import UserError

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    import numpy as np

    from data.datasets import ImageDataset
    from retrieval.evaluation.evaluate import Evaluation
    from retrieval.index.gallery import GalleryIndex

logger = logging.getLogger(__name__)

#: ``progress(what, total)`` returns a function called with the number of items just done.
ProgressFactory = Callable[[str, int], Callable[[int], None]]

#: Evaluation protocols (``auto`` picks one: :func:`detect_protocol`).
PROTOCOLS = ("auto", "leave-one-out", "query-gallery", "cross-domain")


def _no_progress(what: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def open_images(
    spec: str,
    split: str | None = None,
    classes: str | None = None,
    data_root: str | os.PathLike | None = None,
    image_size: int | None = None,
    labels: str = "from-folders",
) -> ImageDataset:
    """The images of a source (built-in, folder or CSV), filtered to ``classes``; ``labels``:
    ``from-folders`` or ``none`` (:func:`data.datasets.open_source`)."""
    from data.datasets import open_source, parse_classes

    ds = open_source(spec, split=split, root=data_root, draft_size=image_size, labels=labels)
    return ds.filter_classes(parse_classes(classes))


def embed(
    model,
    dataset: ImageDataset,
    preprocessing,
    device: str = "auto",
    what: str = "images",
    progress: ProgressFactory | None = None,
) -> np.ndarray:
    """Embeddings ``(n, dim)`` of every image of ``dataset`` with ``model``."""
    from retrieval.model.embed import embed_dataset, pick_device

    done = (progress or _no_progress)(f"embedding {what}", len(dataset))
    return embed_dataset(
        model,
        dataset.with_transform(preprocessing.transform()),
        device=pick_device(device),
        on_batch=done,
    )


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
    from retrieval.atomic import real_path
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
                emb, ds.refs, ds.labels, ds.class_names, **built_with, on_disk=work
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
    from retrieval.index.lock import index_lock
    from retrieval.serving.service import UNLABELLED, SearchService

    def is_source(src: str) -> bool:
        return Path(src).is_dir() or src.lower().endswith(".csv") or src.startswith(BUILTIN)

    with index_lock(index_dir):
        service = SearchService(index_dir, model_path, device=device)
        vectors, refs, names = [], [], []
        files = [src for src in sources if not is_source(src)]
        if files:  # single images: unreadable ones skipped with one warning, as in folders
            ds = load_files(files, draft_size=service.image_size, source="the added files")
            vectors.append(service.embed([ds.image(i) for i in range(len(ds))]))
            refs += [str(Path(r).resolve()) for r in ds.refs]
            names += [label or UNLABELLED] * len(ds)
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
        ids = service.add_vectors(np.concatenate(vectors), refs, names)
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

    from retrieval.index.gallery import JOURNAL_FILE, GalleryIndex, read_manifest

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
    described = GalleryIndex.load(index_dir, mmap=not pending).describe()
    for key, value in described.items():
        if key not in ("metric", "dim", "index_type", "read_only"):
            rows.append((key, str(value)))
    size = sum(f.stat().st_size for f in Path(index_dir).iterdir() if f.is_file())
    rows.append(("size on disk", f"{size / 1024**2:,.1f} MB"))
    return rows


# ------------------------------------------------------------------------------------ search


def expand_queries(items: Sequence[str]) -> list[tuple[str, bool]]:
    """Query files, the image files of query folders (recursively), and built-in references;
    each with whether it came from a folder."""
    from data.images import is_image_file

    out: list[tuple[str, bool]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise UserError(f"{p}: no image files in this folder")
            out += [(f, True) for f in found]
        else:
            out.append((item, False))
    return out


def read_query(ref: str):
    """Pixels of a query: an image file or a built-in reference (``fashion-mnist:test:0``)."""
    from data.datasets import BUILTIN, read_ref
    from data.images import read_image

    return read_ref(ref) if ref.startswith(BUILTIN + ":") else read_image(ref)


@dataclass
class QueryResult:
    """One query and its hits (:class:`retrieval.index.gallery.Hit`), best first."""

    query: str
    hits: list


def search_index(
    index_dir: str | os.PathLike,
    queries: Sequence[str],
    k: int = 10,
    model_path: str | os.PathLike | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    mmap: bool = False,
    device: str = "auto",
    where: Mapping[str, object] | None = None,
) -> tuple[str, list[QueryResult]]:
    """Search an index with query images, in batches; returns the metric and the results per
    query.

    ``where`` restricts the results to the items matching a filter
    (:mod:`retrieval.index.filters`, e.g. ``{"label": ["Sneaker"]}``), inside the FAISS search.

    An image named on its own that cannot be read is an error; unreadable images of a query
    folder are skipped and listed in one warning, as when a gallery folder is indexed.

    Raises:
        UserError: a named image cannot be read, or no query image can; the filter names an
            unknown field or label.
    """
    from retrieval.serving.service import SearchService

    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    expanded = expand_queries(queries)
    named = {ref for ref, in_folder in expanded if not in_folder}
    for ref in named:  # fail early, before the model loads, on a file given by name
        if not ref.startswith("fashion-mnist:") and not Path(ref).is_file():
            read_query(ref)  # raises the reader's clear error
    service = SearchService(index_dir, model_path, device=device, mmap=mmap)
    searched, hits, skipped = service.search_files(
        [ref for ref, _ in expanded],
        k,
        nprobe=nprobe,
        ef_search=ef_search,
        read=read_query,
        where=where,
    )
    for ref, reason in skipped:
        if ref in named:
            raise UserError(reason)
    if skipped:
        shown = "; ".join(f"{ref} ({why})" for ref, why in skipped[:20])
        logger.warning(
            "skipped %d unreadable query images: %s%s",
            len(skipped),
            shown,
            " ..." if len(skipped) > 20 else "",
        )
    if not searched:
        raise UserError("none of the query images can be read")
    results = [QueryResult(ref, h) for ref, h in zip(searched, hits, strict=True)]
    return service.index.manifest.metric, results


# ------------------------------------------------------------------------------------ evaluate


def detect_protocol(source: str, gallery: str | None) -> str:
    """``auto``: cross-domain with a gallery, query-gallery for a CSV with ``is_query`` and
    ``is_gallery`` columns, else leave-one-out."""
    if gallery:
        return "cross-domain"
    path = Path(source)
    if source.lower().endswith(".csv") and path.is_file():
        with path.open(encoding="utf-8") as fh:
            header = {c.strip() for c in fh.readline().strip().split(",")}
        if {"is_query", "is_gallery"} <= header:
            return "query-gallery"
    return "leave-one-out"


def default_eval_classes(source: str) -> str | None:
    """The classes evaluated when none are given: the built-in dataset's unseen classes (the
    class-disjoint protocol), all classes of any other source."""
    from data.datasets import BUILTIN
    from data.fashion_mnist import UNSEEN_CLASSES

    return UNSEEN_CLASSES if source.split(":")[0] == BUILTIN else None


@dataclass
class EvaluationRun:
    """The outcome of :func:`evaluate_source` and what its report needs."""

    evaluation: Evaluation
    info: dict
    xq: Any
    yq: Any
    xb: Any
    yb: Any
    class_names: list
    queries: Any  #: ImageDataset of the queries
    gallery: Any  #: ImageDataset of the gallery


def evaluate_source(
    source: str,
    model_path: str | os.PathLike | None = None,
    pixels: bool = False,
    classes: str | None = None,
    split: str | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    protocol: str = "auto",
    gallery: str | None = None,
    gallery_split: str | None = None,
    clustering: bool = True,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    labels: str = "from-folders",
    image_size: int | None = None,
) -> EvaluationRun:
    """Evaluate a model (or raw pixels) on a source with a protocol (see ``PROTOCOLS``)."""
    from data.datasets import open_source
    from retrieval.evaluation.evaluate import (
        align_labels,
        evaluate,
        pixel_vectors,
        read_query_gallery_flags,
        split_query_gallery,
    )
    from retrieval.model.resolve import resolve_model

    if (model_path is None) == (not pixels):
        raise UserError("give either --model CHECKPOINT or --pixels")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "auto":
        protocol = detect_protocol(source, gallery)
    if (protocol == "cross-domain") != (gallery is not None):
        raise UserError(
            "the cross-domain protocol needs --gallery SOURCE, and --gallery needs the "
            "cross-domain protocol"
        )
    if classes is None:
        classes = default_eval_classes(source)
    e = resolve_model(model_path, image_size) if model_path is not None else None

    def vectors(ds: ImageDataset, what: str):
        if e is None:
            return pixel_vectors(ds)
        return embed(e.model, ds, e.preprocessing, device, what, progress)

    size = e.image_size if e is not None else None
    ds = open_images(source, split, classes, data_root, size, labels)
    x = vectors(ds, source)
    names = ds.class_names
    if protocol == "leave-one-out":
        qds = gds = ds
        xq, yq, xb, yb, self_index = x, ds.labels, None, None, None
    elif protocol == "query-gallery":
        is_q, is_g = read_query_gallery_flags(source, split)
        q_pos, g_pos, self_index = split_query_gallery(is_q[ds.index], is_g[ds.index])
        qds, gds = ds.subset(q_pos), ds.subset(g_pos)
        xq, yq, xb, yb = x[q_pos], ds.labels[q_pos], x[g_pos], ds.labels[g_pos]
    else:
        gds = open_source(
            gallery, split=gallery_split, root=data_root, draft_size=size, labels=labels
        )
        qds = ds
        xq, xb = x, vectors(gds, gallery)
        yq, yb, names = align_labels(ds.labels, ds.class_names, gds.labels, gds.class_names)
        self_index = None
    ev = evaluate(
        xq,
        yq,
        xb,
        yb,
        ks=ks,
        metric=metric,
        self_index=self_index,
        clustering=clustering,
        class_names=names,
    )
    name = e.name if e is not None else "raw pixels"
    info = {
        "model": name,
        "source": source,
        "split": split,
        "classes": classes or "all",
        "protocol": protocol,
    }
    if gallery is not None:
        info |= {"gallery": gallery, "gallery_split": gallery_split}
    return EvaluationRun(
        ev,
        info,
        xq,
        yq,
        x if xb is None else xb,
        yq if yb is None else yb,
        list(names),
        qds,
        gds,
    )


# ------------------------------------------------------------------------------------ export


def export_model(
    checkpoint: str | os.PathLike,
    onnx: str | os.PathLike | None = None,
    torchscript: str | os.PathLike | None = None,
    check: bool = True,
    image_size: int | None = None,
) -> list[tuple[str, Path, int, float | None]]:
    """Export a checkpoint's model (ONNX and/or TorchScript) with a ``FILE.json`` card beside
    each; returns ``(format, path, input side, max |difference| from PyTorch or None)``.

    Raises:
        UserError: nothing to write, or an export that differs from PyTorch beyond tolerance.
    """
    from retrieval.model.export import (
        TOLERANCE,
        export_onnx,
        export_torchscript,
        max_difference,
        model_card,
    )
    from retrieval.model.resolve import resolve_model

    if onnx is None and torchscript is None:
        raise UserError("give --onnx FILE.onnx and/or --torchscript FILE.pt")
    e = resolve_model(checkpoint, image_size)
    net, size, digest = e.model, e.image_size, e.sha256
    state = {"model_config": e.config.as_dict()}
    written = []
    if onnx is not None:
        written.append(("onnx", export_onnx(net, size, onnx, model_card(state, digest, "onnx"))))
    if torchscript is not None:
        card = model_card(state, digest, "torchscript")
        written.append(("torchscript", export_torchscript(net, size, torchscript, card)))
    out = []
    for fmt, path in written:
        diff = None
        if check:
            diff = max_difference(net, path, fmt, size)
            if diff > TOLERANCE:
                raise UserError(
                    f"{path}: the exported model differs from PyTorch by {diff:.2e} (more than "
                    f"{TOLERANCE:.0e}); do not use it"
                )
        out.append((fmt, Path(path), size, diff))
    return out


# ------------------------------------------------------------------------------ match or not


def _distances(scores, metric: str):
    """User-facing search scores (cosine similarity, or Euclidean distance) as distances."""
    from retrieval.evaluation.calibration import to_distance

    return to_distance(scores, metric, similarity=(metric == "cosine"))


def calibrate_index(
    index_dir: str | os.PathLike,
    source: str,
    target_precision: Sequence[float] = (),
    target_recall: Sequence[float] = (),
    split: str | None = None,
    classes: str | None = None,
    data_root: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    device: str = "auto",
    progress: ProgressFactory | None = None,
):
    """Search labelled queries against an index and store the match / no-match cut-points in
    its folder (``calibration.json``); returns the :class:`Calibration`.

    A query that is itself in the index (the same reference) is never its own match; queries
    of classes the index lacks must come out "no match" (the open set).
    """
    import numpy as np

    from retrieval.evaluation.calibration import calibrate, nearest_outcome
    from retrieval.index.lock import index_lock
    from retrieval.model.embed import embed_dataset
    from retrieval.serving.service import SearchService

    service = SearchService(index_dir, model_path, device=device)
    ds = open_images(source, split, classes, data_root, service.image_size)
    done = (progress or _no_progress)(f"embedding {source}", len(ds))
    xq = embed_dataset(
        service.model,
        ds.with_transform(service.transform),
        device=service.device,
        on_batch=done,
    )
    hits = service.search_vectors(xq, 2, nprobe=nprobe, ef_search=ef_search)
    names = list(service.index.class_names)
    scores = np.full(len(xq), np.nan)
    positions = np.full(len(xq), -1, dtype=np.int64)
    for q, (ref, row) in enumerate(zip(ds.refs, hits, strict=True)):
        other = [h for h in row if h.ref != ref][:1]  # never the query itself
        if other:
            scores[q], positions[q] = other[0].score, names.index(other[0].label)
    metric = service.index.manifest.metric
    dist = _distances(scores, metric)
    dist = np.where(positions < 0, np.inf, dist)
    query_names = np.array(ds.class_names)[ds.labels]
    dist, correct = nearest_outcome(dist, positions, query_names, np.array(names))
    cal = calibrate(
        dist,
        correct,
        metric,
        target_precision=target_precision,
        target_recall=target_recall,
        open_set=~np.isin(query_names, names),
    )
    with index_lock(index_dir):
        cal.save(index_dir)
    return cal


def cutpoint_of(index_dir: str | os.PathLike, cutpoint: str | None = None):
    """A cut-point: a calibrated one by name (default best F1), or a distance given as a number
    (for an index not calibrated)."""
    from retrieval.evaluation.calibration import Calibration, is_calibrated

    if cutpoint is not None:
        try:
            return float(cutpoint)
        except ValueError:
            pass
    if not is_calibrated(index_dir):
        raise UserError(
            f"{index_dir} is not calibrated: run `retrieval calibrate {index_dir} LABELLED_IMAGES`"
            ", or give --cutpoint DISTANCE"
        )
    return Calibration.load(index_dir).cutpoint(cutpoint)


def decide(results: Sequence[QueryResult], metric: str, cutpoint) -> list[str]:
    """Each query's decision: its best hit's label, or "no match" past the cut-point."""
    import numpy as np

    from retrieval.evaluation.calibration import match

    best = np.array([r.hits[0].score if r.hits else np.nan for r in results])
    dist = np.where(np.isnan(best), np.inf, _distances(np.nan_to_num(best), metric))
    return match(dist, [r.hits[0].label if r.hits else None for r in results], cutpoint)


class _RefStore:
    """Pixels of references (files or built-in items) on demand, for :class:`ImageDataset`."""

    def __init__(self, refs: Sequence[str]):
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, i: int):
        from data.datasets import read_ref

        return read_ref(self.refs[i])


def find_duplicates_in(
    target: str | os.PathLike,
    out: str | os.PathLike,
    threshold: float | None = None,
    cutpoint: str | None = None,
    keep: str = "largest",
    model_path: str | os.PathLike | None = None,
    metric: str = "cosine",
    device: str = "auto",
    progress: ProgressFactory | None = None,
    image_size: int | None = None,
) -> dict:
    """Groups of near-duplicate images of an index (its images re-embedded: exact vectors for
    every index type) or of a folder; writes ``duplicates.json``, ``duplicates.csv`` and a
    picture of the groups into the new folder ``out``. Nothing is deleted.

    Returns:
        The keep report (:func:`retrieval.evaluation.duplicates.keep_report`) with
        ``threshold``.
    """
    import numpy as np

    from data.datasets import ImageDataset, read_ref
    from retrieval.atomic import atomic_dir
    from retrieval.evaluation import duplicates as dup
    from retrieval.evaluation.decision_plots import duplicate_groups
    from retrieval.index.gallery import is_index_folder

    if (threshold is None) == (cutpoint is None):
        raise UserError("give either --threshold DISTANCE or --cutpoint NAME")
    if keep not in ("largest", "first"):
        raise UserError(f"--keep takes largest or first, got {keep!r}")
    target = Path(target)
    if is_index_folder(target):
        from retrieval.serving.service import SearchService

        service = SearchService(target, model_path, device=device)
        metric = service.index.manifest.metric
        refs = [it.ref for it in sorted(service.index.items.values(), key=lambda it: it.id)]
        model, transform, dev = service.model, service.transform, service.device
        if cutpoint is not None:
            cut = cutpoint_of(target, cutpoint)
            threshold = cut if isinstance(cut, float) else cut.distance
    else:
        if cutpoint is not None:
            raise UserError("--cutpoint needs a calibrated index; give --threshold for a folder")
        if model_path is None:
            raise UserError("a folder of images needs --model CHECKPOINT to embed it")
        if not target.is_dir():
            raise UserError(f"{target}: no such index or folder of images")
        from data.images import is_image_file
        from retrieval.model.embed import pick_device
        from retrieval.model.resolve import resolve_model

        refs = sorted(str(f) for f in target.rglob("*") if f.is_file() and is_image_file(f))
        if not refs:
            raise UserError(f"{target}: no image files in this folder")
        e = resolve_model(model_path, image_size)
        model, transform = e.model, e.transform()
        dev = pick_device(device)
    if threshold is None or not threshold >= 0:
        raise UserError(f"the distance threshold must be a number >= 0, got {threshold}")
    from retrieval.model.embed import embed_dataset

    ds = ImageDataset(_RefStore(refs), np.zeros(len(refs), np.int64), refs, ["all"], transform)
    done = (progress or _no_progress)(f"embedding {target}", len(ds))
    x = embed_dataset(model, ds, device=dev, on_batch=done)
    groups = dup.find_duplicates(x, threshold, metric)
    report = dup.keep_report(groups, refs, keep, vectors=x, metric=metric)
    with atomic_dir(out, what="a duplicates report") as tmp:
        dup.write_json(
            tmp / "duplicates.json", report, threshold=threshold, metric=metric, source=str(target)
        )
        dup.write_csv(tmp / "duplicates.csv", report)
        if groups:
            duplicate_groups(report, read_ref, tmp / "duplicate-groups.png")
    return report | {"threshold": threshold}


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
    from retrieval.atomic import real_path
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
            service.add_vectors(x, part.refs, [part.class_names[y] for y in part.labels])
    return len(new), len(gone), len(service)
