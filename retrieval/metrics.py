"""Retrieval metrics from ranked neighbour labels (pure numpy).

Every function takes the labels of the queries ``yq`` (shape ``(nq,)``) and the labels of each
query's ranked neighbours ``nn_labels`` (shape ``(nq, k)``, best first), as produced by a k-NN
search from which each query's own entry was removed (leave-one-out).

Conventions, the field's standard (as in pytorch-metric-learning's ``AccuracyCalculator``):

- ``R`` of a query is the number of *other* gallery items of its class.
- Queries with ``R == 0`` (the only item of their class) have no correct answer and are left
  out of every metric.
- Ties in distance are ranked in the order the search returns them (FAISS: lower gallery
  position first); no averaging over tied orders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The k's reported by default for recall@k.
DEFAULT_KS = (1, 2, 4, 8)


def recall_at_k(yq: np.ndarray, nn_labels: np.ndarray, k: int) -> float:
    r"""Fraction of queries with at least one correct item among their top ``k`` neighbours.

    .. math::
        \mathrm{R@}k = \frac{1}{n_q} \sum_{i=1}^{n_q}
            \mathbb{1}\left[\exists\, j \le k : y_{\pi_i(j)} = y_i\right]

    This is the metric-learning recall@k (a hit rate), not the information-retrieval recall.

    Args:
        yq: query labels, shape ``(nq,)``.
        nn_labels: ranked neighbour labels, shape ``(nq, >= k)``.
        k: how many neighbours count.

    Example:
        >>> recall_at_k(np.array([0, 1]), np.array([[1, 0], [0, 0]]), 2)
        0.5
    """
    if k < 1 or k > nn_labels.shape[1]:
        raise ValueError(f"k must be in 1..{nn_labels.shape[1]}, got {k}")
    hits = (nn_labels[:, :k] == yq[:, None]).any(axis=1)
    return float(hits.mean())


def map_at_r(yq: np.ndarray, nn_labels: np.ndarray, r: np.ndarray) -> float:
    r"""Mean average precision at R (Musgrave et al., 2020).

    For a query with ``R`` relevant items, precision is averaged over the first ``R`` ranks,
    counting only the ranks that hold a relevant item:

    .. math::
        \mathrm{MAP@R} = \frac{1}{n_q} \sum_{i=1}^{n_q} \frac{1}{R_i}
            \sum_{j=1}^{R_i} P_i(j)\, \mathrm{rel}_i(j)

    Args:
        yq: query labels, shape ``(nq,)``.
        nn_labels: ranked neighbour labels, shape ``(nq, >= max(r))``.
        r: number of relevant items of each query, shape ``(nq,)``, all >= 1.

    References:
        Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020.

    Example:
        >>> map_at_r(np.array([0]), np.array([[0, 1, 0]]), np.array([2]))
        0.5
    """
    r = np.asarray(r)
    if r.min() < 1:
        raise ValueError("every query needs at least one relevant item (R >= 1)")
    kmax = int(r.max())
    if nn_labels.shape[1] < kmax:
        raise ValueError(f"need {kmax} neighbours per query for MAP@R, got {nn_labels.shape[1]}")
    rel = nn_labels[:, :kmax] == yq[:, None]  # (nq, kmax)
    rel &= np.arange(kmax)[None, :] < r[:, None]  # only the first R ranks count
    precision = np.cumsum(rel, axis=1) / np.arange(1, kmax + 1)[None, :]
    return float(np.mean((precision * rel).sum(axis=1) / r))


def relevant_counts(yq: np.ndarray, yb: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """``R`` of each query: gallery items with its label, minus itself when leave-one-out."""
    labels, counts = np.unique(yb, return_counts=True)
    lookup = dict(zip(labels.tolist(), counts.tolist(), strict=True))
    r = np.array([lookup.get(int(y), 0) for y in yq], dtype=np.int64)
    return r - 1 if leave_one_out else r


def summarize(
    yq: np.ndarray, nn_labels: np.ndarray, r: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@k for each ``k`` and MAP@R, over the queries with ``R >= 1``.

    Returns a dict ``{"recall@1": ..., ..., "map@r": ..., "queries": n}``.
    """
    keep = r >= 1
    if not keep.any():
        raise ValueError("no query has a relevant item in the gallery; nothing to evaluate")
    yq, nn_labels, r = yq[keep], nn_labels[keep], r[keep]
    out = {f"recall@{k}": recall_at_k(yq, nn_labels, k) for k in ks}
    out["map@r"] = map_at_r(yq, nn_labels, r)
    out["queries"] = int(keep.sum())
    return out
