"""Retrieval metrics against a brute-force numpy computation written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation.evaluate import evaluate, evaluate_embeddings, split_query_gallery
from retrieval.evaluation.metrics import (
    first_hit_rank,
    map_at_k,
    map_at_r,
    mean_reciprocal_rank,
    per_class_means,
    per_query_scores,
    precision_at_k,
    r_precision,
    recall_at_k,
    recall_curve,
    relevance,
    relevant_counts,
    summarize,
)
from retrieval.index.gallery import knn_leave_one_out


def brute_force(
    x: np.ndarray, y: np.ndarray, ks, metric: str = "cosine", xb=None, yb=None, self_index=None
) -> dict:
    """Full distance matrix, stable sort, per-query loops: the definitions, nothing clever.

    Leave-one-out when ``xb`` is None; otherwise queries ``x`` against gallery ``xb``, a query
    skipping gallery item ``self_index[q]`` (its own entry).
    """
    if xb is None:
        xb, yb, self_index = x, y, np.arange(len(x))
    if self_index is None:
        self_index = np.full(len(x), -1)
    x, xb = x.astype(np.float64), xb.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        dist = -(x @ xb.T)
    else:
        dist = ((x[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    rows: dict[str, list] = {}
    for q in range(len(x)):
        others = [j for j in np.argsort(dist[q], kind="stable") if j != self_index[q]]
        rel = [bool(yb[j] == y[q]) for j in others]
        r = sum(rel)
        if r == 0:
            continue  # no correct answer exists: left out
        prec = [sum(rel[: j + 1]) / (j + 1) for j in range(len(rel))]
        for k in ks:
            rows.setdefault(f"recall@{k}", []).append(any(rel[:k]))
            rows.setdefault(f"precision@{k}", []).append(sum(rel[:k]) / k)
            ap_k = sum(prec[j] for j in range(k) if rel[j]) / min(r, k)
            rows.setdefault(f"map@{k}", []).append(ap_k)
        rows.setdefault("map@r", []).append(sum(prec[j] for j in range(r) if rel[j]) / r)
        rows.setdefault("r_precision", []).append(sum(rel[:r]) / r)
        rows.setdefault("mrr", []).append(1 / (rel.index(True) + 1))
    res = {key: float(np.mean(v)) for key, v in rows.items()}
    res["queries"] = len(rows["mrr"])
    return res


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_matches_brute_force(metric, seed):
    rng = np.random.default_rng(seed)
    n, dim = 300, 8
    y = rng.integers(0, 12, size=n)
    y[:3] = [100, 101, 102]  # classes of size one: no relevant item, must be left out
    centers = rng.normal(size=(200, dim))
    x = centers[y % 200] * 0.8 + rng.normal(size=(n, dim))
    ks = (1, 2, 4, 8, 16)
    got = evaluate_embeddings(x.astype(np.float32), y, ks, metric)
    want = brute_force(x, y, ks, metric)
    assert got["queries"] == want["queries"] == n - 3
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_brute_force_with_ties_and_singletons(seed):
    # Integer coordinates: exact float32 distances, so FAISS and the stable sort see the same
    # ties; tiny classes make many first hits fall beyond the search depth (exact MRR).
    rng = np.random.default_rng(seed)
    n = 150
    y = rng.integers(0, 40, size=n)
    y[:4] = [100, 101, 102, 103]  # classes of size one
    x = rng.integers(0, 4, size=(n, 2)).astype(np.float32)
    ks = (1, 3, 5)
    got = evaluate(x, y, ks=ks, metric="l2", clustering=False).metrics
    want = brute_force(x, y, ks, "l2")
    assert got["skipped_queries"] == n - want["queries"] >= 4
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_query_gallery_split_matches_brute_force(metric):
    rng = np.random.default_rng(5)
    n = 200
    y = rng.integers(0, 10, size=n)
    x = (rng.normal(size=(10, 6))[y] + rng.normal(size=(n, 6))).astype(np.float32)
    q, g, self_index = split_query_gallery(np.arange(n) % 3 == 0, np.arange(n) % 2 == 0)
    ks = (1, 2, 10)
    got = evaluate(
        x[q], y[q], x[g], y[g], ks=ks, metric=metric, self_index=self_index, clustering=False
    ).metrics
    want = brute_force(x[q], y[q], ks, metric, x[g], y[g], self_index)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_metric_functions_by_hand():
    yq = np.array([0, 1])
    nn = np.array([[0, 1, 0], [0, 0, 1]])
    r = np.array([2, 1])
    assert precision_at_k(yq, nn, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert map_at_k(yq, nn, r, 3) == pytest.approx(((1 + 2 / 3) / 2 + (1 / 3) / 1) / 2)
    assert r_precision(yq, nn, r) == pytest.approx((1 / 2 + 0) / 2)
    assert mean_reciprocal_rank(first_hit_rank(relevance(yq, nn))) == pytest.approx((1 + 1 / 3) / 2)
    scores = per_query_scores(relevance(yq, nn), r, (1,))
    rows = per_class_means(yq, scores, ["a", "b"])
    assert [row["recall@1"] for row in rows] == [1.0, 0.0]
    assert recall_curve(np.array([1, 0, 3]), [1, 3, 10]) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="R >= 1"):
        per_query_scores(relevance(yq, nn), np.array([0, 1]), (1,))


def test_ties_rank_in_gallery_order():
    # Points on a 1-D grid with many exactly equal distances; integer coordinates make the
    # float32 distances exact, so FAISS and the stable sort see the same ties.
    x = np.array([[0.0], [1.0], [2.0], [1.0], [3.0], [2.0], [0.0], [3.0]], dtype=np.float32)
    y = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    ks = (1, 2, 4)
    got = evaluate_embeddings(x, y, ks, "l2")
    want = brute_force(x, y, ks, "l2")
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_leave_one_out_removes_self_even_when_a_duplicate_ties():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    d, i = knn_leave_one_out(x, 3, "cosine")
    for q in range(len(x)):
        assert q not in i[q]
        assert len(set(i[q])) == 3
    assert set(i[0][:1]) == {1} and set(i[1][:1]) == {0}  # the duplicate ranks first
    assert np.all(np.diff(d, axis=1) <= 1e-6)  # similarities descend


def test_recall_is_hit_rate_not_ir_recall():
    yq = np.array([0, 0, 1])
    nn = np.array([[1, 0, 0], [1, 1, 1], [1, 0, 1]])
    assert recall_at_k(yq, nn, 1) == pytest.approx(1 / 3)
    assert recall_at_k(yq, nn, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall_at_k(yq, nn, 4)


def test_map_at_r_by_hand():
    # R = 3; relevant at ranks 1 and 3 within the first 3: (1/1 + 2/3) / 3
    assert map_at_r(np.array([5]), np.array([[5, 2, 5, 5]]), np.array([3])) == pytest.approx(
        (1 + 2 / 3) / 3
    )
    with pytest.raises(ValueError):
        map_at_r(np.array([5]), np.array([[5]]), np.array([0]))


def test_relevant_counts_and_no_query_left():
    y = np.array([0, 0, 1])
    assert relevant_counts(y, y, leave_one_out=True).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="no query"):
        summarize(np.array([1]), np.array([[0]]), np.array([0]))
