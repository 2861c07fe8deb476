"""Retrieval metrics against a brute-force numpy computation written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluate import evaluate_embeddings
from retrieval.index import knn_leave_one_out
from retrieval.metrics import map_at_r, recall_at_k, relevant_counts, summarize


def brute_force(x: np.ndarray, y: np.ndarray, ks, metric: str = "cosine") -> dict:
    """Full distance matrix, stable sort, per-query loops: the definitions, nothing clever."""
    x = x.astype(np.float64)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = -(xn @ xn.T)
    else:
        dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    out = {f"recall@{k}": [] for k in ks}
    aps = []
    for q in range(len(x)):
        others = [j for j in np.argsort(dist[q], kind="stable") if j != q]
        rel = [y[j] == y[q] for j in others]
        r = sum(rel)
        if r == 0:
            continue  # no correct answer exists: left out
        for k in ks:
            out[f"recall@{k}"].append(any(rel[:k]))
        hits, ap = 0, 0.0
        for i in range(r):
            if rel[i]:
                hits += 1
                ap += hits / (i + 1)
        aps.append(ap / r)
    res = {key: float(np.mean(v)) for key, v in out.items()}
    res["map@r"] = float(np.mean(aps))
    res["queries"] = len(aps)
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
