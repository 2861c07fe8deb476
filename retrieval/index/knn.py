"""Exact k-nearest-neighbour search: the one used by the index, the evaluation and the reports.

Names and meanings follow faiss ``contrib`` (``exhaustive_search.knn``): queries ``xq``
``(nq, dim)``, gallery ``xb`` ``(nb, dim)``, results ``D, I`` ``(nq, k)`` where ``D`` is what
FAISS itself computes and ranks by:

- ``cosine``: the inner product of the L2-normalised vectors (the cosine similarity; higher is
  closer);
- ``l2``: the *squared* Euclidean distance (lower is closer).

User-facing scores (search results, ``Hit.score``) are converted at the edge:
:func:`user_scores` (cosine similarity, or Euclidean distance for ``l2``).

Ties are broken by gallery position, lower first, whatever the other queries in the batch and
whatever ``k``. FAISS alone does not promise that: its inner-product heap keeps the *highest*
positions among equal scores, and BLAS rounds a score differently depending on where the query
sits in its block, so exact duplicates stop being exact ties from one batch to the next. So
FAISS proposes ``k`` plus a margin of candidates; the scores of candidates within rounding
error of a neighbour are recomputed one pair at a time (an order of operations that depends
only on the two vectors); the candidates are sorted by (score, position); and a query whose
last candidate is within rounding error of its ``k``-th is searched again with a larger margin
(an item beyond the candidates could tie with the ``k``-th).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import faiss
import numpy as np

from retrieval.errors import UserError
from retrieval.index.manifest import check_metric

#: Exact search block: FAISS computes query x gallery similarities in blocks of this many
#: queries x gallery vectors (64 MB of float32). FAISS's default gallery block, 1,024, makes
#: exact batch search about half as fast as one torch matmul + topk; 16,384 makes it faster.
BLAS_QUERY_BLOCK, BLAS_DATABASE_BLOCK = 1024, 16384
#: Extra candidates FAISS proposes beyond ``k``, as a fraction of ``k`` (and at least
#: :data:`MIN_MARGIN`); a query whose candidates all tie past ``k`` is searched again.
MARGIN_FRACTION, MIN_MARGIN = 0.125, 8
#: Scores closer than this many ``sqrt(dim)`` units of float32 rounding are rescored (ties).
ROUNDING_FACTOR = 8
#: Pairs rescored per block of the tie pass (memory: this many vectors of the gallery).
RESCORE_BLOCK = 65_536

_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: tuple[int, int] = (0, 0)


@contextlib.contextmanager
def blas_blocks() -> Iterator[None]:
    """Use the project's FAISS BLAS block sizes for the searches inside the block.

    FAISS keeps them in process-wide variables; they are set when the first of any concurrent
    searches starts and restored when the last one ends, so importing this module changes
    nothing.
    """
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = (
                faiss.cvar.distance_compute_blas_query_bs,
                faiss.cvar.distance_compute_blas_database_bs,
            )
            faiss.cvar.distance_compute_blas_query_bs = BLAS_QUERY_BLOCK
            faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                (
                    faiss.cvar.distance_compute_blas_query_bs,
                    faiss.cvar.distance_compute_blas_database_bs,
                ) = _blas_saved


def as_faiss(x: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, 2-D: what FAISS wants."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return x


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = as_faiss(x).copy()
    faiss.normalize_L2(x)
    return x


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the metric compares them: unit-norm float32 for cosine, float32 for l2."""
    check_metric(metric)
    return normalize(x) if metric == "cosine" else as_faiss(x)


def user_scores(d: np.ndarray, metric: str) -> np.ndarray:
    """``D`` as users see it: the cosine similarity, or the Euclidean distance for ``l2``."""
    return np.sqrt(np.maximum(d, 0)) if metric == "l2" else d


def _pair_scores(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, cols: np.ndarray, metric: str):
    """Score of each pair ``(xq[rows[j]], xb[cols[j]])``, computed the same way for every pair
    (elementwise, then a sum along the contiguous last axis), so equal vectors score equally."""
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), RESCORE_BLOCK):
        q, b = xq[rows[s : s + RESCORE_BLOCK]], xb[cols[s : s + RESCORE_BLOCK]]
        out[s : s + len(q)] = ((q - b) ** 2 if metric == "l2" else q * b).sum(axis=1)
    return out


