"""Retrieval evaluation of embeddings: exact top-k searches in blocks, then the metrics.

Three protocols share one function, :func:`evaluate`:

- **leave-one-out** (``xb=None``): every item queries all the others;
- **query/gallery split** of one set (CSV columns ``is_query``, ``is_gallery``, see
  :func:`read_query_gallery_flags` and :func:`split_query_gallery`): an item that is both a
  query and a gallery item never retrieves itself (``self_index``);
- **cross-domain**: queries from one set, gallery from another (photos against drawings),
  labels matched by class name (:func:`align_labels`).

Scale: queries are searched in blocks of :data:`DEFAULT_BLOCK` against the whole gallery, to a
depth ``K = max(max(ks), largest R)`` — the largest class, the least MAP@R needs to be exact.
Each block's metrics are computed and its neighbour lists dropped, so memory is
``O(block * K)`` plus ``O(nq)`` per-query scores; no ``nq x nb`` matrix ever exists. The rare
queries with no relevant item within ``K`` get their exact first-hit rank from a second,
blocked pass (so MRR and the recall curve are exact, not truncated at ``K``).

Neighbours come from the project's one exact search, :func:`retrieval.index.knn.knn`. Ties:
equal scores are ranked by gallery position, lower first, whatever the batch and the depth;
see :mod:`retrieval.evaluation.metrics`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torchvision.transforms import v2

from data.datasets import ImageDataset
from retrieval.errors import UserError
from retrieval.evaluation.metrics import (
    DEFAULT_KS,
    clustering_scores,
    first_hit_rank,
    mean_scores,
    per_class_means,
    per_query_scores,
    recall_curve,
    relevant_counts,
)
from retrieval.index.knn import as_faiss, knn, prepare

logger = logging.getLogger(__name__)

#: Queries per FAISS search block: memory is ``DEFAULT_BLOCK * K * 12`` bytes.
DEFAULT_BLOCK = 4096
#: Queries x gallery items per block of the exact first-hit pass (a 8 MB score block).
RANK_QUERIES, RANK_BLOCK = 256, 8192
#: k-means settings, the same as pytorch-metric-learning's ``FaissKMeans`` default.
KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
#: Points of the recall@k curve (log-spaced k's, plus the requested ones).
CURVE_POINTS = 40
#: Truthy and falsy spellings of the CSV ``is_query`` / ``is_gallery`` columns.
TRUE_WORDS = frozenset({"1", "true", "yes", "y", "t"})
FALSE_WORDS = frozenset({"0", "false", "no", "n", "f", ""})


@dataclass
class Evaluation:
    """The outcome of :func:`evaluate`.

    Attributes:
        metrics: flat ``{name: value}``: ``recall@k``, ``precision@k``, ``map@k`` per ``k``,
            ``map@r``, ``r_precision``, ``mrr``, ``nmi``, ``ami`` (when clustered), and the
            counts ``queries`` (evaluated), ``skipped_queries`` (``R == 0``), ``gallery``,
            ``depth`` (the search ``K``).
        per_query: each retrieval metric per evaluated query, ``(n_eval,)`` arrays.
        query_index: positions in ``xq`` of the evaluated queries, ``(n_eval,)``.
        first_rank: exact rank of each evaluated query's first relevant item, ``(n_eval,)``.
        per_class: :func:`retrieval.evaluation.metrics.per_class_means` rows.
        curve: ``{"k": [...], "recall": [...]}``, the recall@k curve.
        ks: the requested cut-offs.
        metric: ``cosine`` or ``l2``.
        self_index: gallery position of each query (``-1`` if not in the gallery), ``(nq,)``.
    """

    metrics: dict
    per_query: dict[str, np.ndarray]
    query_index: np.ndarray
    first_rank: np.ndarray
    per_class: list[dict]
    curve: dict
    ks: tuple[int, ...]
    metric: str
    self_index: np.ndarray


def _exact_first_rank(
    xq: np.ndarray,
    yq: np.ndarray,
    self_index: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    metric: str,
    depth: int,
) -> np.ndarray:
    """Rank of each query's first relevant gallery item over the whole gallery (blocked).

    Two passes over gallery blocks: the best relevant score (lowest position on ties), then
    the number of items ranked before it. Used only for queries with no hit within ``depth``.
    """
    if len(xq) > RANK_QUERIES:
        return np.concatenate(
            [
                _exact_first_rank(
                    xq[s : s + RANK_QUERIES],
                    yq[s : s + RANK_QUERIES],
                    self_index[s : s + RANK_QUERIES],
                    xb,
                    yb,
                    metric,
                    depth,
                )
                for s in range(0, len(xq), RANK_QUERIES)
            ]
        )
    nq = len(xq)
    best = np.full(nq, -np.inf, dtype=np.float32)
    best_pos = np.full(nq, len(xb), dtype=np.int64)
    sq_q = (xq**2).sum(axis=1) if metric == "l2" else None

    def scores(start: int, stop: int) -> np.ndarray:  # higher is closer, (nq, block)
        s = xq @ xb[start:stop].T
        if metric == "l2":
            s = 2 * s - sq_q[:, None] - (xb[start:stop] ** 2).sum(axis=1)[None, :]
        return s

    for start in range(0, len(xb), RANK_BLOCK):
        stop = min(start + RANK_BLOCK, len(xb))
        pos = np.arange(start, stop)
        s = scores(start, stop)
        relevant = (yb[start:stop][None, :] == yq[:, None]) & (pos[None, :] != self_index[:, None])
        s_rel = np.where(relevant, s, -np.inf)
        j = s_rel.argmax(axis=1)
        m = s_rel[np.arange(nq), j]
        better = m > best
        best[better], best_pos[better] = m[better], start + j[better]
    before = np.zeros(nq, dtype=np.int64)
    for start in range(0, len(xb), RANK_BLOCK):
        stop = min(start + RANK_BLOCK, len(xb))
        pos = np.arange(start, stop)
        s = scores(start, stop)
        ahead = (s > best[:, None]) | ((s == best[:, None]) & (pos[None, :] < best_pos[:, None]))
        ahead &= pos[None, :] != self_index[:, None]
        before += ahead.sum(axis=1)
    return np.maximum(before + 1, depth + 1)


def kmeans_clusters(x: np.ndarray, n_clusters: int, seed: int = KMEANS_SEED) -> np.ndarray:
    """k-means cluster of each row (FAISS, :data:`KMEANS_ITERATIONS` iterations): ``(n,)``.

    The same call as pytorch-metric-learning's default ``FaissKMeans``, so both give the same
    clusters for the same vectors. FAISS trains on at most 256 points per centroid.
    """
    x = as_faiss(x)
    # min_points_per_centroid only silences FAISS's "too few points" warning; same clusters.
    km = faiss.Kmeans(
        x.shape[1], n_clusters, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.ravel()


def _curve_ks(ks: Sequence[int], limit: int) -> list[int]:
    grid = np.unique(np.geomspace(1, max(limit, 1), CURVE_POINTS).round().astype(int))
    return sorted({*grid.tolist(), *[k for k in ks if k <= limit]})


def evaluate(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray | None = None,
    yb: np.ndarray | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "cosine",
    self_index: np.ndarray | None = None,
    clustering: bool = True,
    class_names: Sequence[str] | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> Evaluation:
    """Every retrieval metric, per query, per class and overall, from blocked FAISS searches.

    Args:
        xq: query embeddings ``(nq, dim)``; yq: their labels ``(nq,)`` (ints).
        xb: gallery embeddings ``(nb, dim)``; ``None`` = leave-one-out on ``xq``.
        yb: gallery labels ``(nb,)``.
        ks: cut-offs of recall@k, precision@k and MAP@k.
        metric: ``cosine`` or ``l2``.
        self_index: gallery position of each query (``-1`` if not in the gallery), so that a
            query never retrieves itself; set automatically for leave-one-out.
        clustering: also k-means the queries into as many clusters as they have classes and
            report NMI and AMI (all queries, including those with ``R == 0``).
        class_names: names of the label values, for the per-class rows.
        block_size: queries per search block.

    Raises:
        UserError: shapes disagree, ``k`` exceeds the gallery, or no query has a relevant item.
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise UserError(f"k's must be positive whole numbers, got {ks}")
    yq = np.asarray(yq, dtype=np.int64)
    if xb is None:
        xb, yb = xq, yq
        self_index = np.arange(len(xq))
    if yb is None:
        raise UserError("a gallery needs its labels (yb)")
    yb = np.asarray(yb, dtype=np.int64)
    if len(xq) != len(yq) or len(xb) != len(yb):
        raise UserError(
            f"{len(xq)} query embeddings for {len(yq)} labels, "
            f"{len(xb)} gallery embeddings for {len(yb)} labels"
        )
    if self_index is None:
        self_index = np.full(len(xq), -1, dtype=np.int64)
    self_index = np.asarray(self_index, dtype=np.int64)
    if len(self_index) != len(xq):
        raise UserError(f"self_index has {len(self_index)} entries for {len(xq)} queries")
    in_gallery = self_index >= 0
    if in_gallery.any() and not (yb[self_index[in_gallery]] == yq[in_gallery]).all():
        raise UserError("self_index points some queries at gallery items of another label")

    xq_f = prepare(xq, metric)
    xb_f = xq_f if xb is xq else prepare(xb, metric)
    if xq_f.shape[1] != xb_f.shape[1]:
        raise UserError(f"queries have dimension {xq_f.shape[1]}, the gallery {xb_f.shape[1]}")
    r = relevant_counts(yq, yb, leave_one_out=False) - in_gallery
    evaluated = np.flatnonzero(r >= 1)
    if len(evaluated) == 0:
        raise UserError("no query has a relevant item in the gallery; nothing to evaluate")
    nb_eff = len(xb_f) - int(in_gallery.any())
    if ks[-1] > nb_eff:
        raise UserError(f"recall@{ks[-1]} needs more than {nb_eff} gallery items")
    depth = max(ks[-1], int(r[evaluated].max()))
    logger.info(
        "evaluating %d queries against %d items, depth %d", len(evaluated), len(xb_f), depth
    )

    parts: list[dict[str, np.ndarray]] = []
    first_rank = np.zeros(len(evaluated), dtype=np.int64)
    for start in range(0, len(evaluated), block_size):
        q = evaluated[start : start + block_size]
        _, idx = knn(xq_f[q], xb_f, depth, metric, self_index[q], prepared=True)
        rel = yb[idx] == yq[q, None]  # (block, depth)
        first = first_hit_rank(rel)
        missing = np.flatnonzero(first == 0)
        if len(missing):
            first[missing] = _exact_first_rank(
                xq_f[q[missing]], yq[q[missing]], self_index[q[missing]], xb_f, yb, metric, depth
            )
        first_rank[start : start + len(q)] = first
        parts.append(per_query_scores(rel, r[q], ks, first))
    per_query = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    metrics: dict = mean_scores(per_query)
    if clustering:
        n_classes = len(np.unique(yq))
        if n_classes >= 2 and len(xq_f) > n_classes:
            metrics.update(clustering_scores(yq, kmeans_clusters(xq_f, n_classes)))
        else:
            logger.warning("NMI/AMI skipped: need at least 2 classes and more queries than classes")
    metrics.update(
        queries=len(evaluated),
        skipped_queries=int(len(xq) - len(evaluated)),
        gallery=int(len(xb_f)),
        depth=int(depth),
    )
    curve_k = _curve_ks(ks, nb_eff)
    return Evaluation(
        metrics=metrics,
        per_query=per_query,
        query_index=evaluated,
        first_rank=first_rank,
        per_class=per_class_means(yq[evaluated], per_query, class_names),
        curve={"k": curve_k, "recall": recall_curve(first_rank, curve_k)},
        ks=ks,
        metric=metric,
        self_index=self_index,
    )


