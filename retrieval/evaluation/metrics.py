"""Retrieval metrics from ranked neighbour labels (pure numpy).

Every function takes the labels of the queries ``yq`` (shape ``(nq,)``) and the labels of each
query's ranked neighbours ``nn_labels`` (shape ``(nq, k)``, best first) — or directly the
relevance matrix ``rel = nn_labels == yq[:, None]`` — as produced by a k-NN search from which
each query's own entry was removed (leave-one-out) when the query is also in the gallery.

Conventions, the field's standard (as in pytorch-metric-learning's ``AccuracyCalculator``):

- ``R`` of a query is the number of *other* gallery items of its class.
- Queries with ``R == 0`` (the only item of their class, or a class absent from the gallery)
  have no correct answer and are left out of every retrieval metric; they are counted apart.
- Means are over queries (micro-average); :func:`per_class_means` gives the per-class view.
- Ties in distance are ranked in the order the search returns them — FAISS breaks them by
  gallery position, lower first — with no averaging over tied orders. A metric can therefore
  move when the gallery is reordered and several items sit at exactly the same distance; with
  real-valued embeddings exact ties are rare, with duplicated images they are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The k's reported by default for recall@k, precision@k and MAP@k.
DEFAULT_KS = (1, 2, 4, 8)


def relevance(yq: np.ndarray, nn_labels: np.ndarray) -> np.ndarray:
    """Boolean ``(nq, k)``: whether each ranked neighbour has the query's label.

    Example:
        >>> relevance(np.array([0, 1]), np.array([[1, 0], [1, 1]])).tolist()
        [[False, True], [True, True]]
    """
    return np.asarray(nn_labels) == np.asarray(yq)[:, None]


def first_hit_rank(rel: np.ndarray) -> np.ndarray:
    """1-based rank of each query's first correct neighbour; 0 when none is in the list.

    Example:
        >>> first_hit_rank(np.array([[False, True], [False, False]])).tolist()
        [2, 0]
    """
    rel = np.asarray(rel, dtype=bool)
    if rel.shape[1] == 0:
        return np.zeros(len(rel), dtype=np.int64)
    return np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, 0).astype(np.int64)


def _check_k(k: int, depth: int) -> None:
    if k < 1 or k > depth:
        raise ValueError(f"k must be in 1..{depth}, got {k}")


def _cum_precision(rel: np.ndarray, depth: int) -> np.ndarray:
    """``P(j)``, precision at every rank ``j <= depth``: ``(nq, depth)`` float64."""
    return np.cumsum(rel[:, :depth], axis=1, dtype=np.float64) / np.arange(1, depth + 1)


def per_query_scores(
    rel: np.ndarray, r: np.ndarray, ks: Sequence[int], first_rank: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    r"""Every retrieval metric of every query, float64 arrays of shape ``(nq,)``.

    With :math:`\mathrm{rel}_i(j)` the relevance of query :math:`i`'s rank-:math:`j` neighbour,
    :math:`P_i(j) = \frac{1}{j}\sum_{l \le j} \mathrm{rel}_i(l)` and :math:`R_i` its number of
    relevant gallery items:

    .. math::
        \mathrm{recall@}k_i &= \mathbb{1}\left[\exists\, j \le k : \mathrm{rel}_i(j)\right] \\
        \mathrm{precision@}k_i &= P_i(k) \\
        \mathrm{AP@}k_i &= \frac{1}{\min(R_i, k)} \sum_{j=1}^{k} P_i(j)\,\mathrm{rel}_i(j) \\
        \mathrm{AP@R}_i &= \frac{1}{R_i} \sum_{j=1}^{R_i} P_i(j)\,\mathrm{rel}_i(j) \\
        \mathrm{RP}_i &= P_i(R_i) \\
        \mathrm{RR}_i &= 1 / \mathrm{rank\ of\ the\ first\ relevant\ item}

    Keys: ``recall@k``, ``precision@k``, ``map@k`` for each ``k``; ``map@r``, ``r_precision``,
    ``mrr``. ``map@k`` divides by :math:`\min(R_i, k)` so that a perfect ranking scores 1;
    pytorch-metric-learning's ``mean_average_precision`` divides by :math:`R_i` instead (the
    two agree when :math:`k \ge R_i`).

    Args:
        rel: relevance of the ranked neighbours, ``(nq, depth)`` with ``depth >= max(ks)`` and
            ``depth >= max(r)``.
        r: ``R`` of each query, ``(nq,)``, all >= 1.
        ks: the cut-offs of recall, precision and MAP.
        first_rank: exact rank of each query's first relevant item over the *whole* gallery
            (1-based). Default: read from ``rel``; a query with no relevant item in ``rel``
            then gets a reciprocal rank of 0 (MRR truncated at ``depth``).

    References:
        Musgrave, Belongie, Lim. "A Metric Learning Reality Check". ECCV 2020 (MAP@R, RP).

    Relations:
        recall@1 = precision@1 = MAP@1 (pytorch-metric-learning's ``precision_at_1``).

    Example:
        >>> s = per_query_scores(np.array([[True, False, True]]), np.array([2]), ks=(1, 3))
        >>> {k: round(float(v[0]), 3) for k, v in s.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'recall@1': 1.0, 'precision@1': 1.0, 'map@1': 1.0, 'recall@3': 1.0,
         'precision@3': 0.667, 'map@3': 0.833, 'map@r': 0.5, 'r_precision': 0.5, 'mrr': 1.0}
    """
    rel = np.asarray(rel, dtype=bool)
    r = np.asarray(r, dtype=np.int64)
    if len(r) and r.min() < 1:
        raise ValueError("every query needs at least one relevant item (R >= 1)")
    depth = rel.shape[1]
    kmax = max([*ks, int(r.max()) if len(r) else 0])
    if depth < kmax:
        raise ValueError(f"need {kmax} ranked neighbours per query, got {depth}")
    cum = _cum_precision(rel, kmax)  # (nq, kmax)
    hits = np.cumsum(rel[:, :kmax], axis=1)  # (nq, kmax)
    prec_rel = cum * rel[:, :kmax]  # P(j) rel(j)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        _check_k(k, depth)
        out[f"recall@{k}"] = (hits[:, k - 1] > 0).astype(np.float64)
        out[f"precision@{k}"] = cum[:, k - 1].copy()
        out[f"map@{k}"] = prec_rel[:, :k].sum(axis=1) / np.minimum(r, k)
    within_r = np.arange(kmax)[None, :] < r[:, None]  # only the first R ranks count
    out["map@r"] = (prec_rel * within_r).sum(axis=1) / r
    out["r_precision"] = hits[np.arange(len(r)), r - 1] / r if len(r) else np.zeros(0)
    if first_rank is None:
        first_rank = first_hit_rank(rel)
    first_rank = np.asarray(first_rank)
    out["mrr"] = np.where(first_rank > 0, 1.0 / np.maximum(first_rank, 1), 0.0)
    return out


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
    _check_k(k, nn_labels.shape[1])
    return float(relevance(yq, nn_labels)[:, :k].any(axis=1).mean())


def precision_at_k(yq: np.ndarray, nn_labels: np.ndarray, k: int) -> float:
    r"""Mean fraction of correct items among the top ``k`` neighbours.

    .. math::
        \mathrm{P@}k = \frac{1}{n_q} \sum_{i=1}^{n_q} \frac{1}{k}
            \sum_{j=1}^{k} \mathbb{1}\left[y_{\pi_i(j)} = y_i\right]

    The denominator is ``k`` even when a query has fewer than ``k`` relevant items.

    Example:
        >>> precision_at_k(np.array([0, 1]), np.array([[0, 0], [0, 1]]), 2)
        0.75
    """
    _check_k(k, nn_labels.shape[1])
    return float(relevance(yq, nn_labels)[:, :k].mean())


def map_at_k(yq: np.ndarray, nn_labels: np.ndarray, r: np.ndarray, k: int) -> float:
    r"""Mean average precision at ``k``, normalised by :math:`\min(R_i, k)`.

    .. math::
        \mathrm{MAP@}k = \frac{1}{n_q} \sum_{i=1}^{n_q} \frac{1}{\min(R_i, k)}
            \sum_{j=1}^{k} P_i(j)\, \mathrm{rel}_i(j)

    Example:
        >>> map_at_k(np.array([0]), np.array([[1, 0, 0]]), np.array([5]), 2)
        0.25
    """
    _check_k(k, nn_labels.shape[1])
    rel = relevance(yq, nn_labels)[:, :k]
    return float(per_query_scores(rel, np.minimum(r, k), (k,))[f"map@{k}"].mean())


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
    rel = relevance(yq, nn_labels)[:, :kmax]
    return float(per_query_scores(rel, r, ())["map@r"].mean())


def r_precision(yq: np.ndarray, nn_labels: np.ndarray, r: np.ndarray) -> float:
    r"""Mean R-precision: the fraction of relevant items among the first ``R`` neighbours.

    .. math::
        \mathrm{RP} = \frac{1}{n_q} \sum_{i=1}^{n_q} \frac{1}{R_i}
            \sum_{j=1}^{R_i} \mathrm{rel}_i(j)

    Example:
        >>> r_precision(np.array([0]), np.array([[0, 1, 0]]), np.array([2]))
        0.5
    """
    r = np.asarray(r)
    rel = relevance(yq, nn_labels)
    return float(per_query_scores(rel, r, ())["r_precision"].mean())


def mean_reciprocal_rank(first_rank: np.ndarray) -> float:
    r"""Mean of :math:`1 / \mathrm{rank}` of each query's first relevant item (0 if none found).

    .. math::
        \mathrm{MRR} = \frac{1}{n_q} \sum_{i=1}^{n_q} \frac{1}{\mathrm{rank}_i}

    Args:
        first_rank: 1-based ranks, ``(nq,)``; 0 means no relevant item was found.

    Example:
        >>> mean_reciprocal_rank(np.array([1, 2, 0, 4]))
        0.4375
    """
    first_rank = np.asarray(first_rank)
    return float(np.where(first_rank > 0, 1.0 / np.maximum(first_rank, 1), 0.0).mean())


def recall_curve(first_rank: np.ndarray, ks: Sequence[int]) -> list[float]:
    """Recall@k for every ``k`` from the exact first-hit ranks: ``P(rank <= k)``.

    Example:
        >>> recall_curve(np.array([1, 3, 2, 9]), [1, 2, 4])
        [0.25, 0.5, 0.75]
    """
    first_rank = np.asarray(first_rank)
    found = first_rank[first_rank > 0]
    counts = np.searchsorted(np.sort(found), np.asarray(ks), side="right")
    return [float(c) / len(first_rank) for c in counts]


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    r"""NMI and AMI between class labels and cluster assignments (scikit-learn).

    .. math::
        \mathrm{NMI} = \frac{I(Y; C)}{\tfrac12\,[H(Y) + H(C)]}, \qquad
        \mathrm{AMI} = \frac{I(Y; C) - \mathbb{E}[I]}{\tfrac12\,[H(Y) + H(C)] - \mathbb{E}[I]}

    AMI corrects NMI for chance: random clusters score about 0 in AMI but more than 0 in NMI.

    Example:
        >>> clustering_scores(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7]))
        {'nmi': 1.0, 'ami': 1.0}
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
    }


