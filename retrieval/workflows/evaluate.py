"""Evaluating a model (or raw pixels) on a source with a protocol."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import UserError
from retrieval.workflows._common import ProgressFactory, embed, open_images

if TYPE_CHECKING:  # imported for type hints only: the real imports are in the functions
    from data.datasets import ImageDataset
    from retrieval.evaluation.evaluate import Evaluation

logger = logging.getLogger(__name__)


#: Evaluation protocols (``auto`` picks one: :func:`detect_protocol`).
PROTOCOLS = ("auto", "leave-one-out", "query-gallery", "cross-domain")


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
