"""Building a :class:`~retrieval.index.gallery.GalleryIndex` from the parts of a gallery.

See :meth:`retrieval.index.gallery.GalleryIndex.build_in_parts`, which calls
:func:`build_in_parts`: train once, then add each part (for IVF, to a copy of the trained index
whose inverted lists are merged, in memory or on disk).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from retrieval.errors import UserError
from retrieval.index.factory import (
    DEFAULT_INDEX_TYPE,
    DEFAULT_MEMORY_BUDGET,
    choose_index_type,
    make_index,
    stdout_to_stderr,
    train,
    training_positions,
)
from retrieval.index.gallery import GalleryIndex, GalleryPart
from retrieval.index.knn import as_faiss, normalize
from retrieval.index.manifest import IVFDATA_FILE, check_metric, new_manifest

logger = logging.getLogger(__name__)

#: Vectors read and added at a time (32 MB of 128-d float32), so a gallery held in
#: memory-mapped parts is never loaded whole.
ADD_BLOCK = 65_536


def build_in_parts(
    cls: type[GalleryIndex],
    parts: Sequence[GalleryPart],
    class_names: Sequence[str],
    metric: str = "cosine",
    model_sha256: str = "",
    model_path: str = "",
    preprocessing: dict | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    seed: int = 0,
    on_disk: str | os.PathLike | None = None,
) -> GalleryIndex:
    """A new index of class ``cls`` holding the parts' vectors, ids ``0 .. n-1`` in order (see
    :meth:`~retrieval.index.gallery.GalleryIndex.build_in_parts` for the arguments)."""
    check_metric(metric)
    n = sum(len(p.xb) for p in parts)
    if n == 0:
        raise UserError("cannot build an index of an empty gallery")
    dims = sorted({p.xb.shape[1] for p in parts if p.xb.ndim == 2})
    if len(dims) != 1 or any(p.xb.ndim != 2 for p in parts):
        raise UserError(f"the parts hold vectors of different shapes (dimensions {dims})")
    for p in parts:
        if not (len(p.xb) == len(p.refs) == len(p.labels)):
            raise ValueError("each part's xb, refs and labels must have the same length")
    dim = dims[0]
    if index_type == "auto":
        index_type = choose_index_type(n, dim, memory_budget)
        logger.info("index type for %d vectors: %s", n, index_type)

    def prepare(x: np.ndarray) -> np.ndarray:
        return normalize(x) if metric == "cosine" else as_faiss(x)

    index = make_index(index_type, dim, metric)
    if not index.is_trained:
        positions = training_positions(n, seed)
        if positions is None:
            sample = np.concatenate([prepare(p.xb[:]) for p in parts])
        else:
            starts = np.cumsum([0] + [len(p.xb) for p in parts])
            sample = np.concatenate(
                [
                    prepare(p.xb[positions[(positions >= a) & (positions < b)] - a])
                    for p, a, b in zip(parts, starts[:-1], starts[1:], strict=True)
                ]
            )
        train(index, sample, seed)
        del sample
    manifest = new_manifest(metric, dim, index_type, model_sha256, model_path, preprocessing)
    out = cls(index, None, class_names, manifest, next_id=0, count=0)
    if on_disk is not None and out.family != "ivf":
        raise UserError(
            f"an on-disk index keeps IVF inverted lists on disk; {index_type} "
            "has none: choose an IVF type, e.g. IVF4096,Flat"
        )
    work = Path(on_disk) if on_disk is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    empty = faiss.clone_index(index) if out.family == "ivf" else None
    part_files: list[str] = []
    for n_part, part in enumerate(parts):
        # the first part goes straight in, unless every part is written out for merge_ondisk
        direct = empty is None or (n_part == 0 and work is None)
        target = out.index if direct else faiss.clone_index(empty)
        for a in range(0, len(part.xb), ADD_BLOCK):
            b = min(a + ADD_BLOCK, len(part.xb))
            hashes = part.sha256[a:b] if part.sha256 is not None else None
            extra = part.fields[a:b] if part.fields is not None else None
            out.add_prepared(
                prepare(part.xb[a:b]),
                part.refs[a:b],
                part.labels[a:b],
                into=target,
                sha256=hashes,
                fields=extra,
            )
        if work is not None:
            part_files.append(str(work / f"part-{n_part:05d}.faiss"))
            faiss.write_index(target, part_files[-1])
            del target
        elif not direct:
            out.index.merge_from(target, 0)  # shared quantizer: lists are appended
            logger.info("merged the inverted lists of %d vectors", target.ntotal)
    if work is not None:
        from faiss.contrib.ondisk import merge_ondisk

        lists = work / IVFDATA_FILE
        lists.unlink(missing_ok=True)
        with stdout_to_stderr():
            merge_ondisk(out.index, part_files, str(lists))  # same order as merge_from
        for name in part_files:
            Path(name).unlink()
        out.lists_file = lists
        logger.info("merged the inverted lists of %d parts into %s", len(parts), lists)
    return out