def mean_scores(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of each per-query score (micro-average over queries)."""
    return {name: float(v.mean()) for name, v in scores.items()}


def per_class_means(
    labels: np.ndarray, scores: dict[str, np.ndarray], class_names: Sequence[str] | None = None
) -> list[dict]:
    """One row per class: ``{"label", "class", "queries", <each score's mean>}``.

    Example:
        >>> per_class_means(np.array([0, 0, 1]), {"mrr": np.array([1.0, 0.5, 0.25])}, ["a", "b"])
        [{'label': 0, 'class': 'a', 'queries': 2, 'mrr': 0.75}, {'label': 1, 'class': 'b', \
'queries': 1, 'mrr': 0.25}]
    """
    labels = np.asarray(labels)
    rows = []
    for label in np.unique(labels):
        mask = labels == label
        name = class_names[int(label)] if class_names is not None else str(int(label))
        row = {"label": int(label), "class": name, "queries": int(mask.sum())}
        row.update({key: float(v[mask].mean()) for key, v in scores.items()})
        rows.append(row)
    return rows


def relevant_counts(yq: np.ndarray, yb: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """``R`` of each query: gallery items with its label, minus itself when leave-one-out.

    Example:
        >>> relevant_counts(np.array([0, 2]), np.array([0, 0, 1]), leave_one_out=False).tolist()
        [2, 0]
    """
    labels, counts = np.unique(yb, return_counts=True)
    pos = np.searchsorted(labels, yq)
    pos = np.clip(pos, 0, max(len(labels) - 1, 0))
    found = (labels[pos] == yq) if len(labels) else np.zeros(len(yq), dtype=bool)
    r = np.where(found, counts[pos] if len(labels) else 0, 0).astype(np.int64)
    return r - 1 if leave_one_out else r


def summarize(
    yq: np.ndarray, nn_labels: np.ndarray, r: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Every retrieval metric of :func:`per_query_scores`, over the queries with ``R >= 1``.

    Returns a dict ``{"recall@1": ..., ..., "map@r": ..., "r_precision": ..., "mrr": ...,
    "queries": n}``; the MRR is truncated at the depth of ``nn_labels``.
    """
    keep = r >= 1
    if not keep.any():
        raise ValueError("no query has a relevant item in the gallery; nothing to evaluate")
    rel = relevance(yq[keep], nn_labels[keep])
    out: dict = mean_scores(per_query_scores(rel, r[keep], ks))
    out["queries"] = int(keep.sum())
    return out