def evaluate_embeddings(
    x: np.ndarray, y: np.ndarray, ks: Sequence[int] = DEFAULT_KS, metric: str = "cosine"
) -> dict[str, float]:
    """Leave-one-out retrieval metrics: every item queries all the others (no clustering).

    Args:
        x: embeddings, shape ``(n, dim)``.
        y: labels, shape ``(n,)``.
        ks: the k's of recall@k, precision@k and MAP@k.
        metric: ``cosine`` or ``l2``.

    Returns:
        ``{"recall@k": ..., "map@r": ..., "queries": n, ...}``, see :func:`evaluate`.
    """
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    return evaluate(x, y, ks=ks, metric=metric, clustering=False).metrics


# ------------------------------------------------------------------------------- protocols


def _flag(value: str, column: str, line: int, path: Path) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UserError(f"{path}, line {line}: {column} must be 1/0 (or true/false), got {value!r}")


def read_query_gallery_flags(
    csv_path: str | os.PathLike, split: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``is_query`` and ``is_gallery`` columns of a CSV manifest, as two bool arrays.

    Rows are in file order after the ``split`` filter — the order of
    :func:`data.datasets.load_csv`. Values: ``1/0``, ``true/false``, ``yes/no``; empty = no.

    Raises:
        UserError: the file lacks either column or holds another value.
    """
    path = Path(csv_path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
        fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in ("is_query", "is_gallery") if c not in fields]
    if missing:
        raise UserError(
            f"{path} has no column {', '.join(missing)}; the query/gallery protocol needs "
            "columns is_query and is_gallery (1 or 0 per row)"
        )
    if split is not None:
        rows = [row for row in rows if row.get("split", "").strip() == split]
    is_q = np.array([_flag(r["is_query"], "is_query", n, path) for n, r in enumerate(rows, 2)])
    is_g = np.array([_flag(r["is_gallery"], "is_gallery", n, path) for n, r in enumerate(rows, 2)])
    return is_q.astype(bool), is_g.astype(bool)


def split_query_gallery(
    is_query: np.ndarray, is_gallery: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the queries and of the gallery, and each query's ``self_index``.

    Example:
        >>> q, g, s = split_query_gallery(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool))
        >>> q.tolist(), g.tolist(), s.tolist()
        ([0, 1], [1, 2], [-1, 0])
    """
    queries, gallery = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    if len(queries) == 0 or len(gallery) == 0:
        raise UserError(
            f"the query/gallery split has {len(queries)} queries and {len(gallery)} gallery "
            "items; it needs at least one of each"
        )
    where = np.full(len(is_gallery), -1, dtype=np.int64)
    where[gallery] = np.arange(len(gallery))
    return queries, gallery, where[queries]


def align_labels(
    yq: np.ndarray, names_q: Sequence[str], yb: np.ndarray, names_b: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Relabel two sets onto one list of class names (cross-domain): ``(yq, yb, names)``.

    Classes are matched by name; a query class absent from the gallery has no relevant item.

    Example:
        >>> align_labels(np.array([0, 1]), ["cat", "dog"], np.array([0, 1]), ["dog", "cow"])
        (array([0, 1]), array([1, 2]), ['cat', 'dog', 'cow'])
    """
    names = list(names_q) + [n for n in names_b if n not in set(names_q)]
    pos = {n: i for i, n in enumerate(names)}
    map_q = np.array([pos[n] for n in names_q], dtype=np.int64)
    map_b = np.array([pos[n] for n in names_b], dtype=np.int64)
    if not set(names_q) & set(names_b):
        raise UserError("the query and gallery sets share no class name; nothing can match")
    return map_q[np.asarray(yq)], map_b[np.asarray(yb)], names


def pixel_vectors(ds: ImageDataset, size: int = 28) -> np.ndarray:
    """Raw pixels as vectors, the baseline every model must beat: ``(n, 3 * size * size)``.

    Images are resized (shorter side) and centre-cropped to ``size`` pixels.
    """
    resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    rows = []
    for i in range(len(ds)):
        img = ds.image(i)
        if img.shape[1:] != (size, size):
            img = resize(img)
        rows.append(img.flatten())
    return torch.stack(rows).float().numpy()
