"""Match or no match (calibrated cut-points), and near-duplicate groups."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import UserError
from retrieval.workflows._common import ProgressFactory, _no_progress, _RefStore, open_images
from retrieval.workflows.search import QueryResult

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    pass

logger = logging.getLogger(__name__)


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
    if threshold is not None and not threshold >= 0:
        raise UserError(f"the distance threshold must be a number >= 0, got {threshold}")
    target = Path(target)
    if not target.is_dir():
        raise UserError(f"{target}: no such index or folder of images")
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