def _rounding(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """How far apart two FAISS scores of one query may be and still be a tie, ``(nq,)``.

    A float32 dot product of ``dim`` terms is off by about ``sqrt(dim)`` units of rounding of
    its scale (``dim`` at the very worst); :data:`ROUNDING_FACTOR` times that covers every case
    seen, with a margin, without rescoring most candidates of a typical query.
    """
    u = np.finfo(np.float32).eps
    q2 = (xq.astype(np.float64) ** 2).sum(axis=1)
    b2 = float((xb.astype(np.float64) ** 2).sum(axis=1).max()) if len(xb) else 0.0
    scale = q2 + b2 if metric == "l2" else np.sqrt(q2 * b2)
    return (ROUNDING_FACTOR * np.sqrt(xq.shape[1]) * u * scale).astype(np.float32) + np.float32(
        np.finfo(np.float32).tiny
    )


def _search(xq, xb, k, metric, self_index, margin):
    nb = len(xb)
    kk = min(nb, k + 1 + margin)  # +1: a query's own entry, dropped below
    with blas_blocks():
        fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        d, i = faiss.knn(xq, xb, kk, metric=fm)
    sign = np.float32(-1 if metric == "cosine" else 1)
    key = sign * d  # lower is closer
    tol = _rounding(xq, xb, metric)
    near = np.zeros(key.shape, bool)
    close = np.diff(key, axis=1) <= tol[:, None]
    near[:, :-1] |= close
    near[:, 1:] |= close
    rows, cols = np.nonzero(near)
    key[rows, cols] = sign * _pair_scores(xq, xb, rows, i[rows, cols], metric)
    key[i == self_index[:, None]] = np.inf
    order = np.lexsort((i, key), axis=-1)[:, :k]
    i, key = np.take_along_axis(i, order, 1), np.take_along_axis(key, order, 1)
    # an item beyond the candidates scores at least as badly as the last one, up to rounding
    redo = np.flatnonzero((kk < nb) & (sign * d[:, -1] <= key[:, -1] + tol))
    if len(redo):
        d2, i2 = _search(xq[redo], xb, k, metric, self_index[redo], 4 * margin + k)
        key[redo], i[redo] = sign * d2, i2
    return sign * key, i


def knn(
    xq: np.ndarray,
    xb: np.ndarray,
    k: int,
    metric: str = "cosine",
    self_index: np.ndarray | None = None,
    prepared: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest gallery items of each query: ``(D, I)``, each ``(nq, k)``.

    Args:
        xq: queries ``(nq, dim)``; xb: gallery ``(nb, dim)``.
        k: neighbours per query; at most ``nb``, or ``nb - 1`` when queries are in the gallery.
        metric: ``cosine`` (``D``: inner product of unit vectors) or ``l2`` (``D``: squared
            Euclidean distance).
        self_index: gallery position of each query, never returned; ``-1`` when it is not in
            the gallery, ``(nq,)``.
        prepared: ``xq`` and ``xb`` are already :func:`prepare`'d.

    Ties are broken by gallery position, lower first (module docstring). FAISS searches in
    blocks, so no ``nq x nb`` matrix is held.

    Example:
        >>> x = np.array([[0.0], [1.0], [3.0], [1.0]], dtype=np.float32)
        >>> knn(x, x, 2, "l2", self_index=np.arange(4))[1].tolist()
        [[1, 3], [3, 0], [1, 3], [1, 0]]
    """
    if not prepared:
        xq, xb = prepare(xq, metric), prepare(xb, metric)
    else:
        check_metric(metric)
    if xq.shape[1] != xb.shape[1]:
        raise UserError(f"queries have dimension {xq.shape[1]}, the gallery {xb.shape[1]}")
    if self_index is None:
        self_index = np.full(len(xq), -1, dtype=np.int64)
    self_index = np.asarray(self_index, dtype=np.int64)
    extra = int(bool((self_index >= 0).any()))
    if not 1 <= k <= len(xb) - extra:
        raise UserError(f"cannot rank {k} neighbours in a gallery of {len(xb) - extra} items")
    if len(xq) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * k))
    return _search(xq, xb, k, metric, self_index, margin)


def knn_leave_one_out(
    x: np.ndarray, k: int, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each row of ``x`` among the *other* rows: ``(D, I)``, ``D`` as
    in :func:`knn`; ``k`` is capped at ``n - 1``."""
    n = len(x)
    if n < 2:
        raise ValueError("leave-one-out needs at least two items")
    return knn(x, x, min(k, n - 1), metric, self_index=np.arange(n))
